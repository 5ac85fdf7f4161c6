"""06_distributed.py: one model, many processes. DDP, ZeRO-1 and FSDP2 under torchrun.

05 trained the GPT in one process. Here the same training runs on N processes: one per GPU
talking through NCCL, or CPU processes talking through gloo (so it runs, and is tested, on a
laptop). All three strategies are data parallel: every rank runs the whole model on its own
slice of each global batch, and the ranks average their gradients, so N ranks with B/N rows
each take exactly the step one process takes with B rows (the tests check it to 1e-6; with 05's
settings in float32, 06 on any number of ranks prints 05's losses). They differ in what each rank keeps in
memory and in which collective runs when:

  per rank, P parameters,      params   grads    AdamW state  collectives in a step
  fp32 AdamW (bytes)
  ddp    replicate everything  4P       4P       8P           all-reduce grads during backward
  zero1  shard optimizer state 4P       4P       8P/N         all-reduce grads; broadcast params
  fsdp   shard everything      4P/N     4P/N     8P/N         all-gather params before each block's
                                                              forward and backward; reduce-scatter grads

(fsdp also holds about one block's gathered parameters at a time.) The script measures these
bytes on the real tensors (FSDP's local shards) after the first step and prints them per rank.

Then what a long job needs: activation checkpointing (memory for compute), checkpoints (a full
state dict gathered to rank 0 in 05's format, which 05, 09 and any world size can load; or a
sharded one written by every rank with torch.distributed.checkpoint), and fault tolerance: under
`torchrun --max-restarts=K` a crashed rank makes torchrun restart every rank, which resume from
the last checkpoint; since the batches (02's get_batch) and the dropout masks are functions of
(seed, step, rank), the restarted job ends with exactly the weights of an uninterrupted one.

References: Li et al. 2020, "PyTorch Distributed: Experiences on Accelerating Data Parallel
Training" (DDP); Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
Parameter Models"; Zhao et al. 2023, "PyTorch FSDP"; Chen et al. 2016, "Training Deep Nets with
Sublinear Memory Cost" (activation checkpointing); pytorch/torchtitan (FSDP2 in practice);
karpathy/nanoGPT train.py and build-nanogpt (DDP).

Run (torchrun starts the processes and gives each RANK, LOCAL_RANK, WORLD_SIZE):
  python 06_distributed.py                                  # a world of one, same code path
  torchrun --standalone --nproc_per_node=2 06_distributed.py --strategy=fsdp   # 2 CPU ranks (gloo)
  torchrun --standalone --nproc_per_node=8 06_distributed.py --strategy=fsdp \\
      --tokenizer=gpt2 --n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 \\
      --batch_size=64 --gradient_accumulation_steps=8           # 8 GPUs (nccl), GPT-2 small
  TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --standalone --nproc_per_node=2 --max-restarts=1 \\
      06_distributed.py --max_iters=40 --checkpoint_interval=10 --fail_at_step=25   # a rank dies, all resume
  # several machines: the same command on every node (HOST = node 0's address)
  torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
      --rdzv-id=gpt 06_distributed.py --strategy=fsdp
"""

import argparse
import functools
import gc
import hashlib
import inspect
import json
import math
import os
import random
import re
import shutil
import signal
import struct
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields, replace
from datetime import timedelta
from pathlib import Path
from typing import ClassVar

import numpy as np
import requests
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed._composable import checkpoint as checkpoint_activations
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel as DDP

ROOT = Path(__file__).resolve().parent
DATA_DIR = ROOT / "data"

# -----------------------------------------------------------------------------
# From 01_tokenizer.py: tokenizers and a checked download


# copied from 01_tokenizer.py: CharTokenizer
class CharTokenizer:
    """One token per character: the simplest tokenizer (vocabulary = the characters seen).

    >>> tok = CharTokenizer.from_text("hello")      # vocabulary "ehlo": e=0, h=1, l=2, o=3
    >>> tok.encode("hole"), tok.decode([2, 0])
    ([1, 3, 2, 0], 'le')
    """

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars):
            raise ValueError("chars has repeated characters; build it with CharTokenizer.from_text(text)")
        self.chars = chars
        self.stoi = {ch: i for i, ch in enumerate(chars)}
        self.itos = dict(enumerate(chars))
        self.n_vocab = len(chars)
        self.eot_token = None  # no end-of-text token: 05 trains on one continuous text

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[ch] for ch in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the vocabulary; build the tokenizer "
                             "from text that contains it (CharTokenizer.from_text)") from None

    def decode(self, ids) -> str:
        try:
            return "".join([self.itos[i] for i in ids])
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]!r} is not in the vocabulary "
                             f"(ids are 0..{self.n_vocab - 1})") from None

    def to_dict(self) -> dict:
        return {"kind": "char", "chars": self.chars}


# copied from 01_tokenizer.py: get_tokenizer
def get_tokenizer(spec: dict):
    """{"kind": "char", "chars": ...} -> CharTokenizer; {"kind": "gpt2"} -> tiktoken's GPT-2.

    Checkpoints store this small dict, not the tokenizer. For GPT-2 we use tiktoken (Rust, fast);
    BPETokenizer below gives the same ids and shows how they are made.
    """
    kind = spec.get("kind")
    if kind == "char":
        return CharTokenizer(spec["chars"])
    if kind == "gpt2":
        import tiktoken  # imported here so that char-only scripts do not need it

        return tiktoken.get_encoding("gpt2")
    raise ValueError(f"unknown tokenizer kind {kind!r}; use {{'kind': 'char', 'chars': ...}} "
                     "or {'kind': 'gpt2'}")


# copied from 01_tokenizer.py: download
def download(url: str, path, sha256: str, timeout=30) -> Path:
    """Download url to path: streamed, sha256-checked, written to path.tmp then renamed.

    A file that is already there with the right hash is not downloaded again. On an HTTP error
    or a hash mismatch we raise and leave no file behind, so a half-written download can never
    be mistaken for the real one.
    """
    path = Path(path)
    if path.exists():
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() == sha256:
            return path
        path.unlink()  # corrupt or outdated: never leave it where a good file is expected
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    digest = hashlib.sha256()
    try:
        with requests.get(url, stream=True, timeout=timeout) as response:
            response.raise_for_status()
            total = int(response.headers.get("content-length", 0))
            done = 0
            with open(tmp, "wb") as f:
                for block in response.iter_content(chunk_size=1 << 20):
                    f.write(block)
                    digest.update(block)
                    done += len(block)
                    if total > 1 << 24:  # progress only for big files (> 16 MB)
                        print(f"\r{path.name}: {done / 2**20:.0f}/{total / 2**20:.0f} MB", end="", flush=True)
            if total > 1 << 24:
                print()
        if digest.hexdigest() != sha256:
            raise ValueError(f"sha256 mismatch for {url}: expected {sha256}, got {digest.hexdigest()}; "
                             "retry; if it persists the file changed upstream: check it and update the hash, "
                             f"or put the expected file in {path.parent} by hand")
        os.replace(tmp, path)
    except requests.RequestException as e:
        raise RuntimeError(f"download of {url} failed: {e}; check the URL and your network, "
                           f"or put the file (sha256 {sha256}) in {path.parent} by hand") from e
    finally:
        tmp.unlink(missing_ok=True)
    return path


# -----------------------------------------------------------------------------
# From 02_dataloader.py: the corpus, token files and the stateless, rank-aware get_batch

# copied from 02_dataloader.py: _RASBT
_RASBT = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07"
# copied from 02_dataloader.py: _GPT2
_GPT2 = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main"
# copied from 02_dataloader.py: SOURCES
SOURCES = {  # name -> (url, sha256, filename in data/)
    "tinyshakespeare": (
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        "tinyshakespeare.txt",
    ),
    "gpt2-encoder": (
        f"{_GPT2}/encoder.json",
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
        "encoder.json",
    ),
    "gpt2-vocab": (
        f"{_GPT2}/vocab.bpe",
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
        "vocab.bpe",
    ),
    "instruction-data": (
        f"{_RASBT}/01_main-chapter-code/instruction-data.json",
        "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
        "instruction-data.json",
    ),
    "preference-data": (
        f"{_RASBT}/04_preference-tuning-with-dpo/instruction-data-with-preference.json",
        "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e",
        "instruction-data-with-preference.json",
    ),
}


# copied from 02_dataloader.py: fetch
def fetch(name: str, data_dir=DATA_DIR) -> Path:
    """The local path of the known source `name`, downloaded into data_dir if it is missing."""
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; known sources: {', '.join(SOURCES)}")
    url, sha256, filename = SOURCES[name]
    return download(url, Path(data_dir) / filename, sha256)


# copied from 02_dataloader.py: token_dtype
def token_dtype(n_vocab: int) -> np.dtype:
    """uint16 holds ids 0..65535, enough for GPT-2's 50257 and half the disk of uint32."""
    return np.dtype(np.uint16) if n_vocab <= 2**16 else np.dtype(np.uint32)


# copied from 02_dataloader.py: prepare_corpus
def prepare_corpus(text: str, out_dir, tokenizer_spec: dict, val_fraction: float = 0.1) -> dict:
    """Tokenize text into out_dir/train.bin, val.bin and meta.json; return the metadata.

    The split is on the TEXT: the first (1 - val_fraction) of the characters are train, the rest
    val (nanoGPT's shakespeare_char split). A contiguous split, not random windows: neighbouring
    windows overlap, so a random split would put copies of the val text into train.
    The .bin files are raw token ids with no header; meta.json says how to read them.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}; e.g. use 0.1")
    tokenizer = get_tokenizer(tokenizer_spec)
    dtype = token_dtype(tokenizer.n_vocab)
    split_at = int(len(text) * (1 - val_fraction))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, part in (("train", text[:split_at]), ("val", text[split_at:])):
        # a literal <|endoftext|> in a GPT-2 corpus is a document separator: encode it as the token
        special = {} if tokenizer.eot_token is None else {"allowed_special": "all"}
        ids = np.array(tokenizer.encode(part, **special), dtype=np.int64)
        if len(ids) == 0:
            raise ValueError(f"the {split} split is empty ({len(text)} characters of text); "
                             "use more text or another val_fraction")
        ids.astype(dtype).tofile(out_dir / f"{split}.bin")
        counts[split] = len(ids)
    meta = {"tokenizer": tokenizer_spec, "n_vocab": tokenizer.n_vocab, "dtype": dtype.name,
            "train_tokens": counts["train"], "val_tokens": counts["val"]}
    # written last: a corpus without meta.json is an unfinished one, and load_tokens says so
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return meta


# copied from 02_dataloader.py: load_meta
def load_meta(out_dir) -> dict:
    """meta.json of a prepared corpus."""
    path = Path(out_dir) / "meta.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; prepare the corpus first "
                                "(prepare_corpus(...) or python 02_dataloader.py)")
    return json.loads(path.read_text(encoding="utf-8"))


# copied from 02_dataloader.py: load_tokens
def load_tokens(out_dir, split: str) -> np.memmap:
    """The token ids of split ("train" or "val") as a read-only np.memmap.

    A raw .bin has no header, so the same bytes read as uint16 or uint32 give different (wrong)
    ids without any error. The byte size must equal token count x dtype size from meta.json;
    if it does not, we refuse rather than train on garbage.
    """
    if split not in ("train", "val"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 'val'")
    meta = load_meta(out_dir)
    path = Path(out_dir) / f"{split}.bin"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; prepare the corpus again")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise ValueError(f"{path.parent / 'meta.json'}: dtype {meta['dtype']!r} is not uint16 or uint32; "
                         "prepare the corpus again")
    dtype = np.dtype(meta["dtype"])
    if meta["n_vocab"] > np.iinfo(dtype).max + 1:
        raise ValueError(f"{path.parent / 'meta.json'}: n_vocab {meta['n_vocab']} does not fit in "
                         f"{dtype.name}; prepare the corpus again")
    n_tokens, size = meta[f"{split}_tokens"], path.stat().st_size
    if size != n_tokens * dtype.itemsize:
        other = np.dtype(np.uint32 if dtype == np.uint16 else np.uint16)
        hint = (f"; it looks written as {other.name}, not {dtype.name}" if size == n_tokens * other.itemsize
                else "; it is truncated or from another run")
        raise ValueError(f"{path} has {size} bytes but meta.json says {n_tokens} tokens of {dtype.name} "
                         f"= {n_tokens * dtype.itemsize} bytes{hint}; prepare the corpus again")
    return np.memmap(path, dtype=dtype, mode="r")


# copied from 02_dataloader.py: _check_window
def _check_window(n_tokens: int, block_size: int):
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if n_tokens < block_size + 1:
        raise ValueError(f"the data has {n_tokens} tokens but one (x, y) window needs block_size + 1 "
                         f"= {block_size + 1}; use a smaller block_size or more text")


# copied from 02_dataloader.py: _check_ranks
def _check_ranks(batch_size: int, rank: int, world_size: int):
    if batch_size <= 0 or world_size <= 0:
        raise ValueError(f"batch_size ({batch_size}) and world_size ({world_size}) must be positive")
    if batch_size % world_size != 0:
        raise ValueError(f"batch_size {batch_size} does not split across {world_size} ranks; "
                         f"use a multiple of {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1} (world_size {world_size})")


# copied from 02_dataloader.py: get_batch
def get_batch(data, batch_size: int, block_size: int, step: int, seed: int = 0,
              rank: int = 0, world_size: int = 1, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s share of global batch number `step`: x, y int64 of shape (B/W, T).

    The global batch is batch_size random windows whose start positions come from
    np.random.default_rng([seed, step]); every rank draws the same starts and keeps rows
    [rank*B/W, (rank+1)*B/W). So the batch is a pure function of (seed, step): no loader state
    to checkpoint, a resumed run sees exactly the batches it would have seen, and W ranks
    together see exactly the batch of one process.

    y is x shifted by one: y[b, t] = data[i_b + t + 1] is the target for the prefix ending at
    x[b, t]. Example with data = [10, 11, 12, 13], block_size = 2 and start i = 1:
    x = [11, 12], y = [12, 13].
    """
    _check_window(len(data), block_size)
    _check_ranks(batch_size, rank, world_size)
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(data) - block_size, size=batch_size)  # last start: len - T - 1
    per_rank = batch_size // world_size
    starts = starts[rank * per_rank:(rank + 1) * per_rank]
    # one fancy-indexing read of (B, T+1) tokens, then x and y as contiguous copies: a strided view
    # would make .to("cuda", non_blocking=True) stage a pageable copy first (and block), and
    # .view(-1) on it fails
    window = data[starts[:, None] + np.arange(block_size + 1)].astype(np.int64)  # (B, T+1)
    x = torch.from_numpy(np.ascontiguousarray(window[:, :-1]))  # (B, T)
    y = torch.from_numpy(np.ascontiguousarray(window[:, 1:]))  # (B, T)
    if torch.device(device).type == "cuda":  # pinned memory lets the copy overlap with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# -----------------------------------------------------------------------------
# From 03_attention.py and 04_gpt.py: the model


# copied from 03_attention.py: CausalSelfAttention
class CausalSelfAttention(nn.Module):
    """MultiHeadAttention with the core replaced by F.scaled_dot_product_attention (SDPA).

    SDPA computes softmax(q k^T / sqrt(hs) + mask) v in one call and picks a kernel: on GPU,
    FlashAttention or the memory-efficient kernel walk over blocks of keys with a running softmax,
    so the (T, T) score matrix never exists in memory (O(T) memory instead of O(T^2), and far fewer
    trips to slow GPU memory); on CPU a tiled kernel of the same idea. `python 03_attention.py
    --bench` measures the difference. Weights and names are MultiHeadAttention's.

    Padding (07 finetuning and 08 DPO batch sequences of unequal length): attention_mask (B, T),
    True/1 = real token, False/0 = padding. A query may attend to key j only if j is not in its
    future AND j is a real token, so padding never influences real tokens, wherever it sits (left
    or right). subtle: a padded query (e.g. left padding at position 0) may have no allowed key at
    all; softmax over an all -inf row is 0/0 = NaN, and NaN * 0 is still NaN in the gradients. So
    every query may also attend to itself (the diagonal): real rows already include it, and padded
    rows get a finite value that the loss ignores anyway.

    x: (B, T, n_embd) -> (B, T, n_embd). 04_gpt.py copies this class verbatim.
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if n_head <= 0 or n_embd % n_head != 0:  # inline, not check_n_head: this class is copied alone
            raise ValueError(
                f"n_embd={n_embd} is not divisible by n_head={n_head}: every head gets n_embd // n_head "
                f"channels, so choose an n_head that divides n_embd (GPT-2: n_embd=768, n_head=12)"
            )
        self.n_embd, self.n_head = n_embd, n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)  # q, k, v of all heads in one matmul
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)  # mixes the heads' outputs
        self.attn_dropout_p = dropout  # SDPA takes dropout on the weights as an argument
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        dropout_p = self.attn_dropout_p if self.training else 0.0
        if attention_mask is None:
            # is_causal lets the kernel skip the blocks above the diagonal instead of masking them
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            if attention_mask.shape != (B, T):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)} but x is (B, T) = {(B, T)} "
                    f"tokens: pass one (B, T) row per sequence, True/1 for real tokens, False/0 for padding"
                )
            allowed = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()  # (T, T) causal
            allowed = allowed & attention_mask.bool()[:, None, None, :]  # (B, 1, T, T) and key is real
            allowed = allowed | torch.eye(T, dtype=torch.bool, device=x.device)  # self: never NaN
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


# copied from 04_gpt.py: GPTConfig
@dataclass
class GPTConfig:
    """The numbers that define a GPT. Defaults are GPT-2 small (124M).

    >>> GPTConfig.from_preset("gpt2-medium").n_layer
    24
    >>> GPTConfig.from_preset("tiny", vocab_size=65).vocab_size    # presets take overrides
    65
    """

    block_size: int = 1024  # longest sequence the model can see (number of learned positions)
    vocab_size: int = 50257  # GPT-2's BPE: 50,000 merges + 256 bytes + <|endoftext|>
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block; each head has n_embd // n_head dimensions
    n_embd: int = 768  # width of the residual stream
    dropout: float = 0.0  # 0 for pretraining (GPT-2 used 0.1); try 0.1+ when finetuning small data
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2; False is a bit faster and as good

    # The four GPT-2 sizes (Radford et al. 2019, table 2) and two small ones for a laptop.
    # ClassVar: a class constant, not a field, so it travels with GPTConfig when later stages copy it.
    PRESETS: ClassVar[dict[str, dict]] = {
        "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
        "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
        "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
        "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
        "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),  # nanoGPT's shakespeare-char
        "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64),  # tests and quick demos
    }

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                f"choose n_head among the divisors of n_embd (e.g. n_embd={self.n_head * 64} for "
                f"n_head={self.n_head} with 64-dimensional heads)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in cls.PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})


# copied from 04_gpt.py: MLP
class MLP(nn.Module):
    """Position-wise feed-forward: widen 4x, GELU, project back. Most of a block's parameters live here.

    GPT-2 uses the tanh approximation of GELU (it was cheaper in 2019); we keep it so that OpenAI's
    weights give OpenAI's outputs.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C)


# copied from 04_gpt.py: Block
class Block(nn.Module):
    """One transformer block, pre-LayerNorm: x + attn(ln(x)), then x + mlp(ln(x)).

    Normalising the input of each branch (not its output, as the 2017 transformer did) leaves the
    residual stream an untouched sum from embedding to output, so gradients flow straight through
    and deep stacks train without warmup tricks. GPT-2 moved the LayerNorm here for that reason.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config.n_embd, config.n_head, config.dropout, config.bias)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, attention_mask=None):
        x = x + self.attn(self.ln_1(x), attention_mask)  # tokens talk to each other
        x = x + self.mlp(self.ln_2(x))  # each token thinks on its own
        return x


# copied from 04_gpt.py: GPT
class GPT(nn.Module):
    """GPT-2: embeddings -> n_layer blocks -> LayerNorm -> LM head (tied to the token embedding).

    >>> model = GPT(GPTConfig.from_preset("tiny", vocab_size=100))
    >>> logits, loss = model(torch.randint(100, (2, 8)), targets=torch.randint(100, (2, 8)))
    >>> logits.shape, round(loss.item())                # loss starts near ln(100) = 4.6
    (torch.Size([2, 8, 100]), 5)
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embedding
                wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embedding
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017): the matrix that maps a token to a vector also scores
        # vectors against tokens. One Parameter, two uses; its gradient is the sum of both.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init: each block adds two branch outputs (attn, mlp) into the residual
        # stream, so its variance grows with depth; shrink the last projection of each branch by
        # 1/sqrt(2 * n_layer) to keep the sum's scale independent of depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None, attention_mask=None):
        """Logits for every position, and the mean cross-entropy loss when targets are given.

        idx: (B, T) token ids, T <= block_size. targets: (B, T), -100 marks positions to ignore
        (padding, prompts in finetuning). attention_mask: optional (B, T), True/1 = real token.
        Positions are absolute (0..T-1), so pad on the right: a left-padded row would shift its
        real tokens' positions (09's generation passes its own positions for left padding).
        Returns (logits (B, T, vocab_size), loss or None).
        """
        self._check_input(idx)
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C) + (T, C) -> (B, T, C)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, attention_mask)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T), ignore_index=-100)
        return logits, loss

    def _check_input(self, idx):
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"idx must be a (B, T) tensor of integer token ids, got shape {tuple(idx.shape)} and "
                f"dtype {idx.dtype}; for one sequence use idx[None] (and .long() for other dtypes)"
            )
        block_size, vocab_size = self.config.block_size, self.config.vocab_size
        if idx.size(1) > block_size:
            raise ValueError(
                f"sequence length {idx.size(1)} exceeds block_size={block_size} (the model has no "
                f"position embedding beyond it); crop to the last tokens with idx[:, -{block_size}:]"
            )
        # subtle: reading min/max makes the CPU wait for a GPU, and torch.compile would break its
        # graph here; so only eager CPU tensors are checked (elsewhere an out-of-range id fails
        # inside the embedding, with a less helpful message).
        if idx.numel() and idx.device.type == "cpu" and not torch.compiler.is_compiling():
            lo, hi = idx.min().item(), idx.max().item()
            if lo < 0 or hi >= vocab_size:
                raise ValueError(
                    f"token ids must be in [0, {vocab_size}), got ids from {lo} to {hi}; the tokenizer "
                    f"and the model disagree: set GPTConfig.vocab_size to the tokenizer's n_vocab"
                )

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, the tied wte/lm_head counted once: 124,439,808 for GPT-2 small.

        non_embedding=True leaves out the position embedding: a table lookup costs no FLOPs.
        (The token embedding stays in: as the LM head it is a real matmul.)
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """FLOPs to train on one token (forward + backward) at context length seq_len.

        A matmul with a weight of N parameters costs 2N FLOPs per token forward (a multiply and an
        add per weight) and 4N backward (gradients for the input and for the weight): 6N. Attention
        adds matmuls with no weights, QK^T and att @ V, 2 * T * C each per layer forward, so
        12 * n_layer * T * C for forward + backward (PaLM's appendix B; we count the full T x T
        even though the causal mask makes half of it zeros, as everyone does).
        """
        T = self.config.block_size if seq_len is None else seq_len
        L, C = self.config.n_layer, self.config.n_embd
        return 6 * self.num_params(non_embedding=True) + 12 * L * C * T

    def estimate_mfu(self, tokens_per_iter: int, dt: float, peak_flops: float = 312e12, seq_len=None):
        """Model FLOPs utilisation: the fraction of the hardware's peak that training achieves.

        tokens_per_iter tokens processed (forward + backward) in dt seconds, at context seq_len
        (default block_size). peak_flops defaults to an A100's bf16 dense peak, as in nanoGPT;
        pass your device's (04's --bench measures the CPU's fp32 matmul peak).
        """
        return self.flops_per_token(seq_len) * tokens_per_iter / dt / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None):
        """Append max_new_tokens tokens to idx (B, T), one at a time, each fed back as input.

        temperature=0 is greedy (argmax); otherwise logits / temperature are sampled, < 1 sharper,
        > 1 flatter; top_k keeps only the k most likely tokens. The context is cropped to the last
        block_size tokens. Call model.eval() first to turn dropout off. (No KV cache: each step
        reruns the whole context; 09 adds the cache.)
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if top_k is not None and top_k <= 0:
            raise ValueError(f"top_k must be a positive integer or None, got {top_k}")
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size :])
            logits = logits[:, -1, :]  # (B, vocab_size): only the last position predicts the next token
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx

    @classmethod
    def from_pretrained(cls, model_type: str, cache_dir=DATA_DIR) -> "GPT":
        """GPT-2 with OpenAI's weights: "gpt2" (124M), "gpt2-medium", "gpt2-large" or "gpt2-xl".

        Downloads Hugging Face's model.safetensors once into cache_dir/<model_type>/ (0.5 to 6 GB).
        The model is built on the "meta" device (shapes only, no memory, no random init) and then
        takes the checkpoint's tensors as its own, so gpt2-xl never exists twice in memory.
        """
        if model_type not in HF_MODELS:
            raise ValueError(f"unknown pretrained model {model_type!r}; choose one of {HF_MODELS}")
        path = Path(cache_dir) / model_type / "model.safetensors"
        download_checked(f"https://huggingface.co/{model_type}/resolve/main/model.safetensors", path)
        with torch.device("meta"):
            model = cls(GPTConfig.from_preset(model_type))  # vocab 50257, block 1024, bias, no dropout
        model.load_state_dict(hf_to_gpt_state_dict(load_safetensors(path)), assign=True)
        model.lm_head.weight = model.transformer.wte.weight  # assign=True gave them two Parameters: re-tie
        return model


# copied from 04_gpt.py: HF_MODELS
HF_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


# copied from 04_gpt.py: download_checked
def download_checked(url: str, path, timeout: float = 30) -> Path:
    """Stream url into path unless path exists; the byte count must match what the server announced.

    Hugging Face announces the size (X-Linked-Size, else Content-Length) and, for large files, the
    sha256 (X-Linked-Etag); we check both when given. We write to path + ".tmp" and rename at the
    end, so a file at `path` is always a complete download.
    """
    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        # identity: a gzip-encoded response would make the decoded byte count differ from Content-Length
        with requests.get(url, stream=True, timeout=timeout, headers={"Accept-Encoding": "identity"}) as r:
            r.raise_for_status()
            headers = {k.lower(): v for resp in [*r.history, r] for k, v in resp.headers.items()}
            size = int(headers.get("x-linked-size") or headers.get("content-length") or -1)
            sha256 = headers.get("x-linked-etag", "").strip('"').removeprefix("W/").strip('"')
            got, digest = 0, hashlib.sha256()
            with open(tmp, "wb") as f:
                for chunk in r.iter_content(chunk_size=1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    got += len(chunk)
                    if size > 0:
                        print(f"\r{path.name}: {got / 1e6:,.0f} / {size / 1e6:,.0f} MB", end="", flush=True)
            print()
        if size >= 0 and got != size:
            raise RuntimeError(f"download of {url} is incomplete: got {got} bytes, expected {size}; retry")
        if len(sha256) == 64 and digest.hexdigest() != sha256:
            raise RuntimeError(f"sha256 of {url} is {digest.hexdigest()}, expected {sha256}; retry")
    except requests.RequestException as e:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(
            f"could not download {url} ({e}); without network, fetch the file elsewhere and put it at {path}"
        ) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return path


# copied from 04_gpt.py: SAFETENSORS_DTYPES
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


# copied from 04_gpt.py: load_safetensors
def load_safetensors(path) -> dict[str, torch.Tensor]:
    """Read a .safetensors file: the whole format is a length, a JSON header and raw bytes.

        [8 bytes: N, little-endian uint64][N bytes: JSON header][data]
        header = {"wte.weight": {"dtype": "F32", "shape": [50257, 768], "data_offsets": [0, 154389504]},
                  ..., "__metadata__": {...}}   # offsets are relative to the start of the data

    Each tensor is its bytes in row-major, little-endian order (every machine PyTorch runs on is
    little-endian, so torch.frombuffer reads them as they are). No code runs while loading, unlike
    a pickled .bin checkpoint, which is why Hugging Face moved to this format.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; check the path (GPT.from_pretrained downloads it)")
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        if file_size < 8:
            raise ValueError(f"{path} is {file_size} bytes, too short for a safetensors file; re-download it")
        (header_len,) = struct.unpack("<Q", f.read(8))
        if 8 + header_len > file_size:
            raise ValueError(f"{path}: header length {header_len} exceeds the file size; re-download it")
        header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        start = 8 + header_len
        tensors = {}
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(
                    f"{path}: tensor {name} has dtype {info['dtype']}, which this reader does not "
                    f"support; supported: {sorted(SAFETENSORS_DTYPES)}"
                )
            dtype, shape = SAFETENSORS_DTYPES[info["dtype"]], info["shape"]
            begin, end = info["data_offsets"]
            nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            if end - begin != nbytes or start + end > file_size:
                raise ValueError(f"{path}: tensor {name} has inconsistent offsets; the file is corrupt")
            if nbytes == 0:
                tensors[name] = torch.empty(shape, dtype=dtype)
                continue
            buffer = bytearray(nbytes)
            f.seek(start + begin)
            f.readinto(buffer)
            tensors[name] = torch.frombuffer(buffer, dtype=dtype).reshape(shape)
    return tensors


# copied from 04_gpt.py: HF_TRANSPOSED
HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


# copied from 04_gpt.py: hf_to_gpt_state_dict
def hf_to_gpt_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and transpose) a Hugging Face GPT-2 state dict into this file's GPT's names.

    "h.0.attn.c_attn.weight" (768, 2304)  ->  "transformer.h.0.attn.c_attn.weight" (2304, 768)
    Keys may come with or without the "transformer." prefix (checkpoints differ). The attention-mask
    buffers "attn.bias" / "attn.masked_bias" of old checkpoints are constants, not weights: dropped.
    lm_head.weight is the tied wte.weight when the checkpoint leaves it out.
    """
    out = {}
    for name, tensor in sd.items():
        name = name.removeprefix("transformer.")
        # subtle: the leading dot matters, "h.0.attn.c_attn.bias" also ends with "attn.bias"
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        if name.endswith(HF_TRANSPOSED):
            tensor = tensor.t()
        out[name if name == "lm_head.weight" else "transformer." + name] = tensor.contiguous()
    if "transformer.wte.weight" not in out:
        raise ValueError(f"no wte.weight among the keys {sorted(sd)[:5]}...; is this a GPT-2 checkpoint?")
    out.setdefault("lm_head.weight", out["transformer.wte.weight"])
    return out


# -----------------------------------------------------------------------------
# From 05_pretrain.py: command line, device and precision, optimizer, schedule, data, checkpoints


# copied from 05_pretrain.py: parse_config
def parse_config(cls, argv=None):
    """A dataclass of settings from the command line: each field becomes a --field=value flag.

    The help text of a flag is the comment after its field. Bools take true/false (also 1/0, yes/no),
    and a bare flag means true: `--compile` is `--compile=true`.
    If cls has a PRESETS dict and a `preset` field, the chosen preset is applied first and the flags
    given on the command line override it:
        parse_config(TrainConfig, ["--preset=shakespeare-char-gpu", "--dropout=0.1"])
    """

    def to_bool(text: str) -> bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")

    try:  # the comment after each field, e.g. `n_layer: int = 4  # transformer blocks`
        helps = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", inspect.getsource(cls), re.M))
    except (OSError, TypeError):  # no source file (e.g. defined in a REPL)
        helps = {}
    presets = getattr(cls, "PRESETS", {})
    epilog = "presets:\n" + "\n".join(f"  {name}: {values}" for name, values in presets.items())
    parser = argparse.ArgumentParser(description=(cls.__doc__ or "").split("\n")[0],
                                     epilog=epilog if presets else None,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(cls):
        kind = f.type if isinstance(f.type, type) else type(f.default)
        help_text = f"{helps.get(f.name, '')} (default: {f.default!r})".replace("%", "%%").lstrip()
        flag = kind is bool
        parser.add_argument(f"--{f.name}", type=to_bool if flag else kind, metavar=kind.__name__,
                            nargs="?" if flag else None, const=True if flag else None,
                            default=argparse.SUPPRESS, help=help_text,  # SUPPRESS: absent flags stay absent
                            choices=sorted(presets) if f.name == "preset" and presets else None)
    given = vars(parser.parse_args(argv))
    preset = presets.get(given.get("preset", getattr(cls, "preset", None)), {})
    try:
        return cls(**{**preset, **given})
    except ValueError as e:  # a bad combination of values: argparse prints it with the usage line
        parser.error(str(e))


# copied from 05_pretrain.py: pick_device
def pick_device(device: str = "auto") -> str:
    """"auto" -> "cuda" if a GPU is there, else "mps" (Apple silicon), else "cpu"; others are checked."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    kind = device.split(":")[0]
    if kind not in available:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:<index> or mps")
    if not available[kind]:
        raise ValueError(f"device {device!r} is not available on this machine; use --device=auto (or cpu)")
    return device


# copied from 05_pretrain.py: pick_dtype
def pick_dtype(dtype: str, device_type: str) -> str:
    """"auto" -> bfloat16 on GPUs that have it (Ampere and newer), float16 on older ones; on CPU,
    bfloat16 if its matmuls measure at least 2x faster than float32's, else float32.

    CPUs with bf16 units (AVX512-BF16, AMX, recent Arm) multiply bf16 matrices 2-4x faster than
    fp32 ones; on the others bf16 is emulated and slower, so we measure instead of guessing (~0.1 s,
    with the current thread count). On CUDA bf16 needs no gradient scaling, fp16 does (see train).
    """
    if dtype != "auto":
        return dtype
    if device_type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device_type != "cpu":
        return "float32"
    seconds = {}
    for name in ("float32", "bfloat16"):
        a = torch.full((1024, 1024), 0.5, dtype=getattr(torch, name))  # not randn: leave the RNG alone
        timings = []
        for _ in range(4):
            t0 = time.perf_counter()
            a @ a
            timings.append(time.perf_counter() - t0)
        seconds[name] = min(timings)  # the fastest: least disturbed by other processes
    return "bfloat16" if 2 * seconds["bfloat16"] <= seconds["float32"] else "float32"


# copied from 05_pretrain.py: GPU_PEAK_FLOPS
GPU_PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12,
}  # fmt: skip


# copied from 05_pretrain.py: peak_flops
@functools.cache
def peak_flops(device: str, dtype: str, threads: int) -> float | None:
    """The FLOP/s that MFU is measured against: a GPU's datasheet peak, or a CPU's measured one.

    CPUs have no datasheet number that anyone reaches, so we time a 2048 x 2048 matmul in the
    training dtype with the run's thread count (~0.5 s, once) and call the best of 5 the peak (a
    smaller or single timing is easily caught by another process and gives MFUs above 100%).
    None when unknown (mps, a GPU not in GPU_PEAK_FLOPS). threads is an argument for the cache.
    """
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        return next((flops for gpu, flops in GPU_PEAK_FLOPS.items() if gpu in name), None)
    if device != "cpu":
        return None
    # torch.full, not randn: drawing random numbers here would shift the run's RNG stream (the
    # dropout masks) after a resume restored it, and the values do not change a matmul's speed
    n = 2048
    a = torch.full((n, n), 0.5, dtype=getattr(torch, dtype))
    best = float("inf")
    for _ in range(6):  # the first one warms up
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


# copied from 05_pretrain.py: autocast_context
def autocast_context(device_type: str, dtype: str):
    """Mixed precision: matmuls run in dtype, precision-sensitive ops (softmax, norms, the loss) in fp32.

    The weights stay fp32: they are the master copy AdamW updates, since a bf16 weight cannot absorb
    an update 1000x smaller than itself. bf16 has fp32's exponent range, so gradients need no
    scaling; fp16 does (GradScaler, see train). "float32" means no autocast at all.
    """
    if dtype == "float32":
        return nullcontext()
    if dtype not in ("bfloat16", "float16"):
        raise ValueError(f"dtype {dtype!r} is not float32, bfloat16 or float16")
    return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))


# copied from 05_pretrain.py: configure_optimizers
def configure_optimizers(model, weight_decay: float, learning_rate: float, betas, device_type: str):
    """AdamW with two groups: weight decay on every 2-D tensor, none on the 1-D ones.

    Weight decay shrinks weights toward zero at every step (decoupled from the gradient: AdamW, not
    an L2 term in the loss). It is meant for the matrices that multiply activations: the Linear
    weights, and the embeddings, whose token matrix is also the LM head (tied). Biases and LayerNorm
    gains are 1-D shifts and scales; decaying them regularizes nothing and drags the gains toward
    0, i.e. toward switching their layer off. GPT-2's training code was never published and
    practice differs on the embeddings (minGPT exempted them); we follow nanoGPT, whose Shakespeare
    numbers we compare against: decay iff p.dim() >= 2. Frozen parameters (LoRA, in 07) are left out.

    fused=True (all tensors updated by one kernel) where PyTorch has it: CUDA, and CPU since
    PyTorch 2.4, where it measured several times faster than foreach for our small models' step;
    foreach (one op per group for all tensors) elsewhere.
    """
    params = [p for p in model.parameters() if p.requires_grad]  # a tied weight appears once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fast = {"fused": True} if device_type in ("cuda", "cpu") else {"foreach": True}
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **fast)


# copied from 05_pretrain.py: get_lr
def get_lr(it: int, cfg) -> float:
    """Learning rate at iteration it: linear warmup, then a cosine down to min_lr at lr_decay_iters.

    With the CPU recipe (learning_rate 1e-3, min_lr 1e-4, warmup 100, decay until 2000):
    it=0 -> 1e-3 / 101; it=100 -> 1e-3 (the peak); it=1050, halfway through the cosine ->
    1e-4 + 0.5 * (1 + cos(pi / 2)) * 9e-4 = 5.5e-4; it >= 2000 -> 1e-4. Warmup matters because
    Adam's second-moment estimate is noise in the first steps, and full-size steps on it diverge.
    """
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)  # 0 -> 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


# copied from 05_pretrain.py: load_corpus
def load_corpus(cfg) -> tuple[dict, dict]:
    """({"train": tokens, "val": tokens}, tokenizer spec) for cfg.dataset; tokenized on first use."""
    data_dir = Path(cfg.data_dir or DATA_DIR)
    corpus = data_dir / f"{cfg.dataset}-{cfg.tokenizer}"
    if not (corpus / "meta.json").exists():
        text = fetch(cfg.dataset, data_dir).read_text(encoding="utf-8")
        spec = CharTokenizer.from_text(text).to_dict() if cfg.tokenizer == "char" else {"kind": "gpt2"}
        print(f"tokenizing {cfg.dataset} ({len(text):,} characters) into {corpus}")
        prepare_corpus(text, corpus, spec)
    data = {split: load_tokens(corpus, split) for split in ("train", "val")}
    return data, load_meta(corpus)["tokenizer"]


# copied from 05_pretrain.py: sample
def sample(model, tokenizer, cfg) -> str:
    """cfg.prompt continued by cfg.max_new_tokens sampled tokens, always with the same seed.

    Sampling draws random numbers; fork_rng gives it its own copy of the generator, so the training
    RNG (dropout) is untouched and a run with samples is bit-identical to one without.
    """
    idx = torch.tensor([tokenizer.encode(cfg.prompt)], dtype=torch.long, device=cfg.device)
    cuda = torch.device(cfg.device).type == "cuda"
    model.eval()
    with torch.random.fork_rng(devices=[torch.device(cfg.device)] if cuda else []):
        torch.manual_seed(cfg.seed)
        with autocast_context(torch.device(cfg.device).type, cfg.dtype):
            out = model.generate(idx, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k)
    model.train()
    return tokenizer.decode(out[0].tolist())


# copied from 05_pretrain.py: rng_states
def rng_states() -> dict:
    """The state of every random number generator a run may draw from.

    numpy's key array is stored as a list: torch.load(weights_only=True) unpickles only plain
    Python types and tensors, and that is how load_checkpoint reads checkpoints (no code runs).
    """
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, keys.tolist(), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


# copied from 05_pretrain.py: save_checkpoint
def save_checkpoint(path, ckpt: dict):
    """torch.save to path + ".tmp", flushed to disk, then renamed over path.

    The rename is atomic: whatever happens (Ctrl-C, a crash, a full disk) path holds either the old
    checkpoint or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# copied from 05_pretrain.py: load_checkpoint
def load_checkpoint(path, device="cpu"):
    """(model, tokenizer, checkpoint dict) from a checkpoint of 05 (or 07/08: same format).

    The model is 04's GPT, built from ckpt["model_args"] and moved to device, in training mode (call
    .eval() to sample). Keys of a torch.compile'd model carry an "_orig_mod." prefix; it is
    stripped, so any such checkpoint loads into a plain model. weights_only=True: loading runs
    no pickled code, so a checkpoint from elsewhere cannot execute anything.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}; train one with `python 05_pretrain.py` "
                                f"(it writes out_dir/ckpt.pt), or check --out_dir")
    ckpt = torch.load(path, map_location=device, weights_only=True)
    missing = {"model", "model_args", "tokenizer"} - set(ckpt)
    if missing:
        raise ValueError(f"{path} lacks {sorted(missing)}: it is not a checkpoint of these scripts")
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    return model.to(device), get_tokenizer(ckpt["tokenizer"]), ckpt


# -----------------------------------------------------------------------------
# 1. The process group: who am I, how many are we, how do we talk


@dataclass
class Dist:
    """This process's place in the job (what init_distributed returns)."""

    rank: int  # 0 .. world_size-1 over all machines; rank 0 logs and writes checkpoints
    local_rank: int  # index on this machine: which GPU this process drives
    world_size: int
    device: str  # "cuda:<local_rank>" or "cpu"
    owns_group: bool  # init_distributed made the group, so shutdown_distributed destroys it


def print0(*args, **kwargs):
    """print() on rank 0 only: eight ranks printing the same line eight times help nobody."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def init_distributed(device: str = "auto", timeout_s: float = 600) -> Dist:
    """Join the process group torchrun prepared for us, or make a world of one.

    torchrun starts one process per GPU (or CPU slot) and tells each who it is through environment
    variables: RANK (global index), LOCAL_RANK (index on this machine: which GPU), WORLD_SIZE, and
    MASTER_ADDR:MASTER_PORT, a key-value store where the ranks find each other. init_process_group
    reads them ("env://") and connects every rank to the others. The backend moves the bytes: NCCL
    for CUDA tensors (NVLink, InfiniBand), gloo for CPU tensors (TCP).
    Plain `python 06_distributed.py` has no torchrun: we make a group of one whose store lives in
    this process (HashStore), so the very same code runs and every collective is a no-op.
    If a group exists already (a test that spawned its own ranks), we join it and leave it alone.
    """
    owns_group = not dist.is_initialized()
    torchrun = owns_group and "RANK" in os.environ
    missing = [name for name in TORCHRUN_ENV if name not in os.environ]
    if torchrun and missing:
        raise ValueError(f"RANK is set but {', '.join(missing)} not: start the job with torchrun "
                         "(torchrun --standalone --nproc_per_node=2 06_distributed.py), "
                         "or unset RANK to run as a world of one")
    local_rank = int(os.environ.get("LOCAL_RANK", 0 if owns_group else dist.get_rank()))
    device = pick_device(device)
    if device == "mps":  # NCCL moves only CUDA tensors, gloo only CPU tensors
        print0("note: no collective backend moves mps tensors; using cpu")
        device = "cpu"
    if device.startswith("cuda"):  # one GPU per process: the LOCAL_RANK-th of this machine
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but this machine shows {torch.cuda.device_count()} "
                             "GPUs; start at most one process per GPU (torchrun --nproc_per_node)")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if torchrun:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                device_id=torch.device(device) if backend == "nccl" else None)
    elif owns_group:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0 and os.environ.get(
            "TORCHELASTIC_USE_AGENT_STORE") == "True":
        # measured with torch 2.13: restarted ranks share torchrun's store with the dead ones, may read
        # their addresses and then fail to connect, or hang (pytorch/pytorch#135712)
        print0("warning: with --max-restarts, launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in the "
               "environment, or a restart may fail to connect or hang")
    if backend == "gloo" and world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # N ranks each using every core would fight over the same cores
    return Dist(rank, local_rank, world_size, device, owns_group)


def shutdown_distributed(ctx: Dist, failed: bool = False):
    """Leave the process group in an order that cannot hang.

    gloo can deadlock if the group is destroyed while a DDP object still holds it. So: a barrier
    (every rank has finished its last collective; skipped after an error, when the other ranks may
    wait in some other collective and never arrive), then gc.collect() to free the model and
    optimizer the caller has dropped (DDP keeps reference cycles), then destroy the group.
    """
    if not ctx.owns_group:
        return
    if not failed:
        dist.barrier()
    gc.collect()
    dist.destroy_process_group()


# -----------------------------------------------------------------------------
# 2. Settings

STRATEGIES = ("ddp", "zero1", "fsdp")


@dataclass
class DistConfig:
    """Train 04's GPT on N processes with DDP, ZeRO-1 or FSDP2 (launch with torchrun; see the docstring)."""

    # data: 05's corpus files, tokenized on first use (by rank 0; the others wait)
    dataset: str = "tinyshakespeare"  # a text corpus of 02's SOURCES
    tokenizer: str = "char"  # char or gpt2
    data_dir: str = ""  # corpora and their token files; "" = data/ next to this script
    out_dir: str = "out/distributed"  # ckpt.pt (or dcp-*/ when sharded) and log.jsonl
    init_from: str = "auto"  # auto (resume if out_dir has a checkpoint, else scratch), resume, scratch
    # model (04's GPTConfig); defaults: 05's CPU recipe
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 128  # width of the residual stream
    block_size: int = 64  # context length in tokens
    dropout: float = 0.0  # dropout masks are drawn per rank and step, so restarts replay them
    bias: bool = False  # biases in Linear and LayerNorm
    # distributed
    strategy: str = "ddp"  # ddp, zero1 or fsdp: what each rank holds (apply_ddp, build_optimizer, apply_fsdp)
    activation_checkpointing: bool = False  # keep only each block's input; recompute the rest in backward
    sharded_checkpoint: bool = False  # every rank writes its own shards (DCP) instead of rank 0 all of it
    fail_at_step: int = 0  # fault injection: the last rank dies after this step (first attempt only)
    # optimization, as 05: a step is gradient_accumulation_steps micro-batches of batch_size rows
    batch_size: int = 12  # rows per micro-batch over ALL ranks; each rank takes batch_size / world_size
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    max_iters: int = 2000  # optimizer steps in total
    optimizer: str = "adamw"  # adamw (05's configure_optimizers) or sgd (plain: the tests' sharp check)
    learning_rate: float = 1e-3  # peak learning rate, reached after warmup
    weight_decay: float = 0.1  # AdamW's, on the 2-D weights only
    beta1: float = 0.9  # AdamW's momentum
    beta2: float = 0.99  # AdamW's second-moment decay
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = no clipping
    decay_lr: bool = True  # warmup + cosine decay; False = constant learning_rate
    warmup_iters: int = 100  # linear warmup steps
    lr_decay_iters: int = 2000  # the cosine reaches min_lr here (usually = max_iters)
    min_lr: float = 1e-4  # ~learning_rate / 10
    # evaluation, logging, checkpoints, the sample at the end
    eval_interval: int = 250  # train/val loss every this many steps (and at the end)
    eval_iters: int = 20  # batches per split in an evaluation
    log_interval: int = 10  # a log line every this many steps
    checkpoint_interval: int = 100  # a checkpoint every this many steps: what a crash can cost
    max_new_tokens: int = 200  # tokens in the sample printed at the end (0 = none)
    prompt: str = "\n"  # the sample continues this text
    temperature: float = 0.8  # sampling temperature
    top_k: int = 200  # sample among the k most likely tokens
    # system
    device: str = "auto"  # auto (cuda if there, else cpu), cpu or cuda: rank r drives cuda:LOCAL_RANK
    dtype: str = "auto"  # auto (05's pick_dtype: bf16 on cuda; on CPU if 2x faster), float32, bfloat16
    seed: int = 1337  # seeds the weights (the same on every rank), the batches and dropout


def check_config(cfg: DistConfig, world_size: int):
    """Refuse bad settings before any work, naming the fix."""
    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {cfg.strategy!r}; use --strategy=ddp, zero1 or fsdp")
    if cfg.optimizer not in ("adamw", "sgd"):
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use --optimizer=adamw or sgd")
    if cfg.init_from not in ("auto", "resume", "scratch"):
        raise ValueError(f"unknown init_from {cfg.init_from!r}; use auto, resume or scratch")
    if cfg.batch_size <= 0 or cfg.batch_size % world_size:
        raise ValueError(f"batch_size={cfg.batch_size} (the global micro-batch) does not split across "
                         f"{world_size} ranks; use a positive multiple of {world_size}, e.g. "
                         f"--batch_size={world_size * max(1, round(cfg.batch_size / world_size))}")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"dtype {cfg.dtype!r}: use auto, float32 or bfloat16 (float16 would need 05's "
                         "gradient scaler, which 06 leaves out)")
    for name in ("gradient_accumulation_steps", "log_interval", "eval_interval", "eval_iters",
                 "checkpoint_interval"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.sharded_checkpoint and cfg.strategy == "zero1":
        raise ValueError("--sharded_checkpoint needs --strategy=ddp or fsdp: torch.distributed.checkpoint "
                         "cannot read ZeRO's optimizer; zero1 writes the full checkpoint")


# -----------------------------------------------------------------------------
# 3. The strategies: what each rank holds, and which collective runs when


def apply_ddp(model: nn.Module, ctx: Dist) -> DDP:
    """DDP: every rank holds the whole model, its gradients and the optimizer state (replicated).

    Construction broadcasts rank 0's weights, so all replicas start equal. Forward and backward
    run locally on the rank's rows. During backward, DDP all-reduces (averages) the gradients in
    ~25 MB buckets as soon as a bucket is ready, overlapping communication with the rest of the
    backward; afterwards every rank holds the same averaged gradient, takes the same optimizer
    step, and the replicas stay identical. With gradient accumulation, `no_sync()` skips the
    all-reduce on all but the last micro-step (the gradients just add up locally).
    Memory per rank, fp32 AdamW: 4P params + 4P grads + 8P Adam = 16P bytes, for any N.
    Traffic per step: one all-reduce of the 4P bytes of gradients.
    """
    # gradient_as_bucket_view: the .grad tensors are views into DDP's communication buckets,
    # rather than a second copy of every gradient
    device_ids = [ctx.local_rank] if ctx.device.startswith("cuda") else None
    return DDP(model, device_ids=device_ids, gradient_as_bucket_view=True)


def unwrap(model: nn.Module) -> GPT:
    """The GPT inside: DDP wraps it (as .module); FSDP2 shards it in place, so it is the model itself."""
    return model.module if isinstance(model, DDP) else model


def apply_fsdp(model: nn.Module, cfg: DistConfig) -> nn.Module:
    """FSDP2 (ZeRO-3): parameters, gradients and optimizer state are all sharded.

    fully_shard(block) replaces each of the block's parameters by a DTensor that keeps only this
    rank's 1/N slice of dim 0; the optimizer, built afterwards, sees only slices, so its state is
    sharded too. Right before a block's forward, an all-gather rebuilds its full parameters; after
    the forward they are freed (reshard_after_forward), and gathered again for its backward. After
    the block's backward, a reduce-scatter averages the gradients over the ranks and leaves each
    rank the gradient of its own slice; the optimizer updates just that slice. One fully_shard per
    block, then the root (embeddings, final LayerNorm, LM head), as in torchtitan: a block is the
    unit that is gathered and freed, so a rank holds its shards plus about one block in full (the
    one running and the next, prefetched). Sharding only the root would gather everything at once.
    Memory per rank: 16P/N bytes + about one block's full parameters and gradients.
    Traffic per step: all-gather 4P in forward and again in backward, reduce-scatter 4P: 1.5x DDP
    (a ring all-reduce is a reduce-scatter plus an all-gather).
    On CUDA the policy gathers parameters in bf16 (half the traffic, bf16 compute) and reduces
    gradients in fp32; the sharded master weights and Adam stay fp32.
    With gradient accumulation, each micro-step reduce-scatters its gradients: the memory stays
    sharded (model.set_requires_gradient_sync(False) would trade that memory for less traffic).
    """
    policy = MixedPrecisionPolicy()  # fp32 everywhere
    if cfg.dtype == "bfloat16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def build_optimizer(cfg: DistConfig, model: nn.Module, ctx: Dist) -> torch.optim.Optimizer:
    """AdamW (05's configure_optimizers) or plain SGD; for zero1, wrapped in ZeRO stage 1.

    ZeRO-1 (ZeroRedundancyOptimizer, over a DDP model): DDP as above for the parameters and
    gradients, but each rank owns about 1/N of the parameters (whole tensors, dealt out greedily
    by size so the shares are even) and keeps optimizer state for those only. After DDP's
    all-reduce every rank has the full averaged gradient, updates just its own parameters, then
    broadcasts them so that all replicas are identical again.
    Memory per rank: 4P + 4P + 8P/N bytes. Traffic: DDP's all-reduce plus a broadcast of 4P.
    (ZeRO-2 shards the gradients as well, ZeRO-3 the parameters too: that is FSDP.)
    """
    if cfg.optimizer == "sgd":  # no state: a gradient that is 2x too large moves the weights 2x
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate)
    else:
        optimizer = configure_optimizers(unwrap(model), cfg.weight_decay, cfg.learning_rate,
                                         (cfg.beta1, cfg.beta2), torch.device(ctx.device).type)
    if cfg.strategy == "zero1":  # the same groups, each carrying all its settings (betas, decay...);
        # and the throwaway optimizer cost nothing: AdamW makes its state at the first step
        optimizer = ZeroRedundancyOptimizer(optimizer.param_groups, optimizer_class=type(optimizer),
                                            lr=cfg.learning_rate)
    return optimizer


def apply_activation_checkpointing(model: GPT):
    """Keep only each block's input for backward, and rerun the block's forward in backward.

    Without it, autograd keeps every intermediate of every block (the q, k, v, attention output,
    the 4x-wide MLP activations...) from the forward until the backward needs them: activation
    memory grows with batch x block_size x n_layer and soon exceeds the weights. With it, each
    block keeps just its input (B, T, C) and recomputes the rest when its backward comes: about
    one more forward per step (~33% more compute) for a large cut in memory.
    The composable checkpoint() keeps the parameter names, so checkpoints do not change.
    """
    for block in model.transformer.h:
        checkpoint_activations(block)


def saved_activation_bytes(model: GPT, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward of one forward: the activation memory, measured.

    saved_tensors_hooks sees every tensor an op saves for backward. Parameters are not
    activations and are skipped; views of one storage count once. Inside a checkpointed block
    checkpoint's own hooks take over, and it keeps the block's input alive to rerun it: a forward
    pre-hook counts that input.
    """
    seen = {p.untyped_storage().data_ptr() for p in model.parameters()}  # never counted
    total = 0

    def count(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
        return t

    def keep_input(module, args):  # checkpoint keeps each block's input to rerun the block
        count(args[0])

    hooks = [block.register_forward_pre_hook(keep_input) for block in model.transformer.h]
    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        model(x, y)
    for hook in hooks:
        hook.remove()
    return total


# -----------------------------------------------------------------------------
# 4. Memory per rank, from the tensors each rank really holds


def local_bytes(tensors) -> int:
    """Bytes held by this rank: a DTensor (FSDP) counts only its local shard."""
    total = 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def memory_report(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state on this rank (call after a step)."""
    params = list(model.parameters())  # a tied weight (wte = lm_head) is listed once
    inner = getattr(optimizer, "optim", optimizer)  # ZeRO keeps its state in a local optimizer
    state = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v)]
    grads = [p.grad for p in params if p.grad is not None]
    return {"params": local_bytes(params), "grads": local_bytes(grads), "optimizer": local_bytes(state)}


def print_memory(memory: dict, ctx: Dist):
    """Gather every rank's memory_report and print them as a table on rank 0."""
    everyone = [None] * ctx.world_size
    dist.all_gather_object(everyone, memory)
    print0(f"{'rank':>4} {'params':>10} {'grads':>10} {'optimizer':>10} {'total':>10}   MB after one step")
    for rank, m in enumerate(everyone):
        mb = [m["params"] / 2**20, m["grads"] / 2**20, m["optimizer"] / 2**20, sum(m.values()) / 2**20]
        print0(f"{rank:>4} " + " ".join(f"{v:>10.3f}" for v in mb))


# -----------------------------------------------------------------------------
# 5. Checkpoints: full (rank 0 writes 05's format) or sharded (every rank writes its part)


def param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order: name i is parameter i of optimizer.state_dict()."""
    name_of = {p: name for name, p in unwrap(model).named_parameters()}
    return [name_of[p] for group in optimizer.param_groups for p in group["params"]]


def rekey(optim_sd: dict, key: dict) -> dict:
    """Rename an optimizer state dict's parameters: name -> number or number -> name.

    torch.distributed.checkpoint keys the state by parameter name, optimizer.state_dict() (and
    so 05's checkpoints) by position: {"state": {0: {...}}, "param_groups": [{"params": [0, 1]}]}.
    """
    groups = [{**group, "params": [key[k] for k in group["params"]]} for group in optim_sd["param_groups"]]
    return {"state": {key[k]: v for k, v in optim_sd["state"].items()}, "param_groups": groups}


def save_full_checkpoint(path: Path, model, optimizer, ctx: Dist, extra: dict):
    """Gather the whole model and optimizer to rank 0's CPU and write them in 05's format.

    get_model_state_dict and get_optimizer_state_dict (torch.distributed.checkpoint.state_dict)
    know every wrapper: they strip DDP's "module." prefix and, for FSDP, all-gather the shards of
    one tensor at a time straight to CPU (cpu_offload) on rank 0 only, so no GPU ever holds the
    whole model. They are collectives: every rank calls them. ZeRO's optimizer is not a wrapper
    they know; its consolidate_state_dict sends each rank's part of the state to rank 0.
    Numbered like optimizer.state_dict(), the file is exactly what 05 writes: 05 and 09 load it,
    and any strategy at any world size resumes from it.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=options)
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        optimizer.consolidate_state_dict(to=0)
        optim_sd = optimizer.state_dict() if ctx.rank == 0 else None
    else:
        optim_sd = get_optimizer_state_dict(model, optimizer, options=options)
    if ctx.rank == 0:
        if not isinstance(optimizer, ZeroRedundancyOptimizer):
            optim_sd = rekey(optim_sd, {name: i for i, name in enumerate(param_names(model, optimizer))})
        save_checkpoint(path, {"model": model_sd, "optimizer": optim_sd, **extra})  # tmp file + rename


def load_full_checkpoint(ckpt: dict, model, optimizer):
    """Load a checkpoint in 05's format into any strategy, whatever world size wrote it.

    Every rank passes the full state dict (each read the file: this assumes a filesystem every
    node sees); FSDP keeps its slice of each tensor, ZeRO the state of the parameters it owns.
    """
    set_model_state_dict(model, ckpt["model"], options=StateDictOptions(full_state_dict=True))
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        optimizer.load_state_dict(ckpt["optimizer"])
    else:
        optim_sd = rekey(ckpt["optimizer"], dict(enumerate(param_names(model, optimizer))))
        set_optimizer_state_dict(model, optimizer, optim_sd, options=StateDictOptions(full_state_dict=True))


def save_sharded_checkpoint(out_dir: Path, model, optimizer, ctx: Dist, extra: dict):
    """Every rank writes its own shards with torch.distributed.checkpoint (DCP); nothing is gathered.

    For models too large to gather on one machine. The directory holds a file per rank and a
    .metadata index of which slice of which tensor lies where, so DCP can load it into another
    world size (it re-slices on load). A new directory per save, and a pointer file (dcp-latest.pt)
    that rank 0 moves once the save is complete: a crash during a save leaves the last one usable.
    """
    model_sd, optim_sd = get_state_dict(model, optimizer)  # this rank's shards, keyed by name
    name = f"dcp-{extra['iter_num']:06d}"
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=out_dir / name)
    if ctx.rank == 0:  # dcp.save returns once every rank's part and the metadata are written
        save_checkpoint(out_dir / "dcp-latest.pt", {"path": name, **extra})
        for old in out_dir.glob("dcp-0*"):  # the pointer has moved: older saves can go
            if old.name != name:
                shutil.rmtree(old)


def load_sharded_checkpoint(out_dir: Path, meta: dict, model, optimizer):
    """Fill this rank's shards from a DCP checkpoint (any world size wrote it)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)  # templates: what this rank holds
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=out_dir / meta["path"])  # reads into the templates, in place
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def resume(cfg: DistConfig, model, optimizer, model_args: dict) -> tuple[int, float]:
    """Load out_dir's checkpoint if there is one (and init_from allows): (iter_num, best_val_loss)."""
    out_dir = Path(cfg.out_dir)
    path = out_dir / ("dcp-latest.pt" if cfg.sharded_checkpoint else "ckpt.pt")
    if cfg.init_from == "scratch" or (cfg.init_from == "auto" and not path.exists()):
        return 0, float("inf")
    if not path.exists():
        raise FileNotFoundError(f"--init_from=resume but {path} does not exist; train first, "
                                "or use --init_from=auto to start from scratch when there is none")
    # mmap: the ranks of one machine share the file's pages instead of each reading a copy
    ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    if ckpt["model_args"] != model_args:
        raise ValueError(f"{path} holds a model with {ckpt['model_args']}, not {model_args}; "
                         "use the same model settings, another --out_dir, or --init_from=scratch")
    if cfg.sharded_checkpoint:
        load_sharded_checkpoint(out_dir, ckpt, model, optimizer)
    else:
        load_full_checkpoint(ckpt, model, optimizer)
    print0(f"resumed from {path} at step {ckpt['iter_num']}")
    return ckpt["iter_num"], ckpt["best_val_loss"]


def maybe_fail(cfg: DistConfig, ctx: Dist, iter_num: int):
    """--fail_at_step=N: the last rank kills itself after step N, as a crash or a lost node would.

    Only on torchrun's first attempt: torchrun counts restarts in TORCHELASTIC_RESTART_COUNT,
    so after `--max-restarts=1` the restarted job resumes from the last checkpoint and runs through.
    """
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if iter_num == cfg.fail_at_step and ctx.rank == ctx.world_size - 1 and first_attempt:
        print(f"fault injection: rank {ctx.rank} dies after step {iter_num}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


# -----------------------------------------------------------------------------
# 6. Training


def load_data(cfg: DistConfig, ctx: Dist) -> tuple[dict, dict]:
    """05's load_corpus, rank 0 first: it tokenizes on first use while the others wait."""
    if ctx.rank == 0:
        load_corpus(cfg)
    dist.barrier()  # then every rank maps the files (on a filesystem that every rank sees)
    return load_corpus(cfg)


@contextmanager
def compute_context(device_type: str, dtype: str):
    """05's autocast, plus (as 05's train does) SDPA's plain "math" kernel for bf16 on CPU, where the
    fused kernel's backward measured ~10x slower than in fp32."""
    slow_fused = device_type == "cpu" and dtype != "float32"
    with autocast_context(device_type, dtype), sdpa_kernel(SDPBackend.MATH) if slow_fused else nullcontext():
        yield


def train_step(model, optimizer, data, cfg: DistConfig, ctx: Dist, it: int) -> tuple[torch.Tensor, ...]:
    """One optimizer step: (this rank's mean loss, global gradient norm), both still tensors: reading
    them makes the CPU wait for the GPU, so the loop does it on log steps only.

    05's step: global batch number `it` of batch_size x accumulation rows, in accumulation chunks.
    Here each rank takes its 1/N of the rows, in chunks of batch_size / N: the gradient is the
    mean over the same rows, so N ranks take 05's step (up to the order of float additions).
    """
    optimizer.zero_grad(set_to_none=True)  # here, not after the step: memory_report sees the gradients
    accumulation = cfg.gradient_accumulation_steps
    x, y = get_batch(data, cfg.batch_size * accumulation, cfg.block_size, it, cfg.seed, ctx.rank,
                     ctx.world_size, ctx.device)  # (A * B/N, T): this rank's rows
    # autocast for every strategy, as 05: FSDP's MixedPrecisionPolicy already hands the blocks bf16
    # weights, but without autocast the logits and the cross-entropy would be computed in bf16 too
    device_type = torch.device(ctx.device).type
    loss_sum = torch.zeros((), device=ctx.device)
    for micro, (xb, yb) in enumerate(zip(x.chunk(accumulation), y.chunk(accumulation))):
        # DDP (and so zero1): all-reduce the gradients only in the last micro-step's backward
        last = micro == accumulation - 1
        with model.no_sync() if isinstance(model, DDP) and not last else nullcontext():
            with compute_context(device_type, cfg.dtype):
                _, loss = model(xb, yb)
            (loss / accumulation).backward()  # .grad adds up: the mean over all micro-batches
        loss_sum += loss.detach()
    # with FSDP the gradients are DTensors: the norm is computed over every rank's shards
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
    optimizer.step()
    return loss_sum / accumulation, norm


@torch.no_grad()
def evaluate(model, data: dict, cfg: DistConfig, ctx: Dist, step: int) -> dict:
    """05's estimate_loss, data parallel: each rank takes its rows of the same batches, then one
    all-reduce averages. Equal shares, so the mean of the ranks' means is 05's number."""
    model.eval()
    device_type = torch.device(ctx.device).type
    losses = torch.zeros(len(data), device=ctx.device)
    for i, tokens in enumerate(data.values()):
        for k in range(cfg.eval_iters):
            x, y = get_batch(tokens, cfg.batch_size, cfg.block_size, step * cfg.eval_iters + k, cfg.seed + 1,
                             ctx.rank, ctx.world_size, ctx.device)
            with compute_context(device_type, cfg.dtype):
                losses[i] += model(x, y)[1].float()
    dist.all_reduce(losses)  # a sum: gloo has no average
    model.train()
    return {split: (value / (cfg.eval_iters * ctx.world_size)).item() for split, value in zip(data, losses)}


def local_state(model) -> dict[str, torch.Tensor]:
    """This rank's own parameter tensors (a replica, or FSDP's shards), not copied: for inspection."""
    return {name: (p.to_local() if isinstance(p, DTensor) else p).detach()
            for name, p in unwrap(model).named_parameters()}


def train(cfg: DistConfig, ctx: Dist) -> dict:
    """05's loop, data parallel; needs the process group (init_distributed).

    Returns {"iter_num", "losses" ({step: loss over all ranks} at log steps), "val_loss", "memory"
    (this rank's memory_report), "activation_bytes" ((without, with) checkpointing, or None),
    "local_state"}.
    """
    check_config(cfg, ctx.world_size)
    # pick_dtype may time matmuls, and two ranks can time differently: one decides for all (a rank
    # in bf16 next to one in fp32 would all-gather buffers of different sizes and crash)
    dtype = [pick_dtype(cfg.dtype, torch.device(ctx.device).type) if ctx.rank == 0 else None]
    dist.broadcast_object_list(dtype, src=0)
    dtype = dtype[0]
    if dtype == "float16":  # a GPU without bf16
        print0("note: float16 needs 05's gradient scaler, which 06 leaves out: training in float32")
        dtype = "float32"
    cfg = replace(cfg, device=ctx.device, dtype=dtype)
    out_dir = Path(cfg.out_dir)
    data, spec = load_data(cfg, ctx)
    tokenizer = get_tokenizer(spec)
    model_args = asdict(GPTConfig(block_size=cfg.block_size, vocab_size=tokenizer.n_vocab,
                                  n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                  dropout=cfg.dropout, bias=cfg.bias))
    # the same initial weights on every rank: DDP would broadcast rank 0's anyway, but fully_shard
    # keeps each rank's slice of whatever that rank built
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(**model_args)).to(ctx.device)
    tokens_per_iter = cfg.batch_size * cfg.gradient_accumulation_steps * cfg.block_size
    print0(f"{cfg.strategy} on {ctx.world_size} rank(s) ({ctx.device}, {cfg.dtype}): {model.num_params():,} "
           f"parameters | {tokens_per_iter:,} tokens per step, {cfg.batch_size // ctx.world_size} rows x "
           f"{cfg.gradient_accumulation_steps} micro-batches per rank")
    activation_bytes = None
    if cfg.activation_checkpointing:
        x, y = get_batch(data["train"], cfg.batch_size, cfg.block_size, 0, cfg.seed, ctx.rank, ctx.world_size,
                         ctx.device)  # one micro-batch of this rank
        before = saved_activation_bytes(model, x, y)
        apply_activation_checkpointing(model)
        after = saved_activation_bytes(model, x, y)
        activation_bytes = (before, after)
        print0(f"activation checkpointing: {before / 2**20:.2f} MB -> {after / 2**20:.2f} MB kept for "
               f"backward per micro-batch ({before / after:.1f}x less), for one more forward of each block")
    model = apply_fsdp(model, cfg) if cfg.strategy == "fsdp" else apply_ddp(model, ctx)
    optimizer = build_optimizer(cfg, model, ctx)
    start, best_val_loss = resume(cfg, model, optimizer, model_args)

    losses, memory, val_loss = {}, None, None
    if ctx.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    log = open(out_dir / "log.jsonl", "a" if start else "w") if ctx.rank == 0 else None
    t0, window = time.perf_counter(), 0  # steps timed since t0 (evaluations and checkpoints left out)
    for it in range(start, cfg.max_iters):
        lr = get_lr(it, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # dropout masks are a function of (seed, step, rank), like the batches: a resumed run replays them
        torch.manual_seed(cfg.seed + it * ctx.world_size + ctx.rank)
        loss, norm = train_step(model, optimizer, data["train"], cfg, ctx, it)
        iter_num, window = it + 1, window + 1
        if memory is None:
            memory = memory_report(model, optimizer)
            print_memory(memory, ctx)
        logged, evaluated, saved = (iter_num % n == 0 or iter_num == cfg.max_iters
                                    for n in (cfg.log_interval, cfg.eval_interval, cfg.checkpoint_interval))
        if logged:
            dist.all_reduce(loss)  # a sum: gloo has no average
            losses[it] = loss.item() / ctx.world_size
            norm = (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()
            dt = (time.perf_counter() - t0) / window
            print0(f"iter {iter_num}/{cfg.max_iters} | loss {losses[it]:.4f} | lr {lr:.2e} | grad norm "
                   f"{norm:.3f} | {1000 * dt:.1f} ms | {tokens_per_iter / dt:,.0f} tok/s")
            if log:
                log.write(json.dumps(dict(iter=iter_num, loss=losses[it], lr=lr, grad_norm=norm)) + "\n")
        if evaluated:
            val_loss = evaluate(model, data, cfg, ctx, iter_num)["val"]
            best_val_loss = min(best_val_loss, val_loss)
            print0(f"iter {iter_num}: val loss {val_loss:.4f}")
        if saved:
            extra = {"model_args": model_args, "config": asdict(cfg), "iter_num": iter_num, "scaler": {},
                     "best_val_loss": best_val_loss, "rng": rng_states(), "tokenizer": spec,
                     "stage": "pretrain"}  # 05's checkpoint_dict, with the model and optimizer to come
            if cfg.sharded_checkpoint:
                save_sharded_checkpoint(out_dir, model, optimizer, ctx, extra)
            else:
                save_full_checkpoint(out_dir / "ckpt.pt", model, optimizer, ctx, extra)
            if log:
                log.flush()
        maybe_fail(cfg, ctx, iter_num)
        if logged or evaluated or saved:  # restart the clock: evaluations and saves are not steps
            t0, window = time.perf_counter(), 0
    if log:
        log.close()

    if cfg.max_new_tokens:  # every rank generates (FSDP gathers collectively); rank 0 prints
        print0(f"--- sample ---\n{sample(unwrap(model), tokenizer, cfg)}")
    return {"iter_num": max(start, cfg.max_iters), "losses": losses, "val_loss": val_loss, "memory": memory,
            "activation_bytes": activation_bytes, "local_state": local_state(model)}


# -----------------------------------------------------------------------------


def main(argv=None) -> dict:
    cfg = parse_config(DistConfig, argv)
    ctx = init_distributed(cfg.device)
    try:
        result = train(cfg, ctx)
    except BaseException as error:
        # the traceback holds train()'s frames and through them the model: let it go first
        traceback.clear_frames(error.__traceback__)
        shutdown_distributed(ctx, failed=True)
        raise
    shutdown_distributed(ctx)
    return result


if __name__ == "__main__":
    main()
