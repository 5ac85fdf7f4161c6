"""Stage 11: evaluation: a text's bits per byte, multiple choice, answers judged by a larger model.

Val loss (05, 06) says how well a model predicts text like its training text. On any text the same
measure is perplexity, and bits per byte, comparable across tokenizers (section 4). Neither says
whether the model knows anything, nor whether 07's and 08's answers are any good. Two ways to ask:

Multiple choice by log-likelihood (HellaSwag, Zellers et al. 2019; ARC, PIQA, your own). An example
is a context and a few choices, one of them right:
    context  "A man is sitting on a roof. he"
    choices  " is using wrap to wrap a pair of skis.", ..., " starts pulling up roofing on a roof."
Nothing is generated: the model scores each choice as log p(choice | context), the sum of its
tokens' log-probabilities, and its answer is the best scored choice. Every token costs probability,
so choices of unequal length are compared three ways, each reported:
  - acc: the summed log-probability. It favours the short choice: fewer tokens, less to pay.
  - acc_norm (lm-evaluation-harness): the sum divided by the choice's length in characters (here
    with HellaSwag's leading space, there without), a score per character, no tokenizer's.
  - acc_token_mean (llm.c's acc_norm): the mean per token, the lowest mean loss.
acc agrees with acc_token_mean on choices of equal token counts, with acc_norm on equal character
counts. acc parts from the others when one choice is much longer; the two means part when one
choice spends few tokens on many characters (common words) and another many tokens on few (rare
words, numbers, names). The context and each choice are encoded apart and concatenated, as llm.c
does: a choice's tokens never depend on what precedes it (lm-evaluation-harness encodes the whole
and splits it; with GPT-2's BPE nearly always the same). A HellaSwag ending follows its ctx after
one space (llm.c's way); a plain-format choice is appended as written: write " Paris" with its
space. A context too long for the model's block is cut from its left; the report counts them.

Fast. llm.c runs one example per forward pass: a row per choice, each repeating the context, and a
log-softmax over a (rows, T, vocab) tensor. Here a row holds an example's context once, then every
choice; a mask lets a choice see the context and its own earlier tokens only, and its positions go
on from the context's end, so each token sees what it would see in a row of its own. Many examples
share a pass, and the head (vocab logits) runs only where a choice token is predicted, a chunk at a
time: the same numbers (tested against transformers), ~2.5x faster on CPU.

Answers judged by a larger model (Raschka, ch. 7): `09_generate.py --answers` answers 07's test
split into a test_responses.json beside the model (07's or 08's), with the instructions and the
reference answers; a judge behind OpenAI's API (Ollama, vLLM, OpenAI, 10_serve.py) scores each
from 0 to 100. A reply with no number is counted and shown, never scored 0.

References: Zellers et al. 2019, "HellaSwag"; EleutherAI's lm-evaluation-harness; llm.c's
dev/data/hellaswag.py; Raschka, "Build a Large Language Model (From Scratch)", ch. 7; Wilson 1927
(the interval); Zheng et al. 2023, "Judging LLM-as-a-Judge"; Hugging Face, "Perplexity of
fixed-length models" (the strided windows).

Run it:
  python 11_evaluate.py --text_file=data/tinyshakespeare.txt   # 05's model (train + val text)
  python 04_gpt.py --init_from=gpt2 --save_ckpt      # OpenAI's GPT-2 124M as data/gpt2/ckpt.pt
  python 02_dataloader.py --fetch=hellaswag         # HellaSwag's validation set into data/
  python 11_evaluate.py --ckpt=data/gpt2/ckpt.pt --task=hellaswag --limit=500
  python 11_evaluate.py --ckpt=data/gpt2/ckpt.pt --task=hellaswag --device=cuda  # all 10,042
  python 11_evaluate.py --ckpt=out/dpo/ckpt.pt --compare=out/finetune/ckpt.pt \\
      --task=my_questions.jsonl --out_json=out/eval.json     # 08 beside 07, per example as JSON
  ollama serve & ollama pull llama3.1                       # a judge, then
  python 09_generate.py --ckpt=out/finetune/ckpt.pt --answers=out/finetune/test.json --temperature=0
  python 11_evaluate.py --responses=out/finetune/test_responses.json \\
      --judge_url=http://localhost:11434/v1 --judge_model=llama3.1
"""

import argparse
import json
import math
import os
import pickle
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated

import requests
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

PROJECT = Path(__file__).resolve().parent  # relative paths (data/, out/, flags) resolve here
DATA_DIR = PROJECT / "data"

# -----------------------------------------------------------------------------
# 1. The tasks: examples {"context", "choices", "label"}, from HellaSwag or a JSONL file

PLAIN_FORMAT = '{"context": str, "choices": [str, ...], "label": int}'


def to_example(row: dict, where: str) -> dict:
    """A HellaSwag line ({"ctx", "endings", "label"}) or a plain one -> an example, checked."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: not a JSON object")
    hellaswag = "endings" in row
    names = ("ctx", "endings") if hellaswag else ("context", "choices")
    for name in (*names, "label"):
        if name not in row:
            raise ValueError(f"{where}: no field {name!r}; use {PLAIN_FORMAT} or HellaSwag's")
    context = row[names[0]]
    choices = row[names[1]]
    label = row["label"]
    if not isinstance(context, str) or not context:
        raise ValueError(f"{where}: {names[0]!r} must be a non-empty string")
    if not isinstance(choices, list) or len(choices) < 2:
        raise ValueError(f"{where}: {names[1]!r} must be a list of at least 2 strings")
    for i, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice.strip():
            raise ValueError(f"{where}: choice {i} is empty or not a string")
    if type(label) is not int or not 0 <= label < len(choices):
        raise ValueError(f"{where}: label {label!r} must be an index from 0 to {len(choices) - 1}")
    if hellaswag:  # an ending follows the context after a space, as llm.c renders them
        choices = [" " + ending for ending in choices]
    return {"context": context, "choices": choices, "label": label}


def load_task(task: str, limit: int = 0) -> list[dict]:
    """The examples of task: "hellaswag" (its validation set, 10,042 examples, which 02 fetches
    into data/) or the path of a JSONL file. limit > 0: the first limit examples."""
    path = Path(task)
    if task == "hellaswag":
        path = DATA_DIR / "hellaswag_val.jsonl"
        if not path.exists():  # 02, the one home of downloads (07's and 08's data too), gets 12 MB
            raise FileNotFoundError(f"no {path}: run `python 02_dataloader.py --fetch=hellaswag`")
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if limit and len(examples) == limit:  # limit 0: all
            break
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path} line {number}: not JSON ({e})") from None
        examples.append(to_example(row, f"{path} line {number}"))
    if not examples:
        raise ValueError(f"{path} holds no examples; each line is {PLAIN_FORMAT}")
    return examples


# -----------------------------------------------------------------------------
# 2. Scoring: log p(choice | context), llm.c's way first, then packed and batched

def encode_text(tok, text: str, where: str) -> list[int]:
    """Text -> ids. "<|endoftext|>" in a task is text; a char model must know every character."""
    if not isinstance(tok, CharTokenizer):
        return tok.encode(text, disallowed_special=())
    missing = "".join(sorted(set(text) - set(tok.chars)))
    if missing:
        raise ValueError(f"{where}: characters {missing!r} are not in this char model's "
                         "vocabulary; score a model of GPT-2 tokens, or leave them out")
    return tok.encode(text)


def encode_example(tok, example: dict, block_size: int, where: str) -> dict:
    """{"context": ids, "choices": [ids, ...], "cut": bool}. The context keeps its last tokens:
    context + the longest choice is at most block_size + 1 (a row's last token is only a target)."""
    context = encode_text(tok, example["context"], where)
    choices = [encode_text(tok, c, where) for c in example["choices"]]
    longest = max(len(choice) for choice in choices)
    room = block_size + 1 - longest  # context tokens that fit
    if room < 1:
        raise ValueError(f"{where}: a choice of {longest} tokens leaves no room for its context "
                         f"in a block of {block_size}; shorten it")
    return {"context": context[-room:], "choices": choices, "cut": len(context) > room}


@torch.no_grad()
def score_rows(model, encoded: dict) -> list[float]:
    """One example in a forward pass -> its choices' summed log-probabilities, llm.c's way (the
    reference for score_packed in tests and benchmark): a row of context + choice per choice,
    right-padded (causal attention keeps padding from real tokens), a log-softmax everywhere."""
    rows = [torch.tensor(encoded["context"] + choice) for choice in encoded["choices"]]
    is_choice = [torch.arange(len(row)) >= len(encoded["context"]) for row in rows]
    idx = pad_sequence(rows, batch_first=True)  # (N, T), pad id 0: after the row, unseen
    idx = idx.to(model.lm_head.weight.device)
    logits, _ = model(idx[:, :-1])  # (N, T-1, V)
    logprobs = F.log_softmax(logits.float(), dim=-1)  # (N, T-1, V): the full copy
    targets = idx[:, 1:, None]  # (N, T-1, 1): each position's next token
    chosen = logprobs.gather(-1, targets).squeeze(-1)  # (N, T-1): each next token's
    scored = pad_sequence(is_choice, batch_first=True)[:, 1:].to(idx.device)  # choice targets
    return (chosen * scored).sum(dim=1).tolist()


def pack_example(encoded: dict) -> dict:
    """One row for an example: the context once, then each choice but its last token (a token is
    an input only if a token follows it). Returns the row's tokens, their positions, their segments
    (0: context, j + 1: choice j), as tensors, and its targets: for each choice token (choice j,
    the index in the row whose output predicts it, its id). Context [5, 6], choices [7, 8], [9]:
        tokens [5, 6, 7], positions [0, 1, 2], segments [0, 0, 1],
        targets [(0, 1, 7), (0, 2, 8), (1, 1, 9)]: 6 predicts 7 and 9, 7 predicts 8."""
    context = encoded["context"]
    tokens = list(context)
    positions = list(range(len(context)))
    segments = [0] * len(context)
    targets = []
    for j, choice in enumerate(encoded["choices"]):
        inputs = choice[:-1]  # the last token predicts nothing: no input
        # the first token follows the context's last, each later one the choice's previous
        previous = [len(context) - 1] + list(range(len(tokens), len(tokens) + len(inputs)))
        targets += [(j, p, token) for p, token in zip(previous, choice)]
        tokens += inputs
        positions += range(len(context), len(context) + len(inputs))  # as if alone after context
        segments += [j + 1] * len(inputs)
    return {"tokens": torch.tensor(tokens), "positions": torch.tensor(positions),
            "segments": torch.tensor(segments), "targets": targets}  # fmt: skip


def packed_batch(packed: list[dict], device) -> tuple[torch.Tensor, ...]:
    """Rows right-padded to one length: idx, position ids (B, T) and the mask (B, 1, T, T): a
    token sees the earlier tokens of the context and of its own segment. Padding is segment -1
    (it sees the context and earlier padding: no empty row in the softmax, no NaN)."""
    idx = pad_sequence([p["tokens"] for p in packed], batch_first=True)  # (B, T)
    pos = pad_sequence([p["positions"] for p in packed], batch_first=True)  # (B, T)
    seg = pad_sequence([p["segments"] for p in packed], batch_first=True, padding_value=-1)
    T = idx.size(1)
    same_segment = seg[:, :, None] == seg[:, None, :]  # (B, T, T) query, key
    key_is_context = (seg == 0)[:, None, :]  # (B, 1, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T)
    mask = (same_segment | key_is_context) & causal  # (B, T, T)
    return idx.to(device), pos.to(device), mask[:, None].to(device)


def target_logprobs(model, h, targets, max_logits=2**24) -> torch.Tensor:
    """log p(target) per row of h (N, C) and targets (N,). The fp32 head (outside autocast) runs
    on chunks of rows: logits (rows, V) with rows * V <= max_logits (64 MB), never (N, V)."""
    rows = max(1, max_logits // model.config.vocab_size)
    out = []
    with torch.autocast(h.device.type, enabled=False):
        for h_part, t_part in zip(h.split(rows), targets.split(rows)):
            logits = model.lm_head(h_part.float())  # (rows, V)
            nll = F.cross_entropy(logits, t_part, reduction="none")  # (rows,)
            out.append(-nll)
    return torch.cat(out)


@torch.no_grad()
def score_packed(model, encoded: list[dict], packed: list[dict]) -> list[list[float]]:
    """Several examples in one forward pass, an example per row -> each one's choices' summed
    log-probabilities. GPT.forward takes no mask; final_hidden takes one with a cache only, so 03's
    KVCache is made and used once: its writes cost little beside the matmuls."""
    device = model.lm_head.weight.device  # packed: pack_example's rows of encoded, in order
    idx, pos, mask = packed_batch(packed, device)
    h = final_hidden(model, idx, pos, mask, KVCache(model.config.n_layer, idx.size(1)))  # (B, T, C)
    # pack_example's targets, row first: (row, choice j, the index that predicts it, its id)
    targets = [(row, *target) for row, p in enumerate(packed) for target in p["targets"]]
    row, choice, previous, token = torch.tensor(targets, device=device).T  # 4 x (N,)
    logprobs = target_logprobs(model, h[row, previous], token)  # (N,)
    sums = torch.zeros(len(encoded), max(len(e["choices"]) for e in encoded), device=device)
    sums.index_put_((row, choice), logprobs, accumulate=True)  # (B, choices): the summed log p
    per_choice = sums.tolist()  # one read of the device per batch
    return [per_choice[i][: len(e["choices"])] for i, e in enumerate(encoded)]


def score_examples(model, encoded: list[dict], batch_tokens=8192):
    """Every example's choices' summed log-probabilities, in order. Examples are sorted by packed
    length (little padding) and batched while rows * longest <= batch_tokens."""
    packed = [pack_example(e) for e in encoded]  # each example packed once
    lengths = [len(p["tokens"]) for p in packed]
    order = sorted(range(len(encoded)), key=lengths.__getitem__)
    batches = []
    for i in order:  # the longest yet: it sets the batch's row length
        if not batches or (len(batches[-1]) + 1) * lengths[i] > batch_tokens:
            batches.append([])
        batches[-1].append(i)
    scores = {}
    t0 = time.perf_counter()
    for batch in batches:
        results = score_packed(model, [encoded[i] for i in batch], [packed[i] for i in batch])
        scores.update(zip(batch, results))
        show_progress("examples scored", len(scores), len(encoded), t0)
    return [scores[i] for i in range(len(encoded))]


# -----------------------------------------------------------------------------
# 3. The three scores, with a 95% interval

METRICS = ("acc", "acc_norm", "acc_token_mean")


def wilson_interval(correct: int, n: int, z=1.96) -> tuple[float, float]:
    """The 95% interval of an accuracy measured on n examples (Wilson's: unlike p +- 1.96 * its
    standard error, it stays in [0, 1] and near 95% for small n). 290 of 1,000: 0.263 to 0.319."""
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def task_scores(examples, encoded, logprobs, task: str) -> dict:
    """The task's three accuracies, intervals and chance, and the per-example results."""
    results = []
    for example, enc, sums in zip(examples, encoded, logprobs):
        n_tokens = [len(choice) for choice in enc["choices"]]
        n_chars = [len(choice) for choice in example["choices"]]
        per_char = [s / c for s, c in zip(sums, n_chars)]
        per_token = [s / t for s, t in zip(sums, n_tokens)]
        by_metric = {"acc": sums, "acc_norm": per_char, "acc_token_mean": per_token}
        picks = {m: v.index(max(v)) for m, v in by_metric.items()}  # the first best, if tied
        results.append({"label": example["label"], "logprobs": sums, "n_tokens": n_tokens,
                        "n_chars": n_chars, "picks": picks})  # fmt: skip
    n = len(examples)
    scores = {"task": task, "n": n}
    for metric in METRICS:
        correct = sum(r["picks"][metric] == r["label"] for r in results)
        scores[metric] = correct / n
        scores[f"{metric}_interval"] = wilson_interval(correct, n)
    scores["chance"] = sum(1 / len(e["choices"]) for e in examples) / n
    scores["contexts_cut"] = sum(enc["cut"] for enc in encoded)
    scores["examples"] = results
    return scores


# -----------------------------------------------------------------------------
# 4. A text: perplexity and bits per byte
# 05's val loss is the mean nats per token over random val windows. On a whole text every token is
# scored once, with all the context the block allows. Perplexity, exp(mean nats per token), depends
# on the tokenizer (a character is easier to guess than a word); bits per byte, (all nats / ln 2) /
# (UTF-8 bytes scored), does not, so a char model and a GPT-2 compare on it.


def strided_windows(n_tokens: int, block_size: int, stride: int) -> list[tuple]:
    """Windows (begin, end, n_scored) over n_tokens tokens that score every target once: inputs
    ids[begin:end], targets ids[begin+1:end+1], of which only the last n_scored count (earlier
    windows scored the others, with less context). Windows are T = min(block_size, n_tokens - 1)
    long (so they batch) and end `stride` apart: a target after the first window has at least
    T - stride + 1 tokens of context; stride T is fast, stride 1 most informed.
    >>> strided_windows(10, 4, 2)       # targets 1..9
    [(0, 4, 4), (2, 6, 2), (4, 8, 2), (5, 9, 1)]
    """
    if n_tokens < 2:
        raise ValueError(f"need 2 tokens or more to score, got {n_tokens}: use a longer text")
    T = min(block_size, n_tokens - 1)
    stride = stride or max(1, T // 2)  # 0: half a window
    if not 1 <= stride <= T:
        raise ValueError(f"--stride must be in [1, {T}] (the window length), got {stride}")
    ends = list(range(T, n_tokens - 1, stride)) + [n_tokens - 1]  # the last one ends the text
    prev_ends = [0] + ends[:-1]  # each window scores the targets after the previous end
    return [(end - T, end, end - prev_end) for prev_end, end in zip(prev_ends, ends)]


@torch.no_grad()
def text_scores(model, tok, text: str, stride=0, batch_tokens=8192) -> dict:
    """Perplexity and bits per byte of text; stride 0: half a window. GPT-2 reads the text after
    an <|endoftext|>, so every token is scored; a char model's first character is context only.
    A forward pass takes batch_tokens // T windows of T tokens; the head runs on scored ones."""
    start = [] if tok.eot_token is None else [tok.eot_token]
    ids = start + encode_text(tok, text, "the text")
    scored_text = text if start else text[1:]  # the characters whose tokens are targets
    windows = strided_windows(len(ids), model.config.block_size, stride)
    data = torch.tensor(ids, device=model.lm_head.weight.device)
    T = windows[0][1] - windows[0][0]  # every window's length
    per_pass = max(1, batch_tokens // T)
    nats = 0.0
    t0 = time.perf_counter()
    for i in range(0, len(windows), per_pass):
        batch = windows[i : i + per_pass]
        rows = torch.stack([data[b : e + 1] for b, e, _ in batch])  # (B, T + 1)
        last_n = torch.tensor([n for _, _, n in batch], device=data.device)[:, None]  # (B, 1)
        scored = torch.arange(T, device=data.device) >= T - last_n  # (B, T): each row's last n
        h = final_hidden(model, rows[:, :-1])  # (B, T, C): inputs, and rows[:, 1:] the targets
        nats -= target_logprobs(model, h[scored], rows[:, 1:][scored]).sum().item()
        show_progress("windows scored", i + len(batch), len(windows), t0)
    n_tokens = len(ids) - 1  # the targets: every id but the first
    n_bytes = len(scored_text.encode("utf-8"))
    loss = nats / n_tokens
    return {"tokens": n_tokens, "bytes": n_bytes, "loss": loss, "perplexity": math.exp(loss),
            "bits_per_byte": nats / math.log(2) / n_bytes}  # fmt: skip


# -----------------------------------------------------------------------------
# 5. The judge: an OpenAI-compatible endpoint scores answers 0-100

JUDGE_PROMPT = """Grade a model's answer to this instruction.
{prompt}

### Reference answer:
{reference}

### Model's answer:
{answer}

Score the model's answer from 0 to 100, where 100 means it is as good as the reference answer \
and 0 means it is wrong or empty. Reply with the integer score only."""


def load_responses(path, key: str = "model_response") -> list[dict]:
    """The entries of a test_responses.json that 09 --answers wrote: each an instruction, its
    reference answer ("output") and the model's (key)."""
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as e:  # JSONL or plain text (not one JSON value), or not UTF-8
        raise ValueError(f"{path} is not JSON ({e}); 09 --answers writes a JSON list") from None
    if not (isinstance(entries, list) and entries and all(type(e) is dict for e in entries)):
        raise ValueError(f"{path}: expected a JSON list of entries (objects), as 09 writes")
    for i, entry in enumerate(entries):
        for field in ("instruction", "output", key):
            if not isinstance(entry.get(field), str):
                raise ValueError(f"{path} entry {i}: no string {field!r}")
    return entries


def ask_judge(url: str, model: str, prompt: str, api_key: str) -> str:
    """The judge's reply to one prompt: POST url/chat/completions, temperature 0. The judge cannot
    be reached: a ConnectionError; it answers with an error: a RuntimeError; one line each."""
    endpoint = url.rstrip("/") + "/chat/completions"
    messages = [{"role": "user", "content": prompt}]  # one turn: the grading prompt
    body = {"model": model, "temperature": 0, "messages": messages}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = requests.post(endpoint, json=body, headers=headers, timeout=120)
    except requests.RequestException as e:
        raise ConnectionError(f"cannot reach the judge at {url} ({type(e).__name__}): start one "
                           f"(`ollama serve`, `ollama pull {model}`) or fix --judge_url") from None
    try:  # an error status comes with an error body, not a chat completion
        return response.json()["choices"][0]["message"]["content"] or ""  # null: no text
    except (ValueError, KeyError, IndexError, TypeError):
        raise RuntimeError(f"the judge at {url} answered {response.status_code}, no completion: "
                           f"{response.text[:200]!r}; check --judge_model and API key") from None


def parse_score(reply: str) -> int | None:
    """The first whole number from 0 to 100 in a reply ("Score: 85" -> 85), or None."""
    numbers = [int(n) for n in re.findall(r"\d+", reply) if int(n) <= 100]
    return numbers[0] if numbers else None


def judge_responses(cfg) -> dict:
    """Score every answer; print the mean, the distribution by tens, the replies with no number.
    A later error answer is shown and skipped; the first, or an unreachable judge, stops the run."""
    key = cfg.response_key
    entries = load_responses(cfg.responses, key)
    api_key = os.environ.get(cfg.judge_key_env, "")  # "" if unset: no Authorization header
    scores = []
    no_number = []
    failed = []
    t0 = time.perf_counter()
    for i, entry in enumerate(entries):
        prompt = JUDGE_PROMPT.format(prompt=format_input(entry), reference=entry["output"],
                                     answer=entry[key])  # fmt: skip
        try:
            reply = ask_judge(cfg.judge_url, cfg.judge_model, prompt, api_key)
        except RuntimeError as e:  # it answered with an error: an answer too long for it, say
            if i == 0:  # the first request's: a wrong model or key, as a rule; nothing judged yet
                raise
            failed.append({"entry": i, "error": str(e)})
            print(f"\nentry {i} not scored: {e}")  # the progress line goes on below it
        else:
            score = parse_score(reply)
            if score is None:
                no_number.append({"entry": i, "reply": reply})
            else:
                scores.append(score)
        show_progress("answers judged", i + 1, len(entries), t0)
    by_tens = [sum(min(s // 10, 9) == t for s in scores) for t in range(10)]  # 0-9, ..., 90-100
    mean = sum(scores) / len(scores) if scores else float("nan")
    print(f"{cfg.responses} ({key}), judged by {cfg.judge_model}: mean {mean:.1f} of 100 over "
          f"{len(scores)} of {len(entries)} answers; failed requests: {len(failed)}")
    for tens, count in enumerate(by_tens):
        high = 100 if tens == 9 else 10 * tens + 9
        print(f"  {10 * tens:>3}-{high:<3} {count:>5} {'#' * count}")
    print(f"{len(no_number)} replies held no number (not scored):")
    for item in no_number[:5]:
        print(f"  entry {item['entry']}: {item['reply'][:100]!r}")
    return {"responses": cfg.responses, "key": key, "judge": cfg.judge_model, "scores": scores,
            "n": len(entries), "scored": len(scores), "mean": mean if scores else None,
            "by_tens": by_tens, "no_number": no_number, "failed": failed}  # fmt: skip


# -----------------------------------------------------------------------------
# 6. The report, and the command line

def describe(path, model, ckpt: dict) -> dict:
    """What a report says of a model: its checkpoint, stage, size and the tokens it has seen."""
    config = ckpt.get("config") or {}
    step_keys = ("batch_size", "gradient_accumulation_steps", "block_size")
    tokens = None  # recorded by 05's and 06's settings; others do not say
    if all(isinstance(config.get(k), int) for k in step_keys):
        tokens = ckpt.get("iter_num", 0) * math.prod(config[k] for k in step_keys)
    return {"ckpt": path, "stage": ckpt.get("stage", "?"),
            "parameters": model.num_params(), "tokens_seen": tokens}  # fmt: skip


def print_report(results: list[dict]) -> None:
    """One table: a column per model, a row per score (95% interval), and chance."""
    for i, result in enumerate(results):  # each model cuts its own: block sizes, tokenizers
        m = result["model"]
        seen = "not recorded" if m["tokens_seen"] is None else f"{m['tokens_seen']:,}"
        print(f"model {i + 1}: {m['ckpt']} ({m['stage']}, {m['parameters'] / 1e6:.2f}M "
              f"parameters, tokens seen: {seen}), {result['contexts_cut']:,} contexts cut to fit")
    first = results[0]
    print(f"task {first['task']}: {first['n']:,} examples; a cut context loses its left end")
    header = "".join(f"{f'model {i + 1}':>24}" for i in range(len(results)))
    print(f"{'score':<16}{header}")
    for metric in METRICS:
        cells = []
        for s in results:
            low, high = s[f"{metric}_interval"]
            cells.append(f"{s[metric]:>8.4f} ({low:.3f}-{high:.3f})")
        print(f"{metric:<16}" + "".join(f"{c:>24}" for c in cells))
    print(f"{'chance':<16}{first['chance']:>8.4f}")


@dataclass
class EvalConfig:
    """Score checkpoints of 04-08 on multiple-choice tasks, or their answers with a judge.
    A relative path (flag or default) is taken from the project's folder."""

    ckpt: Annotated[str, "the model to score"] = "out/shakespeare-char/ckpt.pt"  # 05's Quick start
    task: Annotated[str, "hellaswag (02 --fetch=hellaswag) or a JSONL file of examples"] = ""
    text_file: Annotated[str, "a UTF-8 text: its perplexity and bits per byte"] = ""
    stride: Annotated[int, "--text_file: tokens between windows; 0 = half a window"] = 0
    limit: Annotated[int, "score the first N examples; 0 = all"] = 0
    compare: Annotated[str, "a second checkpoint, scored on the same examples"] = ""
    out_json: Annotated[str, "a new file for the scores and per-example results"] = ""
    batch_tokens: Annotated[int, "tokens per forward pass; lower it if memory runs out"] = 8192
    responses: Annotated[str, "answers to judge: a test_responses.json of 09 --answers"] = ""
    response_key: Annotated[str, "the field of the answers in it"] = "model_response"
    judge_url: Annotated[str, "OpenAI-compatible: http://localhost:11434/v1 (ollama)"] = ""
    judge_model: Annotated[str, "the judge's model name, e.g. llama3.1"] = ""
    judge_key_env: Annotated[str, "the variable with the judge's API key"] = "OPENAI_API_KEY"
    device: Annotated[str, "auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps"] = "auto"
    dtype: Annotated[str, "auto: bf16 on CUDA (old GPUs: fp16), else float32"] = "auto"
    threads: Annotated[int, "CPU threads to use; 0 = PyTorch's choice"] = 0

    def __post_init__(self):  # checked before loading anything; parse_config prints the error
        self.device = pick_device(self.device)  # "auto" -> cuda, mps or cpu
        self.dtype = pick_dtype(self.dtype, self.device)
        if sum(map(bool, (self.task, self.text_file, self.responses))) > 1:
            raise ValueError("pass one of --task, --text_file, --responses: one evaluation a run")
        if not (self.task or self.text_file or self.responses):
            raise ValueError("nothing to do: pass --task, --text_file or --responses (see --help)")
        if min(self.limit, self.threads, self.stride) < 0 or self.batch_tokens < 1:
            raise ValueError("need --limit, --threads and --stride >= 0, --batch_tokens >= 1")
        if self.responses and not (self.judge_url and self.judge_model):
            raise ValueError("--responses needs --judge_url and --judge_model")
        for name in ("ckpt", "compare", "responses", "out_json", "task", "text_file"):
            value = getattr(self, name)
            if not value or value == "hellaswag":
                continue
            value = str(PROJECT / value)
            setattr(self, name, value)  # a checkpoint: load_checkpoint's error, before any scoring
            if name in ("responses", "task", "text_file") and not Path(value).is_file():
                raise FileNotFoundError(f"--{name}={value}: no such file")
            if name == "out_json" and Path(value).exists():  # maybe not ours: never replaced
                raise ValueError(f"--out_json={value} exists: move it away or name another")


def show_progress(what: str, done: int, total: int, t0: float) -> None:
    """"examples scored 40/100, 12.5/s", rewritten in place: the last one ends the line."""
    rate = done / (time.perf_counter() - t0)
    end = "\n" if done == total else ""
    print(f"\r{what} {done:,}/{total:,}, {rate:.1f}/s", end=end, flush=True)


def evaluate_models(cfg) -> dict:
    """Score cfg.ckpt (and cfg.compare, reported under "compare") on cfg.task or cfg.text_file."""
    examples = load_task(cfg.task, cfg.limit) if cfg.task else []  # a text has none
    if cfg.text_file:
        try:
            text = Path(cfg.text_file).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"--text_file={cfg.text_file} is not UTF-8 text") from None
    loaded = []  # every model loaded and its input checked (every error found) before any scoring
    for path in [cfg.ckpt, cfg.compare] if cfg.compare else [cfg.ckpt]:
        model, tok, ckpt = load_checkpoint(path)  # onto the CPU, memory-mapped
        encoded = [encode_example(tok, e, model.config.block_size, f"{path}, example {i}")
                   for i, e in enumerate(examples)]  # fmt: skip
        if cfg.text_file:  # the text as text_scores reads it: GPT-2's after an <|endoftext|>
            n_ids = len(encode_text(tok, text, path)) + (tok.eot_token is not None)
            strided_windows(n_ids, model.config.block_size, cfg.stride)  # and its windows
        loaded.append((path, model, tok, ckpt, encoded))
    results = []
    for path, model, tok, ckpt, encoded in loaded:
        model = model.to(cfg.device).eval()  # the first model stays there: both are small here
        if cfg.task:
            logprobs = score_examples(model, encoded, cfg.batch_tokens)
            result = task_scores(examples, encoded, logprobs, Path(cfg.task).name)
        else:
            scores = text_scores(model, tok, text, cfg.stride, cfg.batch_tokens)
            result = {"text_file": cfg.text_file, **scores}
            print("{}: {tokens:,} tokens scored, {bytes:,} bytes, loss {loss:.4f}, perplexity "
                  "{perplexity:.3f}, bits per byte {bits_per_byte:.4f}".format(path, **result))
        results.append({**result, "model": describe(path, model, ckpt)})
    if cfg.task:
        print_report(results)
    if cfg.compare:
        results[0]["compare"] = results[1]
    return results[0]


def main(argv=None):
    cfg = parse_config(EvalConfig, argv)  # a bad setting: one "error:" line, exit status 2
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 on CUDA: matmuls left in fp32 (the head)
    try:
        torch.set_num_threads(cfg.threads or torch.get_num_threads())  # a huge one: an error
        if cfg.responses:
            result = judge_responses(cfg)
        else:
            with autocast_context(cfg.device.split(":")[0], cfg.dtype):  # "cuda:1" -> "cuda"
                result = evaluate_models(cfg)
        if cfg.out_json:  # written to a .tmp and renamed: never half a file
            tmp = Path(f"{cfg.out_json}.tmp")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
            os.replace(tmp, cfg.out_json)
            print(f"wrote {cfg.out_json}")
    except (ValueError, OSError, RuntimeError) as e:  # bad input or file, the judge, a write
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C: --out_json is written whole or not at all
        print("\nCtrl-C: stopped", file=sys.stderr)
        sys.exit(130)  # 128 + SIGINT, a shell's status for a Ctrl-C
    return result


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


# copied from 09_generate.py: final_hidden
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
