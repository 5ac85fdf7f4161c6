"""Stage 3: attention, from five lines to the kernel a GPU runs.

Attention is how a token gathers information from the other tokens of its sequence: each token asks
a question (query), every token offers a label (key) and a content (value); the token takes an
average of the values, weighted by how well its query matches each key. Everything else in a GPT
block is per-token; attention is the only place where tokens talk to each other.

This file builds it in five steps, each adding one idea (read top to bottom), then two extras:

1. `simple_self_attention`: no weights at all, scores are dot products of the inputs themselves.
2. `SelfAttention`: trainable query/key/value projections, scores scaled by 1/sqrt(head size).
3. `CausalAttention`: a mask so a token never sees the future (what a language model needs),
   and dropout on the attention weights.
4. Multi-head attention: `MultiHeadAttentionWrapper` stacks independent heads (easy to read, slow);
   `MultiHeadAttention` computes all heads with one fused qkv matrix and a reshape (same maths).
5. `CausalSelfAttention`: the same through `F.scaled_dot_product_attention`, which on GPU runs
   FlashAttention / memory-efficient kernels that never store the T x T score matrix. This is the
   class 04_gpt.py and the stages up to 11 use (12 writes its own, with RoPE; 13 copies it).
6. `PaddedCausalSelfAttention`: a padding mask for batches of unequal lengths, and why the later
   stages, which pad on the right, do not need one.
7. `KVCache`: attention at inference, one new token at a time over the cached keys and values of
   the tokens before it (what 09 generates with, 10 serves with, 11 scores through).

With the same weights, steps 4 and 5 compute the same function (and one head of step 4 is step
3); the tests check it to 1e-5. `--bench` measures what step 5 buys: time and peak memory.

References:
- Vaswani et al. 2017, "Attention Is All You Need" (scaled dot-product and multi-head attention).
- Radford et al. 2019, GPT-2 report; karpathy/nanoGPT model.py (the names c_attn, c_proj).
- Raschka, "Build a Large Language Model (From Scratch)", chapter 3 (steps 1-4; SDPA: its bonus).
- Dao et al. 2022, "FlashAttention" (why not materialising the score matrix saves memory and time).

Commands:
    python 03_attention.py          # demo: shapes, the causal mask, versions agree, padding, cache
    python 03_attention.py --bench  # manual attention vs SDPA: time and peak memory
    python 03_attention.py --bench --device=cuda --seq_lens=128,512,2048,8192   # one GPU
    python 03_attention.py --help
"""

import argparse
import difflib
import math
import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Step 1: self-attention without weights


def simple_self_attention(x: torch.Tensor) -> torch.Tensor:
    """Each output is an average of all inputs, weighted by how similar they are to this input.

    x: (T, C) or (B, T, C) -> (same shape). Example with two orthogonal tokens:
    x = [[1, 0], [0, 1]] -> scores = x x^T = [[1, 0], [0, 1]] -> each row softmaxed to
    [e/(e+1), 1/(e+1)] ~ [0.73, 0.27] -> token 0 becomes 0.73 * x0 + 0.27 * x1 = [0.73, 0.27].
    No parameters, so nothing can be learned: a token's "question" and "answer" are both itself.
    """
    scores = x @ x.transpose(-2, -1)  # (B, T, T): scores[i, j] = <x_i, x_j>
    weights = torch.softmax(scores, dim=-1)  # (B, T, T): every row sums to 1
    return weights @ x  # (B, T, C): row i = sum_j weights[i, j] * x_j


# -----------------------------------------------------------------------------
# Step 2: trainable projections, scaled scores


class SelfAttention(nn.Module):
    """Self-attention with learned query, key and value projections (one head).

    Three linear maps give every token three different roles: a query q = W_q x ("what am I
    looking for"), a key k = W_k x ("what do I contain") and a value v = W_v x ("what I hand over").
    weights = softmax(q k^T / sqrt(d_out)), output = weights v.

    Why divide by sqrt(d_out): for random q, k with unit-variance entries, q.k is a sum of d_out
    terms, so its variance is d_out. Large scores push softmax into a near one-hot regime where its
    gradient vanishes; dividing by sqrt(d_out) keeps the scores at unit variance whatever the size.

    x: (B, T, d_in) -> (B, T, d_out).
    """

    def __init__(self, d_in: int, d_out: int, bias: bool = False):
        super().__init__()
        self.W_q = nn.Linear(d_in, d_out, bias=bias)
        self.W_k = nn.Linear(d_in, d_out, bias=bias)
        self.W_v = nn.Linear(d_in, d_out, bias=bias)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        q = self.W_q(x)  # (B, T, d_out)
        k = self.W_k(x)  # (B, T, d_out)
        return q @ k.transpose(-2, -1) / math.sqrt(k.size(-1))  # (B, T, T)

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, T, T) table: row i says how much token i takes from each token j."""
        return self.scores(x).softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention_weights(x) @ self.W_v(x)  # (B, T, d_out)


# -----------------------------------------------------------------------------
# Step 3: the causal mask, and dropout on the attention weights


class CausalAttention(SelfAttention):
    """SelfAttention where token i only looks at tokens 0..i, plus dropout on the weights.

    Why the mask: a language model is trained to predict token i+1 from tokens 0..i, for every i
    of a sequence at once. If token i could attend to token i+1, it would copy the answer and learn
    nothing. So scores above the diagonal are set to -inf before the softmax: exp(-inf) = 0, and
    the remaining weights of each row still sum to 1. For T = 4 the allowed pairs are:
        1 0 0 0
        1 1 0 0
        1 1 1 0
        1 1 1 1
    A side effect that generation relies on: earlier outputs never change when tokens are
    appended, so their keys and values can be cached (step 7).

    Dropout on the weights (training only) randomly drops some of the tokens a token listens to,
    so the model cannot rely on a single connection; the kept weights are scaled by 1/(1-p).

    x: (B, T, d_in) -> (B, T, d_out).
    """

    def __init__(self, d_in: int, d_out: int, dropout: float = 0.0, bias: bool = False):
        super().__init__(d_in, d_out, bias)
        self.dropout = nn.Dropout(dropout)

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.scores(x)  # (B, T, T)
        T = scores.size(-1)
        # built on the fly: a (T, T) bool is cheap next to the (B, T, T) float scores we have
        ones = torch.ones(T, T, dtype=torch.bool, device=x.device)
        future = ones.triu(diagonal=1)  # (T, T): True above the diagonal
        scores = scores.masked_fill(future, float("-inf"))
        return scores.softmax(dim=-1)  # (B, T, T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.dropout(self.attention_weights(x))  # (B, T, T)
        return weights @ self.W_v(x)  # (B, T, d_out)


# -----------------------------------------------------------------------------
# Step 4: many heads, first as a stack of single heads, then fused


def check_n_head(n_embd: int, n_head: int) -> None:
    if n_head <= 0 or n_embd % n_head != 0:
        raise ValueError(
            f"n_embd={n_embd} is not divisible by n_head={n_head}: "
            "every head gets n_embd // n_head channels, "
            "so choose an n_head that divides n_embd (GPT-2: n_embd=768, n_head=12)"
        )


class MultiHeadAttentionWrapper(nn.Module):
    """n_head independent causal heads side by side, then an output projection that mixes them.

    One head computes one weighting of the sequence; several smaller heads can attend to different
    things at once (one to the previous token, one to the subject of the sentence...). Each head
    maps n_embd -> n_embd // n_head, so concatenating them gives back n_embd channels, and the
    cost equals one big head. c_proj (n_embd -> n_embd) lets the heads' outputs mix.

    This version runs the heads one after another in a Python loop: clear, but n_head small
    matmuls instead of one big one. MultiHeadAttention below computes exactly the same thing.

    x: (B, T, n_embd) -> (B, T, n_embd).
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        check_n_head(n_embd, n_head)
        head_size = n_embd // n_head
        heads = [CausalAttention(n_embd, head_size, dropout, bias) for _ in range(n_head)]
        self.heads = nn.ModuleList(heads)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([head(x) for head in self.heads], dim=-1)  # (B, T, n_embd)
        return self.resid_dropout(self.c_proj(y))

    @torch.no_grad()
    def fused_state_dict(self) -> dict[str, torch.Tensor]:
        """These weights in MultiHeadAttention's layout.

        Use: `mha.load_state_dict(wrapper.fused_state_dict())`. The fused c_attn is every head's
        W_q stacked, then every W_k, then every W_v: its weight is (3 * n_embd, n_embd) and rows
        [h*hs, (h+1)*hs) of each third belong to head h (hs = head size). That is exactly how
        MultiHeadAttention splits its output into q, k, v, then heads.
        """
        names = ["weight"]
        if self.c_proj.bias is not None:
            names.append("bias")
        fused = {}
        for name in names:
            rows = []  # every head's W_q, then every head's W_k, then every head's W_v
            for W in ("W_q", "W_k", "W_v"):
                for head in self.heads:
                    linear = getattr(head, W)
                    rows.append(getattr(linear, name))
            fused[f"c_attn.{name}"] = torch.cat(rows)
        for name, p in self.c_proj.state_dict().items():
            fused[f"c_proj.{name}"] = p.clone()
        return fused


class MultiHeadAttention(nn.Module):
    """Multi-head causal attention with one fused qkv projection: the version to actually run.

    Two tricks turn the n_head loop into a few large matrix products:
    1. one Linear c_attn (n_embd -> 3 * n_embd) computes q, k and v of all heads at once;
    2. a reshape splits the n_embd channels into (n_head, head_size) and moves heads next to the
       batch dimension, so `q @ k^T` runs every head of every sequence as one batched matmul.
    Names follow nanoGPT (c_attn, c_proj) so the weights load into CausalSelfAttention unchanged.

    The cost is the (B, n_head, T, T) score matrix it builds, stores and softmaxes: memory grows
    with T^2 (at T = 2048, 12 heads: 200 MB, 192 MiB, per sequence in fp32). Step 5 avoids that.

    x: (B, T, n_embd) -> (B, T, n_embd).
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        check_n_head(n_embd, n_head)
        self.n_embd = n_embd
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        hs = C // self.n_head  # head size
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        # channel h*hs + i is channel i of head h; heads go next to B: each head is a batch item
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        att = q @ k.transpose(-2, -1) / math.sqrt(hs)  # (B, nh, T, T)
        ones = torch.ones(T, T, dtype=torch.bool, device=x.device)
        future = ones.triu(diagonal=1)  # (T, T): True above the diagonal
        att = att.masked_fill(future, float("-inf"))
        att = att.softmax(dim=-1)
        att = self.attn_dropout(att)
        y = att @ v  # (B, nh, T, hs)
        # heads side by side again, as in torch.cat
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


# -----------------------------------------------------------------------------
# Step 5: the same through F.scaled_dot_product_attention
#
# CausalSelfAttention is MultiHeadAttention with its core replaced: c_attn computes q, k and v of
# every head in one matmul; a reshape makes the heads a batch dimension; then ONE call,
# F.scaled_dot_product_attention (SDPA), computes softmax(q k^T / sqrt(hs)) v under the causal
# mask; c_proj mixes the heads' outputs. On GPU, SDPA runs FlashAttention or the memory-efficient
# kernel: they walk over blocks of keys with a running softmax, so the (T, T) score matrix never
# exists in memory, and is_causal=True lets them skip the blocks above the diagonal instead of
# masking them. SDPA applies the dropout on the attention weights itself (dropout_p, only while
# training). With the same weights it computes what MultiHeadAttention computes (the tests check
# it); `--bench` times the two. This is the class 04_gpt.py and the stages up to 11 use.


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


# -----------------------------------------------------------------------------
# Step 6: padding, and when it needs no mask


class PaddedCausalSelfAttention(CausalSelfAttention):
    """CausalSelfAttention plus a padding mask, for a batch of sequences of unequal lengths.

    A batch is one (B, T) tensor, so shorter sequences are filled up with pad tokens. attention_mask
    (B, T) says which tokens are real: True/1 = real, False/0 = padding. A query may attend to key j
    only if j is not in its future AND j is real, so pads never influence a real token, wherever
    they sit (left, right, or holes in the middle).

    subtle: a query may have no allowed key at all (the leading pads of a left-padded row, a row
    that is all padding). Its scores are all -inf; a hand-written softmax (and some SDPA kernels)
    gives 0/0 = NaN, and since NaN * 0 is still NaN, the NaN spreads into the gradients of every
    weight. The fix: every query may also
    attend to itself (the diagonal). A real query's row allows itself already (its own position is
    not in its future, and it is real), so real tokens are unchanged; a row that had no key left
    gets a finite value (the pad's own value vector), which the loss ignores anyway.

    When no mask is needed at all: with RIGHT padding every real token comes before every pad, so
    the causal mask already hides the pads from the real tokens. The pads' own outputs are garbage,
    but their targets are -100 and cross_entropy(..., ignore_index=-100) skips them (08 masks its
    log-probabilities instead). That is why 07 and 08 pad on the right and keep 04's plain GPT.
    Left padding (a batch of prompts that must all end at the same position, as in generation)
    does need this mask, and shifted position ids besides.

    x: (B, T, n_embd), attention_mask: (B, T) bool/int/float -> (B, T, n_embd).
    """

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        if attention_mask.shape != (B, T):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} "
                f"but x is (B, T) = {(B, T)} tokens: pass one (B, T) row per sequence, "
                "True/1 for real tokens, False/0 for padding"
            )
        hs = C // self.n_head  # head size
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        key_is_real = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()  # (T, T)
        itself = torch.eye(T, dtype=torch.bool, device=x.device)  # (T, T): the diagonal
        allowed = (causal & key_is_real) | itself  # (B, 1, T, T), True = may attend; never NaN
        dropout_p = self.attn_dropout_p if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


# -----------------------------------------------------------------------------
# Step 7: attention at inference, with a KV cache
#
# A language model generates one token at a time, and each new token attends to every token
# before it. Rerunning the whole sequence for each new token recomputes keys and values that cannot
# have changed: under the causal mask, a token's k and v depend only on the tokens up to it. So
# keep them (the KV cache) and feed each step only the new token: its query attends to the cached
# keys plus its own, and the projections and the MLP run on one row instead of all of them
# (attention still reads every cached key). The price is memory: 2 * n_layer * n_embd numbers per
# token and row (GPT-2 small in fp32: 75 MB for 1024 tokens), in buffers allocated once, max_len
# tokens for every row of the batch, and written in place. Growing them by concatenation instead
# copies the whole cache for every token and layer: for GPT-2 small on a CPU that costs little
# (0.87-1.05x the time, `python tests/bench.py answers`); for GPT-2 medium, 8 rows of 500 tokens
# in bf16, by the last token it reads and writes 0.8 GB, more than its 0.7 GB of weights
# (arithmetic, not measured).
# The cache does the attention itself, with the weights of a CausalSelfAttention, so the model's
# modules stay as they are and any trained model works; a forward pass calls it for layers 0 ..
# n_layer - 1 in order, and the last one moves `length` (the tokens cached so far) on. The batch
# is fixed by the first call. The caller's part: position ids that go on from `length` (per row,
# if padded) and, with padding, a mask on every call (the pads stay in the cache): bool (B, 1, T,
# length + T) for T new tokens, True = may attend: step 6's rules (causal, real keys, and each
# query itself) over absolute positions, query i at length + i. Without a mask it is causal,
# shifted for a later chunk (SDPA's is_causal puts the triangle in the top-left corner, right only
# when nothing is cached). 09 builds all of generation on it; 10 serves with it.


class KVCache:
    """The keys and values of every token so far: per layer, (B, n_head, max_len, head_size)."""

    def __init__(self, n_layer: int, max_len: int):
        self.k = [None] * n_layer  # per layer: (B, n_head, max_len, head_size) keys
        self.v = [None] * n_layer  # per layer: the values, the same shape
        self.length = 0  # tokens cached so far
        self.max_len = max_len

    def attend(self, attn, x: torch.Tensor, layer: int, mask=None) -> torch.Tensor:
        """attn (a CausalSelfAttention) on the new tokens x (B, T, C), over the cache and x."""
        B, T, C = x.size()
        hs = C // attn.n_head  # head size
        start = self.length  # the new tokens' positions: start .. end - 1
        end = start + T
        q, k, v = attn.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, attn.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, attn.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, attn.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if self.k[layer] is None:  # the first call allocates; every later one writes in place
            self.k[layer] = k.new_zeros(B, attn.n_head, self.max_len, hs)
            self.v[layer] = torch.zeros_like(self.k[layer])
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        k = self.k[layer][:, :, :end]  # (B, nh, end, hs): a view, no copy
        v = self.v[layer][:, :, :end]  # (B, nh, end, hs)
        if layer == len(self.k) - 1:  # the last layer moves the cache on
            self.length = end
        if mask is None and T > 1 and start > 0:  # a later chunk: query i sees keys 0 .. start + i
            mask = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
        is_causal = mask is None and T > 1  # here only if start == 0: the top-left triangle fits
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return attn.c_proj(y)  # no dropout at inference


# -----------------------------------------------------------------------------
# Benchmark: manual attention (step 4) vs SDPA (step 5)


def sync(device: str) -> None:
    """Wait for the device: GPU work is asynchronous, so a timer would see only the launches."""
    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def time_forward(module: nn.Module, x: torch.Tensor, repeat: int, device: str) -> float:
    """Median wall-clock milliseconds of one forward, after one warm-up call (not timed)."""
    times = []
    for _ in range(repeat + 1):
        sync(device)
        t0 = time.perf_counter()
        module(x)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[1:])


def peak_memory_forward(module: nn.Module, x: torch.Tensor, device: str) -> int | None:
    """Peak bytes a forward allocates on top of what was already allocated (weights, input).

    How it is measured, honestly:
    - cuda: the caching allocator's own counters (max_memory_allocated after a reset).
    - cpu: the PyTorch profiler with profile_memory=True records every allocation and free that
      goes through PyTorch's CPU allocator, with a timestamp. Replaying them in time order gives
      the bytes alive at each moment; the maximum is the peak. This counts tensors and kernel
      workspaces (what differs between the versions), not the process RSS, which malloc's free
      lists and Python's own objects blur. kineto_results is a stable but undocumented attribute.
    - other devices (mps): no peak counter, reported as "-".
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        module(x)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    if device != "cpu":
        return None
    # the profiler's backend logs 2 lines a run below level 6
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        module(x)
    events = prof.profiler.kineto_results.events()
    records = [e for e in events if e.name() == "[memory]"]
    alive = 0  # bytes allocated and not yet freed
    peak = 0
    for record in sorted(records, key=lambda e: e.start_ns()):
        alive += record.nbytes()  # positive for an allocation, negative for a free
        peak = max(peak, alive)
    return peak


def megabytes(nbytes: int | None) -> str:
    """A peak for the table: 3.5 MiB as "3.5", no measurement (None) as "-"."""
    if nbytes is None:
        return "-"
    return f"{nbytes / 2**20:.1f}"


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest |a - b| of two tensors of the same shape: 0.0 when they agree exactly."""
    return (a - b).abs().max().item()


def bench(args: argparse.Namespace) -> None:
    device = args.device
    B = args.batch_size
    if args.dtype != "auto":
        dtype = getattr(torch, args.dtype)
    elif device == "cuda":
        dtype = torch.bfloat16
    else:
        dtype = torch.float32
    torch.manual_seed(0)
    manual = MultiHeadAttention(args.n_embd, args.n_head).to(device, dtype).eval()
    sdpa = CausalSelfAttention(args.n_embd, args.n_head).to(device, dtype).eval()
    sdpa.load_state_dict(manual.state_dict())
    bytes_per = torch.finfo(dtype).bits // 8
    threads = torch.get_num_threads()
    print(f"forward of one attention layer: batch {B}, n_embd {args.n_embd}, "
          f"n_head {args.n_head}, {device}, {dtype}, {threads} threads, "
          f"median of {args.repeat}")
    print("ms = whole layer (both share the qkv and output projections; only the core differs)")
    if device == "cuda":
        measured_by = "(cuda allocator counters)"
    else:
        measured_by = "(profiler allocation records)"
    print(f"peak MiB = memory the forward allocates above weights and input {measured_by}")
    print("T x T MiB = one (B, n_head, T, T) score matrix, which the manual version materialises")
    header = (
        f"{'T':>6} {'manual ms':>10} {'sdpa ms':>9} {'speedup':>8} "
        f"{'manual peak MiB':>15} {'sdpa peak MiB':>13} "
        f"{'T x T MiB':>9} {'max |diff|':>11}"
    )
    print(header)
    print("-" * len(header))
    for T in args.seq_lens:
        x = torch.randn(B, T, args.n_embd, device=device, dtype=dtype)
        with torch.inference_mode():
            diff = max_diff(manual(x), sdpa(x))
            manual_ms = time_forward(manual, x, args.repeat, device)
            sdpa_ms = time_forward(sdpa, x, args.repeat, device)
            manual_peak = peak_memory_forward(manual, x, device)
            sdpa_peak = peak_memory_forward(sdpa, x, device)
        scores_mb = B * args.n_head * T * T * bytes_per / 2**20
        print(f"{T:>6} {manual_ms:>10.2f} {sdpa_ms:>9.2f} {manual_ms / sdpa_ms:>7.2f}x "
              f"{megabytes(manual_peak):>15} {megabytes(sdpa_peak):>13} "
              f"{scores_mb:>9.1f} {diff:>11.1e}")


# -----------------------------------------------------------------------------
# Demo


def demo() -> None:
    torch.manual_seed(0)
    B = 2
    T = 5
    C = 8
    n_head = 2
    x = torch.randn(B, T, C)
    print(f"input x: (B, T, C) = {tuple(x.shape)}\n")

    simple_shape = tuple(simple_self_attention(x).shape)
    print(f"1. simple_self_attention (no weights): {simple_shape}")
    attn = SelfAttention(C, 4)
    weights_shape = tuple(attn.attention_weights(x).shape)
    print(f"2. SelfAttention(d_in={C}, d_out=4): {tuple(attn(x).shape)}, "
          f"weights {weights_shape}, each row sums to 1")

    head = CausalAttention(C, 4)
    future = torch.ones(T, T, dtype=torch.bool).triu(diagonal=1)
    print("3. CausalAttention: allowed (1) and masked (0) pairs, row = query, column = key:")
    for row in (~future).int().tolist():
        print("     " + " ".join(map(str, row)))
    print("   its attention weights for sequence 0 "
          "(zero above the diagonal; untrained, so near uniform):")
    for row in head.attention_weights(x)[0].tolist():
        print("     " + " ".join(f"{w:.2f}" for w in row))

    wrapper = MultiHeadAttentionWrapper(C, n_head)
    mha = MultiHeadAttention(C, n_head)
    csa = CausalSelfAttention(C, n_head)
    mha.load_state_dict(wrapper.fused_state_dict())  # the same weights, fused into one matrix
    csa.load_state_dict(mha.state_dict())  # identical names: c_attn, c_proj
    with torch.no_grad():
        y_wrapper = wrapper(x)
        y_mha = mha(x)
        y_csa = csa(x)
    print(f"\n4. MultiHeadAttentionWrapper ({n_head} heads) vs MultiHeadAttention (fused): "
          f"max |diff| = {max_diff(y_wrapper, y_mha):.1e}, output {tuple(y_mha.shape)}")
    print("5. CausalSelfAttention (SDPA) vs MultiHeadAttention: "
          f"max |diff| = {max_diff(y_csa, y_mha):.1e}")

    padded = PaddedCausalSelfAttention(C, n_head)
    padded.load_state_dict(csa.state_dict())  # the same weights: the mask is the only difference
    print("6. padding: sequence 1 holds 3 real tokens padded to 5; compare them with the 3 alone")
    for side, row in (("left ", [0, 0, 1, 1, 1]), ("right", [1, 1, 1, 0, 0])):
        mask = torch.tensor([[1] * T, row], dtype=torch.bool)  # (B, T) True = real token
        real = mask[1]
        with torch.no_grad():
            alone = csa(x[1:, real])[0]  # (3, C): no padding at all
            with_mask = padded(x, mask)[1, real]
            without_mask = csa(x)[1, real]
        print(f"   {side} padding {row}: "
              f"max |diff| = {max_diff(with_mask, alone):.1e} with the mask, "
              f"{max_diff(without_mask, alone):.1e} without it")
    print("   (left: the pads come first and leak into the real tokens; "
          "right: causality hides them)")
    cache = KVCache(n_layer=1, max_len=T)  # one attention layer: each call moves the cache on
    outputs = []
    with torch.no_grad():
        for t in range(T):
            outputs.append(cache.attend(csa, x[:, t : t + 1], layer=0))  # (B, 1, C)
    one_by_one = torch.cat(outputs, dim=1)  # (B, T, C)
    print(f"7. KV cache: {T} tokens one at a time over the cached keys and values, "
          f"vs all at once: max |diff| = {max_diff(one_by_one, y_csa):.1e}")
    gpt2_layer = CausalSelfAttention(768, 12)
    n_params = sum(p.numel() for p in gpt2_layer.parameters())
    print(f"\nparameters (n_embd=768, n_head=12, like one GPT-2 layer): {n_params:,}")


def str_to_bool(text: str) -> bool:
    """--bench=true/false (also 1/0, yes/no); a bare --bench means true."""
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def int_list(text: str) -> list[int]:
    """--seq_lens=128,512,2048 -> [128, 512, 2048]."""
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        message = f"expected comma-separated integers like 128,512, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def default_device() -> str:
    """cuda if there is a GPU, else mps (Apple silicon), else cpu."""
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def main(argv=None) -> None:
    parser = FlagParser(description=__doc__.split("\n")[0])  # the docstring's first line
    parser.add_argument("--bench", type=str_to_bool, nargs="?", const=True, default=False,
                        metavar="bool", help="time manual attention against SDPA, not the demo")
    parser.add_argument("--device", type=str, default=default_device(),
                        choices=["cpu", "cuda", "mps"], help="where the benchmark runs")
    parser.add_argument("--dtype", type=str, default="auto",
                        choices=["auto", "float32", "bfloat16", "float16"],
                        help="the benchmark's number format; auto = bfloat16 on cuda (its flash "
                             "kernel needs 16 bits), float32 elsewhere")
    parser.add_argument("--seq_lens", type=int_list, default="128,256,512,1024,2048",
                        metavar="ints", help="the sequence lengths T to time, comma-separated")
    parser.add_argument("--batch_size", type=int, default=1, help="sequences per forward")
    parser.add_argument("--n_embd", type=int, default=768, help="channels per token, as in GPT-2")
    parser.add_argument("--n_head", type=int, default=12, help="attention heads, as in GPT-2")
    parser.add_argument("--repeat", type=int, default=5, help="timed forwards per measurement")
    args = parser.parse_args(argv)
    counts = {"--repeat": args.repeat, "--batch_size": args.batch_size,
              "--seq_lens": min(args.seq_lens)}  # the smallest length
    for flag, count in counts.items():
        if count < 1:
            parser.error(f"{flag}: {count} is not positive; use 1 or more")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device=cuda, but PyTorch sees no CUDA GPU here: use --device=cpu")
    if args.device == "mps" and not torch.backends.mps.is_available():
        parser.error("--device=mps, but PyTorch sees no Apple GPU here: use --device=cpu")
    if min(args.n_head, args.n_embd) <= 0 or args.n_embd % args.n_head != 0:
        parser.error(
            f"--n_head={args.n_head} must divide --n_embd={args.n_embd}, both > 0 (GPT-2: 768, 12)"
        )
    try:  # a Ctrl-C mid-benchmark: one line and a shell's 130, no traceback
        if args.bench:
            bench(args)
        else:
            demo()
    except KeyboardInterrupt:
        parser.exit(130, "\nCtrl-C: stopped\n")


# -----------------------------------------------------------------------------
# Appendix: pieces copied unchanged from earlier stages, so that this file runs on its own.
# Each is its origin's text byte for byte (tests/test_copies.py checks); read them there.

# copied from 01_tokenizer.py: FlagParser
class FlagParser(argparse.ArgumentParser):
    """argparse with no abbreviations (--vocab is not --vocab_size) and the help 04-13 print. A
    mistake is one line and exit status 2, not a usage dump; a misspelt flag gets the closest one:
    `error: unrecognized arguments: --vocab_siz=9 (did you mean --vocab_size?)`."""

    class Help(argparse.MetavarTypeHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        """Each flag as `--name TYPE  meaning (default: X)`."""

    def __init__(self, **options):
        super().__init__(allow_abbrev=False, formatter_class=self.Help, **options)

    def error(self, message: str):
        hint = "see --help"
        if message.startswith("unrecognized arguments: "):
            first = message.split()[2].split("=")[0]  # "--vocab_siz=9" -> "--vocab_siz"
            flags = [flag for action in self._actions for flag in action.option_strings]
            close = difflib.get_close_matches(first, flags, n=1)
            if close:
                hint = f"did you mean {close[0]}?"
        self.exit(2, f"error: {message} ({hint})\n")


if __name__ == "__main__":
    main()
