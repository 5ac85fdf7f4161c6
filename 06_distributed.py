"""06_distributed.py: one model, many processes. DDP, ZeRO-1 and FSDP2 under torchrun.

05 trained the GPT in one process. Here the same training runs on N processes: one per GPU, talking
through NCCL, or CPU processes talking through gloo (so it runs, and is tested, on a laptop). All three
strategies are data parallel: every rank runs the whole model on its own slice of each global batch,
and the ranks average their gradients, so N ranks with B/N rows each take the step one process takes
with B rows (the tests check it to 1e-6 on CPU; GPUs' TF32, bf16 and summation orders differ in the
last bits). They differ in what each rank holds, and in which collective runs when:

  per rank, P parameters,      params   grads    AdamW state  collectives in a step
  fp32 AdamW (bytes)
  ddp    replicate everything  4P       4P       8P           all-reduce grads during backward
  zero1  shard optimizer state 4P       4P       8P/N         all-reduce grads; broadcast params
  fsdp   shard everything      4P/N     4P/N     8P/N         all-gather params before each block's
                                                              forward and backward; reduce-scatter grads

(fsdp also holds about one block's gathered parameters at a time; rank 0 prints each rank's bytes.)
Then what a long job needs: activation checkpointing and torch.compile per block, checkpoints (on rank
0 in 05's format, or every rank's shards), and restarts that end with the weights of an uninterrupted
run (bit for bit on CPU), as batches and dropout are functions of (seed, step, rank).

References: Li et al. 2020 (DDP); Rajbhandari et al. 2020 (ZeRO); Zhao et al. 2023 (FSDP); Chen et al.
2016 (activation checkpointing); pytorch/torchtitan (FSDP2 in practice); karpathy/build-nanogpt.

Run (after `python 02_dataloader.py` has prepared the data):
  python 06_distributed.py                                  # a world of one, the same code path
  torchrun --standalone --nproc_per_node=2 06_distributed.py --strategy=fsdp   # 2 CPU ranks (gloo)
  torchrun --standalone --nproc_per_node=8 06_distributed.py --strategy=fsdp --compile --tokenizer=gpt2 \\
      --n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 --batch_size=64 \\
      --gradient_accumulation_steps=8                          # 8 GPUs (nccl): GPT-2 small
  # rank 1 dies after step 25, torchrun restarts both, they resume at step 20 (the variable: pytorch#135712)
  TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --standalone --nproc_per_node=2 --max-restarts=1 \\
      06_distributed.py --init_from=auto --out_dir=out/restart --max_iters=40 --checkpoint_interval=10 \\
      --fail_at_step=25
  # several machines: the same command on every node (HOST = node 0's address)
  torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --rdzv-id=gpt \\
      06_distributed.py --strategy=fsdp --init_from=auto --batch_size=64
"""

import argparse
import gc
import json
import math
import os
import shutil
import signal
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from datetime import timedelta
from pathlib import Path
from typing import Annotated, ClassVar

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.state_dict as dsd
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed._composable import checkpoint as checkpoint_activations
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

DATA_DIR = Path(__file__).resolve().parent / "data"

# -----------------------------------------------------------------------------
# 1. The process group: who am I, how many are we, how do we talk


@dataclass
class Dist:
    """This process's place in the job (what init_distributed returns)."""

    rank: int  # 0 .. world_size-1 over all machines; rank 0 prints and writes the full checkpoint
    local_rank: int  # index on this machine: which of its GPUs this process drives (see init_distributed)
    world_size: int
    device: str  # "cuda:<LOCAL_RANK modulo the GPUs this process sees>" or "cpu"
    owns_group: bool  # init_distributed made the group, so shutdown_distributed destroys it


def print0(*args):
    """print() on rank 0 only: eight ranks printing the same line eight times help nobody."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


def init_distributed(device: str = "auto") -> Dist:
    """Join the process group that torchrun prepared, or make a world of one (the same code runs,
    every collective a no-op); a group that exists already (a test's ranks) is joined, left alone.
    torchrun starts one process per GPU (or CPU slot) and tells each who it is in environment
    variables: RANK (global index), LOCAL_RANK (index on this machine: which GPU), WORLD_SIZE, and
    MASTER_ADDR:MASTER_PORT, a store where the ranks find each other. The backend moves the bytes:
    NCCL for CUDA tensors (NVLink, InfiniBand), gloo for CPU tensors (TCP)."""
    owns_group, torchrun = not dist.is_initialized(), "RANK" in os.environ
    missing = [v for v in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if owns_group and torchrun and missing:
        raise ValueError(f"RANK is set but {', '.join(missing)} not: start the job with torchrun "
                         "(torchrun --standalone --nproc_per_node=2 06_distributed.py), or unset RANK")
    local_rank = int(os.environ.get("LOCAL_RANK", 0 if owns_group else dist.get_rank()))
    device = pick_device(device)
    if device.startswith("cuda"):  # one GPU per process: the LOCAL_RANK-th, or the one a launcher bound
        device = f"cuda:{local_rank if torch.cuda.device_count() > 1 else 0}"
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # TF32 tensor cores
    else:  # NCCL moves only CUDA tensors and gloo only CPU ones: mps trains on the CPU here
        device = "cpu"
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if owns_group:  # torchrun's rendezvous, or a group of one whose store lives in this process
        dist.init_process_group(backend, device_id=torch.device(device) if backend == "nccl" else None,
                                timeout=timedelta(minutes=30),  # ranks wait at a barrier while rank 0 saves
                                **({} if torchrun else dict(store=dist.HashStore(), rank=0, world_size=1)))
    return Dist(dist.get_rank(), local_rank, dist.get_world_size(), device, owns_group)


def shutdown_distributed(ctx: Dist, failed: bool = False):
    """Leave the group in an order that cannot hang: a barrier (not after an error: the others may wait
    elsewhere), gc.collect() to free a dropped DDP (gloo can deadlock under it), then destroy it."""
    if ctx.owns_group:
        if not failed:
            dist.barrier()
        gc.collect()
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# 2. Settings, all checked before any work


@dataclass
class DistConfig:
    """Train 04's GPT on N processes with DDP, ZeRO-1 or FSDP2 (launch with torchrun; see the docstring)."""

    # data, as 02 prepared it: data_dir/<dataset>-<tokenizer>/{train.bin, val.bin, meta.json}
    dataset: Annotated[str, "the corpus that 02_dataloader.py prepared"] = "tinyshakespeare"
    tokenizer: Annotated[str, "char or gpt2: which of 02's token files to read"] = "char"
    data_dir: Annotated[str, "where 02 put the prepared corpora; '' = data/ next to this script"] = ""
    out_dir: Annotated[str, "ckpt.pt (or dcp-latest.pt and dcp-*/ when sharded)"] = "out/distributed"
    init_from: Annotated[str, "scratch, resume, or auto: resume if out_dir has a checkpoint"] = "scratch"
    overwrite: Annotated[bool, "start afresh even if out_dir holds a checkpoint (it is replaced)"] = False
    # model (04's GPTConfig), defaults 05's CPU recipe; then distributed (parallelize, save)
    n_layer: Annotated[int, "transformer blocks"] = 4
    n_head: Annotated[int, "attention heads per block"] = 4
    n_embd: Annotated[int, "width of the residual stream"] = 128
    block_size: Annotated[int, "context length in tokens"] = 64
    dropout: Annotated[float, "masks are drawn per (seed, step, rank), so a restart replays them"] = 0.0
    bias: Annotated[bool, "biases in Linear and LayerNorm"] = False
    strategy: Annotated[str, "ddp, zero1 or fsdp: what each rank holds (see the table above)"] = "ddp"
    activation_checkpointing: Annotated[bool, "keep each block's input only; rerun it in backward"] = False
    compile: Annotated[bool, "torch.compile each block, before sharding (see parallelize)"] = False
    sync_every_micro_step: Annotated[bool, "fsdp: reduce-scatter every micro-step, or the last only"] = True
    sharded_checkpoint: Annotated[bool, "every rank writes its own shards (DCP); else rank 0 all"] = False
    fail_at_step: Annotated[int, "fault injection: the last rank dies after this step (first attempt)"] = 0
    # optimization, as 05: a step is gradient_accumulation_steps micro-batches of batch_size rows
    batch_size: Annotated[int, "rows per micro-batch over ALL ranks; each takes 1/world_size"] = 12
    gradient_accumulation_steps: Annotated[int, "micro-batches per optimizer step"] = 1
    max_iters: Annotated[int, "optimizer steps in total"] = 2000
    optimizer: Annotated[str, "adamw (05's configure_optimizers) or sgd (the tests' sharp check)"] = "adamw"
    learning_rate: Annotated[float, "peak learning rate, reached after warmup"] = 1e-3
    weight_decay: Annotated[float, "AdamW's, on the 2-D weights only"] = 0.1
    beta1: Annotated[float, "AdamW's momentum"] = 0.9
    beta2: Annotated[float, "AdamW's second-moment decay"] = 0.99
    grad_clip: Annotated[float, "clip the global gradient norm to this; 0 = no clipping"] = 1.0
    decay_lr: Annotated[bool, "warmup + cosine decay; false = constant learning_rate"] = True
    warmup_iters: Annotated[int, "linear warmup steps"] = 100
    lr_decay_iters: Annotated[int, "the cosine reaches min_lr here (usually = max_iters)"] = 2000
    min_lr: Annotated[float, "~learning_rate / 10"] = 1e-4
    eval_interval: Annotated[int, "val loss every this many steps (and at the end)"] = 250
    eval_iters: Annotated[int, "val batches per evaluation"] = 20
    log_interval: Annotated[int, "a log line every this many steps"] = 10
    checkpoint_interval: Annotated[int, "a checkpoint every this many steps (and at the end)"] = 100
    device: Annotated[str, "auto, cpu or cuda: rank r drives cuda:LOCAL_RANK"] = "auto"
    dtype: Annotated[str, "auto (bf16 on GPUs that have it, else fp32), float32 or bfloat16"] = "auto"
    threads: Annotated[int, "CPU threads per rank; 0 = PyTorch's default (torchrun: 1 per rank)"] = 0
    seed: Annotated[int, "seeds the weights (the same on every rank), the batches and dropout"] = 1337

    def __post_init__(self):
        """Every check that needs no training: a mistake is one `error:` line, before any work."""
        choices = {"strategy": ("ddp", "zero1", "fsdp"), "optimizer": ("adamw", "sgd"),
                   "init_from": ("scratch", "resume", "auto"), "dtype": ("auto", "float32", "bfloat16")}
        for name, allowed in choices.items():  # (no float16: it needs 05's gradient scaler)
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; use {', '.join(allowed[:-1])} "
                                 f"or {allowed[-1]}")
        for name in ("gradient_accumulation_steps", "eval_interval", "eval_iters", "log_interval",
                     "checkpoint_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        n = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's (get_batch checks the group's)
        if self.batch_size <= 0 or self.batch_size % n:
            raise ValueError(f"batch_size={self.batch_size} (the global micro-batch) does not split across "
                             f"{n} ranks; use a multiple of {n}, e.g. "
                             f"--batch_size={n * max(1, round(self.batch_size / n))}")
        if self.sharded_checkpoint and self.strategy == "zero1":
            raise ValueError("--sharded_checkpoint needs --strategy=ddp or fsdp: torch.distributed."
                             "checkpoint cannot read ZeRO's optimizer; zero1 writes the full checkpoint")
        pick_dtype(self.dtype, pick_device(self.device))  # both name the fix
        meta = load_meta(self.corpus_dir)  # no prepared data: its error names the 02 command
        if min(meta["train_tokens"], meta["val_tokens"]) <= self.block_size:
            raise ValueError(f"{self.corpus_dir} has {meta['train_tokens']} train and {meta['val_tokens']} "
                             f"val tokens, too few for --block_size={self.block_size}; use a smaller one")
        model_args = self.model_args(meta["n_vocab"])
        GPTConfig(**model_args)  # the model's shape: n_embd % n_head, ...
        if self.init_from == "resume" and not self.ckpt_path.exists():
            raise FileNotFoundError(f"--init_from=resume: no checkpoint at {self.ckpt_path}; check "
                                    "--out_dir, or use --init_from=auto to start afresh when there is none")
        if self.init_from == "scratch" and self.ckpt_path.exists() and not self.overwrite:
            raise ValueError(f"{self.ckpt_path} exists and this run would overwrite it; continue it with "
                             "--init_from=resume, train into another --out_dir, or replace it: --overwrite")
        if self.init_from != "scratch" and self.ckpt_path.exists():  # mmap: the weights are not read
            saved = torch.load(self.ckpt_path, map_location="cpu", mmap=True, weights_only=True)["model_args"]
            if saved != model_args:
                raise ValueError(f"{self.ckpt_path} holds another model, {saved}; resume it with its "
                                 "settings, or train into another --out_dir")

    @property
    def corpus_dir(self) -> Path:
        return Path(self.data_dir or DATA_DIR) / f"{self.dataset}-{self.tokenizer}"

    @property
    def ckpt_path(self) -> Path:  # the full checkpoint, or the pointer to the latest sharded one
        return Path(self.out_dir) / ("dcp-latest.pt" if self.sharded_checkpoint else "ckpt.pt")

    def model_args(self, vocab_size: int) -> dict:
        return dict(block_size=self.block_size, vocab_size=vocab_size, n_layer=self.n_layer,
                    n_head=self.n_head, n_embd=self.n_embd, dropout=self.dropout, bias=self.bias)


# -----------------------------------------------------------------------------
# 3. The strategies: what each rank holds, and which collective runs when


def parallelize(model: nn.Module, cfg: DistConfig, ctx: Dist) -> nn.Module:
    """Per block, torchtitan's order: activation checkpointing, compile, DDP or FSDP (whose collectives
    then wrap the compiled blocks). All in place: parameter names, and so checkpoints, stay 05's."""
    for block in model.transformer.h:
        if cfg.activation_checkpointing:
            # else every intermediate of every block (q, k, v, the 4x-wide MLP...) waits for backward;
            # with it a block keeps its input (B, T, C) and reruns: ~33% more compute, far less memory
            checkpoint_activations(block)
        if cfg.compile:
            # fuses the block's elementwise work (LayerNorm, GELU, residual adds) into few kernels:
            # less memory traffic and fewer saved intermediates, for a compilation at startup
            block.compile(dynamic=False)  # static: with accumulation, evaluation's batch gets its own graph
    if cfg.strategy != "fsdp":
        # DDP (and zero1): construction broadcasts rank 0's weights; backward all-reduces (averages) the
        # gradients in ~25 MB buckets as each is ready, overlapping with the rest (.grad: bucket views)
        device_ids = [torch.device(ctx.device).index] if ctx.device.startswith("cuda") else None
        return DDP(model, device_ids=device_ids, gradient_as_bucket_view=True)
    # FSDP2 (ZeRO-3): fully_shard(block) makes each parameter a DTensor holding this rank's 1/N slice
    # of dim 0, so the optimizer built afterwards holds sharded state too. An all-gather rebuilds a
    # block's parameters before its forward (freed after) and its backward; then a reduce-scatter leaves
    # each rank its slice's averaged gradient. Block by block, then the root (embeddings, head, kept
    # gathered from forward to backward): a rank holds its shards, the root's parameters and about one
    # block in full. Traffic: 1.5x DDP's all-reduce. Over A micro-steps each reduce-scatters (A times the
    # traffic, gradients stay sharded); --sync_every_micro_step=false keeps full gradients (4P bytes
    # more) until the last: 1/A of it. bf16: gathered as bf16 (half the traffic), reduced in fp32; inputs
    # are cast too, so the residual stream adds in bf16 (05, DDP: fp32): losses differ slightly from DDP's.
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cfg.dtype == "bfloat16" else None,
                                  reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, mp_policy=policy)
    return fully_shard(model, mp_policy=policy)


def build_optimizer(cfg: DistConfig, model: nn.Module, ctx: Dist) -> torch.optim.Optimizer:
    """AdamW (05's configure_optimizers) or plain SGD; for zero1, wrapped in ZeRO stage 1:
    ZeroRedundancyOptimizer, over a DDP model: each rank owns about 1/N of the parameters (whole
    tensors, dealt out greedily by size) and keeps optimizer state for those only. After DDP's
    all-reduce every rank updates just its own parameters, then broadcasts them so that the replicas
    are equal again. (ZeRO-2 shards the gradients as well, ZeRO-3 the parameters too: FSDP.)"""
    if cfg.optimizer == "sgd":  # no state: a gradient that is 2x too large moves the weights 2x
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate)
    else:
        optimizer = configure_optimizers(getattr(model, "module", model), cfg.weight_decay, cfg.learning_rate,
                                         (cfg.beta1, cfg.beta2), torch.device(ctx.device).type)
    if cfg.strategy == "zero1":  # the same groups; the optimizer above made no state yet: it cost nothing
        optimizer = ZeroRedundancyOptimizer(optimizer.param_groups, optimizer_class=type(optimizer),
                                            lr=cfg.learning_rate)
    return optimizer


def memory_report(model: nn.Module, optimizer, ctx: Dist) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state this rank holds (after a step), counted on
    the tensors themselves (a DTensor, FSDP's, counts its local shard); rank 0 prints every rank's."""
    params = list(model.parameters())  # a tied weight (wte = lm_head) is listed once
    state = getattr(optimizer, "optim", optimizer).state  # ZeRO keeps its state in a local optimizer
    tensors = {"params": params, "grads": [p.grad for p in params if p.grad is not None],
               "optimizer": [v for s in state.values() for v in s.values() if torch.is_tensor(v)]}
    memory = {kind: sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in ts)
              for kind, ts in tensors.items()}
    everyone = [None] * ctx.world_size
    dist.all_gather_object(everyone, memory)
    print0(f"{'rank':>4} {'params':>10} {'grads':>10} {'optimizer':>10} {'total':>10}   MB after one step")
    for r, m in enumerate(everyone):
        print0(f"{r:>4} " + " ".join(f"{v / 2**20:>10.3f}" for v in [*m.values(), sum(m.values())]))
    return memory


# -----------------------------------------------------------------------------
# 4. Checkpoints: the full state on rank 0 in 05's format, or every rank's shards


def rekey(optim_sd: dict, model: nn.Module, optimizer, to_names: bool) -> dict:
    """Key optimizer state by parameter name (torch.distributed.checkpoint's way), or back by number."""
    named = {p: name for name, p in getattr(model, "module", model).named_parameters()}
    names = [named[p] for group in optimizer.param_groups for p in group["params"]]
    key = dict(enumerate(names)) if to_names else {name: i for i, name in enumerate(names)}
    groups = [{**group, "params": [key[k] for k in group["params"]]} for group in optim_sd["param_groups"]]
    return {"state": {key[k]: v for k, v in optim_sd["state"].items()}, "param_groups": groups}


def save(cfg: DistConfig, model, optimizer, ctx: Dist, extra: dict):
    """Write the checkpoint; every rank calls this (it runs collectives). Full: get_model_state_dict
    and get_optimizer_state_dict know every wrapper; for FSDP they gather one tensor at a time straight
    to rank 0's CPU, so no GPU holds the whole model; ZeRO's consolidate_state_dict sends rank 0 each
    rank's state. Numbered like optimizer.state_dict(), the file is 05's. Sharded (too large to
    gather): every rank writes its shards with torch.distributed.checkpoint, plus an index of which
    slice lies where, so another world size can load them; rank 0 moves the pointer (dcp-latest.pt)
    once a save is complete, so a crash mid-save leaves the last one usable."""
    if cfg.sharded_checkpoint:
        name = f"dcp-{extra['iter_num']:06d}"  # a new directory per save; each rank writes its own shards
        dcp.save(dict(zip(("model", "optimizer"), dsd.get_state_dict(model, optimizer))),
                 checkpoint_id=Path(cfg.out_dir) / name)
        if ctx.rank == 0:  # dcp.save returns once every rank's part and the metadata are written
            save_checkpoint(cfg.ckpt_path, {"path": name, **extra})
            for old in (d for d in Path(cfg.out_dir).glob("dcp-0*") if d.name != name):  # superseded
                shutil.rmtree(old)
    else:
        options = dsd.StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = dsd.get_model_state_dict(model, options=options)
        if isinstance(optimizer, ZeroRedundancyOptimizer):  # its copies to the CPU do not wait: we do
            optimizer.consolidate_state_dict(to=0)
            torch.get_device_module(ctx.device).synchronize()  # (on the CPU a no-op)
            optim_sd = optimizer.state_dict() if ctx.rank == 0 else None
        else:
            optim_sd = dsd.get_optimizer_state_dict(model, optimizer, options=options)
            optim_sd = rekey(optim_sd, model, optimizer, to_names=False) if ctx.rank == 0 else None
        if ctx.rank == 0:
            save_checkpoint(cfg.ckpt_path, {"model": model_sd, "optimizer": optim_sd, **extra})
    # the others wait for the file: ranks that ran ahead would wait for rank 0 in the next step's
    # collectives instead, and on a slow shared filesystem could reach the collective timeout
    dist.barrier()


def resume(cfg: DistConfig, model, optimizer) -> tuple[int, float]:
    """(iter_num, best_val_loss) of out_dir's checkpoint, loaded into any strategy at any world size if
    init_from says so. Every rank reads the file: out_dir must be on a filesystem all nodes see."""
    if cfg.init_from == "scratch" or not cfg.ckpt_path.exists():
        return 0, float("inf")
    # mmap: the ranks of one machine share the file's pages instead of each reading a copy
    ckpt = torch.load(cfg.ckpt_path, map_location="cpu", mmap=True, weights_only=True)
    if cfg.sharded_checkpoint:  # DCP fills templates of what this rank holds, re-slicing as needed
        state = dict(zip(("model", "optimizer"), dsd.get_state_dict(model, optimizer)))
        dcp.load(state, checkpoint_id=Path(cfg.out_dir) / ckpt["path"])
        dsd.set_state_dict(model, optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"])
    else:  # every rank passes the full state; FSDP keeps its slices, ZeRO the state of its parameters
        dsd.set_model_state_dict(model, ckpt["model"], options=dsd.StateDictOptions(full_state_dict=True))
        if isinstance(optimizer, ZeroRedundancyOptimizer):
            optimizer.load_state_dict(ckpt["optimizer"])
            # subtle: ZeRO's load_state_dict moves 0-dim state (Adam's step) to the CPU, where fused
            # CUDA AdamW fails (pytorch/pytorch#124133): every state tensor goes to its parameter's device
            for p, state in optimizer.optim.state.items():
                state.update({k: v.to(p.device) for k, v in state.items() if torch.is_tensor(v)})
            optimizer.state.clear()  # the base class keeps a second copy, which ZeRO never reads: memory back
        else:
            dsd.set_optimizer_state_dict(model, optimizer, rekey(ckpt["optimizer"], model, optimizer, True),
                                         options=dsd.StateDictOptions(full_state_dict=True))
    print0(f"resuming at iter {ckpt['iter_num']} of {cfg.max_iters} from {cfg.ckpt_path}")
    return ckpt["iter_num"], ckpt["best_val_loss"]


# -----------------------------------------------------------------------------
# 5. Training: 05's loop, data parallel


def train_step(model, optimizer, data, cfg: DistConfig, ctx: Dist, it: int) -> tuple[torch.Tensor, ...]:
    """05's step on global batch `it`, each rank on its 1/N of the rows (so the gradient is the mean
    over the same rows, up to the order of float additions): (this rank's mean loss, global gradient
    norm), tensors still: reading them waits for the GPU, so the loop does it on log steps only."""
    optimizer.zero_grad(set_to_none=True)  # here, not after the step: memory_report sees the gradients
    accumulation = cfg.gradient_accumulation_steps
    x, y = get_batch(data, cfg.batch_size * accumulation, cfg.block_size, it, cfg.seed, ctx.rank,
                     ctx.world_size, ctx.device)  # (A * B/N, T): this rank's rows
    loss_sum = torch.zeros((), device=ctx.device)
    for micro, (xb, yb) in enumerate(zip(x.chunk(accumulation), y.chunk(accumulation))):
        last, sync = micro == accumulation - 1, nullcontext()
        if isinstance(model, DDP) and not last:  # DDP (and zero1): no all-reduce until the last backward
            sync = model.no_sync()
        elif not isinstance(model, DDP) and not cfg.sync_every_micro_step:  # FSDP: see parallelize
            model.set_requires_gradient_sync(last)
        # autocast as 05, with FSDP too: softmax and LayerNorm then run in fp32 as in one process
        with sync:
            with torch.autocast(xb.device.type, getattr(torch, cfg.dtype), enabled=cfg.dtype != "float32"):
                _, loss = model(xb, yb)
            (loss / accumulation).backward()  # outside autocast; .grad adds up: the mean of the micro-batches
        loss_sum += loss.detach()
    # with FSDP the gradients are DTensors: the norm is computed over every rank's shards
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
    optimizer.step()
    return loss_sum / accumulation, norm


@torch.no_grad()
def evaluate(model, tokens, cfg: DistConfig, ctx: Dist, step: int) -> float:
    """05's val loss, data parallel: each rank its rows of the same batches; the mean of means is 05's."""
    model.eval()
    loss = torch.zeros((), device=ctx.device)
    for k in range(cfg.eval_iters):
        x, y = get_batch(tokens, cfg.batch_size, cfg.block_size, step * cfg.eval_iters + k, cfg.seed + 1,
                         ctx.rank, ctx.world_size, ctx.device)
        with torch.autocast(x.device.type, getattr(torch, cfg.dtype), enabled=cfg.dtype != "float32"):
            loss += model(x, y)[1].float()
    dist.all_reduce(loss)  # a sum: gloo has no average
    model.train()
    return loss.item() / (cfg.eval_iters * ctx.world_size)


def train(cfg: DistConfig, ctx: Dist) -> dict:
    """05's loop, data parallel (init_distributed first): {"iter_num", "losses" ({step: mean over the
    ranks} at log steps), "val_loss", "memory" (this rank's), "local_state" (its own parameters)}."""
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    dtype = pick_dtype(cfg.dtype, ctx.device)  # float16 on GPUs without bf16: 06 has no gradient scaler
    cfg = replace(cfg, device=ctx.device, dtype="float32" if dtype == "float16" else dtype)
    data = {split: load_tokens(cfg.corpus_dir, split) for split in ("train", "val")}
    meta = load_meta(cfg.corpus_dir)
    model_args = cfg.model_args(meta["n_vocab"])
    # the same initial weights on every rank: DDP would broadcast rank 0's anyway, but fully_shard
    # keeps each rank's slice of whatever that rank built
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(**model_args)).to(ctx.device)
    tokens_per_iter = cfg.batch_size * cfg.gradient_accumulation_steps * cfg.block_size
    print0(f"{cfg.strategy} on {ctx.world_size} rank(s) ({ctx.device}, {cfg.dtype}): {model.num_params():,} "
           f"params | {tokens_per_iter:,} tokens a step, {cfg.batch_size // ctx.world_size} rows per rank")
    model = parallelize(model, cfg, ctx)
    optimizer = build_optimizer(cfg, model, ctx)
    start, best_val_loss = resume(cfg, model, optimizer)
    if start >= cfg.max_iters:
        print0(f"nothing left to do at iter {start} of {cfg.max_iters}; to train it longer: "
               f"--init_from=resume --max_iters={start + cfg.max_iters}")
    losses, memory, val_loss, t0, window = {}, None, None, time.perf_counter(), 0  # window: steps since t0
    for it in range(start, cfg.max_iters):
        lr = get_lr(it, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # dropout masks are a function of (seed, step, rank), like the batches: a resumed run replays them
        torch.manual_seed(cfg.seed + it * ctx.world_size + ctx.rank)
        loss, norm = train_step(model, optimizer, data["train"], cfg, ctx, it)
        iter_num, window = it + 1, window + 1
        if memory is None:  # after the first step of every run
            memory = memory_report(model, optimizer, ctx)
        logged, evaluated, saved = (iter_num % n == 0 or iter_num == cfg.max_iters
                                    for n in (cfg.log_interval, cfg.eval_interval, cfg.checkpoint_interval))
        if logged:
            dist.all_reduce(loss)  # a sum: gloo has no average
            losses[it] = loss.item() / ctx.world_size
            norm = (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()
            dt = (time.perf_counter() - t0) / window
            print0(f"iter {iter_num}/{cfg.max_iters} | loss {losses[it]:.4f} | lr {lr:.2e} | grad norm "
                   f"{norm:.3f} | {1000 * dt:.1f} ms | {tokens_per_iter / dt:,.0f} tok/s")
        if evaluated:
            val_loss = evaluate(model, data["val"], cfg, ctx, iter_num)
            best_val_loss = min(best_val_loss, val_loss)
            print0(f"iter {iter_num}: val loss {val_loss:.4f}")
        if saved:  # 05's format (see save_checkpoint); the model and optimizer are gathered in save()
            save(cfg, model, optimizer, ctx, {"model_args": model_args, "tokenizer": meta["tokenizer"],
                 "config": asdict(cfg), "stage": "distributed", "iter_num": iter_num, "best_val_loss":
                 best_val_loss, "val_loss": val_loss, "scaler": {}, "rng": rng_states()})
        # --fail_at_step: the last rank dies as in a crash; on torchrun's first attempt only
        if iter_num == cfg.fail_at_step and ctx.rank == ctx.world_size - 1 and \
                os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            print(f"fault injection: rank {ctx.rank} dies after step {iter_num}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if logged or evaluated or saved:  # restart the clock: evaluations and saves are not steps
            t0, window = time.perf_counter(), 0
    local_state = {name: (p.to_local() if isinstance(p, DTensor) else p).detach()
                   for name, p in getattr(model, "module", model).named_parameters()}
    return {"iter_num": max(start, cfg.max_iters), "losses": losses, "val_loss": val_loss, "memory": memory,
            "local_state": local_state}


def main(argv=None) -> dict:
    cfg = parse_config(DistConfig, argv)
    ctx = init_distributed(cfg.device)
    try:
        result = train(cfg, ctx)
    except BaseException as error:
        # the traceback holds train()'s frames and through them the model: let it go first
        traceback.clear_frames(error.__traceback__)
        shutdown_distributed(ctx, failed=True)
        raise
    shutdown_distributed(ctx)
    return result


# -----------------------------------------------------------------------------
# Appendix: pieces copied unchanged from earlier stages, so that this file runs on its own.
# Each is its origin's text byte for byte (tests/test_copies.py checks); read them there.

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


# copied from 05_pretrain.py: configure_optimizers
def configure_optimizers(model, weight_decay: float, learning_rate: float, betas, device_type: str):
    """AdamW with weight decay on the 2-D tensors only; frozen parameters (LoRA) are left out."""
    params = [p for p in model.parameters() if p.requires_grad]  # a tied weight appears once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fast = {"fused": True} if device_type in ("cuda", "cpu") else {"foreach": True}
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **fast)


# copied from 05_pretrain.py: get_lr
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


# copied from 05_pretrain.py: rng_states
def rng_states() -> dict:
    """The states of torch's random generators (CPU and every GPU): dropout draws from them."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


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


if __name__ == "__main__":
    main()
