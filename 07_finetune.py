"""Stage 7: instruction finetuning, full and LoRA.

A pretrained GPT continues text; it does not answer. Finetuning it on a thousand examples of
(instruction, optional input, response), each in one fixed prompt template, teaches it to answer:
after "### Response:" comes the answer, then <|endoftext|> (supervised finetuning, SFT). The model
and the loss are 05's; new are the data (rasbt's 1,100 Alpaca-style entries, split as in
Raschka's book, ch. 7) and which tokens the loss counts: collate_fn pads on the right and masks
the prompt and the padding out of the loss, and causal attention makes an attention mask
unnecessary. LoRA learns a small low-rank update beside each frozen weight instead of changing
them all, and is merged in at the end, so the checkpoint is a plain GPT in 05's format (stage
"finetune", which 08 and 09 load). The validation loss is measured before and after, and the
model's answers to the test split land in out_dir/test_responses.json beside the references.
05's char model (64 positions, no '#', few digits) runs too, stretched to more positions, with "?"
for the characters it lacks: it learns the template's look, not the task.

References: Raschka, "Build a Large Language Model (From Scratch)", ch. 7 and appendix E; Hu et al.
2021 (LoRA); Taori et al. 2023 (Stanford Alpaca); Ouyang et al. 2022 (InstructGPT: SFT).

Run it:
  python 07_finetune.py                            # 05's char model (run python 05_pretrain.py first)
  python 07_finetune.py --init_from=gpt2 --max_iters=100 --num_responses=10    # GPT-2 on a CPU (slow)
  python 04_gpt.py --init_from=gpt2-medium --save_ckpt  # once: OpenAI's weights, as a checkpoint in data/
  python 07_finetune.py --init_from=gpt2-medium --device=cuda                 # the book's run, one GPU
  python 07_finetune.py --init_from=gpt2-medium --lora_rank=16 --learning_rate=5e-4 --device=cuda
  python 07_finetune.py --help                     # every setting, with its default
Then: python 09_generate.py --ckpt=out/finetune/ckpt.pt --chat, or DPO on top with 08_dpo.py.
"""

import argparse
import copy
import json
import math
import os
import pickle
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Annotated, ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DATA_DIR = Path(__file__).resolve().parent / "data"
OPENAI_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")

# -----------------------------------------------------------------------------
# 1. The data, and the prompt template (Alpaca's)


def load_instruction_data(path="") -> list[dict]:
    """A JSON list of {"instruction", "input", "output"}; "" = rasbt's 1,100 entries, which 02 fetches."""
    if not (path := Path(path or DATA_DIR / "instruction-data.json")).exists():
        raise FileNotFoundError(f"{path} does not exist; `python 02_dataloader.py` fetches rasbt's entries "
                                "(sha256-checked), or pass --data_path=<your JSON list of entries>")
    data = json.loads(path.read_text(encoding="utf-8"))  # not JSON: a ValueError
    for i, entry in enumerate(data if isinstance(data, list) and data else [None]):
        if not (isinstance(entry, dict) and isinstance(entry.get("instruction"), str)
                and isinstance(entry.get("output"), str)):
            raise ValueError(f"{path}: entry {i} is not an object with string 'instruction' and 'output' "
                             f"(and optional 'input'): {str(entry)[:80]}; the file holds a list of them")
    return data


# No shuffling (the file is shuffled already): every run holds out the same entries; 935/110/55 of 1,100.
def split_data(data: list, train_fraction: float = 0.85, test_fraction: float = 0.10) -> dict[str, list]:
    """In file order: the first 85% train, the next 10% test, the last 5% val."""
    n_train, n_test = int(len(data) * train_fraction), int(len(data) * test_fraction)
    if n_train == 0 or n_test == 0 or len(data) - n_train - n_test == 0:
        raise ValueError(f"{len(data)} entries are too few to split 85/10/5 (every split needs one); use 20+")
    return {"train": data[:n_train], "test": data[n_train:n_train + n_test], "val": data[n_train + n_test:]}


# Training: format_input(entry) + RESPONSE_HEADER + output + end token; inference: the model writes on.
RESPONSE_HEADER = "\n\n### Response:\n"  # between the prompt and the answer


def format_input(entry: dict) -> str:
    """Alpaca's prompt for an entry: a fixed preamble, "### Instruction:", and "### Input:" if any."""
    instruction_text = (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{entry['instruction']}"
    )
    input_text = f"\n\n### Input:\n{entry['input']}" if entry.get("input") else ""
    return instruction_text + input_text


# GPT-2's BPE encodes any text; a char model knows only its own characters (05's: no '#', '(', ...).
def text_encoder(tokenizer, unknown_char: str = "?"):
    """(encode, unknown): text -> ids, replacing the characters a char tokenizer lacks with unknown_char
    (counted in the Counter unknown), or naming them in a ValueError when unknown_char is ""."""
    unknown = Counter()
    if not isinstance(tokenizer, CharTokenizer):  # GPT-2's BPE: every text has an encoding
        return (lambda text: tokenizer.encode(text, disallowed_special=())), unknown
    known = set(tokenizer.chars)
    if unknown_char and unknown_char not in known:
        raise ValueError(f"--unknown_char={unknown_char!r} is not among the model's characters; pick one")

    def encode(text: str) -> list[int]:
        missing = [ch for ch in text if ch not in known]
        if missing and not unknown_char:
            raise ValueError(f"characters {''.join(sorted(set(missing)))!r} are not in the model's char "
                             f"vocabulary; pass --unknown_char='?' to replace them, or use a GPT-2 model")
        unknown.update(missing)
        return tokenizer.encode("".join(ch if ch in known else unknown_char for ch in text))

    return encode, unknown


# A char model has no <|endoftext|>: its newline ends the answers, so they stop at their first line break.
def end_token_id(tokenizer) -> int:
    """The token that ends every answer and pads the batches: <|endoftext|>, or a char model's newline."""
    return tokenizer.eot_token if tokenizer.eot_token is not None else tokenizer.encode("\n")[0]


# -----------------------------------------------------------------------------
# 2. Examples and batches: append the end token, pad on the right, shift, mask


def tokenize_examples(entries: list[dict], encode, max_length: int) -> list[tuple[list[int], int]]:
    """(prompt + response ids, prompt length) per entry. The response starts with RESPONSE_HEADER, whose
    few tokens are targets too (as in the book). collate_fn cuts examples at max_length (the context);
    one whose prompt alone is longer has no target left and is dropped."""
    examples = [(encode(format_input(e)), encode(RESPONSE_HEADER + e["output"])) for e in entries]
    return [(prompt + response, len(prompt)) for prompt, response in examples if len(prompt) <= max_length]


# Each sequence gets the end token appended and is padded on the right, with the same token, to the
# longest in the batch; targets are the inputs shifted left by one. Then -100, which cross-entropy
# skips, replaces the targets the model should not learn: the padding after the first end token
# (that one stays: the model must learn to stop) and, with mask_prompt, every target in the prompt.
# With pad = 0 and prompt length 2:
#     ids [5, 6, 7, 8] + end  ->  inputs [5, 6, 7, 8]   targets [-100, 7, 8, 0]
#     ids [5, 6]       + end  ->  inputs [5, 6, 0, 0]   targets [-100, 0, -100, -100]
# No attention mask is needed: the padding comes after every real token of its row, and causal
# attention lets a token see only the tokens before it, so no real token ever sees padding. The
# padding positions do see the real tokens, but their targets are -100: nothing they compute
# reaches the loss. (Left padding would need a mask, as in 03, and shifted positions.)
def collate_fn(batch, pad_token_id=50256, ignore_index=-100, allowed_max_length=None, mask_prompt=True,
               device="cpu"):
    """A list of (ids, prompt_length) -> inputs and targets, both (B, T), cut at allowed_max_length."""
    T = max(len(ids) for ids, _ in batch)
    inputs, targets = [], []
    for ids, prompt_length in batch:
        seq = torch.tensor(ids + [pad_token_id] * (T + 1 - len(ids)))  # (T+1,) ids, end, padding
        x, y = seq[:-1], seq[1:].clone()  # y[i] = seq[i + 1]: the next token
        y[len(ids) :] = ignore_index  # y[len(ids) - 1] is the end token: kept; the rest is padding
        if mask_prompt:
            y[: max(prompt_length - 1, 0)] = ignore_index  # y[i] for i < prompt_length - 1: a prompt token
        inputs.append(x[:allowed_max_length])
        targets.append(y[:allowed_max_length])
    return torch.stack(inputs).to(device), torch.stack(targets).to(device)


def batch_indices(step: int, n: int, batch_size: int, seed: int = 0) -> list[int]:
    """The example indices of batch `step`: a fresh shuffle per epoch, the last partial batch dropped.
    Stateless, like 02's get_batch: batch = f(seed, step)."""
    if not 0 < batch_size <= n:
        raise ValueError(f"batch_size={batch_size} must be between 1 and the {n} training examples")
    epoch, i = divmod(step, n // batch_size)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[i * batch_size : (i + 1) * batch_size].tolist()


# -----------------------------------------------------------------------------
# 3. LoRA (Hu et al. 2021): a trainable low-rank update beside each frozen Linear
#
# Finetuning changes a weight W (out, in) by some dW, and that change has a low "intrinsic rank", so
# learn it as B A with B (out, r) and A (r, in), r small: r * (in + out) parameters instead of
# in * out (GPT-2's c_attn at r=8: 24,576 instead of 1,769,472). B starts at zero, so the model starts
# exactly as the base; alpha / rank scales the update, so another rank needs no new learning rate.
# merge_lora folds B A into W: a plain GPT again, no cost at inference, the usual state dict.
LORA_TARGETS = ("c_attn", "c_proj", "c_fc")  # GPT's Linears (lm_head is tied to wte: not a target)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a low-rank update: y = base(x) + (alpha / rank) * x A^T B^T."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.rank, self.alpha, self.scaling = base, rank, alpha, alpha / rank
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **kw))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **kw))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear's own weights

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling  # (B, T, out)


def apply_lora(model: nn.Module, rank: int, alpha: float, targets=LORA_TARGETS) -> nn.Module:
    """Freeze every parameter, then wrap each Linear named in targets ("c_proj": attn's and mlp's)."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets or set(targets) - set(LORA_TARGETS):
        raise ValueError(f"LoRA targets {targets} must be a non-empty subset of {LORA_TARGETS}")
    model.requires_grad_(False)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, rank, alpha))
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """W <- W + (alpha / rank) B A for every adapter, which is then unwrapped: a plain, trainable GPT."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                child.base.weight += child.scaling * (child.lora_B @ child.lora_A)  # (out, in)
                setattr(module, name, child.base)
    return model.requires_grad_(True)


# -----------------------------------------------------------------------------
# 4. Evaluation: the loss on the answers, and greedy answers


@torch.no_grad()
def evaluate_loss(model, examples: list, batch_size: int, pad_token_id: int, ctx=nullcontext()) -> dict:
    """Mean cross-entropy over the answer tokens (prompt and padding masked), and its perplexity: the
    sum of each batch's mean times its count of targets, kept on the device and read once at the end."""
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    for start in range(0, len(examples), batch_size):
        x, y = collate_fn(examples[start : start + batch_size], pad_token_id,
                          allowed_max_length=model.config.block_size, device=device)
        with ctx:
            _, loss = model(x, y)
        n = (y != -100).sum()
        total, count = total + loss * n, count + n
    model.train(was_training)
    loss = (total / count).item()
    return {"loss": loss, "perplexity": math.exp(loss)}


# Answers come from 03's KV cache: each prompt goes through the model once, then every step feeds it
# only the newest token (09 tells the whole story of generation). A batch is padded on the LEFT, so
# every row's next token lands in the same column; the mask hides the padding (03's step 6), and each
# row counts its positions from its first real token, as if alone. final_hidden is 04's GPT.forward
# without the head (or input checks) but with position_ids per row and the cache; mask counts only
# with a cache (no cache: plain causal, as 08 scores answers). done.all() is the one read per token.
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


@torch.no_grad()
def generate_greedy(model, prompts: list[list[int]], max_new_tokens: int, end_id: int, ctx=nullcontext()):
    """Greedy continuations (token ids) of a batch of prompts, each stopped at end_id (not included) or when
    prompt + answer fill the context (a longer prompt keeps its last block_size - 1). model.eval() first."""
    device, block_size = model.lm_head.weight.device, model.config.block_size
    prompts = [p[max(0, len(p) - block_size + 1) :] for p in prompts]
    T = max(map(len, prompts))
    idx = torch.tensor([[0] * (T - len(p)) + p for p in prompts], device=device)  # (B, T), pad id 0: masked
    real = torch.tensor([[False] * (T - len(p)) + [True] * len(p) for p in prompts], device=device)
    position_ids = (real.cumsum(dim=1) - 1).clamp(min=0)  # (B, T): 0 at each row's first real token
    causal, itself = torch.ones(T, T, device=device).tril().bool(), torch.eye(T, device=device).bool()
    mask = ((causal & real[:, None, :]) | itself)[:, None]  # (B, 1, T, T); a pad sees itself: no NaN
    cache, new = KVCache(model.config.n_layer, T + max_new_tokens), [idx[:, :0]]  # new: (B, 0) at first
    done = torch.zeros_like(real[:, 0])  # (B,) False
    for _ in range(max_new_tokens):
        with ctx:  # blocks in ctx's precision, the head in fp32: bf16 logits could flip a near tie
            h = final_hidden(model, idx, position_ids, mask, cache)[:, -1]  # (B, C)
        idx = torch.where(done, end_id, model.lm_head(h.float()).argmax(dim=-1))[:, None]  # (B, 1)
        new.append(idx)  # an ended row's: end_id
        position_ids = (position_ids[:, -1:] + 1).clamp(max=block_size - 1)  # (B, 1); ended rows go on
        done |= (idx[:, 0] == end_id) | (position_ids[:, 0] == block_size - 1)  # ended, or context full
        if done.all():
            break
        real = torch.cat([real, torch.ones_like(real[:, :1])], dim=1)  # (B, L)
        mask = real[:, None, None, :]  # (B, 1, 1, L): the new token sees every real key
    return [row[: row.index(end_id)] if end_id in row else row for row in torch.cat(new, dim=1).tolist()]


def generate_responses(model, entries, encode, decode, end_id, max_new_tokens, batch_size, ctx=nullcontext()):
    """The model's greedy answer to each entry, as text (prompt: format_input + RESPONSE_HEADER)."""
    prompts = [encode(format_input(e)) + encode(RESPONSE_HEADER) for e in entries]
    return [decode(ids).strip() for i in range(0, len(prompts), batch_size)
            for ids in generate_greedy(model, prompts[i : i + batch_size], max_new_tokens, end_id, ctx)]


# -----------------------------------------------------------------------------
# 5. Settings, the model to start from, and the finetuning loop


@dataclass
class FinetuneConfig:
    """Instruction finetuning of a GPT, full or LoRA (--lora_rank > 0); the defaults are the book's."""

    init_from: Annotated[str, "checkpoint (at ckpt_path), gpt2, gpt2-medium, -large, -xl"] = "checkpoint"
    ckpt_path: Annotated[str, "the checkpoint to finetune (05's default)"] = "out/shakespeare-char/ckpt.pt"
    out_dir: Annotated[str, "ckpt.pt and test_responses.json go here"] = "out/finetune"
    overwrite: Annotated[bool, "replace the ckpt.pt of an earlier run in out_dir"] = False
    data_path: Annotated[str, "a JSON list of entries; '' = rasbt's instruction-data.json"] = ""
    min_block_size: Annotated[int, "a shorter context is stretched to this many positions"] = 512
    mask_prompt: Annotated[bool, "learn from the answer tokens only (false: the prompt counts too)"] = True
    unknown_char: Annotated[str, "char models: stands in for the characters they lack ('' = error)"] = "?"
    lora_rank: Annotated[int, "0 = full finetuning; r > 0 = LoRA adapters of rank r, weights frozen"] = 0
    lora_alpha: Annotated[float, "adapters are scaled by lora_alpha / lora_rank"] = 16.0
    lora_targets: Annotated[str, "comma-separated Linears that get adapters"] = "c_attn,c_proj,c_fc"
    batch_size: Annotated[int, "examples per step"] = 8
    epochs: Annotated[float, "passes over the training split (used when max_iters = 0)"] = 2.0
    max_iters: Annotated[int, "optimizer steps; 0 = epochs * (training examples // batch_size)"] = 0
    learning_rate: Annotated[float, "AdamW's learning rate; LoRA likes ~10x more (e.g. 5e-4)"] = 5e-5
    weight_decay: Annotated[float, "AdamW's, on 2-D weights only"] = 0.1
    grad_clip: Annotated[float, "clip the global gradient norm to this; 0 = no clipping"] = 1.0
    log_interval: Annotated[int, "a log line every this many steps"] = 10
    eval_interval: Annotated[int, "validation loss and ckpt.pt every this many steps, and at the end"] = 50
    max_new_tokens: Annotated[int, "longest answer in test_responses.json"] = 256
    num_responses: Annotated[int, "test entries answered in test_responses.json (-1 = all)"] = -1
    device: Annotated[str, "auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps"] = "auto"
    dtype: Annotated[str, "auto (bf16 or fp16 on CUDA, fp32 elsewhere), float32, bfloat16, float16"] = "auto"
    threads: Annotated[int, "CPU threads; 0 = PyTorch's default"] = 0
    seed: Annotated[int, "seeds the batches and the adapters"] = 1337

    def __post_init__(self):  # every check names its fix; parse_config prints it as one `error:` line
        if self.init_from not in ("checkpoint", *OPENAI_MODELS):
            raise ValueError(f"--init_from={self.init_from!r}: use checkpoint, {', '.join(OPENAI_MODELS)}")
        if self.lora_rank < 0 or not set(self.lora_targets.split(",")) <= set(LORA_TARGETS):
            raise ValueError(f"--lora_rank must be >= 0 and --lora_targets a comma-separated subset of "
                             f"{','.join(LORA_TARGETS)}; got {self.lora_rank}, {self.lora_targets!r}")
        for name in ("batch_size", "log_interval", "eval_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.max_iters < 0 or (self.max_iters == 0 and self.epochs <= 0):
            raise ValueError(f"--max_iters={self.max_iters} and --epochs={self.epochs} train for no steps")
        self.device = pick_device(self.device)  # "auto" resolved here, once
        self.dtype = pick_dtype(self.dtype, self.device)
        if self.init_from in OPENAI_MODELS:  # OpenAI's weights enter at 04, as a checkpoint in data/
            self.ckpt_path = str(DATA_DIR / self.init_from / "ckpt.pt")
            if not Path(self.ckpt_path).exists():
                raise FileNotFoundError(f"{self.ckpt_path} not found; fetch OpenAI's weights once: "
                                        f"python 04_gpt.py --init_from={self.init_from} --save_ckpt")
        elif not Path(self.ckpt_path).exists():
            raise FileNotFoundError(f"no checkpoint at {self.ckpt_path}: train one (python 05_pretrain.py), "
                                    f"point --ckpt_path at one, or start from GPT-2 (--init_from=gpt2)")
        if (Path(self.out_dir) / "ckpt.pt").exists() and not self.overwrite:
            raise ValueError(f"{Path(self.out_dir) / 'ckpt.pt'} holds an earlier run, which this one would "
                             f"replace; choose another --out_dir, or pass --overwrite")
        if self.data_path:  # a bad file fails now, before a model is loaded
            split_data(load_instruction_data(self.data_path))


# A GPT has one learned vector per position it trained on, and 05's CPU model knows 64, fewer than
# the template alone. So we resample its position table by linear interpolation (as ViT does for
# larger images): new position p gets the old p * (old - 1) / (new - 1); finetuning sharpens them.
@torch.no_grad()
def extend_context(model, block_size: int):
    """The same GPT with block_size positions: its learned position table, stretched."""
    wpe = model.transformer.wpe.weight  # (T_old, C)
    stretched = F.interpolate(wpe.T[None], size=block_size, mode="linear", align_corners=True)[0].T  # (T, C)
    longer = GPT(replace(model.config, block_size=block_size))
    longer.load_state_dict({**model.state_dict(), "transformer.wpe.weight": stretched})
    return longer


def load_model(cfg: FinetuneConfig):
    """(model on the CPU, tokenizer spec) from cfg.ckpt_path, with >= cfg.min_block_size positions."""
    model, _, ckpt = load_checkpoint(cfg.ckpt_path)
    spec = ckpt["tokenizer"]
    print(f"loaded {cfg.ckpt_path} (stage {ckpt.get('stage')!r}, {ckpt.get('iter_num')} iterations)")
    if model.config.block_size < cfg.min_block_size:
        print(f"stretching the position table from {model.config.block_size} to {cfg.min_block_size}")
        model = extend_context(model, cfg.min_block_size)
    return model, spec


def prepare_data(cfg: FinetuneConfig, model, spec: dict) -> dict:
    """The splits tokenized for model: train and val examples, test entries, encode, decode, end_id."""
    tokenizer, block_size = get_tokenizer(spec), model.config.block_size
    encode, unknown = text_encoder(tokenizer, cfg.unknown_char)
    splits = split_data(load_instruction_data(cfg.data_path))
    train, val = (tokenize_examples(splits[k], encode, block_size) for k in ("train", "val"))
    n_cut, n_dropped = sum(len(ids) > block_size for ids, _ in train), len(splits["train"]) - len(train)
    print(f"data: {', '.join(f'{k} {len(v)}' for k, v in splits.items())} entries; {n_cut} training examples "
          f"cut at the context ({block_size} tokens), {n_dropped} dropped (the prompt alone is longer)")
    if unknown:
        print(f"{sum(unknown.values())} characters the char model lacks became {cfg.unknown_char!r} "
              f"(most common: {''.join(c for c, _ in unknown.most_common(20))!r})")
    if len(train) < cfg.batch_size or not val:
        raise ValueError(f"{len(train)} training and {len(val)} validation examples fit the context "
                         f"({block_size} tokens), too few for --batch_size={cfg.batch_size}: lower it, raise "
                         f"--min_block_size, or start from GPT-2 (--init_from=gpt2)")
    return {"train": train, "val": val, "test": splits["test"], "encode": encode, "decode": tokenizer.decode,
            "end_id": end_token_id(tokenizer)}


def make_checkpoint(model, config: dict, spec: dict, iter_num: int, best_val_loss: float, val_loss: float):
    """05's format, stage "finetune"; with LoRA a merged copy. No optimizer or RNG state: no resume."""
    lora = any(isinstance(m, LoRALinear) for m in model.modules())
    plain = merge_lora(copy.deepcopy(model)) if lora else model
    return {"model": plain.state_dict(), "model_args": asdict(plain.config), "tokenizer": spec,
            "config": config, "stage": "finetune", "iter_num": iter_num, "best_val_loss": best_val_loss,
            "val_loss": val_loss, "optimizer": None, "scaler": None, "rng": None}


def write_test_responses(model, data: dict, cfg: FinetuneConfig, ctx):
    """The model's answers to the test entries, beside the references, in out_dir/test_responses.json."""
    test = data["test"] if cfg.num_responses < 0 else data["test"][: cfg.num_responses]
    answers, t0 = [], time.perf_counter()
    for start in range(0, len(test), cfg.batch_size):  # a batch per call, to show progress; eval: no dropout
        answers += generate_responses(model.eval(), test[start : start + cfg.batch_size], data["encode"],
                                      data["decode"], data["end_id"], cfg.max_new_tokens, cfg.batch_size, ctx)
        rate = len(answers) / (time.perf_counter() - t0)
        print(f"\rtest answers: {len(answers)}/{len(test)}, {rate:.2f}/s, "
              f"{(len(test) - len(answers)) / rate:.0f} s left", end="", flush=True)
    path = Path(cfg.out_dir) / "test_responses.json"
    records = [{**entry, "model_response": answer} for entry, answer in zip(test, answers)]
    path.write_text(json.dumps(records, indent=1, ensure_ascii=False), encoding="utf-8")
    print(f"\n{len(test)} test answers in {path}, beside the references; the model in {cfg.out_dir}/ckpt.pt")


def finetune(cfg: FinetuneConfig, model, spec: dict, data: dict) -> dict:
    """Finetune model, with the validation loss before and after; save the checkpoint and test answers."""
    train, val, end_id, device_type = data["train"], data["val"], data["end_id"], cfg.device.split(":")[0]
    ctx, out_dir = autocast_context(device_type, cfg.dtype), Path(cfg.out_dir)
    if device_type == "cuda":  # TF32: fp32 matmuls on tensor cores, 10-bit mantissa (as 05)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model.to(cfg.device)
    if cfg.lora_rank > 0:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets.split(","))
    params = [p for p in model.parameters() if p.requires_grad]  # a tied tensor appears once
    trainable, total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    max_iters = cfg.max_iters or max(1, int(cfg.epochs * (len(train) // cfg.batch_size)))
    print(f"parameters: {trainable:,} trainable of {total:,} ({trainable / total:.2%}); {cfg.device} "
          f"{cfg.dtype}, {torch.get_num_threads()} threads, {max_iters} steps of {cfg.batch_size} examples")
    # AdamW as 05's configure_optimizers: weight decay on the matrices, none on biases and gains
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=device_type in ("cuda", "cpu"))
    scaler = torch.amp.GradScaler(device_type, enabled=cfg.dtype == "float16")  # off: a pass-through

    before = evaluate_loss(model, val, cfg.batch_size, end_id, ctx)
    print(f"before finetuning: val loss {before['loss']:.4f}, perplexity {before['perplexity']:.2f}")
    best_val_loss, losses, tokens, t0 = float("inf"), [], 0, time.perf_counter()
    model.train()
    for it in range(max_iters):
        batch = [train[i] for i in batch_indices(it, len(train), cfg.batch_size, cfg.seed)]
        x, y = collate_fn(batch, end_id, allowed_max_length=model.config.block_size,
                          mask_prompt=cfg.mask_prompt, device=cfg.device)
        with ctx:
            _, loss = model(x, y)
        scaler.scale(loss).backward()  # fp16 only: scaled so that small gradients do not underflow
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        # on the device: .item() makes the CPU wait for the GPU, so only on log and eval steps
        losses.append(loss.detach())
        tokens, last = tokens + x.numel(), it == max_iters - 1
        if it % cfg.log_interval == 0 or last:
            print(f"step {it + 1}/{max_iters}: loss {loss.item():.4f}, grad norm {norm.item():.2f}, "
                  f"{tokens / (time.perf_counter() - t0):,.0f} tokens/s")
            tokens, t0 = 0, time.perf_counter()
        if (it + 1) % cfg.eval_interval == 0 or last:
            after = evaluate_loss(model, val, cfg.batch_size, end_id, ctx)
            if not math.isfinite(after["loss"]):  # never save a broken model over the last good one
                raise FloatingPointError(f"val loss {after['loss']} at step {it + 1}; lower --learning_rate")
            best_val_loss = min(best_val_loss, after["loss"])
            print(f"step {it + 1}: val loss {after['loss']:.4f}")
            ckpt = make_checkpoint(model, asdict(cfg), spec, it + 1, best_val_loss, after["loss"])
            save_checkpoint(out_dir / "ckpt.pt", ckpt)
            tokens, t0 = 0, time.perf_counter()  # tokens/s: the evaluation's time is not training time

    print(f"after finetuning: val loss {after['loss']:.4f}, perplexity {after['perplexity']:.2f}")
    write_test_responses(model, data, cfg, ctx)
    return {"iter_num": max_iters, "train_losses": torch.stack(losses).tolist(), "before": before,
            "after": after, "best_val_loss": best_val_loss}


def main(argv=None):
    cfg = parse_config(FinetuneConfig, argv)  # a bad setting: one `error:` line, exit status 2
    print("config:", ", ".join(f"{k}={v!r}" for k, v in asdict(cfg).items()))
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    torch.manual_seed(cfg.seed)
    try:  # a file that is not a checkpoint, a vocabulary without --unknown_char, a context too short
        model, spec = load_model(cfg)
        data = prepare_data(cfg, model, spec)
    except ValueError as e:  # the user's to fix, not our bug: one line, as parse_config does
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return finetune(cfg, model, spec, data)


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


# copied from 05_pretrain.py: save_checkpoint
def save_checkpoint(path, ckpt: dict):
    """torch.save to path + ".tmp", flushed to disk, then renamed over path (atomic)."""
    (path := Path(path)).parent.mkdir(parents=True, exist_ok=True)
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


if __name__ == "__main__":
    main()
