"""Stage 12: from GPT-2 to today's open models (Llama 3, Qwen3), one change at a time.

04's GPT is GPT-2 (2019). The open models run today (Llama 3, Qwen3, SmolLM2, Mistral) are the
same decoder with these changes, each a setting of ModernConfig, so one file builds GPT-2-like,
Llama-3-like and Qwen3-like models: RMSNorm for LayerNorm; rotary position embeddings (RoPE) on
q and k for learned positions; a SwiGLU MLP for GELU, at the hidden size that keeps the parameter
count; grouped-query attention (n_kv_head < n_head: the KV cache shrinks n_head / n_kv_head
times); QK-norm (Qwen3); no biases; a tied or an untied head. Each is explained where it is built,
with what it costs. load_hf reads a Hugging Face folder of either architecture (config.json +
safetensors, with 04's reader) into this code; the tests check its logits against transformers'.
generate keeps n_kv_head heads in its KV cache, and the CLI prints the bytes per token it saves.

References: Zhang & Sennrich 2019 (RMSNorm); Su et al. 2021, RoFormer (RoPE); Shazeer 2020, "GLU
Variants Improve Transformer" (SwiGLU); Ainslie et al. 2023 (GQA); Touvron et al. 2023 (Llama,
Llama 2); Grattafiori et al. 2024 (Llama 3); Qwen Team 2025, Qwen3 Technical Report; Hugging
Face transformers' modeling_llama.py and modeling_qwen3.py, the reference the tests match.

Run it (DIR: a Hugging Face folder of a Llama or Qwen3 model, e.g. HuggingFaceTB/SmolLM2-135M or
Qwen/Qwen3-0.6B: config.json, *.safetensors, and tokenizer.json read by the tokenizers package):
  python 12_modern_gpt.py                  # each flavour: parameters, KV cache bytes per token
  python 12_modern_gpt.py --hf_dir=DIR --prompt="The capital of France is"   # a model on disk
  python 12_modern_gpt.py --hf_dir=DIR --device=cuda --max_new_tokens=100
"""

import argparse
import json
import math
import os
import struct
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Annotated, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

PROJECT = Path(__file__).resolve().parent  # a relative --hf_dir starts here

# -----------------------------------------------------------------------------
# The settings: each change from GPT-2 is one field; FLAVOURS are laptop-sized (4 layers, 128
# wide): what makes each the family it is named after is its settings, not its size.

@dataclass
class ModernConfig:
    """A decoder: GPT-2's (the defaults) or a modern one (FLAVOURS: llama3, qwen3)."""

    block_size: int = 256  # longest sequence (RoPE: max_position_embeddings)
    vocab_size: int = 50304  # GPT-2's 50257, padded to a multiple of 64
    n_layer: int = 4
    n_head: int = 8  # query heads
    n_kv_head: int = 8  # key/value heads; < n_head is GQA
    n_embd: int = 128
    head_size: int = 0  # 0 = n_embd // n_head (Qwen3 sets its own)
    norm: str = "layernorm"  # or "rmsnorm"
    norm_eps: float = 1e-5
    pos: str = "learned"  # or "rope"
    rope_theta: float = 10000.0  # RoPE's base: pair i turns theta^(-2i/head_size) per token
    mlp: str = "gelu"  # or "swiglu"
    mlp_hidden: int = 0  # 0 = 4 * n_embd (gelu), or swiglu_hidden()
    multiple_of: int = 32  # swiglu_hidden rounds up to this
    qk_norm: bool = False  # RMSNorm on each head's q and k
    bias: bool = True  # biases in Linear and LayerNorm
    tie_embeddings: bool = True  # lm_head shares wte's weight
    MODERN: ClassVar[dict] = dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False)
    FLAVOURS: ClassVar[dict[str, dict]] = {
        "gpt2": {},
        "llama3": dict(MODERN, rope_theta=5e5, n_kv_head=2, tie_embeddings=False),
        "qwen3": dict(MODERN, rope_theta=1e6, n_kv_head=4, qk_norm=True, norm_eps=1e-6),
    }  # fmt: skip

    def __post_init__(self):
        if self.head_size == 0 and self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                             "choose an n_head that divides it, or set head_size")
        self.head_size = self.head_size or self.n_embd // self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head="
                             f"{self.n_kv_head}: each key/value head serves a whole group "
                             "of query heads; choose an n_kv_head that divides n_head")
        if self.pos == "rope" and self.head_size % 2:
            raise ValueError(f"RoPE rotates pairs of numbers, and head_size="
                             f"{self.head_size} is odd; choose an even one")
        choices = dict(norm=("layernorm", "rmsnorm"), pos=("learned", "rope"),
                       mlp=("gelu", "swiglu"))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: choose one of {allowed}")
        if self.mlp_hidden == 0 and self.mlp == "swiglu":
            self.mlp_hidden = swiglu_hidden(self.n_embd, self.multiple_of)
        self.mlp_hidden = self.mlp_hidden or 4 * self.n_embd

    @classmethod
    def flavour(cls, name: str, **overrides):
        """FLAVOURS[name] with overrides: flavour("llama3", n_layer=2)."""
        return cls(**{**cls.FLAVOURS[name], **overrides})


# SwiGLU has three matrices where GELU's MLP has two (a gate beside the "up" projection), so at the
# same hidden size it has 1.5x the parameters. Keeping 8 C^2 means 3 C H = 8 C^2: H = 8C/3. Llama
# then rounds H up to a multiple of multiple_of (256 for Llama 2 7B: C=4096 gives 11008) so that
# the matmuls tile well on a GPU. A checkpoint states its size (intermediate_size): load_hf takes
# it as given; this function only sizes the models we build.
def swiglu_hidden(n_embd: int, multiple_of: int) -> int:
    """SwiGLU's hidden size with GELU-MLP's parameters: 8C/3, rounded up to multiple_of."""
    hidden = int(2 * 4 * n_embd / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


# -----------------------------------------------------------------------------
# The changes, one module each
#
# RMSNorm (Zhang & Sennrich 2019): LayerNorm subtracts the mean, divides by the standard deviation
# and adds a bias; RMSNorm only divides by the root mean square. Re-centring turned out not to
# matter, and RMSNorm is one reduction fewer. Computed in fp32 (a sum of squares overflows fp16)
# and cast back before the gain, as Hugging Face's Llama does, so bf16 outputs match theirs.
class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, over the last dimension."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x):
        x32 = x.float()
        mean_square = x32.pow(2).mean(-1, keepdim=True)
        normed = x32 * torch.rsqrt(mean_square + self.eps)
        return self.weight * normed.to(x.dtype)


def make_norm(config: ModernConfig, size: int) -> nn.Module:
    """The block's normalisation: 04's LayerNorm, or RMSNorm."""
    if config.norm == "rmsnorm":
        return RMSNorm(size, config.norm_eps)
    return nn.LayerNorm(size, eps=config.norm_eps, bias=config.bias)


# RoPE (Su et al. 2021): instead of adding a learned vector per position to the input (04's wpe),
# rotate each head's q and k. Pair dimension i with i + hs/2 and turn the pair by the angle
# pos * theta^(-2i/hs): fast turns in the first pairs, slow ones in the last. Since a rotation
# by a then by -b is a rotation by a - b, q_m . k_n depends on m - n only: attention sees relative
# distance, and there is no table of positions to learn. v is not rotated: it is what a token
# passes on, not how tokens find each other. theta sets the slowest turn, so the longest distance
# told apart: GPT-NeoX and Llama 2 use 10,000, Llama 3 500,000, Qwen3 1,000,000 (long contexts).
# The halves pairing is GPT-NeoX's and Hugging Face's (the paper and Meta's code pair neighbours
# 2i, 2i+1; HF's converter permutes q and k's weights): the same model up to that permutation.
# Cost: no parameters; a few elementwise ops per layer. The angles are made for the positions
# of each call (a generated token's: the number of tokens before it), in fp32, then x's dtype.
def rope_angles(positions, head_size: int, theta: float):
    """positions (T,) -> (cos, sin), each (T, head_size): the angle of every pair, twice."""
    pair = torch.arange(0, head_size, 2, device=positions.device)
    inv_freq = 1.0 / theta ** (pair.float() / head_size)  # (hs/2,)
    angles = positions.float()[:, None] * inv_freq[None]  # (T, hs/2)
    both_halves = torch.cat([angles, angles], dim=-1)  # (T, hs)
    return both_halves.cos(), both_halves.sin()


def apply_rope(x, cos, sin):
    """Rotate x (B, nh, T, hs): halves (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    x1, x2 = x.chunk(2, dim=-1)  # the two halves
    rotated_half = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated_half * sin.to(x.dtype)  # fp32 angles: bf16 q stays bf16


# Attention with the modern settings. Against 03's CausalSelfAttention:
# - GQA (Ainslie et al. 2023): c_attn makes n_head queries but only n_kv_head keys and values;
#   query head h reads key/value head h // (n_head / n_kv_head), so neighbouring query heads
#   share one (repeat_interleave; SDPA's enable_gqa=True does the same without the copy). Cost:
#   a little quality for a KV cache n_head / n_kv_head times smaller, which at inference is the
#   memory that limits batch size and context (Llama 3 8B: 32 query heads, 8 key/value heads).
#   n_kv_head == n_head is 04's multi-head attention; n_kv_head == 1 is multi-query attention.
# - QK-norm (Qwen3; Dehghani et al. 2023, with LayerNorm): an RMSNorm with a gain on each q and k,
#   before RoPE. q.k no longer grows with the q/k weights, a cause of loss spikes; cost: 2 norms.
# - cache (GroupedKVCache): the keys and values of earlier tokens, n_kv_head heads of them.
class Attention(nn.Module):
    """Causal self-attention with n_kv_head <= n_head key/value heads, RoPE and QK-norm."""

    def __init__(self, config: ModernConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_size = config.head_size
        self.q_size = config.n_head * config.head_size
        self.kv_size = config.n_kv_head * config.head_size
        C = config.n_embd
        self.c_attn = nn.Linear(C, self.q_size + 2 * self.kv_size, bias=config.bias)
        self.c_proj = nn.Linear(self.q_size, C, bias=config.bias)
        self.qk_norm = config.qk_norm
        if config.qk_norm:  # one gain per head dimension
            self.q_norm = RMSNorm(config.head_size, config.norm_eps)
            self.k_norm = RMSNorm(config.head_size, config.norm_eps)

    def forward(self, x, rope=None, cache=None, layer=0):
        B, T, C = x.size()
        sizes = [self.q_size, self.kv_size, self.kv_size]
        q, k, v = self.c_attn(x).split(sizes, dim=2)
        hs = self.head_size
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, hs).transpose(1, 2)  # (B, n_kv, T, hs)
        v = v.view(B, T, self.n_kv_head, hs).transpose(1, 2)  # (B, n_kv, T, hs)
        if self.qk_norm:  # each head's vector, before RoPE
            q = self.q_norm(q)
            k = self.k_norm(k)
        if rope is not None:  # q and k only
            q = apply_rope(q, *rope)
            k = apply_rope(k, *rope)
        if cache is not None:  # the earlier tokens' k, v, then these
            k, v = cache.update(layer, k, v)  # (B, n_kv, L, hs)
        group = self.n_head // self.n_kv_head
        k = k.repeat_interleave(group, dim=1)  # (B, nh, L, hs)
        v = v.repeat_interleave(group, dim=1)
        y = causal_attention(q, k, v)
        y = y.transpose(1, 2).reshape(B, T, self.q_size)
        return self.c_proj(y)


def causal_attention(q, k, v):
    """SDPA of T new queries over L keys: the last T keys are theirs, the others cached."""
    T = q.size(2)
    L = k.size(2)
    start = L - T  # the first new token's position
    if start == 0:  # no cache yet: the plain causal triangle
        return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
    # query i sits at position start + i and sees keys 0 .. start + i
    mask = torch.ones(T, L, dtype=torch.bool, device=q.device).tril(diagonal=start)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# SwiGLU (Shazeer 2020): silu(x W_gate) * (x W_up), then W_down. The gate decides, per hidden
# unit and per token, how much of the "up" value passes; it trains to a lower loss than GELU at
# the same parameters (3 matrices of H = 8C/3, see swiglu_hidden). c_fc holds W_gate and W_up
# side by side (one matmul), c_proj is W_down. Cost: one more elementwise product.
class MLP(nn.Module):
    """04's GELU MLP, or SwiGLU: c_proj(silu(gate) * up) with [gate, up] = c_fc(x)."""

    def __init__(self, config: ModernConfig):
        super().__init__()
        C = config.n_embd
        H = config.mlp_hidden
        self.swiglu = config.mlp == "swiglu"
        self.c_fc = nn.Linear(C, 2 * H if self.swiglu else H, bias=config.bias)  # SwiGLU: 2H
        self.c_proj = nn.Linear(H, C, bias=config.bias)

    def forward(self, x):
        h = self.c_fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return self.c_proj(F.silu(gate) * up)
        return self.c_proj(F.gelu(h, approximate="tanh"))


class Block(nn.Module):
    """04's pre-norm block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: ModernConfig):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = Attention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), rope, cache, layer)
        return x + self.mlp(self.ln_2(x))


# ModernGPT: 04's GPT with the settings above. The names stay 04's (transformer.wte, .h.0.attn,
# lm_head), so the diff reads line by line. No dropout: modern pretraining sees each token about
# once and uses none. No biases (bias=False, as PaLM and Llama): at scale they add almost nothing
# but a read and an add each, and PaLM found training more stable without them. Init is 04's:
# N(0, 0.02), residual projections (c_proj) scaled by 1/sqrt(2 * n_layer), norm gains 1. An untied
# head (Llama 3) costs vocab_size * n_embd parameters for its own output matrix; small ones tie.
class ModernGPT(nn.Module):
    """Embeddings -> blocks -> norm -> LM head; model(idx, targets) -> (logits, loss) as 04."""

    def __init__(self, config: ModernConfig):
        super().__init__()
        self.config = config
        C = config.n_embd
        blocks = [Block(config) for _ in range(config.n_layer)]
        layers = dict(wte=nn.Embedding(config.vocab_size, C),
                      h=nn.ModuleList(blocks), ln_f=make_norm(config, C))
        if config.pos == "learned":  # RoPE needs no table
            layers["wpe"] = nn.Embedding(config.block_size, C)
        self.transformer = nn.ModuleDict(layers)
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=residual_std)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None, cache=None):
        """idx (B, T) -> logits (B, T, V), loss; with a cache, idx are the new tokens only."""
        B, T = idx.shape
        start = 0 if cache is None else cache.length
        if start + T > self.config.block_size:
            raise ValueError(f"{start + T} positions exceed block_size="
                             f"{self.config.block_size}; crop the input")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.config.pos == "learned":
            x = x + self.transformer.wpe(pos)
        else:
            rope = rope_angles(pos, self.config.head_size, self.config.rope_theta)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, rope, cache, layer)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:  # in fp32, -100 skipped, as 04
            flat = logits.float().view(B * T, -1)
            loss = F.cross_entropy(flat, targets.reshape(B * T), ignore_index=-100)
        return logits, loss

    def num_params(self) -> int:
        """Parameters, a tied wte/lm_head counted once."""
        return sum(p.numel() for p in self.parameters())


# -----------------------------------------------------------------------------
# The KV cache, n_kv_head heads wide, and generation
#
# 03's KVCache keeps n_head heads; with GQA only n_kv_head exist, so only those are kept (the
# repeat to n_head happens after the cache, in the attention). Per token and layer it holds a key
# and a value of n_kv_head * head_size numbers: cache_bytes_per_token. Llama 3.1 8B in bf16:
# 2 * 32 layers * 8 heads * 128 * 2 bytes = 128 KiB per token, 16 GiB for 128K tokens of context;
# with 32 key/value heads (no GQA) it would be 64 GiB, more than the 16 GB of weights.
class GroupedKVCache:
    """Per layer: keys and values (B, n_kv_head, max_len, head_size); length: tokens so far."""

    def __init__(self, config: ModernConfig, max_len: int):
        self.k = [None] * config.n_layer
        self.v = [None] * config.n_layer
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k, v):
        """Write the new k, v (B, n_kv, T, hs) after the cached ones; return all so far."""
        if self.k[layer] is None:  # the first call allocates
            shape = (*k.shape[:2], self.max_len, k.size(3))
            self.k[layer] = k.new_zeros(shape)
            self.v[layer] = v.new_zeros(shape)
        end = self.length + k.size(2)
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        if layer == len(self.k) - 1:  # every layer has written this call's tokens: move on
            self.length = end
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def cache_bytes_per_token(config: ModernConfig, dtype_bytes: int = 2) -> int:
    """KV cache bytes one token takes: key + value, per layer, n_kv_head heads (bf16: 2 bytes)."""
    return config.n_layer * 2 * config.n_kv_head * config.head_size * dtype_bytes


@torch.no_grad()
def generate(model, idx, max_new_tokens: int, temperature: float = 0.0,
             use_cache: bool = True, stop_ids=(), generator=None):
    """Continue idx (B, T): greedy at temperature 0, else sampled; with or without the cache."""
    room = model.config.block_size - idx.size(1)  # for new tokens, after the prompt
    if max_new_tokens > room:
        fix = f"ask for at most {room} new tokens" if room > 0 else "shorten the prompt"
        raise ValueError(f"the prompt's {idx.size(1)} tokens leave room for {max(room, 0)} of the "
                         f"{max_new_tokens} new (block_size={model.config.block_size}); {fix}")
    cache = GroupedKVCache(model.config, idx.size(1) + max_new_tokens) if use_cache else None
    new_ids = idx  # what the next forward pass reads
    for _ in range(max_new_tokens):
        logits, _ = model(new_ids, cache=cache)
        last = logits[:, -1, :].float()  # (B, V)
        if temperature == 0:
            next_id = last.argmax(dim=-1, keepdim=True)
        else:
            probs = F.softmax(last / temperature, dim=-1)
            next_id = torch.multinomial(probs, 1, generator=generator)
        idx = torch.cat([idx, next_id], dim=1)
        new_ids = next_id if use_cache else idx  # cached: only the new token
        if next_id.numel() == 1 and next_id.item() in stop_ids:
            break
    return idx


# -----------------------------------------------------------------------------
# Hugging Face's Llama and Qwen3, loaded into this code
#
# Both architectures are ModernConfig with rmsnorm, rope, swiglu and no biases; Qwen3 adds QK-norm
# and states its head_dim. read_hf_config refuses, by name, every setting this file does not
# implement: silently ignoring one (Llama 3.1's "llama3" RoPE scaling, a sliding window) would give
# a model that loads and writes worse text, with no error anywhere.
# Their names map onto ours; q, k and v are stacked into c_attn, gate and up into c_fc.
HF_ARCHITECTURES = ("LlamaForCausalLM", "Qwen3ForCausalLM")
HF_LAYER_NAMES = {  # theirs: ours, in each layer
    "input_layernorm": "ln_1", "post_attention_layernorm": "ln_2",
    "self_attn.o_proj": "attn.c_proj", "mlp.down_proj": "mlp.c_proj",
    "self_attn.q_norm": "attn.q_norm", "self_attn.k_norm": "attn.k_norm",
}  # fmt: skip
HF_STACKED = {  # ours: theirs, stacked along the output dimension
    "attn.c_attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.c_fc": ("mlp.gate_proj", "mlp.up_proj"),
}
HF_FIELDS = {  # ours: config.json's
    "block_size": "max_position_embeddings", "vocab_size": "vocab_size",
    "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
    "n_embd": "hidden_size", "mlp_hidden": "intermediate_size", "norm_eps": "rms_norm_eps",
}  # fmt: skip


def read_hf_config(folder: Path) -> dict:
    """config.json; a ValueError names the first thing in it this file cannot read or implement."""
    path = folder / "config.json"
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:  # a cut download, a hand edit
        raise ValueError(f"{path} is not valid JSON ({e}); download it again") from None
    arch = (hf.get("architectures") or ["none"])[0]
    if arch not in HF_ARCHITECTURES:
        raise ValueError(f"{folder}: architecture {arch}; this file reads Llama and Qwen3 only")
    ropes = [hf.get("rope_parameters") or {}, hf.get("rope_scaling") or {}]  # new, old name
    rope_types = {rope.get("rope_type", rope.get("type", "default")) for rope in ropes}
    unsupported = {
        f"rope type {sorted(rope_types)}": rope_types != {"default"},
        f"hidden_act={hf.get('hidden_act')!r}": hf.get("hidden_act", "silu") != "silu",
        "attention_bias=true": hf.get("attention_bias", False),
        "mlp_bias=true": hf.get("mlp_bias", False),
        "use_sliding_window=true": hf.get("use_sliding_window", False),
    }
    for name, present in unsupported.items():
        if present:
            raise ValueError(f"{folder}: {name} is not implemented here; "
                             "this file reads plain Llama and Qwen3 models")
    for theirs in HF_FIELDS.values():  # each one hf_config reads
        if theirs not in hf:
            raise ValueError(f"{path} has no {theirs}; download it again")
    return hf


def hf_config(hf: dict) -> ModernConfig:
    """config.json's fields -> ModernConfig (after read_hf_config)."""
    settings = {ours: hf[theirs] for ours, theirs in HF_FIELDS.items()}
    rope = hf.get("rope_parameters") or {}  # older files: at the top
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    n_kv_head = hf.get("num_key_value_heads") or settings["n_head"]
    qwen3 = hf["architectures"][0] == "Qwen3ForCausalLM"
    tied = hf.get("tie_word_embeddings", False)
    head_size = hf.get("head_dim") or (128 if qwen3 else 0)  # transformers' defaults
    return ModernConfig(**settings, **ModernConfig.MODERN, rope_theta=theta, n_kv_head=n_kv_head,
                        head_size=head_size, qk_norm=qwen3, tie_embeddings=tied)


def hf_to_modern_state_dict(sd: dict, n_layer: int) -> dict:
    """A Hugging Face Llama/Qwen3 state dict in our names (lm_head: wte's when tied)."""
    out = {"transformer.wte.weight": sd["model.embed_tokens.weight"],
           "transformer.ln_f.weight": sd["model.norm.weight"]}
    for i in range(n_layer):
        theirs = f"model.layers.{i}."
        ours = f"transformer.h.{i}."
        for their_name, our_name in HF_LAYER_NAMES.items():
            key = theirs + their_name + ".weight"
            if key in sd:  # q_norm, k_norm: Qwen3 only
                out[ours + our_name + ".weight"] = sd[key]
        for our_name, parts in HF_STACKED.items():
            stacked = [sd[theirs + p + ".weight"] for p in parts]
            out[ours + our_name + ".weight"] = torch.cat(stacked)
    out["lm_head.weight"] = sd.get("lm_head.weight", out["transformer.wte.weight"])
    return out


def read_hf_weights(folder: Path) -> dict:
    """Every tensor of a folder: model.safetensors, or a big model's shards."""
    names = {"model.safetensors"}
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # a big model's shards: model-00001-of-00002.safetensors, ...
        names = set(json.loads(index.read_text())["weight_map"].values())
    missing = sorted(name for name in names if not (folder / name).is_file())
    if missing:  # an interrupted download lacks some
        raise ValueError(f"{folder}: no {', '.join(missing)}; download the model's weights")
    tensors = {}
    for name in sorted(names):
        tensors.update(load_safetensors(folder / name))
    return tensors


# load_hf builds the model on the "meta" device (shapes only) and takes the checkpoint's tensors as
# its own (assign=True), as 04's from_pretrained does; a tied head is tied again after. Weights
# come as stored (often bf16) and are cast to dtype: float32 by default, the reference's precision.
def load_hf(path, dtype=torch.float32) -> ModernGPT:
    """A Hugging Face Llama or Qwen3 folder (config.json + safetensors) -> ModernGPT, eval mode."""
    folder = PROJECT / path  # an absolute path stays as it is
    config = hf_config(read_hf_config(folder))
    with torch.device("meta"):
        model = ModernGPT(config)
    try:  # a tensor missing or of another shape: the weights are not config.json's model
        sd = hf_to_modern_state_dict(read_hf_weights(folder), config.n_layer)
        model.load_state_dict(sd, assign=True)
    except (KeyError, RuntimeError) as e:  # load_state_dict's: a heading, a line per tensor
        raise ValueError(f"{folder}: the weights do not match config.json "
                         f"({str(e).splitlines()[-1].strip()}); download the model again") from None
    if config.tie_embeddings:  # assign=True untied them
        model.lm_head.weight = model.transformer.wte.weight
    return model.to(dtype).eval()


# -----------------------------------------------------------------------------
# Command line

@dataclass
class ModernRunConfig:
    """Load a Llama/Qwen3 folder and continue a prompt, or compare the flavours' sizes."""

    hf_dir: Annotated[str, 'a Hugging Face folder (relative: from 12\'s); "" = sizes'] = ""
    prompt: Annotated[str, "the text to continue"] = "The meaning of life is"
    max_new_tokens: Annotated[int, "tokens to generate"] = 50
    temperature: Annotated[float, "0 = likeliest token; higher = more random"] = 0.0
    use_cache: Annotated[bool, "reuse past keys and values (KV cache)"] = True
    seed: Annotated[int, "the random seed for sampling"] = 1337
    device: Annotated[str, "auto = cuda > mps > cpu; or name one"] = "auto"

    def __post_init__(self):  # checked before any work
        self.device = pick_device(self.device)
        if self.max_new_tokens < 1:
            raise ValueError("--max_new_tokens must be 1 or more")
        if not self.temperature >= 0:  # nan too
            raise ValueError("--temperature must be 0 or more")
        if not self.prompt:
            raise ValueError("--prompt is empty: give the model some text to continue")
        folder = PROJECT / self.hf_dir
        # the architecture before tokenizer.json: 10's GPT-2 export is a Hugging Face folder too
        if self.hf_dir and (folder / "config.json").is_file():
            read_hf_config(folder)
        for needed in ("config.json", "tokenizer.json"):
            if self.hf_dir and not (folder / needed).is_file():
                raise ValueError(f"--hf_dir={self.hf_dir}: no {needed} in {folder}; "
                                 "give a Hugging Face model folder")


def print_flavours() -> None:
    """Each flavour at laptop size: parameters and KV cache bytes per token (bf16)."""
    for name in ModernConfig.FLAVOURS:
        config = ModernConfig.flavour(name)
        per_token = cache_bytes_per_token(config)
        mha = cache_bytes_per_token(replace(config, n_kv_head=config.n_head))  # all heads kept
        print(f"{name:7s} {ModernGPT(config).num_params():>11,} parameters, KV cache "
              f"{per_token:,} bytes/token with {config.n_kv_head} kv heads "
              f"({mha:,} with {config.n_head})")


def hf_tokenizer(folder: Path):
    """The folder's tokenizer.json, read by Hugging Face's tokenizers package."""
    try:
        from tokenizers import Tokenizer  # optional: only --prompt needs it
        return Tokenizer.from_file(str(folder / "tokenizer.json"))
    except ImportError:
        raise ValueError("--prompt needs the tokenizers package: pip install tokenizers") from None
    except Exception as e:  # tokenizers' error for a file it cannot parse is a plain Exception
        raise ValueError(f"{folder / 'tokenizer.json'}: {e}; download it again") from None


def continue_prompt(cfg) -> str:
    """Load cfg.hf_dir, continue cfg.prompt, print and return the text."""
    folder = PROJECT / cfg.hf_dir
    tok = hf_tokenizer(folder)
    model = load_hf(folder).to(cfg.device)
    print(f"loaded {folder.name}: {model.num_params():,} parameters, "
          f"{model.config.n_head} query heads, {model.config.n_kv_head} kv heads, "
          f"KV cache {cache_bytes_per_token(model.config):,} bytes/token in bf16 (fp32: twice)")
    eos = read_hf_config(folder).get("eos_token_id")
    stop_ids = eos if isinstance(eos, list) else [eos]
    idx = torch.tensor([tok.encode(cfg.prompt).ids], device=cfg.device)
    generator = torch.Generator(cfg.device).manual_seed(cfg.seed)
    out = generate(model, idx, cfg.max_new_tokens, cfg.temperature,
                   cfg.use_cache, stop_ids, generator)
    text = tok.decode(out[0].tolist())
    print(text)
    return text


def main(argv=None):
    cfg = parse_config(ModernRunConfig, argv)  # bad flags: one line, exit 2
    try:
        if not cfg.hf_dir:
            return print_flavours()
        return continue_prompt(cfg)
    except ValueError as e:  # another architecture, a missing file
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # loading or generating takes a while: one line, no traceback
        print("\nCtrl-C: stopped", file=sys.stderr)
        sys.exit(130)  # 128 + SIGINT, a shell's status for a Ctrl-C


# -----------------------------------------------------------------------------
# Appendix: pieces copied unchanged from earlier stages, so that this file runs on its own.


# copied from 04_gpt.py: SAFETENSORS_DTYPES
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


# copied from 04_gpt.py: load_safetensors
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


# copied from 04_gpt.py: parse_config
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


# copied from 04_gpt.py: pick_device
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


if __name__ == "__main__":
    main()
