"""08_dpo.py: Direct Preference Optimization (DPO).

07 taught the model to answer; now we teach it which of two answers people prefer. The classic
recipe (RLHF: Christiano et al. 2017, Ouyang et al. 2022) trains a reward model on preference
pairs, then maximises it with PPO while a KL penalty keeps the policy near a frozen reference. DPO
(Rafailov et al. 2023) shows that this KL-regularised problem has a closed-form optimum,

    pi*(y|x) = ref(y|x) exp(r(x,y) / beta) / Z(x)
      <=>  r(x,y) = beta log(pi*(y|x) / ref(y|x)) + beta log Z(x)

so every policy IMPLIES a reward, r = beta * log(pi / ref), and Z(x) cancels when two answers to
the same prompt are compared. Put that reward into the Bradley-Terry model of preferences,
p(chosen beats rejected) = sigmoid(r_chosen - r_rejected), and maximise the likelihood of the human
labels: a plain classification loss on the policy itself, with no reward model, sampling or RL loop,

    loss = -log sigmoid(beta * ((log pi(chosen) - log ref(chosen))
                                - (log pi(rejected) - log ref(rejected))))

Reading the metrics: at step 0 the policy IS the reference, so every reward and margin is 0 and the
loss ln 2 = 0.693 (sigmoid(0) = 1/2). The reward accuracy (pairs whose chosen reward is the higher)
starts at 0 (all ties) and should climb on held-out pairs, not only on training ones.

References: Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly
a Reward Model"; Mitchell 2023, "A note on DPO with noisy preferences" (conservative DPO); Raschka,
"Build a Large Language Model (From Scratch)", ch. 7 bonus, dpo-from-scratch
(rasbt/LLMs-from-scratch), whose data and settings we use; Hugging Face TRL's DPOTrainer.

Run it (one process; 07's checkpoint is the starting policy):
  python 04_gpt.py --init_from=gpt2 --save_ckpt              # once: OpenAI's GPT-2 as a checkpoint
  python 07_finetune.py --init_from=gpt2 --max_iters=100     # CPU: an instruction-tuned GPT-2, then
  python 08_dpo.py                                           # DPO on it -> out/dpo/ckpt.pt
  python 08_dpo.py --average_log_probs --beta=1.0 --out_dir=out/dpo-avg       # per-token rewards
  python 09_generate.py --ckpt=out/dpo/ckpt.pt --chat        # talk to the result
Ctrl-C saves after the current step; `python 08_dpo.py --init_from=resume --out_dir=out/dpo`
continues the run bit for bit. One GPU, the book's model: the same with --init_from=gpt2-medium
(04, 07) and 07's --out_dir=out/finetune-medium, then
  python 08_dpo.py --ckpt=out/finetune-medium/ckpt.pt --out_dir=out/dpo-medium
"""

import argparse
import copy
import json
import math
import os
import pickle
import signal
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# 1. The data: preference pairs

PROJECT = Path(__file__).resolve().parent  # data/, out/, relative flags resolve here, any cwd
DATA_DIR = PROJECT / "data"
PAIRS_FILE = "instruction-data-with-preference.json"  # rasbt's, which 02 fetches


def load_preference_data(path="") -> list[dict]:
    """Entries {"instruction", "input", "chosen", "rejected"}. path="": rasbt's pairs, which 02
    fetches: each of 07's entries with its answer and Llama 3.1 70B's rewrite of it, more polite or
    less; the politer is chosen (in 6 of 1,100 the two are the same). Or your own file."""
    path = Path(path or DATA_DIR / PAIRS_FILE)
    if not path.is_file():  # missing, or a folder
        raise FileNotFoundError(f"{path} is not a file: `python 02_dataloader.py` fetches "
                                "rasbt's pairs, or pass --data_path=<yours>")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, or nested past Python's limit
        raise ValueError(f"{path} is not JSON ({e}); --data_path: a JSON list of pairs") from None
    entries = data if isinstance(data, list) and data else [None]  # else entry 0 is bad
    texts = ("instruction", "chosen", "rejected")
    for i, entry in enumerate(entries):
        is_object = isinstance(entry, dict) and isinstance(entry.get("input", ""), str)
        if not (is_object and all(isinstance(entry.get(k), str) for k in texts)):
            raise ValueError(f"{path}: entry {i} needs strings 'instruction', 'chosen' and "
                             f"'rejected' (optional 'input'): {str(entry)[:80]}; fix or drop it")
    return data


def tokenize_pairs(entries: list[dict], encode, end_id: int, max_length: int):
    r"""(pairs, n_cut, n_dropped): each entry's (prompt, chosen, rejected) ids, as 07 finetuned on
    them: prompt = format_input + RESPONSE_HEADER, each answer + the end token (where it stops).
    Pairs over max_length are cut by collate_pairs (n_cut), or dropped if the prompt alone is.

    subtle: 07 encodes header and answer together, we apart (to know where the answer starts).
    GPT-2's BPE merges only inside the chunks of its pre-split, and the header ends with "\n".
    When the answer starts with a non-space, or with one whitespace character and then a
    non-space (all of rasbt's answers), that newline is a chunk of its own, so both give the same
    ids. An answer that starts with two whitespace characters, or is only whitespace, shares a
    chunk with it (`\s+(?!\S)` takes a run of whitespace but its last character), and BPE may
    merge them: "\n\n" and "\n\xa0" are GPT-2 tokens, so "\n\nHi" gets other ids (tested)."""
    pairs = []
    n_cut = 0
    n_dropped = 0
    for entry in entries:
        prompt = encode(format_input(entry)) + encode(RESPONSE_HEADER)
        chosen = encode(entry["chosen"]) + [end_id]
        rejected = encode(entry["rejected"]) + [end_id]
        if len(prompt) > max_length:
            n_dropped += 1
            continue
        longest = len(prompt) + max(len(chosen), len(rejected)) - 1  # inputs: all but the last
        n_cut += longest > max_length
        pairs.append((prompt, chosen, rejected))
    return pairs, n_cut, n_dropped


# -----------------------------------------------------------------------------
# 2. Batches: chosen and rejected in one tensor, a mask on the response tokens

def collate_pairs(batch, pad_token_id=50256, allowed_max_length=None, device="cpu"):
    """B pairs (prompt, chosen, rejected) -> inputs x, targets y and mask, each (2B, T).

    Rows 0..B-1 hold prompt + chosen, rows B..2B-1 prompt + rejected: one forward pass scores both
    halves (split them with .chunk(2)). For each sequence s (its answer ends with the end token):

        x    = s without its last token              the model's input
        y    = s without its first token             y[i] is the token that x[:i+1] predicts
        mask = True where y[i] belongs to the answer (prompt and padding: False)

    Example, pad = 0, prompt [1, 2], chosen [3, 4, 9], rejected [5, 9]:

        chosen    x [1, 2, 3, 4]   y [2, 3, 4, 9]   mask [F, T, T, T]
        rejected  x [1, 2, 5, 0]   y [2, 5, 9, 0]   mask [F, T, T, F]

    No attention mask: padding goes on the right, and causal attention never lets a token see
    what comes after it, so no real token is changed by the padding; the padded positions' own
    outputs are left out of every sum by the mask. (03 shows the padding mask left padding would
    need.) allowed_max_length (the context) cuts all three."""
    seqs = [p + c for p, c, _ in batch] + [p + r for p, _, r in batch]
    prompt_lengths = [len(p) for p, _, _ in batch] * 2
    N = len(seqs)  # 2B
    T = max(len(s) for s in seqs) - 1
    x = torch.full((N, T), pad_token_id)  # (2B, T), int64 as its fill value
    y = x.clone()  # (2B, T) pad: a valid id to gather
    mask = torch.zeros(N, T, dtype=torch.bool)  # (2B, T)
    for row, s in enumerate(seqs):
        n = len(s) - 1
        x[row, :n] = torch.tensor(s[:-1])
        y[row, :n] = torch.tensor(s[1:])
        answer_start = prompt_lengths[row] - 1  # y[prompt_length - 1]: the answer's first token
        mask[row, answer_start:n] = True
    cut = slice(None, allowed_max_length)
    return x[:, cut].to(device), y[:, cut].to(device), mask[:, cut].to(device)


# -----------------------------------------------------------------------------
# 3. Log-probabilities of an answer, the DPO loss, the implicit rewards

def sequence_logprobs(logits, targets, mask, average: bool = False):
    """log pi(answer | prompt) per row: the answer tokens' log-probabilities, summed or averaged.

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
    longer the one derived from the KL-regularised objective."""
    all_logps = logits.log_softmax(dim=-1)  # (N, T, V)
    logps = all_logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (N, T): the targets'
    total = torch.where(mask, logps, 0.0).sum(dim=-1)  # (N,) where, not *: 0 * -inf would be nan
    if not average:
        return total
    return total / mask.sum(dim=-1).clamp(min=1)  # per answer token


def final_hidden(model, idx):
    """(B, T) ids -> (B, T, C): 04's GPT.forward up to ln_f, no head, no checks of our own ids."""
    transformer = model.transformer
    pos = torch.arange(idx.size(1), device=idx.device)  # (T,)
    x = transformer.drop(transformer.wte(idx) + transformer.wpe(pos))  # (B, T, C)
    for block in transformer.h:
        x = block(x)
    return transformer.ln_f(x)


def pair_logprobs(model, x, y, mask, average: bool = False, ctx=nullcontext()):
    """(chosen, rejected) sequence log-probs, (B,) each, of a collate_pairs batch, in one pass.

    The blocks run under ctx (bf16 autocast on a GPU) through final_hidden; the LM head and
    log_softmax run in fp32, outside it (GPT.forward's head would run under ctx). subtle: GPT-2's
    logits are tens of nats, where one bf16 step is 0.125-0.5; the gaps DPO measures (log pi -
    log ref) are that small, so a bf16 head would bury them in rounding (summed over 100 tokens
    of GPT-2-sized logits: 0.2 nats off in bf16, 0.03 with CUDA's TF32). The price: (2B, T,
    vocab) logits of 4 bytes each instead of 2."""
    with ctx:
        h = final_hidden(model, x)  # (2B, T, C)
    head = model.lm_head.weight.float()  # (vocab_size, C): the token embedding, tied
    logits = F.linear(h.float(), head)  # (2B, T, vocab_size) in fp32
    return sequence_logprobs(logits, y, mask, average).chunk(2)  # (B,) each


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
             beta: float = 0.1, label_smoothing: float = 0.0):
    """The DPO loss of each pair and the implicit rewards of its two answers: three (B,) tensors.

    Inputs are sequence log-probs (B,). The reward the policy implies for an answer is
    r = beta * (log pi(answer) - log ref(answer)): how much more likely the policy made it than
    the reference did. Bradley-Terry says p(chosen preferred) = sigmoid(r_chosen - r_rejected);
    the loss is the negative log-likelihood of the label, -log sigmoid(margin). Its gradient,
    -beta * sigmoid(-margin) * (grad log pi(chosen) - grad log pi(rejected)), pushes the chosen
    answer up and the rejected one down, hardest on the pairs the policy still gets wrong.
    Hand example: log-probs pi (-5, -7), ref (-6, -6.5), beta 0.5 -> rewards +0.5 and -0.25,
    margin 0.75, loss ln(1 + e^-0.75) = 0.3869.

    label_smoothing eps > 0 is conservative DPO (Mitchell 2023): if a fraction eps of the labels
    may be flipped, train towards a soft label, p(chosen wins) = 1 - eps instead of 1, i.e.
    binary cross-entropy -(1 - eps) log sigmoid(m) - eps log sigmoid(-m) with m = beta * (the
    log-ratio difference). Plain DPO keeps pushing m up forever; this loss is smallest at
    m = ln((1 - eps) / eps) (2.2 for eps = 0.1), where the policy stops pushing.
    beta: a larger beta trusts the reference more (the KL penalty's weight); 0.1 is the paper's."""
    chosen_logratios = policy_chosen - reference_chosen  # (B,) log pi/ref of the chosen answer
    rejected_logratios = policy_rejected - reference_rejected  # (B,)
    logratio_gap = chosen_logratios - rejected_logratios  # (B,) the margin m is beta * this
    log_p_chosen_wins = F.logsigmoid(beta * logratio_gap)  # (B,) log sigmoid(m)
    log_p_rejected_wins = F.logsigmoid(-beta * logratio_gap)  # (B,) log sigmoid(-m)
    eps = label_smoothing
    losses = -(1 - eps) * log_p_chosen_wins - eps * log_p_rejected_wins  # (B,)
    chosen_rewards = beta * chosen_logratios.detach()  # (B,) for the logs only
    rejected_rewards = beta * rejected_logratios.detach()  # (B,)
    return losses, chosen_rewards, rejected_rewards


def make_reference(policy: nn.Module) -> nn.Module:
    """The reference: a frozen deep copy of the starting policy. Its own weights (the policy's
    change), no gradients (no graph through it), eval mode (ref(y|x): one fixed number)."""
    return copy.deepcopy(policy).requires_grad_(False).eval()


def dpo_batch(policy, reference, batch, beta=0.1, label_smoothing=0.0, average=False,
              ctx=nullcontext()):
    """(losses, chosen rewards, rejected rewards), (B,) each, of a collate_pairs (x, y, mask)."""
    policy_chosen, policy_rejected = pair_logprobs(policy, *batch, average, ctx)
    with torch.no_grad():  # a fixed anchor: no graph, no saved activations
        reference_chosen, reference_rejected = pair_logprobs(reference, *batch, average, ctx)
    return dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                    beta, label_smoothing)


def pair_metrics(losses, chosen_rewards, rejected_rewards) -> dict:
    """Means over pairs: loss, chosen and rejected rewards, margin, and accuracy (margin > 0)."""
    margins = chosen_rewards - rejected_rewards
    means = {
        "loss": losses.mean(),
        "chosen_reward": chosen_rewards.mean(),
        "rejected_reward": rejected_rewards.mean(),
        "margin": margins.mean(),
        "accuracy": (margins > 0).float().mean(),
    }
    values = torch.stack(list(means.values())).tolist()  # one read of the device, not five
    return dict(zip(means, values))


# -----------------------------------------------------------------------------
# 4. The settings and the DPO loop

@dataclass
class DPOConfig:
    """Direct Preference Optimization of 07's instruction-tuned GPT; the book's settings, summed."""

    ckpt: Annotated[str, "07's model: start and reference"] = "out/finetune/ckpt.pt"
    out_dir: Annotated[str, "ckpt.pt and log.jsonl go here"] = "out/dpo"
    init_from: Annotated[str, "scratch, resume (out_dir's run) or auto"] = "scratch"
    overwrite: Annotated[bool, "replace out_dir's earlier run"] = False
    data_path: Annotated[str, "JSON list of pairs; '': rasbt's (02 fetches it)"] = ""
    beta: Annotated[float, "KL penalty: larger stays nearer 07's model"] = 0.1
    label_smoothing: Annotated[float, "conservative DPO: flipped-label share"] = 0.0
    average_log_probs: Annotated[bool, "mean, not sum, of answer log-probs"] = False
    batch_size: Annotated[int, "pairs per step (2x sequences)"] = 8
    max_iters: Annotated[int, "optimizer steps; 0: one pass over the pairs"] = 0
    learning_rate: Annotated[float, "flat after warmup: nudges a trained model"] = 5e-6
    warmup_iters: Annotated[int, "linear warmup steps (the paper: 150)"] = 10
    weight_decay: Annotated[float, "AdamW's"] = 0.01
    grad_clip: Annotated[float, "clip the gradient norm to this; 0 = never"] = 1.0
    log_interval: Annotated[int, "a log line every this many steps"] = 5
    eval_interval: Annotated[int, "metrics, ckpt.pt every this many steps"] = 25
    eval_pairs: Annotated[int, "pairs per split to evaluate (-1 = all)"] = 64
    device: Annotated[str, "auto (cuda > mps > cpu), cpu, cuda[:N], mps"] = "auto"
    dtype: Annotated[str, "auto (GPU bf16/fp16, CPU fp32), float32, bfloat16, float16"] = "auto"
    threads: Annotated[int, "CPU threads; 0 = PyTorch's choice"] = 0
    seed: Annotated[int, "seeds the batch order"] = 1337

    def __post_init__(self):  # every check names its fix; parse_config prints it as one line
        if not 0 < self.beta < math.inf:
            raise ValueError(f"--beta={self.beta} must be > 0 (the paper: 0.1)")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"--label_smoothing={self.label_smoothing} must be in [0, 0.5) "
                             "(at 0.5 the labels are noise)")
        least = dict(batch_size=1, log_interval=1, eval_interval=1, eval_pairs=-1)
        for f in fields(self):  # the numbers (not bools, not strings); nan fails every <=
            value = getattr(self, f.name)
            minimum = least.get(f.name, 0)  # the others: at least 0
            if type(value) in (int, float) and not minimum <= value < math.inf:
                raise ValueError(f"--{f.name}={value} must be finite and >= {minimum}")
        if self.eval_pairs == 0:  # evaluates nothing
            raise ValueError("--eval_pairs=0: use -1 (all) or a count")
        if self.init_from not in ("scratch", "resume", "auto"):
            raise ValueError(f"--init_from={self.init_from!r}: use scratch, resume, auto")
        self.device = pick_device(self.device)  # "auto" resolved here, once
        self.dtype = pick_dtype(self.dtype, self.device)
        self.ckpt = str(PROJECT / self.ckpt)  # an absolute path stays as it is
        self.out_dir = str(PROJECT / self.out_dir)
        if Path(self.out_dir).resolve() == PROJECT:  # '' or '.': the run among the scripts
            raise ValueError(f"--out_dir={self.out_dir!r} is the project folder: name another")
        run = Path(self.out_dir) / "ckpt.pt"
        if any(folder.is_file() for folder in run.parents):  # now, not at the first save
            raise ValueError(f"--out_dir={self.out_dir} is a file, or in one: name a folder")
        if Path(self.ckpt).resolve() == run.resolve():  # the reference: never replaced by a save
            raise ValueError(f"--ckpt={self.ckpt} is the file a save replaces; change --out_dir")
        if self.overwrite and self.init_from != "scratch":  # a resume (auto's too) ignores it
            raise ValueError("--overwrite starts afresh: use it with --init_from=scratch")
        if self.init_from == "auto":
            self.init_from = "resume" if run.exists() else "scratch"
        if self.init_from == "resume" and not run.exists():
            raise FileNotFoundError(f"no {run} to resume; --init_from=scratch starts one")
        fresh = self.init_from == "scratch" and not self.overwrite  # may replace nothing
        if fresh and run.exists():
            fix = ", not 08's: use"  # 05's or 07's: nothing to resume, and not ours to replace
            if load_checkpoint(run)[2].get("stage") == "dpo":  # not a checkpoint: its own error
                fix = ": --init_from=resume goes on, --overwrite replaces it, or use"
            raise ValueError(f"{run} holds a run{fix} another --out_dir")
        log = run.with_name("log.jsonl")  # a run stopped before its first save, or another's
        if fresh and log.exists():
            raise ValueError(f"{log} is a run's log: --init_from=scratch --overwrite "
                             "replaces it, or use another --out_dir")
        if self.data_path:  # a bad file fails now, before a model is loaded
            self.data_path = str(PROJECT / self.data_path)
            load_preference_data(self.data_path)


def prepare_pairs(cfg: DPOConfig, start: dict, block_size: int) -> dict:
    """Tokenized train and val pairs and end_id (the pad); prints what the context cuts or drops."""
    tokenizer = get_tokenizer(start["tokenizer"])
    unknown_char = start["config"].get("unknown_char") or "?"  # 07's --unknown_char
    encode, unknown = text_encoder(tokenizer, unknown_char)
    end_id = end_token_id(tokenizer)
    splits = split_data(load_preference_data(cfg.data_path))
    train, n_cut, n_dropped = tokenize_pairs(splits["train"], encode, end_id, block_size)
    val, _, _ = tokenize_pairs(splits["val"], encode, end_id, block_size)
    sizes = ", ".join(f"{split} {len(entries)}" for split, entries in splits.items())
    message = (f"data: {sizes} pairs; {n_cut} train pairs cut at the context ({block_size} "
               f"tokens), {n_dropped} dropped (the prompt alone is longer)")
    if unknown:
        message += f"; {unknown.total()} characters the char model lacks became {unknown_char!r}"
    print(message)
    if len(train) < cfg.batch_size or not val:
        raise ValueError(f"{len(train)} train and {len(val)} val pairs fit the context "
                         f"of {block_size} tokens, too few for --batch_size={cfg.batch_size}: "
                         "lower it, or use a model of longer context (GPT-2: 1024)")
    return {"train": train, "val": val, "end_id": end_id}


@torch.no_grad()
def evaluate_and_log(score, data: dict, cfg: DPOConfig, it: int) -> dict:
    """pair_metrics of each split's first eval_pairs (-1: all), scored batch_size at a time;
    printed, and added as one JSON line to out_dir/log.jsonl (step 0 starts the file afresh)."""
    metrics = {}
    record = {"iter": it}
    for split in ("train", "val"):
        pairs = data[split] if cfg.eval_pairs == -1 else data[split][:cfg.eval_pairs]
        starts = range(0, len(pairs), cfg.batch_size)
        scores = [score(pairs[i : i + cfg.batch_size]) for i in starts]
        columns = [torch.cat(column) for column in zip(*scores)]  # losses, rewards: (n,) each
        m = pair_metrics(*columns)
        print(f"step {it} {split:5s} loss {m['loss']:.4f}, "
              f"rewards {m['chosen_reward']:+.3f} chosen, "
              f"{m['rejected_reward']:+.3f} rejected, "
              f"margin {m['margin']:+.3f}, accuracy {m['accuracy']:.1%}")
        record |= {f"{split}_{k}": v for k, v in m.items()}
        metrics[split] = m
    with open(Path(cfg.out_dir) / "log.jsonl", "a" if it else "w") as log:
        print(json.dumps(record), file=log)
    return metrics


def load_models(cfg: DPOConfig, run=None) -> tuple:
    """(policy, reference, start, resumed) on the CPU. start: cfg.ckpt's checkpoint; policy: its
    model, or on resume out_dir's (run: its checkpoint, if read); reference: a frozen copy of it."""
    if not Path(cfg.ckpt).is_file():
        make_one = "python 07_finetune.py --init_from=gpt2 makes one"
        raise FileNotFoundError(f"no checkpoint at {cfg.ckpt}: DPO needs 07's; {make_one}")
    model, _, ckpt = load_checkpoint(cfg.ckpt)
    stage = ckpt.get("stage")
    print(f"{stage} model: {model.num_params():,} parameters")
    if stage not in ("finetune", "dpo"):  # 04's, 05's or 06's: it never learned to answer
        raise ValueError(f"{cfg.ckpt} is a {stage!r} model; DPO needs 07's: "
                         f"python 07_finetune.py --ckpt={cfg.ckpt} finetunes it")
    reference = make_reference(model)  # the model before DPO, frozen
    if cfg.init_from == "scratch":
        return model, reference, ckpt, None
    run_path = Path(cfg.out_dir) / "ckpt.pt"
    policy, _, resumed = run or load_checkpoint(run_path)
    if resumed.get("stage") != "dpo" or not resumed.get("optimizer"):  # 08's, with Adam's
        raise ValueError(f"{run_path} holds a {resumed.get('stage')!r} model, no DPO run to "
                         "resume; resume 08's out_dir, or use another --out_dir")
    began = ckpt["iter_num"], ckpt["val_loss"]  # 07 run again changes them; an older 08 saved none
    if resumed.get("reference", began) != began:  # DPO's reference: the model the run began from
        raise ValueError(f"{cfg.ckpt} changed since the run began; --init_from=scratch --overwrite")
    return policy, reference, ckpt, resumed


class DPORun:
    """run.save writes ckpt.pt, stage "dpo", with Adam's state and the step: a resume needs no
    more (batches: f(seed, step); no dropout)."""

    def __init__(self, cfg, policy, optimizer, scaler, start: dict, resumed):
        self.path = Path(cfg.out_dir) / "ckpt.pt"
        self.parts = dict(model=policy, optimizer=optimizer, scaler=scaler)
        kept = {"unknown_char": start["config"].get("unknown_char"),  # 07's; 09 encodes with it
                "ckpt": cfg.ckpt.removeprefix(f"{PROJECT}{os.sep}")}  # the project folder may move
        self.header = {"model_args": asdict(policy.config), "tokenizer": start["tokenizer"],
                       "config": asdict(cfg) | kept, "stage": "dpo",
                       "reference": (start["iter_num"], start["val_loss"])}  # same in every save
        self.best_val = resumed["best_val_loss"] if resumed else math.inf

    def save(self, step: int, val_loss: float):
        weights = self.parts["model"].parameters()
        if not all(p.isfinite().all() for p in weights):  # diverged: keep the last good one
            raise FloatingPointError(f"NaN weights at step {step}; {self.path} kept")
        self.best_val = min(self.best_val, val_loss)
        states = {name: part.state_dict() for name, part in self.parts.items()}
        progress = dict(iter_num=step, val_loss=val_loss, best_val_loss=self.best_val)
        save_checkpoint(self.path, states | self.header | progress)


def dpo(cfg: DPOConfig, loaded=None) -> dict:
    """Train the policy against its frozen reference from step 0, or where a resumed run stopped
    (loaded: out_dir's checkpoint, if main read it). Returns {iter_num, train_losses, before (None
    on resume), after, policy, reference, interrupted}."""
    policy, reference, start, resumed = load_models(cfg, loaded)
    block_size = policy.config.block_size
    data = prepare_pairs(cfg, start, block_size)
    train = data["train"]
    device_type = cfg.device.split(":")[0]
    ctx = autocast_context(device_type, cfg.dtype)
    if device_type == "cuda":  # TF32: fp32 matmuls on tensor cores, 10-bit mantissa (as 05)
        torch.backends.cuda.matmul.allow_tf32 = True  # cuDNN's (convolutions): on by default
    policy.to(cfg.device).eval()  # eval too: dropout's noise in log pi fakes a margin
    reference.to(cfg.device)  # in place, as for every nn.Module
    max_iters = cfg.max_iters or len(train) // cfg.batch_size  # 0: one epoch, as the book
    print(f"{max_iters} steps of {cfg.batch_size} pairs")
    # AdamW on every weight as the book (at lr 5e-6 decaying the LayerNorm gains is harmless)
    fused = device_type in ("cuda", "cpu")
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay, fused=fused)
    fp16 = cfg.dtype == "float16"  # bf16 and fp32 need no loss scaling: a pass-through
    scaler = torch.amp.GradScaler(device_type, enabled=fp16)
    resume_command = f"python 08_dpo.py --init_from=resume --out_dir={cfg.out_dir}"  # any folder
    step = 0  # optimizer steps done
    if resumed:  # the policy came with it; Adam's moments and the step come too
        today = optimizer.state_dict()["param_groups"]  # its decay: the flag given now wins
        optimizer.load_state_dict(resumed["optimizer"] | {"param_groups": today})
        scaler.load_state_dict(resumed["scaler"] or scaler.state_dict())  # {}: saved without fp16
        step = resumed["iter_num"]
        print(f"resuming at step {step} of {max_iters}")
        if step >= max_iters:  # a run at its end, resumed without a larger --max_iters
            print(f"nothing left to do (to train longer: {resume_command} --max_iters={2 * step})")

    def score(pairs):  # (losses, chosen rewards, rejected rewards) of a list of pairs, (B,) each
        batch = collate_pairs(pairs, data["end_id"], block_size, cfg.device)  # pad: end token
        return dpo_batch(policy, reference, batch, cfg.beta, cfg.label_smoothing,
                         cfg.average_log_probs, ctx)

    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)  # log.jsonl comes before a save
    before = None
    after = None
    val_loss = resumed["val_loss"] if resumed else None
    train_losses = []
    run = DPORun(cfg, policy, optimizer, scaler, start, resumed)
    with CtrlC() as ctrl_c:
        if not resumed:
            print("before DPO (policy = reference: rewards 0, loss ln 2 = 0.6931):")
            before = evaluate_and_log(score, data, cfg, 0)
            val_loss = before["val"]["loss"]
        tokens = 0  # since the last log line
        t0 = time.perf_counter()
        while step < max_iters and not ctrl_c.pressed:
            lr = cfg.learning_rate * min(1.0, (step + 1) / (cfg.warmup_iters + 1))
            for group in optimizer.param_groups:  # linear warmup, then constant (the DPO paper)
                group["lr"] = lr
            indices = batch_indices(step, len(train), cfg.batch_size, cfg.seed)  # f(seed, step)
            pairs = [train[i] for i in indices]
            losses, chosen_rewards, rejected_rewards = score(pairs)
            loss = losses.mean()
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # true gradients, before clipping
            norm = nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip or math.inf)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()  # grads to None (the default): memory freed
            step += 1
            train_losses.append(loss.detach())  # .item() waits for the GPU: log/eval steps only
            tokens += sum(2 * len(p) + len(c) + len(r) for p, c, r in pairs)
            last = step == max_iters
            if step % cfg.log_interval == 0 or last:
                m = pair_metrics(losses, chosen_rewards, rejected_rewards)
                tokens_per_s = tokens / (time.perf_counter() - t0)
                print(f"step {step}/{max_iters}: loss {m['loss']:.4f}, "
                      f"margin {m['margin']:+.3f}, accuracy {m['accuracy']:.0%}, "
                      f"grad norm {norm:.2f}, {tokens_per_s:,.0f} tokens/s")
                tokens = 0
                t0 = time.perf_counter()
            if step % cfg.eval_interval == 0 or last:
                after = evaluate_and_log(score, data, cfg, step)
                val_loss = after["val"]["loss"]  # the DPO loss (ln 2 at the start), not the LM's
                run.save(step, val_loss)
                tokens = 0
                t0 = time.perf_counter()  # tokens/s: the evaluation's time is not training time
        if ctrl_c.pressed:
            run.save(step, val_loss)
    test = Path(cfg.ckpt).parent / "test.json"  # 07's test split: 09 answers it, 11 judges
    if ctrl_c.pressed:
        print(f"saved {run.path} (step {step}); continue: {resume_command}")
    elif test.exists():  # not beside a 07 run stopped early
        print(f"answers for 11's judge: python 09_generate.py --ckpt={run.path} --answers={test} "
              "--temperature=0 --max_new_tokens=256")  # --chat instead: talk to it
    train_losses = torch.stack(train_losses).tolist() if train_losses else []
    return {"iter_num": step, "train_losses": train_losses,
            "before": before, "after": after,
            "policy": policy, "reference": reference,
            "interrupted": ctrl_c.pressed}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(DPOConfig, argv)  # a bad setting: one `error:` line, exit 2
    try:  # a missing or bad file, pairs that do not fit: the user's to fix, not our bug
        run = None
        if cfg.init_from == "resume":  # the run's settings, then the flags given now (theirs win)
            run = load_checkpoint(Path(cfg.out_dir) / "ckpt.pt")
            saved = run[2]["config"] if run[2].get("stage") == "dpo" else {}  # else: refused
            names = {f.name for f in fields(DPOConfig)}  # an older 08's others: dropped
            names -= {"device", "dtype", "out_dir", "overwrite"}  # this machine's; read here; new
            flags = [f"--{k}={saved[k]}" for k in saved.keys() & names]
            cfg = parse_config(DPOConfig, flags + argv)
        print("config:", ", ".join(f"{k}={v!r}" for k, v in asdict(cfg).items()))
        torch.set_num_threads(cfg.threads or torch.get_num_threads())
        result = dpo(cfg, run)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:  # a NaN: a lower lr
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)  # as parse_config
    except KeyboardInterrupt:  # before the loop's CtrlC is set up: loading, the first evaluation
        print("\nCtrl-C: stopped", file=sys.stderr)
        sys.exit(130)
    if result["interrupted"]:
        sys.exit(130)  # what a shell reports after Ctrl-C
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


# copied from 05_pretrain.py: save_checkpoint
def save_checkpoint(path: Path, ckpt: dict):
    """torch.save to path + ".tmp", flushed to disk, then renamed over path (atomic)."""
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


# copied from 05_pretrain.py: CtrlC
class CtrlC:
    """`with CtrlC() as ctrl_c:` lets a training loop stop cleanly. The first Ctrl-C sets
    ctrl_c.pressed: the loop finishes its step, saves and says how to continue. A second one quits
    at once (exit status 130). Python installs signal handlers from the main thread only. `say`
    prints the notice (06 passes print0: torchrun sends the SIGINT to every rank) and `when` says
    when the save comes (06 saves at its next log step, where the ranks agree on it)."""

    def __init__(self, when: str = "after this step", say=print):
        self.notice = f"\nCtrl-C: saving {when} (again: quit without saving)"
        self.say = say
        self.pressed = False

    def __enter__(self):
        self.old_handler = signal.signal(signal.SIGINT, self.on_sigint)
        return self

    def __exit__(self, *exc_info):
        signal.signal(signal.SIGINT, self.old_handler)  # the one before, as if never pressed

    def on_sigint(self, signum, frame):
        if self.pressed:  # quit now: SystemExit, no traceback; the `with`s still close their files
            sys.exit(130)
        self.pressed = True
        self.say(self.notice)


# copied from 07_finetune.py: split_data
def split_data(data: list, train_fraction=0.85, test_fraction=0.10) -> dict[str, list]:
    """In file order: the first 85% train, the next 10% test, the last 5% val."""
    n_train = int(len(data) * train_fraction)
    n_test = int(len(data) * test_fraction)
    if n_train == 0 or n_test == 0 or n_train + n_test == len(data):  # no val left
        raise ValueError(f"{len(data)} entries are too few to split 85/10/5 "
                         "(every split needs one); use 10+")
    test_end = n_train + n_test
    return {
        "train": data[:n_train],
        "test": data[n_train:test_end],
        "val": data[test_end:],
    }


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


# copied from 07_finetune.py: text_encoder
def text_encoder(tokenizer, unknown_char: str = "?"):
    """(encode, unknown): text -> ids; the characters a char tokenizer lacks become unknown_char
    (counted in the Counter unknown), or a ValueError names them when unknown_char is ""."""
    unknown = Counter()
    if not isinstance(tokenizer, CharTokenizer):  # GPT-2's BPE: every text has an encoding
        return (lambda text: tokenizer.encode(text, disallowed_special=())), unknown
    vocabulary = set(tokenizer.chars)
    if unknown_char and unknown_char not in vocabulary:
        raise ValueError(f"unknown_char={unknown_char!r} is not a character of the model; "
                         "pick one that is (07's --unknown_char)")

    def encode(text: str) -> list[int]:
        missing = [ch for ch in text if ch not in vocabulary]
        if missing and not unknown_char:
            names = "".join(sorted(set(missing)))
            raise ValueError(f"characters {names!r} are not in the model's vocabulary; "
                             "07's --unknown_char='?' replaces them, or use a GPT-2 model")
        unknown.update(missing)
        replaced = [ch if ch in vocabulary else unknown_char for ch in text]
        return tokenizer.encode("".join(replaced))

    return encode, unknown


# copied from 07_finetune.py: end_token_id
def end_token_id(tokenizer) -> int:
    """The token that ends each answer and pads batches: <|endoftext|> or a char model's newline."""
    if tokenizer.eot_token is not None:
        return tokenizer.eot_token
    return tokenizer.encode("\n")[0]


# copied from 07_finetune.py: batch_indices
def batch_indices(step: int, n: int, batch_size: int, seed: int = 0) -> list[int]:
    """The example indices of batch `step`: a fresh shuffle per epoch, the last partial batch
    dropped. Stateless, like 02's get_batch: batch = f(seed, step)."""
    if not 0 < batch_size <= n:
        raise ValueError(f"batch_size={batch_size} must be 1 to {n}, the examples")
    epoch, batch_in_epoch = divmod(step, n // batch_size)  # n // batch_size batches per epoch
    order = np.random.default_rng([seed, epoch]).permutation(n)
    start = batch_in_epoch * batch_size
    return order[start : start + batch_size].tolist()


if __name__ == "__main__":
    main()
