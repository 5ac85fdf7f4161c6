"""06_distributed.py: one model, many processes. DDP, ZeRO-1 and FSDP2 under torchrun.

Here 05's training runs on N processes: one per GPU, talking over NCCL, or CPU processes talking
over gloo (so it runs, and is tested, on a laptop). All three strategies are data parallel: each
rank runs the whole model on its slice of each global batch, and the ranks average their gradients,
so N ranks of B/N rows take the step one process takes with B rows (tested on CPU: 1e-6 with SGD,
2e-4 with AdamW: it steps ~lr even on a gradient of rounding noise; GPUs' TF32, bf16 and summation
orders differ in the last bits). They differ in what a rank holds and in which collective runs when:

  bytes per rank, fp32 AdamW   params grads AdamW state  collectives in a step (P parameters)
  ddp    replicate everything  4P     4P    8P           all-reduce grads during backward
  zero1  shard optimizer state 4P     4P    8P/N         all-reduce grads; broadcast params
  fsdp   shard everything      4P/N   4P/N  8P/N         all-gather params before each block's
                                                         forward and backward; reduce-scatter grads

Then what a long job needs: activation checkpointing and torch.compile per block, checkpoints (on
rank 0 in 05's format, or every rank's shards), and restarts that end with the weights of an
uninterrupted run (bit for bit on CPU, at the same world size, on which dropout's masks depend),
after a crash or a Ctrl-C (every rank saves at the next log step; --init_from=resume continues).
A first reading: sections 1-3 (in 3, `# NEW:` marks what changes from 05); 4 and 5 can wait.

References: Li et al. 2020 (DDP); Rajbhandari et al. 2020 (ZeRO); Zhao et al. 2023 (FSDP); Chen et
al. 2016 (activation checkpointing); pytorch/torchtitan (FSDP2 in practice); karpathy/build-nanogpt.

Run (after `python 02_dataloader.py` has prepared the data):
  python 06_distributed.py --out_dir=out/one-rank           # a world of one, the same code path
  torchrun --standalone --nproc_per_node=2 06_distributed.py --device=cpu   # 2 CPU ranks (gloo)
  torchrun --standalone --nproc_per_node=8 06_distributed.py --strategy=fsdp --compile \\
      --tokenizer=gpt2 --n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 --batch_size=64 \\
      --gradient_accumulation_steps=8 --out_dir=out/gpt2-fsdp  # 8 GPUs (nccl): GPT-2 small
  # rank 1 dies after step 25; torchrun restarts both at step 20 (the variable: pytorch#135712)
  TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --standalone --nproc_per_node=2 --max-restarts=1 \\
      06_distributed.py --init_from=auto --out_dir=out/restart --max_iters=40 \\
      --checkpoint_interval=10 --fail_at_step=25 --device=cpu
  # several machines: the same command on every node (HOST = node 0's address)
  torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
      --rdzv-id=gpt 06_distributed.py --strategy=fsdp --init_from=auto --batch_size=64
"""

import argparse
import gc
import io
import json
import math
import os
import shutil
import signal
import sys
import time
import traceback
from contextlib import nullcontext, redirect_stderr, redirect_stdout, suppress
from dataclasses import asdict, dataclass, fields, replace
from datetime import timedelta
from pathlib import Path
from typing import Annotated

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

PROJECT = Path(__file__).resolve().parent  # relative paths (data/, out/, flags) resolve here

# -----------------------------------------------------------------------------
# 1. The process group: who am I, how many are we, how do we talk

@dataclass
class World:  # this process's place in the job (what init_distributed returns)
    rank: int  # 0 .. size-1 over all machines; rank 0 prints and writes the full checkpoint
    size: int  # how many processes (ranks), over all machines
    device: str  # "cuda:<LOCAL_RANK>" ("cuda:0" if a launcher bound one GPU to it) or "cpu"


def print0(*args, **kwargs):
    """print() on rank 0 only: eight ranks printing the same line eight times help nobody."""
    if dist.get_rank() == 0:
        print(*args, flush=True, **kwargs)


def init_distributed(device: str = "auto") -> World:
    """Join the process group torchrun prepared, or make a world of one (the same code runs, its
    collectives cheap); a group that exists (a test's ranks) is joined as it is. torchrun tells each
    process who it is in environment variables: RANK (global index), LOCAL_RANK (which GPU on this
    machine), WORLD_SIZE, and MASTER_ADDR:MASTER_PORT, a store where the ranks meet. The backend
    moves the bytes: NCCL for CUDA tensors (NVLink, InfiniBand), gloo for CPU ones (TCP)."""
    torchrun = "RANK" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(device)
    if device.startswith("cuda"):  # one GPU per process: the LOCAL_RANK-th, or the one bound to it
        gpu = local_rank if torch.cuda.device_count() > 1 else 0
        device = f"cuda:{gpu}"
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for fp32 matmuls
    else:  # neither NCCL nor gloo moves MPS tensors: mps trains on the CPU here
        device = "cpu"
    if not dist.is_initialized():  # torchrun's rendezvous, or a world of one with a local store
        backend = "nccl" if device.startswith("cuda") else "gloo"
        device_id = torch.device(device) if backend == "nccl" else None
        store_args = {} if torchrun else dict(store=dist.HashStore(), rank=0, world_size=1)
        timeout = timedelta(minutes=30)  # the ranks wait at a barrier while rank 0 saves
        dist.init_process_group(backend, device_id=device_id, timeout=timeout, **store_args)
    return World(dist.get_rank(), dist.get_world_size(), device)


def shutdown_distributed(failed: bool = False):
    """Leave the group in an order that cannot hang: a barrier (not after an error: the others may
    wait elsewhere), gc.collect() (a DDP freed after the group can deadlock gloo), then destroy."""
    if not failed:
        dist.barrier()
    gc.collect()
    dist.destroy_process_group()


# -----------------------------------------------------------------------------
# 2. The strategies: how each wraps the model and builds its optimizer

def parallelize(model: nn.Module, cfg) -> nn.Module:
    """DDP(model) or the FSDP-sharded model, after activation checkpointing and compile per block
    (torchtitan's order: FSDP wraps compiled blocks). Names stay 05's, without DDP's "module."."""
    for block in model.transformer.h:
        if cfg.activation_checkpointing:
            # else every intermediate (q, k, v, the 4x-wide MLP...) waits for backward; with it
            # a block keeps its input (B, T, C) and reruns: ~33% more compute, far less memory
            checkpoint_activations(block)
        if cfg.compile:
            # fuses the block's elementwise work (LayerNorm, GELU, residual adds) into few kernels:
            # less memory traffic and fewer saved intermediates, for a compilation at startup.
            # Evaluation gets a second graph: model.eval() flips .training, which graphs guard on.
            block.compile(dynamic=False)
    if cfg.strategy != "fsdp":
        # DDP (and zero1): construction broadcasts rank 0's weights; backward all-reduces (averages)
        # the gradients in ~25 MB buckets as each is ready, overlapping with the rest (.grad: views)
        # (no device_ids: DDP need not move the batches, which are on the model's device already)
        return DDP(model, gradient_as_bucket_view=True)
    # FSDP2 (ZeRO-3): fully_shard(block) makes each parameter a DTensor holding this rank's 1/N
    # slice of dim 0, so the optimizer built afterwards holds sharded state too. An all-gather
    # rebuilds a block's parameters before its forward (freed after) and its backward; then a
    # reduce-scatter leaves each rank its slice's averaged gradient. Block by block, then the root
    # (embeddings, head, kept gathered from forward to backward): a rank holds its shards, the
    # root's parameters and one or two blocks in full (the next is prefetched). Traffic: ~1.5x
    # DDP's. Over A micro-steps, every micro-step reduce-scatters (A per step), gradients sharded.
    # --sync_every_micro_step=false reduce-scatters in the last only (1/A of the reduce-scatters;
    # the all-gathers still run each micro-step), but ranks hold full gradients until then (4P
    # more). bf16: gathered as bf16 (half the traffic), reduced in fp32; inputs are cast too, so the
    # residual stream adds in bf16 (05, DDP: fp32): losses differ slightly from DDP's.
    param_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else None  # None: as stored, fp32
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, mp_policy=policy)
    return fully_shard(model, mp_policy=policy)


def local_part(tensor):
    """What this rank holds of a tensor: a DTensor's (FSDP's) own shard, or a plain tensor whole."""
    if isinstance(tensor, DTensor):
        return tensor.to_local()
    return tensor


def build_optimizer(cfg, model, world: World):
    """AdamW (05's configure_optimizers) or plain SGD; for zero1, wrapped in ZeRO stage 1:
    ZeroRedundancyOptimizer, over a DDP model: each rank owns whole tensors, dealt out greedily
    by size (~1/N of the parameters; GPT-2's tied wte, 31%, goes to one), and keeps their state.
    After DDP's all-reduce every rank updates just its own parameters, then broadcasts them so
    the replicas are equal again. (ZeRO-2 shards the gradients too, ZeRO-3 the parameters: FSDP.)"""
    # SGD, for the tests: Adam divides the gradient's scale out, SGD's step is proportional to
    # it, so a gradient 2x too large (summed over 2 ranks, not averaged) moves the weights 2x
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate)
    else:
        betas = (cfg.beta1, cfg.beta2)
        optimizer = configure_optimizers(model, cfg.weight_decay, cfg.learning_rate, betas,
                                         torch.device(world.device).type)
    if cfg.strategy == "zero1":
        # ZeRO builds its own optimizer from these groups; the one above is dropped unused
        # (an optimizer makes its state at its first step, so building it cost nothing). Bucket
        # view: each rank's parameters in one flat buffer, one broadcast each, not one per tensor
        optimizer = ZeroRedundancyOptimizer(optimizer.param_groups, type(optimizer),
                                            parameters_as_bucket_view=True)
    return optimizer


def memory_report(model, optimizer, world: World) -> dict:
    """Bytes of parameters, gradients and optimizer state this rank holds (after a step), counted
    on the tensors themselves (of a DTensor, its local shard); rank 0 prints every rank's."""
    params = list(model.parameters())  # a tied weight (wte = lm_head) is listed once
    state = getattr(optimizer, "optim", optimizer).state  # ZeRO's: in its local optimizer
    grads = [p.grad for p in params if p.grad is not None]
    optimizer_state = [v for s in state.values() for v in s.values() if torch.is_tensor(v)]
    tensors = {"params": params, "grads": grads, "optimizer": optimizer_state}
    memory = {kind: sum(local_part(t).nbytes for t in ts) for kind, ts in tensors.items()}
    every_rank = [None] * world.size
    dist.all_gather_object(every_rank, memory)
    print0("rank     params      grads  optimizer      total   MB after one step")
    for rank, rank_memory in enumerate(every_rank):
        byte_counts = [*rank_memory.values(), sum(rank_memory.values())]
        print0(f"{rank:>4} " + " ".join(f"{b / 2**20:>10.3f}" for b in byte_counts))
    return memory


# -----------------------------------------------------------------------------
# 3. Training and evaluation: 05's, data parallel. `# NEW:` marks what data parallelism changes

def train_step(model, optimizer, data, cfg, world: World, it: int):
    """05's step on global batch `it`, each rank on its 1/N of the rows: (this rank's mean loss,
    global gradient norm), tensors still: reading them waits for the GPU, so only log steps do."""
    optimizer.zero_grad(set_to_none=True)  # here, not after the step: memory_report sees the grads
    accumulation = cfg.gradient_accumulation_steps
    x, y = get_batch(data, cfg.batch_size * accumulation, cfg.block_size, it, cfg.seed,
                     world.rank, world.size, world.device)  # NEW: (A * B/N, T), 02's rank-th slice
    loss_sum = torch.zeros((), device=world.device)
    for micro_step, (xb, yb) in enumerate(zip(x.chunk(accumulation), y.chunk(accumulation))):
        last = micro_step == accumulation - 1
        if isinstance(model, DDP):  # NEW: all-reduce in the last only (the flag no_sync() sets)
            model.require_backward_grad_sync = last
        else:  # NEW: FSDP reduce-scatters in every micro-step, or the last only: see parallelize
            model.set_requires_gradient_sync(last or cfg.sync_every_micro_step)
        # autocast as 05, with FSDP too: on CUDA, LayerNorm then runs in fp32 as in 05
        with autocast_context(xb.device.type, cfg.dtype):
            _, loss = model(xb, yb)
        (loss / accumulation).backward()  # outside autocast; .grad adds up: the mean
        loss_sum += loss.detach()
    # NEW: with FSDP the gradients are DTensors: the norm is computed over every rank's shards
    norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
    optimizer.step()
    return loss_sum / accumulation, norm


def train(cfg, world: World, ctrl_c) -> dict:
    """05's loop, data parallel (init_distributed first; ctrl_c: an entered CtrlC): {"iter_num",
    "losses" ({iter_num as logged: the ranks' mean loss}), "val_loss", "memory" (this rank's),
    "local_state" (its own), "interrupted" (by Ctrl-C: saved at iter_num)}."""
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    dtype = pick_dtype(cfg.dtype, world.device)
    if dtype == "float16":  # a GPU without bf16: 06 has no gradient scaler
        dtype = "float32"
    settings = asdict(cfg)  # checkpoints keep it: a resume resolves "auto" on its machine
    cfg = replace(cfg, device=world.device, dtype=dtype)  # replace() runs check_settings again
    data = {split: load_tokens(cfg.corpus_dir, split) for split in ("train", "val")}
    meta = load_meta(cfg.corpus_dir)
    model_args = cfg.model_args(meta["n_vocab"])
    # NEW: equal weights on all ranks (DDP broadcasts rank 0's; FSDP slices each rank's own copy)
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(**model_args)).to(world.device)
    tokens_per_iter = cfg.batch_size * cfg.gradient_accumulation_steps * cfg.block_size
    print0(f"{cfg.strategy} on {world.size} rank(s) ({world.device}, {cfg.dtype}): "
           f"{model.num_params():,} params | {tokens_per_iter:,} tokens a step, "
           f"{cfg.batch_size // world.size} rows per rank")
    model = parallelize(model, cfg)  # NEW: DDP or FSDP wraps the model
    optimizer = build_optimizer(cfg, model, world)  # NEW: zero1 wraps the optimizer
    start, best_val_loss = resume(cfg, model, optimizer, world)  # NEW: dsd, agreed by the ranks
    if start >= cfg.max_iters:
        print0(f"nothing left to do at iter {start}: to train longer, give this command "
               f"--max_iters={start + cfg.max_iters}")
    saved_at = start or None  # the iteration of the checkpoint a NaN leaves intact
    iter_num = start
    interrupted = False
    losses = {}
    memory = None
    val_loss = None
    t0 = time.perf_counter()
    timed_from = start  # the clock runs from the end of this step
    for it in range(start, cfg.max_iters):
        lr = get_lr(it, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # NEW: dropout masks are a function of (seed, step, rank, world size): resumable
        torch.manual_seed(cfg.seed + it * world.size + world.rank)
        loss, norm = train_step(model, optimizer, data["train"], cfg, world, it)
        iter_num = it + 1  # steps done, as the log prints them
        if memory is None:  # NEW: after the first step of every run; a collective, every rank
            memory = memory_report(model, optimizer, world)
        last = iter_num == cfg.max_iters
        saved = last or iter_num % cfg.checkpoint_interval == 0
        logged = saved or iter_num % cfg.log_interval == 0  # so a NaN stops before a save
        evaluated = last or iter_num % cfg.eval_interval == 0
        if logged:  # reading a tensor waits for the GPU: on log steps only
            # NEW: the ranks agree on Ctrl-C here, in the loss's all-reduce, so that all save
            # together: at every step it would cost a collective and a wait for the GPU
            pressed = torch.tensor(float(ctrl_c.pressed), device=world.device)
            sums = torch.stack([loss, pressed])  # on the device: one wait, at .tolist()
            dist.all_reduce(sums)  # NEW: a sum over the ranks (gloo has no average)
            loss_sum, presses = sums.tolist()
            mean_loss = loss_sum / world.size
            interrupted = presses > 0 and not last  # at the last step: done anyway
            losses[iter_num] = mean_loss
            if isinstance(norm, DTensor):  # NEW: FSDP's norm is a DTensor
                norm = norm.full_tensor()
            seconds = (time.perf_counter() - t0) / (iter_num - timed_from)
            print0(f"iter {iter_num}/{cfg.max_iters} | loss {mean_loss:.4f} | lr {lr:.2e} "
                   f"| grad norm {norm.item():.3f} | {1000 * seconds:.1f} ms | "
                   f"{tokens_per_iter / seconds:,.0f} tok/s")
            check_finite("loss", mean_loss, iter_num, cfg.ckpt_path, saved_at)
            check_finite("grad norm", norm.item(), iter_num, cfg.ckpt_path, saved_at)
        if evaluated:
            val_loss = evaluate(model, data["val"], cfg, world, iter_num)
            check_finite("val loss", val_loss, iter_num, cfg.ckpt_path, saved_at)
            best_val_loss = min(best_val_loss, val_loss)
            print0(f"iter {iter_num}: val loss {val_loss:.4f}")
        if saved or interrupted:  # save() adds the model and the optimizer
            run_info = {"model_args": model_args, "tokenizer": meta["tokenizer"],
                        "config": settings, "stage": "distributed", "iter_num": iter_num,
                        "best_val_loss": best_val_loss, "val_loss": val_loss, "scaler": {},
                        "rng": rng_states()}  # 05's format; never restored: the loop reseeds
            save(cfg, model, optimizer, world, run_info)  # NEW: every rank, not the master only
            saved_at = iter_num
        if interrupted:
            print0(f"saved {cfg.ckpt_path} (iter {iter_num}); continue: this command with "
                   "--init_from=resume, without --overwrite")
            break
        if iter_num == cfg.fail_at_step:  # a crash, for the restart test
            inject_fault(world, iter_num)
        if logged or evaluated:  # restart the clock: evaluations and saves are not steps
            t0 = time.perf_counter()
            timed_from = iter_num
    module = getattr(model, "module", model)  # NEW: DDP keeps the model in .module
    local_state = {name: local_part(p).detach() for name, p in module.named_parameters()}
    return {"iter_num": iter_num, "losses": losses, "val_loss": val_loss, "memory": memory,
            "local_state": local_state, "interrupted": interrupted}


@torch.no_grad()
def evaluate(model, tokens, cfg, world: World, step: int) -> float:
    """05's estimate_loss after `step` steps: the mean of the mean losses of global batches
    step * eval_iters + k (k < eval_iters) of the val stream (seed + 1), each rank on B/N rows of
    each; all take as many, so the mean of their means is the batch's (up to float sums' order)."""
    model.eval()
    loss_sum = torch.zeros((), device=world.device)
    for k in range(cfg.eval_iters):
        x, y = get_batch(tokens, cfg.batch_size, cfg.block_size, step * cfg.eval_iters + k,
                         cfg.seed + 1, world.rank, world.size, world.device)  # NEW: rank's rows
        with autocast_context(x.device.type, cfg.dtype):
            _, loss = model(x, y)
        loss_sum += loss.float()
    dist.all_reduce(loss_sum)  # NEW: a sum over the ranks
    model.train()
    return loss_sum.item() / (cfg.eval_iters * world.size)


# -----------------------------------------------------------------------------
# 4. Checkpoints and restarts: the full state on rank 0 in 05's format, or every rank's shards

def save(cfg, model, optimizer, world: World, run_info: dict):
    """Save run_info, model and optimizer; every rank calls this (it runs collectives). Full:
    get_model_state_dict and get_optimizer_state_dict know every wrapper; for FSDP they gather one
    tensor at a time straight to rank 0's CPU, so no GPU holds the whole model; numbered like
    optimizer.state_dict(), the file is 05's. Sharded (too large to gather): each rank writes its
    shards with torch.distributed.checkpoint, plus an index of which slice lies where, for any world
    size; rank 0 then moves the pointer (dcp-latest.pt), so a crash mid-save keeps the last one."""
    if cfg.sharded_checkpoint:
        name = f"dcp-{run_info['iter_num']:06d}"  # a new directory per save
        model_state, optimizer_state = dsd.get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.save(state, checkpoint_id=cfg.ckpt_path.with_name(name))  # each rank writes its shards
        if world.rank == 0:  # dcp.save returns once every rank's part and the metadata are written
            old = None  # the save the pointer names until now, superseded by this one
            with suppress(Exception):  # no pointer, or an unreadable one (--overwrite replaces it)
                old = torch.load(cfg.ckpt_path, weights_only=True)["path"]
            save_checkpoint(cfg.ckpt_path, {"path": name, **run_info})
            if old not in (None, name):
                shutil.rmtree(cfg.ckpt_path.with_name(old), ignore_errors=True)  # gone: fine
    else:
        options = dsd.StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = dsd.get_model_state_dict(model, options=options)
        if isinstance(optimizer, ZeroRedundancyOptimizer):  # rank 0 receives every rank's state
            optimizer.consolidate_state_dict(to=0)
            torch.get_device_module(world.device).synchronize()  # its GPU copies are async: wait
            optimizer_state = optimizer.state_dict() if world.rank == 0 else None
            optimizer._all_state_dicts = []  # else rank 0 keeps this copy until the next save
        else:
            by_name = dsd.get_optimizer_state_dict(model, optimizer, options=options)
            optimizer_state = None
            if world.rank == 0:  # the only rank that received the state
                optimizer_state = key_optimizer_state(by_name, model, optimizer, to_names=False)
        if world.rank == 0:
            ckpt = {"model": model_state, "optimizer": optimizer_state, **run_info}
            save_checkpoint(cfg.ckpt_path, ckpt)
    if world.rank == 0 and cfg.overwrite:  # else a resume could find the replaced run's other kind
        cfg.checkpoint(not cfg.sharded_checkpoint).unlink(missing_ok=True)
    # the others wait for the file: ranks that ran ahead would wait for rank 0 in the next step's
    # collectives instead, and on a slow shared filesystem could reach the collective timeout
    dist.barrier()


def key_optimizer_state(state_dict, model, optimizer, to_names: bool):
    """optimizer.state_dict() numbers the parameters 0, 1, ... in the optimizer's order;
    torch.distributed.checkpoint keys them by name. Key state_dict by name, or back by number."""
    module = getattr(model, "module", model)  # DDP keeps the model in .module
    name_of = {p: name for name, p in module.named_parameters()}
    names = [name_of[p] for group in optimizer.param_groups for p in group["params"]]
    by_number = dict(enumerate(names))  # the optimizer's numbers -> names
    new_key = by_number if to_names else {name: number for number, name in by_number.items()}
    state = {new_key[k]: v for k, v in state_dict["state"].items()}
    groups = [{**group, "params": [new_key[k] for k in group["params"]]}
              for group in state_dict["param_groups"]]
    return {"state": state, "param_groups": groups}


def check_checkpoint(cfg, n_vocab: int):
    """The checkpoint in out_dir, full or sharded, must be the one init_from and the flags say."""
    found = cfg.ckpt_path.exists()
    other_kind = cfg.checkpoint(not cfg.sharded_checkpoint)  # the opposite flag's
    if cfg.init_from != "scratch" and not found and other_kind.exists():
        flag = f"--sharded_checkpoint={str(not cfg.sharded_checkpoint).lower()}"
        raise ValueError(f"{other_kind} is the other kind: resume it with {flag}")
    if cfg.init_from == "resume" and not found:
        raise FileNotFoundError(f"--init_from=resume: no checkpoint at {cfg.ckpt_path}; check "
                                "--out_dir, or start afresh: --init_from=auto")
    if cfg.init_from == "scratch" and (found or other_kind.exists()) and not cfg.overwrite:
        raise ValueError(f"{cfg.out_dir} holds a checkpoint; continue it: --init_from=resume, "
                         "train into another --out_dir, or replace it: --overwrite")
    if cfg.init_from == "scratch" or not found:
        return
    fix = "train into another --out_dir, or replace it: --init_from=scratch --overwrite"
    try:  # mmap: the metadata only, the tensors stay on disk (a pointer file has none)
        ckpt = torch.load(cfg.ckpt_path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # empty, cut short, not a checkpoint: torch's message is many lines
        raise ValueError(f"{cfg.ckpt_path} is not a readable checkpoint; {fix}") from None
    stage = ckpt.get("stage")  # 04's, 07's, 08's: not a run of 05 or 06, and not 06's to replace
    if stage not in ("pretrain", "distributed"):
        raise ValueError(f"{cfg.ckpt_path} holds a {stage!r} model: use another --out_dir")
    saved = {"gelu": "tanh"} | ckpt.get("model_args", {})  # no gelu key: older, GPT-2's tanh
    if saved != cfg.model_args(n_vocab):
        raise ValueError(f"{cfg.ckpt_path} holds another model, {saved}: to resume it, "
                         f"repeat that run's flags; or {fix}")


def resume(cfg, model, optimizer, world: World):
    """(iter_num, best_val_loss) resumed as init_from says, at any world size and strategy."""
    ckpt = None
    start = 0
    if cfg.init_from != "scratch" and cfg.ckpt_path.exists():  # check_settings checked it
        # mmap: the ranks of one machine share the file's pages instead of each reading a copy
        ckpt = torch.load(cfg.ckpt_path, map_location="cpu", mmap=True, weights_only=True)
        start = ckpt["iter_num"]
    # NEW: each rank reads its own copy of the file; all learn every rank's view, so one that
    # disagrees (it cannot see the others' checkpoint) stops them all, not hanging in a collective
    starts = [None] * world.size
    dist.all_gather_object(starts, start)
    if len(set(starts)) > 1:
        raise RunError(f"the ranks see different checkpoints in {cfg.out_dir} (iterations "
                       f"{starts}): out_dir must be on a filesystem that all nodes share")
    if ckpt is None:
        return 0, math.inf
    today = [dict(group) for group in optimizer.param_groups]  # this run's betas and decay
    if cfg.sharded_checkpoint:  # DCP fills templates of what this rank holds, re-slicing as needed
        model_state, optimizer_state = dsd.get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=cfg.ckpt_path.with_name(ckpt["path"]))
        dsd.set_state_dict(model, optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"])
    else:  # every rank passes the full state; FSDP keeps its slices, ZeRO its parameters' state
        full_state = dsd.StateDictOptions(full_state_dict=True)
        dsd.set_model_state_dict(model, ckpt["model"], options=full_state)
        if isinstance(optimizer, ZeroRedundancyOptimizer):
            optimizer.load_state_dict(ckpt["optimizer"])
            # subtle: ZeRO's load_state_dict moves 0-dim state (Adam's step) to the CPU, where fused
            # CUDA AdamW fails (pytorch/pytorch#124133): all state returns to its parameter's device
            for p, state in optimizer.optim.state.items():
                state.update({key: value.to(p.device) for key, value in state.items()})
            optimizer.state.clear()  # the base class's full copy, never read: 8P, not 8P/N
        elif ckpt["optimizer"]["state"]:  # plain SGD keeps none, and dsd cannot load an empty one
            by_name = key_optimizer_state(ckpt["optimizer"], model, optimizer, to_names=True)
            dsd.set_optimizer_state_dict(model, optimizer, by_name, options=full_state)
    for group, settings in zip(optimizer.param_groups, today):  # the flags given now win
        group.update(settings)
    print0(f"resuming at iter {start} of {cfg.max_iters} from {cfg.ckpt_path}, "
           f"on {cfg.device} in {cfg.dtype}")
    return start, ckpt["best_val_loss"]


def inject_fault(world: World, iter_num: int):
    """--fail_at_step: the last rank dies as in a crash (SIGKILL: no exception, no cleanup), on
    torchrun's first attempt only, so that the restarted job runs to the end."""
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if world.rank != world.size - 1 or not first_attempt:
        return
    print(f"fault injection: rank {world.rank} dies after step {iter_num}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


# -----------------------------------------------------------------------------
# 5. Settings, all checked before any work, and main

@dataclass
class DistConfig:
    """Train 04's GPT on N processes with DDP, ZeRO-1 or FSDP2 (launch with torchrun)."""

    # data, as 02 prepared it: data_dir/<dataset>-<tokenizer>/{train.bin, val.bin, meta.json}
    dataset: Annotated[str, "the corpus 02 prepared"] = "tinyshakespeare"
    tokenizer: Annotated[str, "char or gpt2: which of 02's token files"] = "char"
    data_dir: Annotated[str, "02's output; relative to this folder"] = "data"
    out_dir: Annotated[str, "ckpt.pt (sharded: dcp-latest.pt, dcp-*/)"] = "out/distributed"
    init_from: Annotated[str, "scratch, resume, or auto (resume if any)"] = "scratch"
    overwrite: Annotated[bool, "start afresh, replacing a checkpoint"] = False
    # model (04's GPTConfig), defaults 05's CPU recipe; then distributed (parallelize, save)
    n_layer: Annotated[int, "transformer blocks"] = 4
    n_head: Annotated[int, "attention heads per block"] = 4
    n_embd: Annotated[int, "width of the residual stream"] = 128
    block_size: Annotated[int, "context length in tokens"] = 64
    dropout: Annotated[float, "masks: f(seed, step, rank, world size)"] = 0.0
    bias: Annotated[bool, "biases in Linear and LayerNorm"] = False
    gelu: Annotated[str, "none: exact GELU (05's); tanh: GPT-2's"] = "none"
    strategy: Annotated[str, "ddp: full copies; zero1: AdamW split; fsdp: all split"] = "ddp"
    activation_checkpointing: Annotated[bool, "keep block inputs, rerun in backward"] = False
    compile: Annotated[bool, "compile each block (before sharding)"] = False
    sync_every_micro_step: Annotated[bool, "fsdp: reduce-scatter every micro-step"] = True
    sharded_checkpoint: Annotated[bool, "ranks save their slices, not one file"] = False
    fail_at_step: Annotated[int, "fault injection: last rank dies after this step"] = 0
    # optimization, as 05: a step is gradient_accumulation_steps micro-batches of batch_size rows,
    # all ranks' (so any world size takes the same steps); 16 splits over 1, 2, 4, 8 and 16 ranks
    batch_size: Annotated[int, "rows per micro-batch, all ranks together"] = 16
    gradient_accumulation_steps: Annotated[int, "micro-batches per step"] = 1
    max_iters: Annotated[int, "optimizer steps in total"] = 2000
    optimizer: Annotated[str, "adamw (05's) or sgd (the tests')"] = "adamw"
    learning_rate: Annotated[float, "peak learning rate, after warmup"] = 1e-3
    weight_decay: Annotated[float, "AdamW's, on the 2-D weights only"] = 0.1
    beta1: Annotated[float, "AdamW's momentum"] = 0.9
    beta2: Annotated[float, "AdamW's second-moment decay"] = 0.99
    grad_clip: Annotated[float, "clip the gradient norm to this; 0 = off"] = 1.0
    decay_lr: Annotated[bool, "warmup + cosine; false = constant"] = True
    warmup_iters: Annotated[int, "linear warmup steps"] = 100
    lr_decay_iters: Annotated[int, "the cosine reaches min_lr here"] = 2000
    min_lr: Annotated[float, "~learning_rate / 10"] = 1e-4
    eval_interval: Annotated[int, "val loss every this many steps, and last"] = 250
    eval_iters: Annotated[int, "val batches per evaluation"] = 20
    log_interval: Annotated[int, "a log line every this many steps"] = 10
    checkpoint_interval: Annotated[int, "save every this many steps, and last"] = 100
    device: Annotated[str, "auto, cpu or cuda (rank r: cuda:LOCAL_RANK)"] = "auto"
    dtype: Annotated[str, "auto (bf16 on GPUs with it), float32, bfloat16"] = "auto"
    threads: Annotated[int, "CPU threads per rank; 0: PyTorch's"] = 0
    seed: Annotated[int, "seeds weights (same on all ranks), batches, dropout"] = 1337

    def __post_init__(self):  # a mistake is one `error:` line (see parse_config)
        check_settings(self)

    @property
    def corpus_dir(self) -> Path:
        return PROJECT / self.data_dir / f"{self.dataset}-{self.tokenizer}"

    @property
    def ckpt_path(self) -> Path:  # the full checkpoint, or the pointer to the latest sharded one
        return self.checkpoint(self.sharded_checkpoint)

    def checkpoint(self, sharded: bool) -> Path:  # either kind's file, found or not
        return PROJECT / self.out_dir / ("dcp-latest.pt" if sharded else "ckpt.pt")

    def model_args(self, vocab_size: int) -> dict:  # 04's GPTConfig, as a dict
        names = ("block_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "gelu")
        return {"vocab_size": vocab_size} | {name: getattr(self, name) for name in names}


def check_settings(cfg: DistConfig):
    choices = {"strategy": ("ddp", "zero1", "fsdp"), "optimizer": ("adamw", "sgd"),
               "init_from": ("scratch", "resume", "auto"), "gelu": ("none", "tanh"),
               "dtype": ("auto", "float32", "bfloat16")}  # no float16: no gradient scaler
    at_least_one = ("batch_size", "block_size", "gradient_accumulation_steps", "max_iters",
                    "eval_interval", "eval_iters", "log_interval", "checkpoint_interval")
    check_values(cfg, choices, at_least_one)
    needed = ("LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # torchrun sets them all
    absent = ", ".join(name for name in needed if name not in os.environ)
    if "RANK" in os.environ and absent:
        raise ValueError(f"RANK is set but {absent} not: launch with torchrun or unset RANK")
    world_size = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's (get_batch checks the group)
    if cfg.batch_size % world_size:
        raise ValueError(f"batch_size={cfg.batch_size} (global micro-batch) does not "
                         f"split across {world_size} ranks; use a multiple of {world_size}")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))  # this rank's GPU, under torchrun
    gpus = torch.cuda.device_count()
    bound = gpus == 1 and "TORCHELASTIC_RUN_ID" not in os.environ  # srun bound one to each rank
    if pick_device(cfg.device).startswith("cuda") and local_rank >= gpus and not bound:
        raise ValueError(f"local rank {local_rank} has no GPU of its own (NCCL needs one each): "
                         f"use --nproc_per_node={gpus} or fewer, or --device=cpu")
    if cfg.sharded_checkpoint and cfg.strategy == "zero1":
        raise ValueError("--sharded_checkpoint cannot hold ZeRO's state: --strategy=ddp or fsdp")
    meta = load_meta(cfg.corpus_dir)  # no prepared data: its error names the 02 command
    if min(meta["train_tokens"], meta["val_tokens"]) <= cfg.block_size:
        raise ValueError(f"{cfg.corpus_dir}: train or val tokens too few for "
                         f"--block_size={cfg.block_size}; use a smaller one")
    GPTConfig(**cfg.model_args(meta["n_vocab"]))  # the model's shape: n_embd % n_head, ...
    check_checkpoint(cfg, meta["n_vocab"])


class RunError(ValueError):
    """A mistake found mid-run, not a bug (check_finite's FloatingPointError too): one line."""


def parse_on_every_rank(argv) -> DistConfig:
    """parse_config on every rank: a mistake stops all before the group starts, and rank 0 says why.
    The others wait in silence (torchrun ends them once rank 0 exits: exiting first, they could cut
    it short); one that outlives the wait had a mistake of its own (a node without the data)."""
    rank = os.environ.get("RANK", "0")
    if rank == "0":
        return parse_config(DistConfig, argv)
    try:
        with redirect_stderr(io.StringIO()) as message, redirect_stdout(io.StringIO()):
            return parse_config(DistConfig, argv)
    except SystemExit as stop:
        if not stop.code:  # --help: rank 0 prints it
            raise
        time.sleep(10)  # rank 0 fails too, as a rule: then torchrun ends this rank here
        print(f"rank {rank}: {message.getvalue()}", end="", file=sys.stderr)
        raise


def main(argv=None) -> dict:
    cfg = parse_on_every_rank(argv)  # NEW: one line for a mistake, not one per rank
    world = init_distributed(cfg.device)
    # torchrun sends each rank a SIGINT, then SIGKILL 30 s later (--shutdown-timeout): we save first
    try:
        with CtrlC("at the next log step", say=print0) as ctrl_c:
            result = train(cfg, world, ctrl_c)
    except BaseException as error:
        # the traceback holds train()'s frames and through them the model: let it go first
        traceback.clear_frames(error.__traceback__)
        if isinstance(error, (RunError, FloatingPointError)):  # not a bug: no traceback
            print0(f"error: {error}", file=sys.stderr)  # every rank stops; rank 0 says why
            error = SystemExit(2)
        shutdown_distributed(failed=True)
        raise error
    shutdown_distributed()
    if result["interrupted"]:
        sys.exit(130)  # a shell's code for a Ctrl-C (128 + SIGINT)
    return result


# -----------------------------------------------------------------------------
# Appendix: pieces copied unchanged from earlier stages, so that this file runs on its own.
# Each is its origin's text byte for byte (tests/test_copies.py checks); read them there.

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



# copied from 05_pretrain.py: check_values
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


# copied from 05_pretrain.py: rng_states
def rng_states() -> dict:
    """The states of torch's random generators (CPU, each CUDA GPU, MPS), which dropout draws."""
    states = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()}  # no GPU: []
    if torch.backends.mps.is_available():
        states["mps"] = torch.mps.get_rng_state()
    return states


# copied from 05_pretrain.py: check_finite
def check_finite(what: str, value: float, step: int, ckpt_path, saved_at: int | None):
    """Stop at a NaN or an infinity, before a save overwrites ckpt_path (of iteration saved_at)."""
    if math.isfinite(value):
        return
    message = f"{what} is {value} at iteration {step}: training diverged"
    if saved_at is not None:
        resume = f"--init_from=resume --out_dir={ckpt_path.parent}"
        message += f"; {ckpt_path} (iter {saved_at}) is intact: {resume}"
    raise FloatingPointError(f"{message}; try a lower --learning_rate (or --dtype=float32)")


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


if __name__ == "__main__":
    main()
