"""07_finetune.py: instruction finetuning, full and LoRA.

A pretrained GPT continues text; it does not answer. Finetuning on a few hundred examples of
(instruction, optional input, response), each written in one fixed prompt template, teaches it to
answer: after "### Response:" comes the answer, then <|endoftext|>. The model and the loss are
05's; only the data changed (supervised finetuning, SFT: Ouyang et al. 2022; Alpaca, Taori et al.
2023). Top to bottom: the data (rasbt's 1,100 entries, split 85/10/5 in file order, as in
Raschka's book, ch. 7); the prompt template, which 08 and 09 copy from here; collate_fn, which
pads on the right and masks the prompt and the padding out of the loss (and why that needs no
attention mask); LoRA, a low-rank update beside each frozen weight, merged back in at the end so
the saved model is a plain GPT; the loop, with an evaluation before and after (loss on the
validation answers, exact match on short test answers) and the test answers written to
out_dir/test_responses.json for a person to read. The checkpoint has 05's format (stage
"finetune"); 08 and 09 load it.

05's default model is char-level with a 64-character context, and the template alone is ~120
characters. Two adaptations make it run (and say so when they act): extend_context stretches its
position table to --min_block_size positions, and each character its vocabulary lacks ('#', '(',
most digits) becomes --unknown_char ("?"); a newline stands in for the missing <|endoftext|>. The
answers are Shakespearean noise (a model that small learns the template's look, not the task);
for real answers start from GPT-2.

References: Raschka, "Build a Large Language Model (From Scratch)", ch. 7 and appendix E
(rasbt/LLMs-from-scratch); Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models";
Taori et al. 2023, Stanford Alpaca; Ouyang et al. 2022, "Training language models to follow
instructions with human feedback".

Run:
    python 07_finetune.py --learning_rate=1e-3  # 05's char model (python 05_pretrain.py first): noise
    python 07_finetune.py --init_from=gpt2 --max_iters=100 --num_responses=10   # GPT-2 on a CPU (slow)
    python 07_finetune.py --init_from=gpt2-medium --device=cuda                # the book's run, one GPU
    python 07_finetune.py --init_from=gpt2-medium --lora_rank=16 --learning_rate=5e-4 --device=cuda
    python 07_finetune.py --help                # every setting, with its default
Then: python 09_generate.py --ckpt=out/finetune/ckpt.pt --chat, or DPO on top with 08_dpo.py.
"""

import argparse
import copy
import hashlib
import json
import math
import os
import pickle
import re
import struct
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

DATA_DIR = Path(__file__).resolve().parent / "data"
INSTRUCTION_DATA_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/"
                        "01_main-chapter-code/instruction-data.json")  # data/README.md lists every file
INSTRUCTION_DATA_SHA256 = "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"
OPENAI_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # --init_from's other choices

# -----------------------------------------------------------------------------
# 1. The data: instruction entries, split in file order


def load_instruction_data(path="") -> list[dict]:
    """The entries of a JSON list of {"instruction", "input", "output"} strings.

    path "" (or None) downloads rasbt's instruction-data.json (1,100 entries) into data/ once,
    sha256-checked; pass your own file in the same format to finetune on your data.
    """
    if not path:
        path = download(INSTRUCTION_DATA_URL, DATA_DIR / "instruction-data.json", INSTRUCTION_DATA_SHA256)
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} does not exist; pass --data_path=<JSON list of entries> or omit it")
    data = json.loads(Path(path).read_text(encoding="utf-8"))  # a JSONDecodeError is a ValueError
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path} must hold a non-empty JSON list of entries, got {type(data).__name__}")
    for i, entry in enumerate(data):
        if not (isinstance(entry, dict) and isinstance(entry.get("instruction"), str)
                and isinstance(entry.get("output"), str)):
            raise ValueError(f"{path}: entry {i} is not an object with string 'instruction' and 'output' "
                             f"fields (and an optional 'input'): {str(entry)[:80]}; fix the entry or drop it")
    return data


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


# -----------------------------------------------------------------------------
# 2. The prompt template (Alpaca's), and text -> token ids

RESPONSE_HEADER = "\n\n### Response:\n"  # what follows format_input(entry); then the answer


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


# -----------------------------------------------------------------------------
# 3. Examples and batches: append the end token, pad on the right, shift, mask


def tokenize_examples(entries: list[dict], encode, max_length: int) -> tuple[list, int, int]:
    """(examples, n_cut, n_dropped): each example is (ids of prompt + response, prompt length).

    The response is RESPONSE_HEADER + output: as in the book, the header's few tokens are targets
    too (the model learns to write it). Prompt and response are encoded separately, so the prompt
    length is exact. max_length is the model's context: collate_fn cuts longer examples (n_cut
    counts them); one whose prompt alone fills the context has no target left and is dropped.
    """
    examples, n_cut, n_dropped = [], 0, 0
    for entry in entries:
        prompt = encode(format_input(entry))
        ids = prompt + encode(RESPONSE_HEADER + entry["output"])
        if len(prompt) > max_length:
            n_dropped += 1
            continue
        n_cut += len(ids) > max_length
        examples.append((ids, len(prompt)))
    return examples, n_cut, n_dropped


def collate_fn(batch, pad_token_id=50256, ignore_index=-100, allowed_max_length=None, mask_prompt=True,
               device="cpu"):
    """Turn a list of (ids, prompt_length) into inputs and targets, both (B, T).

    Each sequence gets the end token appended and is padded on the right (with the same token) to
    the longest in the batch; targets are the inputs shifted left by one. Then ignore_index (-100,
    which cross-entropy skips) replaces the targets we do not want to learn from: the padding after
    the first end token (the model must learn to stop, so that one stays) and, with mask_prompt,
    every target inside the prompt (the model need not learn to write instructions).
    Example, pad = 0, prompt length 2:

        ids [5, 6, 7, 8] + end  ->  inputs [5, 6, 7, 8]   targets [-100, 7, 8, 0]
        ids [5, 6]       + end  ->  inputs [5, 6, 0, 0]   targets [-100, 0, -100, -100]

    No attention mask is needed: the padding sits after every real token of its row, and causal
    attention lets a token see only the tokens before it, so no real token ever sees padding. The
    padding positions see the real tokens and compute something, but their targets are -100, so
    nothing they compute reaches the loss. (Left padding would need a mask and shifted positions.)
    allowed_max_length (the model's context) cuts inputs and targets after padding.
    """
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
    """The example indices of training batch `step`: shuffled epochs, last partial batch dropped.

    Stateless like 02's get_batch: batch = f(seed, step), so a run is reproducible from any step.
    """
    if not 0 < batch_size <= n:
        raise ValueError(f"batch_size={batch_size} must be between 1 and the {n} training examples")
    epoch, i = divmod(step, n // batch_size)
    order = np.random.default_rng([seed, epoch]).permutation(n)  # a fresh shuffle every epoch
    return order[i * batch_size : (i + 1) * batch_size].tolist()


# -----------------------------------------------------------------------------
# 4. LoRA: a trainable low-rank update beside each frozen Linear

LORA_TARGETS = ("c_attn", "c_proj", "c_fc")  # GPT's Linears (lm_head is tied to wte: not a target)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a low-rank update: y = base(x) + (alpha / rank) * x A^T B^T.

    Finetuning changes a weight W (out, in) by some dW, and that change has a low "intrinsic rank"
    (Hu et al. 2021), so learn it as B A with B (out, r) and A (r, in), r small: r * (in + out)
    parameters instead of in * out. GPT-2's c_attn (768 -> 2304) at r=8: 24,576 instead of 1,769,472.
    A starts random (kaiming, as nn.Linear's own weights), B at zero: B A = 0, so at first the
    layer computes exactly what the base did. alpha / rank scales the update so that a different
    rank needs no new learning rate.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank} (--lora_rank=0 is no LoRA)")
        self.base, self.rank, self.alpha, self.scaling = base, rank, alpha, alpha / rank
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **kw))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **kw))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling  # (B, T, out)


def apply_lora(model: nn.Module, rank: int, alpha: float, targets=LORA_TARGETS) -> nn.Module:
    """Freeze every parameter, then wrap each Linear named in targets in a LoRALinear (in place).

    targets are the last part of the module names: "c_proj" wraps attn.c_proj and mlp.c_proj.
    """
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
    """Fold every adapter into its base weight, W <- W + (alpha / rank) B A, and unwrap it (in place).

    The result is a plain GPT with no extra cost at inference and the usual state dict, which is
    what the checkpoint holds. All parameters are trainable again, as in any plain model.
    """
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                child.base.weight += child.scaling * (child.lora_B @ child.lora_A)  # (out, in)
                setattr(module, name, child.base)
    return model.requires_grad_(True)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a shared (tied) tensor counts once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# -----------------------------------------------------------------------------
# 5. Evaluation: loss on the responses, greedy answers, exact match


@torch.no_grad()
def evaluate_loss(model, examples: list, batch_size: int, pad_token_id: int, ctx=nullcontext()) -> dict:
    """Mean cross-entropy over the response tokens only (prompt and padding masked), and perplexity.

    The model's loss is a mean per batch; summing loss * (number of counted targets) over batches
    gives the exact mean over all response tokens. The sums stay on the device: one read at the end.
    """
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    for start in range(0, len(examples), batch_size):
        x, y = collate_fn(examples[start : start + batch_size], pad_token_id,
                          allowed_max_length=model.config.block_size, device=device)
        with ctx:
            _, loss = model(x, y)
        n = (y != -100).sum()
        total, count = total + loss.float() * n, count + n
    model.train(was_training)
    loss = (total / count).item()
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(count.item())}


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


def generate_responses(model, entries, encode, decode, end_id, max_new_tokens=256, batch_size=8,
                       ctx=nullcontext()) -> list[str]:
    """The model's greedy answer to each entry, as text (prompt: format_input + RESPONSE_HEADER)."""
    prompts = [encode(format_input(e)) + encode(RESPONSE_HEADER) for e in entries]
    outputs = generate_greedy(model, prompts, max_new_tokens, end_id, batch_size, ctx)
    return [decode(ids).strip() for ids in outputs]


def exact_match(responses: list[str], references: list[str]) -> float:
    """The fraction of responses equal to their reference after lowercasing, punctuation to spaces
    and single spaces: 'Jane Austen.' matches 'jane austen'."""
    normalize = lambda text: " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())  # noqa: E731
    hits = [normalize(r) == normalize(ref) for r, ref in zip(responses, references)]
    return sum(hits) / max(1, len(hits))


# -----------------------------------------------------------------------------
# 6. Settings, the model to start from, and the finetuning loop


# (arg is called when the class below is defined, so its copy stands here, above it, not in the appendix)
# copied from 05_pretrain.py: arg
def arg(default, help: str):
    """A dataclass field with its --help text: `n_layer: int = arg(4, "transformer blocks")`."""
    return field(default=default, metadata={"help": help})


@dataclass
class FinetuneConfig:
    """Instruction finetuning of a GPT (full, or LoRA with --lora_rank > 0)."""

    # model and data
    init_from: str = arg("checkpoint", "checkpoint (--ckpt_path), or OpenAI's gpt2, gpt2-medium, -large, -xl")
    ckpt_path: str = arg("out/shakespeare-char/ckpt.pt", "the checkpoint to finetune (05's default run)")
    out_dir: str = arg("out/finetune", "ckpt.pt, log.jsonl and test_responses.json go here")
    overwrite: bool = arg(False, "replace the ckpt.pt of an earlier run in out_dir")
    data_path: str = arg("", "'' = rasbt's instruction-data.json (downloaded, sha256-checked), or your own")
    min_block_size: int = arg(512, "a model with a shorter context gets its position table stretched to this")
    mask_prompt: bool = arg(True, "learn from the response tokens only (false: the prompt counts too)")
    unknown_char: str = arg("?", "char tokenizers: stands in for the characters they lack ('' = error)")
    dropout: float = arg(0.0, "the model's dropout while finetuning (the book: 0.0)")
    # LoRA
    lora_rank: int = arg(0, "0 = full finetuning; r > 0 = LoRA adapters of rank r, base weights frozen")
    lora_alpha: float = arg(16.0, "adapters are scaled by lora_alpha / lora_rank")
    lora_targets: str = arg("c_attn,c_proj,c_fc", "comma-separated Linears that get adapters")
    # optimization: the book's AdamW at a constant rate, 2 epochs of batches of 8
    batch_size: int = arg(8, "examples per step")
    epochs: float = arg(2.0, "passes over the training split (used when max_iters = 0)")
    max_iters: int = arg(0, "optimizer steps; 0 = epochs * (training examples // batch_size)")
    learning_rate: float = arg(5e-5, "AdamW's learning rate; LoRA likes ~10x more (e.g. 5e-4)")
    weight_decay: float = arg(0.1, "AdamW's, on 2-D weights only")
    grad_clip: float = arg(1.0, "clip the global gradient norm to this; 0 = no clipping")
    # logging and evaluation
    log_interval: int = arg(10, "a log line every this many steps")
    eval_interval: int = arg(50, "validation loss and ckpt.pt every this many steps, and at the end")
    max_new_tokens: int = arg(256, "longest answer generated for test_responses.json")
    num_responses: int = arg(-1, "test entries answered in test_responses.json (-1 = all)")
    # system
    device: str = arg("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    dtype: str = arg("auto", "auto (bf16 or fp16 on CUDA, fp32 elsewhere), float32, bfloat16, float16")
    threads: int = arg(0, "CPU threads; 0 = PyTorch's default")
    seed: int = arg(1337, "seeds the batches, the adapters and dropout")

    def __post_init__(self):
        """Check every setting before any work: parse_config prints a failure as one `error:` line."""
        if self.init_from not in ("checkpoint", *OPENAI_MODELS):
            raise ValueError(f"--init_from={self.init_from!r} is not valid; use checkpoint, "
                             f"{', '.join(OPENAI_MODELS)}")
        if self.lora_rank < 0 or not set(self.lora_targets.split(",")) <= set(LORA_TARGETS):
            raise ValueError(f"--lora_rank must be >= 0 and --lora_targets a comma-separated subset of "
                             f"{','.join(LORA_TARGETS)}; got {self.lora_rank} and {self.lora_targets!r}")
        for name in ("batch_size", "log_interval", "eval_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.max_iters < 0 or (self.max_iters == 0 and self.epochs <= 0):
            raise ValueError(f"--max_iters={self.max_iters} and --epochs={self.epochs} train for no steps")
        self.device = pick_device(self.device)  # "auto" resolved; both name the fix in their ValueError
        self.dtype = pick_dtype(self.dtype, self.device)
        if self.init_from == "checkpoint" and not Path(self.ckpt_path).exists():
            raise FileNotFoundError(f"no checkpoint at {self.ckpt_path}: train one (python 05_pretrain.py), "
                                    f"point --ckpt_path at one, or start from GPT-2 (--init_from=gpt2)")
        if (Path(self.out_dir) / "ckpt.pt").exists() and not self.overwrite:
            raise ValueError(f"{Path(self.out_dir) / 'ckpt.pt'} holds an earlier run, which this one would "
                             f"replace; choose another --out_dir, or pass --overwrite")
        if self.data_path:  # a bad file fails now, before a model is loaded
            split_data(load_instruction_data(self.data_path))


@torch.no_grad()
def extend_context(model, block_size: int):
    """The same GPT with block_size positions: its learned position table, stretched.

    A GPT has one learned vector per position it trained on (wpe: block_size rows) and nothing
    beyond; 05's CPU model knows 64 characters, fewer than the template alone. We resample the
    table along the position axis by linear interpolation (as ViT does for larger images): new
    position p gets the old table at p * (old - 1) / (new - 1), so neighbours stay similar, and
    finetuning sharpens them. GPT-2 (1,024 positions) needs none of this.
    """
    wpe = model.transformer.wpe.weight  # (T_old, C)
    stretched = F.interpolate(wpe.T[None], size=block_size, mode="linear", align_corners=True)[0].T  # (T, C)
    longer = GPT(replace(model.config, block_size=block_size))
    longer.load_state_dict({**model.state_dict(), "transformer.wpe.weight": stretched})
    return longer


def load_model(cfg: FinetuneConfig):
    """(model on the CPU, tokenizer spec): OpenAI's GPT-2 or a checkpoint of these scripts, with
    cfg's dropout and at least cfg.min_block_size positions."""
    if cfg.init_from in OPENAI_MODELS:
        model, spec = from_pretrained(cfg.init_from, DATA_DIR), {"kind": "gpt2"}
    else:
        model, _, ckpt = load_checkpoint(cfg.ckpt_path)
        spec = ckpt["tokenizer"]
        print(f"loaded {cfg.ckpt_path} (stage {ckpt.get('stage')!r}, {ckpt.get('iter_num')} iterations)")
    if model.config.block_size < cfg.min_block_size:
        print(f"stretching the position table from {model.config.block_size} to {cfg.min_block_size}")
        model = extend_context(model, cfg.min_block_size)
    if model.config.dropout != cfg.dropout:  # dropout lives in the modules: rebuild with the new rate
        state, model = model.state_dict(), GPT(replace(model.config, dropout=cfg.dropout))
        model.load_state_dict(state)
    return model, spec


def make_checkpoint(model, config: dict, spec: dict, iter_num: int, best_val_loss: float, val_loss: float):
    """A checkpoint in 05's format, stage "finetune", holding a plain GPT.

    With LoRA we save a merged copy (the model keeps training with its adapters). No optimizer or
    RNG state: a finetuning run is short, so there is no resume to feed.
    """
    lora = any(isinstance(m, LoRALinear) for m in model.modules())
    plain = merge_lora(copy.deepcopy(model)) if lora else model
    return {"model": plain.state_dict(), "model_args": asdict(plain.config), "tokenizer": spec,
            "config": config, "stage": "finetune", "iter_num": iter_num, "best_val_loss": best_val_loss,
            "val_loss": val_loss, "optimizer": None, "scaler": None, "rng": None}


def prepare_data(cfg: FinetuneConfig, model, spec: dict) -> dict:
    """Tokenize the splits for model: {"train", "val": examples, "test": entries, "encode", "decode",
    "end_id"}. Says what it cut, dropped or replaced; a ValueError when nothing fits the context."""
    tokenizer, block_size = get_tokenizer(spec), model.config.block_size
    encode, unknown = text_encoder(tokenizer, cfg.unknown_char)
    splits = split_data(load_instruction_data(cfg.data_path))
    train, n_cut, n_dropped = tokenize_examples(splits["train"], encode, block_size)
    val, _, _ = tokenize_examples(splits["val"], encode, block_size)
    print(f"data: {', '.join(f'{k} {len(v)}' for k, v in splits.items())} entries; {n_cut} training examples "
          f"cut at the context ({block_size} tokens), {n_dropped} dropped (the prompt alone fills it)")
    if unknown:
        print(f"{sum(unknown.values())} characters the char tokenizer lacks became {cfg.unknown_char!r} "
              f"(most common: {''.join(c for c, _ in unknown.most_common(20))!r})")
    if not train or not val:
        raise ValueError(f"no training or validation example fits the context of {block_size} tokens; "
                         f"raise --min_block_size or start from GPT-2 (--init_from=gpt2)")
    return {"train": train, "val": val, "test": splits["test"], "encode": encode, "decode": tokenizer.decode,
            "end_id": end_token_id(tokenizer)}


def evaluate(model, data: dict, cfg: FinetuneConfig, ctx) -> dict:
    """Loss and perplexity on the validation answers; exact match on the test answers of <= 3 words."""
    short = [e for e in data["test"] if len(e["output"].split()) <= 3]
    # 32 new tokens are plenty for a few words
    responses = generate_responses(model, short, data["encode"], data["decode"], data["end_id"], 32,
                                   cfg.batch_size, ctx)
    loss = evaluate_loss(model, data["val"], cfg.batch_size, data["end_id"], ctx)
    result = {"val_loss": loss["loss"], "val_perplexity": loss["perplexity"],
              "exact_match": exact_match(responses, [e["output"] for e in short])}
    print(f"val loss {result['val_loss']:.4f}, perplexity {result['val_perplexity']:.2f}, "
          f"exact match {result['exact_match']:.1%} of {len(short)} short test answers")
    return result


def write_test_responses(model, data: dict, cfg: FinetuneConfig, ctx) -> Path:
    """The model's answers to the test entries, beside the references, in out_dir/test_responses.json."""
    test = data["test"] if cfg.num_responses < 0 else data["test"][: cfg.num_responses]
    responses, t0 = [], time.perf_counter()
    for start in range(0, len(test), cfg.batch_size):  # a batch at a time, to show progress
        chunk = test[start : start + cfg.batch_size]
        responses += generate_responses(model, chunk, data["encode"], data["decode"], data["end_id"],
                                        cfg.max_new_tokens, cfg.batch_size, ctx)
        rate = len(responses) / (time.perf_counter() - t0)
        print(f"\rtest answers: {len(responses)}/{len(test)}, {rate:.2f}/s, "
              f"{(len(test) - len(responses)) / rate:.0f} s left", end="", flush=True)
    path = Path(cfg.out_dir) / "test_responses.json"
    records = [{**entry, "model_response": response} for entry, response in zip(test, responses)]
    path.write_text(json.dumps(records, indent=1, ensure_ascii=False), encoding="utf-8")
    if test:
        print(f"\n\n{format_input(test[0])}{RESPONSE_HEADER}{responses[0]}\n(reference: {test[0]['output']})")
    print(f"\n{len(test)} test answers in {path}; the model in {Path(cfg.out_dir) / 'ckpt.pt'}")
    return path


def finetune(cfg: FinetuneConfig, model, spec: dict, data: dict) -> dict:
    """Finetune model, evaluate before and after, save the checkpoint and the test answers."""
    device_type, out_dir, end_id = torch.device(cfg.device).type, Path(cfg.out_dir), data["end_id"]
    if device_type == "cuda":  # TF32: fp32 matmuls on tensor cores, 10-bit mantissa (as 05)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ctx, train, val = autocast_context(device_type, cfg.dtype), data["train"], data["val"]
    model.to(cfg.device)
    if cfg.lora_rank > 0:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets.split(","))
    trainable, total = count_params(model)
    how = f"LoRA rank {cfg.lora_rank} on {cfg.lora_targets}" if cfg.lora_rank > 0 else "full finetuning"
    max_iters = cfg.max_iters or max(1, int(cfg.epochs * (len(train) // cfg.batch_size)))
    print(f"parameters: {trainable:,} trainable of {total:,} ({trainable / total:.2%}), {how}; {cfg.device} "
          f"{cfg.dtype}, {torch.get_num_threads()} threads, {max_iters} steps of {cfg.batch_size} examples")
    # AdamW as 05's configure_optimizers: weight decay on the matrices, none on biases and gains
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=device_type in ("cuda", "cpu"))
    scaler = torch.amp.GradScaler(device_type, enabled=cfg.dtype == "float16")  # off: a pass-through

    print("before finetuning: ", end="")
    before = evaluate(model, data, cfg, ctx)
    best_val_loss, losses, log, tokens, t0 = float("inf"), [], [], 0, time.perf_counter()
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
        # the loss stays on the device: reading it (.item()) makes the CPU wait for the GPU, so we
        # read it on log and eval steps only, and meanwhile the CPU queues the next steps
        losses.append(loss.detach())
        tokens, last = tokens + x.numel(), it == max_iters - 1
        if it % cfg.log_interval == 0 or last:
            loss_value, dt = loss.item(), time.perf_counter() - t0
            print(f"step {it + 1}/{max_iters}: loss {loss_value:.4f}, grad norm {norm.item():.2f}, "
                  f"{tokens / dt:,.0f} tokens/s")
            tokens, t0 = 0, time.perf_counter()
        if (it + 1) % cfg.eval_interval == 0 or last:
            val_loss = evaluate_loss(model, val, cfg.batch_size, end_id, ctx)["loss"]
            if not math.isfinite(val_loss):  # never save a broken model over the last good one
                raise FloatingPointError(f"val loss {val_loss} at step {it + 1}; lower --learning_rate")
            best_val_loss = min(best_val_loss, val_loss)
            print(f"step {it + 1}: val loss {val_loss:.4f}")
            log.append({"iter": it + 1, "train_loss": loss.item(), "val_loss": val_loss})
            ckpt = make_checkpoint(model, asdict(cfg), spec, it + 1, best_val_loss, val_loss)
            save_checkpoint(out_dir / "ckpt.pt", ckpt)
    (out_dir / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in log))

    print("after finetuning: ", end="")
    after = evaluate(model, data, cfg, ctx)
    write_test_responses(model, data, cfg, ctx)
    return {"iter_num": max_iters, "train_losses": torch.stack(losses).tolist(), "before": before,
            "after": after, "val_loss": after["val_loss"], "best_val_loss": best_val_loss}


def main(argv=None):
    cfg = parse_config(FinetuneConfig, argv)  # a bad setting: one `error:` line, exit status 2
    print("config:", ", ".join(f"{k}={v!r}" for k, v in asdict(cfg).items()))
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    try:  # a file that is not a checkpoint, a vocabulary that lacks --unknown_char, a context too short
        model, spec = load_model(cfg)
        data = prepare_data(cfg, model, spec)
    except ValueError as e:  # the user's to fix, not a bug of ours: one line, as parse_config does
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return finetune(cfg, model, spec, data)


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


# copied from 04_gpt.py: SAFETENSORS_DTYPES
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


# copied from 04_gpt.py: load_safetensors
def load_safetensors(path) -> dict[str, torch.Tensor]:
    """Read a .safetensors file: the whole format is a length, a JSON header and raw bytes.

        [8 bytes: N, little-endian uint64][N bytes: JSON header][data]
        header = {"wte.weight": {"dtype": "F32", "shape": [50257, 768], "data_offsets": [0, 154389504]},
                  ..., "__metadata__": {...}}   # offsets are relative to the start of the data

    Each tensor is its bytes in row-major, little-endian order (every machine PyTorch runs on is
    little-endian, so torch.frombuffer reads them as they are). No code runs while loading, unlike
    a pickled .bin checkpoint, which is why Hugging Face moved to this format.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; check the path (from_pretrained downloads it)")
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        if file_size < 8:
            raise ValueError(f"{path} is {file_size} bytes, too short for a safetensors file; re-download it")
        (header_len,) = struct.unpack("<Q", f.read(8))
        if 8 + header_len > file_size:
            raise ValueError(f"{path}: header length {header_len} exceeds the file size; re-download it")
        header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        start = 8 + header_len
        tensors = {}
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(
                    f"{path}: tensor {name} has dtype {info['dtype']}, which this reader does not "
                    f"support; supported: {sorted(SAFETENSORS_DTYPES)}"
                )
            dtype, shape = SAFETENSORS_DTYPES[info["dtype"]], info["shape"]
            begin, end = info["data_offsets"]
            nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            if end - begin != nbytes or start + end > file_size:
                raise ValueError(f"{path}: tensor {name} has inconsistent offsets; the file is corrupt")
            if nbytes == 0:
                tensors[name] = torch.empty(shape, dtype=dtype)
                continue
            buffer = bytearray(nbytes)
            f.seek(start + begin)
            f.readinto(buffer)
            tensors[name] = torch.frombuffer(buffer, dtype=dtype).reshape(shape)
    return tensors


# copied from 04_gpt.py: HF_TRANSPOSED
HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


# copied from 04_gpt.py: hf_to_gpt_state_dict
def hf_to_gpt_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and transpose) a Hugging Face GPT-2 state dict into our GPT's names.

    "h.0.attn.c_attn.weight" (768, 2304)  ->  "transformer.h.0.attn.c_attn.weight" (2304, 768)
    Keys may come with or without the "transformer." prefix (checkpoints differ). The attention-mask
    buffers "attn.bias" / "attn.masked_bias" of old checkpoints are constants, not weights: dropped.
    lm_head.weight is the tied wte.weight when the checkpoint leaves it out.
    """
    out = {}
    for name, tensor in sd.items():
        name = name.removeprefix("transformer.")
        # subtle: the leading dot matters, "h.0.attn.c_attn.bias" also ends with "attn.bias"
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        if name.endswith(HF_TRANSPOSED):
            tensor = tensor.t()
        out[name if name == "lm_head.weight" else "transformer." + name] = tensor.contiguous()
    if "transformer.wte.weight" not in out:
        raise ValueError(f"no wte.weight among the keys {sorted(sd)[:5]}...; is this a GPT-2 checkpoint?")
    out.setdefault("lm_head.weight", out["transformer.wte.weight"])
    return out


# copied from 04_gpt.py: from_pretrained
def from_pretrained(model_type: str, cache_dir) -> "GPT":
    """GPT-2 with OpenAI's weights: "gpt2" (124M), "gpt2-medium", "gpt2-large" or "gpt2-xl".

    Downloads Hugging Face's model.safetensors once into cache_dir/<model_type>/ (0.5 to 6 GB).
    The model is built on the "meta" device (shapes only, no memory, no random init) and then
    takes the checkpoint's tensors as its own, so gpt2-xl never exists twice in memory.
    """
    names = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
    if model_type not in names:
        raise ValueError(f"unknown pretrained model {model_type!r}; choose one of {names}")
    url = f"https://huggingface.co/{model_type}/resolve/main/model.safetensors"
    path = download(url, Path(cache_dir) / model_type / "model.safetensors", sha256=None)  # no hash pinned
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset(model_type))  # vocab 50257, block 1024, bias, no dropout
    model.load_state_dict(hf_to_gpt_state_dict(load_safetensors(path)), assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # assign=True gave them two Parameters: re-tie
    return model


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
        missing = {"model", "model_args", "tokenizer"} - set(ckpt)
    except (pickle.UnpicklingError, RuntimeError, EOFError, TypeError):  # not torch.save's zip, or foreign
        missing = {"everything"}
    if missing:
        raise ValueError(f"{path} is not a checkpoint of these scripts (it lacks {sorted(missing)}); "
                         f"05_pretrain.py to 08_dpo.py write them as out_dir/ckpt.pt")
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    return model, get_tokenizer(ckpt["tokenizer"]), ckpt


if __name__ == "__main__":
    main()
