"""Stage 4: the GPT-2 model, whole, and OpenAI's weights loaded into it.

03 built causal self-attention. Here it becomes a language model: token and position embeddings,
a stack of pre-LayerNorm transformer blocks (attention, then a GELU MLP, each wrapped in a
residual connection), a final LayerNorm, and a linear "LM head" that turns each position's vector
into one score (logit) per vocabulary entry. The LM head shares its weight matrix with the token
embedding (weight tying), which saves 38.6M of GPT-2's 124M parameters.

What this file teaches, top to bottom:
  - GPTConfig: the handful of numbers that define a GPT (GPT-2's four sizes are presets);
  - MLP, Block, GPT, in nanoGPT's names, so the state dict lines up with OpenAI's checkpoint;
  - GPT-2's initialisation: std 0.02, residual projections scaled by 1/sqrt(2 * n_layer);
  - counting: parameters (124,439,808 for GPT-2 small) and FLOPs per token (6N + attention),
    and model FLOPs utilisation (MFU) against a peak;
  - a small generate() (greedy, temperature, top-k); 09 tells the full story of generation;
  - loading OpenAI's GPT-2 weights: Hugging Face's model.safetensors read by a hand-written
    safetensors reader, with the names mapped onto ours (their Conv1D weights are transposed).

References:
  - Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2).
  - Vaswani et al. 2017, "Attention Is All You Need"; Hendrycks & Gimpel 2016, GELU.
  - Kaplan et al. 2020 (6N FLOPs per token), Chowdhery et al. 2022 (PaLM, appendix B: MFU).
  - karpathy/nanoGPT model.py, whose names and structure this file follows.
  - The safetensors format: https://github.com/huggingface/safetensors#format

Run it:
  python 04_gpt.py                                  # parameter counts of GPT-2 small + a sample
  python 04_gpt.py --preset=gpt2-xl                 # counts for the 1.5B model (built on "meta")
  python 04_gpt.py --init_from=gpt2 --prompt="Hello, I'm a language model,"   # needs network
  python 04_gpt.py --init_from=gpt2 --device=cuda   # the same on one GPU
  python 04_gpt.py --bench                          # forward+backward tokens/s and MFU on CPU
"""

import argparse
import hashlib
import json
import math
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import requests
import torch
import torch.nn as nn
import torch.nn.functional as F

DATA_DIR = Path(__file__).resolve().parent / "data"


# -----------------------------------------------------------------------------
# From 03_attention.py


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


# -----------------------------------------------------------------------------
# The model


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


# -----------------------------------------------------------------------------
# OpenAI's weights: download, read safetensors, rename

HF_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


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


# safetensors dtype names -> torch dtypes
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


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


# Hugging Face's GPT-2 keeps OpenAI's TensorFlow layout: a "Conv1D" computes x @ W with W of shape
# (in, out), where nn.Linear computes x @ W.T with W of shape (out, in). Those weights get transposed.
HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


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
# Demo and benchmark


def params_by_component(model: GPT) -> dict[str, int]:
    """Parameter counts grouped the way one thinks about the model; they sum to num_params()."""
    labels = {  # the first part found in a parameter's name decides its group
        "wte": "token embedding (wte, tied with lm_head)",
        "wpe": "position embedding (wpe)",
        "attn": "attention (all blocks)",
        "mlp": "MLP (all blocks)",
        "ln_": "LayerNorms",
    }
    groups = dict.fromkeys(labels.values(), 0)
    for name, p in model.named_parameters():  # the tied weight appears once, as transformer.wte
        groups[next(label for part, label in labels.items() if part in name)] += p.numel()
    return groups


def measure_matmul_flops(device: str = "cpu", n: int = 2048, repeats: int = 5) -> float:
    """The best fp32 FLOP/s of an n x n matmul on this device: a practical peak to measure MFU by."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first one warms up
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench(device: str, iters: int):
    """Forward+backward tokens/s of a small model and of GPT-2 small, with MFU against a measured peak."""
    peak = measure_matmul_flops(device)
    print(f"device {device}, {torch.get_num_threads()} threads, fp32 matmul peak {peak / 1e9:,.1f} GFLOP/s")
    print(f"{'model':>8} {'params':>8} {'B x T':>8} {'ms/iter':>9} {'tokens/s':>9} {'MFU':>6}")
    for preset, B, T in [("small", 8, 128), ("gpt2", 2, 64)]:
        model = GPT(GPTConfig.from_preset(preset)).to(device)
        idx = torch.randint(model.config.vocab_size, (B, T), device=device)
        times = []
        for _ in range(iters + 1):  # the first iteration warms up (allocations, kernel selection)
            _sync(device)
            t0 = time.perf_counter()
            _, loss = model(idx, targets=idx)
            loss.backward()
            model.zero_grad(set_to_none=True)
            _sync(device)
            times.append(time.perf_counter() - t0)
        dt = min(times[1:])
        mfu = model.estimate_mfu(B * T, dt, peak_flops=peak, seq_len=T)
        shape, params = f"{B}x{T}", f"{model.num_params() / 1e6:.1f}M"
        print(f"{preset:>8} {params:>8} {shape:>8} {dt * 1e3:>9.1f} {B * T / dt:>9,.0f} {mfu:>6.1%}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    presets, pretrained = sorted(GPTConfig.PRESETS), ("scratch", *HF_MODELS)
    parser.add_argument("--preset", default="gpt2", choices=presets, help="model to count parameters of")
    parser.add_argument("--init_from", default="scratch", choices=pretrained, help="weights to sample from")
    parser.add_argument("--prompt", default="Hello, I'm a language model,", help="text to continue")
    parser.add_argument("--max_new_tokens", type=int, default=30, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy; <1 sharper, >1 flatter")
    parser.add_argument("--top_k", type=int, default=50, help="sample among the k most likely tokens")
    parser.add_argument("--seed", type=int, default=1337, help="random seed (weights and sampling)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    parser.add_argument("--bench", action="store_true", help="benchmark forward+backward instead")
    parser.add_argument("--bench_iters", type=int, default=3, help="timed iterations per benchmark model")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    if args.bench:
        return bench(args.device, args.bench_iters)

    # Counting needs no memory: "meta" tensors have shapes but no storage, so even gpt2-xl is instant.
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset(args.preset))
    print(f"{args.preset}: {model.config}")
    for name, n in params_by_component(model).items():
        print(f"  {name:<42} {n:>14,} {n / model.num_params():>6.1%}")
    print(f"  {'total (tied weights counted once)':<42} {model.num_params():>14,}")
    total, weights = model.flops_per_token(), 6 * model.num_params(non_embedding=True)
    print(
        f"training FLOPs per token at T={model.config.block_size}: {total / 1e9:.2f} GFLOP "
        f"(weights 6N: {weights / 1e9:.2f}, attention: {(total - weights) / 1e9:.2f})"
    )

    import tiktoken  # imported here: counting parameters needs no tokenizer

    enc = tiktoken.get_encoding("gpt2")
    if args.init_from == "scratch":
        model, what = GPT(GPTConfig.from_preset("tiny")), "a random 'tiny' model (expect gibberish)"
    else:
        model, what = GPT.from_pretrained(args.init_from), f"OpenAI's {args.init_from}"
    model.to(args.device).eval()
    idx = torch.tensor([enc.encode(args.prompt)], device=args.device)
    out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)
    print(f"\nsample from {what}:\n{enc.decode(out[0].tolist())}")


if __name__ == "__main__":
    main()
