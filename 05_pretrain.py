"""Stage 5: pretraining, the project's main job. A GPT learns to write Shakespeare on a laptop CPU.

04 built the model; here it learns, from scratch, on the token files 02 prepared. Each iteration
takes a batch of random windows of the corpus, computes the next-token loss, backpropagates, and
takes one AdamW step. Around that core sits what makes a run trustworthy and fast enough to use:
AdamW with weight decay on the matrices only; warmup then cosine decay of the learning rate;
gradient clipping and accumulation; on CUDA bf16 autocast (fp16 with a gradient scaler on GPUs
without native bf16), TF32 and torch.compile, on CPU plain fp32; checkpoints written atomically
with everything needed to continue a run bit for bit; Ctrl-C that saves; a NaN that stops the run
with the last checkpoint intact; a log line (loss, lr, grad norm, ms, tokens/s, MFU on GPUs of
known peak), log.jsonl, a loss plot and text samples.

References: karpathy/nanoGPT train.py (its names, its Shakespeare recipes: val loss ~1.88 on CPU
after 2000 iterations, ~1.47 on one GPU); Loshchilov & Hutter 2019 (AdamW); Loshchilov & Hutter
2017 (SGDR: cosine schedule); Goyal et al. 2017 (warmup); Micikevicius et al. 2018 (loss scaling).

Run it:
  python 02_dataloader.py --tokenizers=char              # once: the token files this stage reads
  python 05_pretrain.py                                  # nanoGPT's CPU recipe: 0.8M params, 2000 iters
  python 05_pretrain.py --preset=shakespeare-char-gpu    # nanoGPT's GPU recipe: 10.7M params, one GPU
  python 05_pretrain.py --init_from=resume               # continue the run in out_dir (--max_iters=N: longer)
  python 05_pretrain.py --tokenizer=gpt2 --out_dir=out/shakespeare-gpt2    # GPT-2 tokens (02 prepares)
Every setting, with its default: python 05_pretrain.py --help. Several GPUs: 06_distributed.py (torchrun).
"""

import argparse
import functools
import json
import math
import os
import pickle
import signal
import sys
import threading
import time
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Annotated, ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DATA_DIR = Path(__file__).resolve().parent / "data"

# -----------------------------------------------------------------------------
# Settings: nanoGPT's names, each a --field=value flag (04's parse_config); checked before any work.


@dataclass
class TrainConfig:
    """Pretrain a GPT on a text corpus. Defaults: nanoGPT's CPU recipe for Shakespeare-char."""

    PRESETS: ClassVar[dict[str, dict]] = {
        # nanoGPT's README, "I only have a macbook": 0.8M parameters, val loss ~1.88 after 2000 iters
        "shakespeare-char-cpu": dict(batch_size=12, block_size=64, n_layer=4, n_head=4, n_embd=128,
                                     dropout=0.0, max_iters=2000, lr_decay_iters=2000, eval_iters=20),
        # nanoGPT's config/train_shakespeare_char.py: 10.7M parameters, val loss ~1.47 after 5000 iters
        "shakespeare-char-gpu": dict(batch_size=64, block_size=256, n_layer=6, n_head=6, n_embd=384,
                                     dropout=0.2, max_iters=5000, lr_decay_iters=5000, eval_iters=200,
                                     compile=True),
    }  # fmt: skip

    preset: Annotated[str, "a recipe of PRESETS; the flags given override it"] = "shakespeare-char-cpu"
    # data, as 02 prepared it: data_dir/<dataset>-<tokenizer>/{train.bin, val.bin, meta.json}
    dataset: Annotated[str, "the corpus 02 prepared"] = "tinyshakespeare"
    tokenizer: Annotated[str, "char (one token per character) or gpt2 (OpenAI's BPE, via tiktoken)"] = "char"
    data_dir: Annotated[str, "where 02 put the prepared corpora; '' = data/ next to this script"] = ""
    # model (04's GPTConfig)
    n_layer: Annotated[int, "transformer blocks"] = 4
    n_head: Annotated[int, "attention heads per block"] = 4
    n_embd: Annotated[int, "width of the residual stream"] = 128
    block_size: Annotated[int, "context length in tokens"] = 64
    dropout: Annotated[float, "0 for short runs on enough data; 0.2 in the GPU recipe, which overfits"] = 0.0
    bias: Annotated[bool, "biases in Linear and LayerNorm; nanoGPT trains without"] = False
    init_from: Annotated[str, "scratch, or resume: continue the run in out_dir (ckpt.pt)"] = "scratch"
    # optimization
    batch_size: Annotated[int, "sequences per micro-batch"] = 12
    gradient_accumulation_steps: Annotated[int, "micro-batches per optimizer step"] = 1
    max_iters: Annotated[int, "optimizer steps in total"] = 2000
    learning_rate: Annotated[float, "peak learning rate, reached after warmup"] = 1e-3
    weight_decay: Annotated[float, "AdamW's, on the 2-D weights only (see configure_optimizers)"] = 0.1
    beta1: Annotated[float, "AdamW's momentum"] = 0.9
    beta2: Annotated[float, "AdamW's second-moment decay (nanoGPT: 0.99 for small batches)"] = 0.99
    grad_clip: Annotated[float, "clip the global gradient norm to this; 0 = no clipping"] = 1.0
    decay_lr: Annotated[bool, "warmup + cosine decay; false = constant learning_rate"] = True
    warmup_iters: Annotated[int, "linear warmup steps"] = 100
    lr_decay_iters: Annotated[int, "the cosine reaches min_lr here (usually = max_iters)"] = 2000
    min_lr: Annotated[float, "~learning_rate / 10 (Chinchilla)"] = 1e-4
    # evaluation, logging, checkpoints, samples
    out_dir: Annotated[str, "ckpt.pt, best.pt, log.jsonl, loss.png"] = "out/shakespeare-char"
    overwrite: Annotated[bool, "start afresh even if out_dir holds a checkpoint (it is replaced)"] = False
    eval_interval: Annotated[int, "val loss and ckpt.pt (best.pt if val improved) every this many"] = 250
    eval_iters: Annotated[int, "batches per split in an evaluation"] = 20
    log_interval: Annotated[int, "a log line every this many iterations"] = 10
    sample_interval: Annotated[int, "a text sample every this many iterations (0 = only at the end)"] = 500
    max_new_tokens: Annotated[int, "tokens per sample (0 = no samples)"] = 200
    prompt: Annotated[str, "samples continue this text"] = "\n"
    temperature: Annotated[float, "sampling temperature: < 1 sharper, > 1 more random"] = 0.8
    top_k: Annotated[int, "sample among the k most likely tokens (0 = among all)"] = 200
    # system
    device: Annotated[str, "auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps"] = "auto"
    dtype: Annotated[str, "auto (bf16 or fp16 on CUDA, fp32 elsewhere), float32, bfloat16, float16"] = "auto"
    compile: Annotated[bool, "torch.compile the model: slower start, faster steps (on GPUs)"] = False
    threads: Annotated[int, "CPU threads; 0 = PyTorch's default"] = 0
    peak_flops: Annotated[float, "the FLOP/s to measure MFU against; 0 = a known GPU's datasheet peak"] = 0.0
    seed: Annotated[int, "seeds the weights, the batches and dropout"] = 1337

    def __post_init__(self):  # every check names its fix; parse_config prints it as one `error:` line
        self.corpus_dir = Path(self.data_dir or DATA_DIR) / f"{self.dataset}-{self.tokenizer}"
        for name, allowed in {"tokenizer": ("char", "gpt2"), "init_from": ("scratch", "resume")}.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name}={getattr(self, name)!r} is not valid; use {', '.join(allowed)}")
        positive = ("batch_size", "block_size", "gradient_accumulation_steps", "eval_interval", "eval_iters",
                    "log_interval")
        for name in (f.name for f in fields(self) if f.type.__origin__ in (int, float) and f.name != "seed"):
            if getattr(self, name) < (least := int(name in positive)):
                raise ValueError(f"--{name} must be at least {least}, got {getattr(self, name)}")
        if self.max_new_tokens and not self.prompt:
            raise ValueError("--prompt is empty: samples continue at least one token (or --max_new_tokens=0)")
        if self.decay_lr and self.lr_decay_iters <= self.warmup_iters:
            raise ValueError(f"--lr_decay_iters={self.lr_decay_iters} must exceed --warmup_iters="
                             f"{self.warmup_iters}; usually lr_decay_iters = max_iters (or --decay_lr=false)")
        pick_dtype(self.dtype, pick_device(self.device))  # both name the fix in their ValueError
        ckpt_path = Path(self.out_dir) / "ckpt.pt"
        if self.init_from == "resume":  # the run's settings come from its checkpoint: it must be one
            ckpt, shape = load_checkpoint(ckpt_path)[2], ("n_layer", "n_head", "n_embd", "block_size", "bias")
            if ckpt.get("optimizer") is None or any(getattr(self, k) != ckpt["model_args"][k] for k in shape):
                raise ValueError(f"{ckpt_path} cannot be resumed so: it holds no optimizer state (07, 08) or "
                                 f"its model is not {', '.join(f'{k}={getattr(self, k)}' for k in shape)}")
        elif ckpt_path.exists() and not self.overwrite:
            raise ValueError(f"{ckpt_path} exists and a new run would overwrite it; continue that run with "
                             f"--init_from=resume, train into another --out_dir, or replace it: --overwrite")
        meta = load_meta(self.corpus_dir)  # if 02 has not prepared it: the 02 command that does
        sizes = [len(load_tokens(self.corpus_dir, split)) for split in ("train", "val")]  # checks the files
        if min(sizes) <= self.block_size:
            raise ValueError(f"{self.corpus_dir} has {sizes[0]} train and {sizes[1]} val tokens, too few "
                             f"for --block_size={self.block_size}; use a smaller one")
        if self.init_from == "scratch":
            self.model_config(meta["n_vocab"])  # GPTConfig checks the shape (n_embd % n_head, ...)

    def model_config(self, vocab_size: int) -> "GPTConfig":
        return GPTConfig(block_size=self.block_size, vocab_size=vocab_size, n_layer=self.n_layer,
                         n_head=self.n_head, n_embd=self.n_embd, dropout=self.dropout, bias=self.bias)


# -----------------------------------------------------------------------------
# One optimizer step: AdamW's groups, the learning-rate schedule, gradient accumulation.
#
# Weight decay shrinks weights toward zero at every step (decoupled from the gradient: AdamW, not an
# L2 term in the loss). It is meant for the matrices that multiply activations, Linear weights and
# embeddings. Biases and LayerNorm gains are 1-D shifts and scales: decaying them regularizes
# nothing and drags the gains toward 0, toward switching their layer off. Practice differs on the
# embeddings (minGPT exempted them); we follow nanoGPT: decay iff p.dim() >= 2. fused=True updates
# all tensors in one kernel (CUDA, and CPU since PyTorch 2.4: several times faster than foreach).


def configure_optimizers(model, weight_decay: float, learning_rate: float, betas, device_type: str):
    """AdamW with weight decay on the 2-D tensors only; frozen parameters (LoRA) are left out."""
    params = [p for p in model.parameters() if p.requires_grad]  # a tied weight appears once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fast = {"fused": True} if device_type in ("cuda", "cpu") else {"foreach": True}
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **fast)


# With learning_rate 1e-3, min_lr 1e-4, warmup_iters 100, lr_decay_iters 2000 (the CPU recipe):
# it=0 -> 1e-3 / 101; it=100 -> 1e-3 (the peak); it=1050, halfway through the cosine ->
# 1e-4 + 0.5 * (1 + cos(pi / 2)) * 9e-4 = 5.5e-4; it >= 2000 -> 1e-4. Warmup matters because
# Adam's second-moment estimate is noise in the first steps, and full-size steps on it diverge.
def get_lr(it: int, cfg) -> float:
    """Linear warmup to cfg.learning_rate, then a cosine down to cfg.min_lr at cfg.lr_decay_iters."""
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
    """Accumulate in .grad the gradient of the batch's mean loss, in micro_steps chunks: backward()
    adds into .grad, so loss_i / micro_steps per equal chunk sums to the whole batch's gradient, with
    one chunk's activations in memory at a time. The mean loss stays on the device (.item() waits)."""
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
# Evaluation and samples


@torch.no_grad()
def estimate_loss(model, data: dict, cfg, step: int) -> dict:
    """Mean loss over eval_iters x batch_size windows per split from their own stream (seed + 1), dropout
    off; four batches per forward pass: without gradients it fits, and small models are bound by ops."""
    model.eval()
    out = {}
    for split, ids in data.items():
        x, y = get_batch(ids, cfg.eval_iters * cfg.batch_size, cfg.block_size, step=step, seed=cfg.seed + 1)
        total = torch.zeros((), device=cfg.device)
        for xb, yb in zip(x.split(4 * cfg.batch_size), y.split(4 * cfg.batch_size)):
            with autocast_context(torch.device(cfg.device).type, cfg.dtype):
                total += model(xb.to(cfg.device), yb.to(cfg.device))[1].float() * len(xb)
        out[split] = total.item() / len(x)
    model.train()
    return out


def sample(model, tokenizer, cfg) -> str:
    """cfg.prompt continued by cfg.max_new_tokens sampled tokens, always with the same seed. fork_rng:
    sampling gets its own random generator, so a run with samples is bit-identical to one without."""
    device, idx = torch.device(cfg.device), torch.tensor([tokenizer.encode(cfg.prompt)], device=cfg.device)
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        with autocast_context(device.type, cfg.dtype):
            out = generate(model, idx, cfg.max_new_tokens, cfg.temperature, top_k=cfg.top_k or None)
    model.train()
    return tokenizer.decode(out[0].tolist())


# -----------------------------------------------------------------------------
# Checkpoints that continue a run exactly. A checkpoint holds the weights, the optimizer (Adam's
# moments), the gradient scaler, the settings, the step, and torch's random generators, so that a
# resumed run draws the same dropout masks (the batches need no state: 02's get_batch is a function
# of the step, and nothing else draws random numbers). The format every training stage writes:
# {"model", "model_args", "tokenizer", "config", "stage" (pretrain, distributed, finetune, dpo),
# "iter_num", "best_val_loss", "val_loss" (last measured), "optimizer", "scaler", "rng"}. Read with
# weights_only=True (no pickled code runs); written to a temporary file renamed over the old one.


def rng_states() -> dict:
    """The states of torch's random generators (CPU and every GPU): dropout draws from them."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict):
    """Restore what rng_states() returned (to as many GPUs as this machine has; each keeps its own)."""
    torch.set_rng_state(states["torch"].cpu())
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"][: torch.cuda.device_count()]])


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


def plot_losses(log_path, png_path, tokens_per_iter: int) -> bool:
    """Plot train and val loss from log.jsonl into a PNG; False if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # draw into files only, never open a window
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = [json.loads(line) for line in Path(log_path).read_text().splitlines()]
    steps, evals = [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([r["iter"] for r in steps], [r["loss"] for r in steps], alpha=0.4, label="train (one batch)")
    for split in ("train", "val"):
        ax.plot([r["iter"] for r in evals], [r[f"{split}_loss"] for r in evals], "o-", label=f"{split}, eval")
    ax.set(xlabel=f"iteration ({tokens_per_iter:,} tokens each)", ylabel="cross-entropy loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return True


# -----------------------------------------------------------------------------
# The training loop


def train(cfg: TrainConfig) -> dict:
    """Train as cfg says: every eval_interval the train/val loss and ckpt.pt (best.pt if val improved),
    every iteration one optimizer step on batch number iter_num, every log_interval a log line.
    Returns iter_num, the losses, ms_per_iter (median), tokens_per_s, mfu, interrupted (Ctrl-C)."""
    device = pick_device(cfg.device)
    cfg = replace(cfg, device=device, dtype=pick_dtype(cfg.dtype, device))  # checkpoints say what ran
    device_type = torch.device(device).type
    torch.manual_seed(cfg.seed)
    if device_type == "cuda":  # TF32: fp32 matmuls on the tensor cores, with a 10-bit mantissa
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    out_dir, previous_threads = Path(cfg.out_dir), torch.get_num_threads()
    ckpt_path = out_dir / "ckpt.pt"
    torch.set_num_threads(cfg.threads or previous_threads)

    data = {split: load_tokens(cfg.corpus_dir, split) for split in ("train", "val")}
    tokenizer = get_tokenizer(spec := load_meta(cfg.corpus_dir)["tokenizer"])  # spec: saved in checkpoints
    if cfg.init_from == "resume":  # the shape of the model is the checkpoint's
        model, _, ckpt = load_checkpoint(ckpt_path)
    else:
        model, ckpt = GPT(cfg.model_config(tokenizer.n_vocab)), None
    model.to(device)
    optimizer = configure_optimizers(model, cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                     device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=cfg.dtype == "float16")  # off: a pass-through
    iter_num, best_val, losses, saved_at = 0, float("inf"), {}, None
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"] or scaler.state_dict())  # {}: saved without fp16, start anew
        iter_num, best_val, saved_at = ckpt["iter_num"], ckpt["best_val_loss"], ckpt["iter_num"]
        losses = {"val": ckpt["val_loss"]}
        set_rng_states(ckpt["rng"])  # last: building the model above drew random numbers
    fast_model = torch.compile(model, dynamic=False) if cfg.compile else model  # `model`: plain, for saving
    ctx = autocast_context(device_type, cfg.dtype)

    def checkpoint() -> dict:  # the format every training stage writes
        return {"model": model.state_dict(), "model_args": asdict(model.config), "tokenizer": spec,
                "config": asdict(cfg), "stage": "pretrain", "iter_num": iter_num, "best_val_loss": best_val,
                "val_loss": losses.get("val"), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "rng": rng_states()}

    def check_finite(what: str, value: float):  # a NaN stops the run; the last checkpoint is intact
        if not math.isfinite(value):
            kept = "" if saved_at is None else f"; {ckpt_path} (iter {saved_at}) intact: --init_from=resume"
            raise FloatingPointError(f"{what} is {value} at iteration {iter_num}: training diverged{kept}; "
                                     f"try a lower --learning_rate (or --dtype=float32)")

    tokens_per_iter = cfg.batch_size * cfg.gradient_accumulation_steps * cfg.block_size
    flops_per_iter = flops_per_token(model, cfg.block_size) * tokens_per_iter
    peak = peak_flops(device, cfg.peak_flops)
    print("config:", ", ".join(f"{k}={v!r}" for k, v in asdict(cfg).items()))
    print(f"{model.num_params():,} parameters | {tokens_per_iter:,} tokens per iteration | {device} "
          f"{cfg.dtype}, {torch.get_num_threads()} threads, compile {cfg.compile}"
          + (f" | MFU against {peak / 1e12:.4g} TFLOP/s" if peak else ""))
    if ckpt is not None:
        print(f"resuming at iter {iter_num} of {cfg.max_iters} from {ckpt_path}" + (
            f"; nothing left to do (to train longer: --init_from=resume --max_iters={2 * iter_num})"
            if iter_num >= cfg.max_iters else ""))

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
        log_file = cleanup.enter_context(open(out_dir / "log.jsonl", "a" if ckpt else "w"))
        log = functools.partial(print, file=log_file, flush=True)  # flushed: a crash loses nothing
        window_start, window_iters = time.perf_counter(), 0
        while True:
            # evaluate and checkpoint (a resumed run was evaluated when it was saved)
            if (iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters) and iter_num != saved_at:
                losses = estimate_loss(fast_model, data, cfg, iter_num)
                for split, value in losses.items():
                    check_finite(f"the {split} loss", value)
                improved, best_val = losses["val"] < best_val, min(best_val, losses["val"])
                save_checkpoint(ckpt_path, state := checkpoint())
                if improved:
                    save_checkpoint(out_dir / "best.pt", state)
                saved_at = iter_num
                print(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                      f"{' (best, saved best.pt)' if improved else ''}")
                log(json.dumps(dict(iter=iter_num, train_loss=losses["train"], val_loss=losses["val"])))
                window_start, window_iters = time.perf_counter(), 0  # the step timing leaves eval out
            if (cfg.sample_interval and cfg.max_new_tokens and iter_num % cfg.sample_interval == 0
                    and first_iter < iter_num < cfg.max_iters):
                print(f"--- sample at iter {iter_num} ---\n{sample(model, tokenizer, cfg)}\n---")
                window_start, window_iters = time.perf_counter(), 0
            if iter_num >= cfg.max_iters:
                break
            if stop.is_set():
                if saved_at != iter_num:  # else the checkpoint holds this state already
                    check_finite("the loss", loss.item())
                    save_checkpoint(ckpt_path, checkpoint())
                print(f"saved {ckpt_path} at iteration {iter_num}; continue: --init_from=resume")
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
            iter_num, window_iters = iter_num + 1, window_iters + 1

            if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
                lossf, norm = loss.item(), grad_norm.item()  # the one wait for the GPU, once per log line
                check_finite("the loss", lossf)
                dt = (time.perf_counter() - window_start) / window_iters
                window_ms.append(1000 * dt)
                mfu = f" | MFU {flops_per_iter / dt / peak:.1%}" if peak else ""
                print(f"iter {iter_num}/{cfg.max_iters} | loss {lossf:.4f} | lr {lr:.2e} | grad norm "
                      f"{norm:.3f} | {1000 * dt:.1f} ms | {tokens_per_iter / dt:,.0f} tok/s{mfu} | "
                      f"~{(cfg.max_iters - iter_num) * dt:.0f} s left")
                log(json.dumps(dict(iter=iter_num, loss=lossf, lr=lr, grad_norm=norm, ms=1000 * dt)))
                window_start, window_iters = time.perf_counter(), 0

        if not stop.is_set() and iter_num > first_iter:
            if plot_losses(out_dir / "log.jsonl", out_dir / "loss.png", tokens_per_iter):
                print(f"loss curve: {out_dir / 'loss.png'}")
            else:
                print("no loss curve: matplotlib is not installed (pip install matplotlib)")
            if cfg.max_new_tokens:
                print(f"--- sample at iter {iter_num} ---\n{sample(model, tokenizer, cfg)}\n---")
    ms = sorted(window_ms)[len(window_ms) // 2] if window_ms else float("nan")  # median: robust to hiccups
    return {"iter_num": iter_num, "train_loss": losses.get("train"), "val_loss": losses.get("val"),
            "best_val_loss": best_val, "ms_per_iter": ms, "tokens_per_s": 1000 * tokens_per_iter / ms,
            "mfu": flops_per_iter / (ms / 1000) / peak if peak else None, "interrupted": stop.is_set()}


def main(argv=None):
    """Train from the command line. --init_from=resume takes every setting not given on the command line
    from the checkpoint (the device excepted: a run may move), so --max_iters=... alone extends a run."""
    argv = sys.argv[1:] if argv is None else argv
    peek = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    peek.add_argument("--init_from")
    peek.add_argument("--out_dir", default=TrainConfig.out_dir)
    first, saved = peek.parse_known_args(argv)[0], {}
    try:
        if first.init_from == "resume":
            saved = load_checkpoint(Path(first.out_dir) / "ckpt.pt")[2]["config"]
    except (ValueError, FileNotFoundError):
        pass  # parse_config reports it, as one line
    keep = {f.name for f in fields(TrainConfig)} - {a[2:].partition("=")[0] for a in argv} - {"device"}
    # the checkpoint's settings first, then the flags given now, which override them
    return train(parse_config(TrainConfig, [f"--{k}={v}" for k, v in saved.items() if k in keep] + argv))


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


# copied from 02_dataloader.py: load_meta
def load_meta(corpus_dir) -> dict:
    """meta.json of a corpus that 02_dataloader.py prepared in data_dir/<dataset>-<tokenizer>/."""
    path, (dataset, _, tokenizer) = Path(corpus_dir) / "meta.json", Path(corpus_dir).name.rpartition("-")
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; prepare it with: python 02_dataloader.py --dataset="
                                f"{dataset} --tokenizers={tokenizer} --data_dir={path.parent.parent} "
                                "(and --text_file=FILE if it is your own text)")
    return json.loads(path.read_text(encoding="utf-8"))


# copied from 02_dataloader.py: load_tokens
def load_tokens(corpus_dir, split: str) -> np.memmap:
    """The token ids of split ("train" or "val") as a read-only np.memmap, checked against meta.json."""
    if split not in ("train", "val"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 'val'")
    meta, path = load_meta(corpus_dir), Path(corpus_dir) / f"{split}.bin"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; prepare the corpus again")
    if meta["dtype"] not in ("uint16", "uint32") or meta["n_vocab"] > np.iinfo(meta["dtype"]).max + 1:
        raise ValueError(f"{path.parent / 'meta.json'}: n_vocab {meta['n_vocab']} does not fit in "
                         f"{meta['dtype']} (token files are uint16 or uint32); prepare the corpus again")
    dtype, n_tokens, size = np.dtype(meta["dtype"]), meta[f"{split}_tokens"], path.stat().st_size
    if size != n_tokens * dtype.itemsize:
        other = np.dtype(np.uint32 if dtype == np.uint16 else np.uint16)
        hint = (f"it looks written as {other}, not {dtype}" if size == n_tokens * other.itemsize
                else "it is truncated or from another run")
        raise ValueError(f"{path} has {size} bytes but meta.json says {n_tokens} tokens of {dtype} "
                         f"= {n_tokens * dtype.itemsize} bytes; {hint}; prepare the corpus again")
    return np.memmap(path, dtype=dtype, mode="r")


# copied from 02_dataloader.py: get_batch
def get_batch(data, batch_size: int, block_size: int, step: int, seed: int = 0,
              rank: int = 0, world_size: int = 1, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Rank's rows of global batch number step, a pure function of (seed, step): x, y (B // world_size, T)."""
    if not 0 < block_size < len(data):
        raise ValueError(f"block_size must be positive, got {block_size}" if block_size <= 0 else
                         f"the data has {len(data)} tokens but one (x, y) window needs block_size + 1 "
                         f"= {block_size + 1}; use a smaller block_size or more text")
    if world_size <= 0 or batch_size <= 0 or batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} does not split across {world_size} ranks; "
                         "use a positive multiple of world_size")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1} (world_size {world_size})")
    per_rank = batch_size // world_size
    starts = np.random.default_rng([seed, step]).integers(0, len(data) - block_size, size=batch_size)
    starts = starts[rank * per_rank:(rank + 1) * per_rank]  # this rank's rows of the global batch
    window = data[starts[:, None] + np.arange(block_size + 1)].astype(np.int64)  # (B, T+1)
    x, y = (torch.from_numpy(np.ascontiguousarray(w)) for w in (window[:, :-1], window[:, 1:]))  # (B, T)
    if torch.device(device).type == "cuda":  # pinned memory lets the copy overlap with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


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


# copied from 04_gpt.py: flops_per_token
def flops_per_token(model: GPT, seq_len: int | None = None) -> int:
    """Training FLOPs per token at context seq_len: 6N (forward + backward) + attention's 12 L T C."""
    T, config = model.config.block_size if seq_len is None else seq_len, model.config
    return 6 * model.num_params(non_embedding=True) + 12 * config.n_layer * T * config.n_embd


# copied from 04_gpt.py: generate
@torch.no_grad()
def generate(model, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None):
    """Append max_new_tokens tokens to idx (B, T); temperature 0 = greedy, top_k = sample the k likeliest."""
    if temperature < 0 or (top_k is not None and top_k <= 0):
        raise ValueError(f"need temperature >= 0 (0 = greedy) and top_k a positive integer or None, "
                         f"got temperature={temperature}, top_k={top_k}")
    for _ in range(max_new_tokens):
        logits = model(idx[:, -model.config.block_size :])[0][:, -1, :]  # (B, vocab_size): the last position
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


# copied from 04_gpt.py: peak_flops
def peak_flops(device: str, override: float = 0) -> float | None:
    """The FLOP/s to measure MFU against: override if > 0, a known GPU's datasheet peak, else None."""
    peaks = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}
    if override > 0 or torch.device(device).type != "cuda":
        return override or None
    name = torch.cuda.get_device_name(device)
    return next((flops for gpu, flops in peaks.items() if gpu in name), None)


if __name__ == "__main__":
    main()
