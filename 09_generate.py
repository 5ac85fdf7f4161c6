"""Stage 9: generation, fast: a KV cache, sampling, batches, chat and evaluation.

A trained GPT only scores "what comes next". Generating text is a loop around it: score, pick a
token, append it, repeat. This file makes that loop fast and useful:

  - Sampling: greedy, temperature, top-k and top-p (nucleus), seeded; stop at <|endoftext|> or at
    stop strings; text streamed to the terminal token by token (whole UTF-8 characters only).
  - The KV cache. Without it, every new token reruns the model over the whole context: O(T) work
    per token, O(T^2) per text. But in a causal model the keys and values of past tokens never
    change, so we keep them (per layer, (B, n_head, block_size, head_size) buffers) and feed the
    model only the newest token. `forward_cached` runs the model's own modules (wte, wpe, each
    block's ln_1, attn.c_attn, attn.c_proj, ln_2, mlp, then ln_f and lm_head) around the cache:
    the GPT class of 04 stays untouched, and any checkpoint of 05-08 works.
  - Batches: prompts of unequal length are LEFT-padded so their last tokens line up (the next
    token of every row is then written to the same column); an attention mask hides the padding,
    and position ids start at 0 at each row's first real token, as if the row were alone.
  - Chat: `--chat=True` wraps each message in 07's instruction template (for finetuned/DPO checkpoints).
  - Evaluation: perplexity and bits per byte of a text file, over strided windows. Bits per byte
    (total nats / ln 2 / UTF-8 bytes) does not depend on the tokenizer, so a character model and
    a BPE model can be compared on the same text.

References:
  - Radford et al. 2019 (GPT-2); karpathy/nanoGPT sample.py; Raschka, "Build a Large Language
    Model (From Scratch)", ch. 5 and 7 (sampling, the Alpaca chat template).
  - Holtzman et al. 2019, "The Curious Case of Neural Text Degeneration" (top-p sampling).
  - Pope et al. 2022, "Efficiently Scaling Transformer Inference" (KV caching).
  - Hugging Face, "Perplexity of fixed-length models" (the strided-window evaluation).

Run it:
  python 09_generate.py                                       # sample from the newest out/**/ckpt.pt
  python 09_generate.py --ckpt=out/shakespeare-char/ckpt.pt --prompt="ROMEO:" --temperature=0
  python 09_generate.py --ckpt=out/finetune/ckpt.pt --chat=True   # talk to an instruction-tuned model
  python 09_generate.py --init_from=gpt2 --prompt="Hello, I'm a language model," --num_samples=3
  python 09_generate.py --ckpt=... --eval_file=data/tinyshakespeare.txt   # perplexity, bits/byte
  python 09_generate.py --bench=True      # tokens/s with and without the cache (CPU: ~15 minutes)
  python 09_generate.py --init_from=gpt2 --device=cuda        # the same on one GPU (bf16 autocast)
  python 09_generate.py --help
"""

import argparse
import codecs
import dataclasses
import hashlib
import inspect
import json
import math
import os
import re
import struct
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

import requests
import torch
import torch.nn as nn
import torch.nn.functional as F

DATA_DIR = Path(__file__).resolve().parent / "data"
OUT_DIR = Path("out")  # where 05-08 write their runs (relative to the working directory, as theirs)


# -----------------------------------------------------------------------------
# From 01_tokenizer.py


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


# -----------------------------------------------------------------------------
# From 03_attention.py and 04_gpt.py: the model, and OpenAI's weights


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
# From 05_pretrain.py: command line, device, checkpoints


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
# From 07_finetune.py: the instruction template, and how 07 encodes and ends responses


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


# -----------------------------------------------------------------------------
# Sampling: turn the logits of the last position into one token id


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set every logit outside the top-k and outside the nucleus (top-p) to -inf.

    top_k keeps the k largest logits (ties with the k-th are kept too). top_p keeps the smallest
    set of most likely tokens whose probabilities sum to at least top_p (Holtzman et al. 2019):
    probs [0.5, 0.3, 0.15, 0.05] with top_p=0.8 keep the first two (0.5 + 0.3 >= 0.8); the third
    goes, because the mass before it already reaches 0.8. The most likely token always stays.
    logits: (..., V) -> (..., V).
    """
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[..., -1:]  # (..., 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above
        drop_sorted = mass_before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back from rank order to token order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be a positive integer (or None/0 for no limit), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus filter), got {top_p}")


def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None) -> torch.Tensor:
    """Pick one token per row of logits (B, V) -> (B,).

    temperature=0 is greedy (argmax). Otherwise the logits are divided by the temperature (< 1:
    sharper, > 1: flatter; as it goes to 0 the distribution becomes one-hot on the argmax), then
    filtered by top-k / top-p, and a token is drawn from the softmax with `generator` (seeded).
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = F.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)  # (B,)


# -----------------------------------------------------------------------------
# The KV cache


class KVCache:
    """Keys and values of the tokens seen so far, per layer: reuse them instead of recomputing.

    In a causal model token t's key and value depend only on tokens <= t, so they never change once
    computed. Each layer gets two buffers of shape (B, n_head, max_len, head_size), allocated on
    first use (with the dtype the model computes in: fp32, or bf16 under autocast) and filled left
    to right; `length` counts the filled positions. For GPT-2 small with max_len=1024 that is
    2 * 12 layers * 1024 * 768 * 4 bytes = 75 MB per row of the batch in fp32.

    Alongside: `key_real` (B, max_len), False at left-padding positions (no query may attend to
    them), and `next_pos` (B, 1), the position id of each row's next token.
    """

    def __init__(self, n_layer: int, max_len: int):
        self.max_len, self.length = max_len, 0
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.key_real: torch.Tensor | None = None  # (B, max_len) bool
        self.padded = False  # is any key padding? (if not, no mask is needed for one new token)
        self.next_pos: torch.Tensor | None = None  # (B, 1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, T, hs) at positions [length, length + T); return all keys/values so far."""
        B, nh, T, hs = k.shape
        if self.k[layer] is None:
            self.k[layer] = k.new_zeros(B, nh, self.max_len, hs)
            self.v[layer] = v.new_zeros(B, nh, self.max_len, hs)
        end = self.length + T
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, nh, end, hs) views, no copy


def cached_attention(attn, x, n_head: int, cache: KVCache | None, layer: int, mask) -> torch.Tensor:
    """attn's own weights (c_attn, c_proj), but keys/values come from the cache plus the new tokens.

    x: (B, T, C) the new tokens only. mask: None (plain causal, or T == 1: a new last token may see
    every key) or a bool (B, 1, T, L) with L = keys so far, True = may attend.
    """
    B, T, C = x.shape
    q, k, v = attn.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
    q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
    if cache is not None:
        k, v = cache.update(layer, k, v)  # (B, nh, L, hs), L = cache.length + T
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1)
    y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
    return attn.resid_dropout(attn.c_proj(y))


def forward_cached(model: GPT, idx, cache: KVCache | None = None, attention_mask=None, position_ids=None,
                   last_only: bool = False):  # fmt: skip
    """The GPT forward pass, built from the model's own modules, with an optional KV cache.

    idx (B, T): the NEW tokens; their keys/values are appended to `cache` and they attend to
    everything cached before them. cache=None runs the plain full forward (what you get without a
    cache: the whole context every time). Returns logits (B, T, vocab_size), or (B, 1, vocab_size)
    with last_only=True: generation needs only the last position's, and the LM head (C x vocab)
    is a big share of the work (GPT-2 small: 38.6M of its 124M weights; a tiny model: nearly all).

    attention_mask (B, T): True = real token, False = (left) padding. position_ids (B, T): by
    default each row counts its real tokens, continuing from the cache: a row padded as
    [pad pad a b] gets positions [0 0 0 1], exactly what `a b` alone would get.

        cache = KVCache(model.config.n_layer, model.config.block_size)
        logits = forward_cached(model, prompt, cache)           # prefill: (1, T, V)
        logits = forward_cached(model, next_token[:, None], cache)  # one step: (1, 1, V)

    Inference only (dropout would differ from the model's forward): call model.eval() first.
    Raises ValueError when the cache (or, without one, block_size) has no room for T more tokens.
    """
    if model.training:
        raise ValueError("forward_cached is for inference: call model.eval() first (dropout off)")
    B, T = idx.shape
    t0 = 0 if cache is None else cache.length
    limit = model.config.block_size if cache is None else min(cache.max_len, model.config.block_size)
    if t0 + T > limit:
        raise ValueError(
            f"{t0} cached + {T} new tokens exceed the context of {limit} positions; crop the input "
            f"or start a new cache (generate() slides the window for you, see generate_tokens)"
        )
    if attention_mask is None:
        real = torch.ones(B, T, dtype=torch.bool, device=idx.device)  # (B, T)
    else:
        real = attention_mask.bool()
    if position_ids is None:
        start = cache.next_pos if t0 > 0 else 0
        position_ids = start + (real.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T)
    padded = attention_mask is not None and not bool(real.all())
    if cache is None:
        key_real = real  # (B, L) with L = T
    else:
        if cache.key_real is None:
            cache.key_real = torch.ones(B, cache.max_len, dtype=torch.bool, device=idx.device)
        cache.key_real[:, t0 : t0 + T] = real
        cache.padded |= padded
        padded, key_real = cache.padded, cache.key_real[:, : t0 + T]
    mask = None  # SDPA's is_causal suffices: no padding, and the queries are the first or only new ones
    if padded or (t0 > 0 and T > 1):
        q_pos = torch.arange(t0, t0 + T, device=idx.device)[:, None]  # (T, 1)
        k_pos = torch.arange(t0 + T, device=idx.device)[None, :]  # (1, L)
        mask = (k_pos <= q_pos) & key_real[:, None, :]  # (B, T, L) causal and key is real
        mask = (mask | (k_pos == q_pos))[:, None]  # (B, 1, T, L); a padded query sees itself: no NaN

    tr, n_head = model.transformer, model.config.n_head
    x = tr.drop(tr.wte(idx) + tr.wpe(position_ids))  # (B, T, C)
    for layer, block in enumerate(tr.h):
        x = x + cached_attention(block.attn, block.ln_1(x), n_head, cache, layer, mask)
        x = x + block.mlp(block.ln_2(x))
    if last_only:
        x = x[:, -1:]  # (B, 1, C)
    logits = model.lm_head(tr.ln_f(x))  # (B, T or 1, vocab_size)
    if cache is not None:
        cache.length += T
        cache.next_pos = position_ids[:, -1:] + 1  # (B, 1)
    return logits


# -----------------------------------------------------------------------------
# Generation: batches, the full-context rule, stopping, streaming


def left_pad(prompts: list[list[int]], device, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[[5, 6, 7], [8]] -> idx [[5, 6, 7], [0, 0, 8]], mask [[1, 1, 1], [0, 0, 1]] (as bool).

    Left, not right: the last real token of every row sits in the last column, so each step appends
    the next tokens as one new column. (The pad id is arbitrary: the mask hides it.)
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token; start from the eot token or a newline")
    T = max(len(p) for p in prompts)
    idx = torch.tensor([[pad_id] * (T - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[False] * (T - len(p)) + [True] * len(p) for p in prompts], device=device)
    return idx, mask


@torch.no_grad()
def generate_tokens(model, prompts, temperature=1.0, top_k=None, top_p=None, generator=None, use_cache=True):
    """Yield (next_ids (B,), logits (B, V)) for ever, one step per token; the caller decides when to stop.

    prompts: a list of token-id lists (one per row, any lengths: they are left-padded).
    use_cache=False reruns the whole context each step (same tokens, O(T) times more work).

    When the context is full. The model knows positions 0 .. block_size-1 only. A prompt longer
    than block_size keeps its LAST block_size tokens. When a new token would make the context
    longer than block_size, the window slides: we keep the last block_size // 2 tokens, re-encode
    them from position 0 (one prefill into a fresh cache) and go on with the cache. Why not slide by
    one token, like 04's generate? With learned absolute positions every cached key was computed
    at its old position; moving the window by one changes every position, so the whole cache is
    stale and must be recomputed each step: no cache at all. Halving the window pays one prefill
    per block_size // 2 new tokens instead. In a batch every row slides exactly as it would alone:
    when the padded batch is full, rows longer than block_size keep their last block_size // 2
    tokens, the other rows keep all of theirs, and the batch is re-padded and re-encoded.
    """
    check_sampling(temperature, top_k, top_p)
    block_size, n_layer = model.config.block_size, model.config.n_layer
    keep = max(1, block_size // 2)
    device = model.lm_head.weight.device
    idx, mask = left_pad([p[-block_size:] for p in prompts], device)  # (B, T) each
    cache, logits = None, None
    while True:
        if logits is None:  # encode the whole window: the prompt, after a slide, or every step uncached
            cache = KVCache(n_layer, block_size) if use_cache else None
            logits = forward_cached(model, idx, cache, attention_mask=mask, last_only=True)[:, -1]  # (B, V)
        next_ids = sample(logits, temperature, top_k, top_p, generator)  # (B,)
        yield next_ids, logits
        idx = torch.cat([idx, next_ids[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if idx.size(1) > block_size:  # context full: slide the rows that are full (see the docstring)
            rows = [[t for t, real in zip(row, is_real) if real]
                    for row, is_real in zip(idx.tolist(), mask.tolist())]  # each row's own tokens
            idx, mask = left_pad([row[-keep:] if len(row) > block_size else row for row in rows], device)
            logits = None
        elif use_cache:
            logits = forward_cached(model, next_ids[:, None], cache)[:, -1]  # only the new token
        else:
            logits = None


def token_bytes(tok, token_id: int) -> bytes:
    """The UTF-8 bytes a token stands for. A GPT-2 token can be part of a character: 'é' is 2 bytes,
    an emoji 4, and byte-level BPE may split them across tokens."""
    if hasattr(tok, "decode_single_token_bytes"):  # tiktoken
        return tok.decode_single_token_bytes(token_id)
    return tok.decode([token_id]).encode("utf-8")  # a character tokenizer: whole characters


class TextStream:
    """Token ids in, text out as soon as it is certain: whole characters only, never past a stop string.

    Two things make streaming subtle. (1) A BPE token may end in the middle of a UTF-8 character;
    decoding it alone prints '\\ufffd'. An incremental UTF-8 decoder keeps the incomplete bytes
    until the character is whole. (2) A stop string can arrive split over tokens ("\\n\\n###" as
    "\\n\\n" + "###"), so text that could be the start of a stop string is held back until it is
    either completed (generation stops, it is never shown) or ruled out (it is shown).

    >>> tok = CharTokenizer("\\nHi")
    >>> stream = TextStream(tok, stop_strings=["\\n\\n"])
    >>> [stream.add(i) for i in tok.encode("Hi\\n")]      # the "\\n" might begin "\\n\\n": held back
    ['H', 'i', '']
    >>> stream.add(tok.encode("\\n")[0]), stream.stopped, stream.text
    ('', True, 'Hi')
    """

    def __init__(self, tok, stop_strings=(), on_text=None):
        self.tok, self.stop_strings, self.on_text = tok, [s for s in stop_strings if s], on_text
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # everything decoded so far (cut at the stop string once one appears)
        self.shown = 0  # characters of self.text already handed to on_text
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Feed one token; return (and pass to on_text) the text that became certain."""
        self.text += self.decoder.decode(token_bytes(self.tok, token_id))
        # a stop string can only start in the unshown part: everything shown was ruled out
        hits = [i for s in self.stop_strings if (i := self.text.find(s, self.shown)) >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
        return self._show(len(self.text) if self.stopped else len(self.text) - self._held_back())

    def finish(self) -> str:
        """Generation ended (eot, max_new_tokens): show what was held back, incomplete bytes as '\\ufffd'."""
        if not self.stopped:
            self.text += self.decoder.decode(b"", final=True)
        return self._show(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest end of the text that is the beginning of a stop string."""
        for n in range(min(len(self.text), max((len(s) - 1 for s in self.stop_strings), default=0)), 0, -1):
            if any(s.startswith(self.text[-n:]) for s in self.stop_strings):
                return n
        return 0

    def _show(self, upto: int) -> str:
        chunk, self.shown = self.text[self.shown : upto], max(self.shown, upto)
        if chunk and self.on_text is not None:
            self.on_text(chunk)
        return chunk


@torch.no_grad()
def generate(model, prompts, max_new_tokens: int, temperature=1.0, top_k=None, top_p=None, generator=None,
             eot_token=None, streams=None, use_cache=True) -> list[list[int]]:  # fmt: skip
    """Generate up to max_new_tokens tokens for each prompt (token-id lists); return the new ids.

    A row finishes at eot_token (not included) or, with streams (one TextStream per row), when its
    stream sees a stop string (its ids then include the stop string's tokens; the stream's text is
    cut before it). Finished rows ride along in the batch until every row is done.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    out = [[] for _ in prompts]
    done = [False] * len(prompts)
    steps = generate_tokens(model, prompts, temperature, top_k, top_p, generator, use_cache)
    for _, (next_ids, _) in zip(range(max_new_tokens), steps):  # range first: no extra step at the end
        for row, token in enumerate(next_ids.tolist()):
            if done[row]:
                continue
            if token == eot_token:
                done[row] = True
                continue
            out[row].append(token)
            if streams is not None:
                streams[row].add(token)
                done[row] = streams[row].stopped
        if all(done):
            break
    for stream in streams or []:
        stream.finish()
    return out


def encode(tok, text: str) -> list[int]:
    """Text -> ids; for GPT-2, "<|endoftext|>" in the text becomes the eot token (a document break)."""
    if isinstance(tok, CharTokenizer):
        if missing := sorted(set(text) - set(tok.chars)):
            raise ValueError(
                f"characters {''.join(missing)!r} are not in this char checkpoint's vocabulary (its "
                f"training text's characters); remove them from the text, or use a GPT-2 checkpoint"
            )
        return tok.encode(text)
    return tok.encode(text, allowed_special={"<|endoftext|>"})


def complete(model, tok, prompts: list[list[int]], cfg, stop_strings=(), eot_token=None, echo=False):
    """Continue each prompt (token ids, one batch); return the new text of each row.

    The settings come from cfg (GenerateConfig). echo=True streams row 0 to stdout as it is made.
    """
    printer = (lambda chunk: print(chunk, end="", flush=True)) if echo else None
    streams = [TextStream(tok, stop_strings, printer if row == 0 else None) for row in range(len(prompts))]
    generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(cfg.seed)
    generate(model, prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_k or None, cfg.top_p, generator,
             eot_token=eot_token, streams=streams, use_cache=cfg.use_cache)  # fmt: skip
    return [s.text for s in streams]


# -----------------------------------------------------------------------------
# Chat: 07's instruction template around each message

CHAT_STOP_STRINGS = ("\n\n### ",)  # a model that goes on after its answer writes the next header


def chat_prompt(encode_text, message: str) -> list[int]:
    """A message as 07 trained on it: format_input(entry) + RESPONSE_HEADER, encoded in two parts as
    07 does (with BPE, encoding the joined string could merge tokens across the seam)."""
    return encode_text(format_input({"instruction": message, "input": ""})) + encode_text(RESPONSE_HEADER)


def chat(model, tok, cfg, stage: str) -> None:
    """An interactive loop; each message is a fresh single-turn prompt (Alpaca's template has no history).

    Answers end where 07 taught them to: at <|endoftext|> (GPT-2) or at a newline (char models,
    which have no end token), or at the next "### " header.
    """
    if stage not in ("finetune", "dpo"):
        print(f"note: this checkpoint's stage is {stage!r}; chat needs an instruction-tuned one (07 or 08)")
    encode_text, replaced = text_encoder(tok, cfg.unknown_char)  # char models lack '#' etc.: as 07
    print("chat: type a message; an empty line, /quit or Ctrl-D ends")
    while True:
        try:
            message = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if message in ("", "/quit", "/exit"):
            break
        prompt = chat_prompt(encode_text, message)
        print("model> ", end="", flush=True)
        complete(model, tok, [prompt], cfg, CHAT_STOP_STRINGS, end_token_id(tok), echo=True)
        print()
    if replaced:
        lacking = "".join(sorted(replaced))
        print(f"(characters outside the vocabulary, replaced by {cfg.unknown_char!r}: {lacking!r})")


# -----------------------------------------------------------------------------
# Evaluation: perplexity and bits per byte over strided windows


def strided_windows(n_tokens: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows (begin, end, n_scored) over a text of n_tokens tokens, every target scored once.

    Window inputs are ids[begin:end], targets ids[begin+1:end+1]; only the last n_scored targets
    count (the earlier ones were scored by the previous window, with less context). All windows
    have the same length T = min(block_size, n_tokens - 1) (so they batch); consecutive ends are
    `stride` apart, so every token after the first window is predicted with >= T - stride tokens of
    context. stride = T: disjoint windows (fast, less context); stride = 1: the most context.

    >>> strided_windows(10, 4, 2)       # targets 1..9
    [(0, 4, 4), (2, 6, 2), (4, 8, 2), (5, 9, 1)]
    """
    if n_tokens < 2:
        raise ValueError(f"need at least 2 tokens to score anything, got {n_tokens}: use a longer text")
    T = min(block_size, n_tokens - 1)
    if not 1 <= stride <= T:
        raise ValueError(f"stride must be in [1, {T}] (the window length), got {stride}")
    ends = list(range(T, n_tokens - 1, stride)) + [n_tokens - 1]
    windows, prev_end = [], 0
    for end in ends:
        if end > prev_end:
            windows.append((end - T, end, end - prev_end))
            prev_end = end
    return windows


@torch.no_grad()
def evaluate_text(model, tok, text: str, stride: int = 0, batch_size: int = 8) -> dict:
    """Perplexity and bits per byte of `text`: how surprised the model is by it.

    loss = mean negative log-likelihood per token (nats), perplexity = exp(loss), and
    bits_per_byte = total nats / ln 2 / UTF-8 bytes of the scored tokens. Perplexity depends on
    the tokenizer (a character is easier to guess than a word); bits per byte does not.
    GPT-2 texts start after an <|endoftext|>, so every token is scored; a character model has no
    such token and its first character is not scored. stride 0 means block_size // 2.
    batch_size windows share a forward pass (fewer when their logits would pass 2**27 numbers, 512 MB).
    """
    ids = encode(tok, text)
    if tok.eot_token is not None:
        ids = [tok.eot_token] + ids
    block_size = model.config.block_size
    windows = strided_windows(len(ids), block_size, stride or max(1, min(block_size, len(ids) - 1) // 2))
    data = torch.tensor(ids, device=model.lm_head.weight.device)
    T, V = windows[0][1] - windows[0][0], model.config.vocab_size
    batch_size = max(1, min(batch_size, 2**27 // (T * V)))  # GPT-2, T=1024: 2 windows per pass
    nats = 0.0
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]
        x = torch.stack([data[b:e] for b, e, _ in batch])  # (B, T)
        y = torch.stack([data[b + 1 : e + 1] for b, e, _ in batch])  # (B, T)
        logits = forward_cached(model, x).float()  # (B, T, V)
        nll = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # (B, T)
        n_scored = torch.tensor([n for *_, n in batch], device=x.device)[:, None]  # (B, 1)
        scored = torch.arange(x.size(1), device=x.device)[None] >= x.size(1) - n_scored  # (B, T) last n
        nats += nll[scored].sum().item()
    n_tokens = len(ids) - 1
    n_bytes = sum(len(token_bytes(tok, t)) for t in ids[1:])
    loss = nats / n_tokens
    return {"tokens": n_tokens, "bytes": n_bytes, "loss": loss, "perplexity": math.exp(loss),
            "bits_per_byte": nats / math.log(2) / n_bytes}  # fmt: skip


# -----------------------------------------------------------------------------
# Benchmark: tokens/s with and without the cache


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_generation(model, n_new: int, use_cache: bool, device: str, prompt_len: int = 16) -> list[float]:
    """Seconds at which each of n_new greedy tokens was ready (batch 1, random prompt)."""
    prompt = torch.randint(model.config.vocab_size, (prompt_len,)).tolist()
    steps = generate_tokens(model, [prompt], temperature=0, use_cache=use_cache)
    sync(device)
    t0, times = time.perf_counter(), []
    for _, (next_ids, _) in zip(range(n_new), steps):
        next_ids.tolist()  # wait for the token, as a streaming user would
        times.append(time.perf_counter() - t0)
    return times


def bench(cfg, device: str) -> None:
    """Print tokens/s with and without the cache, and ms per token early vs late (flat = O(1) per token)."""
    print(f"device {device}, {torch.get_num_threads()} threads, greedy, batch 1, prompt 16 tokens")
    print("ms/tok first->last: mean time per token over the first and the last 64 new tokens")
    print(f"{'model':>8} {'new':>5} {'cache tok/s':>12} {'no cache tok/s':>15} {'speedup':>8} "
          f"{'cache ms/tok first->last':>25} {'no cache ms/tok first->last':>28}")  # fmt: skip
    for preset in cfg.bench_presets.split(","):
        config = GPTConfig.from_preset(preset, vocab_size=50257)
        # room for 16 + 512 tokens without sliding: the timing should show the cache alone
        config = dataclasses.replace(config, block_size=max(config.block_size, 1024))
        model = GPT(config).to(device).eval()
        time_generation(model, 8, True, device)  # warm up (allocations, kernel selection)
        for n_new in (256, 512):
            row = {}
            for use_cache in (True, False):
                times = time_generation(model, n_new, use_cache, device)
                per_token = [b - a for a, b in zip([0.0] + times, times)]
                first, last = 1e3 * sum(per_token[:64]) / 64, 1e3 * sum(per_token[-64:]) / 64
                row[use_cache] = (n_new / times[-1], first, last)
            (c_tps, c_first, c_last), (n_tps, n_first, n_last) = row[True], row[False]
            cached, uncached = f"{c_first:.1f} -> {c_last:.1f}", f"{n_first:.1f} -> {n_last:.1f}"
            print(f"{preset:>8} {n_new:>5} {c_tps:>12,.1f} {n_tps:>15,.1f} {c_tps / n_tps:>7.1f}x "
                  f"{cached:>25} {uncached:>28}")  # fmt: skip


# -----------------------------------------------------------------------------
# Command line


@dataclass
class GenerateConfig:
    """Sample from, chat with, evaluate or benchmark a GPT (a checkpoint of 05-08, or OpenAI's GPT-2)."""

    ckpt: str = ""  # checkpoint of 05/06/07/08; "" = the newest out/**/ckpt.pt
    init_from: str = ""  # "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl": OpenAI's weights instead
    prompt: str = ""  # text to continue; "FILE:path" reads a file; "" = <|endoftext|> (GPT-2) or "\n"
    prompts_file: str = ""  # one prompt per line, generated together as one left-padded batch
    num_samples: int = 1  # samples per prompt (rows of the same batch)
    max_new_tokens: int = 500  # tokens to generate per sample
    temperature: float = 0.8  # 0 = greedy; < 1 sharper, > 1 more random
    top_k: int = 200  # sample among the k most likely tokens; 0 = no limit
    top_p: float = 1.0  # nucleus: the most likely tokens covering this probability; 1.0 = off
    seed: int = 1337  # sampling seed
    stop: str = ""  # stop strings, comma-separated; "\n" is a newline (e.g. --stop="\n\n,THE END")
    unknown_char: str = "?"  # chat with a char model: stands in for characters it lacks, as in 07
    use_cache: bool = True  # the KV cache (False: rerun the whole context per token)
    chat: bool = False  # interactive chat with an instruction-tuned checkpoint (07/08)
    eval_file: str = ""  # print perplexity and bits per byte of this text file instead of sampling
    eval_stride: int = 0  # evaluation windows advance by this many tokens; 0 = block_size // 2
    bench: bool = False  # benchmark tokens/s with and without the cache (random weights)
    bench_presets: str = "small,gpt2"  # GPTConfig presets to benchmark, comma-separated
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps
    dtype: str = "auto"  # autocast: auto (cuda: bfloat16, or float16 without bf16; else float32), ...

    def __post_init__(self):  # checked before loading anything (parse_config prints the error)
        check_sampling(self.temperature, self.top_k or None, self.top_p)
        if self.max_new_tokens < 0 or self.num_samples < 1:
            raise ValueError(f"need max_new_tokens >= 0 and num_samples >= 1, got "
                             f"{self.max_new_tokens} and {self.num_samples}")  # fmt: skip
        if self.ckpt and self.init_from:
            raise ValueError("pass either --ckpt (a checkpoint of ours) or --init_from (OpenAI's), not both")


def generation_dtype(dtype: str, device_type: str) -> str:
    """"auto" -> bfloat16 on CUDA GPUs that have it, float16 on older ones, float32 elsewhere.

    Unlike 05's pick_dtype, no bf16 on CPUs with fast bf16 matmuls: CPU runs stay exact, so a
    seed gives the same text on every machine (and the tests compare against fp32 references).
    """
    if dtype != "auto":
        return dtype
    if device_type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def newest_checkpoint(out_dir: Path = OUT_DIR) -> Path:
    """The most recently written out_dir/**/ckpt.pt: the run you just trained (05, 06, 07 or 08)."""
    found = sorted(Path(out_dir).rglob("ckpt.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(
            f"no checkpoint found under {Path(out_dir).resolve()}: train one first (python 05_pretrain.py), "
            f"or pass --ckpt=path/to/ckpt.pt, or --init_from=gpt2 for OpenAI's weights"
        )
    return found[-1]


def load_model(cfg, device: str):
    """(model in eval mode, tokenizer, checkpoint dict) from --init_from or --ckpt (default: newest)."""
    if cfg.init_from:
        model, tok = GPT.from_pretrained(cfg.init_from), get_tokenizer({"kind": "gpt2"})
        ckpt = {"stage": "pretrain", "tokenizer": {"kind": "gpt2"}}
        print(f"loaded OpenAI's {cfg.init_from}")
    else:
        path = Path(cfg.ckpt) if cfg.ckpt else newest_checkpoint()
        model, tok, ckpt = load_checkpoint(path, device)
        print(f"loaded {path} (stage {ckpt.get('stage', '?')}, iter {ckpt.get('iter_num', '?')})")
    return model.to(device).eval(), tok, ckpt


def read_prompts(cfg, tok) -> list[str]:
    """The batch's prompts as text: --prompts_file lines or --prompt, each repeated num_samples times."""
    if cfg.prompts_file:
        prompts = [line for line in Path(cfg.prompts_file).read_text(encoding="utf-8").splitlines() if line]
    elif cfg.prompt.startswith("FILE:"):
        prompts = [Path(cfg.prompt[5:]).read_text(encoding="utf-8")]
    else:
        prompts = [cfg.prompt or ("<|endoftext|>" if tok.eot_token is not None else "\n")]
    return [p for p in prompts for _ in range(cfg.num_samples)]


def main(argv=None):
    cfg = parse_config(GenerateConfig, argv)
    device = pick_device(cfg.device)
    device_type = device.split(":")[0]
    torch.manual_seed(cfg.seed)
    with autocast_context(device_type, generation_dtype(cfg.dtype, device_type)):
        if cfg.bench:
            return bench(cfg, device)
        model, tok, ckpt = load_model(cfg, device)
        if cfg.eval_file:
            text = Path(cfg.eval_file).read_text(encoding="utf-8")
            result = evaluate_text(model, tok, text, cfg.eval_stride)
            print(f"{cfg.eval_file}: {result['tokens']:,} tokens, {result['bytes']:,} bytes, loss "
                  f"{result['loss']:.4f}, perplexity {result['perplexity']:.3f}, "
                  f"bits per byte {result['bits_per_byte']:.4f}")  # fmt: skip
            return result
        if cfg.chat:
            return chat(model, tok, cfg, ckpt.get("stage", "pretrain"))
        stop_strings = [s.replace("\\n", "\n").replace("\\t", "\t") for s in cfg.stop.split(",") if s]
        prompts = read_prompts(cfg, tok)
        ids = [encode(tok, p) for p in prompts]
        if len(prompts) == 1:  # one sample: stream it as it is generated
            print(prompts[0], end="", flush=True)
            texts = complete(model, tok, ids, cfg, stop_strings, tok.eot_token, echo=True)
            print()
        else:
            texts = complete(model, tok, ids, cfg, stop_strings, tok.eot_token)
            for prompt, text in zip(prompts, texts):
                print(prompt + text + "\n" + "-" * 40)
        return texts


if __name__ == "__main__":
    main()
