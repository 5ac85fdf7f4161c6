"""Stage 5: pretraining, the project's main job. A GPT learns to write Shakespeare on a laptop CPU.

04 built the model; here it learns. Each iteration takes a batch of random windows of the corpus,
computes the next-token loss, backpropagates, and takes one AdamW step. Around that core sits what
makes a run trustworthy and fast enough to use:
  - AdamW with weight decay on the matrices only; linear warmup then cosine decay of the learning
    rate; gradient clipping; gradient accumulation (a big batch as several small ones);
  - on CUDA: bf16 autocast (fp16 with a gradient scaler on GPUs without native bf16), TF32 and
    torch.compile; on CPU plain fp32;
  - train/val loss every eval_interval, checkpoints written atomically with everything needed to
    continue a run bit for bit (weights, optimizer, RNG states), the best one kept as best.pt;
  - Ctrl-C saves before it exits; a NaN loss stops the run and leaves the last checkpoint intact;
  - a log line per log_interval (loss, lr, grad norm, ms/step, tokens/s, and MFU on GPUs of known
    peak), log.jsonl, a loss plot, and a text sample every sample_interval.
It reads the token files that 02 prepared (data/<dataset>-<tokenizer>/) and downloads no corpus.

References: karpathy/nanoGPT train.py (its names, its Shakespeare recipes: val loss ~1.88 on CPU
after 2000 iterations, ~1.47 on one GPU); Loshchilov & Hutter 2019 (AdamW, decoupled weight
decay); Loshchilov & Hutter 2017 (SGDR: cosine schedule); Goyal et al. 2017 (linear warmup);
Micikevicius et al. 2018 (mixed precision, loss scaling); Chowdhery et al. 2022, appendix B (MFU).

Run it:
  python 02_dataloader.py --tokenizers=char              # once: the token files this stage reads
  python 05_pretrain.py                                  # nanoGPT's CPU recipe: 0.8M params, 2000 iters
  python 05_pretrain.py --preset=shakespeare-char-gpu    # nanoGPT's GPU recipe: 10.7M params, one GPU
  python 05_pretrain.py --init_from=resume               # continue the run in out_dir where it stopped
  python 05_pretrain.py --init_from=resume --max_iters=3000      # ... or past its end
  python 05_pretrain.py --tokenizer=gpt2 --out_dir=out/shakespeare-gpt2    # GPT-2 tokens (prepared by 02)
  python 05_pretrain.py --init_from=gpt2 --tokenizer=gpt2 --out_dir=out/shakespeare-ft --block_size=256 \
      --learning_rate=3e-5 --min_lr=3e-6 --max_iters=200 --lr_decay_iters=200 --warmup_iters=20 \
      --batch_size=4 --eval_interval=50                  # finetune OpenAI's GPT-2 (downloads 0.5 GB)
  python 05_pretrain.py --help                           # every setting, with its default
Several GPUs: 06_distributed.py (torchrun). To compare with nanoGPT on one machine, run in its checkout:
  python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 \
      --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 \
      --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0
"""

import argparse
import hashlib
import json
import math
import os
import pickle
import random
import signal
import struct
import sys
import threading
import time
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import requests
import torch
import torch.nn as nn
import torch.nn.functional as F

DATA_DIR = Path(__file__).resolve().parent / "data"
GPT2_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # OpenAI's weights for --init_from


# -----------------------------------------------------------------------------
# Settings: nanoGPT's names, every field a --field=value flag, presets for the known recipes


def arg(default, help: str):
    """A dataclass field with its --help text: `n_layer: int = arg(4, "transformer blocks")`."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Pretrain a GPT on a text corpus. Defaults: nanoGPT's CPU recipe for Shakespeare-char."""

    # The recipes people know, by name. parse_config applies one, then the flags given override it.
    # Fields a preset leaves out keep their defaults: lr 1e-3 -> 1e-4, beta2 0.99, warmup 100 iters.
    PRESETS: ClassVar[dict[str, dict]] = {
        # nanoGPT's README, "I only have a macbook": 0.8M parameters, val loss ~1.88 after 2000 iters
        "shakespeare-char-cpu": dict(batch_size=12, block_size=64, n_layer=4, n_head=4, n_embd=128,
                                     dropout=0.0, max_iters=2000, lr_decay_iters=2000, eval_iters=20),
        # nanoGPT's config/train_shakespeare_char.py: 10.7M parameters, val loss ~1.47 after 5000 iters
        "shakespeare-char-gpu": dict(batch_size=64, block_size=256, n_layer=6, n_head=6, n_embd=384,
                                     dropout=0.2, max_iters=5000, lr_decay_iters=5000, eval_iters=200,
                                     compile=True),
    }  # fmt: skip

    preset: str = arg("shakespeare-char-cpu", "a recipe of PRESETS; the flags given override it")
    # data, as 02 prepared it: data_dir/<dataset>-<tokenizer>/{train.bin, val.bin, meta.json}
    dataset: str = arg("tinyshakespeare", "the corpus 02 prepared")
    tokenizer: str = arg("char", "char (one token per character) or gpt2 (OpenAI's BPE, via tiktoken)")
    data_dir: str = arg("", "where 02 put the prepared corpora; '' = data/ next to this script")
    # model (04's GPTConfig)
    n_layer: int = arg(4, "transformer blocks")
    n_head: int = arg(4, "attention heads per block")
    n_embd: int = arg(128, "width of the residual stream")
    block_size: int = arg(64, "context length in tokens")
    dropout: float = arg(0.0, "0 for short runs on enough data; 0.2 in the GPU recipe, which overfits")
    bias: bool = arg(False, "biases in Linear and LayerNorm; nanoGPT trains without: a bit faster, as good")
    init_from: str = arg("scratch", "scratch, resume (out_dir/ckpt.pt), or OpenAI's gpt2, gpt2-medium, ...")
    # optimization
    batch_size: int = arg(12, "sequences per micro-batch")
    gradient_accumulation_steps: int = arg(1, "micro-batches per optimizer step (the batch is their sum)")
    max_iters: int = arg(2000, "optimizer steps in total")
    learning_rate: float = arg(1e-3, "peak learning rate, reached after warmup")
    weight_decay: float = arg(0.1, "AdamW's, on the 2-D weights only (see configure_optimizers)")
    beta1: float = arg(0.9, "AdamW's momentum")
    beta2: float = arg(0.99, "AdamW's second-moment decay; nanoGPT's 0.99 for small batches (GPT-3: 0.95)")
    grad_clip: float = arg(1.0, "clip the global gradient norm to this; 0 = no clipping")
    decay_lr: bool = arg(True, "warmup + cosine decay; false = constant learning_rate")
    warmup_iters: int = arg(100, "linear warmup steps")
    lr_decay_iters: int = arg(2000, "the cosine reaches min_lr here (usually = max_iters)")
    min_lr: float = arg(1e-4, "~learning_rate / 10 (Chinchilla)")
    # evaluation, logging, checkpoints, samples
    out_dir: str = arg("out/shakespeare-char", "ckpt.pt, best.pt, log.jsonl, loss.png")
    overwrite: bool = arg(False, "start afresh even if out_dir holds a checkpoint (it is replaced)")
    eval_interval: int = arg(250, "train/val loss and ckpt.pt (best.pt if val improved) every this many")
    eval_iters: int = arg(20, "batches per split in an evaluation")
    log_interval: int = arg(10, "a log line every this many iterations")
    sample_interval: int = arg(500, "a text sample every this many iterations (0 = only at the end)")
    max_new_tokens: int = arg(200, "tokens per sample (0 = no samples)")
    prompt: str = arg("\n", "samples continue this text")
    temperature: float = arg(0.8, "sampling temperature: < 1 sharper, > 1 more random")
    top_k: int = arg(200, "sample among the k most likely tokens (0 = among all)")
    # system
    device: str = arg("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    dtype: str = arg("auto", "auto (bf16 or fp16 on CUDA, fp32 elsewhere), float32, bfloat16, float16")
    compile: bool = arg(False, "torch.compile the model: slower start, faster steps (on GPUs)")
    threads: int = arg(0, "CPU threads; 0 = PyTorch's default")
    peak_flops: float = arg(0.0, "the FLOP/s to measure MFU against; 0 = a known GPU's datasheet peak")
    seed: int = arg(1337, "seeds the weights, the batches and dropout")

    @property
    def corpus_dir(self) -> Path:
        return Path(self.data_dir or DATA_DIR) / f"{self.dataset}-{self.tokenizer}"

    def __post_init__(self):
        """Check every setting that can be checked without training, so a mistake stops the run
        at once (parse_config prints it as one `error:` line), before any work or file is made."""
        choices = {"tokenizer": ("char", "gpt2"), "init_from": ("scratch", "resume", *GPT2_MODELS)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name}={getattr(self, name)!r} is not valid; use {', '.join(allowed)}")
        for name in ("batch_size", "block_size", "gradient_accumulation_steps", "eval_interval",
                     "eval_iters", "log_interval"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_iters", "warmup_iters", "sample_interval", "max_new_tokens", "top_k", "threads",
                     "learning_rate", "min_lr", "weight_decay", "grad_clip", "temperature", "peak_flops"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be at least 0, got {getattr(self, name)}")
        if self.max_new_tokens and not self.prompt:
            raise ValueError("--prompt is empty: samples continue at least one token (or --max_new_tokens=0)")
        if self.decay_lr and self.lr_decay_iters <= self.warmup_iters:
            raise ValueError(f"--lr_decay_iters={self.lr_decay_iters} must exceed --warmup_iters="
                             f"{self.warmup_iters}; usually lr_decay_iters = max_iters (or --decay_lr=false)")
        pick_dtype(self.dtype, pick_device(self.device))  # both name the fix in their ValueError
        if not (self.corpus_dir / "meta.json").exists():
            where = "" if self.data_dir in ("", str(DATA_DIR)) else f" --out_dir={self.data_dir}"
            raise FileNotFoundError(f"no prepared data in {self.corpus_dir}; prepare it with "
                                    f"`python 02_dataloader.py --tokenizers={self.tokenizer}{where}`")
        meta = load_meta(self.corpus_dir)
        sizes = [len(load_tokens(self.corpus_dir, split)) for split in ("train", "val")]  # checks the files
        if min(sizes) <= self.block_size:
            raise ValueError(f"{self.corpus_dir} has {sizes[0]} train and {sizes[1]} val tokens, too few "
                             f"for --block_size={self.block_size}; use a smaller one")
        ckpt_path = Path(self.out_dir) / "ckpt.pt"
        if self.init_from == "scratch":  # GPTConfig checks the shape (n_embd % n_head, ...)
            GPTConfig(block_size=self.block_size, vocab_size=meta["n_vocab"], n_layer=self.n_layer,
                      n_head=self.n_head, n_embd=self.n_embd, dropout=self.dropout, bias=self.bias)
        elif self.init_from != "resume" and (self.tokenizer != "gpt2" or self.block_size > 1024):
            raise ValueError(f"--init_from={self.init_from} continues OpenAI's model: it reads GPT-2 tokens "
                             f"(--tokenizer=gpt2) and knows 1024 positions (--block_size <= 1024)")
        if self.init_from == "resume":
            if saved_run(self.out_dir)["tokenizer"] != meta["tokenizer"]:
                raise ValueError(f"{ckpt_path} was trained on other tokens than {self.corpus_dir}; resume "
                                 f"with the run's own --dataset, --tokenizer and --data_dir")
        elif ckpt_path.exists() and not self.overwrite:
            raise ValueError(f"{ckpt_path} exists and a new run would overwrite it; continue that run with "
                             f"--init_from=resume, train into another --out_dir, or replace it: --overwrite")


def saved_run(out_dir) -> dict:
    """The checkpoint that --init_from=resume continues, mapped (mmap: no weights are read yet)."""
    path = Path(out_dir) / "ckpt.pt"
    if not path.exists():
        raise FileNotFoundError(f"--init_from=resume: no checkpoint at {path}; check --out_dir, or start "
                                f"a run without --init_from=resume")
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        return {"config": ckpt["config"], "tokenizer": ckpt["tokenizer"]}
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, TypeError):
        raise ValueError(f"{path} is not a checkpoint of these scripts; check --out_dir") from None


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


# -----------------------------------------------------------------------------
# The pieces of a training step: device, precision, optimizer, learning-rate schedule


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


# Dense bf16/fp16 tensor-core peaks from NVIDIA's datasheets, for MFU. Matched as substrings of the
# device name, in this order (so "L40S" is found before "L4").
GPU_PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12,
}  # fmt: skip


def peak_flops(device: str, override: float = 0) -> float | None:
    """The FLOP/s that MFU (model FLOPs utilisation) is measured against, or None if unknown.

    override > 0 wins (--peak_flops, e.g. for a GPU not in GPU_PEAK_FLOPS); on CUDA, the table's
    datasheet peak. CPUs have no datasheet peak that training comes near (and a timed matmul
    measured 0.7 to 2.1 TFLOP/s from run to run on one machine), so there we print tokens/s only.
    """
    if override > 0:
        return override
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for gpu, flops in GPU_PEAK_FLOPS.items() if gpu in name), None)


def configure_optimizers(model, weight_decay: float, learning_rate: float, betas, device_type: str):
    """AdamW with two groups: weight decay on every 2-D tensor, none on the 1-D ones.

    Weight decay shrinks weights toward zero at every step (decoupled from the gradient: AdamW, not
    an L2 term in the loss). It is meant for the matrices that multiply activations: the Linear
    weights, and the embeddings, whose token matrix is also the LM head (tied). Biases and LayerNorm
    gains are 1-D shifts and scales; decaying them regularizes nothing and drags the gains toward
    0, i.e. toward switching their layer off. GPT-2's training code was never published and
    practice differs on the embeddings (minGPT exempted them); we follow nanoGPT, whose Shakespeare
    numbers we compare against: decay iff p.dim() >= 2. Frozen parameters (LoRA, in 07) are left out.

    fused=True (all tensors updated by one kernel) where PyTorch has it: CUDA, and CPU since
    PyTorch 2.4, where it measured several times faster than foreach for small models' steps;
    foreach (one op per group for all tensors) elsewhere.
    """
    params = [p for p in model.parameters() if p.requires_grad]  # a tied weight appears once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fast = {"fused": True} if device_type in ("cuda", "cpu") else {"foreach": True}
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **fast)


def get_lr(it: int, cfg) -> float:
    """Learning rate at iteration it: linear warmup, then a cosine down to min_lr at lr_decay_iters.

    cfg has learning_rate, min_lr, warmup_iters, lr_decay_iters and decay_lr (False: constant).
    With learning_rate 1e-3, min_lr 1e-4, warmup_iters 100, lr_decay_iters 2000 (05's CPU recipe):
    it=0 -> 1e-3 / 101; it=100 -> 1e-3 (the peak); it=1050, halfway through the cosine ->
    1e-4 + 0.5 * (1 + cos(pi / 2)) * 9e-4 = 5.5e-4; it >= 2000 -> 1e-4. Warmup matters because
    Adam's second-moment estimate is noise in the first steps, and full-size steps on it diverge.
    """
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)  # 0 -> 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


def forward_backward(model, x, y, micro_steps: int, ctx, scaler) -> torch.Tensor:
    """Accumulate in .grad the gradient of the mean loss over the batch (x, y), in micro_steps chunks.

    backward() adds into .grad, so backpropagating loss_i / micro_steps for each of the equal-sized
    chunks leaves exactly the gradient of the whole batch's mean loss (the mean of the chunk means),
    with only one chunk's activations in memory at a time. Returns the mean loss, detached: reading
    it (.item()) would make the CPU wait for the GPU, so the loop reads it only when it logs.
    """
    if x.size(0) % micro_steps:
        raise ValueError(f"a batch of {x.size(0)} rows does not split into {micro_steps} equal micro-batches")
    losses = []
    for xb, yb in zip(x.chunk(micro_steps), y.chunk(micro_steps)):
        with ctx:
            _, loss = model(xb, yb)
        loss = loss / micro_steps
        scaler.scale(loss).backward()  # fp16: scaled up so small gradients do not underflow to 0
        losses.append(loss.detach())
    return torch.stack(losses).sum()


# -----------------------------------------------------------------------------
# Model, evaluation, samples; checkpoints that continue a run exactly; the loss plot


def init_model(cfg, vocab_size: int):
    """(model, checkpoint or None) as cfg.init_from says: scratch, resume, or OpenAI's GPT-2."""
    if cfg.init_from == "resume":  # the shape of the model is the checkpoint's, whatever cfg says
        model, _, ckpt = load_checkpoint(Path(cfg.out_dir) / "ckpt.pt")
        return model, ckpt
    if cfg.init_from == "scratch":
        return GPT(GPTConfig(block_size=cfg.block_size, vocab_size=vocab_size, n_layer=cfg.n_layer,
                             n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias)), None
    pretrained = from_pretrained(cfg.init_from, cache_dir=Path(cfg.data_dir or DATA_DIR))
    # our block_size and dropout; GPT-2's shape and biases. Positions beyond block_size are cropped.
    model = GPT(replace(pretrained.config, block_size=cfg.block_size, dropout=cfg.dropout))
    state = pretrained.state_dict()
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"][: cfg.block_size]
    model.load_state_dict(state)
    return model, None


@torch.no_grad()
def estimate_loss(model, data: dict, cfg, step: int) -> dict:
    """Mean loss over cfg.eval_iters batches of each split, with dropout off.

    The batches come from their own stream (seed + 1), fresh at each evaluation (indexed by step),
    so training never sees exactly them. cfg.device and cfg.dtype must be concrete (not "auto").
    The losses are summed on the device and read once per split: one sync, not one per batch.
    """
    model.eval()
    ctx = autocast_context(torch.device(cfg.device).type, cfg.dtype)
    out = {}
    for split, tokens in data.items():
        total = torch.zeros((), device=cfg.device)
        for k in range(cfg.eval_iters):
            x, y = get_batch(tokens, cfg.batch_size, cfg.block_size, step=step * cfg.eval_iters + k,
                             seed=cfg.seed + 1, device=cfg.device)
            with ctx:
                _, loss = model(x, y)
            total += loss.float()
        out[split] = total.item() / cfg.eval_iters
    model.train()
    return out


def sample(model, tokenizer, cfg) -> str:
    """cfg.prompt continued by cfg.max_new_tokens sampled tokens, always with the same seed.

    Sampling draws random numbers; fork_rng gives it its own copy of the generator, so the training
    RNG (dropout) is untouched and a run with samples is bit-identical to one without.
    """
    idx = torch.tensor([tokenizer.encode(cfg.prompt)], dtype=torch.long, device=cfg.device)
    device = torch.device(cfg.device)
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        with autocast_context(device.type, cfg.dtype):
            out = generate(model, idx, cfg.max_new_tokens, cfg.temperature, top_k=cfg.top_k or None)
    model.train()
    return tokenizer.decode(out[0].tolist())


def rng_states() -> dict:
    """The state of every random number generator a run may draw from, for its checkpoint.

    numpy's key array is stored as a list: torch.load(weights_only=True) unpickles only plain
    Python types and tensors, and that is how checkpoints are read here (no pickled code runs).
    """
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, keys.tolist(), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict):
    """Restore what rng_states() returned: the run draws the same random numbers as if never stopped."""
    random.setstate(states["python"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"].cpu())
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])


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


def plot_losses(log_path, png_path, tokens_per_iter: int) -> bool:
    """Plot train and val loss from log.jsonl into a PNG; False if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # draw into files only, never open a window
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = [json.loads(line) for line in Path(log_path).read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([r["iter"] for r in steps], [r["loss"] for r in steps], alpha=0.4, label="train (one batch)")
    for split in ("train", "val"):
        ax.plot([r["iter"] for r in evals], [r[f"{split}_loss"] for r in evals], "o-", label=f"{split}, eval")
    ax.set(xlabel="iteration", ylabel="cross-entropy loss (nats/token)")
    to_tokens = (lambda it: it * tokens_per_iter / 1e6, lambda m: m * 1e6 / tokens_per_iter)
    ax.secondary_xaxis("top", functions=to_tokens).set_xlabel("tokens seen (millions)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return True


def diverged(what: str, value: float, iter_num: int, ckpt_path: Path, saved_at: int | None):
    """The error a NaN/inf loss raises: what happened, and that the last checkpoint is intact."""
    kept = (f"the last checkpoint, {ckpt_path} (iteration {saved_at}), is untouched: continue from it with "
            f"--init_from=resume and" if saved_at is not None else "there is no checkpoint yet; try")
    return FloatingPointError(f"{what} is {value} at iteration {iter_num}: training diverged, stopping; "
                              f"{kept} a lower --learning_rate (or --dtype=float32)")


# -----------------------------------------------------------------------------
# The training loop


def train(cfg: TrainConfig) -> dict:
    """Train as cfg says; return the final losses, the speed, and whether Ctrl-C stopped the run.

    Each iteration: every eval_interval, estimate the train/val loss and save ckpt.pt (and best.pt
    when val improved); every sample_interval, print a sample; then one optimizer step on batch
    number iter_num; every log_interval, a log line. --init_from=resume continues from ckpt.pt bit
    for bit: the same batches (a function of the step), the same dropout masks (the RNG states are
    restored), the same Adam moments; given the same device, dtype and threads.
    The result: iter_num, train_loss, val_loss, best_val_loss, ms_per_iter (median of the log
    windows), tokens_per_s, mfu (None without a known peak), interrupted (Ctrl-C).
    """
    device = pick_device(cfg.device)
    cfg = replace(cfg, device=device, dtype=pick_dtype(cfg.dtype, device))  # checkpoints say what ran
    device_type = torch.device(device).type
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if device_type == "cuda":  # TF32: fp32 matmuls on the tensor cores, with a 10-bit mantissa
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    out_dir, previous_threads = Path(cfg.out_dir), torch.get_num_threads()
    torch.set_num_threads(cfg.threads or previous_threads)
    data = {split: load_tokens(cfg.corpus_dir, split) for split in ("train", "val")}
    spec = load_meta(cfg.corpus_dir)["tokenizer"]
    tokenizer = get_tokenizer(spec)
    model, ckpt = init_model(cfg, tokenizer.n_vocab)
    model.to(device)
    optimizer = configure_optimizers(model, cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                     device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=cfg.dtype == "float16")  # off: a pass-through
    iter_num, best_val, losses, saved_at = 0, float("inf"), {}, None
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        iter_num, best_val, saved_at = ckpt["iter_num"], ckpt["best_val_loss"], ckpt["iter_num"]
        losses = {"val": ckpt["val_loss"]}
        set_rng_states(ckpt["rng"])  # last: building the model above drew random numbers
    fast_model = torch.compile(model) if cfg.compile else model  # `model` stays plain for saving
    ctx = autocast_context(device_type, cfg.dtype)

    def checkpoint() -> dict:  # the format every training stage writes (see save_checkpoint)
        return {"model": model.state_dict(), "model_args": asdict(model.config), "tokenizer": spec,
                "config": asdict(cfg), "stage": "pretrain", "iter_num": iter_num, "best_val_loss": best_val,
                "val_loss": losses.get("val"), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "rng": rng_states()}

    tokens_per_iter = cfg.batch_size * cfg.gradient_accumulation_steps * cfg.block_size
    flops_per_iter = model.flops_per_token(cfg.block_size) * tokens_per_iter
    peak = peak_flops(device, cfg.peak_flops)
    print("config:", ", ".join(f"{k}={v!r}" for k, v in asdict(cfg).items()))
    print(f"{model.num_params():,} parameters | {tokens_per_iter:,} tokens per iteration | {device} "
          f"{cfg.dtype}, {torch.get_num_threads()} threads, compile {cfg.compile}"
          + (f" | MFU against {peak / 1e12:.4g} TFLOP/s" if peak else ""))
    if ckpt is not None:
        print(f"resuming at iter {iter_num} of {cfg.max_iters} from {out_dir / 'ckpt.pt'}")
        if iter_num >= cfg.max_iters:
            print(f"nothing left to do: the run is at iter {iter_num} of max_iters={cfg.max_iters}; "
                  f"to train it longer: --init_from=resume --max_iters={iter_num + cfg.max_iters}")

    # Ctrl-C sets a flag; the loop finishes its step, saves and returns. A second Ctrl-C quits at once.
    stop = threading.Event()

    def on_sigint(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("\nCtrl-C: saving a checkpoint after this step (Ctrl-C again to quit without saving)")

    first_iter, window_ms, loss = iter_num, [], None
    with ExitStack() as cleanup:  # undone on the way out, also when an exception leaves the loop
        cleanup.callback(torch.set_num_threads, previous_threads)
        if threading.current_thread() is threading.main_thread():  # only there can signals be handled
            cleanup.callback(signal.signal, signal.SIGINT, signal.signal(signal.SIGINT, on_sigint))
        out_dir.mkdir(parents=True, exist_ok=True)
        log = cleanup.enter_context(open(out_dir / "log.jsonl", "a" if ckpt else "w"))

        def log_line(**record):  # one JSON record per line, flushed: a crash loses nothing
            log.write(json.dumps(record) + "\n")
            log.flush()

        window_start, window_iters = time.perf_counter(), 0
        while True:
            # evaluate and checkpoint (a resumed run was evaluated when it was saved)
            if (iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters) and iter_num != saved_at:
                t0 = time.perf_counter()
                losses = estimate_loss(fast_model, data, cfg, iter_num)
                for split, value in losses.items():
                    if not math.isfinite(value):
                        raise diverged(f"the {split} loss", value, iter_num, out_dir / "ckpt.pt", saved_at)
                improved = losses["val"] < best_val
                best_val = min(best_val, losses["val"])
                save_checkpoint(out_dir / "ckpt.pt", state := checkpoint())
                if improved:
                    save_checkpoint(out_dir / "best.pt", state)
                saved_at = iter_num
                print(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                      f"{' (best, saved best.pt)' if improved else ''} | {time.perf_counter() - t0:.1f} s")
                log_line(iter=iter_num, train_loss=losses["train"], val_loss=losses["val"])
                window_start, window_iters = time.perf_counter(), 0  # the step timing leaves eval out
            if (cfg.sample_interval and cfg.max_new_tokens and iter_num % cfg.sample_interval == 0
                    and first_iter < iter_num < cfg.max_iters):
                print(f"--- sample at iter {iter_num} ---\n{sample(model, tokenizer, cfg)}\n---")
                window_start, window_iters = time.perf_counter(), 0
            if iter_num >= cfg.max_iters:
                break
            if stop.is_set():
                if saved_at != iter_num:  # else the checkpoint holds this state already
                    if not math.isfinite(lossf := loss.item()):
                        raise diverged("the loss", lossf, iter_num, out_dir / "ckpt.pt", saved_at)
                    save_checkpoint(out_dir / "ckpt.pt", checkpoint())
                print(f"saved {out_dir / 'ckpt.pt'} at iteration {iter_num}; continue: --init_from=resume")
                break

            # one optimizer step: the batch is a pure function of (seed, iter_num), see get_batch
            lr = get_lr(iter_num, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = get_batch(data["train"], cfg.batch_size * cfg.gradient_accumulation_steps,
                             cfg.block_size, step=iter_num, seed=cfg.seed, device=device)
            loss = forward_backward(fast_model, x, y, cfg.gradient_accumulation_steps, ctx, scaler)
            scaler.unscale_(optimizer)  # clip the true gradients, not fp16's scaled ones (no-op otherwise)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            scaler.step(optimizer)  # fp16: skips the step if a gradient overflowed
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            iter_num += 1
            window_iters += 1

            if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
                lossf, norm = loss.item(), grad_norm.item()  # the one wait for the GPU, once per log line
                if not math.isfinite(lossf):
                    raise diverged("the loss", lossf, iter_num, out_dir / "ckpt.pt", saved_at)
                dt = (time.perf_counter() - window_start) / window_iters
                window_ms.append(1000 * dt)
                mfu = f" | MFU {flops_per_iter / dt / peak:.1%}" if peak else ""
                print(f"iter {iter_num}/{cfg.max_iters} | loss {lossf:.4f} | lr {lr:.2e} | grad norm "
                      f"{norm:.3f} | {1000 * dt:.1f} ms | {tokens_per_iter / dt:,.0f} tok/s{mfu}")
                log_line(iter=iter_num, loss=lossf, lr=lr, grad_norm=norm, ms=1000 * dt,
                         tokens_per_s=tokens_per_iter / dt)
                window_start, window_iters = time.perf_counter(), 0

        if not stop.is_set() and iter_num > first_iter:
            if plot_losses(out_dir / "log.jsonl", out_dir / "loss.png", tokens_per_iter):
                print(f"loss curve: {out_dir / 'loss.png'}")
            if cfg.max_new_tokens:
                print(f"--- sample at iter {iter_num} ---\n{sample(model, tokenizer, cfg)}\n---")
    ms = sorted(window_ms)[len(window_ms) // 2] if window_ms else float("nan")  # median: robust to hiccups
    return {"iter_num": iter_num, "train_loss": losses.get("train"), "val_loss": losses.get("val"),
            "best_val_loss": best_val, "ms_per_iter": ms, "tokens_per_s": 1000 * tokens_per_iter / ms,
            "mfu": flops_per_iter / (ms / 1000) / peak if peak else None, "interrupted": stop.is_set()}


def main(argv=None):
    """Train from the command line. --init_from=resume continues the run in out_dir: every setting
    not given on this command line is the checkpoint's (the device excepted: a run may move), so
    `--init_from=resume --out_dir=...` alone continues any run, and `--max_iters=...` extends it."""
    argv = sys.argv[1:] if argv is None else argv
    peek = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    peek.add_argument("--init_from")
    peek.add_argument("--out_dir", default=TrainConfig.out_dir)
    first, _ = peek.parse_known_args(argv)
    try:
        saved = saved_run(first.out_dir)["config"] if first.init_from == "resume" else {}
    except (ValueError, FileNotFoundError):
        saved = {}  # parse_config reports it
    given = {a[2:].partition("=")[0] for a in argv if a.startswith("--")} | {"device"}
    names = {f.name for f in fields(TrainConfig)} - given
    # the checkpoint's settings first, then the flags given now, which override them
    cfg = parse_config(TrainConfig, [f"--{k}={v}" for k, v in saved.items() if k in names] + argv)
    return train(cfg)


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


# copied from 02_dataloader.py: load_meta
def load_meta(corpus_dir) -> dict:
    """meta.json of a prepared corpus, data_dir/<dataset>-<tokenizer>/ as 02_dataloader.py writes it."""
    path = Path(corpus_dir) / "meta.json"
    if not path.exists():
        dataset, _, tokenizer = Path(corpus_dir).name.rpartition("-")
        raise FileNotFoundError(f"{path} not found; prepare it with: python 02_dataloader.py --dataset={dataset} "
                                f"--tokenizers={tokenizer} --data_dir={Path(corpus_dir).parent} "
                                "(and --text_file=FILE if it is your own text)")
    return json.loads(path.read_text(encoding="utf-8"))


# copied from 02_dataloader.py: load_tokens
def load_tokens(corpus_dir, split: str) -> np.memmap:
    """The token ids of split ("train" or "val") as a read-only np.memmap.

    A raw .bin has no header, so the same bytes read as uint16 or uint32 give different (wrong)
    ids without any error. The byte size must equal token count x dtype size from meta.json;
    if it does not, we refuse rather than train on garbage.
    """
    if split not in ("train", "val"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 'val'")
    meta = load_meta(corpus_dir)
    path = Path(corpus_dir) / f"{split}.bin"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; prepare the corpus again")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise ValueError(f"{path.parent / 'meta.json'}: dtype {meta['dtype']!r} is not uint16 or uint32; "
                         "prepare the corpus again")
    dtype = np.dtype(meta["dtype"])
    if meta["n_vocab"] > np.iinfo(dtype).max + 1:
        raise ValueError(f"{path.parent / 'meta.json'}: n_vocab {meta['n_vocab']} does not fit in "
                         f"{dtype.name}; prepare the corpus again")
    n_tokens, size = meta[f"{split}_tokens"], path.stat().st_size
    if size != n_tokens * dtype.itemsize:
        other = np.dtype(np.uint32 if dtype == np.uint16 else np.uint16)
        hint = (f"; it looks written as {other.name}, not {dtype.name}" if size == n_tokens * other.itemsize
                else "; it is truncated or from another run")
        raise ValueError(f"{path} has {size} bytes but meta.json says {n_tokens} tokens of {dtype.name} "
                         f"= {n_tokens * dtype.itemsize} bytes{hint}; prepare the corpus again")
    return np.memmap(path, dtype=dtype, mode="r")


# copied from 02_dataloader.py: _check_window
def _check_window():
    pass


# copied from 02_dataloader.py: _check_ranks
def _check_ranks():
    pass


# copied from 02_dataloader.py: get_batch
def get_batch(data, batch_size: int, block_size: int, step: int, seed: int = 0,
              rank: int = 0, world_size: int = 1, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s share of global batch number `step`: x, y int64 of shape (B/W, T).

    The global batch is batch_size random windows whose start positions come from
    np.random.default_rng([seed, step]); every rank draws the same starts and keeps rows
    [rank*B/W, (rank+1)*B/W). So the batch is a pure function of (seed, step): no loader state
    to checkpoint, a resumed run sees exactly the batches it would have seen, and W ranks
    together see exactly the batch of one process.

    y is x shifted by one: y[b, t] = data[i_b + t + 1] is the target for the prefix ending at
    x[b, t]. Example with data = [10, 11, 12, 13], block_size = 2 and start i = 1:
    x = [11, 12], y = [12, 13].
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if len(data) < block_size + 1:
        raise ValueError(f"the data has {len(data)} tokens but one (x, y) window needs block_size + 1 "
                         f"= {block_size + 1}; use a smaller block_size or more text")
    if world_size <= 0 or batch_size <= 0 or batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} does not split across {world_size} ranks; "
                         "use a positive multiple of world_size")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1} (world_size {world_size})")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(data) - block_size, size=batch_size)  # last start: len - T - 1
    per_rank = batch_size // world_size
    starts = starts[rank * per_rank:(rank + 1) * per_rank]
    # one fancy-indexing read of (B, T+1) tokens, then x and y as contiguous copies: a strided view
    # would make .to("cuda", non_blocking=True) stage a pageable copy first (and block), and
    # .view(-1) on it fails
    window = data[starts[:, None] + np.arange(block_size + 1)].astype(np.int64)  # (B, T+1)
    x = torch.from_numpy(np.ascontiguousarray(window[:, :-1]))  # (B, T)
    y = torch.from_numpy(np.ascontiguousarray(window[:, 1:]))  # (B, T)
    if torch.device(device).type == "cuda":  # pinned memory lets the copy overlap with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


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


# copied from 04_gpt.py: generate
@torch.no_grad()
def generate(model, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None):
    """Append max_new_tokens tokens to idx (B, T), one at a time, each fed back as input.

    temperature=0 is greedy (argmax); otherwise logits / temperature are sampled, < 1 sharper,
    > 1 flatter; top_k keeps only the k most likely tokens. The context is cropped to the last
    block_size tokens. Call model.eval() first to turn dropout off. (No KV cache: each step
    reruns the whole context; 09 adds the cache.)
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be a positive integer or None, got {top_k}")
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.config.block_size :])
        logits = logits[:, -1, :]  # (B, vocab_size): only the last position predicts the next token
        if temperature == 0:
            idx_next = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
                logits = logits.masked_fill(logits < kth, float("-inf"))
            idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)  # (B, 1)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


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


if __name__ == "__main__":
    main()
