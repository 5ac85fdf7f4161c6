"""08_dpo.py: Direct Preference Optimization (DPO).

07 taught the model to answer; now we teach it which of two answers people prefer. The classic
recipe (RLHF: Christiano et al. 2017, Ouyang et al. 2022) trains a reward model on preference pairs,
then maximises that reward with PPO while a KL penalty keeps the policy close to a frozen reference.
DPO (Rafailov et al. 2023) shows that this KL-regularised problem has a closed-form optimum,

    pi*(y|x) = ref(y|x) exp(r(x,y) / beta) / Z(x)  <=>  r(x,y) = beta log(pi*(y|x) / ref(y|x)) + beta log Z(x)

so every policy IMPLIES a reward, r = beta * log(pi / ref), and Z(x) cancels when two answers to the
same prompt are compared. Put that reward into the Bradley-Terry model of preferences,
p(chosen beats rejected) = sigmoid(r_chosen - r_rejected), and maximise the likelihood of the
human labels: a plain classification loss on the policy itself, with no reward model, no sampling
and no RL loop,

    loss = -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))

What this file teaches, top to bottom:
  - the data: rasbt's 1,100 instructions, each with a polite "chosen" and an impolite "rejected"
    answer, split 85/10/5 in file order like 07 (train / test / val);
  - collate_pairs: the chosen and rejected sequences of a batch in one tensor, written exactly as
    07 wrote its training examples (format_input + "### Response:" + answer + end token), with a
    mask that keeps only the response tokens;
  - sequence_logprobs: log pi(response | prompt), summed over the response tokens (or averaged,
    --average_log_probs, which removes DPO's length bias but changes what beta means);
  - dpo_loss, the implicit rewards, and conservative DPO (--label_smoothing) for noisy labels;
  - the reference model: a frozen copy of the starting policy (no gradients, eval mode);
  - 05's training loop (AdamW, warmup + cosine, clipping, atomic checkpoints with stage "dpo" that
    09 loads), with loss, rewards, reward margin and reward accuracy on train and validation pairs
    every eval_interval; at the end the answers before and after DPO, side by side, in
    out_dir/dpo_responses.json.

Reading the metrics: at step 0 the policy IS the reference, so every reward is 0, every margin 0
and the loss is ln 2 = 0.693 (sigmoid(0) = 1/2). The reward accuracy (the fraction of pairs whose
chosen reward is above the rejected one) starts at 0 (all ties) and should climb on held-out pairs
too, not only on the training ones.

References: Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly
a Reward Model"; Mitchell 2023, "A note on DPO with noisy preferences" (conservative DPO / label
smoothing); Raschka, "Build a Large Language Model (From Scratch)", ch. 7 bonus, dpo-from-scratch
(rasbt/LLMs-from-scratch), whose data and settings we use; Hugging Face TRL's DPOTrainer.

Run (07 first: its checkpoint, out/finetune/ckpt.pt, is the starting policy):
    python 07_finetune.py --init_from=gpt2 --max_iters=100     # an instruction-tuned GPT-2 (CPU)
    python 08_dpo.py                                           # DPO on it -> out/dpo/ckpt.pt
    python 08_dpo.py --max_iters=20 --eval_interval=10 --num_responses=2      # a quick look
    python 08_dpo.py --init_from=gpt2 --max_iters=50          # OpenAI's GPT-2 as the policy (no 07)
    python 08_dpo.py --ckpt_path=out/finetune-medium/ckpt.pt --device=cuda   # the book's gpt2-medium
    python 08_dpo.py --average_log_probs=True --beta=1.0       # per-token rewards: no length bias
    python 09_generate.py --ckpt=out/dpo/ckpt.pt --chat        # talk to the result
    python 08_dpo.py --help
"""

import argparse
import copy
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
# From 07_finetune.py: the split, the prompt template, encoding, batches, greedy answers


# copied from 07_finetune.py: split_data
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


# copied from 07_finetune.py: RESPONSE_HEADER
RESPONSE_HEADER = "\n\n### Response:\n"  # what follows format_input(entry); then the answer


# copied from 07_finetune.py: format_input
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


# copied from 07_finetune.py: text_encoder
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


# copied from 07_finetune.py: end_token_id
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


# copied from 07_finetune.py: batch_indices
def batch_indices(step: int, n: int, batch_size: int, seed: int = 0) -> list[int]:
    """The example indices of training batch `step`: shuffled epochs, last partial batch dropped.

    Stateless like 02's get_batch: batch = f(seed, step), so a run is reproducible from any step.
    """
    if not 0 < batch_size <= n:
        raise ValueError(f"batch_size={batch_size} must be between 1 and the {n} training examples")
    epoch, i = divmod(step, n // batch_size)
    order = np.random.default_rng([seed, epoch]).permutation(n)  # a fresh shuffle every epoch
    return order[i * batch_size : (i + 1) * batch_size].tolist()


# copied from 07_finetune.py: generate_greedy
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


# copied from 07_finetune.py: generate_responses
def generate_responses(model, entries, encode, decode, end_id, max_new_tokens=256, batch_size=8,
                       ctx=nullcontext()) -> list[str]:
    """The model's greedy answer to each entry, as text (prompt: format_input + RESPONSE_HEADER)."""
    prompts = [encode(format_input(e)) + encode(RESPONSE_HEADER) for e in entries]
    outputs = generate_greedy(model, prompts, max_new_tokens, end_id, batch_size, ctx)
    return [decode(ids).strip() for ids in outputs]


# -----------------------------------------------------------------------------
# 1. The data: preference pairs


def load_preference_data(path=None) -> list[dict]:
    """The preference entries: {"instruction", "input", "chosen", "rejected"} strings (and 07's "output").

    path=None downloads rasbt's instruction-data-with-preference.json into data/ once, checking its
    sha256: 07's 1,100 instructions, each with two answers written by Llama 3.1 70B, a polite one
    ("chosen") and an impolite one ("rejected"). Pass your own file in the same format to align the
    model with your preferences.
    """
    path = fetch("preference-data") if path is None else Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass --data_path=<JSON list of pairs> or omit it")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path} must hold a non-empty JSON list of entries, got {type(data).__name__}")
    for i, entry in enumerate(data):
        keys = ("instruction", "chosen", "rejected")
        if not (isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in keys)
                and isinstance(entry.get("input", ""), str)):
            raise ValueError(
                f"{path}: entry {i} is not an object with string 'instruction', 'chosen' and 'rejected' "
                f"fields (and an optional 'input'): {str(entry)[:80]}; fix the entry or drop it"
            )
    return data


class PreferenceDataset(Dataset):
    """The pairs, tokenized once: item i = (prompt ids, chosen ids, rejected ids).

    The prompt is format_input(entry) + RESPONSE_HEADER, and each answer is followed by the end
    token: exactly the text 07 finetuned on and the prompt 07 and 09 generate from, so the policy
    is judged on the distribution it learned (and on where it stops). subtle: 07 encodes the header
    and the answer together, we encode them apart to know where the answer starts; GPT-2's BPE never
    merges the header's final newline with the next word, so the ids are the same (tested).
    max_length (the model's context): collate_pairs cuts longer sequences (counted in n_truncated);
    a pair whose prompt alone is longer than the context has no answer token left to score: dropped.
    """

    def __init__(self, entries: list[dict], encode, end_id: int, max_length: int | None = None):
        self.items, self.n_truncated, self.n_dropped = [], 0, 0
        for entry in entries:
            prompt = encode(format_input(entry)) + encode(RESPONSE_HEADER)
            chosen = encode(entry["chosen"]) + [end_id]
            rejected = encode(entry["rejected"]) + [end_id]
            if max_length is not None and len(prompt) > max_length:
                self.n_dropped += 1
                continue
            longest = len(prompt) + max(len(chosen), len(rejected)) - 1  # inputs: all but the last token
            self.n_truncated += max_length is not None and longest > max_length
            self.items.append((prompt, chosen, rejected))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


# -----------------------------------------------------------------------------
# 2. Batches: chosen and rejected in one tensor, a mask on the response tokens


def collate_pairs(batch, pad_token_id=50256, allowed_max_length=None, device="cpu"):
    """B pairs (prompt, chosen, rejected) -> inputs x, targets y and mask, each (2B, T).

    Rows 0..B-1 hold prompt + chosen, rows B..2B-1 prompt + rejected: one forward pass scores
    both halves (split them with .chunk(2)). For each sequence s (its answer ends with the end token):

        x    = s without its last token              the model's input
        y    = s without its first token             y[i] is the token that x[:i+1] predicts
        mask = True where y[i] belongs to the answer (prompt and padding: False)

    Example, pad = 0, prompt [1, 2], chosen [3, 4, 9], rejected [5, 9]:

        chosen    x [1, 2, 3, 4]   y [2, 3, 4, 9]   mask [F, T, T, T]
        rejected  x [1, 2, 5, 0]   y [2, 5, 9, 0]   mask [F, T, T, F]

    Padding goes on the right, so no attention mask is needed: causal attention never lets a
    real token see the padding after it. allowed_max_length (the context) cuts all three.
    """
    seqs = [p + c for p, c, _ in batch] + [p + r for p, _, r in batch]
    prompt_lengths = [len(p) for p, _, _ in batch] * 2
    T = max(len(s) for s in seqs) - 1
    x = torch.full((len(seqs), T), pad_token_id, dtype=torch.long)  # (2B, T)
    y = torch.full((len(seqs), T), pad_token_id, dtype=torch.long)  # (2B, T) pad: a valid id to gather
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)  # (2B, T)
    for row, (s, prompt_length) in enumerate(zip(seqs, prompt_lengths)):
        n = len(s) - 1
        x[row, :n], y[row, :n] = torch.tensor(s[:-1]), torch.tensor(s[1:])
        mask[row, prompt_length - 1 : n] = True  # y[prompt_length - 1] is the answer's first token
    cut = slice(None, allowed_max_length)
    return x[:, cut].to(device), y[:, cut].to(device), mask[:, cut].to(device)


# -----------------------------------------------------------------------------
# 3. Log-probabilities of an answer, the DPO loss, the implicit rewards


def sequence_logprobs(logits, targets, mask, average: bool = False):
    """log pi(answer | prompt) for each row: the answer tokens' log-probabilities, summed or averaged.

    logits (N, T, V), targets and mask (N, T) -> (N,). By the chain rule, log p(y_1 .. y_n | x) =
    sum_i log p(y_i | x, y_<i): gather each target's log-probability and add up the masked ones.
    Example: token log-probs [-1.0, -2.0, -3.0] with mask [F, T, T] -> sum -5.0, average -2.5.

    Summed (the default, the DPO paper): the exact log-probability of the whole answer, the
    quantity the derivation needs. But it grows with length: every extra token adds a negative
    term, and the reward beta * (log pi - log ref) of a long answer can move further than that of
    a short one, so DPO tends to make answers longer (length bias, Park et al. 2024).
    average=True (as rasbt's notebook; SimPO, Meng et al. 2024) divides by the number of answer
    tokens: the reward becomes per token, length no longer pays, but the values are ~1/length as
    large, so beta must be larger for the same push (SimPO uses beta ~2), and the loss is no
    longer the one derived from the KL-regularised objective.
    """
    # subtle: float32, because under bf16 autocast a sum over hundreds of log-probs loses digits
    logps = logits.float().log_softmax(dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (N, T)
    total = torch.where(mask, logps, 0.0).sum(dim=-1)  # (N,) where, not *: 0 * -inf would be nan
    return total / mask.sum(dim=-1).clamp(min=1) if average else total


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta: float = 0.1,
             label_smoothing: float = 0.0):
    """The DPO loss of each pair and the implicit rewards of its two answers: three (B,) tensors.

    Inputs are sequence log-probs (B,). The reward the policy implies for an answer is
    r = beta * (log pi(answer) - log ref(answer)): how much more likely the policy made it than the
    reference did. Bradley-Terry says p(chosen preferred) = sigmoid(r_chosen - r_rejected); the
    loss is the negative log-likelihood of the label, -log sigmoid(margin). Its gradient,
    -beta * sigmoid(-margin) * (grad log pi(chosen) - grad log pi(rejected)), pushes the chosen
    answer up and the rejected one down, hardest on the pairs the policy still gets wrong.
    Hand example: log-probs pi (-5, -7), ref (-6, -6.5), beta 0.5 -> rewards +0.5 and -0.25,
    margin 0.75, loss ln(1 + e^-0.75) = 0.3869.

    label_smoothing eps > 0 is conservative DPO (Mitchell 2023): if a fraction eps of the labels
    may be flipped, train towards a soft label, p(chosen wins) = 1 - eps instead of 1, i.e. binary
    cross-entropy -(1 - eps) log sigmoid(m) - eps log sigmoid(-m) with m = beta * (the log-ratio
    difference). Plain DPO keeps pushing m up forever; this loss is smallest at m = ln((1 - eps) / eps)
    (2.2 for eps = 0.1), so the policy stops pushing once it is that confident.
    beta: a larger beta trusts the reference more (the KL penalty's weight); 0.1 is the paper's.
    """
    logits = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)  # (B,)
    losses = (-(1 - label_smoothing) * F.logsigmoid(beta * logits)
              - label_smoothing * F.logsigmoid(-beta * logits))  # (B,)
    chosen_rewards = beta * (policy_chosen - reference_chosen).detach()  # (B,) for the logs only
    rejected_rewards = beta * (policy_rejected - reference_rejected).detach()  # (B,)
    return losses, chosen_rewards, rejected_rewards


def make_reference(policy: nn.Module) -> nn.Module:
    """The reference model: a frozen deep copy of the starting policy.

    A copy with its own weights (the policy's change under the optimizer, the copy's must not),
    no gradients (requires_grad False: no graph is built through it, and an optimizer handed its
    parameters by mistake would have nothing to do) and eval mode (no dropout: ref(y|x) must be one
    fixed number per answer, the anchor of every reward).
    """
    reference = copy.deepcopy(policy)
    reference.requires_grad_(False)
    return reference.eval()


def pair_logprobs(model, x, y, mask, average: bool = False, ctx=nullcontext()):
    """(chosen, rejected) sequence log-probs, (B,) each, of a collate_pairs batch in one forward pass."""
    with ctx:
        logits, _ = model(x)  # (2B, T, vocab_size)
    return sequence_logprobs(logits, y, mask, average).chunk(2)


def dpo_batch(policy, reference, batch, beta=0.1, label_smoothing=0.0, average=False, ctx=nullcontext()):
    """(losses, chosen rewards, rejected rewards), (B,) each, of a collate_pairs batch (x, y, mask)."""
    policy_chosen, policy_rejected = pair_logprobs(policy, *batch, average, ctx)
    with torch.no_grad():  # a fixed anchor: no graph, no saved activations (even if not frozen)
        reference_chosen, reference_rejected = pair_logprobs(reference, *batch, average, ctx)
    return dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta,
                    label_smoothing)


def pair_metrics(losses, chosen_rewards, rejected_rewards) -> dict:
    """Means over pairs: loss, chosen and rejected rewards, margin, accuracy (chosen reward > rejected)."""
    margins = chosen_rewards - rejected_rewards
    return {"loss": losses.mean().item(), "chosen_reward": chosen_rewards.mean().item(),
            "rejected_reward": rejected_rewards.mean().item(), "margin": margins.mean().item(),
            "accuracy": (margins > 0).float().mean().item()}


# -----------------------------------------------------------------------------
# 4. Evaluation: the metrics on fixed pairs, answers before and after


@torch.no_grad()
def evaluate_pairs(policy, reference, dataset, cfg, pad_token_id: int, ctx=nullcontext()) -> dict:
    """pair_metrics over the first cfg.eval_pairs pairs of dataset (-1: all), policy in eval mode."""
    was_training, device = policy.training, next(policy.parameters()).device
    policy.eval()
    n = len(dataset) if cfg.eval_pairs < 0 else min(cfg.eval_pairs, len(dataset))
    parts = []
    for start in range(0, n, cfg.batch_size):
        pairs = [dataset[i] for i in range(start, min(start + cfg.batch_size, n))]
        batch = collate_pairs(pairs, pad_token_id, policy.config.block_size, device)
        parts.append(dpo_batch(policy, reference, batch, cfg.beta, cfg.label_smoothing, cfg.average_log_probs,
                               ctx))
    policy.train(was_training)
    return pair_metrics(*(torch.cat(tensors) for tensors in zip(*parts)))


def format_metrics(metrics: dict) -> str:
    return (f"loss {metrics['loss']:.4f}, rewards chosen {metrics['chosen_reward']:+.3f} rejected "
            f"{metrics['rejected_reward']:+.3f}, margin {metrics['margin']:+.3f}, "
            f"accuracy {metrics['accuracy']:.1%}")


def write_responses(reference, policy, entries, encode, decode, end_id, cfg, ctx=nullcontext()) -> Path:
    """Greedy answers before DPO (the reference IS the model before) and after, in dpo_responses.json."""
    entries = entries[: max(cfg.num_responses, 0)]
    args = (encode, decode, end_id, cfg.max_new_tokens, cfg.batch_size, ctx)
    before, after = generate_responses(reference, entries, *args), generate_responses(policy, entries, *args)
    records = [{"instruction": e["instruction"], "input": e.get("input", ""), "chosen": e["chosen"],
                "rejected": e["rejected"], "before_dpo": b, "after_dpo": a}
               for e, b, a in zip(entries, before, after)]
    path = Path(cfg.out_dir) / "dpo_responses.json"
    path.write_text(json.dumps(records, indent=1, ensure_ascii=False), encoding="utf-8")
    for record in records[:2]:
        print(f"\n{format_input(record)}{RESPONSE_HEADER}  before DPO: {record['before_dpo']}\n"
              f"  after DPO:  {record['after_dpo']}\n  (chosen: {record['chosen']})")
    print(f"\n{len(records)} validation answers before/after DPO written to {path}")
    return path


def print_summary(before: dict, after: dict, beta: float) -> None:
    """The metrics of both splits before and after DPO, one table."""
    print(f"\nDPO, before -> after (rewards = {beta} * (log pi - log ref), in nats)")
    for split in ("train", "val"):
        b, a = before[split], after[split]
        print(f"  {split:5s} loss {b['loss']:.4f} -> {a['loss']:.4f}   margin {b['margin']:+.3f} -> "
              f"{a['margin']:+.3f}   accuracy {b['accuracy']:.1%} -> {a['accuracy']:.1%}   chosen reward "
              f"{a['chosen_reward']:+.3f}, rejected {a['rejected_reward']:+.3f}")


# -----------------------------------------------------------------------------
# 5. The policy to start from, and the DPO loop

# where 07_finetune.py writes its checkpoint by default (its out_dir is out/finetune)
DEFAULT_CKPT = "out/finetune/ckpt.pt"


@dataclass
class DPOConfig:
    """Direct Preference Optimization of an instruction-tuned GPT (07's checkpoint)."""

    # model and data
    init_from: str = "checkpoint"  # "checkpoint" (07's, at ckpt_path), or gpt2, gpt2-medium, -large, -xl
    ckpt_path: str = DEFAULT_CKPT  # the starting policy when init_from=checkpoint
    out_dir: str = "out/dpo"  # ckpt.pt, dpo_responses.json and log.jsonl go here
    data_path: str = ""  # "" = rasbt's instruction-data-with-preference.json (sha256-checked); or yours
    unknown_char: str = "?"  # char tokenizers: stands in for characters they lack ("" = error)
    dropout: float = 0.0  # the policy's dropout (the reference never drops out)
    # DPO
    beta: float = 0.1  # the KL penalty's weight: larger stays closer to the reference
    label_smoothing: float = 0.0  # conservative DPO: the assumed fraction of flipped labels, in [0, 0.5)
    average_log_probs: bool = False  # per-token mean instead of sum of the answer's log-probs
    # optimization (the book: AdamW 5e-6, weight decay 0.01, batch 8, 1 epoch)
    batch_size: int = 8  # pairs per step (2x sequences)
    epochs: float = 1.0  # passes over the training pairs (when max_iters = 0)
    max_iters: int = 0  # optimizer steps; 0 = epochs * (training pairs // batch_size)
    learning_rate: float = 5e-6  # peak learning rate: DPO moves a trained model, so small (the book's)
    min_lr: float = 5e-7  # the cosine schedule ends here
    warmup_iters: int = 10  # linear warmup steps
    lr_decay_iters: int = 0  # 0 = max_iters
    decay_lr: bool = True  # False: constant learning_rate
    weight_decay: float = 0.01  # AdamW's, on the 2-D weights only
    beta1: float = 0.9  # AdamW's momentum (not DPO's beta)
    beta2: float = 0.95  # AdamW's second-moment decay
    grad_clip: float = 1.0  # clip the gradient's global norm (0 = off)
    # logging and evaluation
    log_interval: int = 5  # a log line every this many steps
    eval_interval: int = 25  # metrics on train and val pairs, and a checkpoint, every eval_interval steps
    eval_pairs: int = 64  # pairs of each split to evaluate on (-1 = all)
    max_new_tokens: int = 128  # longest generated answer
    num_responses: int = 5  # validation entries answered before and after DPO in dpo_responses.json
    # system
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps
    dtype: str = "auto"  # auto (cuda: bfloat16, or float16 without bf16; else float32), float32, ...
    threads: int = 0  # CPU threads; 0 = auto: the cores idle at startup (05's pick_threads)
    seed: int = 1337  # seeds the batch order (and dropout, if any)

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"--beta={self.beta} must be > 0 (it scales the rewards; the paper uses 0.1)")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"--label_smoothing={self.label_smoothing} must be in [0, 0.5): the fraction of "
                             f"labels assumed flipped; at 0.5 the labels would be noise (0 = plain DPO)")
        if self.init_from not in ("checkpoint", *HF_MODELS):
            raise ValueError(f"--init_from={self.init_from!r}: use 'checkpoint' (07's) or one of {HF_MODELS}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype={self.dtype!r} is not valid; use auto, float32, bfloat16 or float16")
        for name in ("batch_size", "log_interval", "eval_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.eval_pairs == 0:
            raise ValueError("--eval_pairs=0 would evaluate nothing; use -1 (all pairs) or a count")


def load_policy(cfg: DPOConfig, device: str):
    """(policy, tokenizer spec): 07's checkpoint or OpenAI's GPT-2, with cfg's dropout."""
    if cfg.init_from in HF_MODELS:
        model, spec, stage = GPT.from_pretrained(cfg.init_from), {"kind": "gpt2"}, "pretrain"
    elif cfg.init_from == "checkpoint":
        if not Path(cfg.ckpt_path).exists():
            raise FileNotFoundError(
                f"no checkpoint at {cfg.ckpt_path}: DPO starts from an instruction-tuned model, so run "
                f"`python 07_finetune.py` first (e.g. `python 07_finetune.py --init_from=gpt2`), or point "
                f"--ckpt_path at a 07 checkpoint, or pass --init_from=gpt2 to start from OpenAI's GPT-2"
            )
        model, _, ckpt = load_checkpoint(cfg.ckpt_path, device="cpu")
        spec, stage = ckpt["tokenizer"], ckpt.get("stage", "?")
        print(f"policy: {cfg.ckpt_path} (stage {stage}, iter {ckpt.get('iter_num', '?')})")
    else:
        raise ValueError(f"--init_from={cfg.init_from!r}: use 'checkpoint' (07's) or one of {HF_MODELS}")
    if stage == "pretrain":
        print("note: this model was not instruction-tuned; DPO works on it, but it shapes answers the model "
              "cannot yet give well (finetune it with 07_finetune.py first for real answers)")
    if model.config.dropout != cfg.dropout:  # dropout lives in the modules: rebuild with the new rate
        state = model.state_dict()
        model = GPT(replace(model.config, dropout=cfg.dropout))
        model.load_state_dict(state)
    return model.to(device), spec


def prepare_pairs(cfg: DPOConfig, tokenizer, block_size: int):
    """The splits, the train/val pair datasets, encode, and the end token; prints what was cut."""
    encode, unknown = text_encoder(tokenizer, cfg.unknown_char)
    end_id = end_token_id(tokenizer)
    data = split_data(load_preference_data(cfg.data_path or None))
    datasets = {k: PreferenceDataset(data[k], encode, end_id, block_size) for k in ("train", "val")}
    print(f"data: {', '.join(f'{k} {len(v)}' for k, v in data.items())} pairs (DPO uses train, reports val)")
    for name, ds in datasets.items():
        if ds.n_truncated or ds.n_dropped:
            print(f"  {name}: {ds.n_truncated} pairs cut at the context ({block_size} tokens), "
                  f"{ds.n_dropped} dropped (their prompt alone is longer than the context)")
        if len(ds) == 0:
            raise ValueError(f"no {name} pair fits the context of {block_size} tokens; start from a model "
                             f"with a larger block_size (e.g. --init_from=gpt2)")
    if unknown:
        print(f"  {sum(unknown.values())} characters the char tokenizer lacks became {cfg.unknown_char!r}")
    return data, datasets, encode, end_id


def make_checkpoint(model, cfg, spec, iter_num, best_val_loss) -> dict:
    """A checkpoint in 05's format, stage "dpo": 09 (and 08 itself) load it with load_checkpoint."""
    return {
        "model": model.state_dict(),
        "model_args": asdict(model.config),
        "optimizer": None,  # DPO runs are short: no resume, so no optimizer state to carry (as 07)
        "config": asdict(cfg),
        "iter_num": iter_num,
        "best_val_loss": best_val_loss,  # the best validation DPO loss
        "rng": rng_states(),
        "tokenizer": spec,
        "stage": "dpo",
    }


def dpo(cfg: DPOConfig) -> dict:
    """Train the policy with DPO against its frozen copy; metrics, checkpoint and answers before/after.

    Returns {"iter_num", "train_losses", "before", "after" ({"train": metrics, "val": metrics}),
    "policy", "reference"} (the two models, to inspect in a notebook or a test).
    """
    device = pick_device(cfg.device)
    device_type = torch.device(device).type
    # concrete values from here on: "auto" resolved; the checkpoint records what really ran
    dtype, threads = pick_dtype(cfg.dtype, device_type), pick_threads(cfg.threads)
    cfg = replace(cfg, device=device, dtype=dtype, threads=threads)
    torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    ctx, out_dir = autocast_context(device_type, cfg.dtype), Path(cfg.out_dir)

    policy, spec = load_policy(cfg, device)
    reference = make_reference(policy)  # the model before DPO, frozen
    tokenizer, block_size = get_tokenizer(spec), policy.config.block_size
    data, datasets, encode, end_id = prepare_pairs(cfg, tokenizer, block_size)
    train_set = datasets["train"]
    max_iters = cfg.max_iters or int(cfg.epochs * (len(train_set) // cfg.batch_size))
    if max_iters <= 0:
        raise ValueError(f"{max_iters} training steps: raise --epochs or --max_iters, or lower --batch_size")
    cfg = replace(cfg, max_iters=max_iters, lr_decay_iters=cfg.lr_decay_iters or max_iters)
    optimizer = configure_optimizers(policy, cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                     device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=cfg.dtype == "float16")  # off: a pass-through
    print(f"model: {policy.num_params():,} parameters; reference: a frozen copy; beta {cfg.beta}, label "
          f"smoothing {cfg.label_smoothing}, {'averaged' if cfg.average_log_probs else 'summed'} log-probs; "
          f"{max_iters} steps of {cfg.batch_size} pairs")

    def evaluate() -> dict:
        metrics = {k: evaluate_pairs(policy, reference, datasets[k], cfg, end_id, ctx) for k in datasets}
        for k, m in metrics.items():
            print(f"  {k:5s} {format_metrics(m)}")
        return metrics

    print("before DPO (the policy is the reference: rewards 0, loss ln 2 = 0.6931):")
    before = evaluate()
    out_dir.mkdir(parents=True, exist_ok=True)
    log = [{"iter": 0, **{f"{k}_{name}": v for k, m in before.items() for name, v in m.items()}}]
    best_val_loss, losses, metrics = float("inf"), [], before
    policy.train()
    for it in range(max_iters):
        t0 = time.time()
        lr = get_lr(it, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        pairs = [train_set[i] for i in batch_indices(it, len(train_set), cfg.batch_size, cfg.seed)]
        batch = collate_pairs(pairs, end_id, block_size, device)
        step = dpo_batch(policy, reference, batch, cfg.beta, cfg.label_smoothing, cfg.average_log_probs, ctx)
        loss = step[0].mean()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # true gradients, before clipping
        clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if it % cfg.log_interval == 0 or it == max_iters - 1:
            dt, m = time.time() - t0, pair_metrics(*step)
            print(f"step {it + 1}/{max_iters}: loss {losses[-1]:.4f}, margin {m['margin']:+.3f}, accuracy "
                  f"{m['accuracy']:.0%}, lr {lr:.2e}, grad norm {norm:.2f}, {dt * 1000:.0f} ms, "
                  f"{batch[0].numel() / dt:,.0f} tokens/s")
        if (it + 1) % cfg.eval_interval == 0 or it == max_iters - 1:
            print(f"step {it + 1}:")
            metrics = evaluate()
            best_val_loss = min(best_val_loss, metrics["val"]["loss"])
            log.append({"iter": it + 1, "batch_loss": losses[-1],
                        **{f"{k}_{name}": v for k, m in metrics.items() for name, v in m.items()}})
            save_checkpoint(out_dir / "ckpt.pt", make_checkpoint(policy, cfg, spec, it + 1, best_val_loss))
    (out_dir / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in log))

    write_responses(reference, policy, data["val"], encode, tokenizer.decode, end_id, cfg, ctx)
    print_summary(before, metrics, cfg.beta)
    print(f"checkpoint (stage dpo): {out_dir / 'ckpt.pt'}; try it: python 09_generate.py "
          f"--ckpt={out_dir / 'ckpt.pt'} --chat")
    return {"iter_num": max_iters, "train_losses": losses, "before": before, "after": metrics,
            "policy": policy, "reference": reference}


def main(argv=None):
    cfg = parse_config(DPOConfig, argv)
    print(cfg)
    previous_threads = torch.get_num_threads()
    try:
        return dpo(cfg)
    finally:
        torch.set_num_threads(previous_threads)  # dpo() sets the run's count; give the caller back theirs


if __name__ == "__main__":
    main()
