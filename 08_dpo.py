"""08_dpo.py: Direct Preference Optimization (DPO).

07 taught the model to answer; now we teach it which of two answers people prefer. The classic
recipe (RLHF: Christiano et al. 2017, Ouyang et al. 2022) trains a reward model on preference pairs,
then maximises that reward with PPO while a KL penalty keeps the policy close to a frozen reference.
DPO (Rafailov et al. 2023) shows that this KL-regularised problem has a closed-form optimum,

    pi*(y|x) = ref(y|x) exp(r(x,y) / beta) / Z(x)  <=>  r(x,y) = beta log(pi*(y|x) / ref(y|x)) + beta log Z(x)

so every policy IMPLIES a reward, r = beta * log(pi / ref), and Z(x) cancels when two answers to the
same prompt are compared. Put that reward into the Bradley-Terry model of preferences,
p(chosen beats rejected) = sigmoid(r_chosen - r_rejected), and maximise the likelihood of the
human labels: a plain classification loss on the policy itself, with no reward model, no sampling
and no RL loop,

    loss = -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))

What this file teaches, top to bottom:
  - the data: rasbt's 1,100 instructions, each with a polite "chosen" and an impolite "rejected"
    answer, split 85/10/5 in file order like 07 (train / test / val);
  - collate_pairs: the chosen and rejected sequences of a batch in one tensor, written exactly as
    07 wrote its training examples, with a mask that keeps only the response tokens;
  - sequence_logprobs: log pi(response | prompt), summed over the response tokens (or averaged,
    --average_log_probs, which removes DPO's length bias but changes what beta means), from an fp32
    LM head even when the blocks run in bf16;
  - dpo_loss, the implicit rewards, and conservative DPO (--label_smoothing) for noisy labels;
  - the reference model: a frozen copy of the starting policy;
  - a short training loop (AdamW, warmup, clipping; 05 explains each) that reports loss, rewards,
    margin and accuracy on train and validation pairs, saves a checkpoint (stage "dpo") that 09
    loads, and writes the answers before and after DPO, side by side, to out_dir/dpo_responses.json.

Reading the metrics: at step 0 the policy IS the reference, so every reward is 0, every margin 0
and the loss is ln 2 = 0.693 (sigmoid(0) = 1/2). The reward accuracy (the fraction of pairs whose
chosen reward is above the rejected one) starts at 0 (all ties) and should climb on held-out pairs
too, not only on the training ones.

References: Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly
a Reward Model"; Mitchell 2023, "A note on DPO with noisy preferences" (conservative DPO / label
smoothing); Raschka, "Build a Large Language Model (From Scratch)", ch. 7 bonus, dpo-from-scratch
(rasbt/LLMs-from-scratch), whose data and settings we use; Hugging Face TRL's DPOTrainer.

Run (07 first: its checkpoint, out/finetune/ckpt.pt, is the starting policy):
    python 07_finetune.py --init_from=gpt2 --max_iters=100     # an instruction-tuned GPT-2 (CPU)
    python 08_dpo.py                                           # DPO on it -> out/dpo/ckpt.pt
    python 08_dpo.py --max_iters=20 --eval_interval=10 --num_responses=2 --overwrite   # a quick look
    python 08_dpo.py --ckpt_path=out/finetune-medium/ckpt.pt --device=cuda   # the book's gpt2-medium (GPU)
    python 08_dpo.py --average_log_probs --beta=1.0 --out_dir=out/dpo-avg   # per-token rewards
    python 09_generate.py --ckpt=out/dpo/ckpt.pt --chat        # talk to the result
    python 08_dpo.py --help
"""

import argparse
import copy
import hashlib
import json
import math
import os
import pickle
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import requests
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# 1. The data: preference pairs

DATA_DIR = Path(__file__).resolve().parent / "data"
# 07's instructions, each with two answers by Llama 3.1 70B: a polite one ("chosen") and an impolite
# one ("rejected"). URL and sha256 as listed in data/README.md.
PREFERENCE_DATA_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/"
                       "04_preference-tuning-with-dpo/instruction-data-with-preference.json")
PREFERENCE_DATA_SHA256 = "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e"


def load_preference_data(path=None) -> list[dict]:
    """The preference entries: {"instruction", "input", "chosen", "rejected"} strings (and 07's "output").

    path=None downloads rasbt's file into data/ once (sha256-checked). Pass your own file in the
    same format to align the model with your preferences.
    """
    if path is None:
        path = download(PREFERENCE_DATA_URL, DATA_DIR / "instruction-data-with-preference.json",
                        PREFERENCE_DATA_SHA256)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass --data_path=<JSON list of pairs> or omit it")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path} must hold a non-empty JSON list of entries, got {type(data).__name__}")
    for i, entry in enumerate(data):
        keys = ("instruction", "chosen", "rejected")
        if not (isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in keys)
                and isinstance(entry.get("input", ""), str)):
            raise ValueError(f"{path}: entry {i} is not an object with string 'instruction', 'chosen' and "
                             f"'rejected' (and optional 'input'): {str(entry)[:80]}; fix or drop it")
    return data


def tokenize_pairs(entries: list[dict], encode, end_id: int, max_length: int | None = None):
    """(pairs, n_cut, n_dropped): each pair is (prompt ids, chosen ids, rejected ids), tokenized once.

    The prompt is format_input(entry) + RESPONSE_HEADER, and each answer is followed by the end
    token: exactly the text 07 finetuned on and the prompt 07 and 09 generate from, so the policy
    is judged on the distribution it learned (and on where it stops). subtle: 07 encodes the header
    and the answer together, we encode them apart to know where the answer starts; GPT-2's BPE never
    merges the header's final newline with the next word, so the ids are the same (tested).
    max_length (the model's context): collate_pairs cuts longer sequences (n_cut counts them); a
    pair whose prompt alone is longer than the context has no answer token left to score: dropped.
    """
    pairs, n_cut, n_dropped = [], 0, 0
    for entry in entries:
        prompt = encode(format_input(entry)) + encode(RESPONSE_HEADER)
        chosen, rejected = encode(entry["chosen"]) + [end_id], encode(entry["rejected"]) + [end_id]
        if max_length is not None and len(prompt) > max_length:
            n_dropped += 1
            continue
        longest = len(prompt) + max(len(chosen), len(rejected)) - 1  # inputs: all but the last token
        n_cut += max_length is not None and longest > max_length
        pairs.append((prompt, chosen, rejected))
    return pairs, n_cut, n_dropped


# -----------------------------------------------------------------------------
# 2. Batches: chosen and rejected in one tensor, a mask on the response tokens


def collate_pairs(batch, pad_token_id=50256, allowed_max_length=None, device="cpu"):
    """B pairs (prompt, chosen, rejected) -> inputs x, targets y and mask, each (2B, T).

    Rows 0..B-1 hold prompt + chosen, rows B..2B-1 prompt + rejected: one forward pass scores
    both halves (split them with .chunk(2)). For each sequence s (its answer ends with the end token):

        x    = s without its last token              the model's input
        y    = s without its first token             y[i] is the token that x[:i+1] predicts
        mask = True where y[i] belongs to the answer (prompt and padding: False)

    Example, pad = 0, prompt [1, 2], chosen [3, 4, 9], rejected [5, 9]:

        chosen    x [1, 2, 3, 4]   y [2, 3, 4, 9]   mask [F, T, T, T]
        rejected  x [1, 2, 5, 0]   y [2, 5, 9, 0]   mask [F, T, T, F]

    No attention mask: padding goes on the right, and causal attention never lets a token see
    what comes after it, so no real token is changed by the padding; the padded positions' own
    outputs are left out of every sum by the mask. (03 shows the padding mask left padding would
    need.) allowed_max_length (the context) cuts all three.
    """
    seqs = [p + c for p, c, _ in batch] + [p + r for p, _, r in batch]
    prompt_lengths = [len(p) for p, _, _ in batch] * 2
    T = max(len(s) for s in seqs) - 1
    x = torch.full((len(seqs), T), pad_token_id, dtype=torch.long)  # (2B, T)
    y = torch.full((len(seqs), T), pad_token_id, dtype=torch.long)  # (2B, T) pad: a valid id to gather
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)  # (2B, T)
    for row, (s, prompt_length) in enumerate(zip(seqs, prompt_lengths)):
        n = len(s) - 1
        x[row, :n], y[row, :n] = torch.tensor(s[:-1]), torch.tensor(s[1:])
        mask[row, prompt_length - 1 : n] = True  # y[prompt_length - 1] is the answer's first token
    cut = slice(None, allowed_max_length)
    return x[:, cut].to(device), y[:, cut].to(device), mask[:, cut].to(device)


# -----------------------------------------------------------------------------
# 3. Log-probabilities of an answer, the DPO loss, the implicit rewards


def sequence_logprobs(logits, targets, mask, average: bool = False):
    """log pi(answer | prompt) for each row: the answer tokens' log-probabilities, summed or averaged.

    logits (N, T, V), targets and mask (N, T) -> (N,). By the chain rule, log p(y_1 .. y_n | x) =
    sum_i log p(y_i | x, y_<i): gather each target's log-probability and add up the masked ones.
    Example: token log-probs [-1.0, -2.0, -3.0] with mask [F, T, T] -> sum -5.0, average -2.5.

    Summed (the default, the DPO paper): the exact log-probability of the whole answer, the
    quantity the derivation needs. But it grows with length: every extra token adds a negative
    term, and the reward beta * (log pi - log ref) of a long answer can move further than that of
    a short one, so DPO tends to make answers longer (length bias, Park et al. 2024).
    average=True (as rasbt's notebook; SimPO, Meng et al. 2024) divides by the number of answer
    tokens: the reward becomes per token, length no longer pays, but the values are ~1/length as
    large, so beta must be larger for the same push (SimPO uses beta ~2), and the loss is no
    longer the one derived from the KL-regularised objective.
    """
    logps = logits.log_softmax(dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (N, T)
    total = torch.where(mask, logps, 0.0).sum(dim=-1)  # (N,) where, not *: 0 * -inf would be nan
    return total / mask.sum(dim=-1).clamp(min=1) if average else total


def final_hidden(model, idx):
    """04's GPT.forward without the LM head: (B, T) ids -> (B, T, n_embd), after the last LayerNorm."""
    t = model.transformer
    x = t.drop(t.wte(idx) + t.wpe(torch.arange(idx.size(1), device=idx.device)))  # (B, T, C)
    for block in t.h:
        x = block(x)
    return t.ln_f(x)


def pair_logprobs(model, x, y, mask, average: bool = False, ctx=nullcontext()):
    """(chosen, rejected) sequence log-probs, (B,) each, of a collate_pairs batch in one forward pass.

    The blocks run under ctx (bf16 autocast on a GPU); the LM head and log_softmax run in fp32,
    outside it. subtle: GPT-2's logits are tens of nats, where one bf16 step is 0.125-0.5; the gaps
    DPO measures (log pi - log ref, summed over an answer) are that small, so a bf16 head would bury
    them in rounding. The fp32 logits cost memory ((2B, T, vocab) x 4 bytes), not precision.
    """
    with ctx:
        logits = model(x)[0].float()
    return sequence_logprobs(logits, y, mask, average).chunk(2)


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta: float = 0.1,
             label_smoothing: float = 0.0):
    """The DPO loss of each pair and the implicit rewards of its two answers: three (B,) tensors.

    Inputs are sequence log-probs (B,). The reward the policy implies for an answer is
    r = beta * (log pi(answer) - log ref(answer)): how much more likely the policy made it than the
    reference did. Bradley-Terry says p(chosen preferred) = sigmoid(r_chosen - r_rejected); the
    loss is the negative log-likelihood of the label, -log sigmoid(margin). Its gradient,
    -beta * sigmoid(-margin) * (grad log pi(chosen) - grad log pi(rejected)), pushes the chosen
    answer up and the rejected one down, hardest on the pairs the policy still gets wrong.
    Hand example: log-probs pi (-5, -7), ref (-6, -6.5), beta 0.5 -> rewards +0.5 and -0.25,
    margin 0.75, loss ln(1 + e^-0.75) = 0.3869.

    label_smoothing eps > 0 is conservative DPO (Mitchell 2023): if a fraction eps of the labels
    may be flipped, train towards a soft label, p(chosen wins) = 1 - eps instead of 1, i.e. binary
    cross-entropy -(1 - eps) log sigmoid(m) - eps log sigmoid(-m) with m = beta * (the log-ratio
    difference). Plain DPO keeps pushing m up forever; this loss is smallest at m = ln((1 - eps) / eps)
    (2.2 for eps = 0.1), so the policy stops pushing once it is that confident.
    beta: a larger beta trusts the reference more (the KL penalty's weight); 0.1 is the paper's.
    """
    logits = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)  # (B,)
    losses = (-(1 - label_smoothing) * F.logsigmoid(beta * logits)
              - label_smoothing * F.logsigmoid(-beta * logits))  # (B,)
    chosen_rewards = beta * (policy_chosen - reference_chosen).detach()  # (B,) for the logs only
    rejected_rewards = beta * (policy_rejected - reference_rejected).detach()  # (B,)
    return losses, chosen_rewards, rejected_rewards


def make_reference(policy: nn.Module) -> nn.Module:
    """The reference model: a frozen deep copy of the starting policy.

    A copy with its own weights (the policy's change under the optimizer, the copy's must not),
    no gradients (no graph is built through it) and eval mode (no dropout: ref(y|x) must be one
    fixed number per answer, the anchor of every reward).
    """
    reference = copy.deepcopy(policy)
    reference.requires_grad_(False)
    return reference.eval()


def dpo_batch(policy, reference, batch, beta=0.1, label_smoothing=0.0, average=False, ctx=nullcontext()):
    """(losses, chosen rewards, rejected rewards), (B,) each, of a collate_pairs batch (x, y, mask)."""
    policy_chosen, policy_rejected = pair_logprobs(policy, *batch, average, ctx)
    with torch.no_grad():  # a fixed anchor: no graph, no saved activations
        reference_chosen, reference_rejected = pair_logprobs(reference, *batch, average, ctx)
    return dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta,
                    label_smoothing)


def pair_metrics(losses, chosen_rewards, rejected_rewards) -> dict:
    """Means over pairs: loss, chosen and rejected rewards, margin, accuracy (chosen reward > rejected)."""
    margins = chosen_rewards - rejected_rewards
    means = torch.stack([losses.mean(), chosen_rewards.mean(), rejected_rewards.mean(), margins.mean(),
                         (margins > 0).float().mean()])
    return dict(zip(("loss", "chosen_reward", "rejected_reward", "margin", "accuracy"), means.tolist()))


# -----------------------------------------------------------------------------
# 4. Evaluation: the metrics on fixed pairs, answers before and after


@torch.no_grad()
def evaluate_pairs(policy, reference, dataset, cfg, pad_token_id: int, ctx=nullcontext()) -> dict:
    """pair_metrics over the first cfg.eval_pairs pairs of dataset (-1: all)."""
    device = next(policy.parameters()).device
    n = len(dataset) if cfg.eval_pairs < 0 else min(cfg.eval_pairs, len(dataset))
    parts = []
    for start in range(0, n, cfg.batch_size):
        pairs = [dataset[i] for i in range(start, min(start + cfg.batch_size, n))]
        batch = collate_pairs(pairs, pad_token_id, policy.config.block_size, device)
        parts.append(dpo_batch(policy, reference, batch, cfg.beta, cfg.label_smoothing, cfg.average_log_probs,
                               ctx))
    return pair_metrics(*(torch.cat(tensors) for tensors in zip(*parts)))


def write_responses(reference, policy, entries, encode, decode, end_id, cfg, ctx=nullcontext()) -> Path:
    """Greedy answers before DPO (the reference IS the model before) and after, in dpo_responses.json."""
    entries = entries[: max(cfg.num_responses, 0)]
    args = (encode, decode, end_id, cfg.max_new_tokens, cfg.batch_size, ctx)
    before, after = generate_responses(reference, entries, *args), generate_responses(policy, entries, *args)
    records = [{"instruction": e["instruction"], "input": e.get("input", ""), "chosen": e["chosen"],
                "rejected": e["rejected"], "before_dpo": b, "after_dpo": a}
               for e, b, a in zip(entries, before, after)]
    path = Path(cfg.out_dir) / "dpo_responses.json"
    path.write_text(json.dumps(records, indent=1, ensure_ascii=False), encoding="utf-8")
    for record in records[:2]:
        print(f"\n{format_input(record)}{RESPONSE_HEADER}  before DPO: {record['before_dpo']}\n"
              f"  after DPO:  {record['after_dpo']}\n  (chosen: {record['chosen']})")
    print(f"\n{len(records)} validation answers before/after DPO written to {path}")
    return path


# -----------------------------------------------------------------------------
# 5. The settings, and the DPO loop


# (arg is called when the class below is defined, so its copy stands here, above it, not in the appendix)
# copied from 05_pretrain.py: arg
def arg(default, help: str):
    """A dataclass field with its --help text: `n_layer: int = arg(4, "transformer blocks")`."""
    return field(default=default, metadata={"help": help})


@dataclass
class DPOConfig:
    """Direct Preference Optimization of an instruction-tuned GPT (07's checkpoint)."""

    # model and data
    ckpt_path: str = arg("out/finetune/ckpt.pt", "the starting policy: 07's checkpoint (its default out_dir)")
    out_dir: str = arg("out/dpo", "ckpt.pt, dpo_responses.json and log.jsonl go here")
    overwrite: bool = arg(False, "replace a ckpt.pt already in out_dir (08 never does so unasked)")
    data_path: str = arg("", "'' = rasbt's instruction-data-with-preference.json (sha256-checked); or yours")
    unknown_char: str = arg("?", "char tokenizers: stands in for characters they lack ('' = error)")
    # DPO
    beta: float = arg(0.1, "the KL penalty's weight: larger stays closer to the reference")
    label_smoothing: float = arg(0.0, "conservative DPO: the assumed fraction of flipped labels, in [0, 0.5)")
    average_log_probs: bool = arg(False, "per-token mean instead of sum of the answer's log-probs")
    # optimization (the book: AdamW 5e-6, weight decay 0.01, batch 8, 1 epoch)
    batch_size: int = arg(8, "pairs per step (2x sequences)")
    epochs: float = arg(1.0, "passes over the training pairs (when max_iters = 0)")
    max_iters: int = arg(0, "optimizer steps; 0 = epochs * (training pairs // batch_size)")
    learning_rate: float = arg(5e-6, "small: DPO moves a trained model (the book's); constant after warmup")
    warmup_iters: int = arg(10, "linear warmup steps (the DPO paper warms up, then keeps the rate)")
    weight_decay: float = arg(0.01, "AdamW's")
    grad_clip: float = arg(1.0, "clip the gradient's global norm (0 = off)")
    # logging and evaluation
    log_interval: int = arg(5, "a log line every this many steps")
    eval_interval: int = arg(25, "metrics on train and val pairs, and a checkpoint, every this many steps")
    eval_pairs: int = arg(64, "pairs of each split to evaluate on (-1 = all)")
    max_new_tokens: int = arg(128, "longest generated answer")
    num_responses: int = arg(5, "validation entries answered before and after DPO in dpo_responses.json")
    # system
    device: str = arg("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    dtype: str = arg("auto", "auto (cuda: bfloat16 where native, else float16; else float32), float32, ...")
    threads: int = arg(0, "CPU threads; 0 = PyTorch's default")
    seed: int = arg(1337, "seeds the batch order")

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"--beta={self.beta} must be > 0 (it scales the rewards; the paper uses 0.1)")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"--label_smoothing={self.label_smoothing} must be in [0, 0.5): the fraction of "
                             f"labels assumed flipped; at 0.5 the labels would be noise (0 = plain DPO)")
        for name in ("batch_size", "log_interval", "eval_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.eval_pairs == 0:
            raise ValueError("--eval_pairs=0 would evaluate nothing; use -1 (all pairs) or a count")
        pick_dtype(self.dtype, pick_device(self.device))  # an unknown device or dtype: ValueError
        if not Path(self.ckpt_path).exists():
            raise FileNotFoundError(
                f"no checkpoint at {self.ckpt_path}: DPO starts from an instruction-tuned model, so run "
                f"07 first (`python 07_finetune.py --init_from=gpt2`) or point --ckpt_path at one")
        if self.data_path:
            load_preference_data(self.data_path)  # a missing or malformed file: caught here, before any work
        if (Path(self.out_dir) / "ckpt.pt").exists() and not self.overwrite:
            raise ValueError(f"{self.out_dir}/ckpt.pt already exists; write elsewhere with --out_dir=..., "
                             f"or pass --overwrite to replace it")


def prepare_pairs(cfg: DPOConfig, tokenizer, block_size: int):
    """The splits, the train/val pair datasets, encode, and the end token; prints what was cut."""
    encode, unknown = text_encoder(tokenizer, cfg.unknown_char)
    end_id = end_token_id(tokenizer)
    data = split_data(load_preference_data(cfg.data_path or None))
    print(f"data: {', '.join(f'{k} {len(v)}' for k, v in data.items())} pairs (DPO uses train, reports val)")
    datasets = {}
    for name in ("train", "val"):
        datasets[name], n_cut, n_dropped = tokenize_pairs(data[name], encode, end_id, block_size)
        if n_cut or n_dropped:
            print(f"  {name}: {n_cut} pairs cut at the context ({block_size} tokens), "
                  f"{n_dropped} dropped (their prompt alone is longer than the context)")
        if not datasets[name]:
            raise ValueError(f"no {name} pair fits the context of {block_size} tokens; start from a model "
                             f"with a larger block_size (07 from GPT-2: 1024)")
    if unknown:
        print(f"  {sum(unknown.values())} characters the char tokenizer lacks became {cfg.unknown_char!r}")
    return data, datasets, encode, end_id


def dpo(cfg: DPOConfig, start=None) -> dict:
    """Train the policy with DPO against its frozen copy; metrics, checkpoint and answers before/after.

    start: load_checkpoint(cfg.ckpt_path)'s (model, tokenizer, ckpt), if the caller has it already.
    Returns {"iter_num", "train_losses", "before", "after" ({"train": metrics, "val": metrics}),
    "policy", "reference"} (the two models, to inspect in a notebook or a test).
    """
    device = pick_device(cfg.device)
    device_type = torch.device(device).type
    cfg = replace(cfg, device=device, dtype=pick_dtype(cfg.dtype, device))  # the checkpoint records these
    if device_type == "cuda":  # TF32 for the fp32 matmuls that autocast leaves (the fp32 LM head)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    ctx, out_dir = autocast_context(device_type, cfg.dtype), Path(cfg.out_dir)

    policy, tokenizer, ckpt = start or load_checkpoint(cfg.ckpt_path)
    print(f"policy: {cfg.ckpt_path} (stage {ckpt.get('stage', '?')}, iter {ckpt.get('iter_num', '?')})")
    if ckpt.get("stage") in ("pretrain", "distributed"):
        print("note: this model was not instruction-tuned; DPO shapes answers it cannot yet give well")
    # eval mode for the policy too: dropout would make log pi noisy, a margin that is not there
    policy = policy.to(device).eval()
    reference = make_reference(policy)  # the model before DPO, frozen
    block_size = policy.config.block_size
    data, datasets, encode, end_id = prepare_pairs(cfg, tokenizer, block_size)
    train_set = datasets["train"]
    max_iters = cfg.max_iters or int(cfg.epochs * (len(train_set) // cfg.batch_size))
    if max_iters <= 0:
        raise ValueError(f"{max_iters} training steps: raise --epochs or --max_iters, or lower --batch_size")
    cfg = replace(cfg, max_iters=max_iters)
    # AdamW on every weight, as the book (at lr 5e-6, decaying the LayerNorm gains too changes nothing);
    # fused: one kernel updates every tensor (as 05's configure_optimizers)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  fused=device_type in ("cuda", "cpu"))
    scaler = torch.amp.GradScaler(device_type, enabled=cfg.dtype == "float16")  # off: a pass-through
    print(f"model: {policy.num_params():,} parameters; reference: a frozen copy; beta {cfg.beta}, label "
          f"smoothing {cfg.label_smoothing}, {'averaged' if cfg.average_log_probs else 'summed'} log-probs; "
          f"{max_iters} steps of {cfg.batch_size} pairs")

    def evaluate(it: int) -> dict:
        metrics = {k: evaluate_pairs(policy, reference, datasets[k], cfg, end_id, ctx) for k in datasets}
        for k, m in metrics.items():
            print(f"  {k:5s} loss {m['loss']:.4f}, rewards chosen {m['chosen_reward']:+.3f} rejected "
                  f"{m['rejected_reward']:+.3f}, margin {m['margin']:+.3f}, accuracy {m['accuracy']:.1%}")
        with open(out_dir / "log.jsonl", "a" if it else "w") as log:
            record = {f"{k}_{name}": v for k, m in metrics.items() for name, v in m.items()}
            log.write(json.dumps({"iter": it, **record}) + "\n")
        return metrics

    out_dir.mkdir(parents=True, exist_ok=True)
    print("before DPO (the policy is the reference: rewards 0, loss ln 2 = 0.6931):")
    before = metrics = evaluate(0)
    best_val_loss, losses, t0, tokens = float("inf"), [], time.time(), 0
    for it in range(max_iters):
        lr = cfg.learning_rate * min(1.0, (it + 1) / (cfg.warmup_iters + 1))  # linear warmup, then constant
        for group in optimizer.param_groups:
            group["lr"] = lr
        pairs = [train_set[i] for i in batch_indices(it, len(train_set), cfg.batch_size, cfg.seed)]
        batch = collate_pairs(pairs, end_id, block_size, device)
        step = dpo_batch(policy, reference, batch, cfg.beta, cfg.label_smoothing, cfg.average_log_probs, ctx)
        loss = step[0].mean()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # true gradients, before clipping
        norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip or float("inf"))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach()); loss.item()  # stays on the device: reading it every step would wait for the GPU
        tokens += batch[0].numel()
        if it % cfg.log_interval == 0 or it == max_iters - 1:
            m = pair_metrics(*step)  # reading values waits for the device: on log steps only
            print(f"step {it + 1}/{max_iters}: loss {m['loss']:.4f}, margin {m['margin']:+.3f}, accuracy "
                  f"{m['accuracy']:.0%}, lr {lr:.2e}, grad norm {norm:.2f}, "
                  f"{tokens / (time.time() - t0):,.0f} tokens/s")
            t0, tokens = time.time(), 0
        if (it + 1) % cfg.eval_interval == 0 or it == max_iters - 1:
            print(f"step {it + 1}:")
            metrics = evaluate(it + 1)
            best_val_loss = min(best_val_loss, metrics["val"]["loss"])
            save_checkpoint(out_dir / "ckpt.pt", {
                "model": policy.state_dict(), "model_args": asdict(policy.config), "config": asdict(cfg),
                "tokenizer": ckpt["tokenizer"], "stage": "dpo", "iter_num": it + 1,
                "best_val_loss": best_val_loss,
                "val_loss": metrics["val"]["loss"],  # DPO losses, not LM losses: ln 2 is where 08 starts
                "optimizer": None, "scaler": None, "rng": None,  # a DPO run is short: no resume (as 07)
            })
            t0, tokens = time.time(), 0  # the speed of training, not of evaluating

    write_responses(reference, policy, data["val"], encode, tokenizer.decode, end_id, cfg, ctx)
    print(f"\nDPO, before -> after (rewards = {cfg.beta} * (log pi - log ref), in nats)")
    for k in ("train", "val"):
        b, a = before[k], metrics[k]
        print(f"  {k:5s} loss {b['loss']:.4f} -> {a['loss']:.4f}   margin {b['margin']:+.3f} -> "
              f"{a['margin']:+.3f}   accuracy {b['accuracy']:.1%} -> {a['accuracy']:.1%}")
    print(f"checkpoint (stage dpo): {out_dir / 'ckpt.pt'}; try it: python 09_generate.py "
          f"--ckpt={out_dir / 'ckpt.pt'} --chat")
    return {"iter_num": max_iters, "train_losses": torch.stack(losses).tolist(), "before": before,
            "after": metrics, "policy": policy, "reference": reference}


def main(argv=None):
    cfg = parse_config(DPOConfig, argv)  # a bad setting or a missing file: one `error:` line, exit 2
    print(cfg)
    try:
        start = load_checkpoint(cfg.ckpt_path)
    except ValueError as e:  # a file that is not a checkpoint of these scripts: the user's, not our bug
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return dpo(cfg, start)


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
        kind = f.type if isinstance(f.type, type) else type(f.default)  # the type, also when a string
        flag = kind is bool
        help_text = f"{f.metadata.get('help', '')} (default: {f.default!r})".replace("%", "%%").lstrip()
        parser.add_argument(f"--{f.name}", type=to_bool if flag else kind, metavar=kind.__name__,
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
        raise ValueError("--dtype=float16 needs loss scaling, done on CUDA only; use bfloat16 or float32")
    if dtype != "auto":
        return dtype
    if cuda:
        return "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
    return "float32"


# copied from 05_pretrain.py: autocast_context
def autocast_context(device_type: str, dtype: str):
    """Mixed precision: matmuls run in dtype, precision-sensitive ops (softmax, norms, the loss) in fp32.

    The weights stay fp32: they are the master copy AdamW updates, since a bf16 weight cannot absorb
    an update 1000x smaller than itself. bf16 has fp32's exponent range, so gradients need no
    scaling; fp16 does (a GradScaler). "float32" means no autocast at all.
    """
    if dtype == "float32":
        return nullcontext()
    if dtype not in ("bfloat16", "float16"):
        raise ValueError(f"dtype {dtype!r} is not float32, bfloat16 or float16")
    return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))


# copied from 05_pretrain.py: save_checkpoint
def save_checkpoint(path, ckpt: dict):
    """torch.save to path + ".tmp", flushed to disk, then renamed over path.

    The rename is atomic: whatever happens (Ctrl-C, a crash, a full disk) path holds either the old
    checkpoint or the new one, never half of one. The format the training stages write:
    {"model", "model_args", "tokenizer", "config", "stage" (pretrain, distributed, finetune, dpo),
    "iter_num", "best_val_loss", "val_loss" (last measured), "optimizer", "scaler", "rng"}.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    except (pickle.UnpicklingError, RuntimeError, EOFError):  # not torch.save's format, or not just tensors
        ckpt = None
    if not isinstance(ckpt, dict) or not {"model", "model_args", "tokenizer"} <= set(ckpt):
        raise ValueError(f"{path} is not a checkpoint of these scripts (05_pretrain.py to 08_dpo.py write "
                         f"them as out_dir/ckpt.pt); check the path")
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    return model, get_tokenizer(ckpt["tokenizer"]), ckpt


# copied from 07_finetune.py: split_data
def split_data(data: list, train_fraction: float = 0.85, test_fraction: float = 0.10) -> dict[str, list]:
    """Split in file order: the first 85% train, the next 10% test, the last 5% validation.

    No shuffling: the file is already in random order, and a fixed split means every run (and 08,
    09) holds out the same entries. 1,100 entries -> 935 train, 110 test, 55 val (the book's).
    """
    n_train, n_test = int(len(data) * train_fraction), int(len(data) * test_fraction)
    if n_train == 0 or n_test == 0 or len(data) - n_train - n_test == 0:
        raise ValueError(f"{len(data)} entries are too few to split 85/10/5 (every split needs one); use 20+")
    n_train_test = n_train + n_test
    return {"train": data[:n_train], "test": data[n_train:n_train_test], "val": data[n_train_test:]}


# copied from 07_finetune.py: RESPONSE_HEADER
RESPONSE_HEADER = "\n\n### Response:\n"  # what follows format_input(entry); then the answer


# copied from 07_finetune.py: format_input
def format_input(entry: dict) -> str:
    """The Alpaca prompt for an entry: a fixed two-sentence preamble, the instruction, the input if any.

    >>> prompt = format_input({"instruction": "Rewrite in the passive voice.", "input": "The cat ate it."})
    >>> print(prompt[prompt.index("###") :])
    ### Instruction:
    Rewrite in the passive voice.
    <BLANKLINE>
    ### Input:
    The cat ate it.

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
            raise ValueError(f"characters {''.join(sorted(set(missing)))!r} are not in the model's char "
                             f"vocabulary; pass --unknown_char='?' to replace them, or use a GPT-2 model")
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


# copied from 07_finetune.py: batch_indices
def batch_indices(step: int, n: int, batch_size: int, seed: int = 0) -> list[int]:
    """The example indices of training batch `step`: shuffled epochs, last partial batch dropped.

    Stateless like 02's get_batch: batch = f(seed, step), so a run is reproducible from any step.
    """
    if not 0 < batch_size <= n:
        raise ValueError(f"batch_size={batch_size} must be between 1 and the {n} training examples")
    epoch, i = divmod(step, n // batch_size)
    order = np.random.default_rng([seed, epoch]).permutation(n)  # a fresh shuffle every epoch
    return order[i * batch_size : (i + 1) * batch_size].tolist()


# copied from 07_finetune.py: generate_greedy
@torch.no_grad()
def generate_greedy(model, prompts: list[list[int]], max_new_tokens: int, end_id: int, batch_size: int = 8,
                    ctx=nullcontext()) -> list[list[int]]:
    """Greedy continuations of several prompts, batched, each stopped at end_id (not included).

    subtle: prompts of different lengths share one forward pass, padded on the right with end_id.
    Causal attention means what sits right of a row's last token cannot change that token's
    logits, so no mask is needed: we read each row's next token at its own last position and write
    it just after. Prompts of similar length are batched together; one longer than the context
    keeps its last block_size - 1 tokens, and an answer stops when prompt + answer fill the context.
    No KV cache: each step reruns the whole context (09_generate.py adds the cache). The CPU waits
    for the device once per token, to ask whether every row is done.
    """
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    block_size, out = model.config.block_size, [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = [prompts[i][max(0, len(prompts[i]) - block_size + 1) :] for i in rows]  # room for one more
        longest = max(len(p) for p in batch)
        width = min(block_size, longest + max_new_tokens)
        idx = torch.full((len(rows), width + 1), end_id, dtype=torch.long)  # (B, width + 1): one spare column
        for r, p in enumerate(batch):
            idx[r, : len(p)] = torch.tensor(p, dtype=torch.long)
        idx, arange = idx.to(device), torch.arange(len(rows), device=device)
        lengths = torch.tensor([len(p) for p in batch], device=device)  # (B,)
        done = torch.zeros(len(rows), dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            with ctx:  # every live row ends at or before column longest + step, and before width
                logits, _ = model(idx[:, : min(longest + step, width)])  # (B, T, vocab)
            next_id = logits[arange, lengths - 1].argmax(-1)  # (B,) each row at its own last token
            next_id = torch.where(done, end_id, next_id)  # a finished row writes end_id into padding
            idx[arange, lengths] = next_id
            lengths += ~done
            done |= (next_id == end_id) | (lengths >= width)
            if done.all():  # the one sync per token
                break
        idx, lengths = idx.tolist(), lengths.tolist()
        for r, i in enumerate(rows):
            new = idx[r][len(batch[r]) : lengths[r]]
            out[i] = new[:-1] if new and new[-1] == end_id else new
    model.train(was_training)
    return out


# copied from 07_finetune.py: generate_responses
def generate_responses(model, entries, encode, decode, end_id, max_new_tokens=256, batch_size=8,
                       ctx=nullcontext()) -> list[str]:
    """The model's greedy answer to each entry, as text (prompt: format_input + RESPONSE_HEADER)."""
    prompts = [encode(format_input(e)) + encode(RESPONSE_HEADER) for e in entries]
    outputs = generate_greedy(model, prompts, max_new_tokens, end_id, batch_size, ctx)
    return [decode(ids).strip() for ids in outputs]


if __name__ == "__main__":
    main()
