"""Stage 9: generation, fast: a KV cache, sampling, batches, chat and evaluation.

A trained GPT only scores "what comes next". Generating text is a loop around it: score, pick a
token, append it, repeat. This file makes that loop fast and useful:

  - Sampling: greedy, temperature, top-k and top-p (nucleus), seeded; stop at <|endoftext|> or at
    stop strings; text streamed token by token (whole UTF-8 characters only).
  - The KV cache. Without it, every new token reruns the model over the whole context: O(T) work
    per token, O(T^2) per text. But in a causal model the keys and values of past tokens never
    change, so we keep them and feed the model only the newest token. `forward_cached` runs the
    model's own modules around the cache: 04's GPT stays untouched, and any checkpoint of 05-08
    works. `--bench` measures what the cache buys.
  - Batches: prompts of unequal length are LEFT-padded so their last tokens line up; a mask hides
    the padding, and position ids start at 0 at each row's first real token, as if it were alone.
  - Chat: `--chat` wraps each message in 07's instruction template (for 07/08 checkpoints).
  - Evaluation: perplexity and bits per byte of a text file, over strided windows. Bits per byte
    does not depend on the tokenizer, so a character model and a BPE model compare on one text.

References: Radford et al. 2019 (GPT-2); karpathy/nanoGPT sample.py; Raschka, "Build a Large
Language Model (From Scratch)", ch. 5 and 7; Holtzman et al. 2019, "The Curious Case of Neural Text
Degeneration" (top-p); Pope et al. 2022, "Efficiently Scaling Transformer Inference" (KV caching);
Hugging Face, "Perplexity of fixed-length models" (strided windows).

Run it (after `python 05_pretrain.py`, which writes out/shakespeare-char/ckpt.pt):
  python 09_generate.py                                 # sample from 05's Shakespeare model
  python 09_generate.py --prompt="ROMEO:" --temperature=0 --max_new_tokens=200 --num_samples=3
  python 09_generate.py --ckpt=out/finetune/ckpt.pt --chat        # 07's model (out/dpo/ckpt.pt: 08's)
  python 09_generate.py --eval_file=data/tinyshakespeare.txt      # perplexity, bits per byte
  python 09_generate.py --device=cuda    # one GPU (bf16 autocast where the GPU has it natively)
  python 09_generate.py --bench          # tokens/s with and without the cache (CPU: ~15 minutes)
"""

import argparse
import codecs
import math
import pickle
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Sampling: turn the logits of the last position into one token id


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set every logit outside the top-k and outside the nucleus (top-p) to -inf. (..., V) -> (..., V).

    top_k keeps the k largest logits (ties with the k-th too). top_p keeps the smallest set of most
    likely tokens whose probabilities sum to at least top_p (Holtzman et al. 2019): probs
    [0.5, 0.3, 0.15, 0.05] with top_p=0.8 keep the first two (0.5 + 0.3 >= 0.8); the third goes,
    because the mass before it already reaches 0.8. The most likely token always stays.
    """
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[..., -1:]  # (..., 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # the tokens ranked above already reach top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))  # rank -> token order
    return logits


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be a positive integer (or None/0 for no limit), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus filter), got {top_p}")


def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None) -> torch.Tensor:
    """Pick one token per row of logits (B, V) -> (B,). temperature=0 is greedy (argmax); otherwise
    the logits are divided by the temperature (< 1: sharper, > 1: flatter; towards 0, one-hot on the
    argmax), filtered by top-k / top-p, and a token is drawn from the softmax with `generator`."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = F.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)  # (B,)


# -----------------------------------------------------------------------------
# The KV cache


class KVCache:
    """Keys and values of the tokens seen so far, per layer: computed once, then reused.

    In a causal model token t's key and value depend only on tokens <= t, so they never change.
    Each layer gets two (B, n_head, max_len, head_size) buffers, allocated on first use in the dtype
    the model computes in (fp32, or bf16 under autocast) and filled left to right; `length` counts
    the filled positions. GPT-2 small, max_len 1024, fp32: 2 * 12 layers * 1024 * 768 * 4 bytes =
    75 MB per row. Alongside: `key_real` (B, max_len), False at left padding (no query may attend
    to it), and `next_pos` (B, 1), the position id of each row's next token.
    """

    def __init__(self, n_layer: int, max_len: int):
        self.max_len, self.length = max_len, 0
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.key_real, self.next_pos = None, None  # (B, max_len) bool, (B, 1)
        self.padded = False  # is any key padding? (if not, one new token needs no mask)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, T, hs) at positions [length, length + T); return all keys/values so far."""
        B, nh, T, hs = k.shape
        if self.k[layer] is None:
            self.k[layer] = k.new_zeros(B, nh, self.max_len, hs)
            self.v[layer] = v.new_zeros(B, nh, self.max_len, hs)
        end = self.length + T
        self.k[layer][:, :, self.length : end], self.v[layer][:, :, self.length : end] = k, v
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
    return attn.c_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C); no dropout at inference


def forward_cached(model, idx, cache=None, attention_mask=None, position_ids=None, last_only=False):
    """The GPT forward pass, built from the model's own modules, with an optional KV cache.

    idx (B, T): the NEW tokens; their keys/values are appended to `cache` and they attend to all
    cached before them. cache=None runs the plain full forward (the whole context every time).
    attention_mask (B, T): True = real token, False = (left) padding. position_ids (B, T): by
    default each row counts its real tokens, continuing from the cache: a row padded as
    [pad pad a b] gets positions [0 0 0 1], exactly what `a b` alone would get.
    Returns logits (B, T, V), or (B, 1, V) with last_only=True: generation needs only the last
    position's, and the LM head is a big share of the work (GPT-2 small: 38.6M of 124M weights).
    It runs in fp32 outside autocast, so sampling and perplexity see exact logits (a bf16 step is
    0.1-0.5 nats at GPT-2's logit sizes). Inference only: model.eval() first.

        cache = KVCache(model.config.n_layer, model.config.block_size)
        logits = forward_cached(model, prompt, cache)               # prefill: (1, T, V)
        logits = forward_cached(model, next_token[:, None], cache)  # one step: (1, 1, V)
    """
    if model.training:
        raise ValueError("forward_cached is for inference: call model.eval() first (dropout off)")
    B, T = idx.shape
    t0 = 0 if cache is None else cache.length
    limit = model.config.block_size if cache is None else min(cache.max_len, model.config.block_size)
    if t0 + T > limit:
        raise ValueError(f"{t0} cached + {T} new tokens exceed the context of {limit} positions; crop the "
                         f"input or start a new cache (generate_tokens slides the window for you)")  # fmt: skip
    real = torch.ones_like(idx, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if position_ids is None:
        position_ids = (cache.next_pos if t0 else 0) + (real.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T)
    padded, key_real = attention_mask is not None and not bool(real.all()), real  # key_real: (B, L)
    if cache is not None:
        if cache.key_real is None:
            cache.key_real = torch.ones(B, cache.max_len, dtype=torch.bool, device=idx.device)
        cache.key_real[:, t0 : t0 + T] = real
        cache.padded |= padded
        padded, key_real = cache.padded, cache.key_real[:, : t0 + T]
    mask = None  # SDPA's is_causal suffices: no padding, and the queries are the first or only new ones
    if padded or (t0 > 0 and T > 1):  # (is_causal would align a later chunk's queries with the first keys)
        q_pos = torch.arange(t0, t0 + T, device=idx.device)[:, None]  # (T, 1)
        k_pos = torch.arange(t0 + T, device=idx.device)[None, :]  # (1, L)
        mask = (k_pos <= q_pos) & key_real[:, None, :]  # (B, T, L) causal and key is real
        mask = (mask | (k_pos == q_pos))[:, None]  # (B, 1, T, L); a padded query sees itself: no NaN
    tr = model.transformer
    x = tr.wte(idx) + tr.wpe(position_ids)  # (B, T, C)
    for layer, block in enumerate(tr.h):
        x = x + cached_attention(block.attn, block.ln_1(x), model.config.n_head, cache, layer, mask)
        x = x + block.mlp(block.ln_2(x))
    with torch.autocast(idx.device.type, enabled=False):
        logits = model.lm_head(tr.ln_f(x[:, -1:] if last_only else x).float())  # (B, T or 1, V)
    if cache is not None:
        cache.length += T
        cache.next_pos = position_ids[:, -1:] + 1  # (B, 1)
    return logits


# -----------------------------------------------------------------------------
# Generation: batches, the full-context rule, stopping, streaming


def left_pad(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """[[5, 6, 7], [8]] -> idx [[5, 6, 7], [0, 0, 8]], mask [[1, 1, 1], [0, 0, 1]] (as bool).

    Left, not right: the last real token of every row sits in the last column, so each step appends
    the next tokens as one new column. (The pad id 0 is arbitrary: the mask hides it.)
    """
    if not prompts or not all(prompts):
        raise ValueError("every prompt needs at least one token; start from the eot token or a newline")
    T = max(len(p) for p in prompts)
    idx = torch.tensor([[0] * (T - len(p)) + list(p) for p in prompts], device=device)
    return idx, torch.tensor([[False] * (T - len(p)) + [True] * len(p) for p in prompts], device=device)


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
    block_size, keep = model.config.block_size, max(1, model.config.block_size // 2)
    device = model.lm_head.weight.device
    idx, mask = left_pad([p[-block_size:] for p in prompts], device)  # (B, T) each
    cache, logits = None, None
    while True:
        if logits is None:  # encode the whole window: the prompt, after a slide, or every step uncached
            cache = KVCache(model.config.n_layer, block_size) if use_cache else None
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
        else:  # with the cache only the new token; without it, the whole window again
            logits = forward_cached(model, next_ids[:, None], cache)[:, -1] if use_cache else None


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
        self.text, self.shown, self.stopped = "", 0, False  # shown: characters handed to on_text

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
    out, done = [[] for _ in prompts], [False] * len(prompts)
    steps = generate_tokens(model, prompts, temperature, top_k, top_p, generator, use_cache)
    for _, (next_ids, _) in zip(range(max_new_tokens), steps):  # range first: no extra step at the end
        for row, token in enumerate(next_ids.tolist()):  # one sync per step for the whole batch
            if done[row] or token == eot_token:
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


def complete(model, tok, prompts: list[list[int]], cfg, stop_strings=(), eot_token=None, echo=False):
    """Continue each prompt (token ids, one batch) with cfg's settings; return each row's new text.
    echo=True streams row 0 to stdout as it is made."""
    printer = (lambda chunk: print(chunk, end="", flush=True)) if echo else None
    streams = [TextStream(tok, stop_strings, printer if row == 0 else None) for row in range(len(prompts))]
    generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(cfg.seed)
    generate(model, prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_k or None, cfg.top_p, generator,
             eot_token=eot_token, streams=streams, use_cache=cfg.use_cache)  # fmt: skip
    return [s.text for s in streams]


# -----------------------------------------------------------------------------
# Chat: 07's instruction template around each message


def chat(model, tok, cfg, ckpt: dict) -> None:
    """An interactive loop; each message is a fresh single-turn prompt (Alpaca's template has no history).

    The prompt is what 07 trained on: format_input(entry) + RESPONSE_HEADER, encoded in two parts
    (with BPE, encoding the joined string could merge tokens across the seam). A char model lacks
    characters such as the template's '#': as in 07, each becomes its unknown_char, and we report
    only those the user typed. Answers end where 07 taught them to: at <|endoftext|> (GPT-2) or a
    newline (a char model has no end token), or at the next "### " header.
    """
    if ckpt.get("stage") not in ("finetune", "dpo"):
        print(f"note: this is a {ckpt.get('stage')} checkpoint; chat needs an instruction-tuned one (07 or 08)")
    known, unknown = set(getattr(tok, "chars", "")), ckpt.get("config", {}).get("unknown_char", "?")
    end_id = tok.encode("\n")[0] if known else tok.eot_token

    def encode_text(text: str) -> list[int]:  # as 07 encodes: "<|endoftext|>" is plain text here
        return tok.encode("".join(c if c in known else unknown for c in text)) if known else \
            tok.encode(text, disallowed_special=())

    print("chat: type a message; an empty line, /quit or Ctrl-D ends")
    while True:
        try:
            message = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if message in ("", "/quit", "/exit"):
            break
        if known and (lacking := "".join(sorted(set(message) - known))):
            print(f"(not among this model's characters, sent as {unknown!r}: {lacking!r})")
        prompt = encode_text(format_input({"instruction": message, "input": ""})) + encode_text(RESPONSE_HEADER)
        print("model> ", end="", flush=True)
        complete(model, tok, [prompt], cfg, ["\n\n### "], end_id, echo=True)
        print()


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
    windows, prev_end = [], 0
    for end in list(range(T, n_tokens - 1, stride)) + [n_tokens - 1]:
        if end > prev_end:
            windows.append((end - T, end, end - prev_end))
            prev_end = end
    return windows


@torch.no_grad()
def evaluate_text(model, tok, text: str, stride: int = 0, batch_size: int = 8, progress=False) -> dict:
    """Perplexity and bits per byte of `text`: how surprised the model is by it.

    loss = mean negative log-likelihood per token (nats), perplexity = exp(loss), and
    bits_per_byte = total nats / ln 2 / UTF-8 bytes of the scored tokens. Perplexity depends on
    the tokenizer (a character is easier to guess than a word); bits per byte does not.
    GPT-2 texts start after an <|endoftext|>, so every token is scored; a character model has no
    such token and its first character is not scored. stride 0 means block_size // 2.
    batch_size windows share a forward pass (fewer when their logits would pass 2**27 numbers, 512 MB).
    progress=True prints tokens scored, rate and time left to stderr once a second.
    """
    ids = encode(tok, text)
    if tok.eot_token is not None:
        ids = [tok.eot_token] + ids
    n_tokens, block_size, V = len(ids) - 1, model.config.block_size, model.config.vocab_size
    windows = strided_windows(len(ids), block_size, stride or max(1, min(block_size, n_tokens) // 2))
    data = torch.tensor(ids, device=model.lm_head.weight.device)
    T = windows[0][1] - windows[0][0]
    batch_size = max(1, min(batch_size, 2**27 // (T * V)))  # GPT-2, T=1024: 2 windows per pass
    nats, done, t0 = 0.0, 0, time.perf_counter()
    shown = t0
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]
        x = torch.stack([data[b:e] for b, e, _ in batch])  # (B, T)
        y = torch.stack([data[b + 1 : e + 1] for b, e, _ in batch])  # (B, T)
        nll = F.cross_entropy(forward_cached(model, x).transpose(1, 2), y, reduction="none")  # (B, T)
        n_scored = torch.tensor([n for *_, n in batch], device=x.device)[:, None]  # (B, 1)
        nats += nll[torch.arange(T, device=x.device) >= T - n_scored].sum().item()  # each row's last n
        done, now = done + sum(n for *_, n in batch), time.perf_counter()
        if progress and now - shown >= 1:  # a long text: how far, how fast, how long still
            rate, shown = done / (now - t0), now
            print(f"\rscored {done:,} / {n_tokens:,} tokens, {rate:,.0f} tokens/s, "
                  f"{(n_tokens - done) / rate:,.0f} s left", end="", file=sys.stderr, flush=True)  # fmt: skip
    if shown > t0:
        print(file=sys.stderr)
    n_bytes, loss = sum(len(token_bytes(tok, t)) for t in ids[1:]), nats / n_tokens
    return {"tokens": n_tokens, "bytes": n_bytes, "loss": loss, "perplexity": math.exp(loss),
            "bits_per_byte": nats / math.log(2) / n_bytes}  # fmt: skip


# -----------------------------------------------------------------------------
# The lesson in numbers: tokens/s with and without the cache


def time_generation(model, n_new: int, use_cache: bool, prompt_len: int = 16) -> list[float]:
    """Seconds at which each of n_new greedy tokens was ready (batch 1, random prompt)."""
    prompt = torch.randint(model.config.vocab_size, (prompt_len,)).tolist()
    steps = generate_tokens(model, [prompt], temperature=0, use_cache=use_cache)
    t0, times = time.perf_counter(), []
    for _, (next_ids, _) in zip(range(n_new), steps):
        next_ids.tolist()  # wait for the token (and the GPU), as a streaming user would
        times.append(time.perf_counter() - t0)
    return times


def bench(cfg) -> None:
    """tokens/s with and without the cache, and ms per token early vs late: flat with the cache (O(1)
    per token), growing without it (O(T)). Random weights: the speed does not depend on them."""
    print(f"{cfg.device}, {cfg.dtype}, {torch.get_num_threads()} threads, greedy, batch 1, prompt 16 tokens; "
          f"ms/token: the mean over the first -> the last 64 new tokens\n{'model':>8} {'new':>5} "
          f"{'tok/s cache':>12} {'no cache':>9} {'speedup':>8} {'ms/token cache':>16} {'no cache':>16}")
    for preset in cfg.bench_presets.split(","):
        # block_size 1024: room for 16 + 512 tokens without sliding, so the timing shows the cache alone
        model = GPT(GPTConfig.from_preset(preset, vocab_size=50257, block_size=1024)).to(cfg.device).eval()
        time_generation(model, 8, True)  # warm up (allocations, kernel selection)
        for n_new in (256, 512):
            row = []
            for use_cache in (True, False):
                times = time_generation(model, n_new, use_cache)
                ms = [1e3 * (b - a) for a, b in zip([0.0] + times, times)]
                row += [n_new / times[-1], f"{sum(ms[:64]) / 64:.1f} -> {sum(ms[-64:]) / 64:.1f}"]
            print(f"{preset:>8} {n_new:>5} {row[0]:>12,.1f} {row[2]:>9,.1f} {row[0] / row[2]:>7.1f}x "
                  f"{row[1]:>16} {row[3]:>16}")  # fmt: skip


# -----------------------------------------------------------------------------
# Command line

DEFAULT_CKPT = "out/shakespeare-char/ckpt.pt"  # what `python 05_pretrain.py` writes: the Quick start's model
STAGES = {"pretrain": "05_pretrain.py", "distributed": "06_distributed.py", "finetune": "07_finetune.py",
          "dpo": "08_dpo.py"}  # fmt: skip


# (arg is called when the class below is defined, so its copy stands above it, not in the appendix)
# copied from 05_pretrain.py: arg
def arg(default, help: str):
    """A dataclass field with its --help text: `n_layer: int = arg(4, "transformer blocks")`."""
    return field(default=default, metadata={"help": help})


@dataclass
class GenerateConfig:
    """Sample from, chat with, evaluate or benchmark a GPT: a checkpoint of 05-08."""

    ckpt: str = arg(DEFAULT_CKPT, "a checkpoint of 05-08 (default: 05's Shakespeare model)")
    prompt: str = arg("", 'the text to continue; "" = <|endoftext|> (GPT-2) or a newline (char models)')
    num_samples: int = arg(1, "samples of the prompt, generated together as one batch")
    max_new_tokens: int = arg(500, "tokens to generate per sample")
    temperature: float = arg(0.8, "0 = greedy; < 1 sharper, > 1 more random")
    top_k: int = arg(200, "sample among the k most likely tokens; 0 = no limit")
    top_p: float = arg(1.0, "nucleus: the most likely tokens covering this probability; 1.0 = off")
    seed: int = arg(1337, "the sampling seed")
    stop: str = arg("", 'stop strings, comma-separated; "\\n" is a newline (e.g. --stop="\\n\\n,THE END")')
    use_cache: bool = arg(True, "the KV cache (false: rerun the whole context for every token)")
    chat: bool = arg(False, "interactive chat with an instruction-tuned checkpoint (07/08)")
    eval_file: str = arg("", "print perplexity and bits per byte of this text file instead of sampling")
    eval_stride: int = arg(0, "evaluation windows advance by this many tokens; 0 = block_size // 2")
    bench: bool = arg(False, "time tokens/s with and without the cache (random weights)")
    bench_presets: str = arg("small,gpt2", "GPTConfig presets to benchmark, comma-separated")
    device: str = arg("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    dtype: str = arg("auto", "autocast: auto (see pick_dtype), float32, bfloat16, float16 (CUDA)")
    threads: int = arg(0, "CPU threads; 0 = PyTorch's default")

    def __post_init__(self):  # checked before loading anything; parse_config prints the error
        self.device = pick_device(self.device)  # "auto" -> cuda, mps or cpu; a missing one: an error
        self.dtype = pick_dtype(self.dtype, self.device)
        check_sampling(self.temperature, self.top_k or None, self.top_p)
        if min(self.max_new_tokens, self.num_samples - 1, self.eval_stride, self.threads) < 0:
            raise ValueError("need --max_new_tokens >= 0, --num_samples >= 1, --eval_stride >= 0, --threads >= 0")
        if self.eval_file and not Path(self.eval_file).is_file():
            raise FileNotFoundError(f"--eval_file={self.eval_file}: no such file")
        if not (self.bench or Path(self.ckpt).is_file()):
            raise FileNotFoundError(f"--ckpt={self.ckpt}: no such file; 05-08 write out_dir/ckpt.pt (this "
                                    f"default one: `python 05_pretrain.py`)")


def fail(message) -> None:  # a user error found after parsing: one line, status 2, as parse_config
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def load_model(cfg):
    """(model in eval mode on cfg.device, tokenizer, checkpoint dict), saying what it loaded."""
    try:  # on the CPU and memory-mapped: an optimizer state in the file never reaches the GPU
        model, tok, ckpt = load_checkpoint(cfg.ckpt)
    except (ValueError, FileNotFoundError) as e:
        fail(e)
    stage, val = ckpt.get("stage", "?"), ckpt.get("val_loss", ckpt.get("best_val_loss"))
    val = f"val loss {val:.4f}" if val is not None and math.isfinite(val) else "no val loss measured"
    print(f"loaded {cfg.ckpt}: the {stage} model of {STAGES.get(stage, 'an unknown script')} after "
          f"{ckpt.get('iter_num', 0):,} iterations, {val}; {model.num_params() / 1e6:.2f}M parameters, "
          f"{ckpt['tokenizer']['kind']} tokens, context {model.config.block_size}")  # fmt: skip
    return model.to(cfg.device).eval(), tok, ckpt


def encode(tok, text: str) -> list[int]:
    """Text -> ids; for GPT-2, "<|endoftext|>" in the text becomes the eot token (a document break)."""
    if isinstance(tok, CharTokenizer):
        if missing := "".join(sorted(set(text) - set(tok.chars))):
            raise ValueError(f"characters {missing!r} are not in this char model's vocabulary (its training "
                             f"text's characters): leave them out, or use a GPT-2 checkpoint")  # fmt: skip
        return tok.encode(text)
    return tok.encode(text, allowed_special={"<|endoftext|>"})


def main(argv=None):
    cfg = parse_config(GenerateConfig, argv)  # a bad setting: one "error:" line, exit status 2
    if cfg.device.startswith("cuda"):  # TF32 for the matmuls autocast leaves in fp32 (the head)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    dtype = getattr(torch, cfg.dtype)
    with torch.autocast(cfg.device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
        if cfg.bench:
            return bench(cfg)
        model, tok, ckpt = load_model(cfg)
        if cfg.chat:
            return chat(model, tok, cfg, ckpt)
        try:
            if cfg.eval_file:
                result = evaluate_text(model, tok, Path(cfg.eval_file).read_text("utf-8"), cfg.eval_stride,
                                       progress=True)  # fmt: skip
                print(f"{cfg.eval_file}: {result['tokens']:,} tokens, {result['bytes']:,} bytes, loss "
                      f"{result['loss']:.4f}, perplexity {result['perplexity']:.3f}, "
                      f"bits per byte {result['bits_per_byte']:.4f}")  # fmt: skip
                return result
            prompt = cfg.prompt or ("<|endoftext|>" if tok.eot_token is not None else "\n")
            ids = [encode(tok, prompt)] * cfg.num_samples
        except ValueError as e:  # text the tokenizer cannot encode, or too short to score
            fail(e)
        stop_strings = [s.replace("\\n", "\n").replace("\\t", "\t") for s in cfg.stop.split(",") if s]
        print(prompt, end="", flush=True)  # then the first sample streams as it is generated
        texts = complete(model, tok, ids, cfg, stop_strings, tok.eot_token, echo=True)
        for text in texts[1:]:
            print("\n" + "-" * 40 + "\n" + prompt + text, end="")
        print()
        return texts


# -----------------------------------------------------------------------------
# Appendix: pieces copied unchanged from earlier stages, so that this file runs on its own.
# Each is its origin's text byte for byte (tests/test_copies.py checks); read them there.


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

    Checkpoints and meta.json store this small dict, not the tokenizer. For GPT-2 we use tiktoken
    (Rust, fast); 01_tokenizer.py's BPETokenizer gives the same ids and shows how they are made.
    """
    kind = spec.get("kind")
    if kind == "char":
        return CharTokenizer(spec["chars"])
    if kind == "gpt2":
        import tiktoken  # imported here so that char-only scripts do not need it

        return tiktoken.get_encoding("gpt2")
    raise ValueError(f"unknown tokenizer kind {kind!r}; use {{'kind': 'char', 'chars': ...}} "
                     "or {'kind': 'gpt2'}")


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

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))  # tokens talk to each other
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


# copied from 05_pretrain.py: parse_config
def parse_config(cls, argv=None):
    """A dataclass of settings from the command line: each field becomes a --field_name=value flag.

    The help text of a flag is its field's arg() text. Bools take true/false (also 1/0, yes/no),
    and a bare flag means true: `--compile` is `--compile=true`. No abbreviations: `--lr` is an
    error, not a guess. If cls has a PRESETS dict and a `preset` field, the chosen preset is
    applied first and the flags given override it. A value that cls rejects (its __post_init__
    raises ValueError or FileNotFoundError) ends the program with one line `error: <message>` on
    stderr and exit status 2: no usage dump, no traceback.
    """

    def to_bool(text: str) -> bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")

    presets = getattr(cls, "PRESETS", {})
    epilog = "presets:\n" + "\n".join(f"  {name}: {values}" for name, values in presets.items())
    parser = argparse.ArgumentParser(description=(cls.__doc__ or "").split("\n")[0], allow_abbrev=False,
                                     epilog=epilog if presets else None,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(cls):
        flag = f.type is bool
        help_text = f"{f.metadata.get('help', '')} (default: {f.default!r})".replace("%", "%%").lstrip()
        parser.add_argument(f"--{f.name}", type=to_bool if flag else f.type, metavar=f.type.__name__,
                            nargs="?" if flag else None, const=True if flag else None,
                            default=argparse.SUPPRESS, help=help_text,  # SUPPRESS: absent flags stay absent
                            choices=sorted(presets) if f.name == "preset" and presets else None)
    given = vars(parser.parse_args(argv))
    preset = presets.get(given.get("preset", getattr(cls, "preset", None)), {})
    try:
        return cls(**{**preset, **given})
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


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
def pick_dtype(dtype: str, device: str) -> str:
    """The precision to train in. "auto" -> "bfloat16" on CUDA GPUs that do bf16 natively (Ampere,
    compute capability 8.0, and newer), "float16" on older CUDA GPUs, "float32" on CPU and MPS.

    bf16 keeps fp32's exponent range, so it trains as is; fp16's range is narrow, and its small
    gradients underflow to 0 unless the loss is scaled up first (a GradScaler, used here on CUDA
    only, hence float16 is refused elsewhere). Older GPUs emulate bf16, slowly, and PyTorch counts
    emulation as support unless asked for native support only. On CPU, fp32 is exact and fast
    enough for small models; a CPU with bf16 units can take --dtype=bfloat16 by choice.
    """
    allowed = ("auto", "float32", "bfloat16", "float16")
    if dtype not in allowed:
        raise ValueError(f"--dtype={dtype!r} is not valid; use {', '.join(allowed)}")
    cuda = torch.device(device).type == "cuda"
    if dtype == "float16" and not cuda:
        raise ValueError("--dtype=float16 needs loss scaling, done here on CUDA only; use bfloat16 or float32")
    if dtype != "auto":
        return dtype
    if cuda:
        return "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
    return "float32"


# copied from 05_pretrain.py: load_checkpoint
def load_checkpoint(path):
    """(model, tokenizer, checkpoint dict) from a checkpoint of these scripts (05 to 08 write them).

    The model is 04's GPT, built from ckpt["model_args"] on the CPU, in training mode: move it with
    .to(device) and call .eval() to sample. mmap=True maps the file instead of reading it all, so the
    optimizer state is never read unless used. weights_only=True: loading runs no pickled code, so
    a checkpoint from elsewhere cannot execute anything. Keys of a torch.compile'd model carry an
    "_orig_mod." prefix; it is stripped, so any such checkpoint loads into a plain model.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}; train one with `python 05_pretrain.py` "
                                f"(it writes out_dir/ckpt.pt), or check the path")
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        missing = {"model", "model_args", "tokenizer"} - set(ckpt)
    except (pickle.UnpicklingError, RuntimeError, EOFError, TypeError):  # not torch.save's zip, or foreign
        missing = {"everything"}
    if missing:
        raise ValueError(f"{path} is not a checkpoint of these scripts (it lacks {sorted(missing)}); "
                         f"05_pretrain.py to 08_dpo.py write them as out_dir/ckpt.pt")
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    return model, get_tokenizer(ckpt["tokenizer"]), ckpt


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


if __name__ == "__main__":
    main()
