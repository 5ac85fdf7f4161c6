"""06_distributed.py: one model, many processes. DDP, ZeRO-1 and FSDP2 under torchrun.

05 trained the GPT in one process. Here the same training runs on N processes: one per GPU, talking
through NCCL, or CPU processes talking through gloo (so it runs, and is tested, on a laptop). All three
strategies are data parallel: every rank runs the whole model on its own slice of each global batch,
and the ranks average their gradients, so N ranks with B/N rows each take exactly the step one process
takes with B rows (the tests check it to 1e-6). They differ in what each rank holds, and in which
collective runs when:

  per rank, P parameters,      params   grads    AdamW state  collectives in a step
  fp32 AdamW (bytes)
  ddp    replicate everything  4P       4P       8P           all-reduce grads during backward
  zero1  shard optimizer state 4P       4P       8P/N         all-reduce grads; broadcast params
  fsdp   shard everything      4P/N     4P/N     8P/N         all-gather params before each block's
                                                              forward and backward; reduce-scatter grads

(fsdp also holds about one block's gathered parameters at a time.) After the first step each rank
counts these bytes on the tensors it really holds (FSDP's local shards), and rank 0 prints them.
Then what a long job needs: activation checkpointing and torch.compile per block; checkpoints, either
the full state gathered to rank 0 in 05's format (05, 09 and any world size load it) or shards that
every rank writes with torch.distributed.checkpoint; and fault tolerance: under `torchrun
--max-restarts=K` a crashed rank makes torchrun restart every rank, and with --init_from=auto they
resume from the last checkpoint. Batches (02's get_batch) and dropout masks are functions of (seed,
step, rank), so the job ends with exactly the weights of an uninterrupted one.

References: Li et al. 2020, "PyTorch Distributed" (DDP); Rajbhandari et al. 2020, "ZeRO: Memory
Optimizations Toward Training Trillion Parameter Models"; Zhao et al. 2023, "PyTorch FSDP"; Chen et
al. 2016, "Training Deep Nets with Sublinear Memory Cost"; pytorch/torchtitan; karpathy/build-nanogpt.

Run (after `python 02_dataloader.py` has prepared the data):
  python 06_distributed.py                                  # a world of one, the same code path
  torchrun --standalone --nproc_per_node=2 06_distributed.py --strategy=fsdp   # 2 CPU ranks (gloo)
  torchrun --standalone --nproc_per_node=8 06_distributed.py --strategy=fsdp --compile --tokenizer=gpt2 \\
      --n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 --batch_size=64 \\
      --gradient_accumulation_steps=8                          # 8 GPUs (nccl): GPT-2 small
  # rank 1 dies after step 25, torchrun restarts both, they resume at step 20. The variable keeps
  # restarted ranks from reading a dead rank's address in torchrun's store (pytorch/pytorch#135712)
  TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --standalone --nproc_per_node=2 --max-restarts=1 \\
      06_distributed.py --init_from=auto --out_dir=out/restart --max_iters=40 --checkpoint_interval=10 \\
      --fail_at_step=25
  # several machines: the same command on every node (HOST = node 0's address)
  torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --rdzv-id=gpt \\
      06_distributed.py --strategy=fsdp --init_from=auto
"""

import argparse
import gc
import json
import math
import os
import random
import shutil
import signal
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import ClassVar

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
STRATEGIES = ("ddp", "zero1", "fsdp")

# -----------------------------------------------------------------------------
# 1. The process group: who am I, how many are we, how do we talk


@dataclass
class Dist:
    """This process's place in the job (what init_distributed returns)."""

    rank: int  # 0 .. world_size-1 over all machines; rank 0 prints and writes the full checkpoint
    local_rank: int  # index on this machine: which GPU this process drives
    world_size: int
    device: str  # "cuda:<local_rank>" or "cpu"
    owns_group: bool  # init_distributed made the group, so shutdown_distributed destroys it


def print0(*args):
    """print() on rank 0 only: eight ranks printing the same line eight times help nobody."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


def init_distributed(device: str = "auto") -> Dist:
    """Join the process group that torchrun prepared, or make a world of one.

    torchrun starts one process per GPU (or CPU slot) and tells each who it is in environment
    variables: RANK (global index), LOCAL_RANK (index on this machine: which GPU), WORLD_SIZE, and
    MASTER_ADDR:MASTER_PORT, a key-value store where the ranks find each other. init_process_group
    reads them and connects every rank to the others. The backend moves the bytes: NCCL for CUDA
    tensors (NVLink, InfiniBand), gloo for CPU tensors (TCP). Plain `python 06_distributed.py` gets
    a group of one with its store in this process, so the same code runs and every collective is a
    no-op. A group that exists already (a test's ranks) is joined and left alone.
    """
    owns_group = not dist.is_initialized()
    missing = [v for v in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if owns_group and "RANK" in os.environ and missing:
        raise ValueError(f"RANK is set but {', '.join(missing)} not: start the job with torchrun "
                         "(torchrun --standalone --nproc_per_node=2 06_distributed.py), or unset RANK")
    local_rank = int(os.environ.get("LOCAL_RANK", 0 if owns_group else dist.get_rank()))
    device = pick_device(device)
    if device.startswith("cuda"):  # one GPU per process: the LOCAL_RANK-th of this machine
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32: fp32 matmuls on the tensor cores
        torch.backends.cudnn.allow_tf32 = True
    else:  # NCCL moves only CUDA tensors and gloo only CPU ones: mps trains on the CPU here
        device = "cpu"
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if owns_group and "RANK" in os.environ:
        dist.init_process_group(backend, device_id=torch.device(device) if backend == "nccl" else None)
    elif owns_group:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Dist(dist.get_rank(), local_rank, dist.get_world_size(), device, owns_group)


def shutdown_distributed(ctx: Dist, failed: bool = False):
    """Leave the group in an order that cannot hang: a barrier (skipped after an error, when the
    others may wait in another collective), gc.collect() to free the DDP objects the caller dropped
    (gloo can deadlock if the group goes while DDP holds it), then destroy the group."""
    if ctx.owns_group:
        if not failed:
            dist.barrier()
        gc.collect()
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# 2. Settings, all checked before any work


# (arg is called when DistConfig is defined, so its copy stands here, above it, not in the appendix)
# copied from 05_pretrain.py: arg
def arg(default, help: str):
    """A dataclass field with its --help text: `n_layer: int = arg(4, "transformer blocks")`."""
    return field(default=default, metadata={"help": help})


@dataclass
class DistConfig:
    """Train 04's GPT on N processes with DDP, ZeRO-1 or FSDP2 (launch with torchrun; see the docstring)."""

    # data, as 02 prepared it: data_dir/<dataset>-<tokenizer>/{train.bin, val.bin, meta.json}
    dataset: str = arg("tinyshakespeare", "the corpus that 02_dataloader.py prepared")
    tokenizer: str = arg("char", "char or gpt2: which of 02's token files to read")
    data_dir: str = arg("", "where 02 put the prepared corpora; '' = data/ next to this script")
    out_dir: str = arg("out/distributed", "ckpt.pt (or dcp-latest.pt and dcp-*/ when sharded)")
    init_from: str = arg("scratch", "scratch, resume (out_dir's checkpoint), or auto: resume if there is "
                                    "one (what torchrun --max-restarts and a requeued job need)")
    overwrite: bool = arg(False, "start afresh even if out_dir holds a checkpoint (it is replaced)")
    # model (04's GPTConfig); defaults: 05's CPU recipe
    n_layer: int = arg(4, "transformer blocks")
    n_head: int = arg(4, "attention heads per block")
    n_embd: int = arg(128, "width of the residual stream")
    block_size: int = arg(64, "context length in tokens")
    dropout: float = arg(0.0, "masks are drawn per (seed, step, rank), so a restart replays them")
    bias: bool = arg(False, "biases in Linear and LayerNorm")
    # distributed
    strategy: str = arg("ddp", "ddp, zero1 or fsdp: what each rank holds (see the table above)")
    activation_checkpointing: bool = arg(False, "keep each block's input only; rerun it in backward")
    compile: bool = arg(False, "torch.compile each block, before sharding (see parallelize)")
    sync_every_micro_step: bool = arg(True, "fsdp: reduce-scatter gradients every micro-step (sharded); "
                                            "false: on the last only (full-size, less traffic)")
    sharded_checkpoint: bool = arg(False, "every rank writes its own shards (DCP); else rank 0 all")
    fail_at_step: int = arg(0, "fault injection: the last rank dies after this step (first attempt)")
    # optimization, as 05: a step is gradient_accumulation_steps micro-batches of batch_size rows
    batch_size: int = arg(12, "rows per micro-batch over ALL ranks; each takes batch_size / world_size")
    gradient_accumulation_steps: int = arg(1, "micro-batches per optimizer step")
    max_iters: int = arg(2000, "optimizer steps in total")
    optimizer: str = arg("adamw", "adamw (05's configure_optimizers) or sgd (the tests' sharp check)")
    learning_rate: float = arg(1e-3, "peak learning rate, reached after warmup")
    weight_decay: float = arg(0.1, "AdamW's, on the 2-D weights only")
    beta1: float = arg(0.9, "AdamW's momentum")
    beta2: float = arg(0.99, "AdamW's second-moment decay")
    grad_clip: float = arg(1.0, "clip the global gradient norm to this; 0 = no clipping")
    decay_lr: bool = arg(True, "warmup + cosine decay; false = constant learning_rate")
    warmup_iters: int = arg(100, "linear warmup steps")
    lr_decay_iters: int = arg(2000, "the cosine reaches min_lr here (usually = max_iters)")
    min_lr: float = arg(1e-4, "~learning_rate / 10")
    # evaluation, logging, checkpoints
    eval_interval: int = arg(250, "val loss every this many steps (and at the end)")
    eval_iters: int = arg(20, "batches per split in an evaluation")
    log_interval: int = arg(10, "a log line every this many steps")
    checkpoint_interval: int = arg(100, "a checkpoint every this many steps (and at the end)")
    # system
    device: str = arg("auto", "auto, cpu or cuda: rank r drives cuda:LOCAL_RANK")
    dtype: str = arg("auto", "auto (05's pick_dtype), float32 or bfloat16")
    threads: int = arg(0, "CPU threads per rank; 0 = PyTorch's default (torchrun: 1 per rank)")
    seed: int = arg(1337, "seeds the weights (the same on every rank), the batches and dropout")

    def __post_init__(self):
        """Every check that needs no training: a mistake is one `error:` line, before any work."""
        for name, allowed in (("strategy", STRATEGIES), ("optimizer", ("adamw", "sgd")),
                              ("init_from", ("scratch", "resume", "auto")),
                              ("dtype", ("auto", "float32", "bfloat16"))):  # float16 needs 05's GradScaler
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; use {', '.join(allowed[:-1])} "
                                 f"or {allowed[-1]}")
        for name in ("gradient_accumulation_steps", "eval_interval", "eval_iters", "log_interval",
                     "checkpoint_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        check_world_size(self, int(os.environ.get("WORLD_SIZE", 1)))  # torchrun's; train() checks too
        if self.sharded_checkpoint and self.strategy == "zero1":
            raise ValueError("--sharded_checkpoint needs --strategy=ddp or fsdp: torch.distributed."
                             "checkpoint cannot read ZeRO's optimizer; zero1 writes the full checkpoint")
        pick_dtype(self.dtype, pick_device(self.device))  # both name the fix
        meta = load_meta(self.corpus_dir)  # no prepared data: its error names the 02 command
        if min(meta["train_tokens"], meta["val_tokens"]) <= self.block_size:
            raise ValueError(f"{self.corpus_dir} has {meta['train_tokens']} train and {meta['val_tokens']} "
                             f"val tokens, too few for --block_size={self.block_size}; use a smaller one")
        GPTConfig(**self.model_args(meta["n_vocab"]))  # the model's shape: n_embd % n_head, ...
        if self.init_from == "resume" and not self.ckpt_path.exists():
            raise FileNotFoundError(f"--init_from=resume: no checkpoint at {self.ckpt_path}; check "
                                    "--out_dir, or use --init_from=auto to start afresh when there is none")
        if self.init_from == "scratch" and self.ckpt_path.exists() and not self.overwrite:
            raise ValueError(f"{self.ckpt_path} exists and this run would overwrite it; continue it with "
                             "--init_from=resume, train into another --out_dir, or replace it: --overwrite")

    @property
    def corpus_dir(self) -> Path:
        return Path(self.data_dir or DATA_DIR) / f"{self.dataset}-{self.tokenizer}"

    @property
    def ckpt_path(self) -> Path:  # the full checkpoint, or the pointer to the latest sharded one
        return Path(self.out_dir) / ("dcp-latest.pt" if self.sharded_checkpoint else "ckpt.pt")

    def model_args(self, vocab_size: int) -> dict:
        return dict(block_size=self.block_size, vocab_size=vocab_size, n_layer=self.n_layer,
                    n_head=self.n_head, n_embd=self.n_embd, dropout=self.dropout, bias=self.bias)


def check_world_size(cfg: DistConfig, world_size: int):
    if cfg.batch_size <= 0 or cfg.batch_size % world_size:
        raise ValueError(f"batch_size={cfg.batch_size} (the global micro-batch) does not split across "
                         f"{world_size} ranks; use a positive multiple of {world_size}, e.g. "
                         f"--batch_size={world_size * max(1, round(cfg.batch_size / world_size))}")


# -----------------------------------------------------------------------------
# 3. The strategies: what each rank holds, and which collective runs when


def parallelize(model: nn.Module, cfg: DistConfig, ctx: Dist) -> nn.Module:
    """Per block, in torchtitan's order: activation checkpointing, compile, then DDP or FSDP.

    Each wraps what the one before made: checkpointing changes what a block keeps for backward,
    compile traces the block with that, and FSDP's all-gather and reduce-scatter go around the
    compiled block, not into its graph. Checkpointing and block.compile() work in place, so the
    parameter names, and with them the checkpoints, stay 05's.
    """
    for block in model.transformer.h:
        if cfg.activation_checkpointing:
            # Without it autograd keeps every intermediate of every block (q, k, v, the attention
            # output, the 4x-wide MLP activations...) until backward: memory that grows with batch x
            # block_size x n_layer and soon exceeds the weights. With it a block keeps its input
            # (B, T, C) only and reruns its forward in backward: ~33% more compute, far less memory.
            checkpoint_activations(block)
        if cfg.compile:
            # fuses a block's elementwise work (LayerNorm, GELU, dropout, residual adds) into a few
            # kernels: fewer trips through memory and fewer intermediates kept for backward, for a
            # compilation at startup. All blocks run the same code, so one graph serves them all.
            block.compile()
    if cfg.strategy != "fsdp":
        # DDP (and zero1, see build_optimizer): every rank holds the whole model. Construction
        # broadcasts rank 0's weights; in backward DDP all-reduces (averages) the gradients in ~25 MB
        # buckets as soon as a bucket is ready, overlapping with the rest of the backward, so every
        # rank takes the same step and the replicas stay equal. Memory: 16P bytes per rank for any N.
        # gradient_as_bucket_view: each .grad is a view into a bucket, not a second copy.
        device_ids = [ctx.local_rank] if ctx.device.startswith("cuda") else None
        return DDP(model, device_ids=device_ids, gradient_as_bucket_view=True)
    # FSDP2 (ZeRO-3): fully_shard(block) replaces each parameter by a DTensor that keeps this rank's
    # 1/N slice of dim 0; the optimizer, built afterwards, sees only slices, so its state is sharded
    # too. Before a block's forward an all-gather rebuilds its full parameters, freed after it and
    # gathered again for its backward; after the block's backward a reduce-scatter averages the
    # gradients and leaves each rank its slice's. Block by block, then the root (embeddings, final
    # LayerNorm, head): a rank holds its shards plus about one block in full; sharding the root
    # alone would gather everything at once. Memory: 16P/N. Traffic: all-gather 4P twice,
    # reduce-scatter 4P: 1.5x DDP's all-reduce (which is a reduce-scatter plus an all-gather).
    # With gradient accumulation over A micro-steps each one reduce-scatters, keeping gradients
    # sharded for A times the traffic; --sync_every_micro_step=false keeps full gradients (4P
    # more bytes per rank) until the last micro-step, for 1/A of the traffic (see train_step).
    # On CUDA in bf16 the blocks compute with bf16 copies of the gathered parameters (half the
    # all-gather bytes) and gradients are reduced in fp32; the sharded master weights stay fp32.
    policy = MixedPrecisionPolicy()
    if cfg.dtype == "bfloat16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, mp_policy=policy)
    return fully_shard(model, mp_policy=policy)


def build_optimizer(cfg: DistConfig, model: nn.Module, ctx: Dist) -> torch.optim.Optimizer:
    """AdamW (05's configure_optimizers) or plain SGD; for zero1, wrapped in ZeRO stage 1.

    ZeRO-1 (ZeroRedundancyOptimizer, over a DDP model): each rank owns about 1/N of the parameters
    (whole tensors, dealt out greedily by size) and keeps optimizer state for those only. After
    DDP's all-reduce every rank has the full averaged gradient, updates just its own parameters,
    then broadcasts them so the replicas are equal again. Memory per rank: 4P + 4P + 8P/N bytes.
    Traffic: DDP's all-reduce plus a broadcast of 4P. (ZeRO-2 shards the gradients as well, ZeRO-3
    the parameters too: that is FSDP.)
    """
    if cfg.optimizer == "sgd":  # no state: a gradient that is 2x too large moves the weights 2x
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate)
    else:
        optimizer = configure_optimizers(getattr(model, "module", model), cfg.weight_decay, cfg.learning_rate,
                                         (cfg.beta1, cfg.beta2), torch.device(ctx.device).type)
    if cfg.strategy == "zero1":  # the same groups, with their settings; AdamW makes its state at the first
        # step, so the throwaway optimizer above cost nothing
        optimizer = ZeroRedundancyOptimizer(optimizer.param_groups, optimizer_class=type(optimizer),
                                            lr=cfg.learning_rate)
    return optimizer


def memory_report(model: nn.Module, optimizer, ctx: Dist) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state that this rank holds (after a step),
    counted on the tensors themselves: a DTensor (FSDP) counts its local shard. Rank 0 prints all."""

    def nbytes(tensors) -> int:
        local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
        return sum(t.numel() * t.element_size() for t in local)

    params = list(model.parameters())  # a tied weight (wte = lm_head) is listed once
    state = getattr(optimizer, "optim", optimizer).state  # ZeRO keeps its state in a local optimizer
    memory = {"params": nbytes(params), "grads": nbytes(p.grad for p in params if p.grad is not None),
              "optimizer": nbytes(v for s in state.values() for v in s.values() if torch.is_tensor(v))}
    everyone = [None] * ctx.world_size
    dist.all_gather_object(everyone, memory)
    print0(f"{'rank':>4} {'params':>10} {'grads':>10} {'optimizer':>10} {'total':>10}   MB after one step")
    for rank, m in enumerate(everyone):
        print0(f"{rank:>4} " + " ".join(f"{v / 2**20:>10.3f}" for v in [*m.values(), sum(m.values())]))
    return memory


# -----------------------------------------------------------------------------
# 4. Checkpoints: the full state on rank 0 in 05's format, or every rank's shards


def rekey(optim_sd: dict, model: nn.Module, optimizer, to_names: bool) -> dict:
    """Key an optimizer state dict by parameter name (torch.distributed.checkpoint's way) instead of
    by number (optimizer.state_dict()'s, and so 05's files), or back."""
    named = {p: name for name, p in getattr(model, "module", model).named_parameters()}
    names = [named[p] for group in optimizer.param_groups for p in group["params"]]
    key = dict(enumerate(names)) if to_names else {name: i for i, name in enumerate(names)}
    groups = [{**group, "params": [key[k] for k in group["params"]]} for group in optim_sd["param_groups"]]
    return {"state": {key[k]: v for k, v in optim_sd["state"].items()}, "param_groups": groups}


def save(cfg: DistConfig, model, optimizer, ctx: Dist, extra: dict):
    """Write the checkpoint: every rank calls this (it runs collectives).

    Full: get_model_state_dict and get_optimizer_state_dict know every wrapper; they strip DDP's
    "module." and, for FSDP, all-gather one tensor at a time straight to rank 0's CPU (cpu_offload),
    so no GPU ever holds the whole model. ZeRO's consolidate_state_dict sends each rank's part of the
    state to rank 0. Numbered like optimizer.state_dict(), the file is what 05 writes.
    Sharded (--sharded_checkpoint), for models too large to gather: every rank writes its own shards
    with torch.distributed.checkpoint (DCP), plus a .metadata index of which slice of which tensor
    lies where, so DCP can re-slice them for another world size. A new directory per save, and a
    pointer (dcp-latest.pt) that rank 0 moves once the save is complete: a crash mid-save leaves the
    last one usable.
    """
    if cfg.sharded_checkpoint:
        model_sd, optim_sd = dsd.get_state_dict(model, optimizer)  # this rank's shards, keyed by name
        name = f"dcp-{extra['iter_num']:06d}"
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=Path(cfg.out_dir) / name)
        if ctx.rank == 0:  # dcp.save returns once every rank's part and the metadata are written
            save_checkpoint(cfg.ckpt_path, {"path": name, **extra})
            for old in Path(cfg.out_dir).glob("dcp-0*"):  # the pointer has moved: older saves can go
                if old.name != name:
                    shutil.rmtree(old)
    else:
        options = dsd.StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = dsd.get_model_state_dict(model, options=options)
        if isinstance(optimizer, ZeroRedundancyOptimizer):
            optimizer.consolidate_state_dict(to=0)
            optim_sd = optimizer.state_dict() if ctx.rank == 0 else None
        else:
            optim_sd = dsd.get_optimizer_state_dict(model, optimizer, options=options)
            optim_sd = rekey(optim_sd, model, optimizer, to_names=False) if ctx.rank == 0 else None
        if ctx.rank == 0:
            save_checkpoint(cfg.ckpt_path, {"model": model_sd, "optimizer": optim_sd, **extra})
    # the others wait for the file: ranks that ran ahead would wait for rank 0 in the next step's
    # collectives instead, and on a slow shared filesystem could reach the collective timeout
    dist.barrier()


def resume(cfg: DistConfig, model, optimizer, model_args: dict) -> tuple[int, float]:
    """Load out_dir's checkpoint into any strategy, whatever world size wrote it, if init_from asks
    for it (auto: if there is one): (iter_num, best_val_loss). Every rank reads the file, so out_dir
    must be on a filesystem that every node sees."""
    if cfg.init_from == "scratch" or not cfg.ckpt_path.exists():
        return 0, float("inf")
    # mmap: the ranks of one machine share the file's pages instead of each reading a copy
    ckpt = torch.load(cfg.ckpt_path, map_location="cpu", mmap=True, weights_only=True)
    if ckpt["model_args"] != model_args:
        raise ValueError(f"{cfg.ckpt_path} holds a model with {ckpt['model_args']}, not {model_args}; "
                         "use the same model settings, or another --out_dir")
    if cfg.sharded_checkpoint:  # DCP reads into templates of what this rank holds, re-slicing as needed
        model_sd, optim_sd = dsd.get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
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
        else:
            dsd.set_optimizer_state_dict(model, optimizer, rekey(ckpt["optimizer"], model, optimizer, True),
                                         options=dsd.StateDictOptions(full_state_dict=True))
    print0(f"resuming at iter {ckpt['iter_num']} of {cfg.max_iters} from {cfg.ckpt_path}")
    return ckpt["iter_num"], ckpt["best_val_loss"]


# -----------------------------------------------------------------------------
# 5. Training: 05's loop, data parallel


def train_step(model, optimizer, data, cfg: DistConfig, ctx: Dist, it: int) -> tuple[torch.Tensor, ...]:
    """One optimizer step on global batch number `it`: (this rank's mean loss, global gradient norm),
    both tensors still: reading them makes the CPU wait for the GPU, so the loop does it on log steps.

    05's step takes batch_size x accumulation rows in accumulation chunks; here each rank takes its
    1/N of the rows, in chunks of batch_size / N: the gradient is the mean over the same rows, so N
    ranks take 05's step (up to the order of float additions).
    """
    optimizer.zero_grad(set_to_none=True)  # here, not after the step: memory_report sees the gradients
    accumulation = cfg.gradient_accumulation_steps
    x, y = get_batch(data, cfg.batch_size * accumulation, cfg.block_size, it, cfg.seed, ctx.rank,
                     ctx.world_size, ctx.device)  # (A * B/N, T): this rank's rows
    loss_sum = torch.zeros((), device=ctx.device)
    for micro, (xb, yb) in enumerate(zip(x.chunk(accumulation), y.chunk(accumulation))):
        last = micro == accumulation - 1
        sync = nullcontext()
        if isinstance(model, DDP) and not last:  # DDP (and zero1): no all-reduce until the last backward
            sync = model.no_sync()
        elif not isinstance(model, DDP) and not cfg.sync_every_micro_step:  # FSDP: see parallelize
            model.set_requires_gradient_sync(last)
        # autocast for every strategy, as 05: FSDP's policy hands the blocks bf16 weights, but without
        # autocast the logits and the cross-entropy would be computed in bf16 too
        with sync, autocast_context(xb.device.type, cfg.dtype):
            _, loss = model(xb, yb)
            (loss / accumulation).backward()  # .grad adds up: the mean over all micro-batches
        loss_sum += loss.detach()
    # with FSDP the gradients are DTensors: the norm is computed over every rank's shards
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
    optimizer.step()
    return loss_sum / accumulation, norm


@torch.no_grad()
def evaluate(model, data: dict, cfg: DistConfig, ctx: Dist, step: int) -> dict:
    """05's estimate_loss, data parallel: each rank takes its rows of the same batches, and one
    all-reduce adds the sums. Equal shares, so the mean of the ranks' means is 05's number."""
    model.eval()
    losses = torch.zeros(len(data), device=ctx.device)
    for i, tokens in enumerate(data.values()):
        for k in range(cfg.eval_iters):
            x, y = get_batch(tokens, cfg.batch_size, cfg.block_size, step * cfg.eval_iters + k, cfg.seed + 1,
                             ctx.rank, ctx.world_size, ctx.device)
            with autocast_context(x.device.type, cfg.dtype):
                losses[i] += model(x, y)[1].float()
    dist.all_reduce(losses)  # a sum: gloo has no average
    model.train()
    return {split: (value / (cfg.eval_iters * ctx.world_size)).item() for split, value in zip(data, losses)}


def train(cfg: DistConfig, ctx: Dist) -> dict:
    """05's loop, data parallel; needs the process group (init_distributed). Returns {"iter_num",
    "losses" ({step: mean loss over the ranks} at log steps), "val_loss", "memory" (this rank's
    memory_report), "local_state" (this rank's own parameters: a replica, or FSDP's shards)}."""
    check_world_size(cfg, ctx.world_size)
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    dtype = pick_dtype(cfg.dtype, ctx.device)
    if dtype == "float16":  # a GPU without native bf16
        print0("note: float16 needs 05's gradient scaler, which 06 leaves out: training in float32")
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
           f"parameters | {tokens_per_iter:,} tokens per step, {cfg.batch_size // ctx.world_size} rows x "
           f"{cfg.gradient_accumulation_steps} micro-batches per rank")
    model = parallelize(model, cfg, ctx)
    optimizer = build_optimizer(cfg, model, ctx)
    start, best_val_loss = resume(cfg, model, optimizer, model_args)
    if start >= cfg.max_iters:
        print0(f"nothing left to do: the run is at iter {start} of max_iters={cfg.max_iters}; to train it "
               f"longer: --init_from=resume --max_iters={start + cfg.max_iters} (and --lr_decay_iters)")
    losses, memory, val_loss = {}, None, None
    t0, window = time.perf_counter(), 0  # steps timed since t0 (evaluations and checkpoints left out)
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
            val_loss = evaluate(model, data, cfg, ctx, iter_num)["val"]
            best_val_loss = min(best_val_loss, val_loss)
            print0(f"iter {iter_num}: val loss {val_loss:.4f}")
        if saved:  # 05's format (see save_checkpoint); the model and optimizer are gathered in save()
            save(cfg, model, optimizer, ctx, {
                "model_args": model_args, "tokenizer": meta["tokenizer"], "config": asdict(cfg),
                "stage": "distributed", "iter_num": iter_num, "best_val_loss": best_val_loss,
                "val_loss": val_loss, "scaler": {}, "rng": rng_states()})
        # --fail_at_step: the last rank dies as a crash or a lost node would; on torchrun's first
        # attempt only, so that the restarted job (see the docstring) runs through
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


# copied from 05_pretrain.py: configure_optimizers
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


# copied from 05_pretrain.py: get_lr
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


# copied from 05_pretrain.py: rng_states
def rng_states() -> dict:
    """The state of every random number generator a run may draw from, for its checkpoint.

    numpy's key array is stored as a list: torch.load(weights_only=True) unpickles only plain
    Python types and tensors, and that is how checkpoints are read here (no pickled code runs).
    """
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, keys.tolist(), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


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


if __name__ == "__main__":
    main()
