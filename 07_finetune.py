"""Stage 7: instruction finetuning, full and LoRA.

A pretrained GPT continues text; it does not answer. Finetuning it on a thousand examples of
(instruction, optional input, response), each in one fixed prompt template, teaches it to answer:
after "### Response:" comes the answer, then <|endoftext|> (supervised finetuning, SFT). The model
and the loss are 04's; new are the data (rasbt's 1,100 Alpaca-style entries, split as in
Raschka's book, ch. 7) and which tokens the loss counts: collate_fn pads on the right and masks
the prompt and the padding out of the loss, and causal attention makes an attention mask
unnecessary. LoRA learns a small low-rank update beside each targeted Linear instead of changing
them all, and is merged in at the end, so the checkpoint is a plain GPT in 05's format (stage
"finetune", which 08 and 09 load). The validation loss is measured before and after; the test
split lands in out_dir/test.json, for 09_generate.py to answer and 11_evaluate.py to judge.
05's char model (64 positions, no '#', few digits) runs too, stretched to more positions, with "?"
for the characters it lacks: it learns the template's look, not the task.

References: Raschka, "Build a Large Language Model (From Scratch)", ch. 7 and appendix E; Hu et
al. 2021 (LoRA); Taori et al. 2023 (Stanford Alpaca); Ouyang et al. 2022 (InstructGPT: SFT).

Run it:
  python 07_finetune.py                 # 05's char model (run python 05_pretrain.py first)
  python 04_gpt.py --init_from=gpt2 --save_ckpt  # once per model: OpenAI's weights, into data/
  python 07_finetune.py --init_from=gpt2 --max_iters=100     # GPT-2 on a CPU: slow
  python 07_finetune.py --init_from=gpt2-medium --device=cuda      # the book's model, one GPU
  python 07_finetune.py --init_from=gpt2-medium --lora_rank=16 --learning_rate=5e-4 --device=cuda
  python 07_finetune.py --init_from=resume  # after Ctrl-C: go on where out_dir's run stopped
  python 07_finetune.py --help          # every setting, with its default
Then: python 09_generate.py --ckpt=out/finetune/ckpt.pt --chat (or --temperature=0
--answers=out/finetune/test.json: the test split's answers, for 11 to judge), or DPO with 08_dpo.py.
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
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

PROJECT = Path(__file__).resolve().parent  # relative paths (data/, out/, flags) resolve here
DATA_DIR = PROJECT / "data"
OPENAI_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")

# -----------------------------------------------------------------------------
# 1. The data, and the prompt template (Alpaca's)

def load_instruction_data(path="") -> list[dict]:
    """A JSON list of {"instruction", "input", "output"}; "" = rasbt's 1,100 (02 fetches them)."""
    path = Path(path or DATA_DIR / "instruction-data.json")
    if not path.is_file():  # missing, or a folder
        raise FileNotFoundError(f"{path} is not a file: `python 02_dataloader.py` fetches "
                                "rasbt's entries, or pass --data_path=<a JSON list>")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
        json.dumps(data, ensure_ascii=False).encode("utf-8")  # a lone "\ud800" is not text
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, or nested past Python's limit
        raise ValueError(f"{path} is not a JSON file ({e}); --data_path takes a JSON list of "
                         '{"instruction", "input", "output"} objects') from None
    entries = data if isinstance(data, list) and data else [None]  # no list or empty: entry 0 fails
    for i, entry in enumerate(entries):
        record = {"input": "", **entry} if isinstance(entry, dict) else {}  # 'input' may be absent
        if not all(isinstance(record.get(key), str) for key in ("instruction", "input", "output")):
            raise ValueError(f"{path}: entry {i} needs a string 'instruction' and "
                             f"'output' (and maybe 'input'): {str(entry)[:80]}")
    return data


# No shuffling (the file is shuffled already): every run holds out the same 935/110/55 of 1,100.
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


# Training: format_input(entry) + RESPONSE_HEADER + output + end token; inference (09): the model
# writes on after RESPONSE_HEADER.
RESPONSE_HEADER = "\n\n### Response:\n"  # between the prompt and the answer


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


# GPT-2's BPE encodes any text; a char model knows only its own characters (05's: no '#', '(', ...).
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


# A char model has no <|endoftext|>, so a newline ends its answers (47 of the 1,100 have more lines:
# the model learns them, 09 stops at their first).
def end_token_id(tokenizer) -> int:
    """The token that ends each answer and pads batches: <|endoftext|> or a char model's newline."""
    if tokenizer.eot_token is not None:
        return tokenizer.eot_token
    return tokenizer.encode("\n")[0]


# -----------------------------------------------------------------------------
# 2. Examples and batches: append the end token, pad on the right, shift, mask

def tokenize_examples(entries: list[dict], encode, max_length: int) -> list[tuple]:
    """(prompt + response ids, prompt length) per entry. The response starts with RESPONSE_HEADER,
    whose few tokens are targets too (as in the book). collate_fn cuts examples at max_length (the
    context); one whose prompt alone is longer has no target left and is dropped."""
    examples = []
    for entry in entries:
        prompt = encode(format_input(entry))
        response = encode(RESPONSE_HEADER + entry["output"])
        if len(prompt) <= max_length:
            examples.append((prompt + response, len(prompt)))
    return examples


# Each sequence gets the end token and is right-padded with it to the longest in the batch; targets
# are the inputs shifted left by one. Then -100, which cross-entropy skips, replaces the targets the
# model should not learn: the padding after the appended end token (that one stays: the model must
# learn to stop) and, with mask_prompt, every target in the prompt. With pad = 0, prompt length 2:
#     ids [5, 6, 7, 8] + end  ->  inputs [5, 6, 7, 8]   targets [-100, 7, 8, 0]
#     ids [5, 6]       + end  ->  inputs [5, 6, 0, 0]   targets [-100, 0, -100, -100]
# No attention mask is needed: the padding comes after every real token of its row, and causal
# attention lets a token see only the tokens before it, so no real token ever sees padding. The
# padding positions do see the real tokens, but their targets are -100: nothing they compute reaches
# the loss. (Left padding would need a mask, as in 03, and shifted positions.)
def collate_fn(batch, pad_token_id, allowed_max_length=None, mask_prompt=True, device="cpu"):
    """A list of (ids, prompt_length) -> inputs and targets (B, T), cut at allowed_max_length."""
    T = max(len(ids) for ids, _ in batch)
    rows = [ids + [pad_token_id] * (T + 1 - len(ids)) for ids, _ in batch]  # ids, end, padding
    seq = torch.tensor(rows)  # (B, T+1)
    x = seq[:, :-1]
    y = seq[:, 1:].clone()  # y[:, i] = seq[:, i + 1]: the next token
    for row, (ids, prompt_length) in enumerate(batch):
        y[row, len(ids) :] = -100  # y[row, len(ids) - 1] is the end token: kept; the rest: padding
        if mask_prompt:  # y[row, i] for i < prompt_length - 1: a prompt token
            y[row, : max(prompt_length - 1, 0)] = -100
    return x[:, :allowed_max_length].to(device), y[:, :allowed_max_length].to(device)  # (B, T)


def batch_indices(step: int, n: int, batch_size: int, seed: int = 0) -> list[int]:
    """The example indices of batch `step`: a fresh shuffle per epoch, the last partial batch
    dropped. Stateless, like 02's get_batch: batch = f(seed, step)."""
    if not 0 < batch_size <= n:
        raise ValueError(f"batch_size={batch_size} must be 1 to {n}, the examples")
    epoch, batch_in_epoch = divmod(step, n // batch_size)  # n // batch_size batches per epoch
    order = np.random.default_rng([seed, epoch]).permutation(n)
    start = batch_in_epoch * batch_size
    return order[start : start + batch_size].tolist()


# -----------------------------------------------------------------------------
# 3. LoRA (Hu et al. 2021): a trainable low-rank update beside each frozen Linear
# Finetuning changes a weight W (out, in) by some dW, and that change has a low "intrinsic rank", so
# learn it as B A with B (out, r) and A (r, in), r small: r * (in + out) parameters instead of
# in * out (GPT-2's c_attn at r=8: 24,576 instead of 1,769,472). B starts at zero, so the model
# starts exactly as the base; alpha / rank scales the update (the book: alpha alone), so another
# rank needs less retuning. merge_lora folds B A into W: a plain GPT again, no cost at inference.
LORA_TARGETS = ("c_attn", "c_proj", "c_fc")  # GPT's Linears (lm_head is tied to wte: not a target)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a low-rank update: y = base(x) + (alpha / rank) * x A^T B^T."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(base.weight.new_empty(rank, base.in_features))  # (r, in)
        self.lora_B = nn.Parameter(base.weight.new_zeros(base.out_features, rank))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear's own weights

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling  # (B, T, out)


def apply_lora(model: nn.Module, rank: int, alpha: float, targets=LORA_TARGETS) -> nn.Module:
    """Freeze every parameter, then wrap each Linear named in targets ("c_proj": attn's, mlp's)."""
    model.requires_grad_(False)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, rank, alpha))
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """W <- W + (alpha / rank) B A for every adapter, then unwrapped: a plain, trainable GPT."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                child.base.weight += child.scaling * (child.lora_B @ child.lora_A)  # (out, in)
                setattr(module, name, child.base)
    return model.requires_grad_(True)


# -----------------------------------------------------------------------------
# 4. Evaluation: the loss on the answers

@torch.no_grad()
def evaluate_loss(model, examples, batch_size, pad_token_id, ctx=nullcontext()) -> dict:
    """Mean cross-entropy over the answer tokens (prompt and padding masked) and its perplexity:
    each batch's mean times its count of targets, summed on the device and read once at the end."""
    device = next(model.parameters()).device
    model.eval()
    total = 0
    count = 0
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        x, y = collate_fn(batch, pad_token_id, model.config.block_size, device=device)
        with ctx:
            _, loss = model(x, y)
        n_targets = (y != -100).sum()
        total = total + loss * n_targets
        count = count + n_targets
    model.train()  # as nanoGPT's estimate_loss: its callers train
    loss = (total / count).item()
    return {"loss": loss, "perplexity": math.exp(loss)}


# -----------------------------------------------------------------------------
# 5. Settings, the model to start from, and the finetuning loop

@dataclass
class FinetuneConfig:
    """Instruction finetuning, full or LoRA (--lora_rank > 0): the book's settings, plus clipping.
    Prompt masking (its exercise 7.2) is on. Relative paths start at this script's folder."""

    init_from: Annotated[str, "scratch (a new run from --ckpt's weights), resume, auto "
                              "(resume if any), or gpt2, gpt2-medium/large/xl"] = "scratch"
    ckpt: Annotated[str, "a checkpoint of 04-06"] = "out/shakespeare-char/ckpt.pt"
    out_dir: Annotated[str, "ckpt.pt and test.json go here"] = "out/finetune"
    overwrite: Annotated[bool, "replace an earlier run in out_dir"] = False
    data_path: Annotated[str, "JSON list of entries; '' = rasbt's (02 fetches it)"] = ""
    min_block_size: Annotated[int, "stretch a shorter context to this many positions"] = 512
    mask_prompt: Annotated[bool, "loss on the answer only (false: the prompt too)"] = True
    unknown_char: Annotated[str, "char models: for chars they lack ('': error)"] = "?"
    lora_rank: Annotated[int, "0 = full finetuning; r > 0: LoRA of rank r"] = 0
    lora_alpha: Annotated[float, "adapters scaled by lora_alpha / lora_rank"] = 16.0
    lora_targets: Annotated[str, "comma-separated Linears to adapt"] = "c_attn,c_proj,c_fc"
    batch_size: Annotated[int, "examples per step"] = 8
    epochs: Annotated[float, "passes over the training split (max_iters = 0)"] = 2.0
    max_iters: Annotated[int, "steps; 0 = epochs * (examples // batch_size)"] = 0
    learning_rate: Annotated[float, "AdamW's; LoRA likes ~10x more: 5e-4"] = 5e-5
    weight_decay: Annotated[float, "AdamW's, on 2-D weights only"] = 0.1
    grad_clip: Annotated[float, "clip the gradient norm to this; 0 = no clip"] = 1.0
    log_interval: Annotated[int, "a log line every this many steps"] = 10
    eval_interval: Annotated[int, "val loss and ckpt.pt every this many steps"] = 50
    device: Annotated[str, "auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps"] = "auto"
    dtype: Annotated[str, "auto (CUDA: bf16/fp16, else fp32), float32, bfloat16, float16"] = "auto"
    threads: Annotated[int, "CPU threads; 0 = PyTorch's choice"] = 0
    seed: Annotated[int, "seeds the batches and the adapters"] = 1337

    def __post_init__(self):  # every check names its fix; parse_config prints one `error:` line
        choices = ("scratch", "resume", "auto", *OPENAI_MODELS)
        if self.init_from not in choices:
            raise ValueError(f"--init_from={self.init_from!r}: use {', '.join(choices)}")
        least = {"batch_size": 1, "log_interval": 1, "eval_interval": 1}
        for f in fields(self):  # others: at least 0 (grad_clip -1 would ascend)
            value = getattr(self, f.name)
            minimum = least.get(f.name, 0)
            # Annotated[int, ...].__origin__ is int; nan fails every comparison
            if f.type.__origin__ in (int, float) and not minimum <= value < math.inf:
                raise ValueError(f"--{f.name}={value} must be finite and >= {minimum}")
        if not set(self.lora_targets.split(",")) <= set(LORA_TARGETS):
            raise ValueError(f"--lora_targets={self.lora_targets!r}: use a comma-joined "
                             f"subset of {','.join(LORA_TARGETS)}")
        if self.lora_rank and not self.lora_alpha:  # scaling = alpha / rank = 0: nothing learns
            raise ValueError("--lora_alpha=0 turns LoRA off: use > 0")
        if self.max_iters == 0 and self.epochs <= 0:
            raise ValueError(f"--max_iters={self.max_iters}, --epochs={self.epochs}: "
                             "no steps")
        self.device = pick_device(self.device)  # "auto" resolved here, once
        self.dtype = pick_dtype(self.dtype, self.device)
        self.ckpt = str(PROJECT / self.ckpt)  # an absolute path stays as it is
        self.out_dir = str(PROJECT / self.out_dir)
        if Path(self.out_dir).resolve() == PROJECT:  # '' or '.': the run among the scripts
            raise ValueError(f"--out_dir={self.out_dir!r} is the project folder: "
                             "name another")
        if self.overwrite and self.init_from in ("resume", "auto"):  # auto: maybe a resume
            raise ValueError("--overwrite starts afresh: use it with "
                             "--init_from=scratch or an OpenAI model's name")
        run_path = Path(self.out_dir) / "ckpt.pt"
        if self.init_from == "auto":
            self.init_from = "resume" if run_path.exists() else "scratch"
        if self.init_from in OPENAI_MODELS:  # OpenAI's weights enter at 04, a checkpoint in data/
            self.ckpt = str(DATA_DIR / self.init_from / "ckpt.pt")
        if self.init_from == "resume" and not run_path.exists():
            raise FileNotFoundError(f"no run to resume: {run_path} does not exist; "
                                    "start one with --init_from=scratch")
        new_run = self.init_from != "resume"  # from --ckpt's model
        if new_run and not Path(self.ckpt).is_file():
            fix = "run 05_pretrain.py, pass another --ckpt, or use --init_from=gpt2"
            if self.init_from in OPENAI_MODELS:
                fix = f"python 04_gpt.py --init_from={self.init_from} --save_ckpt fetches it"
            inside = Path(self.ckpt) / "ckpt.pt"  # a run's folder: the file in it
            if inside.is_file():
                fix = f"use --ckpt={inside}"
            raise FileNotFoundError(f"no checkpoint at {self.ckpt}: {fix}")
        if any(folder.is_file() for folder in run_path.parents):  # now, not at the first save
            raise ValueError(f"--out_dir={self.out_dir} is a file, or in one: name a folder")
        if new_run and Path(self.ckpt).resolve() == run_path.resolve():  # --overwrite or not
            raise ValueError(f"--ckpt={self.ckpt} is this run's ckpt.pt; "
                             "use another --out_dir")
        stage = "finetune"  # no ckpt.pt (test.json alone: what a 07 run leaves at its end)
        if new_run and run_path.exists():  # not a checkpoint: load_checkpoint's own error
            stage = load_checkpoint(run_path)[2].get("stage")
        if stage != "finetune":  # 05's or 08's: not ours to resume or replace, --overwrite or not
            raise ValueError(f"{run_path} holds a {stage!r} run, not 07's: "
                             "choose another --out_dir")
        test_split = run_path.with_name("test.json")  # written at the end of a run
        earlier = run_path.exists() or test_split.exists()
        if new_run and earlier and not self.overwrite:
            way_on = "resume it (--init_from=resume), " if run_path.exists() else ""
            fresh = "--overwrite"  # beside an OpenAI model's name; scratch's (auto's too):
            if self.init_from == "scratch":
                fresh = "--init_from=scratch --overwrite"
            raise ValueError(f"{self.out_dir} holds an earlier run (ckpt.pt, test.json); "
                             f"{way_on}choose another --out_dir, or pass {fresh}")
        if self.data_path:  # a bad file of yours fails now, before a model is loaded
            self.data_path = str(PROJECT / self.data_path)
            split_data(load_instruction_data(self.data_path))


# A GPT has one learned vector per position it trained on, and 05's CPU model knows 64, fewer than
# the template alone. So we resample its position table by linear interpolation (as ViT does for
# larger images): new position p gets the old p * (old - 1) / (new - 1); finetuning sharpens them.
@torch.no_grad()
def extend_context(model, block_size: int):
    """The same GPT with block_size positions: its learned position table, stretched."""
    table = model.transformer.wpe.weight.T[None]  # (1, C, T_old): interpolate wants (N, C, L)
    table = F.interpolate(table, size=block_size, mode="linear", align_corners=True)
    longer = GPT(replace(model.config, block_size=block_size))
    longer.load_state_dict({**model.state_dict(), "transformer.wpe.weight": table[0].T})
    return longer


def load_model(cfg: FinetuneConfig, run=None):
    """(model on the CPU, with its adapters if LoRA; tokenizer spec; the checkpoint resumed or
    None): cfg.ckpt's model with >= cfg.min_block_size positions, or on resume the model of the
    run in out_dir (run: its load_checkpoint, if the caller has it)."""
    resuming = cfg.init_from == "resume"
    path = Path(cfg.out_dir) / "ckpt.pt" if resuming else Path(cfg.ckpt)
    model, _, ckpt = run or load_checkpoint(path)
    print(f"loaded {path} (stage {ckpt.get('stage')!r}, {ckpt.get('iter_num')} iterations)")
    resumable = ckpt.get("stage") == "finetune" and ckpt.get("optimizer") is not None
    if resuming and not resumable:
        raise ValueError(f"{path} holds a {ckpt.get('stage')!r} model, no 07 run to resume; "
                         "resume a 07 out_dir, or start in another --out_dir")
    if resuming:  # other adapters or positions fit neither the saved weights nor Adam's moments
        shape = ("lora_rank", "lora_alpha", "lora_targets", "min_block_size")
        saved = {k: ckpt["config"][k] for k in shape}
        if saved != {k: getattr(cfg, k) for k in shape}:
            flags = " ".join(f"--{k}={v}" for k, v in saved.items())
            raise ValueError(f"{path} was trained with {flags}: resume with those")
    block_size = model.config.block_size
    if block_size < cfg.min_block_size:  # a resumed model has its positions already
        print(f"stretching the positions from {block_size} to {cfg.min_block_size}")
        model = extend_context(model, cfg.min_block_size)
    if cfg.lora_rank > 0:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets.split(","))
    if resuming and cfg.lora_rank > 0:  # the base weights and the adapters, as before the merge
        model.load_state_dict(ckpt["unmerged"])
    return model, ckpt["tokenizer"], ckpt if resuming else None


def prepare_data(cfg: FinetuneConfig, model, tokenizer_spec: dict) -> dict:
    """The splits tokenized for model: train, val examples; test entries; end_id (which pads)."""
    tokenizer = get_tokenizer(tokenizer_spec)
    block_size = model.config.block_size
    encode, unknown = text_encoder(tokenizer, cfg.unknown_char)
    splits = split_data(load_instruction_data(cfg.data_path))
    train = tokenize_examples(splits["train"], encode, block_size)
    val = tokenize_examples(splits["val"], encode, block_size)
    n_cut = sum(len(ids) > block_size for ids, _ in train)
    n_dropped = len(splits["train"]) - len(train)
    sizes = ", ".join(f"{name} {len(split)}" for name, split in splits.items())
    print(f"data: {sizes} entries; {n_cut} training examples cut at the context "
          f"({block_size} tokens), {n_dropped} dropped (the prompt alone is longer)")
    if unknown:
        most_common = "".join(ch for ch, _ in unknown.most_common(20))
        print(f"{sum(unknown.values())} characters the char model lacks became "
              f"{cfg.unknown_char!r} (most common: {most_common!r})")
    if len(train) < cfg.batch_size or not val:
        raise ValueError(f"{len(train)} training and {len(val)} validation examples fit the "
                         f"context ({block_size} tokens), too few for --batch_size="
                         f"{cfg.batch_size}: lower it, raise --min_block_size, or start from "
                         "GPT-2 (--init_from=gpt2)")
    return {
        "train": train,
        "val": val,
        "test": splits["test"],
        "end_id": end_token_id(tokenizer),
    }


class FinetuneRun:
    """run.save writes ckpt.pt in 05's format, stage "finetune": a plain GPT for 08 and 09 (with
    LoRA, a merged copy), and what a resume needs besides: Adam's state, the step, the RNG
    (dropout) and, with LoRA, the model before the merge ("unmerged"). The batches need no state:
    batch_indices makes them a function of (seed, step)."""

    def __init__(self, cfg, model, optimizer, scaler, tokenizer_spec: dict, resumed=None):
        self.path = Path(cfg.out_dir) / "ckpt.pt"
        self.model = model
        self.parts = {"optimizer": optimizer, "scaler": scaler}  # saved as their state dicts
        self.has_lora = cfg.lora_rank > 0
        if self.has_lora:  # W and B A apart: W + B A cannot be split back into them exactly
            self.parts["unmerged"] = model
        self.header = dict(tokenizer=tokenizer_spec, config=asdict(cfg), stage="finetune")
        self.best_val_loss = resumed["best_val_loss"] if resumed else math.inf

    def save(self, step: int, val_loss: float):
        if not all(p.isfinite().all() for p in self.model.parameters()):  # Ctrl-C, diverged
            raise FloatingPointError(f"NaN weights at step {step}; {self.path} kept")
        self.best_val_loss = min(self.best_val_loss, val_loss)
        plain = merge_lora(copy.deepcopy(self.model)) if self.has_lora else self.model
        states = {name: part.state_dict() for name, part in self.parts.items()}
        progress = dict(iter_num=step, val_loss=val_loss, best_val_loss=self.best_val_loss)
        model = {"model": plain.state_dict(), "model_args": asdict(plain.config)}
        ckpt = {**model, **self.header, **states, **progress}
        save_checkpoint(self.path, {**ckpt, "rng": rng_states()})


def finetune(cfg: FinetuneConfig, model, tokenizer_spec: dict, data: dict,
             resumed=None) -> dict:
    """Finetune model (load_model's) from step 0, or where the run resumed (its checkpoint)
    stopped; the validation loss before and after; save checkpoints and the test split."""
    train = data["train"]
    val = data["val"]
    end_id = data["end_id"]
    device_type = cfg.device.split(":")[0]
    ctx = autocast_context(device_type, cfg.dtype)
    if device_type == "cuda":  # TF32: fp32 matmuls on tensor cores, 10-bit mantissa (as 05)
        torch.backends.cuda.matmul.allow_tf32 = True  # cuDNN's (convolutions): on by default
    model.to(cfg.device)
    params = [p for p in model.parameters() if p.requires_grad]  # a tied tensor appears once
    optimizer = configure_optimizers(model, cfg.weight_decay, cfg.learning_rate,
                                     (0.9, 0.999), device_type)  # AdamW's default betas
    fp16 = cfg.dtype == "float16"  # bf16 and fp32 need no loss scaling: a pass-through
    scaler = torch.amp.GradScaler(device_type, enabled=fp16)
    step = 0  # optimizer steps done
    if resumed:  # the model came with it; Adam's moments, the step and the RNG come too
        today = optimizer.state_dict()["param_groups"]  # lr and decay: the flags given now win
        resumed["optimizer"]["param_groups"] = today
        optimizer.load_state_dict(resumed["optimizer"])
        scaler.load_state_dict(resumed["scaler"] or scaler.state_dict())  # {}: a run without fp16
        set_rng_states(resumed["rng"])
        step = resumed["iter_num"]
    trainable = sum(p.numel() for p in params)
    total = model.num_params()
    block_size = model.config.block_size
    batches = len(train) // cfg.batch_size  # an epoch's
    max_iters = cfg.max_iters or max(1, int(cfg.epochs * batches))
    print(f"parameters: {trainable:,} trainable of {total:,} ({trainable / total:.2%}); "
          f"{cfg.device} {cfg.dtype}, {torch.get_num_threads()} threads, "
          f"{max_iters} steps of {cfg.batch_size} examples")
    losses = []
    run = FinetuneRun(cfg, model, optimizer, scaler, tokenizer_spec, resumed)
    with CtrlC() as ctrl_c:
        before = evaluate_loss(model, val, cfg.batch_size, end_id, ctx)
        print(f"at step {step} of {max_iters}: val loss {before['loss']:.4f}, "
              f"perplexity {before['perplexity']:.2f}")
        after = before
        tokens = 0
        t0 = time.perf_counter()
        model.train()
        while step < max_iters and not ctrl_c.pressed:
            indices = batch_indices(step, len(train), cfg.batch_size, cfg.seed)  # f(seed, step)
            batch = [train[i] for i in indices]
            x, y = collate_fn(batch, end_id, block_size, cfg.mask_prompt, cfg.device)
            with ctx:
                _, loss = model(x, y)
            scaler.scale(loss).backward()  # fp16 only: scaled so that small gradients stay > 0
            scaler.unscale_(optimizer)
            norm = nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            # on the device: .item() makes the CPU wait for the GPU, so only on log and eval steps
            losses.append(loss.detach())
            tokens += x.numel()
            last = step == max_iters
            if step % cfg.log_interval == 0 or last:
                tokens_per_s = tokens / (time.perf_counter() - t0)
                print(f"step {step}/{max_iters}: loss {loss.item():.4f}, "
                      f"grad norm {norm.item():.2f}, {tokens_per_s:,.0f} tokens/s")
                tokens = 0
                t0 = time.perf_counter()
            if step % cfg.eval_interval == 0 or last:
                after = evaluate_loss(model, val, cfg.batch_size, end_id, ctx)
                if not math.isfinite(after["loss"]):  # never save a broken model over a good one
                    raise FloatingPointError(f"val loss {after['loss']} at step {step}; "
                                             "lower --learning_rate")
                print(f"step {step}: val loss {after['loss']:.4f}")
                run.save(step, after["loss"])
                tokens = 0
                t0 = time.perf_counter()  # tokens/s: the evaluation's time is not training time
        if ctrl_c.pressed:
            run.save(step, after["loss"])  # the last evaluation's
    if ctrl_c.pressed:
        print(f"saved {run.path} at step {step} of {max_iters}; continue: "
              f"python 07_finetune.py --init_from=resume --out_dir={cfg.out_dir}")
    else:
        print(f"after finetuning: val loss {after['loss']:.4f}, "
              f"perplexity {after['perplexity']:.2f}")
        test_path = run.path.parent / "test.json"  # held out: for 09 to answer, 11 to judge
        text = json.dumps(data["test"], indent=1, ensure_ascii=False)
        tmp = test_path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, test_path)  # whole or absent: 08 and 09 read it
        print(f"for 11's judge: python 09_generate.py --ckpt={run.path} "
              f"--answers={test_path} --temperature=0 --max_new_tokens=256")  # the book's
    return {
        "iter_num": step,
        "train_losses": torch.stack(losses).tolist() if losses else [],
        "before": before,
        "after": after,
        "best_val_loss": run.best_val_loss,
        "interrupted": ctrl_c.pressed,
    }


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(FinetuneConfig, argv)  # a bad setting: one `error:` line, exit status 2
    try:  # not a checkpoint, a vocabulary without --unknown_char, a context too short for the data
        run = None
        if cfg.init_from == "resume":  # the run's settings, then the flags given now (theirs win)
            run = load_checkpoint(Path(cfg.out_dir) / "ckpt.pt")
            saved = run[2]["config"] if run[2].get("stage") == "finetune" else {}  # else: an error
            names = {f.name for f in fields(FinetuneConfig)}  # an older 07's others: dropped
            names -= {"device", "dtype", "out_dir", "overwrite"}  # this machine's; read here; new
            flags = [f"--{k}={saved[k]}" for k in saved.keys() & names]
            cfg = parse_config(FinetuneConfig, flags + argv)
        print("config:", ", ".join(f"{k}={v!r}" for k, v in asdict(cfg).items()))
        torch.set_num_threads(cfg.threads or torch.get_num_threads())
        torch.manual_seed(cfg.seed)
        model, tokenizer_spec, resumed = load_model(cfg, run)
        data = prepare_data(cfg, model, tokenizer_spec)
        result = finetune(cfg, model, tokenizer_spec, data, resumed)
    except (ValueError, OSError, FloatingPointError) as e:  # the user's to fix (a NaN:
        print(f"error: {e}", file=sys.stderr)  # a lower lr), one line, as parse_config
        sys.exit(2)
    except KeyboardInterrupt:  # before the loop's CtrlC is set up: loading, preparing the data
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


# copied from 05_pretrain.py: configure_optimizers
def configure_optimizers(model, weight_decay, learning_rate, betas, device_type):
    """AdamW with weight decay on the 2-D tensors only; frozen parameters (LoRA) are left out."""
    params = [p for p in model.parameters() if p.requires_grad]  # a tied weight appears once
    matrices = [p for p in params if p.dim() >= 2]
    vectors = [p for p in params if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": weight_decay},
              {"params": vectors, "weight_decay": 0.0}]
    fused = device_type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused, foreach=not fused)


# copied from 05_pretrain.py: rng_states
def rng_states() -> dict:
    """The states of torch's random generators (CPU, each CUDA GPU, MPS), which dropout draws."""
    states = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()}  # no GPU: []
    if torch.backends.mps.is_available():
        states["mps"] = torch.mps.get_rng_state()
    return states


# copied from 05_pretrain.py: set_rng_states
def set_rng_states(states: dict):
    """Restore what rng_states() returned (to as many GPUs as this machine has; each keeps its
    own). A generator this machine lacks, or a state the checkpoint lacks, is left as it is."""
    torch.set_rng_state(states["torch"].cpu())
    gpus = torch.cuda.device_count()  # 0 without CUDA
    torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"][:gpus]])
    if "mps" in states and torch.backends.mps.is_available():
        torch.mps.set_rng_state(states["mps"].cpu())


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


if __name__ == "__main__":
    main()
