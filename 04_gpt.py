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
  - the loss: cross-entropy computed in fp32, with -100 marking the targets to skip;
  - counting: parameters (124,439,808 for GPT-2 small) and training FLOPs per token (6N plus
    attention), the numerator of model FLOPs utilisation (MFU), which 05 measures against a GPU's peak;
  - generate(): greedy, temperature, top-k; 09 tells the full story of generation;
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
  python 04_gpt.py --init_from=gpt2 --prompt="Hello, I'm a language model,"   # downloads 0.5 GB once
  python 04_gpt.py --init_from=gpt2 --device=cuda   # the same on one GPU
  python 04_gpt.py --help
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

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))  # tokens talk to each other
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

    def forward(self, idx, targets=None):
        """Logits for every position, and the mean cross-entropy loss when targets are given.

        idx: (B, T) token ids, T <= block_size. targets: (B, T), the next token at each position;
        -100 marks positions to skip (padding, the prompt when finetuning). Pad sequences of unequal
        lengths on the right: causal attention keeps right pads away from every real token, and
        their -100 targets keep them out of the loss, so no attention mask is needed.
        Returns (logits (B, T, vocab_size), loss or None).
        """
        self._check_input(idx)
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C) + (T, C) -> (B, T, C)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            # the log-softmax over 50k logits in fp32, whatever dtype they come in (bf16 under autocast)
            loss = F.cross_entropy(logits.float().view(B * T, -1), targets.reshape(B * T), ignore_index=-100)
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
        MFU = flops_per_token * tokens per second / the hardware's peak FLOP/s.
        """
        T = self.config.block_size if seq_len is None else seq_len
        L, C = self.config.n_layer, self.config.n_embd
        return 6 * self.num_params(non_embedding=True) + 12 * L * C * T


@torch.no_grad()
def generate(model, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None):
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
        logits, _ = model(idx[:, -model.config.block_size :])
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


# -----------------------------------------------------------------------------
# OpenAI's weights: read safetensors, rename, load

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
        raise FileNotFoundError(f"{path} does not exist; check the path (from_pretrained downloads it)")
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
    """Rename (and transpose) a Hugging Face GPT-2 state dict into our GPT's names.

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


def from_pretrained(model_type: str, cache_dir) -> "GPT":
    """GPT-2 with OpenAI's weights: "gpt2" (124M), "gpt2-medium", "gpt2-large" or "gpt2-xl".

    Downloads Hugging Face's model.safetensors once into cache_dir/<model_type>/ (0.5 to 6 GB).
    The model is built on the "meta" device (shapes only, no memory, no random init) and then
    takes the checkpoint's tensors as its own, so gpt2-xl never exists twice in memory.
    """
    names = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
    if model_type not in names:
        raise ValueError(f"unknown pretrained model {model_type!r}; choose one of {names}")
    url = f"https://huggingface.co/{model_type}/resolve/main/model.safetensors"
    path = download(url, Path(cache_dir) / model_type / "model.safetensors", sha256=None)  # no hash pinned
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset(model_type))  # vocab 50257, block 1024, bias, no dropout
    model.load_state_dict(hf_to_gpt_state_dict(load_safetensors(path)), assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # assign=True gave them two Parameters: re-tie
    return model


# -----------------------------------------------------------------------------
# Demo: count, then sample


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    # a user error is one line that names the fix, not argparse's usage dump
    parser.error = lambda message: parser.exit(2, f"error: {message}\n")
    pretrained = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
    parser.add_argument("--preset", default="gpt2", choices=sorted(GPTConfig.PRESETS),
                        help="model to count parameters of")
    parser.add_argument("--init_from", default="scratch", choices=("scratch", *pretrained),
                        help="weights to sample from: a random tiny model, or OpenAI's (downloaded once)")
    parser.add_argument("--prompt", default="Hello, I'm a language model,", help="text to continue")
    parser.add_argument("--max_new_tokens", type=int, default=30, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy; <1 sharper, >1 flatter")
    parser.add_argument("--top_k", type=int, default=50, help="sample among the k likeliest tokens; 0 = all")
    parser.add_argument("--seed", type=int, default=1337, help="random seed (weights and sampling)")
    parser.add_argument("--device", default="auto", help="auto (cuda, mps, then cpu), cpu, cuda, cuda:1, mps")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0 or args.temperature < 0 or args.top_k < 0:
        parser.error("--max_new_tokens, --temperature and --top_k must be >= 0")
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    device = next(d for d, ok in available.items() if ok) if args.device == "auto" else args.device
    kind, _, index = device.partition(":")
    bad_index = index and not (index.isdigit() and int(index) < torch.cuda.device_count())
    if not available.get(kind) or bad_index:
        here = ", ".join(d for d, ok in available.items() if ok)
        parser.error(f"--device={device} is not available on this machine; use one of: {here}")
    if kind == "cuda":  # TF32 matmuls: ~8x the fp32 throughput on Ampere+, precision ample for inference
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)

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
        data_dir = Path(__file__).resolve().parent / "data"
        model, what = from_pretrained(args.init_from, cache_dir=data_dir), f"OpenAI's {args.init_from}"
    model.to(device).eval()
    idx = torch.tensor([enc.encode(args.prompt)], device=device)
    out = generate(model, idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None)
    print(f"\nsample from {what} on {device}:\n{enc.decode(out[0].tolist())}")


# -----------------------------------------------------------------------------
# Appendix: pieces copied unchanged from earlier stages, so that this file runs on its own.
# Each is its origin's text byte for byte (tests/test_copies.py checks); read them there.

# copied from 03_attention.py: CausalSelfAttention
class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention whose core is F.scaled_dot_product_attention (SDPA).

    c_attn computes q, k and v of every head in one matmul; a reshape makes the heads a batch
    dimension; SDPA computes softmax(q k^T / sqrt(hs)) v under the causal mask in one call; c_proj
    mixes the heads' outputs. On GPU, SDPA runs FlashAttention or the memory-efficient kernel: they
    walk over blocks of keys with a running softmax, so the (T, T) score matrix never exists in
    memory. 03_attention.py builds this step by step and times it against the manual version.

    x: (B, T, n_embd) -> (B, T, n_embd).
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if n_head <= 0 or n_embd % n_head != 0:
            raise ValueError(
                f"n_embd={n_embd} is not divisible by n_head={n_head}: every head gets n_embd // n_head "
                f"channels, so choose an n_head that divides n_embd (GPT-2: n_embd=768, n_head=12)"
            )
        self.n_embd, self.n_head = n_embd, n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)  # q, k, v of all heads in one matmul
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)  # mixes the heads' outputs
        self.attn_dropout_p = dropout  # SDPA takes dropout on the weights as an argument
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        dropout_p = self.attn_dropout_p if self.training else 0.0
        # is_causal lets the kernel skip the blocks above the diagonal instead of masking them
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


# copied from 01_tokenizer.py: download
def download(url: str, path, sha256: str | None = None, timeout: float = 30) -> Path:
    """Download url to path: streamed, written to path + ".tmp", checked, then renamed.

    sha256 pins the exact bytes we expect; with None (no published hash, e.g. Hugging Face's
    weights) we check the byte count the server announced. A file already at path (with the right
    hash, when one is given) is not downloaded again. On an HTTP error or a bad file we raise and
    leave no file behind, so a half-written download is never mistaken for the real one.
    """
    path, digest = Path(path), hashlib.sha256()
    if path.exists() and sha256:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    if path.exists() and (sha256 is None or digest.hexdigest() == sha256):
        return path  # a download gets this name only once it is complete and checked
    path.unlink(missing_ok=True)  # corrupt or outdated: never leave it where a good file is expected
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, digest, done, t0 = path.with_suffix(path.suffix + ".tmp"), hashlib.sha256(), 0, time.perf_counter()
    try:
        # identity: a gzip-encoded response would make the byte count differ from Content-Length
        with requests.get(url, stream=True, timeout=timeout, headers={"Accept-Encoding": "identity"}) as r:
            r.raise_for_status()
            total = int(r.headers.get("content-length", 0))
            with open(tmp, "wb") as f:
                for block in r.iter_content(chunk_size=1 << 20):
                    f.write(block)
                    digest.update(block)
                    done += len(block)
                    if total > 1 << 24:  # progress for big files (> 16 MB): MB done, rate, time left
                        rate, end = done / (time.perf_counter() - t0), "\n" if done == total else ""
                        print(f"\r{path.name}: {done >> 20:,}/{total >> 20:,} MB, {rate / 2**20:.1f} MB/s, "
                              f"~{(total - done) / rate:.0f} s left ", end=end, flush=True)
        if total and done != total:
            raise RuntimeError(f"download of {url} stopped after {done} of {total} bytes; retry")
        if sha256 and digest.hexdigest() != sha256:
            raise ValueError(f"sha256 mismatch for {url}: expected {sha256}, got {digest.hexdigest()}; "
                             "retry; if it persists the file changed upstream: check it and update the hash, "
                             f"or put the expected file in {path.parent} by hand")
        os.replace(tmp, path)
    except requests.RequestException as e:
        raise RuntimeError(f"download of {url} failed: {e}; check the URL and your network, "
                           f"or put the file at {path} by hand") from e
    finally:
        tmp.unlink(missing_ok=True)
    return path


if __name__ == "__main__":
    main()
