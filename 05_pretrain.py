"""Stage 5: pretraining, the project's main job. A GPT learns to write Shakespeare on a laptop CPU.

04 built the model; here it learns, from scratch, on 02's token files. Each iteration takes a batch
of random windows of the corpus, computes the next-token loss, backpropagates, and takes one AdamW
step. Around that core, what makes a run trustworthy and fast enough: AdamW with weight decay on the
matrices only; warmup then cosine decay of the learning rate; gradient clipping and accumulation; on
CUDA bf16 autocast (fp16 with a gradient scaler on GPUs without native bf16), TF32 and, with
--compile, torch.compile; on CPU plain fp32; atomic checkpoints that continue a run (bit for bit on
CPU); Ctrl-C that saves; a NaN that stops the run, the last checkpoint intact; a log line (loss, lr,
grad norm, ms, tokens/s, MFU on GPUs of known peak), log.jsonl, a loss plot and text samples.

References: karpathy/nanoGPT train.py (its names, its Shakespeare recipes: val loss ~1.88 on CPU
after 2000 iterations, ~1.47 on one GPU); Loshchilov & Hutter 2019 (AdamW); Loshchilov & Hutter
2017 (SGDR: cosine schedule); Goyal et al. 2017 (warmup); Micikevicius et al. 2018 (loss scaling).

Run it (every setting, with its default: --help; several GPUs: 06_distributed.py):
  python 02_dataloader.py                             # once: the token files (char, GPT-2's)
  python 05_pretrain.py                               # nanoGPT's CPU recipe: 0.8M params
  python 05_pretrain.py --preset=shakespeare-char-gpu # nanoGPT's GPU recipe: 10.7M params, one GPU
  python 05_pretrain.py --init_from=resume            # continue the run in out_dir (--max_iters=N)
  python 05_pretrain.py --tokenizer=gpt2 --out_dir=out/shakespeare-gpt2  # GPT-2 tokens (02 makes)
"""

import argparse
import json
import math
import os
import pickle
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Annotated, ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

PROJECT = Path(__file__).resolve().parent  # a relative data_dir or out_dir resolves here

# -----------------------------------------------------------------------------
# Settings: nanoGPT's names, each a --field=value flag (04's parse_config); the loop is train()

@dataclass
class TrainConfig:
    """Pretrain a GPT on a text corpus. Defaults: nanoGPT's CPU recipe for Shakespeare-char."""

    PRESETS: ClassVar[dict[str, dict]] = {
        "shakespeare-char-cpu": dict(  # nanoGPT's README, "I only have a macbook": 0.8M params
            batch_size=12, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0,
            max_iters=2000, lr_decay_iters=2000, eval_iters=20),
        "shakespeare-char-gpu": dict(  # nanoGPT's config/train_shakespeare_char.py: 10.7M params
            batch_size=64, block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2,
            max_iters=5000, lr_decay_iters=5000, eval_iters=200, compile=True),
    }  # fmt: skip

    preset: Annotated[str, "a recipe of PRESETS; flags win"] = "shakespeare-char-cpu"
    # data, as 02 prepared it: data_dir/<dataset>-<tokenizer>/{train.bin, val.bin, meta.json}
    dataset: Annotated[str, "the corpus 02 prepared"] = "tinyshakespeare"
    tokenizer: Annotated[str, "char (a token per character) or gpt2 (BPE)"] = "char"
    data_dir: Annotated[str, "02's corpora (relative to this script)"] = "data"
    # model (04's GPTConfig)
    n_layer: Annotated[int, "transformer blocks"] = 4
    n_head: Annotated[int, "attention heads per block"] = 4
    n_embd: Annotated[int, "width of the residual stream"] = 128
    block_size: Annotated[int, "context length in tokens"] = 64
    dropout: Annotated[float, "0: short runs on much data; GPU recipe: 0.2"] = 0.0
    bias: Annotated[bool, "biases in Linear and LayerNorm; nanoGPT has none"] = False
    gelu: Annotated[str, "none: exact GELU, nanoGPT's (faster on CPUs); tanh: GPT-2's"] = "none"
    init_from: Annotated[str, "scratch, resume out_dir's run, or auto: resume if any"] = "scratch"
    # optimization
    batch_size: Annotated[int, "sequences per micro-batch"] = 12
    gradient_accumulation_steps: Annotated[int, "micro-batches per optimizer step"] = 1
    max_iters: Annotated[int, "optimizer steps in total"] = 2000
    learning_rate: Annotated[float, "the peak, reached after warmup"] = 1e-3
    weight_decay: Annotated[float, "AdamW's, on the 2-D weights only"] = 0.1
    beta1: Annotated[float, "AdamW's momentum"] = 0.9
    beta2: Annotated[float, "AdamW's second-moment decay (0.99: small batches)"] = 0.99
    grad_clip: Annotated[float, "clip the gradient norm to this; 0 = never"] = 1.0
    decay_lr: Annotated[bool, "warmup + cosine decay; false = constant lr"] = True
    warmup_iters: Annotated[int, "linear warmup steps"] = 100
    lr_decay_iters: Annotated[int, "the cosine ends here (usually = max_iters)"] = 2000
    min_lr: Annotated[float, "~learning_rate / 10 (Chinchilla)"] = 1e-4
    # evaluation, logging, checkpoints, samples
    out_dir: Annotated[str, "ckpt.pt, best.pt, log.jsonl, loss.png"] = "out/shakespeare-char"
    overwrite: Annotated[bool, "start afresh, replacing out_dir's run"] = False
    eval_interval: Annotated[int, "evaluate and save every this many iters"] = 250
    eval_iters: Annotated[int, "batches per split in an evaluation"] = 20
    log_interval: Annotated[int, "a log line every this many iters"] = 10
    sample_interval: Annotated[int, "a sample every this many iters (0: the end only)"] = 500
    max_new_tokens: Annotated[int, "tokens per sample (0 = no samples)"] = 200
    prompt: Annotated[str, "samples continue this text"] = "\n"
    temperature: Annotated[float, "< 1 samples sharper, > 1 more random"] = 0.8
    top_k: Annotated[int, "sample among the k likeliest tokens (0 = all)"] = 200
    # system
    device: Annotated[str, "auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps"] = "auto"
    dtype: Annotated[str, "auto (CUDA: bf16/fp16, else fp32), float32, bfloat16, float16"] = "auto"
    compile: Annotated[bool, "torch.compile: slower start, faster steps (GPUs)"] = False
    threads: Annotated[int, "CPU threads; 0 = PyTorch's choice"] = 0
    peak_flops: Annotated[float, "chip's top FLOP/s; MFU = the share used; 0 = known GPUs"] = 0.0
    seed: Annotated[int, "seeds the weights, the batches and dropout"] = 1337

    def __post_init__(self):  # each check names its fix; parse_config prints one `error:` line
        data_dir = PROJECT / (self.data_dir or "data")  # '': how older runs saved data/
        self.corpus_dir = data_dir / f"{self.dataset}-{self.tokenizer}"
        self.ckpt_path = PROJECT / self.out_dir / "ckpt.pt"  # an absolute out_dir stays as is
        choices = {"tokenizer": ("char", "gpt2"), "init_from": ("scratch", "resume", "auto"),
                   "gelu": ("none", "tanh")}
        at_least_one = ("batch_size", "block_size", "gradient_accumulation_steps",
                        "eval_interval", "eval_iters", "log_interval")
        check_values(self, choices, at_least_one)
        if self.init_from == "auto":  # 06's too: resume if out_dir holds a checkpoint, else start
            self.init_from = "resume" if self.ckpt_path.exists() else "scratch"
        if self.max_new_tokens and not self.prompt:
            raise ValueError("--prompt is empty: samples continue one (or --max_new_tokens=0)")

    def model_config(self, vocab_size: int) -> "GPTConfig":  # vocab_size: the corpus's
        names = ("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias", "gelu")
        return GPTConfig(vocab_size=vocab_size, **{name: getattr(self, name) for name in names})


# -----------------------------------------------------------------------------
# One optimizer step: AdamW's groups, lr schedule, accumulation. Weight decay shrinks weights toward
# 0 each step (decoupled from the gradient: AdamW, not an L2 term in the loss). It is meant for the
# matrices (Linear weights, embeddings). Biases and LayerNorm gains are 1-D shifts and scales:
# decaying them regularizes nothing and drags the gains toward 0, toward switching their layer off.
# Practice differs on the embeddings (minGPT exempted them); we follow nanoGPT: decay iff
# p.dim() >= 2. fused=True updates all tensors in one pass (CUDA; CPU since PyTorch 2.4, several
# times faster than foreach) and keeps fp16's inf check on the GPU: scaler.step never waits for it.

def configure_optimizers(model, weight_decay, learning_rate, betas, device_type):
    """AdamW with weight decay on the 2-D tensors only; frozen parameters (LoRA) are left out."""
    params = [p for p in model.parameters() if p.requires_grad]  # a tied weight appears once
    matrices = [p for p in params if p.dim() >= 2]
    vectors = [p for p in params if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": weight_decay},
              {"params": vectors, "weight_decay": 0.0}]
    fused = device_type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused, foreach=not fused)


# With learning_rate 1e-3, min_lr 1e-4, warmup_iters 100, lr_decay_iters 2000 (the CPU recipe):
# it=0 -> 1e-3 / 101; it=100 -> 1e-3 (the peak); it=1050, halfway through the cosine ->
# 1e-4 + 0.5 * (1 + cos(pi / 2)) * 9e-4 = 5.5e-4; it >= 2000 -> 1e-4. Warmup matters because
# Adam's second moment is noise in the first steps, and full steps on it diverge (Liu et al. 2020).
def get_lr(it: int, cfg) -> float:
    """Linear warmup to cfg.learning_rate, then a cosine down to cfg.min_lr at lr_decay_iters."""
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
    """Backward of one step's batch x, y in micro_steps chunks of batch_size rows: backward() adds
    into .grad, so loss_i / micro_steps per chunk sums to the gradient of the batch's mean loss,
    one chunk's activations in memory at a time. The mean loss stays on the device: no .item()."""
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
    """Each split's loss, dropout off: the mean of eval_iters batch means. Batch k at `step` is
    get_batch(step=step * eval_iters + k, seed=seed + 1), 06's too. Each forward sees batch_size
    rows, as a training micro-step does: with GPT-2's vocabulary the fp32 logits fill the memory."""
    model.eval()
    out = {}
    for split, ids in data.items():
        total = torch.zeros((), device=cfg.device)  # summed on the device: one .item() per split
        for k in range(cfg.eval_iters):
            x, y = get_batch(ids, cfg.batch_size, cfg.block_size, step=step * cfg.eval_iters + k,
                             seed=cfg.seed + 1, device=cfg.device)
            with autocast_context(x.device.type, cfg.dtype):
                _, loss = model(x, y)
            total += loss.float()
        out[split] = total.item() / cfg.eval_iters
    model.train()
    return out


def sample(model, tokenizer, cfg) -> str:
    """cfg.prompt continued by cfg.max_new_tokens tokens sampled with cfg.seed. fork_rng: samples
    draw from copies of the generators (CPU, CUDA, MPS), so training is the same bit for bit."""
    device = torch.device(cfg.device)
    idx = torch.tensor([tokenizer.encode(cfg.prompt)], device=device)
    gpus = [device] if device.type in ("cuda", "mps") else []  # the CPU's is always forked
    model.eval()
    with torch.random.fork_rng(devices=gpus, device_type=device.type):
        torch.manual_seed(cfg.seed)
        with autocast_context(device.type, cfg.dtype):
            out = generate(model, idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k or None)
    model.train()
    return tokenizer.decode(out[0].tolist())


# -----------------------------------------------------------------------------
# Checkpoints that continue a run exactly, in every training stage's format: {"model", "model_args",
# "tokenizer", "config" (the settings), "stage" (pretrain, distributed, finetune, dpo), "iter_num",
# "best_val_loss", "val_loss" (last measured), "optimizer" (Adam's moments), "scaler" (fp16's),
# "rng" (torch's random generators, so that a resumed run draws the same dropout masks; nothing else
# needs state: 02's get_batch is a function of the step, sample() forks the generators)}. Read with
# weights_only=True (no pickled code runs); written to a temporary file renamed over the old one.

def rng_states() -> dict:
    """The states of torch's random generators (CPU, each CUDA GPU, MPS), which dropout draws."""
    states = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()}  # no GPU: []
    if torch.backends.mps.is_available():
        states["mps"] = torch.mps.get_rng_state()
    return states


def set_rng_states(states: dict):
    """Restore what rng_states() returned (to as many GPUs as this machine has; each keeps its
    own). A generator this machine lacks, or a state the checkpoint lacks, is left as it is."""
    torch.set_rng_state(states["torch"].cpu())
    gpus = torch.cuda.device_count()  # 0 without CUDA
    torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"][:gpus]])
    if "mps" in states and torch.backends.mps.is_available():
        torch.mps.set_rng_state(states["mps"].cpu())


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


def plot_losses(out_dir: Path, tokens_per_iter: int):
    """Plot train and val loss from out_dir/log.jsonl into out_dir/loss.png, and say where."""
    try:
        from matplotlib.figure import Figure  # not pyplot: no window, no GUI backend to load
    except ImportError:
        print("no loss curve without matplotlib (pip install matplotlib)")
        return
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    fig = Figure(figsize=(8, 4.5), layout="tight")
    ax = fig.subplots()
    curves = dict(loss="train (one batch)", train_loss="train, eval", val_loss="val, eval")
    for key, label in curves.items():
        iters = [r["iter"] for r in records if key in r]
        losses = [r[key] for r in records if key in r]
        style = dict(alpha=0.4) if key == "loss" else dict(marker="o")
        ax.plot(iters, losses, label=label, **style)
    xlabel = f"iteration ({tokens_per_iter:,} tokens each)"
    ax.set(xlabel=xlabel, ylabel="cross-entropy loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(out_dir / "loss.png", dpi=100)
    print(f"loss curve: {out_dir / 'loss.png'}")


# -----------------------------------------------------------------------------
# The training loop; below it CtrlC, and Run: `run` prints, logs (log.jsonl), times and saves

def train(cfg: TrainConfig, resumed=None) -> dict:
    """Train as cfg says; resumed: load_checkpoint(out_dir/ckpt.pt) if main read it. Returns
    iter_num, the losses, ms_per_iter, tokens_per_s, mfu (None: no known peak), interrupted."""
    settings = asdict(cfg)  # saved as given: a resumed run resolves an "auto" dtype on its machine
    device = pick_device(cfg.device)
    cfg = replace(cfg, device=device, dtype=pick_dtype(cfg.dtype, device))
    device_type = torch.device(device).type
    torch.manual_seed(cfg.seed)
    if device_type == "cuda":  # TF32: fp32 matmuls on the tensor cores, with a 10-bit mantissa
        torch.backends.cuda.matmul.allow_tf32 = True  # cuDNN's (convolutions): on by default
    data = {split: load_tokens(cfg.corpus_dir, split) for split in ("train", "val")}
    tokenizer_spec = load_meta(cfg.corpus_dir)["tokenizer"]  # saved in the checkpoints
    tokenizer = get_tokenizer(tokenizer_spec)
    ckpt = {}  # empty: a new run
    if cfg.init_from == "resume":  # the model is the checkpoint's, built once
        model, _, ckpt = resumed or load_checkpoint(cfg.ckpt_path)
    else:
        model = GPT(cfg.model_config(tokenizer.n_vocab))
    model.to(device)
    optimizer = configure_optimizers(
        model, cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=cfg.dtype == "float16")  # off: pass-through
    iter_num = ckpt.get("iter_num", 0)
    if ckpt:
        today = optimizer.state_dict()["param_groups"]  # betas, decay: the flags given now win
        optimizer.load_state_dict(ckpt["optimizer"] | {"param_groups": today})
        scaler.load_state_dict(ckpt["scaler"] or scaler.state_dict())  # {}: saved without fp16
        set_rng_states(ckpt["rng"])  # after torch.manual_seed above, which would reset them
    header = dict(model_args=asdict(model.config), tokenizer=tokenizer_spec, config=settings)
    header["stage"] = "pretrain"  # header: the part of every run.save that never changes
    compiled_model = torch.compile(model, dynamic=False) if cfg.compile else model
    ctx = autocast_context(device_type, cfg.dtype)
    micro_steps = cfg.gradient_accumulation_steps
    rows = cfg.batch_size * micro_steps  # one global batch per step, split in micro-steps
    first_iter = iter_num
    with CtrlC() as ctrl_c, Run(cfg, model, optimizer, scaler, header, ckpt) as run:
        if not ckpt:  # the untrained model's loss, about ln(vocab_size), and a first ckpt.pt
            run.save(iter_num, estimate_loss(compiled_model, data, cfg, iter_num))
        while iter_num < cfg.max_iters and not ctrl_c.pressed:
            lr = get_lr(iter_num, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = get_batch(  # batch number iter_num: a function of (seed, iter_num) alone
                data["train"], rows, cfg.block_size, step=iter_num, seed=cfg.seed, device=device)
            loss = forward_backward(compiled_model, x, y, micro_steps, ctx, scaler)
            scaler.unscale_(optimizer)  # clip the true gradients, not fp16's scaled ones
            max_norm = cfg.grad_clip or math.inf  # 0 -> inf: never clips, still measures the norm
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm)  # logged
            scaler.step(optimizer)  # fp16: skips the step if a gradient overflowed
            scaler.update()
            optimizer.zero_grad()  # .grad = None (the default): memory freed until backward
            iter_num += 1
            last = iter_num == cfg.max_iters
            if iter_num % cfg.log_interval == 0 or last:  # .item() waits for the GPU: only here
                run.log_step(iter_num, loss.item(), lr, grad_norm.item())  # a NaN loss stops it
            if iter_num % cfg.eval_interval == 0 or last:
                losses = estimate_loss(compiled_model, data, cfg, iter_num)
                run.save(iter_num, losses)  # printed, logged, ckpt.pt (+ best.pt); NaN: a stop
            if cfg.sample_interval and iter_num % cfg.sample_interval == 0 and not last:
                run.log_sample(iter_num, tokenizer)
        if ctrl_c.pressed:
            if run.saved_at != iter_num:  # else ckpt.pt holds this state already
                run.save(iter_num)  # NaN weights stop the run instead: the last save stays
            print(f"saved {cfg.ckpt_path} (iter {iter_num}); continue: {run.resume_flags}")
        elif iter_num > first_iter:
            plot_losses(cfg.ckpt_path.parent, run.tokens_per_iter)
            run.log_sample(iter_num, tokenizer)
    return {"iter_num": iter_num, **run.summary(), "interrupted": ctrl_c.pressed}


def check_finite(what: str, value: float, step: int, ckpt_path, saved_at: int | None):
    """Stop at a NaN or an infinity, before a save overwrites ckpt_path (of iteration saved_at)."""
    if math.isfinite(value):
        return
    message = f"{what} is {value} at iteration {step}: training diverged"
    if saved_at is not None:
        resume = f"--init_from=resume --out_dir={ckpt_path.parent}"
        message += f"; {ckpt_path} (iter {saved_at}) is intact: {resume}"
    raise FloatingPointError(f"{message}; try a lower --learning_rate (or --dtype=float32)")


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


class Run:
    """`with Run(...) as run:` sets torch's threads (cfg.threads), prints the settings and opens
    out_dir/log.jsonl; then run prints and logs, times the steps and saves (in 05-08's format)."""

    def __init__(self, cfg, model, optimizer, scaler, header, ckpt):
        self.cfg = cfg
        self.model = model  # the plain module, not the compiled one: its names load anywhere
        self.optimizer = optimizer
        self.scaler = scaler
        self.header = header  # model_args, tokenizer, config, stage: the same in every save
        self.path = cfg.ckpt_path  # ckpt.pt
        self.saved_at = ckpt.get("iter_num")  # the iteration ckpt.pt holds; None: none yet
        self.best_val = ckpt.get("best_val_loss", math.inf)
        self.losses = {"val": ckpt.get("val_loss")}  # the last evaluation's
        rows = cfg.batch_size * cfg.gradient_accumulation_steps  # sequences per optimizer step
        self.tokens_per_iter = rows * cfg.block_size
        self.flops_per_iter = flops_per_token(model) * self.tokens_per_iter  # at its block_size
        self.peak = peak_flops(cfg.device, cfg.dtype, cfg.peak_flops)
        self.resume_flags = f"--init_from=resume --out_dir={cfg.out_dir}"  # from any folder
        self.step_ms = []  # one per warm log window; train returns their median
        self.restart_clock(self.saved_at or 0)

    def __enter__(self):
        cfg = self.cfg
        resumed = self.saved_at is not None  # this run continues the one ckpt.pt holds
        self.old_threads = torch.get_num_threads()
        torch.set_num_threads(cfg.threads or self.old_threads)
        print(cfg)  # the settings, with the device and dtype this machine resolved
        against = f" | MFU against {self.peak / 1e12:.4g} TFLOP/s" if self.peak else ""
        print(f"{self.model.num_params():,} parameters | {self.tokens_per_iter:,} tokens per "
              f"iteration | {torch.get_num_threads()} threads{against}")
        if resumed:
            print(f"resuming at iter {self.saved_at} of {cfg.max_iters} from {self.path} "
                  f"(--dtype={self.header['config']['dtype']} runs as {cfg.dtype} on {cfg.device})")
            if self.saved_at >= cfg.max_iters:
                print(f"nothing left to do (to train longer: {self.resume_flags} "
                      f"--max_iters={2 * self.saved_at})")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        log_path = self.path.with_name("log.jsonl")
        if resumed and log_path.exists():  # drop rows past ckpt.pt: this run logs them again
            rows = log_path.read_text().splitlines(keepends=True)
            whole = [row for row in rows if row.endswith("\n")]  # a kill can cut the last one
            kept = [row for row in whole if json.loads(row)["iter"] <= self.saved_at]
            tmp = log_path.with_suffix(".tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, log_path)  # atomic: the old log or the kept rows, never half of them
        self.log_file = open(log_path, "a" if resumed else "w")
        return self

    def __exit__(self, *exc_info):
        torch.set_num_threads(self.old_threads)
        self.log_file.close()

    def save(self, step, losses=None):
        """ckpt.pt, and best.pt if an evaluation's losses (printed and logged) improve val."""
        improved = False
        if losses is not None:
            for split, value in losses.items():
                check_finite(f"{split} loss", value, step, self.path, self.saved_at)
            val_loss = losses["val"]
            improved = val_loss < self.best_val
            self.best_val = min(self.best_val, val_loss)
            self.losses = losses
            best = " (best, saving best.pt)" if improved else ""
            print(f"iter {step}: train loss {losses['train']:.4f}, val loss {val_loss:.4f}{best}")
            self.write(iter=step, train_loss=losses["train"], val_loss=val_loss)
        weight_norm = nn.utils.get_total_norm(self.model.parameters())  # NaN after NaN gradients
        check_finite("weight norm", weight_norm.item(), step, self.path, self.saved_at)
        state = dict(
            model=self.model.state_dict(), **self.header, iter_num=step,
            best_val_loss=self.best_val, val_loss=self.losses.get("val"),
            optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(),
            rng=rng_states(),
        )
        save_checkpoint(self.path, state)
        if improved:
            save_checkpoint(self.path.with_name("best.pt"), state)
        self.saved_at = step
        self.restart_clock(step)

    def write(self, **record):
        print(json.dumps(record), file=self.log_file, flush=True)  # flushed: a crash loses nothing

    def restart_clock(self, step, warm=False):  # cold after a start, eval, sample: see log_step
        self.clock_start = time.perf_counter()
        self.clock_step = step
        self.warm = warm

    def log_step(self, step, loss, lr, grad_norm):
        check_finite("loss", loss, step, self.path, self.saved_at)
        steps = step - self.clock_step  # >= 1: no restart comes between a step and its log line
        dt = (time.perf_counter() - self.clock_start) / steps
        ms = 1000 * dt
        mfu = f" | MFU {self.flops_per_iter / dt / self.peak:.1%}" if self.peak else ""
        left = ""  # cold: the window after a start, eval or sample (compiling, emptied GPU queue)
        if self.warm:  # a later window; a cold one stays out of MFU, time left and the median
            self.step_ms.append(ms)
            left = f"{mfu} | ~{(self.cfg.max_iters - step) * dt:.0f} s left"
        print(f"iter {step}/{self.cfg.max_iters} | loss {loss:.4f} | lr {lr:.2e} "
              f"| grad norm {grad_norm:.3f} | {ms:.1f} ms "
              f"| {self.tokens_per_iter / dt:,.0f} tok/s{left}")
        self.write(iter=step, loss=loss, lr=lr, grad_norm=grad_norm, ms=ms)
        self.restart_clock(step, warm=True)

    def log_sample(self, step, tokenizer):
        if self.cfg.max_new_tokens:
            text = sample(self.model, tokenizer, self.cfg)
            print(f"--- sample at iter {step} ---\n{text}\n---")
            self.restart_clock(step)

    def summary(self) -> dict:
        """The losses, the median step time (robust to hiccups), and tokens/s and MFU at it."""
        ms = np.median(self.step_ms) if self.step_ms else math.nan
        mfu = self.flops_per_iter / (ms / 1000) / self.peak if self.peak else None
        return dict(train_loss=self.losses.get("train"), val_loss=self.losses.get("val"),
                    best_val_loss=self.best_val, ms_per_iter=ms,
                    tokens_per_s=1000 * self.tokens_per_iter / ms, mfu=mfu)


# The command line: the checks that run before any work, and main

def check_values(cfg, choices: dict, at_least_one: tuple):
    """A settings dataclass's values: each field in choices among its allowed; each number at least
    0 (the seed too: numpy's takes no negative one), or 1 if at_least_one names it; betas under 1;
    warmup before decay; out_dir a folder, not the project; --overwrite from scratch; the device."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        allowed = choices.get(f.name)
        if allowed and value not in allowed:
            raise ValueError(f"--{f.name}={value!r} is not valid; use {', '.join(allowed)}")
        minimum = 1 if f.name in at_least_one else 0
        number = f.type.__origin__ in (int, float)
        if number and not minimum <= value < math.inf:  # nan fails every comparison
            raise ValueError(f"--{f.name}={value} must be finite and >= {minimum}")
    if max(cfg.beta1, cfg.beta2) >= 1:  # a decay of 1 or more: the averages never forget
        raise ValueError(f"--beta1={cfg.beta1} and --beta2={cfg.beta2} must be less than 1")
    if cfg.decay_lr and cfg.lr_decay_iters <= cfg.warmup_iters:
        raise ValueError(f"--lr_decay_iters={cfg.lr_decay_iters} must exceed --warmup_iters="
                         f"{cfg.warmup_iters}; usually lr_decay_iters = max_iters "
                         "(or --decay_lr=false)")
    if any(folder.is_file() for folder in cfg.ckpt_path.parents):  # now, not at the first save
        raise ValueError(f"--out_dir={cfg.out_dir} is a file, or in one: name a folder")
    if cfg.ckpt_path.parent.resolve() == PROJECT:  # '' or '.': the run among the scripts
        raise ValueError(f"--out_dir={cfg.out_dir!r} is the project folder: name another")
    if cfg.overwrite and cfg.init_from != "scratch":  # a resume (auto's too) would ignore it
        raise ValueError("--overwrite starts afresh: use it with --init_from=scratch")
    pick_dtype(cfg.dtype, pick_device(cfg.device))  # a dtype the device has; both name the fix


def check_run(cfg: TrainConfig, resumed=None):
    """The checks that read the corpus's meta.json and out_dir's run, which main runs before any
    work; each error names its fix. resumed: load_checkpoint's (model, tokenizer, ckpt), if any."""
    meta = load_meta(cfg.corpus_dir)  # if 02 has not prepared it: the 02 command that does
    wanted = asdict(cfg.model_config(meta["n_vocab"]))  # GPTConfig checks n_embd % n_head...
    names = ("ckpt.pt", "best.pt", "log.jsonl", "loss.png", "dcp-latest.pt")  # a run's, 06's too
    run_files = [cfg.ckpt_path.with_name(name) for name in names]  # empty: it crashed early
    if cfg.init_from == "resume":  # the run's settings come from its checkpoint: it must be one
        saved = resumed[2]["model_args"]
        differing = ", ".join(f"{k}={v!r}" for k, v in saved.items() if v != wanted[k])
        if differing:  # the model is the checkpoint's: the settings must say so too
            raise ValueError(f"{cfg.ckpt_path} holds a model with {differing}: "
                             "resume with those (vocab_size: --dataset, --tokenizer)")
    elif any(path.exists() and path.stat().st_size for path in run_files) and not cfg.overwrite:
        way_on = "continue it: --init_from=resume, " if cfg.ckpt_path.exists() else ""
        raise ValueError(f"{cfg.ckpt_path.parent} holds a run; {way_on}use another --out_dir, "
                         "or replace it: --init_from=scratch --overwrite")
    if cfg.max_new_tokens:  # a prompt the tokenizer cannot encode: now, not at the first sample
        get_tokenizer(meta["tokenizer"]).encode(cfg.prompt)
    train_tokens = meta["train_tokens"]  # train's load_tokens checks the files against these
    val_tokens = meta["val_tokens"]
    if min(train_tokens, val_tokens) <= cfg.block_size:
        raise ValueError(f"{cfg.corpus_dir} has {train_tokens} train and {val_tokens} val "
                         f"tokens, too few for --block_size={cfg.block_size}; use a smaller one")


def main(argv=None):
    """The command line; a user error is one `error:` line, before any work. A resume takes each
    setting not given now (a flag, or a --preset given now) from the checkpoint (--max_iters=N
    alone extends a run, at min_lr past lr_decay_iters); device and an auto dtype resolve anew."""
    argv = sys.argv[1:] if argv is None else argv
    peek = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # every flag, as text
    for f in fields(TrainConfig):  # -h, a typo: unknown, left to parse_config (no ckpt read first)
        peek.add_argument(f"--{f.name}", nargs="?")  # "?": a bare bool flag (--compile) too
    given, unknown = peek.parse_known_args(argv)
    ckpt_path = PROJECT / (given.out_dir or TrainConfig.out_dir) / "ckpt.pt"  # None: not given
    found = given.init_from == "auto" and ckpt_path.exists()  # auto: resume if there is one
    resumed = None
    try:
        if (given.init_from == "resume" or found) and not unknown:  # the run's settings first
            resumed = load_checkpoint(ckpt_path)  # the one model this run builds
            # not the device (this machine's), out_dir (written where read), --overwrite (new runs')
            names = set(vars(given)) - {"device", "out_dir", "overwrite"}  # peek's: every field
            names -= set(TrainConfig.PRESETS.get(given.preset, {}))  # a preset given now wins too
            model, _, ckpt = resumed
            stage = ckpt.get("stage")
            if stage not in ("pretrain", "distributed"):  # 07's, 08's: state of their own loops
                raise ValueError(f"{ckpt_path} holds a {stage} model; 05 resumes only its own "
                                 "or 06's runs (sample it with 09_generate.py)")
            saved = {**ckpt["config"], "gelu": model.config.gelu}  # no gelu in older configs: tanh
            argv = [f"--{k}={v}" for k, v in saved.items() if k in names] + argv  # saved first
        cfg = parse_config(TrainConfig, argv)  # the later flag wins: the one given now
        check_run(cfg, resumed)
        result = train(cfg, resumed)
    except (ValueError, OSError, FloatingPointError) as error:  # a NaN: try a lower lr
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # before train's CtrlC: the checks, the data, building the model
        print("\nCtrl-C: stopped", file=sys.stderr)
        sys.exit(130)
    if result["interrupted"]:
        sys.exit(130)  # a shell's code for a Ctrl-C (128 + SIGINT), as 06-08
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


# copied from 02_dataloader.py: load_meta
def load_meta(corpus_dir) -> dict:
    """meta.json of a corpus that 02_dataloader.py prepared in data_dir/<dataset>-<tokenizer>/."""
    corpus_dir = Path(corpus_dir)
    path = corpus_dir / "meta.json"
    if not path.exists():
        dataset, _, tokenizer = corpus_dir.name.rpartition("-")  # "tinyshakespeare", "char"
        raise FileNotFoundError(f"{path} not found; prepare it with: python 02_dataloader.py "
                                f"--dataset={dataset} --tokenizers={tokenizer} "
                                f"--data_dir={corpus_dir.parent} "
                                "(and --text_file=FILE if it is your own text)")
    return json.loads(path.read_text(encoding="utf-8"))


# copied from 02_dataloader.py: load_tokens
def load_tokens(corpus_dir, split: str) -> np.memmap:
    """The ids of split ("train" or "val") as a read-only np.memmap, checked against meta.json."""
    if split not in ("train", "val"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 'val'")
    meta = load_meta(corpus_dir)
    path = Path(corpus_dir) / f"{split}.bin"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; prepare the corpus again")
    known_dtype = meta["dtype"] in ("uint16", "uint32")
    if not known_dtype or meta["n_vocab"] > np.iinfo(meta["dtype"]).max + 1:
        meta_path = path.parent / "meta.json"
        raise ValueError(f"{meta_path}: n_vocab {meta['n_vocab']} does not fit in {meta['dtype']} "
                         "(token files: uint16 or uint32); prepare the corpus again")
    dtype = np.dtype(meta["dtype"])
    n_tokens = meta[f"{split}_tokens"]
    n_bytes = path.stat().st_size
    expected_bytes = n_tokens * dtype.itemsize
    if n_bytes != expected_bytes:
        other = np.dtype(np.uint32 if dtype == np.uint16 else np.uint16)
        if n_bytes == n_tokens * other.itemsize:
            hint = f"it looks written as {other}, not {dtype}"
        else:
            hint = "it is truncated or from another run"
        raise ValueError(f"{path} has {n_bytes} bytes but meta.json says {n_tokens} tokens of "
                         f"{dtype} = {expected_bytes} bytes; {hint}; prepare the corpus again")
    return np.memmap(path, dtype=dtype, mode="r")


# copied from 02_dataloader.py: get_batch
def get_batch(data, batch_size: int, block_size: int, step: int, seed: int = 0, rank: int = 0,
              world_size: int = 1, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Rank's rows x, y (B // world_size, T) of global batch step; a pure function of seed, step."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if block_size >= len(data):
        raise ValueError(f"the data has {len(data)} tokens but one (x, y) window needs "
                         f"block_size + 1 = {block_size + 1}; lower block_size or use more text")
    if world_size <= 0 or batch_size <= 0 or batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} does not split across {world_size} ranks; "
                         "use a positive multiple of world_size")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    per_rank = batch_size // world_size
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(data) - block_size, size=batch_size)  # the global batch
    starts = starts[rank * per_rank:(rank + 1) * per_rank]  # this rank's rows of it
    window = data[starts[:, None] + np.arange(block_size + 1)].astype(np.int64)  # (B, T+1)
    x = torch.from_numpy(np.ascontiguousarray(window[:, :-1]))  # (B, T)
    y = torch.from_numpy(np.ascontiguousarray(window[:, 1:]))  # (B, T)
    if torch.device(device).type == "cuda":  # pinned: the copy is queued, the CPU goes on
        x = x.pin_memory().to(device, non_blocking=True)
        y = y.pin_memory().to(device, non_blocking=True)
        return x, y
    return x.to(device), y.to(device)


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


# copied from 04_gpt.py: flops_per_token
def flops_per_token(model: GPT, seq_len: int | None = None) -> int:
    """Training FLOPs per token at context seq_len: 6N (weights) + 12 L T C (attention)."""
    config = model.config
    T = config.block_size if seq_len is None else seq_len
    weights = 6 * model.num_params(non_embedding=True)
    attention = 12 * config.n_layer * T * config.n_embd
    return weights + attention


# copied from 04_gpt.py: generate
@torch.no_grad()
def generate(model, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None):
    """Append max_new_tokens tokens to idx (B, T); temperature 0 = greedy; top_k: k likeliest."""
    if not temperature >= 0 or (top_k is not None and top_k <= 0):  # nan too
        raise ValueError("need temperature >= 0 (0 = greedy) and top_k a positive integer or "
                         f"None, got temperature={temperature}, top_k={top_k}")
    for _ in range(max_new_tokens):
        context = idx[:, -model.config.block_size :]  # the last block_size tokens
        logits, _ = model(context)  # (B, T, vocab_size)
        logits = logits[:, -1, :]  # (B, vocab_size): the last position
        if temperature == 0:
            idx_next = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        else:
            logits = logits / temperature
            if top_k is not None:
                k = min(top_k, logits.size(-1))
                kth = torch.topk(logits, k).values[:, [-1]]  # (B, 1): the k-th largest
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)  # (B, vocab_size)
            idx_next = torch.multinomial(probs, num_samples=1)  # (B, 1)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


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


# copied from 04_gpt.py: peak_flops
def peak_flops(device: str, dtype: str, override: float = 0) -> float | None:
    """FLOP/s to measure MFU against: override if > 0, else a known GPU's dense datasheet peak for
    dtype (bf16/fp16: tensor cores; float32: TF32 if torch has it on, else fp32), else None."""
    if override > 0 or torch.device(device).type != "cuda":
        return override or None
    tflops = {  # dense TFLOP/s, NVIDIA's datasheets (whose headlines are often 2:4 sparse: 2x)
        "NVIDIA H100 80GB HBM3": (989, 495, 67), "NVIDIA H200": (989, 495, 67),  # the SXM ones
        "NVIDIA H100 PCIe": (756, 378, 51), "NVIDIA H100 NVL": (835, 418, 60),
        "NVIDIA A100-SXM4-80GB": (312, 156, 19.5), "NVIDIA A100-SXM4-40GB": (312, 156, 19.5),
        "NVIDIA A100 80GB PCIe": (312, 156, 19.5), "NVIDIA A100-PCIE-40GB": (312, 156, 19.5),
        "NVIDIA L40S": (362, 183, 91.6), "NVIDIA L40": (181, 90.5, 90.5),
        "NVIDIA L4": (121, 60, 30.3), "NVIDIA GeForce RTX 4090": (165, 82.6, 82.6),
        "NVIDIA GeForce RTX 3090": (71, 35.6, 35.6), "Tesla V100-SXM2-16GB": (125, 0, 15.7),
        "Tesla V100-SXM2-32GB": (125, 0, 15.7), "Tesla T4": (65, 0, 8.1),  # no bf16, no TF32
    }  # fmt: skip
    half, tf32, fp32 = tflops.get(torch.cuda.get_device_name(device), (0, 0, 0))  # 0: not listed
    peak = half
    if dtype == "float32":  # TF32: fp32 matmuls on the tensor cores, at half their bf16 rate
        peak = tf32 if tf32 and torch.backends.cuda.matmul.allow_tf32 else fp32
    return peak * 1e12 or None  # None: a GPU the table does not know


if __name__ == "__main__":
    main()
