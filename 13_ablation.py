"""Stage 13: what each change from GPT-2 buys, measured side by side; and Muon.

12 built today's decoder as settings of one model. Here the settings are trained, one at a time:
each row of the table adds one change to the row above and trains from scratch with 05's loop on
nanoGPT's CPU recipe for Shakespeare-char (4 layers, 128 wide, block 64, batch 12, 2,000
iterations). The rows: 05's GPT (GPT-2's block), +RoPE, +RMSNorm, +SwiGLU, +QK-norm, +GQA, and
last the same model with Muon, the optimizer of modded-nanogpt's speedruns, for its hidden
matrices. Every row sees the same batches in the same order from the same seed, so its val
loss differs from the row above by its change, and by how its new shapes draw the initial weights
(the README measures the noise a change of seed alone makes); rounds repeat the table, which
shows each row's median training time. A change that does not help at this size shows as such:
small models and short runs are where some of these changes matter least.

References: Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks" (blog
post and modded-nanogpt); Bernstein & Newhouse 2024, "Old optimizer, new norm"; Liu et al. 2025,
"Muon is Scalable for LLM Training" (Moonshot AI); 12's references for each change.

Run it (once before: python 02_dataloader.py --tokenizers=char, the data 05 reads):
  python 13_ablation.py                  # the table, one round (about 15 minutes on 2 CPU cores)
  python 13_ablation.py --rounds=3       # the README's table: the median of 3 rounds
  python 13_ablation.py --max_iters=200  # a quick look
"""

import argparse
import json
import math
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

PROJECT = Path(__file__).resolve().parent  # a relative --data_dir starts here

# -----------------------------------------------------------------------------
# The ablation: one change a row, each row trained from scratch as 05 trains
#
# The loop is 05's without its machinery (no checkpoints, logs or fp16 loss scaling: a row is
# minutes long), with 02's get_batch and 05's get_lr and estimate_loss. The first row is 05's
# model: GPT-2's block with no biases, as 05 trains it by default, but with GPT-2's tanh GELU (05
# takes the exact one, 0.0005 apart, for speed; a test loads 05's weights into it). Each row adds
# its change to all the changes above it. SwiGLU's hidden size keeps about the parameter count
# (8C/3 rounded up to a multiple of 32: the MLP 3% more); GQA halves the key/value heads, which
# removes parameters: the table shows how many. The last row is the model of the row above with
# Muon (below) for its hidden matrices, which then have no weight decay (AdamW's was 0.1).
NANOGPT_CPU_RECIPE = dict(
    batch_size=12, block_size=64, n_layer=4, n_head=4, n_kv_head=4, n_embd=128,  # 4 = no GQA
    learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, decay_lr=True,
    weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0,
    eval_iters=200,  # not the recipe's 20: its noise is the size of some rows' differences
)  # fmt: skip
ABLATION = [  # (row, the change it adds to the rows above, optimizer)
    ("05's GPT", dict(bias=False), "adamw"),
    ("+RoPE", dict(pos="rope"), "adamw"),
    ("+RMSNorm", dict(norm="rmsnorm"), "adamw"),
    ("+SwiGLU", dict(mlp="swiglu"), "adamw"),
    ("+QK-norm", dict(qk_norm=True), "adamw"),
    ("+GQA", dict(n_kv_head=2), "adamw"),
    ("+Muon", {}, "muon"),
]


def train_row(settings: dict, optimizer_name: str, data: dict, recipe) -> dict:
    """One row: a ModernGPT with settings, trained as 05 trains; its val loss and speed. recipe:
    NANOGPT_CPU_RECIPE's settings and the run's (iterations, device, seed, Muon's lr)."""
    torch.manual_seed(recipe.seed)
    size_fields = ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd")
    sizes = {name: getattr(recipe, name) for name in size_fields}
    config = ModernConfig(**{**sizes, **settings})  # the row's settings win
    model = ModernGPT(config).to(recipe.device)
    optimizers = make_optimizers(model, recipe, optimizer_name == "muon")
    groups = [group for opt in optimizers for group in opt.param_groups]
    for group in groups:  # 05's schedule for both optimizers: a fraction of each group's peak
        group["peak_lr"] = group["lr"]
    device_type = torch.device(recipe.device).type
    ctx = autocast_context(device_type, recipe.dtype)
    start = time.perf_counter()
    for it in range(recipe.max_iters):
        fraction = get_lr(it, recipe) / recipe.learning_rate
        for group in groups:
            group["lr"] = group["peak_lr"] * fraction
        x, y = get_batch(data["train"], recipe.batch_size, recipe.block_size,
                         step=it, seed=recipe.seed, device=recipe.device)
        with ctx:
            _, loss = model(x, y)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    if device_type != "cpu":  # the clock stops when the GPU is done (CUDA or MPS)
        torch.get_device_module(device_type).synchronize()
    seconds = time.perf_counter() - start
    val = {"val": data["val"]}  # the table shows no train loss: evaluating it would double the cost
    val_loss = estimate_loss(model, val, recipe, recipe.max_iters)["val"]
    tokens = recipe.max_iters * recipe.batch_size * recipe.block_size
    return dict(params=model.num_params(), val_loss=val_loss, seconds=seconds,
                tokens_per_s=tokens / seconds, kv_bytes=cache_bytes_per_token(config))


def ablate(cfg) -> list[dict]:
    """Train every ABLATION row cfg.rounds times (rows interleaved); print the table."""
    corpus = PROJECT / cfg.data_dir / "tinyshakespeare-char"
    data = {split: load_tokens(corpus, split) for split in ("train", "val")}
    # both splits now, before any training: get_batch would find a short val split only after the
    # first row has trained, and would name block_size, which 13 has no flag for
    block = NANOGPT_CPU_RECIPE["block_size"]
    for split, ids in data.items():
        if len(ids) <= block:
            share = "larger" if split == "val" else "smaller"
            raise ValueError(f"{corpus / split}.bin has {len(ids)} tokens, under one window of "
                             f"{block + 1}; prepare the corpus again with a {share} "
                             "--val_fraction or more text (python 02_dataloader.py)")
    dtype = pick_dtype("auto", cfg.device)  # bf16 on recent GPUs, else fp32 (05's fp32 on CPU)
    if dtype == "float16":  # no loss scaling here: older GPUs train in fp32
        dtype = "float32"
    recipe = SimpleNamespace(
        **NANOGPT_CPU_RECIPE, vocab_size=load_meta(corpus)["n_vocab"],
        max_iters=cfg.max_iters, lr_decay_iters=cfg.max_iters, muon_lr=cfg.muon_lr,
        seed=cfg.seed, device=cfg.device, dtype=dtype)
    # the recipe warms up for 100 of 2,000 iterations; a shorter run, for a 20th of its own
    recipe.warmup_iters = min(recipe.warmup_iters, cfg.max_iters // 20)
    # val batches: the recipe's 200, or as many as a shorter run's iterations (a forward pass is
    # about a third of a training step: evaluation then costs at most a third of the training);
    # fewer batches are noisier: a quick look's differences between rows may be noise alone
    recipe.eval_iters = cfg.eval_iters or min(recipe.eval_iters, cfg.max_iters)
    rows = []  # (name, all the changes so far, optimizer)
    settings = {}
    for name, change, optimizer_name in ABLATION:
        settings = {**settings, **change}
        rows.append((name, settings, optimizer_name))
    runs = {name: [] for name, _, _ in rows}
    # a process's first steps are slow (PyTorch's first-op set-up, the allocator, the thread pool,
    # cold caches: seconds on a busy CPU), and the first row timed would pay for them: a few
    # untimed steps of the first row take them (train_row seeds itself: no row's loss changes)
    warm_up = SimpleNamespace(**{**vars(recipe), "max_iters": 10, "eval_iters": 1})
    train_row(rows[0][1], rows[0][2], data, warm_up)
    for round_index in range(cfg.rounds):
        # each round starts at another row: a row trained late in a long run is slower (a CPU's
        # clock drops under sustained load), so no row is always late
        first = round_index * len(rows) // cfg.rounds
        for name, settings, optimizer_name in rows[first:] + rows[:first]:
            run = train_row(settings, optimizer_name, data, recipe)
            runs[name].append(run)
            print(f"round {round_index + 1}/{cfg.rounds} {name}: val loss "
                  f"{run['val_loss']:.4f}, {run['seconds']:.1f} s", flush=True)
    return print_table(runs, recipe)


def print_table(runs: dict, recipe) -> list[dict]:
    """The ablation as a Markdown table: each row's median time, its val loss (on a CPU the same
    in every round), and the change in val loss from the row above."""
    print(f"\n{recipe.max_iters} iterations of nanoGPT's CPU recipe on {recipe.device}, "
          f"val loss over {recipe.eval_iters} batches, "
          f"median of {len(next(iter(runs.values())))} round(s)")
    print("| row | parameters | KV cache bytes/token (bf16) | val loss | vs the row above "
          "| train s | tokens/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    table = []
    above = None
    for name, row_runs in runs.items():
        seconds = statistics.median(run["seconds"] for run in row_runs)
        val_loss = statistics.median(run["val_loss"] for run in row_runs)
        row = dict(row_runs[0], name=name, seconds=seconds, val_loss=val_loss)
        row["tokens_per_s"] = recipe.max_iters * recipe.batch_size * recipe.block_size / seconds
        delta = "" if above is None else f"{row['val_loss'] - above['val_loss']:+.4f}"
        print(f"| {name} | {row['params']:,} | {row['kv_bytes']:,} | {row['val_loss']:.4f} "
              f"| {delta} | {seconds:.1f} | {row['tokens_per_s']:,.0f} |")
        table.append(row)
        above = row
    return table


# -----------------------------------------------------------------------------
# Muon: an optimizer for the hidden matrices
#
# Muon (Jordan et al. 2024, from modded-nanogpt's speedruns; Moonshot trained Kimi K2 with a
# variant) is an optimizer for the blocks' 2-D weights. The momentum of a weight matrix's gradient
# is dominated by a few directions (a few large singular values); Muon steps along the nearest
# orthogonal matrix instead, U V^T for the momentum's U S V^T, so that every direction gets the
# same step and the rare ones learn too. Newton-Schulz finds U V^T without an SVD: scaled so no
# singular value exceeds 1, X goes through five steps of the odd polynomial
# aX + b(XX^T)X + c(XX^T)^2 X, which acts on each singular value alone: a small one grows 3.4x a
# step, a large one settles in about 0.7-1.2: close enough to 1, in five cheap steps; the few
# that start below 1/1000 of X's Frobenius norm end below about 0.5. Its cost grows with the
# weights, not with the batch: with this file's 768-token batches its FLOPs are about 60% of a
# training step's, at GPT-2 124M with nanoGPT's 0.5M-token batches under 1%. Embeddings, the head
# and the norm gains stay with AdamW: a row of wte is a lookup, not a map.
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)  # a, b, c: Jordan's, for a fast start from small values


@torch.no_grad()
def orthogonalize(G, steps: int = 5):
    """Approximately U V^T for G = U S V^T (its singular values brought close to 1)."""
    a, b, c = NEWTON_SCHULZ
    X = G / (G.norm() + 1e-7)  # the Frobenius norm bounds the largest singular value
    tall = X.size(0) > X.size(1)
    if tall:  # work on the wide side: X X^T is the smaller Gram matrix
        X = X.T
    for _ in range(steps):
        gram = X @ X.T
        X = a * X + (b * gram + c * gram @ gram) @ X
    if tall:
        X = X.T
    return X


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum whose update is orthogonalized: for 2-D weights only."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95):
        super().__init__(params, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum"] = torch.zeros_like(p)
                momentum = state["momentum"]
                momentum.lerp_(p.grad, 1 - group["momentum"])
                nesterov = p.grad.lerp(momentum, group["momentum"])
                # U V^T's entries have an RMS of 1/sqrt(the longer side); this makes it
                # 1/sqrt(fan_in) for a tall matrix too, as for a wide one
                scale = max(1, p.size(0) / p.size(1)) ** 0.5
                p.add_(orthogonalize(nesterov), alpha=-group["lr"] * scale)


def make_optimizers(model, recipe, muon: bool) -> list:
    """AdamW as 05 sets it up; with muon, Muon takes the blocks' matrices from AdamW."""
    muon_params = []
    if muon:
        named = model.named_parameters()
        muon_params = [p for n, p in named if n.startswith("transformer.h.") and p.dim() == 2]
    muon_ids = {id(p) for p in muon_params}
    adamw_params = [p for p in model.parameters() if id(p) not in muon_ids]
    matrices = [p for p in adamw_params if p.dim() >= 2]  # as 05: decay the matrices only
    vectors = [p for p in adamw_params if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": recipe.weight_decay},
              {"params": vectors, "weight_decay": 0.0}]
    betas = (recipe.beta1, recipe.beta2)
    fused = torch.device(recipe.device).type in ("cuda", "cpu")
    implementation = {"fused": True} if fused else {"foreach": True}  # as 05
    adamw = torch.optim.AdamW(groups, lr=recipe.learning_rate, betas=betas, **implementation)
    optimizers = [adamw]
    if muon_params:
        optimizers.append(Muon(muon_params, lr=recipe.muon_lr))
    return optimizers


# -----------------------------------------------------------------------------
# Command line


@dataclass
class AblationConfig:
    """Train each change from GPT-2 side by side on 02's Shakespeare; print the table."""

    max_iters: Annotated[int, "iterations per row (nanoGPT's recipe: 2000)"] = 2000
    rounds: Annotated[int, "times to train the table (the median time is shown)"] = 1
    eval_iters: Annotated[int, "val batches per row; 0 = --max_iters of them, at most 200"] = 0
    muon_lr: Annotated[float, "Muon's peak learning rate"] = 0.02
    data_dir: Annotated[str, "02's prepared corpora (relative: from 13's folder)"] = "data"
    seed: Annotated[int, "seeds the weights and the batches, the same for every row"] = 1337
    device: Annotated[str, "auto = cuda > mps > cpu; or name one"] = "auto"

    def __post_init__(self):  # checked before any work
        self.device = pick_device(self.device)
        if self.max_iters < 1 or self.rounds < 1:
            raise ValueError("--max_iters and --rounds must be 1 or more")
        if self.eval_iters < 0:
            raise ValueError(f"--eval_iters={self.eval_iters}: use 1 or more (0: the default)")
        if not 0 < self.muon_lr < math.inf:  # nan too
            raise ValueError(f"--muon_lr={self.muon_lr} must be above 0 and finite")
        if self.seed < 0:  # numpy's generators take none below 0
            raise ValueError(f"--seed={self.seed} must be 0 or more")


def main(argv=None):
    cfg = parse_config(AblationConfig, argv)  # bad flags: one line, exit 2
    if cfg.device.startswith("cuda"):  # TF32, as 05: fp32 matmuls on the tensor cores
        torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return ablate(cfg)
    except (ValueError, OSError) as e:  # no prepared data, or unreadable (a folder, no permission)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C: the rows so far were printed as they finished
        print("\nCtrl-C: stopped", file=sys.stderr)
        sys.exit(130)


# -----------------------------------------------------------------------------
# Appendix: pieces copied unchanged from earlier stages, so that this file runs on its own.


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


# copied from 05_pretrain.py: get_lr
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


# copied from 05_pretrain.py: estimate_loss
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


# copied from 12_modern_gpt.py: swiglu_hidden
def swiglu_hidden(n_embd: int, multiple_of: int) -> int:
    """SwiGLU's hidden size with GELU-MLP's parameters: 8C/3, rounded up to multiple_of."""
    hidden = int(2 * 4 * n_embd / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


# copied from 12_modern_gpt.py: ModernConfig
@dataclass
class ModernConfig:
    """A decoder: GPT-2's (the defaults) or a modern one (FLAVOURS: llama3, qwen3)."""

    block_size: int = 256  # longest sequence (RoPE: max_position_embeddings)
    vocab_size: int = 50304  # GPT-2's 50257, padded to a multiple of 64
    n_layer: int = 4
    n_head: int = 8  # query heads
    n_kv_head: int = 8  # key/value heads; < n_head is GQA
    n_embd: int = 128
    head_size: int = 0  # 0 = n_embd // n_head (Qwen3 sets its own)
    norm: str = "layernorm"  # or "rmsnorm"
    norm_eps: float = 1e-5
    pos: str = "learned"  # or "rope"
    rope_theta: float = 10000.0  # RoPE's base: pair i turns theta^(-2i/head_size) per token
    mlp: str = "gelu"  # or "swiglu"
    mlp_hidden: int = 0  # 0 = 4 * n_embd (gelu), or swiglu_hidden()
    multiple_of: int = 32  # swiglu_hidden rounds up to this
    qk_norm: bool = False  # RMSNorm on each head's q and k
    bias: bool = True  # biases in Linear and LayerNorm
    tie_embeddings: bool = True  # lm_head shares wte's weight
    MODERN: ClassVar[dict] = dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False)
    FLAVOURS: ClassVar[dict[str, dict]] = {
        "gpt2": {},
        "llama3": dict(MODERN, rope_theta=5e5, n_kv_head=2, tie_embeddings=False),
        "qwen3": dict(MODERN, rope_theta=1e6, n_kv_head=4, qk_norm=True, norm_eps=1e-6),
    }  # fmt: skip

    def __post_init__(self):
        if self.head_size == 0 and self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                             "choose an n_head that divides it, or set head_size")
        self.head_size = self.head_size or self.n_embd // self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head="
                             f"{self.n_kv_head}: each key/value head serves a whole group "
                             "of query heads; choose an n_kv_head that divides n_head")
        if self.pos == "rope" and self.head_size % 2:
            raise ValueError(f"RoPE rotates pairs of numbers, and head_size="
                             f"{self.head_size} is odd; choose an even one")
        choices = dict(norm=("layernorm", "rmsnorm"), pos=("learned", "rope"),
                       mlp=("gelu", "swiglu"))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: choose one of {allowed}")
        if self.mlp_hidden == 0 and self.mlp == "swiglu":
            self.mlp_hidden = swiglu_hidden(self.n_embd, self.multiple_of)
        self.mlp_hidden = self.mlp_hidden or 4 * self.n_embd

    @classmethod
    def flavour(cls, name: str, **overrides):
        """FLAVOURS[name] with overrides: flavour("llama3", n_layer=2)."""
        return cls(**{**cls.FLAVOURS[name], **overrides})


# copied from 12_modern_gpt.py: RMSNorm
class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, over the last dimension."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x):
        x32 = x.float()
        mean_square = x32.pow(2).mean(-1, keepdim=True)
        normed = x32 * torch.rsqrt(mean_square + self.eps)
        return self.weight * normed.to(x.dtype)


# copied from 12_modern_gpt.py: make_norm
def make_norm(config: ModernConfig, size: int) -> nn.Module:
    """The block's normalisation: 04's LayerNorm, or RMSNorm."""
    if config.norm == "rmsnorm":
        return RMSNorm(size, config.norm_eps)
    return nn.LayerNorm(size, eps=config.norm_eps, bias=config.bias)


# copied from 12_modern_gpt.py: rope_angles
def rope_angles(positions, head_size: int, theta: float):
    """positions (T,) -> (cos, sin), each (T, head_size): the angle of every pair, twice."""
    pair = torch.arange(0, head_size, 2, device=positions.device)
    inv_freq = 1.0 / theta ** (pair.float() / head_size)  # (hs/2,)
    angles = positions.float()[:, None] * inv_freq[None]  # (T, hs/2)
    both_halves = torch.cat([angles, angles], dim=-1)  # (T, hs)
    return both_halves.cos(), both_halves.sin()


# copied from 12_modern_gpt.py: apply_rope
def apply_rope(x, cos, sin):
    """Rotate x (B, nh, T, hs): halves (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    x1, x2 = x.chunk(2, dim=-1)  # the two halves
    rotated_half = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated_half * sin.to(x.dtype)  # fp32 angles: bf16 q stays bf16


# copied from 12_modern_gpt.py: Attention
class Attention(nn.Module):
    """Causal self-attention with n_kv_head <= n_head key/value heads, RoPE and QK-norm."""

    def __init__(self, config: ModernConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_size = config.head_size
        self.q_size = config.n_head * config.head_size
        self.kv_size = config.n_kv_head * config.head_size
        C = config.n_embd
        self.c_attn = nn.Linear(C, self.q_size + 2 * self.kv_size, bias=config.bias)
        self.c_proj = nn.Linear(self.q_size, C, bias=config.bias)
        self.qk_norm = config.qk_norm
        if config.qk_norm:  # one gain per head dimension
            self.q_norm = RMSNorm(config.head_size, config.norm_eps)
            self.k_norm = RMSNorm(config.head_size, config.norm_eps)

    def forward(self, x, rope=None, cache=None, layer=0):
        B, T, C = x.size()
        sizes = [self.q_size, self.kv_size, self.kv_size]
        q, k, v = self.c_attn(x).split(sizes, dim=2)
        hs = self.head_size
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, hs).transpose(1, 2)  # (B, n_kv, T, hs)
        v = v.view(B, T, self.n_kv_head, hs).transpose(1, 2)  # (B, n_kv, T, hs)
        if self.qk_norm:  # each head's vector, before RoPE
            q = self.q_norm(q)
            k = self.k_norm(k)
        if rope is not None:  # q and k only
            q = apply_rope(q, *rope)
            k = apply_rope(k, *rope)
        if cache is not None:  # the earlier tokens' k, v, then these
            k, v = cache.update(layer, k, v)  # (B, n_kv, L, hs)
        group = self.n_head // self.n_kv_head
        k = k.repeat_interleave(group, dim=1)  # (B, nh, L, hs)
        v = v.repeat_interleave(group, dim=1)
        y = causal_attention(q, k, v)
        y = y.transpose(1, 2).reshape(B, T, self.q_size)
        return self.c_proj(y)


# copied from 12_modern_gpt.py: causal_attention
def causal_attention(q, k, v):
    """SDPA of T new queries over L keys: the last T keys are theirs, the others cached."""
    T = q.size(2)
    L = k.size(2)
    start = L - T  # the first new token's position
    if start == 0:  # no cache yet: the plain causal triangle
        return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
    # query i sits at position start + i and sees keys 0 .. start + i
    mask = torch.ones(T, L, dtype=torch.bool, device=q.device).tril(diagonal=start)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# copied from 12_modern_gpt.py: MLP
class MLP(nn.Module):
    """04's GELU MLP, or SwiGLU: c_proj(silu(gate) * up) with [gate, up] = c_fc(x)."""

    def __init__(self, config: ModernConfig):
        super().__init__()
        C = config.n_embd
        H = config.mlp_hidden
        self.swiglu = config.mlp == "swiglu"
        self.c_fc = nn.Linear(C, 2 * H if self.swiglu else H, bias=config.bias)  # SwiGLU: 2H
        self.c_proj = nn.Linear(H, C, bias=config.bias)

    def forward(self, x):
        h = self.c_fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return self.c_proj(F.silu(gate) * up)
        return self.c_proj(F.gelu(h, approximate="tanh"))


# copied from 12_modern_gpt.py: Block
class Block(nn.Module):
    """04's pre-norm block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: ModernConfig):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = Attention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), rope, cache, layer)
        return x + self.mlp(self.ln_2(x))


# copied from 12_modern_gpt.py: cache_bytes_per_token
def cache_bytes_per_token(config: ModernConfig, dtype_bytes: int = 2) -> int:
    """KV cache bytes one token takes: key + value, per layer, n_kv_head heads (bf16: 2 bytes)."""
    return config.n_layer * 2 * config.n_kv_head * config.head_size * dtype_bytes


# copied from 12_modern_gpt.py: ModernGPT
class ModernGPT(nn.Module):
    """Embeddings -> blocks -> norm -> LM head; model(idx, targets) -> (logits, loss) as 04."""

    def __init__(self, config: ModernConfig):
        super().__init__()
        self.config = config
        C = config.n_embd
        blocks = [Block(config) for _ in range(config.n_layer)]
        layers = dict(wte=nn.Embedding(config.vocab_size, C),
                      h=nn.ModuleList(blocks), ln_f=make_norm(config, C))
        if config.pos == "learned":  # RoPE needs no table
            layers["wpe"] = nn.Embedding(config.block_size, C)
        self.transformer = nn.ModuleDict(layers)
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=residual_std)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None, cache=None):
        """idx (B, T) -> logits (B, T, V), loss; with a cache, idx are the new tokens only."""
        B, T = idx.shape
        start = 0 if cache is None else cache.length
        if start + T > self.config.block_size:
            raise ValueError(f"{start + T} positions exceed block_size="
                             f"{self.config.block_size}; crop the input")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.config.pos == "learned":
            x = x + self.transformer.wpe(pos)
        else:
            rope = rope_angles(pos, self.config.head_size, self.config.rope_theta)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, rope, cache, layer)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:  # in fp32, -100 skipped, as 04
            flat = logits.float().view(B * T, -1)
            loss = F.cross_entropy(flat, targets.reshape(B * T), ignore_index=-100)
        return logits, loss

    def num_params(self) -> int:
        """Parameters, a tied wte/lm_head counted once."""
        return sum(p.numel() for p in self.parameters())


if __name__ == "__main__":
    main()
