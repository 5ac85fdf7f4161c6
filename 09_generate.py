"""Stage 9: generation, fast: a KV cache, sampling, batches, chat and evaluation.

A GPT scores "what comes next"; generating is a loop around it (score, pick, append) made useful:
  - Sampling: greedy, temperature, top-k, top-p, seeded; stops at <|endoftext|> or stop strings;
    streamed as it is made, whole UTF-8 characters only.
  - The KV cache (03's). Without it each new token reruns the model over the whole context: O(T) work
    per token, O(T^2) per text. In a causal model the keys and values of past tokens never change, so
    we keep them and feed the model only the newest token. `forward_cached` runs the model's own
    modules around the cache: 04's GPT is untouched, any checkpoint of 05-08 works. `--bench` times it.
  - Batches: prompts of unequal length are LEFT-padded so their last tokens line up; a mask hides
    the padding, and each row's positions start at 0 at its first real token, as if it were alone.
  - Chat in 07's instruction template; perplexity and bits per byte of a text over strided windows
    (bits per byte does not depend on the tokenizer: a char and a BPE model compare on one text).

References: Radford et al. 2019 (GPT-2); nanoGPT's sample.py; Raschka, "Build a Large Language Model
(From Scratch)", ch. 5, 7; Holtzman et al. 2019 (top-p); Pope et al. 2022 (KV caching); Hugging Face,
"Perplexity of fixed-length models".

Run it (after `python 05_pretrain.py`, which writes out/shakespeare-char/ckpt.pt):
  python 09_generate.py                                 # sample from 05's Shakespeare model
  python 09_generate.py --prompt="ROMEO:" --temperature=0 --max_new_tokens=200 --num_samples=3
  python 09_generate.py --ckpt=out/finetune/ckpt.pt --chat        # 07's model (out/dpo/ckpt.pt: 08's)
  python 09_generate.py --eval_file=data/tinyshakespeare.txt      # perplexity, bits per byte
  python 04_gpt.py --init_from=gpt2 --save_ckpt && python 09_generate.py --ckpt=data/gpt2/ckpt.pt   # OpenAI's
  python 09_generate.py --device=cuda    # one GPU (bf16 autocast where the GPU has it natively)
  python 09_generate.py --bench          # tokens/s with and without the cache (CPU: ~3 minutes)
"""

import argparse
import codecs
import math
import pickle
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Sampling (the logits of the last position -> one token id), and the KV cache


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be a positive integer (or None/0 for no limit), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus filter), got {top_p}")


# The draw: token i with probability p_i is the largest p_i / E_i, each E_i an independent Exp(1) draw
# (an "exponential race": E_i / p_i is Exp(p_i), and the smallest of those is i's with probability p_i).
# torch.multinomial draws one sample just so, from the same generator, after checking the
# probabilities (NaN, inf, negative), a check that has cost host syncs per token on CUDA in some
# PyTorch versions. This draws the same tokens (tested on CPU), unchecked: a NaN does not raise here.
def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None) -> torch.Tensor:
    """One token per row of logits (B, V) -> (B,), drawn with `generator` (seeded).

    temperature 0 is greedy (argmax); otherwise the logits are divided by it (< 1 sharper, > 1
    flatter; towards 0, one-hot on the argmax). top_k keeps the k largest logits (ties too); top_p
    the fewest most likely tokens whose probabilities reach top_p (Holtzman et al. 2019): of probs
    [0.5, 0.3, 0.15, 0.05], top_p=0.8 keeps two; the third goes, the mass above it reaches 0.8.
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[..., -1:]  # (B, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        probs, order = torch.sort(F.softmax(logits, dim=-1), dim=-1, descending=True)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # the tokens ranked above already reach top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))  # rank -> token order
    probs = F.softmax(logits, dim=-1)
    return (probs / torch.empty_like(probs).exponential_(generator=generator)).argmax(dim=-1)  # multinomial


# The cache itself is 03's KVCache, and the forward pass around it 07's final_hidden: the model's own
# modules, so 04's GPT is untouched and any checkpoint of 05-08 works. What generation adds is the
# bookkeeping of a batch of left-padded rows, kept beside the keys and values: which cached keys are
# padding (key_real) and where each row's positions go on (next_pos).
class BatchCache:
    """03's KVCache (kv) plus, for left-padded rows: key_real (B, length), False at padding; next_pos
    (B, 1), each row's next position id; padded, whether any cached key is padding (else no mask)."""

    def __init__(self, n_layer: int, max_len: int):
        self.kv, self.key_real, self.next_pos, self.padded = KVCache(n_layer, max_len), None, None, False


def forward_cached(model, idx, cache=None, attention_mask=None, last_only=False):
    """The GPT forward pass around a BatchCache (None: the whole context, nothing kept).

    idx (B, T) are the NEW tokens: their keys/values join the cache, and they attend to everything
    in it. attention_mask (B, T): False at (left) padding. Position ids count each row's real
    tokens, on from the cache: [pad pad a b] gets [0 0 0 1], what `a b` alone gets. Returns logits
    (B, T, V), or (B, 1, V) with last_only (the head is 38.6M of GPT-2's 124M weights). The head runs
    in fp32 outside autocast: sampling and perplexity see exact logits (bf16's steps are 0.125-0.5 at
    GPT-2's logit sizes). For inference: call model.eval() first (dropout off).
    """
    B, T = idx.shape
    t0, limit = 0 if cache is None else cache.kv.length, model.config.block_size
    if t0 + T > limit:
        raise ValueError(f"{t0} cached + {T} new tokens exceed the context of {limit} positions; crop the "
                         f"input or start a new cache (generate_tokens slides the window)")  # fmt: skip
    real = torch.ones_like(idx, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    position_ids = (cache.next_pos if t0 else 0) + (real.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T)
    padded, key_real = attention_mask is not None and not bool(real.all()), real  # key_real: (B, L)
    if cache is not None:
        cache.key_real = real if cache.key_real is None else torch.cat([cache.key_real, real], dim=1)
        cache.padded |= padded
        padded, key_real = cache.padded, cache.key_real
    mask = None  # no padding: causal suffices (KVCache.attend shifts it for a later chunk)
    if padded:
        q_pos = torch.arange(t0, t0 + T, device=idx.device)[:, None]  # (T, 1)
        k_pos = torch.arange(t0 + T, device=idx.device)[None, :]  # (1, L)
        mask = (k_pos <= q_pos) & key_real[:, None, :]  # (B, T, L) causal and key is real
        mask = (mask | (k_pos == q_pos))[:, None]  # (B, 1, T, L); a padded query sees itself: no NaN
    # no cache: plain causal attention (perplexity), or, for the padding mask, a cache used once
    kv = cache.kv if cache is not None else KVCache(model.config.n_layer, T) if padded else None
    h = final_hidden(model, idx, position_ids, mask, kv)  # (B, T, C)
    with torch.autocast(idx.device.type, enabled=False):
        logits = model.lm_head((h[:, -1:] if last_only else h).float())  # (B, T or 1, V)
    if cache is not None:
        cache.next_pos = position_ids[:, -1:] + 1  # (B, 1)
    return logits


# -----------------------------------------------------------------------------
# Generation (batches, a full context, stopping, streaming), and what it serves: chat, evaluation


def left_pad(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """[[5, 6, 7], [8]] -> idx [[5, 6, 7], [0, 0, 8]], mask [[1, 1, 1], [0, 0, 1]] (bool). Left: every
    row's last token is in the last column, so each step appends one new column."""
    if not prompts or not all(prompts):
        raise ValueError("every prompt needs at least one token; start from the eot token or a newline")
    T = max(len(p) for p in prompts)
    idx = torch.tensor([[0] * (T - len(p)) + list(p) for p in prompts], device=device)  # pad id 0: masked
    return idx, torch.tensor([[False] * (T - len(p)) + [True] * len(p) for p in prompts], device=device)


@torch.no_grad()
def generate_tokens(model, prompts, temperature=1.0, top_k=None, top_p=None, generator=None, use_cache=True):
    """Yield (next_ids (B,), logits (B, V)) for ever, a step per token; the caller decides when to stop.

    prompts: token-id lists of any lengths (left-padded). use_cache=False reruns the whole context
    each step (the same tokens, O(T) times the work). The model knows positions 0 .. block_size-1
    only: a longer prompt keeps its last block_size tokens, and a full context slides to its last
    block_size // 2 tokens, re-encoded from position 0 into a fresh cache. Why not slide by one, as
    04's generate does? Each cached key was computed at its absolute position; moving the window by
    one changes them all, so the cache is stale every step: no cache at all. Halving costs one
    prefill per block_size // 2 tokens. Each row of a batch slides as it would alone.
    """
    block_size, keep = model.config.block_size, max(1, model.config.block_size // 2)
    device = model.lm_head.weight.device
    idx, mask = left_pad([p[-block_size:] for p in prompts], device)  # (B, T) each
    cache, logits = None, None
    while True:
        if logits is None:  # encode the whole window: the prompt, after a slide, or every step uncached
            cache = BatchCache(model.config.n_layer, block_size) if use_cache else None
            logits = forward_cached(model, idx, cache, attention_mask=mask, last_only=True)[:, -1]  # (B, V)
        next_ids = sample(logits, temperature, top_k, top_p, generator)  # (B,)
        yield next_ids, logits
        idx = torch.cat([idx, next_ids[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if idx.size(1) > block_size:  # full: slide the rows that are, re-pad, re-encode
            rows = [[t for t, real in zip(row, is_real) if real]
                    for row, is_real in zip(idx.tolist(), mask.tolist())]  # each row's own tokens
            idx, mask = left_pad([row[-keep:] if len(row) > block_size else row for row in rows], device)
            logits = None
        else:  # with the cache only the new token; without it, the whole window again
            logits = forward_cached(model, next_ids[:, None], cache)[:, -1] if use_cache else None


def token_bytes(tok, token_id: int) -> bytes:
    """The UTF-8 bytes of a token: a GPT-2 token may hold part of a character ('é' is 2 bytes)."""
    if hasattr(tok, "decode_single_token_bytes"):  # tiktoken; a char tokenizer's tokens are whole characters
        return tok.decode_single_token_bytes(token_id)
    return tok.decode([token_id]).encode("utf-8")


class TextStream:
    """Token ids in, text out once it is certain: whole characters only, never past a stop string.

    (1) A BPE token may end inside a UTF-8 character (decoded alone: '\\ufffd'); an incremental
    decoder keeps the bytes until the character is whole. (2) A stop string may come split over
    tokens ("\\n\\n###" as "\\n\\n" + "###"), so text that may begin one is held back until it is
    completed (generation stops; it is never shown) or ruled out (it is shown).

    >>> tok = CharTokenizer("\\nHi")
    >>> stream = TextStream(tok, stop_strings=["\\n\\n"])
    >>> [stream.add(i) for i in tok.encode("Hi\\n")], stream.add(tok.encode("\\n")[0]), stream.stopped
    (['H', 'i', ''], '', True)
    """

    def __init__(self, tok, stop_strings=(), on_text=None):
        self.tok, self.stop_strings, self.on_text = tok, [s for s in stop_strings if s], on_text
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text, self.shown, self.stopped = "", 0, False  # shown: characters handed to on_text

    def add(self, token_id: int) -> str:
        """Feed one token; return (and pass to on_text) the text that became certain."""
        self.text += self.decoder.decode(token_bytes(self.tok, token_id))
        # a stop string can only start in the unshown part: everything shown was ruled out
        if hits := [i for s in self.stop_strings if (i := self.text.find(s, self.shown)) >= 0]:
            self.text, self.stopped = self.text[: min(hits)], True
        return self._show(len(self.text) if self.stopped else len(self.text) - self._held_back())

    def finish(self) -> str:
        """Generation ended (eot, max_new_tokens): show what was held back, incomplete bytes as '\\ufffd'."""
        if not self.stopped:
            self.text += self.decoder.decode(b"", final=True)
        return self._show(len(self.text))

    def _held_back(self) -> int:  # the longest end of the text that begins a stop string
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
    """Up to max_new_tokens new ids per prompt (token-id lists). A row ends at eot_token (left out) or
    when its TextStream (streams: one per row) meets a stop string; ended rows ride along."""
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


def complete(model, tok, prompts, cfg, stop_strings=(), eot_token=None) -> list[str]:
    """Each prompt's (token ids, one batch) new text, with cfg's settings; row 0 streams to stdout."""
    show = lambda chunk: print(chunk, end="", flush=True)  # noqa: E731
    streams = [TextStream(tok, stop_strings, show if row == 0 else None) for row in range(len(prompts))]
    generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(cfg.seed)
    generate(model, prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_k or None, cfg.top_p, generator,
             eot_token=eot_token, streams=streams, use_cache=cfg.use_cache)  # fmt: skip
    return [s.text for s in streams]


def chat(model, tok, cfg, ckpt: dict) -> None:
    """A loop of single-turn prompts, each what 07 trained on: format_input + RESPONSE_HEADER, encoded
    in two parts (BPE could merge tokens across the seam). A char model lacks characters such as the
    template's '#': each becomes 07's unknown_char, and only those the user typed are reported.
    Answers end as 07 taught: at <|endoftext|> (GPT-2) or a newline (char), or at a "### " header."""
    if ckpt.get("stage") not in ("finetune", "dpo"):
        print(f"note: a {ckpt.get('stage')} checkpoint; chat needs an instruction-tuned one (07 or 08)")
    known, unknown = set(getattr(tok, "chars", "")), ckpt.get("config", {}).get("unknown_char") or "?"
    encode_text = (lambda text: tok.encode("".join(c if c in known else unknown for c in text))) if known \
        else (lambda text: tok.encode(text, disallowed_special=()))  # as 07: a typed "<|endoftext|>" is text
    print("chat: type a message; an empty line, /quit or Ctrl-D ends")
    while True:
        try:
            message = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, Ctrl-C
            message = ""
        if message in ("", "/quit", "/exit"):
            return print()
        if known and (lacking := "".join(sorted(set(message) - known))):
            print(f"(not among this model's characters, sent as {unknown!r}: {lacking!r})")
        prompt = encode_text(format_input({"instruction": message})) + encode_text(RESPONSE_HEADER)
        print("model> ", end="", flush=True)
        complete(model, tok, [prompt], cfg, ["\n\n### "], tok.encode("\n")[0] if known else tok.eot_token)
        print()


def strided_windows(n_tokens: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows (begin, end, n_scored) over n_tokens tokens that score every target once.

    Inputs ids[begin:end], targets ids[begin+1:end+1], of which only the last n_scored count (the
    earlier ones were scored, with less context, by the window before). All windows are T =
    min(block_size, n_tokens - 1) long (so they batch) and end `stride` apart, so each target after
    the first window has >= T - stride tokens of context: stride T is fast, stride 1 most informed.

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

    loss = mean negative log-likelihood per token (nats), perplexity = exp(loss), bits per byte =
    total nats / ln 2 / UTF-8 bytes scored: the tokenizer changes perplexity (a character is easier
    to guess than a word), not bits per byte. GPT-2 reads the text after an <|endoftext|>, so every
    token is scored; a char model's first character is context only. stride 0: block_size // 2.
    batch_size windows per forward (fewer if their logits would pass 2**27 numbers, 512 MB). progress:
    tokens scored, rate and time left on stderr every 5 s.
    """
    ids = ([] if tok.eot_token is None else [tok.eot_token]) + encode(tok, text)
    n_tokens, block_size, V = len(ids) - 1, model.config.block_size, model.config.vocab_size
    windows = strided_windows(len(ids), block_size, stride or max(1, min(block_size, n_tokens) // 2))
    data, T = torch.tensor(ids, device=model.lm_head.weight.device), windows[0][1] - windows[0][0]
    batch_size = max(1, min(batch_size, 2**27 // (T * V)))  # GPT-2, T=1024: 2 windows per pass
    nats, done, t0 = 0.0, 0, time.perf_counter()
    shown = t0
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]
        x = torch.stack([data[b:e] for b, e, _ in batch])  # (B, T)
        y = torch.stack([data[b + 1 : e + 1] for b, e, _ in batch])  # (B, T)
        nll = F.cross_entropy(forward_cached(model, x).flatten(0, 1), y.view(-1), reduction="none").view_as(y)
        n_scored = torch.tensor([n for *_, n in batch], device=x.device)[:, None]  # (B, 1)
        nats += nll[torch.arange(T, device=x.device) >= T - n_scored].sum().item()  # each row's last n
        done, now = done + sum(n for *_, n in batch), time.perf_counter()
        if progress and now - shown >= 5:
            rate, shown = done / (now - t0), now
            print(f"scored {done:,} / {n_tokens:,} tokens, {rate:,.0f} tokens/s, "
                  f"{(n_tokens - done) / rate:,.0f} s left", file=sys.stderr, flush=True)  # fmt: skip
    n_bytes, loss = sum(len(token_bytes(tok, t)) for t in ids[1:]), nats / n_tokens
    return {"tokens": n_tokens, "bytes": n_bytes, "loss": loss, "perplexity": math.exp(loss),
            "bits_per_byte": nats / math.log(2) / n_bytes}  # fmt: skip


def bench(cfg) -> None:
    """tokens/s with and without the cache (random weights: speed does not depend on them), and ms
    per token over the first -> the last 64 new ones: flat with the cache, O(T) growing without. The
    context is 1024 tokens, so 16 + 512 fit without sliding: the timing shows the cache alone."""
    print(f"{cfg.device}, {cfg.dtype}, {torch.get_num_threads()} threads, greedy, batch 1, prompt 16 tokens\n"
          "   model   new  tok/s cache  no cache  speedup   ms/token cache         no cache")
    for preset in cfg.bench_presets.split(","):
        model = GPT(GPTConfig.from_preset(preset, vocab_size=50257, block_size=1024)).to(cfg.device).eval()
        for n_new in (8, 256, 512):  # 8: a warm-up (allocations, kernel choice), not shown
            row = []
            for use_cache in (True, False):
                steps = generate_tokens(model, [list(range(16))], temperature=0, use_cache=use_cache)
                t0, times = time.perf_counter(), []
                for _, (next_ids, _) in zip(range(n_new), steps):
                    next_ids.tolist()  # wait for the token (and the GPU), as a reader of the stream would
                    times.append(time.perf_counter() - t0)
                ms = [1e3 * (b - a) for a, b in zip([0.0] + times, times)]
                row += [n_new / times[-1], f"{sum(ms[:64]) / 64:.1f} -> {sum(ms[-64:]) / 64:.1f}"]
            if n_new > 8:
                print(f"{preset:>8} {n_new:>5} {row[0]:>12,.1f} {row[2]:>9,.1f} {row[0] / row[2]:>7.1f}x "
                      f"{row[1]:>16} {row[3]:>16}")  # fmt: skip


# -----------------------------------------------------------------------------
# Command line

DEFAULT_CKPT = "out/shakespeare-char/ckpt.pt"  # what `python 05_pretrain.py` writes: the Quick start's model
STAGES = {"pretrain": "05", "distributed": "06", "finetune": "07", "dpo": "08"}  # the scripts that write them


@dataclass
class GenerateConfig:
    """Sample from, chat with, evaluate or benchmark a GPT: a checkpoint of 05-08."""

    ckpt: Annotated[str, "a checkpoint of 05-08 (default: 05's Shakespeare model)"] = DEFAULT_CKPT
    prompt: Annotated[str, 'the text to continue; "" = <|endoftext|> (GPT-2) or a newline (char)'] = ""
    num_samples: Annotated[int, "samples of the prompt, generated together as one batch"] = 1
    max_new_tokens: Annotated[int, "tokens to generate per sample"] = 500
    temperature: Annotated[float, "0 = greedy; < 1 sharper, > 1 more random"] = 0.8
    top_k: Annotated[int, "sample among the k most likely tokens; 0 = no limit"] = 200
    top_p: Annotated[float, "nucleus: the most likely tokens covering this probability; 1 = off"] = 1.0
    seed: Annotated[int, "the sampling seed"] = 1337
    stop: Annotated[str, 'stop strings, comma-separated; "\\n" is a newline (--stop="\\n\\n,THE END")'] = ""
    use_cache: Annotated[bool, "the KV cache (false: rerun the whole context for every token)"] = True
    chat: Annotated[bool, "chat with an instruction-tuned checkpoint (07/08)"] = False
    eval_file: Annotated[str, "print perplexity and bits per byte of this text file"] = ""
    eval_stride: Annotated[int, "evaluation windows advance by this many tokens; 0 = block_size // 2"] = 0
    bench: Annotated[bool, "time tokens/s with and without the cache (random weights)"] = False
    bench_presets: Annotated[str, "GPTConfig presets to benchmark, comma-separated"] = "small,gpt2"
    device: Annotated[str, "auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps"] = "auto"
    dtype: Annotated[str, "auto (see pick_dtype), float32, bfloat16, float16 (CUDA)"] = "auto"
    threads: Annotated[int, "CPU threads; 0 = PyTorch's default"] = 0

    def __post_init__(self):  # checked before loading anything; parse_config prints the error
        self.device = pick_device(self.device)  # "auto" -> cuda, mps or cpu
        self.dtype = pick_dtype(self.dtype, self.device)
        check_sampling(self.temperature, self.top_k or None, self.top_p)
        if min(self.max_new_tokens, self.num_samples - 1, self.eval_stride, self.threads) < 0:
            raise ValueError("need --max_new_tokens, --eval_stride, --threads >= 0 and --num_samples >= 1")
        for preset in self.bench_presets.split(",") if self.bench else []:
            GPTConfig.from_preset(preset)  # an unknown one: a ValueError naming the presets
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
    try:  # onto the CPU, memory-mapped: an optimizer state in the file never reaches the GPU
        model, tok, ckpt = load_checkpoint(cfg.ckpt)
    except (ValueError, FileNotFoundError) as e:
        fail(e)
    stage, val = ckpt.get("stage", "?"), ckpt.get("val_loss", ckpt.get("best_val_loss"))
    script = f"{STAGES[stage]}_{stage}.py" if stage in STAGES else "an unknown script"
    val = f"val loss {val:.4f}" if val is not None and math.isfinite(val) else "no val loss measured"
    print(f"loaded {cfg.ckpt}: the {stage} model of {script} after "
          f"{ckpt.get('iter_num', 0):,} iterations, {val}; {model.num_params() / 1e6:.2f}M parameters, "
          f"{ckpt['tokenizer']['kind']} tokens, context {model.config.block_size}")  # fmt: skip
    return model.to(cfg.device).eval(), tok, ckpt


def encode(tok, text: str) -> list[int]:
    """Text -> ids; for GPT-2, "<|endoftext|>" in the text becomes the eot token (a document break)."""
    if isinstance(tok, CharTokenizer) and (missing := "".join(sorted(set(text) - set(tok.chars)))):
        raise ValueError(f"characters {missing!r} are not in this char model's vocabulary; leave them out")
    return tok.encode(text) if isinstance(tok, CharTokenizer) else tok.encode(text, allowed_special="all")


def main(argv=None):
    cfg = parse_config(GenerateConfig, argv)  # a bad setting: one "error:" line, exit status 2
    if cfg.device.startswith("cuda"):  # TF32 for the matmuls left in fp32 (the head, or --dtype=float32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    with autocast_context(cfg.device.split(":")[0], cfg.dtype):
        if cfg.bench:
            return bench(cfg)
        model, tok, ckpt = load_model(cfg)
        if cfg.chat:
            return chat(model, tok, cfg, ckpt)
        try:
            if cfg.eval_file:
                text = Path(cfg.eval_file).read_text(encoding="utf-8")
                r = evaluate_text(model, tok, text, cfg.eval_stride, progress=True)
                print(f"{cfg.eval_file}: {r['tokens']:,} tokens, {r['bytes']:,} bytes, loss {r['loss']:.4f}, "
                      f"perplexity {r['perplexity']:.3f}, bits per byte {r['bits_per_byte']:.4f}")
                return r
            prompt = cfg.prompt or ("<|endoftext|>" if tok.eot_token is not None else "\n")
            ids = [encode(tok, prompt)] * cfg.num_samples  # one batch
        except ValueError as e:  # text the tokenizer cannot encode, or too short to score
            fail(e)
        print(prompt, end="", flush=True)  # then the first sample streams as it is made
        stop_strings = [s.replace("\\n", "\n").replace("\\t", "\t") for s in cfg.stop.split(",") if s]
        texts = complete(model, tok, ids, cfg, stop_strings, tok.eot_token)
        print("".join(f"\n{'-' * 40}\n{prompt}{text}" for text in texts[1:]))  # the other samples
        return texts


# -----------------------------------------------------------------------------
# Appendix: pieces copied unchanged from earlier stages, so that this file runs on its own.
# Each is its origin's text byte for byte (tests/test_copies.py checks); read them there.


# copied from 01_tokenizer.py: CharTokenizer
class CharTokenizer:
    """One token per character: from_text("hello") gives e=0 h=1 l=2 o=3, so "hole" -> [1, 3, 2, 0]."""

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars):
            raise ValueError("chars has repeated characters; build it with CharTokenizer.from_text(text)")
        self.chars, self.n_vocab, self.eot_token = chars, len(chars), None  # None: no end-of-text token
        self.stoi, self.itos = {ch: i for i, ch in enumerate(chars)}, dict(enumerate(chars))

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
    """{"kind": "char", "chars": ...} -> CharTokenizer; {"kind": "gpt2"} -> tiktoken's GPT-2 encoding."""
    if spec.get("kind") == "char":
        return CharTokenizer(spec["chars"])
    if spec.get("kind") == "gpt2":
        import tiktoken  # only when asked for: char-only scripts do not need it

        return tiktoken.get_encoding("gpt2")
    raise ValueError(f"unknown tokenizer kind {spec.get('kind')!r}; use {{'kind': 'char', 'chars': ...}} "
                     "or {'kind': 'gpt2'}")


# copied from 03_attention.py: CausalSelfAttention
class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, one F.scaled_dot_product_attention call: (B, T, C) -> (B, T, C)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if n_head <= 0 or n_embd % n_head != 0:
            raise ValueError(f"n_embd={n_embd} is not divisible by n_head={n_head}: each head gets n_embd // "
                             "n_head channels; choose an n_head that divides n_embd (GPT-2: 768 and 12)")
        self.n_embd, self.n_head = n_embd, n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)  # q, k, v of all heads in one matmul
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)  # mixes the heads' outputs
        self.attn_dropout_p = dropout  # SDPA takes dropout on the weights as an argument
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        qkv = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in qkv)  # (B, nh, T, hs)
        dropout_p = self.attn_dropout_p if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): the heads side by side again
        return self.resid_dropout(self.c_proj(y))


# copied from 03_attention.py: KVCache
class KVCache:
    """The keys and values of every token so far, per layer, in (B, n_head, max_len, head_size) buffers."""

    def __init__(self, n_layer: int, max_len: int):
        self.k, self.v, self.length, self.max_len = [None] * n_layer, [None] * n_layer, 0, max_len

    def attend(self, attn, x: torch.Tensor, layer: int, mask=None) -> torch.Tensor:
        """attn's (a CausalSelfAttention's) attention for new tokens x (B, T, C) over the cache and x."""
        (B, T, C), start = x.size(), self.length
        q, k, v = attn.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2) for t in (q, k, v))
        if self.k[layer] is None:  # the first call allocates; every later one writes in place
            self.k[layer] = k.new_zeros(B, attn.n_head, self.max_len, C // attn.n_head)
            self.v[layer] = torch.zeros_like(self.k[layer])
        self.k[layer][:, :, start : start + T], self.v[layer][:, :, start : start + T] = k, v
        k, v = self.k[layer][:, :, : start + T], self.v[layer][:, :, : start + T]  # views: no copy
        self.length = start + T if layer == len(self.k) - 1 else start  # the last layer moves it on
        if mask is None and T > 1 and start > 0:  # a later chunk: the causal triangle, shifted by start
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1)
        return attn.c_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C); no dropout at inference


# copied from 04_gpt.py: GPTConfig
@dataclass
class GPTConfig:
    """The numbers that define a GPT; the defaults are GPT-2 small (124M), PRESETS the other sizes."""

    block_size: int = 1024  # longest sequence the model can see (number of learned positions)
    vocab_size: int = 50257  # GPT-2's BPE: 50,000 merges + 256 bytes + <|endoftext|>
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block; each head has n_embd // n_head dimensions
    n_embd: int = 768  # width of the residual stream
    dropout: float = 0.0  # 0 for pretraining (GPT-2 used 0.1); try 0.1+ when finetuning small data
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2; False is a bit faster and as good
    PRESETS: ClassVar[dict[str, dict]] = {  # a class constant, not a field
        "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
        "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
        "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
        "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
        "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),  # nanoGPT's shakespeare-char
        "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64),  # tests and quick demos
    }

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if isinstance(value := getattr(self, name), bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                             f"choose an n_head that divides n_embd (e.g. n_embd={self.n_head * 64})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in cls.PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})


# copied from 04_gpt.py: MLP
class MLP(nn.Module):
    """Position-wise feed-forward: widen 4x, GELU, project back. (B, T, C) -> (B, T, C)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU, so that its weights give its outputs
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C)


# copied from 04_gpt.py: Block
class Block(nn.Module):
    """One transformer block, pre-LayerNorm: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config.n_embd, config.n_head, config.dropout, config.bias)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))  # tokens talk to each other
        return x + self.mlp(self.ln_2(x))  # each token thinks on its own


# copied from 04_gpt.py: GPT
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
        for name, p in self.named_parameters():  # GPT-2's residual projections: std / sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None):
        """idx, targets: (B, T) token ids and next tokens (-100: skip) -> logits (B, T, vocab_size), loss."""
        self._check_input(idx)
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab_size)
        loss = None
        if targets is not None:  # in fp32 whatever the logits' dtype (bf16 under autocast)
            loss = F.cross_entropy(logits.float().view(B * T, -1), targets.reshape(B * T), ignore_index=-100)
        return logits, loss

    def _check_input(self, idx):
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"idx must be a (B, T) tensor of integer token ids, not {tuple(idx.shape)} "
                             f"{idx.dtype}; for one sequence use idx[None], for other dtypes idx.long()")
        if idx.size(1) > (block_size := self.config.block_size):
            raise ValueError(f"sequence length {idx.size(1)} exceeds block_size={block_size} (no position "
                             f"embedding beyond it); crop to the last tokens with idx[:, -{block_size}:]")
        # eager CPU tensors only: min/max would make the CPU wait for a GPU and break torch.compile's graph
        if idx.numel() and idx.device.type == "cpu" and not torch.compiler.is_compiling():
            lo, hi, vocab_size = idx.min().item(), idx.max().item(), self.config.vocab_size
            if lo < 0 or hi >= vocab_size:
                raise ValueError(f"token ids must be in [0, {vocab_size}), got ids from {lo} to {hi}; the "
                                 "tokenizer and the model disagree: set GPTConfig.vocab_size to its n_vocab")

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, the tied wte/lm_head once; non_embedding=True leaves out wpe (a lookup, no FLOPs)."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        return n - self.transformer.wpe.weight.numel() if non_embedding else n


# copied from 04_gpt.py: parse_config
def parse_config(cls, argv=None):
    """The dataclass cls from the command line: a --field=value flag per Annotated field (bools also
    bare), cls.PRESETS first when cls has them; a ValueError from cls is one `error:` line, exit 2."""

    def to_bool(text: str) -> bool:
        if text.lower() not in ("1", "true", "yes", "0", "false", "no"):
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        return text.lower() in ("1", "true", "yes")

    presets = getattr(cls, "PRESETS", {})
    parser = argparse.ArgumentParser(description=(cls.__doc__ or "").split("\n")[0], allow_abbrev=False,
                                     epilog="".join(f"preset {k}: {v}\n" for k, v in presets.items()),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(cls):  # `n_layer: Annotated[int, "transformer blocks"] = 4`: type, help, default
        kind, help_text = f.type.__origin__, f.type.__metadata__[0]
        flag = kind is bool
        parser.add_argument(f"--{f.name}", type=to_bool if flag else kind, metavar=kind.__name__,
                            nargs="?" if flag else None, const=True if flag else None,
                            default=argparse.SUPPRESS,  # absent flags stay absent: the preset or default
                            help=f"{help_text} (default: {f.default!r})".replace("%", "%%"))
    parser.error = lambda message: parser.exit(2, f"error: {message} (see --help)\n")  # one line, no usage
    given = vars(parser.parse_args(argv))
    preset = given.get("preset", getattr(cls, "preset", None))
    try:
        if presets and preset not in presets:
            raise ValueError(f"--preset={preset!r} is not valid; use {', '.join(presets)}")
        return cls(**{**presets.get(preset, {}), **given})
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# copied from 04_gpt.py: pick_device
def pick_device(device: str = "auto") -> str:
    """"auto" -> cuda if there is a GPU, else mps (Apple silicon), else cpu; others are checked."""
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if device == "auto":
        return next(kind for kind in ("cuda", "mps", "cpu") if available[kind])
    kind, _, index = device.partition(":")
    if kind not in available or (index and not index.isdigit()):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:<index> or mps")
    if not available[kind] or (index and kind == "cuda" and int(index) >= torch.cuda.device_count()):
        raise ValueError(f"device {device!r} is not available on this machine; use --device=auto (or cpu)")
    return device


# copied from 04_gpt.py: pick_dtype
def pick_dtype(dtype: str, device: str) -> str:
    """"auto" -> bfloat16 on CUDA GPUs that do it natively (compute capability 8.0+), float16 on
    older ones (with a GradScaler), float32 on CPU and MPS. Explicit choices are checked."""
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype={dtype!r} is not valid; use auto, float32, bfloat16, float16")
    cuda = torch.device(device).type == "cuda"
    if dtype == "float16" and not cuda:
        raise ValueError("--dtype=float16 needs loss scaling, done on CUDA only; use bfloat16 or float32")
    if dtype != "auto":
        return dtype
    if cuda:
        return "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
    return "float32"


# copied from 04_gpt.py: autocast_context
def autocast_context(device_type: str, dtype: str):
    """Mixed precision for the forward pass: torch.autocast in dtype, or nothing for float32."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))


# copied from 05_pretrain.py: load_checkpoint
def load_checkpoint(path):
    """(model, tokenizer, checkpoint dict) from a checkpoint of 05-08; the model is on the CPU. mmap:
    what is not used (Adam's state) is never read. A torch.compile'd model's "_orig_mod." is dropped."""
    if not (path := Path(path)).exists():
        raise FileNotFoundError(f"no checkpoint at {path}; train one with `python 05_pretrain.py` "
                                f"(it writes out_dir/ckpt.pt), or check the path")
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError):  # not torch.save's format, or not just tensors
        ckpt = None
    if not isinstance(ckpt, dict) or not {"model", "model_args", "tokenizer"} <= set(ckpt):
        raise ValueError(f"{path} is not a checkpoint of these scripts (05_pretrain.py to 08_dpo.py write "
                         f"them as out_dir/ckpt.pt); check the path")
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    return model, get_tokenizer(ckpt["tokenizer"]), ckpt


# copied from 07_finetune.py: final_hidden
def final_hidden(model, idx, position_ids=None, mask=None, cache=None):
    """(B, T) ids -> (B, T, n_embd) after ln_f; with a cache (03's KVCache), idx are the tokens after it."""
    tr, start = model.transformer, 0 if cache is None else cache.length
    if position_ids is None:
        position_ids = torch.arange(start, start + idx.size(1), device=idx.device)  # (T,)
    x = tr.drop(tr.wte(idx) + tr.wpe(position_ids))  # (B, T, C)
    for layer, block in enumerate(tr.h):
        h = block.ln_1(x)
        x = x + (block.attn(h) if cache is None else cache.attend(block.attn, h, layer, mask))
        x = x + block.mlp(block.ln_2(x))
    return tr.ln_f(x)


# copied from 07_finetune.py: RESPONSE_HEADER
RESPONSE_HEADER = "\n\n### Response:\n"  # between the prompt and the answer


# copied from 07_finetune.py: format_input
def format_input(entry: dict) -> str:
    """Alpaca's prompt for an entry: a fixed preamble, "### Instruction:", and "### Input:" if any."""
    instruction_text = (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{entry['instruction']}"
    )
    input_text = f"\n\n### Input:\n{entry['input']}" if entry.get("input") else ""
    return instruction_text + input_text


if __name__ == "__main__":
    main()
