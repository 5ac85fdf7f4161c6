"""Stage 9: generation, fast: a KV cache, sampling, batches and chat.

A GPT scores "what comes next"; generating is a loop around it (score, pick, append) made useful:
  - Sampling: greedy, temperature, top-k, top-p, seeded; stops at <|endoftext|> or stop strings;
    streamed as it is made, whole UTF-8 characters only.
  - The KV cache (03's). Without it each token reruns the model over the whole context: O(T) work
    per token, O(T^2) per text. In a causal model past tokens' keys and values never change: we
    keep them and feed the model only the newest token. `forward_cached` runs the model's own
    modules around the cache (04's GPT untouched, 05-08's checkpoints work); `--bench` times it.
  - Batches: prompts of unequal length are LEFT-padded so their last tokens line up; a mask hides
    the padding, and each row's positions start at 0 at its first real token, as if it were alone.
  - Chat in 07's instruction template, and answers to a file of instructions (07's test split),
    made in batches for 11_evaluate.py to judge. (A text's perplexity: 11_evaluate.py too.)

References: Radford et al. 2019 (GPT-2); nanoGPT's sample.py; Raschka, "Build a Large Language
Model (From Scratch)", ch. 5, 7; Holtzman et al. 2019 (top-p); Pope et al. 2022 (KV caching).

Run it (after `python 05_pretrain.py`, which writes out/shakespeare-char/ckpt.pt):
  python 09_generate.py                                 # sample from 05's Shakespeare model
  python 09_generate.py --prompt="ROMEO:" --temperature=0 --max_new_tokens=200 --num_samples=3
  python 09_generate.py --ckpt=out/finetune/ckpt.pt --chat   # 07's model (out/dpo/ckpt.pt: 08's)
  python 09_generate.py --ckpt=out/finetune/ckpt.pt --answers=out/finetune/test.json --temperature=0
  python 04_gpt.py --init_from=gpt2 --save_ckpt && python 09_generate.py --ckpt=data/gpt2/ckpt.pt
  python 09_generate.py --device=cuda    # one GPU (bf16 autocast where the GPU has it natively)
  python 09_generate.py --bench          # tokens/s with and without the cache (CPU: ~3 minutes)
"""

import argparse
import codecs
import json
import math
import os
import pickle
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Sampling (the logits of the last position -> one token id), and the KV cache


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature >= 0:  # nan too
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be a positive integer (None: no limit), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus filter), got {top_p}")


# The draw: token i with probability p_i is the largest p_i / E_i, each E_i an independent Exp(1)
# draw (an "exponential race": E_i / p_i is exponential of rate p_i, and the smallest is i's with
# probability p_i). torch.multinomial draws one sample just so, from the same generator, after
# checking the probabilities (NaN, inf, negative), a check that has cost host syncs per token on
# CUDA in some PyTorch versions. Same tokens here (tested on CPU), unchecked: a NaN does not raise.
def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None) -> torch.Tensor:
    """One token per row of logits (B, V) -> (B,), drawn with `generator` (seeded).

    temperature 0 is greedy (argmax); otherwise the logits are divided by it (< 1 sharper, > 1
    flatter; towards 0, one-hot on the argmax). top_k keeps the k largest logits (ties too); top_p
    the fewest most likely tokens whose probabilities reach top_p (Holtzman et al. 2019): of probs
    [0.5, 0.3, 0.15, 0.05], top_p=0.75 keeps two; the third goes: the mass above it, 0.8, reaches
    0.75 (at exactly 0.8 float rounding would decide).
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / max(temperature, 1e-6)  # a tinier one: the same, and no inf
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[..., -1:]  # (B, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        probs = F.softmax(logits, dim=-1)  # (B, V)
        ranked, order = torch.sort(probs, dim=-1, descending=True)  # order: rank -> token id
        mass_above = ranked.cumsum(dim=-1) - ranked  # of the tokens ranked above each one
        drop_ranked = (mass_above >= top_p) & (mass_above > 0)  # the first one always stays
        drop = drop_ranked.scatter(-1, order, drop_ranked)  # rank order -> token order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    exponential = torch.empty_like(probs).exponential_(generator=generator)  # (B, V) E_i ~ Exp(1)
    return (probs / exponential).argmax(dim=-1)  # token i with probability p_i, as multinomial


# The cache itself is 03's KVCache, and the forward pass around it is final_hidden: 04's
# GPT.forward without the head and the input checks, with per-row position_ids and a cache (a mask
# counts only with a cache; without one, attention is plain causal). The model's own modules run,
# so 04's GPT is untouched and any checkpoint of 05-08 works.
def final_hidden(model, idx, position_ids=None, mask=None, cache=None):
    """(B, T) ids -> (B, T, n_embd) after ln_f; with a cache (03's KVCache), idx come after it."""
    transformer = model.transformer
    if position_ids is None:
        start = 0 if cache is None else cache.length  # the tokens the cache holds already
        position_ids = torch.arange(start, start + idx.size(1), device=idx.device)  # (T,)
    tok_emb = transformer.wte(idx)  # (B, T, C)
    pos_emb = transformer.wpe(position_ids)  # (T, C), or (B, T, C) with a row's own positions
    x = transformer.drop(tok_emb + pos_emb)  # (B, T, C)
    for layer, block in enumerate(transformer.h):
        h = block.ln_1(x)
        if cache is None:
            x = x + block.attn(h)
        else:
            x = x + cache.attend(block.attn, h, layer, mask)
        x = x + block.mlp(block.ln_2(x))
    return transformer.ln_f(x)


# What generation adds is the bookkeeping of a batch of left-padded rows, kept beside the keys and
# values: which cached keys are padding (key_real) and where each row's positions go on (next_pos).
class BatchCache:
    """03's KVCache (kv) plus, for left-padded rows: key_real (B, length), False at padding;
    next_pos (B, 1), each row's next position; padded: some cached key is padding (else no mask)."""

    def __init__(self, n_layer: int, max_len: int):
        self.kv = KVCache(n_layer, max_len)
        self.key_real = None
        self.next_pos = None
        self.padded = False


def forward_cached(model, idx, cache=None, attention_mask=None, last_only=False):
    """The GPT forward pass around a BatchCache (None: the whole context, nothing kept).

    idx (B, T) are the NEW tokens: their keys/values join the cache, and they attend to everything
    in it. attention_mask (B, T): False at (left) padding. Position ids count each row's real
    tokens, on from the cache: [pad pad a b] gets [0 0 0 1], what `a b` alone gets. Returns logits
    (B, T, V), or (B, 1, V) with last_only (the head, 38.6M of GPT-2's 124M weights, then runs at
    the last position only). The head runs in fp32 outside autocast (TF32 on CUDA), far finer than
    bf16, whose steps are 0.125-0.5 at GPT-2's logit sizes. For inference: call model.eval() first.
    """
    B, T = idx.shape
    t0 = 0 if cache is None else cache.kv.length  # tokens already cached
    limit = model.config.block_size
    if t0 + T > limit:
        raise ValueError(f"{t0} cached + {T} new tokens exceed the context of {limit} positions; "
                         "crop the input or start a new cache (generate_tokens slides the window)")
    if attention_mask is None:
        real = torch.ones_like(idx, dtype=torch.bool)  # (B, T)
    else:
        real = attention_mask.bool()  # (B, T)
    first_pos = cache.next_pos if t0 else 0  # (B, 1) where each row goes on, or 0
    real_before = real.long().cumsum(dim=1) - 1  # (B, T) real tokens before each; -1 at padding
    position_ids = first_pos + real_before.clamp(min=0)  # (B, T)
    padded = attention_mask is not None and not bool(real.all())
    key_real = real  # (B, L) which keys are real tokens
    if cache is not None:
        if cache.key_real is not None:
            key_real = torch.cat([cache.key_real, real], dim=1)
        cache.key_real = key_real
        cache.padded |= padded  # a padded key, once cached, needs the mask at every later step
        padded = cache.padded
    mask = None  # no padding: causal suffices (KVCache.attend shifts it for a later chunk)
    if padded:
        q_pos = torch.arange(t0, t0 + T, device=idx.device)[:, None]  # (T, 1)
        k_pos = torch.arange(t0 + T, device=idx.device)[None, :]  # (1, L)
        mask = (k_pos <= q_pos) & key_real[:, None, :]  # (B, T, L) causal and key is real
        mask = mask | (k_pos == q_pos)  # a padded query sees itself: no NaN
        mask = mask[:, None]  # (B, 1, T, L)
    kv = cache.kv if cache is not None else None  # no cache: plain causal attention
    if cache is None and padded:  # 03's attention takes no mask, KVCache.attend does: use once
        kv = KVCache(model.config.n_layer, T)
    h = final_hidden(model, idx, position_ids, mask, kv)  # (B, T, C)
    h = h[:, -1:] if last_only else h  # (B, 1 or T, C)
    with torch.autocast(idx.device.type, enabled=False):
        logits = model.lm_head(h.float())  # (B, T or 1, V)
    if cache is not None:
        cache.next_pos = position_ids[:, -1:] + 1  # (B, 1)
    return logits


# -----------------------------------------------------------------------------
# Generation (batches, a full context, stopping, streaming), and what it serves: chat


def left_pad(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """[[5, 6, 7], [8]] -> idx [[5, 6, 7], [0, 0, 8]], mask [[1, 1, 1], [0, 0, 1]] (bool).
    Left: every row's last token is in the last column, so each step appends one new column."""
    if not prompts or not all(prompts):
        raise ValueError("every prompt needs at least one token; "
                         "start from the eot token or a newline")
    T = max(len(p) for p in prompts)
    rows = [[0] * (T - len(p)) + list(p) for p in prompts]  # pad id 0: masked
    real = [[False] * (T - len(p)) + [True] * len(p) for p in prompts]
    return torch.tensor(rows, device=device), torch.tensor(real, device=device)


@torch.no_grad()
def generate_tokens(
    model, prompts, temperature=1.0, top_k=None, top_p=None, generator=None, use_cache=True
):
    """Yield (next_ids (B,), logits (B, V)) per token, for ever: the caller decides when to stop.

    prompts: token-id lists of any lengths (left-padded). use_cache=False reruns the whole context
    each step (the same tokens, O(T) times the work). The model knows positions 0 .. block_size-1
    only: a longer prompt keeps its last block_size tokens, and a full context slides to its last
    block_size // 2 tokens, re-encoded from position 0 into a fresh cache. Why not slide by one, as
    04's generate does? Each cached key was computed at its absolute position; moving the window by
    one changes them all, so the cache is stale every step: no cache at all. Halving costs one
    prefill per ~block_size / 2 new tokens of a row (a batch re-encodes whenever any of its rows
    slides). Each row of a batch slides as it would alone.
    """
    block_size = model.config.block_size
    keep = max(1, block_size // 2)  # what a full context slides to
    device = model.lm_head.weight.device
    idx, mask = left_pad([p[-block_size:] for p in prompts], device)  # (B, T) each
    logits = None  # none yet: encode the prompt
    while True:
        if logits is None:  # encode the whole window: the prompt, after a slide, or uncached
            cache = BatchCache(model.config.n_layer, block_size) if use_cache else None
            logits = forward_cached(model, idx, cache, attention_mask=mask, last_only=True)[:, -1]
        next_ids = sample(logits, temperature, top_k, top_p, generator)  # (B,)
        yield next_ids, logits
        idx = torch.cat([idx, next_ids[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if idx.size(1) > block_size:  # full: slide the rows that are, re-pad, re-encode
            rows = []
            for row, is_real in zip(idx.tolist(), mask.tolist()):
                tokens = [t for t, real in zip(row, is_real) if real]  # the row's own tokens
                if len(tokens) > block_size:
                    tokens = tokens[-keep:]
                rows.append(tokens)
            idx, mask = left_pad(rows, device)
            logits = None
        elif use_cache:  # with the cache only the new token
            logits = forward_cached(model, next_ids[:, None], cache)[:, -1]
        else:  # without it, the whole window again
            logits = None


def token_bytes(tok, token_id: int) -> bytes:
    """The UTF-8 bytes of a token: a GPT-2 token may hold part of a character ('é' is 2 bytes)."""
    if hasattr(tok, "decode_single_token_bytes"):  # tiktoken
        return tok.decode_single_token_bytes(token_id)
    return tok.decode([token_id]).encode("utf-8")  # a char tokenizer's: whole characters


class TextStream:
    """Token ids in, text out once it is certain: whole characters only, never past a stop string.

    (1) A BPE token may end inside a UTF-8 character (decoded alone: '\\ufffd'); an incremental
    decoder keeps the bytes until the character is whole. (2) A stop string may come split over
    tokens ("\\n\\n###" as "\\n\\n" + "###"), so text that may begin one is held back until it is
    completed (generation stops; it is never shown) or ruled out (it is shown).

    >>> tok = CharTokenizer("\\nHi")
    >>> stream = TextStream(tok, stop_strings=["\\n\\n"])
    >>> [stream.add(i) for i in tok.encode("Hi\\n")]
    ['H', 'i', '']
    >>> stream.add(tok.encode("\\n")[0]), stream.stopped
    ('', True)
    """

    def __init__(self, tok, stop_strings=(), on_text=None):
        self.tok = tok
        self.stop_strings = [s for s in stop_strings if s]
        self.on_text = on_text
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.shown = 0  # characters handed to on_text
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Feed one token; return (and pass to on_text) the text that became certain."""
        self.text += self.decoder.decode(token_bytes(self.tok, token_id))
        # a stop string can only start in the unshown part: everything shown was ruled out
        starts = [self.text.find(s, self.shown) for s in self.stop_strings]
        starts = [i for i in starts if i >= 0]
        if starts:
            self.text = self.text[: min(starts)]
            self.stopped = True
        held_back = 0 if self.stopped else self._held_back()
        return self._show(len(self.text) - held_back)

    def finish(self) -> str:
        """Generation ended (eot, max_new_tokens): show what was held back, incomplete bytes
        as '\\ufffd'."""
        if not self.stopped:
            self.text += self.decoder.decode(b"", final=True)
        return self._show(len(self.text))

    def _held_back(self) -> int:  # the longest end of the text that begins a stop string
        longest = max((len(s) - 1 for s in self.stop_strings), default=0)  # a stop string, less 1
        for n in range(min(len(self.text), longest), 0, -1):
            if any(s.startswith(self.text[-n:]) for s in self.stop_strings):
                return n
        return 0

    def _show(self, upto: int) -> str:
        chunk = self.text[self.shown : upto]
        self.shown = max(self.shown, upto)
        if chunk and self.on_text is not None:
            self.on_text(chunk)
        return chunk


@torch.no_grad()
def generate(model, prompts, max_new_tokens: int, temperature=1.0, top_k=None, top_p=None,
             generator=None, eot_token=None, streams=None, use_cache=True) -> list[list[int]]:
    """Up to max_new_tokens new ids per prompt (token-id lists). A row ends at eot_token (left out)
    or when its TextStream (streams: one per row) meets a stop string (whose tokens stay in; the
    stream's text leaves it out); ended rows ride along."""
    dropped = max(len(p) for p in prompts) - model.config.block_size
    if dropped > 0:  # generate_tokens keeps the last block_size tokens: say so
        print(f"note: a prompt is {dropped} tokens too long; its start is cut", file=sys.stderr)
    out = [[] for _ in prompts]
    done = [False] * len(prompts)
    steps = generate_tokens(model, prompts, temperature, top_k, top_p, generator, use_cache)
    for _, (next_ids, _) in zip(range(max_new_tokens), steps):  # range first: no extra step
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
    """Each prompt's (token ids, one batch) new text, with cfg's settings; row 0 streams to
    stdout as it is made."""
    streams = [TextStream(tok, stop_strings, lambda text: print(text, end="", flush=True))]
    streams += [TextStream(tok, stop_strings) for _ in prompts[1:]]
    generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(cfg.seed)
    generate(model, prompts, cfg.max_new_tokens,
             cfg.temperature, cfg.top_k or None, cfg.top_p, generator,  # top_k 0: no limit
             eot_token=eot_token, streams=streams, use_cache=cfg.use_cache)
    return [stream.text for stream in streams]


# Chat and --answers prompt a model as 07 trained it: format_input + RESPONSE_HEADER, encoded in
# two parts (BPE could merge tokens across the seam). A char model lacks characters such as the
# template's '#': each becomes 07's unknown_char. Answers end as 07 taught, at <|endoftext|>
# (GPT-2) or a newline (char); 09 also stops at "\n\n### ", the start of another section.
class Template:
    """07's prompt template for tok, with the unknown_char and end token of ckpt's run."""

    def __init__(self, tok, ckpt: dict):
        self.tok = tok
        self.char_vocab = set(getattr(tok, "chars", ""))  # empty for GPT-2
        self.unknown_char = ckpt.get("config", {}).get("unknown_char") or "?"
        self.end_token = tok.encode("\n")[0] if self.char_vocab else tok.eot_token
        stage = ckpt.get("stage")
        if stage not in ("finetune", "dpo"):
            print(f"note: a {stage} checkpoint; 07's template needs an instruction-tuned one")

    def encode(self, text: str) -> list[int]:
        """Typed text -> ids, as 07 encoded its data: chars a char model lacks -> unknown_char."""
        if not self.char_vocab:
            return self.tok.encode(text, disallowed_special=())  # a typed "<|endoftext|>" is text
        text = "".join(c if c in self.char_vocab else self.unknown_char for c in text)
        return self.tok.encode(text)

    def prompt(self, entry: dict) -> list[int]:
        """{"instruction": ..., "input": ...} -> the ids of its prompt, up to "### Response:"."""
        return self.encode(format_input(entry)) + self.encode(RESPONSE_HEADER)


def chat(model, tok, cfg, ckpt: dict) -> None:
    """A loop of single-turn prompts in 07's template; of the characters a char model lacks, only
    those the user typed are reported."""
    template = Template(tok, ckpt)
    print("chat: type a message; an empty line, /quit or Ctrl-D ends")
    while True:
        try:
            message = input("\nyou> ").strip()
        except EOFError:  # Ctrl-D (a Ctrl-C: main's one line, status 130)
            message = ""
        if message in ("", "/quit", "/exit"):
            break
        lacking = "".join(sorted(set(message) - template.char_vocab))
        if template.char_vocab and lacking:
            print(f"(not this model's characters, sent as {template.unknown_char!r}: {lacking!r})")
        prompt = template.prompt({"instruction": message})
        print("model> ", end="", flush=True)
        complete(model, tok, [prompt], cfg, ["\n\n### "], template.end_token)
        print()
    print()


def load_entries(cfg) -> tuple[list[dict], Path]:
    """--answers' entries (07's: instruction, input, output) and where their answers go: beside
    --ckpt, named after the file (test.json: test_responses.json), if no file is there."""
    file = PROJECT / cfg.answers
    if not file.is_file():
        raise FileNotFoundError(f"--answers={cfg.answers}: no such file ({file}); 07_finetune.py "
                                "writes its test split as out_dir/test.json")
    try:
        entries = json.loads(file.read_text(encoding="utf-8-sig"))  # -sig: skips a Windows BOM
    except (ValueError, RecursionError):  # not JSON, not text (a ckpt.pt), [[[...]]]: below
        entries = None
    is_list = isinstance(entries, list) and entries and all(type(e) is dict for e in entries)
    if not is_list or not all(isinstance(e.get("instruction"), str) for e in entries):
        raise ValueError(f"--answers={cfg.answers}: expected UTF-8 JSON, a list of objects, each "
                         "with an instruction (07 writes its test split as out_dir/test.json)")
    path = (PROJECT / cfg.ckpt).parent / f"{file.stem}_responses.json"
    if path.exists():  # another model's answers, or an older run's: never replaced unasked
        raise FileExistsError(f"{path} exists: move it away to answer again")
    return entries, path


def answer_all(model, tok, cfg, ckpt: dict, entries: list[dict], path: Path):
    """Each entry's answer in 07's template, cfg.batch_size entries per batch, beside the entry in
    path, rewritten after each batch (Ctrl-C keeps them), for 11_evaluate.py --responses."""
    template = Template(tok, ckpt)
    generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(cfg.seed)
    records = []
    for start in range(0, len(entries), cfg.batch_size):
        batch = entries[start : start + cfg.batch_size]
        prompts = [template.prompt(e) for e in batch]
        streams = [TextStream(tok, ["\n\n### "]) for _ in batch]
        generate(model, prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_k or None,
                 cfg.top_p, generator, template.end_token, streams, cfg.use_cache)
        records += [{**e, "model_response": s.text.strip()} for e, s in zip(batch, streams)]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(records, indent=1, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)  # atomic: a Ctrl-C leaves the last batch's file, never half of one
        print(f"\ranswers: {len(records)}/{len(entries)}", end="", flush=True)
    print(f"\n{len(records)} answers in {path}; to judge them: 11_evaluate.py --responses")
    return path


def time_generation(model, n_new: int, use_cache: bool) -> tuple[float, str]:
    """Greedy from a 16-token prompt: tokens/s, and ms per token, the first 64 -> the last 64."""
    steps = generate_tokens(model, [list(range(16))], temperature=0, use_cache=use_cache)
    t0 = time.perf_counter()
    times = []  # seconds from t0 to each new token
    for _, (next_ids, _) in zip(range(n_new), steps):
        next_ids.tolist()  # wait for the token (and the GPU), as a reader of the stream would
        times.append(time.perf_counter() - t0)
    ms = [1e3 * (b - a) for a, b in zip([0.0] + times, times)]  # each token's own
    return n_new / times[-1], f"{sum(ms[:64]) / 64:.1f} -> {sum(ms[-64:]) / 64:.1f}"


def bench(cfg) -> None:
    """tokens/s with and without the cache (random weights: speed does not depend on them), and ms
    per token over the first -> the last 64 new ones: flat with the cache, O(T) growing without. The
    context is 1024 tokens, so 16 + 512 fit without sliding: the timing shows the cache alone."""
    threads = torch.get_num_threads()
    print(f"{cfg.device}, {cfg.dtype}, {threads} threads, greedy, batch 1, prompt 16 tokens")
    print("   model   new  tok/s cache  no cache  speedup   ms/token cache         no cache")
    for preset in cfg.bench_presets.split(","):
        config = preset_config(preset, vocab_size=50257, block_size=1024)
        model = GPT(config).to(cfg.device).eval()
        for n_new in (8, 256, 512):  # 8: a warm-up (allocations, kernel choice), not shown
            cached_rate, cached_ms = time_generation(model, n_new, use_cache=True)
            plain_rate, plain_ms = time_generation(model, n_new, use_cache=False)
            if n_new == 8:
                continue
            print(f"{preset:>8} {n_new:>5} {cached_rate:>12,.1f} {plain_rate:>9,.1f} "
                  f"{cached_rate / plain_rate:>7.1f}x {cached_ms:>16} {plain_ms:>16}")


# -----------------------------------------------------------------------------
# Command line

PROJECT = Path(__file__).resolve().parent  # a relative --ckpt starts here
DEFAULT_CKPT = "out/shakespeare-char/ckpt.pt"  # 05_pretrain.py's output: the Quick start's model
STAGES = {"pretrain": "05", "distributed": "06", "finetune": "07", "dpo": "08"}  # their scripts
# the command that writes each folder's ckpt.pt (05-08: their default out_dir; 04: OpenAI's model)
WRITERS = {"out/shakespeare-char": "python 05_pretrain.py", "out/dpo": "python 08_dpo.py",
           "out/distributed": "python 06_distributed.py", "out/finetune": "python 07_finetune.py",
           "data/gpt2": "python 04_gpt.py --init_from=gpt2 --save_ckpt"}
# what "val_loss" holds: the next-token loss (07's on the answers only), but 08's the DPO loss
SAVED_LOSS = {"finetune": "val loss {:.4f} on the answers", "dpo": "val DPO loss {:.4f}"}


@dataclass
class GenerateConfig:
    """Sample from, chat with, answer a file of instructions with, or benchmark a GPT of 04-08."""

    ckpt: Annotated[str, "the model to load (relative paths start in 09's folder)"] = DEFAULT_CKPT
    prompt: Annotated[str, 'the text to continue; "" starts a new document'] = ""
    num_samples: Annotated[int, "how many texts to write (together, as a batch)"] = 1
    max_new_tokens: Annotated[int, "the most tokens (words, pieces of words) per text"] = 500
    temperature: Annotated[float, "randomness: 0 = likeliest token; <1 safer, >1 wilder"] = 0.8
    top_k: Annotated[int, "pick among the k likeliest next tokens only; 0 = all"] = 200
    top_p: Annotated[float, "pick from the likeliest tokens up to this probability; 1 = all"] = 1.0
    seed: Annotated[int, "the random seed: the same seed writes the same text"] = 1337
    stop: Annotated[str, 'end the text at any of these, comma-separated; "\\n" is a newline '
                         '(--stop="\\n\\n,THE END")'] = ""
    use_cache: Annotated[bool, "reuse past tokens' keys and values (KV cache): faster"] = True
    chat: Annotated[bool, "talk to a model trained to follow instructions (07's, 08's)"] = False
    answers: Annotated[str, "a JSON list of instructions (07's out_dir/test.json): answer them "
                            "all into <its name>_responses.json beside --ckpt"] = ""
    batch_size: Annotated[int, "instructions --answers answers together"] = 8
    bench: Annotated[bool, "time generation with and without the KV cache, untrained"] = False
    bench_presets: Annotated[str, "model sizes --bench times, comma-separated: tiny, small, gpt2, "
                                  "gpt2-medium, gpt2-large, gpt2-xl"] = "small,gpt2"
    device: Annotated[str, "auto = cuda (NVIDIA GPU) > mps (Apple GPU) > cpu; or name one"] = "auto"
    dtype: Annotated[str, "precision: auto = bfloat16 on GPU (old: float16); CPU float32"] = "auto"
    threads: Annotated[int, "CPU threads to use; 0 = PyTorch's choice"] = 0

    def __post_init__(self):  # checked before loading anything; parse_config prints the error
        self.device = pick_device(self.device)  # "auto" -> cuda, mps or cpu
        self.dtype = pick_dtype(self.dtype, self.device)
        check_sampling(self.temperature, self.top_k or None, self.top_p)
        least = {"max_new_tokens": 0, "threads": 0, "num_samples": 1, "batch_size": 1}
        for name, smallest in least.items():
            if getattr(self, name) < smallest:
                raise ValueError(f"--{name}={getattr(self, name)}: use {smallest} or more")
        if not 0 <= self.seed < 2**63:  # 10_serve's range; torch's generator takes 64 bits
            raise ValueError(f"--seed={self.seed}: use an integer in [0, 2**63)")
        if self.chat and self.answers:
            raise ValueError("--chat and --answers: choose one")
        for name in ("prompt", "num_samples", "stop") if self.chat or self.answers else []:
            if getattr(self, name) != getattr(GenerateConfig, name):  # given: it would do nothing
                raise ValueError(f"--{name} is for sampling, not --chat or --answers: drop it")
        for preset in self.bench_presets.split(",") if self.bench else []:
            preset_config(preset)  # an unknown one: a ValueError naming the presets
        ckpt_path = PROJECT / self.ckpt  # an absolute ckpt stays as it is
        in_folder = Path(self.ckpt, "ckpt.pt")  # --ckpt=out/ft: a run's out_dir, not its ckpt.pt
        if not self.bench and (PROJECT / in_folder).is_file():
            raise IsADirectoryError(f"--ckpt={self.ckpt} is a folder; use --ckpt={in_folder}")
        if not self.bench and not ckpt_path.is_file():
            folders = {PROJECT / folder: command for folder, command in WRITERS.items()}
            other = "05-08 (into their out_dir), or 04_gpt.py --save_ckpt (into data/<model>/)"
            command = folders.get(ckpt_path.parent, other)
            raise FileNotFoundError(f"--ckpt={self.ckpt}: no such file ({ckpt_path}); "
                                    f"make it with: {command}")


def load_model(cfg):
    """(model in eval mode on cfg.device, tokenizer, checkpoint dict), saying what it loaded."""
    model, tok, ckpt = load_checkpoint(PROJECT / cfg.ckpt)  # CPU, mmap: Adam's state stays on disk
    stage = ckpt.get("stage", "?")
    script = f"{STAGES[stage]}_{stage}.py" if stage in STAGES else "an unknown script"
    val_loss = ckpt.get("val_loss", ckpt.get("best_val_loss"))
    val = "no val loss measured"
    if val_loss is not None and math.isfinite(val_loss):
        val = SAVED_LOSS.get(stage, "val loss {:.4f}").format(val_loss)
    iters = ckpt.get("iter_num", 0)
    print(f"loaded {cfg.ckpt}: the {stage} model of {script} after {iters:,} iterations, {val}; "
          f"{model.num_params() / 1e6:.2f}M parameters, {ckpt['tokenizer']['kind']} tokens, "
          f"context {model.config.block_size}")
    return model.to(cfg.device).eval(), tok, ckpt


def encode(tok, text: str) -> list[int]:
    """Text -> ids; for GPT-2, "<|endoftext|>" in the text is the eot token (a document break)."""
    if not isinstance(tok, CharTokenizer):
        return tok.encode(text, allowed_special="all")
    missing = "".join(sorted(set(text) - set(tok.chars)))
    if missing:
        raise ValueError(f"characters {missing!r} are not in the model's vocabulary; drop them")
    return tok.encode(text)


def sample_from_prompt(model, tok, cfg) -> list[str]:
    """cfg.num_samples continuations of cfg.prompt, one batch: the first streams as it is made."""
    document_start = "<|endoftext|>" if tok.eot_token is not None else "\n"
    prompt_ids = encode(tok, cfg.prompt or document_start)  # text it cannot encode: a ValueError
    print(cfg.prompt, end="", flush=True)  # not the document start; the first sample then streams
    stop_strings = [s.replace("\\n", "\n").replace("\\t", "\t") for s in cfg.stop.split(",")]
    texts = complete(model, tok, [prompt_ids] * cfg.num_samples, cfg, stop_strings, tok.eot_token)
    print("".join(f"\n{'-' * 40}\n{cfg.prompt}{text}" for text in texts[1:]))  # the others
    return texts


def main(argv=None):
    cfg = parse_config(GenerateConfig, argv)  # a bad setting: one "error:" line, exit status 2
    if cfg.device.startswith("cuda"):  # TF32: matmuls left in fp32 (the head, or --dtype=float32)
        torch.backends.cuda.matmul.allow_tf32 = True  # (cuDNN's switch: convolutions, none here)
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    device_type = cfg.device.split(":")[0]  # "cuda:1" -> "cuda"
    try:
        with autocast_context(device_type, cfg.dtype):
            if cfg.bench:
                return bench(cfg)
            if cfg.answers:  # checked before the model loads
                entries, path = load_entries(cfg)
            model, tok, ckpt = load_model(cfg)
            if cfg.chat:
                return chat(model, tok, cfg, ckpt)
            if cfg.answers:
                return answer_all(model, tok, cfg, ckpt, entries, path)
            return sample_from_prompt(model, tok, cfg)
    except BrokenPipeError:  # the reader left early (`09_generate.py | head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)  # Python flushes stdout on exit: into this
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(141)  # 128 + SIGPIPE, as `seq 999999 | head` gives seq; not 0: text was lost
    except (ValueError, OSError) as e:  # no checkpoint; a bad prompt; no GPT-2 BPE offline
        print(f"error: {e}", file=sys.stderr)  # one line, status 2, as parse_config; no work done
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C mid-generation: what was written stays written
        print("\nCtrl-C: stopped", file=sys.stderr)
        sys.exit(130)  # 128 + SIGINT, a shell's status for a Ctrl-C


# -----------------------------------------------------------------------------
# Appendix: pieces copied unchanged from earlier stages, so that this file runs on its own.
# Each is its origin's text byte for byte (tests/test_copies.py checks); read them there.


# copied from 01_tokenizer.py: CharTokenizer
class CharTokenizer:
    """One token per character: from_text("hello") gives e=0 h=1 l=2 o=3; "hole" -> [1, 3, 2, 0]."""

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars):
            raise ValueError("chars has repeated characters; use CharTokenizer.from_text(text)")
        self.chars = chars
        self.n_vocab = len(chars)
        self.eot_token = None  # no end-of-text token
        self.stoi = {ch: i for i, ch in enumerate(chars)}  # character -> id
        self.itos = dict(enumerate(chars))  # id -> character

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[ch] for ch in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the vocabulary: build the "
                             "tokenizer from text that has it (CharTokenizer.from_text)") from None

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
    """{"kind": "char", "chars": ...} -> CharTokenizer; {"kind": "gpt2"} -> tiktoken's GPT-2."""
    kind = spec.get("kind")
    if kind == "char":
        return CharTokenizer(spec["chars"])
    if kind == "gpt2":
        import tiktoken  # only when asked for: char-only scripts do not need it
        return tiktoken.get_encoding("gpt2")
    raise ValueError(f"unknown tokenizer kind {kind!r}; use kind 'char' (with 'chars') or 'gpt2'")


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


# copied from 03_attention.py: KVCache
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


# copied from 04_gpt.py: GPTConfig
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


# copied from 04_gpt.py: GPT_PRESETS
GPT_PRESETS = {  # preset_config's choices
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),  # nanoGPT shakespeare-char
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64),  # tests and quick demos
}


# copied from 04_gpt.py: preset_config
def preset_config(name: str, **overrides) -> GPTConfig:
    """GPTConfig of the preset name, with overrides (which win): "gpt2", ..., "tiny"."""
    if name not in GPT_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(GPT_PRESETS)}")
    return GPTConfig(**{**GPT_PRESETS[name], **overrides})


# copied from 04_gpt.py: MLP
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


# copied from 04_gpt.py: Block
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


# copied from 04_gpt.py: pick_dtype
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


# copied from 04_gpt.py: autocast_context
def autocast_context(device_type: str, dtype: str):
    """Mixed precision for the forward pass: torch.autocast in dtype, or nothing for float32."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))


# copied from 05_pretrain.py: load_checkpoint
def load_checkpoint(path):
    """(model, tokenizer, checkpoint dict) from a checkpoint of 05-08, the model on the CPU. mmap:
    unread parts (Adam's state, to sample) stay on disk; a compiled model's "_orig_mod." goes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train one with `python 05_pretrain.py` "
                                f"(it writes out_dir/ckpt.pt), or check the path")
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError):  # not one, or cut short
        ckpt = None
    if not isinstance(ckpt, dict) or not {"model", "model_args", "tokenizer"} <= set(ckpt):
        raise ValueError(f"{path} is not a checkpoint of these scripts (05_pretrain.py to "
                         f"08_dpo.py write them as out_dir/ckpt.pt); check the path")
    model = GPT(GPTConfig(**ckpt["model_args"]))
    state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    model.load_state_dict(state)
    return model, get_tokenizer(ckpt["tokenizer"]), ckpt


# copied from 07_finetune.py: RESPONSE_HEADER
RESPONSE_HEADER = "\n\n### Response:\n"  # between the prompt and the answer


# copied from 07_finetune.py: format_input
def format_input(entry: dict) -> str:
    """Alpaca's prompt for entry: a fixed preamble, "### Instruction:", and "### Input:" if any."""
    instruction_text = (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{entry['instruction']}"
    )
    if not entry.get("input"):
        return instruction_text
    return instruction_text + f"\n\n### Input:\n{entry['input']}"


if __name__ == "__main__":
    main()
