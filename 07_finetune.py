"""07_finetune.py: instruction finetuning, full and LoRA.

A pretrained GPT continues text; it does not answer. Finetuning on a few hundred examples of
(instruction, optional input, response), each written in one fixed prompt template, teaches it to
answer: after "### Response:" comes the answer, then <|endoftext|>. The model and the loss are
05's; only the data changed (supervised finetuning, SFT: Ouyang et al. 2022; Alpaca, Taori et al.
2023).

What this file teaches, top to bottom:
  - the data: 1,100 Alpaca-style entries (rasbt's instruction-data.json), split 85/10/5 into
    train / test / validation in file order, as in Raschka's book, chapter 7;
  - the prompt template (format_input), the one place 08 and 09 copy it from;
  - collate_fn: pad a batch to its longest sequence, append <|endoftext|>, shift the targets, and
    mark the prompt and the padding with -100 so that the loss counts only the response;
  - LoRA (Hu et al. 2021): freeze every weight and learn a low-rank update B A beside each chosen
    Linear; merge_lora folds B A back into the weights, so the saved model is a plain GPT;
  - 05's training pieces (AdamW, warmup + cosine, clipping, atomic checkpoints in 05's format,
    stage "finetune", which 08 and 09 load), with an evaluation before and after: validation loss
    and perplexity on the response tokens, greedy exact match on the test entries with short
    answers, and the model's answers to the test split in out_dir/test_responses.json, next to
    the reference answers, for a person to read.

05's default model is char-level with a 64-character context, and the template alone is ~120
characters. Two adaptations make it run (and say so when they act): extend_context stretches its
position table to --min_block_size positions, and each character its vocabulary lacks ('#', '(',
digits but 3, ...) becomes --unknown_char ("?"; "" raises instead); a newline stands in for the
missing <|endoftext|>. The run works, the answers are Shakespearean noise (a model that small
learns the template's look, not the task); for real answers start from GPT-2.

References: Raschka, "Build a Large Language Model (From Scratch)", ch. 7 and appendix E
(rasbt/LLMs-from-scratch); Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models";
Taori et al. 2023, Stanford Alpaca; Ouyang et al. 2022, "Training language models to follow
instructions with human feedback".

Run:
    python 07_finetune.py                       # finetune 05's checkpoint (python 05_pretrain.py first)
    python 07_finetune.py --learning_rate=1e-3  # the same; a small char model wants a larger rate
    python 07_finetune.py --init_from=gpt2 --max_iters=100 --num_responses=10   # GPT-2 on a CPU (slow)
    python 07_finetune.py --init_from=gpt2-medium --device=cuda                # the book's run, one GPU
    python 07_finetune.py --init_from=gpt2-medium --lora_rank=16 --learning_rate=5e-4 --device=cuda
    python 07_finetune.py --help                # every setting, with its default
Then: python 09_generate.py --ckpt=out/finetune/ckpt.pt --chat, or DPO on top with 08_dpo.py.
"""

import argparse
import copy
import functools
import hashlib
import inspect
import json
import math
import os
import random
import re
import struct
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import requests
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

DATA_DIR = Path(__file__).resolve().parent / "data"

# -----------------------------------------------------------------------------
# From 01_tokenizer.py and 02_dataloader.py: tokenizers, downloads, the data sources


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


# -----------------------------------------------------------------------------
# From 03_attention.py and 04_gpt.py: the model and OpenAI's weights


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
# From 05_pretrain.py: command line, device and precision, optimizer, schedule, checkpoints


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


# copied from 05_pretrain.py: pick_threads
def pick_threads(threads: int) -> int:
    """CPU threads for the run: `threads` if > 0, else the cores that are idle right now.

    Why not simply all cores: a small model's step is hundreds of short ops, and at every op the
    threads wait for each other. On an idle 2-core machine 2 threads beat 1 by ~1.5x; but when
    another process wants a core, one of our threads waits for its turn at every op: a 2-thread
    step took 7-30x longer, while 1 thread only slowed 1.3-1.5x. So 0 (auto) counts the idle cores
    over 0.25 s at startup (at least 1): on Linux from /proc/stat, whose first line counts the
    ticks all CPUs spent in each state; elsewhere from the 1-minute load average (which still
    counts a job that ended a minute ago). OMP_NUM_THREADS wins if it is set. Results can differ
    in the last bits between thread counts: resume a run with the count it had.
    """
    if threads > 0:
        return threads
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()  # PyTorch already follows it
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        ticks = []  # (idle + iowait, total) from "cpu  user nice system idle iowait irq softirq ..."
        for wait in (0.25, 0):
            with open("/proc/stat") as f:
                values = [int(v) for v in f.readline().split()[1:]]
            ticks.append((values[3] + values[4], sum(values)))
            time.sleep(wait)
        idle = cores * (ticks[1][0] - ticks[0][0]) / max(1, ticks[1][1] - ticks[0][1])
    except (OSError, ValueError, IndexError):
        idle = cores - os.getloadavg()[0] if hasattr(os, "getloadavg") else cores
    return max(1, min(cores, round(idle)))


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
# 1. The data: instruction entries, split in file order


def load_instruction_data(path=None) -> list[dict]:
    """The instruction entries: a JSON list of {"instruction", "input", "output"} strings.

    path=None downloads rasbt's instruction-data.json (1,100 entries) into data/ once, checking its
    sha256; pass your own file in the same format to finetune on your data.
    """
    path = fetch("instruction-data") if path is None else Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass --data_path=<JSON list of entries> or omit it")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path} must hold a non-empty JSON list of entries, got {type(data).__name__}")
    for i, entry in enumerate(data):
        if not (isinstance(entry, dict) and isinstance(entry.get("instruction"), str)
                and isinstance(entry.get("output"), str)):
            raise ValueError(
                f"{path}: entry {i} is not an object with string 'instruction' and 'output' fields "
                f"(and an optional 'input'): {str(entry)[:80]}; fix the entry or drop it"
            )
    return data


def split_data(data: list, train_fraction: float = 0.85, test_fraction: float = 0.10) -> dict[str, list]:
    """Split in file order: the first 85% train, the next 10% test, the last 5% validation.

    No shuffling: the file is already in random order, and a fixed split means every run (and 08,
    09) holds out the same entries. 1,100 entries -> 935 train, 110 test, 55 val (the book's).
    """
    n_train, n_test = int(len(data) * train_fraction), int(len(data) * test_fraction)
    if n_train == 0 or n_test == 0 or len(data) - n_train - n_test == 0:
        raise ValueError(f"{len(data)} entries are too few to split 85/10/5 (every split needs one); use 20+")
    n_train_test = n_train + n_test
    return {"train": data[:n_train], "test": data[n_train:n_train_test], "val": data[n_train_test:]}


# -----------------------------------------------------------------------------
# 2. The prompt template (Alpaca's), and text -> token ids

RESPONSE_HEADER = "\n\n### Response:\n"  # what follows format_input(entry); then the answer


def format_input(entry: dict) -> str:
    """The Alpaca prompt for an entry: the instruction, and the input when there is one.

    >>> print(format_input({"instruction": "Name the author of 'Pride and Prejudice'.", "input": ""}))
    Below is an instruction that describes a task. Write a response that appropriately completes the request.
    <BLANKLINE>
    ### Instruction:
    Name the author of 'Pride and Prejudice'.

    A training example is format_input(entry) + RESPONSE_HEADER + entry["output"]; at inference the
    model gets format_input(entry) + RESPONSE_HEADER and writes the rest.
    """
    instruction_text = (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{entry['instruction']}"
    )
    input_text = f"\n\n### Input:\n{entry['input']}" if entry.get("input") else ""
    return instruction_text + input_text


def text_encoder(tokenizer, unknown_char: str = "?"):
    """Return (encode, unknown): encode(text) -> ids, and a Counter of the characters it replaced.

    GPT-2's BPE encodes any string (here "<|endoftext|>" inside the data is plain text, never the
    special token). A CharTokenizer knows only its own characters: each unknown one is replaced by
    unknown_char and counted, or, with unknown_char="", raises a ValueError naming it.
    """
    unknown = Counter()
    spec = tokenizer.to_dict() if hasattr(tokenizer, "to_dict") else {"kind": "gpt2"}
    if spec["kind"] != "char":
        return (lambda text: tokenizer.encode(text, disallowed_special=())), unknown
    known = set(spec["chars"])
    if unknown_char and unknown_char not in known:
        raise ValueError(f"--unknown_char={unknown_char!r} is not among the tokenizer's characters; pick one")

    def encode(text: str) -> list[int]:
        missing = [ch for ch in text if ch not in known]
        if missing and not unknown_char:
            raise ValueError(
                f"characters {''.join(sorted(set(missing)))!r} are not in the checkpoint's char vocabulary; "
                f"pass --unknown_char='?' to replace them, or start from GPT-2 (--init_from=gpt2)"
            )
        unknown.update(missing)
        return tokenizer.encode("".join(ch if ch in known else unknown_char for ch in text))

    return encode, unknown


def end_token_id(tokenizer) -> int:
    """The token that ends every response and pads the batches: GPT-2's <|endoftext|> (50256).

    A char tokenizer has no such token; its newline stands in, so a char model learns to end its
    answer with a line break (a multi-line answer is cut at its first line when generating).
    """
    if tokenizer.eot_token is not None:
        return tokenizer.eot_token
    if "\n" not in tokenizer.to_dict().get("chars", ""):
        raise ValueError("this char tokenizer has neither <|endoftext|> nor a newline to end responses with")
    return tokenizer.encode("\n")[0]


# -----------------------------------------------------------------------------
# 3. Dataset and batches: pad, append the end token, shift, mask


class InstructionDataset(Dataset):
    """The entries, tokenized once: item i = (ids of prompt + response, number of prompt ids).

    The response is RESPONSE_HEADER + output: as in the book, the header's few tokens are targets
    too (the model learns to write it). Prompt and response are encoded separately and
    concatenated, so the prompt length is exact.
    max_length (the model's context): collate_fn cuts longer examples; we count them here
    (n_truncated) and drop the ones whose response does not even start inside the context
    (n_dropped): with the prompt masked they would have no target at all.
    """

    def __init__(self, entries: list[dict], encode, max_length: int | None = None):
        self.items, self.n_truncated, self.n_dropped = [], 0, 0
        for entry in entries:
            prompt = encode(format_input(entry))
            ids = prompt + encode(RESPONSE_HEADER + entry["output"])
            if max_length is not None and len(prompt) > max_length:
                self.n_dropped += 1
                continue
            self.n_truncated += max_length is not None and len(ids) > max_length
            self.items.append((ids, len(prompt)))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate_fn(batch, pad_token_id=50256, ignore_index=-100, allowed_max_length=None, mask_prompt=True,
               device="cpu"):
    """Turn a list of (ids, prompt_length) into inputs and targets, both (B, T).

    Each sequence gets the end token appended and is padded (with the same token) to the longest
    in the batch; targets are the inputs shifted left by one. Then ignore_index (-100, which
    cross-entropy skips) replaces the targets we do not want to learn from: the padding after
    the first end token (the model must learn to stop, so that one stays) and, with mask_prompt,
    every target inside the prompt (the model need not learn to write instructions).
    Example, pad = 0, prompt length 2:

        ids [5, 6, 7, 8] + end  ->  inputs [5, 6, 7, 8]   targets [-100, 7, 8, 0]
        ids [5, 6]       + end  ->  inputs [5, 6, 0, 0]   targets [-100, 0, -100, -100]

    allowed_max_length (the model's context) cuts inputs and targets after padding.
    """
    T = max(len(ids) for ids, _ in batch)
    inputs, targets = [], []
    for ids, prompt_length in batch:
        seq = torch.tensor(ids + [pad_token_id] * (T + 1 - len(ids)))  # (T+1,) ids, end, padding
        x, y = seq[:-1], seq[1:].clone()  # y[i] = seq[i + 1]: the next token
        y[len(ids) :] = ignore_index  # y[len(ids) - 1] is the end token: kept; the rest is padding
        if mask_prompt:
            y[: max(prompt_length - 1, 0)] = ignore_index  # y[i] for i < prompt_length - 1: a prompt token
        inputs.append(x[:allowed_max_length])
        targets.append(y[:allowed_max_length])
    return torch.stack(inputs).to(device), torch.stack(targets).to(device)


def batch_indices(step: int, n: int, batch_size: int, seed: int = 0) -> list[int]:
    """The example indices of training batch `step`: shuffled epochs, last partial batch dropped.

    Stateless like 02's get_batch: batch = f(seed, step), so a run is reproducible from any step.
    """
    if not 0 < batch_size <= n:
        raise ValueError(f"batch_size={batch_size} must be between 1 and the {n} training examples")
    epoch, i = divmod(step, n // batch_size)
    order = np.random.default_rng([seed, epoch]).permutation(n)  # a fresh shuffle every epoch
    return order[i * batch_size : (i + 1) * batch_size].tolist()


# -----------------------------------------------------------------------------
# 4. LoRA: a trainable low-rank update beside each frozen Linear

LORA_TARGETS = ("c_attn", "c_proj", "c_fc")  # GPT's Linears (lm_head is tied to wte: not a target)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a low-rank update: y = base(x) + (alpha / rank) * x A^T B^T.

    Finetuning changes a weight W (out, in) by some dW, and that change has a low "intrinsic rank"
    (Hu et al. 2021), so learn it as B A with B (out, r) and A (r, in), r small: r * (in + out)
    parameters instead of in * out. GPT-2's c_attn (768 -> 2304) at r=8: 24,576 instead of 1,769,472.
    A starts random (kaiming, as nn.Linear's own weights), B at zero: B A = 0, so at first the
    layer computes exactly what the base did. alpha / rank scales the update so that a different
    rank needs no new learning rate.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank} (--lora_rank=0 is no LoRA)")
        self.base, self.rank, self.alpha, self.scaling = base, rank, alpha, alpha / rank
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **kw))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **kw))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling  # (B, T, out)


def apply_lora(model: nn.Module, rank: int, alpha: float, targets=LORA_TARGETS) -> nn.Module:
    """Freeze every parameter, then wrap each Linear named in targets in a LoRALinear (in place).

    targets are the last part of the module names: "c_proj" wraps attn.c_proj and mlp.c_proj.
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets or set(targets) - set(LORA_TARGETS):
        raise ValueError(f"LoRA targets {targets} must be a non-empty subset of {LORA_TARGETS}")
    model.requires_grad_(False)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, rank, alpha))
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, W <- W + (alpha / rank) B A, and unwrap it (in place).

    The result is a plain GPT with no extra cost at inference and the usual state dict, which is
    what the checkpoint holds. All parameters are trainable again, as in any plain model.
    """
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                child.base.weight += child.scaling * (child.lora_B @ child.lora_A)  # (out, in)
                setattr(module, name, child.base)
    return model.requires_grad_(True)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a shared (tied) tensor counts once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# -----------------------------------------------------------------------------
# 5. Evaluation: loss on the responses, greedy answers, exact match


@torch.no_grad()
def evaluate_loss(model, dataset, batch_size: int, pad_token_id: int, ctx=nullcontext()) -> dict:
    """Mean cross-entropy over the response tokens only (prompt and padding masked), and perplexity.

    The model's loss is a mean per batch; summing loss * (number of counted targets) over batches
    gives the exact mean over all response tokens.
    """
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        x, y = collate_fn(batch, pad_token_id, allowed_max_length=model.config.block_size, device=device)
        with ctx:
            _, loss = model(x, y)
        n = int((y != -100).sum())
        total, count = total + loss.item() * n, count + n
    model.train(was_training)
    return {"loss": total / count, "perplexity": math.exp(total / count), "tokens": count}


@torch.no_grad()
def generate_greedy(model, prompts: list[list[int]], max_new_tokens: int, end_id: int, batch_size: int = 8,
                    ctx=nullcontext()) -> list[list[int]]:
    """Greedy continuations of several prompts, batched, each stopped at end_id (not included).

    subtle: prompts of different lengths share one forward pass, padded on the right. Causal
    attention means what sits right of a row's last token cannot change that token's logits, so we
    read each row's next token at its own last position and write it just after. (No KV cache:
    each step reruns the whole context; 09 adds the cache.) Prompts of similar length are batched
    together; one longer than the context keeps its last block_size - 1 tokens. An answer also stops
    when prompt + answer fill the context (block_size tokens), even before end_id: 09's generation
    slides the window instead.
    """
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    block_size, out = model.config.block_size, [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = [prompts[i][max(0, len(prompts[i]) - block_size + 1) :] for i in rows]  # room for one more
        lengths = torch.tensor([len(p) for p in batch], device=device)  # (B,)
        width = min(block_size, int(lengths.max()) + max_new_tokens)
        idx = torch.full((len(rows), width), end_id, dtype=torch.long, device=device)  # (B, width)
        for r, p in enumerate(batch):
            idx[r, : len(p)] = torch.tensor(p)
        done, arange = torch.zeros_like(lengths, dtype=torch.bool), torch.arange(len(rows), device=device)
        for _ in range(max_new_tokens):
            with ctx:
                logits, _ = model(idx[:, : int(lengths.max())])  # (B, T, vocab)
            next_id = logits[arange, lengths - 1].argmax(-1)  # (B,) each row at its own last token
            live = (~done).nonzero().squeeze(1)
            idx[live, lengths[live]] = next_id[live]
            lengths[live] += 1
            done |= (next_id == end_id) | (lengths >= width)
            if done.all():
                break
        for r, i in enumerate(rows):
            new = idx[r, len(batch[r]) : int(lengths[r])].tolist()
            out[i] = new[:-1] if new and new[-1] == end_id else new
    model.train(was_training)
    return out


def generate_responses(model, entries, encode, decode, end_id, max_new_tokens=256, batch_size=8,
                       ctx=nullcontext()) -> list[str]:
    """The model's greedy answer to each entry, as text (prompt: format_input + RESPONSE_HEADER)."""
    prompts = [encode(format_input(e)) + encode(RESPONSE_HEADER) for e in entries]
    outputs = generate_greedy(model, prompts, max_new_tokens, end_id, batch_size, ctx)
    return [decode(ids).strip() for ids in outputs]


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation to spaces, single spaces: 'Jane Austen.' -> 'jane austen'."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def exact_match(responses: list[str], references: list[str]) -> float:
    """The fraction of responses equal to their reference after normalize_answer."""
    hits = [normalize_answer(r) == normalize_answer(ref) for r, ref in zip(responses, references)]
    return sum(hits) / max(1, len(hits))


# -----------------------------------------------------------------------------
# 6. The model to start from, and the finetuning loop


@dataclass
class FinetuneConfig:
    """Instruction finetuning of a GPT (full, or LoRA with --lora_rank > 0)."""

    # model and data
    init_from: str = "checkpoint"  # checkpoint (at ckpt_path), or OpenAI's gpt2, gpt2-medium, -large, -xl
    ckpt_path: str = "out/shakespeare-char/ckpt.pt"  # the checkpoint to finetune (05's default out_dir)
    out_dir: str = "out/finetune"  # ckpt.pt, log.jsonl and test_responses.json go here
    data_path: str = ""  # "" = rasbt's instruction-data.json (downloaded, sha256-checked); or your own
    min_block_size: int = 512  # a model with a shorter context gets its position table stretched to this
    mask_prompt: bool = True  # learn from the response tokens only (False: the prompt counts too)
    unknown_char: str = "?"  # char tokenizers: stands in for the characters they lack ("" = error)
    dropout: float = 0.0  # the model's dropout while finetuning (the book: 0.0)
    # LoRA
    lora_rank: int = 0  # 0 = full finetuning; r > 0 = LoRA adapters of rank r, base weights frozen
    lora_alpha: float = 16.0  # adapters are scaled by lora_alpha / lora_rank
    lora_targets: str = "c_attn,c_proj,c_fc"  # comma-separated Linears that get adapters
    # optimization (the book: AdamW, lr 5e-5, weight decay 0.1, batch 8, 2 epochs)
    batch_size: int = 8  # examples per step
    epochs: float = 2.0  # passes over the training split (used when max_iters = 0)
    max_iters: int = 0  # optimizer steps; 0 = epochs * (training examples // batch_size)
    learning_rate: float = 5e-5  # peak learning rate; LoRA likes ~10x more (e.g. 5e-4)
    min_lr: float = 5e-6  # the cosine ends here
    warmup_iters: int = 10  # linear warmup steps
    lr_decay_iters: int = 0  # the cosine reaches min_lr here; 0 = max_iters
    decay_lr: bool = True  # warmup + cosine; False = constant learning_rate
    weight_decay: float = 0.1  # AdamW's, on 2-D weights only
    beta1: float = 0.9  # AdamW's momentum
    beta2: float = 0.95  # AdamW's second-moment decay
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = no clipping
    # logging and evaluation
    log_interval: int = 10  # a log line every this many steps
    eval_interval: int = 50  # validation loss and ckpt.pt every this many steps, and at the end
    max_new_tokens: int = 256  # longest answer generated for test_responses.json
    num_responses: int = -1  # test entries answered in test_responses.json (-1 = the whole test split)
    short_answer_words: int = 3  # exact match on the test entries whose reference has at most this many words
    # system
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps
    dtype: str = "auto"  # auto (cuda: bfloat16, or float16 without bf16; else float32), float32, ...
    threads: int = 0  # CPU threads; 0 = the idle cores (05's pick_threads)
    seed: int = 1337  # seeds the batches, the adapters and dropout

    def __post_init__(self):
        if self.init_from not in ("checkpoint", *HF_MODELS):
            choices = ", ".join(("checkpoint", *HF_MODELS))
            raise ValueError(f"--init_from={self.init_from!r} is not valid; use one of {choices}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype={self.dtype!r} is not valid; use auto, float32, bfloat16 or float16")
        if self.lora_rank < 0 or not set(self.lora_targets.split(",")) <= set(LORA_TARGETS):
            raise ValueError(f"--lora_rank must be >= 0 and --lora_targets a comma-separated subset of "
                             f"{','.join(LORA_TARGETS)}; got {self.lora_rank} and {self.lora_targets!r}")
        for name in ("batch_size", "log_interval", "eval_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")


@torch.no_grad()
def extend_context(model: GPT, block_size: int) -> GPT:
    """The same GPT with block_size positions: its learned position table, stretched.

    A GPT has one learned vector per position it trained on (wpe: block_size rows) and nothing
    beyond; 05's CPU model knows 64 characters, fewer than the template alone. We resample the
    table along the position axis by linear interpolation (as ViT does for larger images): new
    position p gets the old table at p * (old - 1) / (new - 1), so neighbours stay similar, and
    finetuning sharpens them. GPT-2 (1,024 positions) needs none of this.
    """
    wpe = model.transformer.wpe.weight  # (T_old, C)
    stretched = F.interpolate(wpe.T[None], size=block_size, mode="linear", align_corners=True)[0].T  # (T, C)
    state = {**model.state_dict(), "transformer.wpe.weight": stretched}
    longer = GPT(replace(model.config, block_size=block_size)).to(wpe.device)
    longer.load_state_dict(state)
    return longer


def load_model(cfg: FinetuneConfig):
    """(model on cpu, tokenizer spec) to finetune: a checkpoint or OpenAI's GPT-2, with cfg's dropout
    and at least cfg.min_block_size positions."""
    if cfg.init_from in HF_MODELS:
        model, spec = GPT.from_pretrained(cfg.init_from), {"kind": "gpt2"}
    else:
        if not Path(cfg.ckpt_path).exists():
            raise FileNotFoundError(
                f"no checkpoint at {cfg.ckpt_path}: pretrain one first with `python 05_pretrain.py`, "
                f"or finetune OpenAI's GPT-2 with --init_from=gpt2 (or point --ckpt_path at a checkpoint)"
            )
        model, _, ckpt = load_checkpoint(cfg.ckpt_path)
        spec = ckpt["tokenizer"]
        print(f"loaded {cfg.ckpt_path} (stage {ckpt.get('stage')!r}, {ckpt.get('iter_num')} iterations)")
    if model.config.block_size < cfg.min_block_size:
        print(f"stretching the position table from {model.config.block_size} to {cfg.min_block_size}")
        model = extend_context(model, cfg.min_block_size)
    if model.config.dropout != cfg.dropout:  # dropout lives in the modules: rebuild with the new rate
        state = model.state_dict()
        model = GPT(replace(model.config, dropout=cfg.dropout))
        model.load_state_dict(state)
    return model, spec


def make_checkpoint(model, cfg, spec, iter_num, best_val_loss) -> dict:
    """A checkpoint in 05's format: the merged, plain GPT state dict, stage "finetune".

    With LoRA we merge a copy (the model keeps training with its adapters). No optimizer state:
    finetuning runs are short, so there is no resume to feed.
    """
    plain = merge_lora(copy.deepcopy(model)) if cfg.lora_rank > 0 else model
    return {"model": plain.state_dict(), "model_args": asdict(model.config), "optimizer": None,
            "config": asdict(cfg), "iter_num": iter_num, "best_val_loss": best_val_loss, "rng": rng_states(),
            "tokenizer": spec, "stage": "finetune"}


def prepare_data(cfg: FinetuneConfig, tokenizer, block_size: int):
    """The splits, the train/val datasets, encode, and the end token; prints what was cut or replaced."""
    encode, unknown = text_encoder(tokenizer, cfg.unknown_char)
    end_id = end_token_id(tokenizer)
    data = split_data(load_instruction_data(cfg.data_path or None))
    datasets = {k: InstructionDataset(data[k], encode, block_size) for k in ("train", "val")}
    print(f"data: {', '.join(f'{k} {len(v)}' for k, v in data.items())} entries")
    for name, ds in datasets.items():
        if ds.n_truncated or ds.n_dropped:
            print(f"  {name}: {ds.n_truncated} examples cut at the context ({block_size} tokens), "
                  f"{ds.n_dropped} dropped (their prompt alone is longer than the context)")
        if len(ds) == 0:
            raise ValueError(f"no {name} example fits the context of {block_size} tokens; raise "
                             f"--min_block_size or start from a model with more positions (--init_from=gpt2)")
    if unknown:
        print(f"  {sum(unknown.values())} characters the char tokenizer lacks became {cfg.unknown_char!r} "
              f"(most common: {''.join(c for c, _ in unknown.most_common(20))!r})")
    return data, datasets, encode, end_id


def evaluate(model, data, datasets, encode, decode, end_id, cfg, ctx=nullcontext()) -> dict:
    """Validation loss and perplexity on response tokens, and exact match on short test answers."""
    short = [e for e in data["test"] if len(e["output"].split()) <= cfg.short_answer_words]
    # 32 new tokens are plenty for answers of a few words
    responses = generate_responses(model, short, encode, decode, end_id, 32, cfg.batch_size, ctx)
    val = evaluate_loss(model, datasets["val"], cfg.batch_size, end_id, ctx)
    result = {"val_loss": val["loss"], "val_perplexity": val["perplexity"], "exact_match_n": len(short),
              "exact_match": exact_match(responses, [e["output"] for e in short])}
    print(f"val loss {result['val_loss']:.4f}, perplexity {result['val_perplexity']:.2f}, "
          f"exact match {result['exact_match']:.1%} of {len(short)} short test answers")
    return result


def finetune(cfg: FinetuneConfig) -> dict:
    """Finetune, evaluate before and after, save the checkpoint and the test responses."""
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model, spec = load_model(cfg)
    device = pick_device(cfg.device)
    device_type = torch.device(device).type
    cfg = replace(cfg, device=device, dtype=pick_dtype(cfg.dtype, device_type))  # "auto" resolved
    ctx, out_dir = autocast_context(device_type, cfg.dtype), Path(cfg.out_dir)
    model.to(device)
    tokenizer, block_size = get_tokenizer(spec), model.config.block_size
    data, datasets, encode, end_id = prepare_data(cfg, tokenizer, block_size)
    train_set = datasets["train"]
    if cfg.lora_rank > 0:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets.split(","))
    trainable, total = count_params(model)
    how = f"LoRA rank {cfg.lora_rank} on {cfg.lora_targets}" if cfg.lora_rank > 0 else "full finetuning"
    print(f"parameters: {trainable:,} trainable of {total:,} ({trainable / total:.2%}), {how}")
    max_iters = cfg.max_iters or int(cfg.epochs * (len(train_set) // cfg.batch_size))
    if max_iters <= 0:
        raise ValueError(f"{max_iters} training steps: raise --epochs or --max_iters, or lower --batch_size")
    cfg = replace(cfg, max_iters=max_iters, lr_decay_iters=cfg.lr_decay_iters or max_iters)
    print(f"{device} {cfg.dtype}, {torch.get_num_threads()} threads, {max_iters} steps of {cfg.batch_size}")
    betas = (cfg.beta1, cfg.beta2)
    optimizer = configure_optimizers(model, cfg.weight_decay, cfg.learning_rate, betas, device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=cfg.dtype == "float16")  # off: a pass-through
    params = [p for p in model.parameters() if p.requires_grad]

    print("before finetuning: ", end="")
    before = evaluate(model, data, datasets, encode, tokenizer.decode, end_id, cfg, ctx)
    out_dir.mkdir(parents=True, exist_ok=True)
    best_val_loss, losses, log = float("inf"), [], []
    model.train()
    for it in range(max_iters):
        t0 = time.perf_counter()
        lr = get_lr(it, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = [train_set[i] for i in batch_indices(it, len(train_set), cfg.batch_size, cfg.seed)]
        x, y = collate_fn(batch, end_id, allowed_max_length=block_size, mask_prompt=cfg.mask_prompt,
                          device=device)
        with ctx:
            _, loss = model(x, y)
        scaler.scale(loss).backward()  # fp16 only: scaled so that small gradients do not underflow
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"the loss is {losses[-1]} at step {it + 1}; lower --learning_rate")
        if it % cfg.log_interval == 0 or it == max_iters - 1:
            dt = time.perf_counter() - t0
            print(f"step {it + 1}/{max_iters}: loss {losses[-1]:.4f}, lr {lr:.2e}, grad norm {norm:.2f}, "
                  f"{dt * 1000:.0f} ms, {x.numel() / dt:,.0f} tokens/s")
        if (it + 1) % cfg.eval_interval == 0 or it == max_iters - 1:
            val = evaluate_loss(model, datasets["val"], cfg.batch_size, end_id, ctx)
            best_val_loss = min(best_val_loss, val["loss"])
            print(f"step {it + 1}: val loss {val['loss']:.4f}, perplexity {val['perplexity']:.2f}")
            log.append({"iter": it + 1, "train_loss": losses[-1], "val_loss": val["loss"]})
            save_checkpoint(out_dir / "ckpt.pt", make_checkpoint(model, cfg, spec, it + 1, best_val_loss))
    (out_dir / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in log))

    print("after finetuning: ", end="")
    after = evaluate(model, data, datasets, encode, tokenizer.decode, end_id, cfg, ctx)
    write_test_responses(model, data["test"], encode, tokenizer.decode, end_id, cfg, ctx)
    return {"iter_num": max_iters, "train_losses": losses, "before": before, "after": after,
            "val_loss": after["val_loss"], "best_val_loss": best_val_loss}


def write_test_responses(model, test, encode, decode, end_id, cfg, ctx=nullcontext()) -> Path:
    """The model's answers to the test entries, next to the references, in out_dir/test_responses.json."""
    test = test if cfg.num_responses < 0 else test[: cfg.num_responses]
    responses = generate_responses(model, test, encode, decode, end_id, cfg.max_new_tokens, cfg.batch_size,
                                   ctx)
    path = Path(cfg.out_dir) / "test_responses.json"
    records = [{**entry, "model_response": response} for entry, response in zip(test, responses)]
    path.write_text(json.dumps(records, indent=1, ensure_ascii=False), encoding="utf-8")
    if test:
        print(f"\n{format_input(test[0])}{RESPONSE_HEADER}{responses[0]}\n(reference: {test[0]['output']})\n")
    print(f"{len(test)} test responses written to {path}; the checkpoint is {Path(cfg.out_dir) / 'ckpt.pt'}")
    return path


def main(argv=None):
    cfg = parse_config(FinetuneConfig, argv)
    print("config:", ", ".join(f"{k}={v!r}" for k, v in asdict(cfg).items()))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(pick_threads(cfg.threads))
    try:
        return finetune(cfg)
    finally:
        torch.set_num_threads(previous_threads)


if __name__ == "__main__":
    main()
