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
  - counting: parameters (124,439,808 for GPT-2 small) and training FLOPs per token (6N +
    attention), the numerator of model FLOPs utilisation (MFU), which 05 sets against a GPU's peak;
  - generate(): greedy, temperature, top-k; 09 tells the full story of generation;
  - loading OpenAI's GPT-2 weights: Hugging Face's model.safetensors read by a hand-written
    safetensors reader, with the names mapped onto ours (their Conv1D weights are transposed);
  - running it: settings as --field=value flags, a device, a precision (later stages copy these).

References:
  - Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2).
  - Vaswani et al. 2017, "Attention Is All You Need"; Hendrycks & Gimpel 2016, GELU.
  - Kaplan et al. 2020 (6N FLOPs per token), Chowdhery et al. 2022 (PaLM, appendix B: MFU).
  - karpathy/nanoGPT model.py, whose names and structure this file follows.
  - The safetensors format: https://github.com/huggingface/safetensors#format

Run it:
  python 04_gpt.py                                  # parameter counts of GPT-2 small + a sample
  python 04_gpt.py --preset=gpt2-xl                 # counts for the 1.5B model (built on "meta")
  python 04_gpt.py --init_from=gpt2 --prompt="Hello, I'm a language model,"  # 0.5 GB, once
  python 04_gpt.py --init_from=gpt2 --device=cuda   # the same on one GPU
  python 04_gpt.py --help
"""

import argparse
import hashlib
import json
import math
import os
import struct
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Annotated

import requests
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# The model
#
# GPTConfig holds the handful of numbers that define a GPT; its defaults are GPT-2 small (124M),
# and GPT_PRESETS holds the four GPT-2 sizes (Radford et al. 2019, table 2) plus two small ones for
# a laptop. The presets live beside the class, not in it, so that the stages that only load a
# checkpoint copy a small GPTConfig. Presets take overrides:
#     preset_config("gpt2-medium").n_layer == 24
#     preset_config("tiny", vocab_size=65).vocab_size == 65
# GPT-2 trained with dropout 0.1; pretraining on lots of data needs none, finetuning on a little
# data may want 0.1 or more. bias=False (no biases in Linear and LayerNorm) is a bit faster and as
# good. A bad shape fails here, at construction, with the fix in the message.


@dataclass
class GPTConfig:
    """The numbers that define a GPT: the defaults are GPT-2 small (124M); GPT_PRESETS: others."""

    block_size: int = 1024  # longest sequence the model can see (number of learned positions)
    vocab_size: int = 50257  # GPT-2's BPE: 50,000 merges + 256 bytes + <|endoftext|>
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block; each head has n_embd // n_head dimensions
    n_embd: int = 768  # width of the residual stream
    dropout: float = 0.0  # 0 for pretraining (GPT-2 used 0.1); try 0.1+ when finetuning small data
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2; False is a bit faster and as good
    gelu: str = "tanh"  # GPT-2's approximation; "none": exact (erf), faster on many CPUs (see MLP)

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:  # not isinstance: True is an int too
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                             f"choose an n_head dividing n_embd (e.g. n_embd={self.n_head * 64})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")


GPT_PRESETS = {  # preset_config's choices
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),  # nanoGPT shakespeare-char
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64),  # tests and quick demos
}


def preset_config(name: str, **overrides) -> GPTConfig:
    """GPTConfig of the preset name, with overrides (which win): "gpt2", ..., "tiny"."""
    if name not in GPT_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(GPT_PRESETS)}")
    return GPTConfig(**{**GPT_PRESETS[name], **overrides})


# MLP: position-wise, each token on its own; most of a block's parameters live here (8 * n_embd^2
# of its 12 * n_embd^2). GPT-2's GELU is the tanh approximation (Hendrycks & Gimpel 2016; cheaper in
# 2019), the default here so that OpenAI's weights give their outputs. 05 trains from scratch with
# the exact GELU (erf), as nanoGPT: within 0.0005 of it, and 2.5x faster on an AVX2 CPU.
class MLP(nn.Module):
    """Position-wise feed-forward: widen 4x, GELU, project back. (B, T, C) -> (B, T, C)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        C = config.n_embd
        self.c_fc = nn.Linear(C, 4 * C, bias=config.bias)
        self.gelu = nn.GELU(approximate=config.gelu)  # "tanh" (GPT-2) or "none" (exact)
        self.c_proj = nn.Linear(4 * C, C, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C)


# Block, pre-LayerNorm: normalising the input of each branch (not its output, as the 2017
# transformer did) leaves the residual stream an untouched sum from embedding to output, so
# gradients flow straight through and deep stacks train stably (Xiong et al. 2020). GPT-2 moved
# the LayerNorm there (and added the final ln_f that our GPT applies after the last block).
class Block(nn.Module):
    """One transformer block, pre-LayerNorm: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        C = config.n_embd
        self.ln_1 = nn.LayerNorm(C, bias=config.bias)
        self.attn = CausalSelfAttention(C, config.n_head, config.dropout, config.bias)
        self.ln_2 = nn.LayerNorm(C, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))  # tokens talk to each other
        return x + self.mlp(self.ln_2(x))  # each token thinks on its own


# GPT: the module names are nanoGPT's (transformer.wte, .h.0.attn.c_attn, lm_head), so the state
# dict lines up with OpenAI's checkpoint. For example:
#     model = GPT(preset_config("tiny", vocab_size=100))
#     logits, loss = model(torch.randint(100, (2, 8)), targets=torch.randint(100, (2, 8)))
#     logits.shape == (2, 8, 100), and loss starts near ln(100) = 4.6
# - Weight tying (Press & Wolf 2017): the matrix that maps a token to a vector also scores vectors
#   against tokens. One Parameter, two uses, its gradient the sum of both; it saves 38.6M of GPT-2
#   small's 124M parameters.
# - GPT-2's init: weights N(0, 0.02), biases 0. Each block adds two branch outputs (attn, mlp) into
#   the residual stream, so its variance grows with depth; the last projection of each branch
#   (c_proj) is shrunk by 1/sqrt(2 * n_layer) to keep the sum's scale independent of depth.
# - forward: targets of -100 are skipped by the loss (padding; the prompt when finetuning). Pad
#   sequences of unequal lengths on the RIGHT: causal attention keeps right pads away from every
#   real token and their -100 targets keep them out of the loss, so no attention mask is needed.
#   The log-softmax over 50k logits runs in fp32, whatever dtype they come in (bf16 under autocast).
# - _check_input turns bad input into a message with the fix. subtle: checking the id range reads
#   the ids, which makes the CPU wait for a GPU, and torch.compile would break its graph there; so
#   only eager CPU tensors are checked (elsewhere an out-of-range id fails inside the embedding,
#   with a less helpful message).
# - num_params counts the tied wte/lm_head once (parameters() yields a shared tensor once):
#   124,439,808 for GPT-2 small. non_embedding=True leaves out the position embedding: a table
#   lookup costs no FLOPs (the token embedding stays in: as the LM head it is a real matmul).
class GPT(nn.Module):
    """GPT-2: embeddings -> n_layer blocks -> LayerNorm -> LM head (tied to the token embedding)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embedding
            wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embedding
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying: one Parameter, two uses
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)  # GPT-2's residual projections
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=residual_std)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None):
        """idx, targets: (B, T) ids and next ids (-100: skip) -> logits (B, T, vocab_size), loss."""
        self._check_input(idx)
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)  # (T,)
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        pos_emb = self.transformer.wpe(pos)  # (T, C)
        x = self.transformer.drop(tok_emb + pos_emb)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        loss = None
        if targets is not None:  # in fp32 whatever the logits' dtype (bf16 under autocast)
            logits_fp32 = logits.float().view(B * T, -1)  # (B * T, vocab_size)
            loss = F.cross_entropy(logits_fp32, targets.reshape(B * T), ignore_index=-100)
        return logits, loss

    def _check_input(self, idx):
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"idx must be a (B, T) tensor of integer ids, not {tuple(idx.shape)} "
                             f"{idx.dtype}; one sequence: idx[None]; other dtypes: idx.long()")
        block_size = self.config.block_size
        if idx.size(1) > block_size:
            raise ValueError(f"sequence length {idx.size(1)} exceeds block_size={block_size} (no "
                             f"position embedding beyond it); crop it: idx[:, -{block_size}:]")
        # eager CPU only: reading ids makes the CPU wait for a GPU, and breaks torch.compile's graph
        eager_cpu = idx.device.type == "cpu" and not torch.compiler.is_compiling()
        if eager_cpu and ((idx < 0) | (idx >= self.config.vocab_size)).any():
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got ids from "
                             f"{idx.min().item()} to {idx.max().item()}; the tokenizer and the "
                             "model disagree: set GPTConfig.vocab_size to its n_vocab")

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters (tied wte/lm_head once); non_embedding: without wpe (a lookup, no FLOPs)."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n


# flops_per_token: a matmul with a weight of N parameters costs 2N FLOPs per token forward (a
# multiply and an add per weight) and 4N backward (gradients for the input and for the weight): 6N.
# Attention adds matmuls with no weights, QK^T and att @ V, 2 * T * C each per layer forward, so
# 12 * n_layer * T * C for forward + backward (PaLM's appendix B; we count the full T x T even
# though the causal mask makes half of it zeros, as everyone does).
def flops_per_token(model: GPT, seq_len: int | None = None) -> int:
    """Training FLOPs per token at context seq_len: 6N (weights) + 12 L T C (attention)."""
    config = model.config
    T = config.block_size if seq_len is None else seq_len
    weights = 6 * model.num_params(non_embedding=True)
    attention = 12 * config.n_layer * T * config.n_embd
    return weights + attention


# generate: each new token is fed back as input. temperature=0 is greedy (argmax); otherwise the
# logits / temperature are sampled, < 1 sharper, > 1 flatter; top_k keeps only the k most likely
# tokens. The context is cropped to the last block_size tokens (the model has no positions beyond).
# Call model.eval() first to turn dropout off. There is no KV cache: each step reruns the whole
# context; 03's step 7 has the cache, 07 answers with it, and 09 tells the full story of generation.
@torch.no_grad()
def generate(model, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None):
    """Append max_new_tokens tokens to idx (B, T); temperature 0 = greedy; top_k: k likeliest."""
    if not temperature >= 0 or (top_k is not None and top_k <= 0):  # nan too
        raise ValueError("need temperature >= 0 (0 = greedy) and top_k a positive integer or "
                         f"None, got temperature={temperature}, top_k={top_k}")
    for _ in range(max_new_tokens):
        context = idx[:, -model.config.block_size :]  # the last block_size tokens
        logits, _ = model(context)  # (B, T, vocab_size)
        logits = logits[:, -1, :]  # (B, vocab_size): the last position
        if temperature == 0:
            idx_next = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        else:
            logits = logits / temperature
            if top_k is not None:
                k = min(top_k, logits.size(-1))
                kth = torch.topk(logits, k).values[:, [-1]]  # (B, 1): the k-th largest
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)  # (B, vocab_size)
            idx_next = torch.multinomial(probs, num_samples=1)  # (B, 1)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


# -----------------------------------------------------------------------------
# OpenAI's weights: read safetensors, rename, load
#
# A .safetensors file is a length, a JSON header and raw bytes; that is the whole format:
#     [8 bytes: N, little-endian uint64][N bytes: JSON header][data]
#     header = {"wte.weight": {"dtype": "F32", "shape": [50257, 768],  # e.g.; any order
#                              "data_offsets": [0, 154389504]},
#               ..., "__metadata__": {...}}   # offsets are relative to the start of the data
# Each tensor is its bytes in row-major, little-endian order (every common machine is
# little-endian, so torch.frombuffer reads them as they are). No code runs while loading, unlike
# a pickled .bin checkpoint, which is why Hugging Face moved to this format. The reader checks
# every offset against the file, reads the tensors in file order, each into its own buffer, and
# refuses the dtypes it does not know (SAFETENSORS_DTYPES: safetensors' names -> torch dtypes).
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def load_safetensors(path) -> dict[str, torch.Tensor]:
    """Read a .safetensors file: [N: 8-byte little-endian uint64][N bytes of JSON][tensors]."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise ValueError(f"{path} is {size} bytes, too short for safetensors; re-download it")
        (header_len,) = struct.unpack("<Q", f.read(8))
        if 8 + header_len > size:
            raise ValueError(f"{path}: header length {header_len} > file size; re-download it")
        header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        start = 8 + header_len  # the data begins here; the offsets count from it
        tensors = {}
        in_file_order = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
        for name, info in in_file_order:
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, which this "
                                 f"reader does not support; it knows {sorted(SAFETENSORS_DTYPES)}")
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            nbytes = math.prod(info["shape"]) * dtype.itemsize
            if end - begin != nbytes or start + end > size:
                raise ValueError(f"{path}: {name} has inconsistent offsets; the file is corrupt")
            f.seek(start + begin)
            buffer = bytearray(nbytes)
            f.readinto(buffer)
            # torch.frombuffer refuses an empty buffer
            flat = torch.frombuffer(buffer, dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)
            tensors[name] = flat.view(info["shape"])
    return tensors


# Hugging Face's GPT-2 keeps OpenAI's TensorFlow layout: a "Conv1D" computes x @ W with W of
# shape (in, out), where nn.Linear computes x @ W.T with W of shape (out, in). Those weights get
# transposed. hf_to_gpt_state_dict maps "h.0.attn.c_attn.weight" (768, 2304) to
# "transformer.h.0.attn.c_attn.weight" (2304, 768). Keys come with or without the "transformer."
# prefix (checkpoints differ). The attention-mask buffers "attn.bias" / "attn.masked_bias" of old
# checkpoints are constants, not weights: dropped (subtle: the leading dot matters,
# "h.0.attn.c_attn.bias" also ends with "attn.bias"). lm_head.weight is the tied wte.weight when
# the checkpoint leaves it out.
HF_TRANSPOSED = (".c_attn.weight", ".c_fc.weight", ".c_proj.weight")  # c_proj: attn's and mlp's
GPT2_SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # OpenAI's four, as HF names them


def hf_to_gpt_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face GPT-2 state dict in our names; Conv1D weights (HF_TRANSPOSED) transposed."""
    out = {}
    for name, tensor in sd.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # mask buffers, not weights: skip
        if name.endswith(HF_TRANSPOSED):
            tensor = tensor.t()
        if not name.startswith(("transformer.", "lm_head.")):  # present or not: checkpoints differ
            name = "transformer." + name
        out[name] = tensor.contiguous()
    if "transformer.wte.weight" not in out:
        raise ValueError(f"no wte.weight in {sorted(sd)[:5]}...: is this a GPT-2 checkpoint?")
    out.setdefault("lm_head.weight", out["transformer.wte.weight"])  # tied: often left out
    return out


# from_pretrained downloads Hugging Face's model.safetensors once into cache_dir/<model_type>/
# (0.5 to 6 GB; no pinned hash, so download checks the byte count). The model is built on the
# "meta" device (shapes only, no memory, no random init) and then takes the checkpoint's tensors
# as its own (assign=True): no second, random copy (the transposed projections, most of the
# weights, are held twice, briefly). assign=True gives wte and lm_head two Parameters: tied again.
def from_pretrained(model_type: str, cache_dir) -> "GPT":
    """GPT-2 with OpenAI's weights: "gpt2" (124M), "gpt2-medium", "gpt2-large" or "gpt2-xl"."""
    if model_type not in GPT2_SIZES:
        raise ValueError(f"unknown pretrained model {model_type!r}; choose one of {GPT2_SIZES}")
    url = f"https://huggingface.co/{model_type}/resolve/main/model.safetensors"
    path = Path(cache_dir) / model_type / "model.safetensors"
    if not path.exists():  # to data/gpt2.safetensors first: the folder appears once it is whole
        fetched = download(url, path.parent.with_suffix(".safetensors"))  # no hash pinned
        os.renames(fetched, path)  # makes the folder: a failed download leaves none behind
    with torch.device("meta"):  # shapes only: no memory, no random init
        model = GPT(preset_config(model_type))  # vocab 50257, block 1024, bias, no dropout
    state_dict = hf_to_gpt_state_dict(load_safetensors(path))
    model.load_state_dict(state_dict, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # assign=True untied them: tie again
    return model


# -----------------------------------------------------------------------------
# Running the model: settings from the command line, a device, a precision (05-13 copy these).
#
# A dataclass is the single list of a script's settings: each field, with its type and help text
# (`n_layer: Annotated[int, "transformer blocks"] = 4`, PEP 593), becomes a --field=value flag
# (parse_config), a checkpoint can store it (asdict), and its __post_init__ checks a command line
# before any work, so a mistake costs one line, not a traceback after minutes. Flags are
# generated, not written: a new setting is one line. Two choices protect a user's work: no
# abbreviations (argparse would take --max_iter for --max_iters and silently start another run),
# and a bare bool flag means true (--compile is --compile=true).


def parse_config(cls, argv=None):
    """The dataclass cls from the command line: a --field=value flag per Annotated field (bools
    also bare), cls.PRESETS first if any; a ValueError from cls is one `error:` line, exit 2."""

    def to_bool(text: str) -> bool:
        if text.lower() not in ("1", "true", "yes", "0", "false", "no"):
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        return text.lower() in ("1", "true", "yes")

    presets = getattr(cls, "PRESETS", {})
    description = (cls.__doc__ or "").split("\n")[0]
    epilog = "".join(f"preset {name}: {values}\n" for name, values in presets.items())
    parser = argparse.ArgumentParser(description=description, epilog=epilog, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(cls):  # `n_layer: Annotated[int, "transformer blocks"] = 4`
        kind = f.type.__origin__  # int
        meaning = f.type.__metadata__[0]  # "transformer blocks"
        help_text = f"{meaning} (default: {f.default!r})".replace("%", "%%")  # argparse %-formats
        options = dict(type=kind, metavar=kind.__name__, help=help_text)
        if kind is bool:  # a bare --compile means --compile=true
            options.update(type=to_bool, nargs="?", const=True)
        # absent flags stay absent: the preset or the default fills them in
        parser.add_argument(f"--{f.name}", default=argparse.SUPPRESS, **options)
    # a user error is one line, not argparse's usage dump
    parser.error = lambda message: parser.exit(2, f"error: {message} (see --help)\n")
    known, unknown = parser.parse_known_args(argv)
    if unknown:  # a typo gets the closest flag: --lerning_rate=1 (did you mean --learning_rate?)
        import difflib  # imported here: the files that copy parse_config need no new import
        flags = [f"--{f.name}" for f in fields(cls)]
        close = difflib.get_close_matches(unknown[0].split("=")[0], flags, n=1)
        hint = f"did you mean {close[0]}?" if close else "see --help"
        parser.exit(2, f"error: unrecognized arguments: {' '.join(unknown)} ({hint})\n")
    given = vars(known)
    preset = given.get("preset", getattr(cls, "preset", None))
    try:
        if presets and preset not in presets:
            raise ValueError(f"--preset={preset!r} is not valid; use {', '.join(presets)}")
        return cls(**{**presets.get(preset, {}), **given})  # the flags given win over the preset
    except (ValueError, OSError) as e:  # OSError: a missing file, a folder, no permission
        parser.exit(2, f"error: {e}\n")


def pick_device(device: str = "auto") -> str:
    """"auto" -> cuda if there is a GPU, else mps (Apple silicon), else cpu; others are checked."""
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": torch.backends.mps.is_available()}
    if device == "auto":
        return next(kind for kind in ("cuda", "mps", "cpu") if available[kind])
    kind, _, index = device.partition(":")  # "cuda:1" -> "cuda", "1"
    if kind not in available or (index and not index.isdigit()):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:<index> or mps")
    no_such_gpu = kind == "cuda" and index and int(index) >= torch.cuda.device_count()
    if not available[kind] or no_such_gpu:
        raise ValueError(f"device {device!r} is not available on this machine; use --device=auto")
    return device


# Precision. bf16 keeps fp32's exponent range, so it trains as is; fp16's range is narrow, and small
# gradients underflow to 0 unless the loss is scaled up first (a GradScaler, on CUDA only here).
# Pre-Ampere GPUs emulate bf16, slowly, and PyTorch counts emulation as support unless asked for
# native support. On CPU fp32 is exact and fast enough for small models (bf16 measured slower on
# some CPUs, 2-3x faster on others: no default may depend on which one a run lands on). Under
# autocast the weights stay fp32, the master copy AdamW updates (a bf16 weight cannot absorb an
# update 1000x smaller than itself); matmuls run in bf16/fp16, softmax, norms and the loss in fp32.
def pick_dtype(dtype: str, device: str) -> str:
    """"auto" -> bfloat16 on CUDA GPUs that do it natively (compute capability 8.0+), float16 on
    older ones (with a GradScaler), float32 on CPU and MPS. Explicit choices are checked."""
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype={dtype!r} is not valid; use auto, float32, bfloat16, float16")
    cuda = torch.device(device).type == "cuda"
    if dtype == "float16" and not cuda:
        raise ValueError("--dtype=float16 needs loss scaling (CUDA only); use bfloat16 or float32")
    if dtype != "auto":
        return dtype
    if not cuda:
        return "float32"
    native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    return "bfloat16" if native_bf16 else "float16"


def autocast_context(device_type: str, dtype: str):
    """Mixed precision for the forward pass: torch.autocast in dtype, or nothing for float32."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))

# MFU (model FLOPs utilisation, PaLM appendix B) = the FLOPs the model needs per second (above:
# flops_per_token x tokens/s) / the hardware's peak. A GPU's peak depends on its exact model (an
# "H100" does 756, 835 or 989 TFLOP/s in bf16: PCIe, NVL or SXM) and on the dtype. CPUs have none
# that training comes near (a timed matmul read 0.7 to 2.1 TFLOP/s from run to run on one machine),
# so there the training stages print tokens/s, unless told a peak.
def peak_flops(device: str, dtype: str, override: float = 0) -> float | None:
    """FLOP/s to measure MFU against: override if > 0, else a known GPU's dense datasheet peak for
    dtype (bf16/fp16: tensor cores; float32: TF32 if torch has it on, else fp32), else None."""
    if override > 0 or torch.device(device).type != "cuda":
        return override or None
    tflops = {  # dense TFLOP/s, NVIDIA's datasheets (whose headlines are often 2:4 sparse: 2x)
        "NVIDIA H100 80GB HBM3": (989, 495, 67), "NVIDIA H200": (989, 495, 67),  # the SXM ones
        "NVIDIA H100 PCIe": (756, 378, 51), "NVIDIA H100 NVL": (835, 418, 60),
        "NVIDIA A100-SXM4-80GB": (312, 156, 19.5), "NVIDIA A100-SXM4-40GB": (312, 156, 19.5),
        "NVIDIA A100 80GB PCIe": (312, 156, 19.5), "NVIDIA A100-PCIE-40GB": (312, 156, 19.5),
        "NVIDIA L40S": (362, 183, 91.6), "NVIDIA L40": (181, 90.5, 90.5),
        "NVIDIA L4": (121, 60, 30.3), "NVIDIA GeForce RTX 4090": (165, 82.6, 82.6),
        "NVIDIA GeForce RTX 3090": (71, 35.6, 35.6), "Tesla V100-SXM2-16GB": (125, 0, 15.7),
        "Tesla V100-SXM2-32GB": (125, 0, 15.7), "Tesla T4": (65, 0, 8.1),  # no bf16, no TF32
    }  # fmt: skip
    half, tf32, fp32 = tflops.get(torch.cuda.get_device_name(device), (0, 0, 0))  # 0: not listed
    peak = half
    if dtype == "float32":  # TF32: fp32 matmuls on the tensor cores, at half their bf16 rate
        peak = tf32 if tf32 and torch.backends.cuda.matmul.allow_tf32 else fp32
    return peak * 1e12 or None  # None: a GPU the table does not know


# -----------------------------------------------------------------------------
# Demo: count, then sample

@dataclass
class SampleConfig:
    """Count a GPT-2's parameters and FLOPs; sample from a random tiny GPT or OpenAI's weights."""

    preset: Annotated[str, "model to count: gpt2 .. gpt2-xl, small, tiny"] = "gpt2"
    init_from: Annotated[str, "scratch (random tiny GPT) or OpenAI's gpt2 .. gpt2-xl"] = "scratch"
    prompt: Annotated[str, "text to continue"] = "Hello, I'm a language model,"
    max_new_tokens: Annotated[int, "tokens to generate"] = 30
    temperature: Annotated[float, "0 = greedy; < 1 sharper, > 1 flatter"] = 0.8
    top_k: Annotated[int, "sample among the k likeliest tokens; 0 = all"] = 50
    seed: Annotated[int, "random seed (weights and sampling)"] = 1337
    device: Annotated[str, "auto (cuda, mps, then cpu), cpu, cuda, cuda:1, mps"] = "auto"
    dtype: Annotated[str, "auto (bf16 or fp16 on CUDA, else fp32), float32, bfloat16"] = "auto"
    save_ckpt: Annotated[bool, "write OpenAI's model to data_dir/<init_from>/ckpt.pt"] = False
    data_dir: Annotated[str, "OpenAI's weights are cached here (relative to this script)"] = "data"

    def __post_init__(self):  # a ValueError here is one `error:` line from parse_config
        choices = {"preset": GPT_PRESETS, "init_from": ("scratch", *GPT2_SIZES)}
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"--{name}={value!r} is not valid; use {', '.join(allowed)}")
        if not all(v >= 0 for v in (self.max_new_tokens, self.temperature, self.top_k)):
            raise ValueError("--max_new_tokens, --temperature and --top_k must be >= 0")
        if not 0 <= self.seed < 2**63:  # torch's generator takes 64 bits
            raise ValueError(f"--seed={self.seed}: use an integer in [0, 2**63)")
        self.data_path = Path(__file__).resolve().parent / self.data_dir  # an absolute one: kept
        if self.init_from != "scratch" and self.data_path.is_file():  # (no field: asdict skips it)
            raise ValueError(f"--data_dir={self.data_dir} is a file; use a folder (default: data)")
        if self.save_ckpt and self.init_from == "scratch":
            raise ValueError("--save_ckpt saves OpenAI's model: use --init_from=gpt2 .. gpt2-xl")
        self.device = pick_device(self.device)
        self.dtype = pick_dtype(self.dtype, self.device)


def params_by_component(model: GPT) -> dict[str, int]:
    """Parameter counts grouped the way one thinks about the model; they sum to num_params()."""
    labels = {  # a part of a parameter's name -> its group
        "wte": "token embedding (wte, tied with lm_head)", "wpe": "position embedding (wpe)",
        "attn": "attention (all blocks)", "mlp": "MLP (all blocks)", "ln_": "LayerNorms",
    }
    groups = dict.fromkeys(labels.values(), 0)
    for name, p in model.named_parameters():  # the tied weight appears once, as transformer.wte
        label = next(label for part, label in labels.items() if part in name)
        groups[label] += p.numel()
    return groups


def main(argv=None):
    try:  # OpenAI's weights take minutes to download: a Ctrl-C is one line, no traceback
        demo(parse_config(SampleConfig, argv))
    except KeyboardInterrupt:  # download() and --save_ckpt remove their .tmp files
        print("\nCtrl-C: stopped", file=sys.stderr)
        sys.exit(130)  # 128 + SIGINT, a shell's status for a Ctrl-C


def demo(cfg: SampleConfig):  # main's work, its settings checked before any of it
    if cfg.device.startswith("cuda"):  # TF32 matmuls: up to 8x fp32's (A100, H100), ample here
        torch.backends.cuda.matmul.allow_tf32 = True  # cuDNN's (convolutions): on by default
    torch.manual_seed(cfg.seed)

    # Counting needs no memory: "meta" tensors have shapes but no storage, so gpt2-xl is instant.
    with torch.device("meta"):
        model = GPT(preset_config(cfg.preset))
    print(f"{cfg.preset}: {model.config}")
    n_params = model.num_params()
    for name, n in params_by_component(model).items():
        print(f"  {name:<42} {n:>14,} {n / n_params:>6.1%}")
    print(f"  {'total (tied weights counted once)':<42} {n_params:>14,}")
    total = flops_per_token(model) / 1e9
    weights = 6 * model.num_params(non_embedding=True) / 1e9
    print(f"training FLOPs per token at T={model.config.block_size}: {total:.2f} GFLOP "
          f"(weights 6N: {weights:.2f}, attention: {total - weights:.2f})")

    import tiktoken  # imported here: counting parameters needs no tokenizer
    try:  # offline, or a damaged file: one line naming it, no traceback, nothing left behind
        enc = tiktoken.get_encoding("gpt2")  # tiktoken downloads GPT-2's BPE files once
        if cfg.init_from == "scratch":
            model = GPT(preset_config("tiny"))
            what = "a random 'tiny' model (expect gibberish)"
        else:
            model = from_pretrained(cfg.init_from, cache_dir=cfg.data_path)
            what = f"OpenAI's {cfg.init_from}"
    except (OSError, RuntimeError, ValueError) as e:  # OSError: requests' errors, a path's
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if cfg.save_ckpt:  # OpenAI's weights enter once, here; later stages load it (05's format)
        path = cfg.data_path / cfg.init_from / "ckpt.pt"
        tmp = cfg.data_path / cfg.init_from / "ckpt.pt.tmp"
        path.parent.mkdir(parents=True, exist_ok=True)
        checkpoint = {"model": model.state_dict(), "model_args": asdict(model.config),
                      "stage": "openai", "tokenizer": {"kind": "gpt2"}, "config": asdict(cfg),
                      "iter_num": 0, "val_loss": None, "best_val_loss": None}
        try:
            torch.save(checkpoint, tmp)
            os.replace(tmp, path)  # atomic: a file at path is always a whole checkpoint
        finally:  # a Ctrl-C or a full disk mid-save leaves no partial .tmp behind
            tmp.unlink(missing_ok=True)
        print(f"saved {path}: python 07_finetune.py --init_from={cfg.init_from} finetunes it")
    model.to(cfg.device).eval()
    ids = enc.encode(cfg.prompt, disallowed_special=()) or [enc.eot_token]  # "": none; typed: text
    idx = torch.tensor([ids], device=cfg.device)
    top_k = cfg.top_k or None  # 0 = all tokens
    with autocast_context(torch.device(cfg.device).type, cfg.dtype):
        out = generate(model, idx, cfg.max_new_tokens, temperature=cfg.temperature, top_k=top_k)
    print(f"\nsample from {what} on {cfg.device} ({cfg.dtype}):\n{enc.decode(out[0].tolist())}")


# -----------------------------------------------------------------------------
# Appendix: pieces copied unchanged from earlier stages, so that this file runs on its own.
# Each is its origin's text byte for byte (tests/test_copies.py checks); read them there.

# copied from 03_attention.py: CausalSelfAttention
class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention by scaled_dot_product_attention: (B, T, C) -> (B, T, C)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if n_head <= 0 or n_embd % n_head != 0:  # each head gets n_embd // n_head channels
            raise ValueError(f"n_embd={n_embd} is not divisible by n_head={n_head}; choose an "
                             "n_head that divides n_embd (GPT-2: 768 and 12)")
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)  # q, k, v of all heads in one matmul
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)  # mixes the heads' outputs
        self.attn_dropout_p = dropout  # SDPA takes dropout on the weights as an argument
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        hs = C // self.n_head  # head size
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        dropout_p = self.attn_dropout_p if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): the heads side by side again
        return self.resid_dropout(self.c_proj(y))


# copied from 01_tokenizer.py: download
def download(url: str, path, sha256: str | None = None, timeout: float = 30) -> Path:
    """Download url to path, unless a good file is there: streamed to path + ".tmp", checked,
    renamed. sha256=None: no pinned hash (Hugging Face's weights); the byte count is checked."""
    path = Path(path)
    if path.exists():  # ours get this name only once checked; a bad one is the user's: never lost
        if sha256 is None or hashlib.sha256(path.read_bytes()).hexdigest() == sha256:
            return path
        raise ValueError(f"{path} is not the file expected (its sha256 differs): move it away")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    digest = hashlib.sha256()
    done = 0  # bytes written so far
    t0 = time.perf_counter()
    headers = {"Accept-Encoding": "identity"}  # the raw bytes, no gzip
    try:
        with requests.get(url, stream=True, timeout=timeout, headers=headers) as response:
            response.raise_for_status()
            total = int(response.headers.get("content-length", 0))  # exact: identity encoding
            with open(tmp, "wb") as f:
                for block in response.iter_content(chunk_size=1 << 20):
                    done += f.write(block)
                    digest.update(block)
                    if total > 1 << 24:  # progress for big files (> 16 MB)
                        rate = done / (time.perf_counter() - t0)  # bytes/s
                        megabytes = f"{done >> 20:,}/{total >> 20:,} MB"
                        seconds_left = (total - done) / rate
                        end = "\n" if done == total else ""  # the last report ends the line
                        print(f"\r{path.name}: {megabytes}, {rate / 2**20:.1f} MB/s, "
                              f"~{seconds_left:.0f} s left ", end=end, flush=True)
        if total and done != total:
            raise RuntimeError(f"download of {url} stopped after {done} of {total} bytes; retry")
        got = digest.hexdigest()
        if sha256 and got != sha256:
            raise ValueError(f"sha256 mismatch for {url}: expected {sha256}, got {got}; retry; "
                             "if it persists the file changed upstream: check it and update the "
                             f"hash, or put the expected file in {path.parent} by hand")
        os.replace(tmp, path)
    except requests.RequestException as e:
        raise RuntimeError(f"download of {url} failed: {e}; check the URL and your network, "
                           f"or put the file at {path} by hand") from e
    finally:
        tmp.unlink(missing_ok=True)
    return path


if __name__ == "__main__":
    main()
