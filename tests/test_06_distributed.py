"""Tests for 06_distributed.py: DDP, ZeRO-1 and FSDP2 on 2 gloo ranks against one process.

The claim of data parallelism: N ranks with B/N rows each take exactly the step one process takes
with B rows. So every distributed run here is compared with `reference_run`, a plain
single-process loop written out in this file (no wrappers, no process group), over the same
global batches.

How the ranks run. Starting process groups is the slow part (each one imports torch and
connects), so there are few launches:
  - `two_ranks` (one per module): `python tests/test_06_distributed.py SPEC` forks 2 ranks that
    share one gloo group and run every one of scenarios() in turn (strategies x {SGD, AdamW} x
    {1, 2} micro-batches, activation checkpointing, FSDP's reduce-scatter on the last micro-step
    only, resumes, a Ctrl-C), saving what each rank holds and the collectives of each step;
  - the same launcher with 8 ranks (the default batch size), and with 2 ranks that disagree;
  - torchrun, the way users launch: a rank killed mid-run, and a user error.
Each launch is a new session under a deadline; on timeout the whole process group is killed
(a plain subprocess timeout would leave orphaned ranks hanging in a collective). The rest runs in
this process as a world of one: --compile, activation memory, ZeRO's resume, the user errors,
Ctrl-C, the checkpoint kind and the dtype a resume finds.
"""

import dataclasses
import gc
import json
import os
import shutil
import signal
import sys
import time
import warnings
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import load_script, run_with_deadline
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.optim import ZeroRedundancyOptimizer

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
K = 4  # optimizer steps per run
SGD_LR, ADAMW_LR = 0.1, 1e-3
# a tiny GPT; no parameter holds more than ~10% of the total, so ZeRO's greedy split is even
BASE = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4, max_iters=K,
            warmup_iters=2, lr_decay_iters=K, log_interval=1, eval_interval=K, eval_iters=3,
            checkpoint_interval=2, seed=1337, device="cpu", dtype="float32")
RUNS = {  # name -> settings; each is run by every strategy. "sgd" tests the arithmetic tightly.
    # sgd-1 clips the gradient norm
    "sgd-1": dict(optimizer="sgd", learning_rate=SGD_LR, min_lr=SGD_LR / 10, grad_clip=0.5),
    "sgd-2": dict(optimizer="sgd", learning_rate=SGD_LR, min_lr=SGD_LR / 10, grad_clip=0.0,
                  gradient_accumulation_steps=2),
    "adamw-1": dict(optimizer="adamw", learning_rate=ADAMW_LR, min_lr=ADAMW_LR / 10, grad_clip=1.0),
    "adamw-2": dict(optimizer="adamw", learning_rate=ADAMW_LR, min_lr=ADAMW_LR / 10, grad_clip=1.0,
                    gradient_accumulation_steps=2),
}
STRATEGIES = ("ddp", "zero1", "fsdp")
# AdamW's tolerance. Adam's update is m / sqrt(v): about lr per entry whatever the gradient's size,
# so float noise in a gradient entry near zero can move that entry by up to lr. Measured here after
# 4 steps: 2 ranks vs 1 differ by at most ~4e-6; a wrong data split (one rank's rows lost) by ~5e-3,
# many entries moving ~lr per step. 2e-4 lies 20x from each (test_tolerances_catch_bugs checks the
# second); SGD's 1e-6 is tighter still, and SGD also sees a sum-instead-of-mean bug that Adam hides.
ADAMW_ATOL = 2e-4


def scenarios() -> list[dict]:
    """What the 2-rank launch runs, in order: name, extra settings, and where to resume from."""
    out = [dict(name=f"{s}-{r}", run=r, settings=dict(strategy=s, **RUNS[r]))
           for s in STRATEGIES for r in RUNS]
    for s in out:  # activation checkpointing must not change the arithmetic (checked with SGD)
        if s["name"] in ("fsdp-sgd-2", "ddp-adamw-1"):
            s["settings"]["activation_checkpointing"] = True
        s["count_ddp"] = s["name"] in ("ddp-sgd-1", "ddp-sgd-2")  # see instrument
    # FSDP reduce-scattering on the last micro-step only must not change it either
    out.append(dict(name="fsdp-nosync-sgd-2", run="sgd-2",
                    settings=dict(strategy="fsdp", sync_every_micro_step=False, **RUNS["sgd-2"])))
    # resumes: half the steps, then the rest from that checkpoint in a new run
    resumes = (("zero1-resume", "zero1", {}), ("fsdp-dcp", "fsdp", {"sharded_checkpoint": True}))
    for name, strategy, extra in resumes:
        settings = dict(strategy=strategy, **RUNS["adamw-2"], **extra)
        half = {**settings, "max_iters": K // 2}
        out.append(dict(name=f"{name}-half", run="adamw-2", settings=half))
        out.append(dict(name=name, run="adamw-2", settings={**settings, "init_from": "resume"},
                        resume_from=f"{name}-half"))
    # Ctrl-C during the first step, on rank 0 alone (as when it reaches one machine of several):
    # both ranks save after that step and stop; a resume takes the remaining steps
    settings = dict(strategy="ddp", **RUNS["adamw-2"])
    out.append(dict(name="ctrl-c-half", run="adamw-2", settings=settings, ctrl_c_at=0))
    out.append(dict(name="ctrl-c", run="adamw-2", settings={**settings, "init_from": "resume"},
                    resume_from="ctrl-c-half"))
    return out


def argv(settings: dict, **more) -> list[str]:
    return [f"--{k}={v}" for k, v in {**BASE, **settings, **more}.items()]


# -----------------------------------------------------------------------------
# the launches: this file run as a script forks the ranks (they live in this module)


def instrument(dist06, rank: int) -> dict:
    """Wrap this rank's 06 so that every train_step records the gradient collectives it ran, in
    probe["steps"]: FSDP's reduce-scatters, ZeRO's broadcasts of the updated parameters and, where
    probe["count_ddp"], DDP's all-reduces (counted by a comm hook that averages as DDP does).
    Rank 0 also presses Ctrl-C (SIGINT to itself) as step probe["ctrl_c_at"] begins."""
    probe = {"steps": [], "now": Counter(), "count_ddp": False, "ctrl_c_at": None}

    def counted(kind, function):
        def wrapper(*args, **kwargs):
            probe["now"][kind] += 1
            return function(*args, **kwargs)
        return wrapper

    dist.reduce_scatter_single = counted("reduce_scatter", dist.reduce_scatter_single)
    dist.broadcast = counted("broadcast", dist.broadcast)
    train_step = dist06.train_step
    parallelize = dist06.parallelize

    def recorded_train_step(model, optimizer, data, cfg, world, it):
        if rank == 0 and it == probe["ctrl_c_at"]:
            os.kill(os.getpid(), signal.SIGINT)
        probe["now"].clear()
        result = train_step(model, optimizer, data, cfg, world, it)
        probe["steps"].append(dict(probe["now"]))
        return result

    def all_reduce(process_group, bucket):  # DDP checks a hook's parameter names
        probe["now"]["all_reduce"] += 1
        return default_hooks.allreduce_hook(process_group, bucket)

    def hooked_parallelize(model, cfg):
        model = parallelize(model, cfg)
        if probe["count_ddp"]:
            model.register_comm_hook(None, all_reduce)
        return model

    dist06.train_step = recorded_train_step
    dist06.parallelize = hooked_parallelize
    return probe


def rank_main(rank: int, world_size: int, spec: dict):
    """One rank: join the group, run every scenario with 06's train(), save what this rank holds."""
    torch.set_num_threads(1)  # torchrun would set OMP_NUM_THREADS=1; 2 ranks share 2 cores
    os.environ["WORLD_SIZE"] = str(world_size)  # as torchrun: 06's settings check reads it
    dist06 = load_script("06_distributed")
    dist.init_process_group("gloo", init_method=f"file://{spec['store']}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=60))
    world = dist06.init_distributed("cpu")  # joins the group above
    probe = instrument(dist06, rank)
    results, out = {}, Path(spec["out"])
    for scenario in spec["scenarios"]:
        out_dir = out / scenario["name"]
        if rank == 0 and scenario.get("resume_from"):
            shutil.copytree(out / scenario["resume_from"], out_dir)
        if rank == 1 and scenario.get("unshared"):  # a node that cannot see rank 0's out_dir
            out_dir = out / "rank1-local"
        dist.barrier()
        cfg = dist06.parse_config(dist06.DistConfig, scenario["argv"] + [f"--out_dir={out_dir}"])
        probe.update(steps=[], count_ddp=scenario.get("count_ddp"),
                     ctrl_c_at=scenario.get("ctrl_c_at"))
        started = time.perf_counter()
        try:
            with dist06.CtrlC("at the next log step") as ctrl_c:  # as 06's main does
                result = dist06.train(cfg, world, ctrl_c)
        except ValueError as error:  # the unshared run's: every rank must stop, and soon
            result = {"error": str(error), "seconds": time.perf_counter() - started}
        results[scenario["name"]] = {**result, "collectives": probe["steps"]}
    torch.save(results, out / f"rank{rank}.pt")
    del result
    dist.barrier()  # the teardown order of shutdown_distributed: barrier, drop, destroy
    gc.collect()
    dist.destroy_process_group()


def rank_process(rank: int, world_size: int, spec: dict):
    """rank_main with its stderr (Python's and C++'s) in out/rank<r>.stderr, for the launcher."""
    log = open(Path(spec["out"]) / f"rank{rank}.stderr", "w")
    os.dup2(log.fileno(), 2)
    rank_main(rank, world_size, spec)


def launch_status(exitcodes: list[int], logs: list[str]) -> int:
    """The launch's exit status: 6, worth one more launch, only for a crash inside C++ (SIGABRT,
    not our SIGKILL) where no rank printed a Python traceback; else the worst exit code."""
    aborted = -signal.SIGABRT in exitcodes
    python_error = any("Traceback (most recent call last)" in log for log in logs)
    if aborted and not python_error:
        return 6
    return max(abs(code) for code in exitcodes)


def launch_ranks(spec_path: str):
    import multiprocessing as mp

    load_script("06_distributed")  # loaded once, before the fork: the ranks inherit it
    spec = json.loads(Path(spec_path).read_text())
    size = spec["world_size"]
    context = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    ranks = [context.Process(target=rank_process, args=(r, size, spec)) for r in range(size)]
    for p in ranks:
        p.start()
    while any(p.is_alive() for p in ranks):  # one rank failing leaves the others waiting: end all
        if any(p.exitcode not in (None, 0) for p in ranks):
            for p in ranks:
                p.kill()
        time.sleep(0.05)
    logs = [(Path(spec["out"]) / f"rank{r}.stderr").read_text() for r in range(size)]
    print("".join(logs), file=sys.stderr)  # for the failure message
    sys.exit(launch_status([p.exitcode for p in ranks], logs))


# -----------------------------------------------------------------------------
# fixtures and the single-process reference


@pytest.fixture(scope="module")
def corpus(dl02, shakespeare_text, tmp_path_factory) -> Path:
    """A data_dir holding tinyshakespeare-char/ as 02 prepares it, from the first 100k
    characters."""
    text = shakespeare_text[:100_000]
    data_dir = tmp_path_factory.mktemp("data")
    spec = dl02.CharTokenizer.from_text(text).to_dict()
    dl02.prepare_corpus(text, data_dir / "tinyshakespeare-char", spec)
    return data_dir


def run_ranks(out: Path, runs: list[dict], timeout: float, world_size: int = 2) -> dict:
    """One launch of runs (scenarios with "argv") -> {name: [rank 0's result, rank 1's, ...]}."""
    spec = {"store": str(out / "store"), "out": str(out), "scenarios": runs,
            "world_size": world_size}
    (out / "spec.json").write_text(json.dumps(spec))
    run_with_deadline([sys.executable, __file__, str(out / "spec.json")], timeout=timeout)
    per_rank = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
    return {name: [results[name] for results in per_rank] for name in per_rank[0]}


@pytest.fixture(scope="module")
def two_ranks(dist06, corpus, tmp_path_factory) -> dict:
    """{scenario: [rank 0's result, rank 1's result]} of the one 2-rank launch; out dir in
    "_out"."""
    for attempt in (1, 2):
        out = tmp_path_factory.mktemp("two_ranks")
        runs = [{**s, "argv": argv(s["settings"], data_dir=corpus)} for s in scenarios()]
        try:
            results = run_ranks(out, runs, timeout=240)
            break
        except AssertionError as failure:
            # A rank killed by SIGABRT inside gloo (exit 6), its peer then "Connection reset by
            # peer": seen once in ~40 launches on this 2-core machine, never twice in a row, with no
            # Python error in our code. One more launch, loudly, only then (launch_status): a
            # Python traceback in any rank fails at once; a real bug fails the same way both times.
            if attempt == 2 or "failed (6)" not in str(failure):
                raise
            warnings.warn("the 2-rank launch aborted once (SIGABRT in a rank, no Python traceback "
                          f"in any); launching again:\n{str(failure)[:3000]}")
    return results | {"_out": out}


REFERENCES = {}


def val_loss_as_05(dist06, model, tokens, cfg, step: int) -> float:
    """05's evaluation after `step` steps, written out: batch k is global batch
    step * eval_iters + k of the val stream (seed + 1); the loss is the mean of the eval_iters
    batches' mean losses."""
    batch_losses = []
    model.eval()
    with torch.no_grad():
        for k in range(cfg.eval_iters):
            x, y = dist06.get_batch(tokens, cfg.batch_size, cfg.block_size,
                                    step * cfg.eval_iters + k, cfg.seed + 1)
            batch_losses.append(model(x, y)[1].item())
    model.train()
    return sum(batch_losses) / len(batch_losses)


def reference_run(dist06, corpus, run: str, rows=None, loss_scale=1.0):
    """One process, no wrappers, 05's step: K steps of RUNS[run] -> (named parameters, loss of each
    step, val loss after the last step).

    rows and loss_scale plant bugs for test_tolerances_catch_bugs: train on only these rows of
    each batch, or scale the gradients (2 = summed over 2 ranks instead of averaged).
    """
    buggy = rows is not None or loss_scale != 1.0
    if not buggy and run in REFERENCES:
        return REFERENCES[run]
    cfg = dist06.DistConfig(**{**BASE, **RUNS[run]}, data_dir=str(corpus),
                            out_dir=str(corpus / "unused"))
    corpus_dir = corpus / "tinyshakespeare-char"
    data = {split: dist06.load_tokens(corpus_dir, split) for split in ("train", "val")}
    n_vocab = dist06.load_meta(corpus_dir)["n_vocab"]
    torch.manual_seed(cfg.seed)
    model = dist06.GPT(dist06.GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                        block_size=cfg.block_size, vocab_size=n_vocab,
                                        bias=cfg.bias))
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate)
    else:
        optimizer = dist06.configure_optimizers(model, cfg.weight_decay, cfg.learning_rate,
                                                (cfg.beta1, cfg.beta2), "cpu")
    accumulation, losses = cfg.gradient_accumulation_steps, []
    for it in range(K):
        for group in optimizer.param_groups:
            group["lr"] = dist06.get_lr(it, cfg)
        optimizer.zero_grad()
        loss_sum = 0.0
        x, y = dist06.get_batch(data["train"], cfg.batch_size * accumulation, cfg.block_size, it,
                                cfg.seed)
        for xb, yb in zip(x.chunk(accumulation), y.chunk(accumulation)):
            _, loss = model(xb[rows or slice(None)], yb[rows or slice(None)])
            (loss * loss_scale / accumulation).backward()
            loss_sum += loss.item() / accumulation
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        losses.append(loss_sum)
    val_loss = val_loss_as_05(dist06, model, data["val"], cfg, K)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    result = weights, losses, val_loss
    if not buggy:
        REFERENCES[run] = result
    return result


def test_05_evaluates_as_06(dist06, pre05, corpus):
    """05's estimate_loss reads the batches 06's evaluate reads (val_loss_as_05, which the 2-rank
    runs match): with eval_iters=3, batch k of the evaluation at step K is global batch 3K + k."""
    cfg = dist06.DistConfig(**{**BASE, **RUNS["sgd-1"]}, data_dir=str(corpus),
                            out_dir=str(corpus / "unused"))
    assert cfg.eval_iters == 3
    tokens = dist06.load_tokens(corpus / "tinyshakespeare-char", "val")
    torch.manual_seed(0)
    n_vocab = dist06.load_meta(cfg.corpus_dir)["n_vocab"]
    model = dist06.GPT(dist06.GPTConfig(**cfg.model_args(n_vocab)))
    val_05 = pre05.estimate_loss(model, {"val": tokens}, cfg, K)["val"]
    expected = val_loss_as_05(dist06, model, tokens, cfg, K)
    torch.testing.assert_close(val_05, expected, rtol=1e-5, atol=1e-5)


def full_weights(ranks: list[dict], strategy: str) -> dict:
    """The whole model from what the two ranks hold: a replica each, or FSDP's dim-0 shards."""
    if strategy != "fsdp":
        for name, tensor in ranks[0]["local_state"].items():  # the replicas agree exactly
            assert torch.equal(tensor, ranks[1]["local_state"][name]), f"ranks disagree on {name}"
        return ranks[0]["local_state"]
    names = ranks[0]["local_state"]
    return {name: torch.cat([r["local_state"][name] for r in ranks]) for name in names}


def tolerance(run: str) -> dict:
    return dict(rtol=0, atol=1e-6) if run.startswith("sgd") else dict(rtol=0, atol=ADAMW_ATOL)


# -----------------------------------------------------------------------------
# the tests


@pytest.mark.slow
@pytest.mark.parametrize("name", [s["name"] for s in scenarios()
                                  if not s["name"].endswith("-half")])
def test_two_ranks_equal_one_process(dist06, corpus, two_ranks, name):
    """Same weights as one process after K steps (SGD: 1e-6), ranks agree, same loss each step,
    and the data-parallel evaluation gives 05's val loss."""
    scenario = next(s for s in scenarios() if s["name"] == name)
    strategy, run = scenario["settings"]["strategy"], scenario["run"]
    ref_weights, ref_losses, ref_val = reference_run(dist06, corpus, run)
    ranks = two_ranks[name]
    weights = full_weights(ranks, strategy)
    assert weights.keys() == ref_weights.keys()
    for key in ref_weights:
        torch.testing.assert_close(weights[key], ref_weights[key], **tolerance(run),
                                   msg=f"{name}: {key}")
    first = 0
    if scenario.get("resume_from"):  # a resumed run logs its own steps only
        first = two_ranks[scenario["resume_from"]][0]["iter_num"]
    assert ranks[0]["iter_num"] == K
    logged = list(range(first + 1, K + 1))  # keyed by steps done, as the log prints "iter 1/4"
    for r in ranks:
        assert sorted(r["losses"]) == logged
        torch.testing.assert_close([r["losses"][i] for i in logged], ref_losses[first:],
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["val_loss"], ref_val, rtol=1e-5, atol=1e-5)


def max_difference(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_tolerances_catch_bugs(dist06, corpus):
    """The tolerances can fail: a wrong data split breaks AdamW's; a sum instead of a mean breaks
    SGD's but not AdamW's (Adam divides the scale out), which is why every case also runs with
    SGD."""
    for run, atol in (("adamw-1", ADAMW_ATOL), ("sgd-1", 1e-6), ("sgd-2", 1e-6)):
        ref = reference_run(dist06, corpus, run)[0]
        half = reference_run(dist06, corpus, run, rows=slice(0, 2))[0]  # rank 1's rows lost
        assert max_difference(half, ref) > 5 * atol, run
    summed = reference_run(dist06, corpus, "sgd-2", loss_scale=2.0)[0]
    assert max_difference(summed, reference_run(dist06, corpus, "sgd-2")[0]) > 1000 * 1e-6
    summed = reference_run(dist06, corpus, "adamw-2", loss_scale=2.0)[0]
    assert max_difference(summed, reference_run(dist06, corpus, "adamw-2")[0]) < ADAMW_ATOL


@pytest.mark.slow
def test_memory_per_rank(two_ranks):
    """From the real local tensors: FSDP holds <= 0.55x DDP's total, ZeRO-1 <= 0.55x its optimizer
    state."""
    ddp, zero1, fsdp = (two_ranks[f"{s}-adamw-1"] for s in STRATEGIES)
    for rank in range(2):
        d, z, f = ddp[rank]["memory"], zero1[rank]["memory"], fsdp[rank]["memory"]
        step_bytes = 4 * len(list(ddp[rank]["local_state"]))  # Adam's step, one per parameter
        assert d["optimizer"] == 2 * d["params"] + step_bytes  # m, v and the steps
        assert d["grads"] == d["params"]
        assert sum(f.values()) <= 0.55 * sum(d.values()), (f, d)
        assert z["optimizer"] <= 0.55 * d["optimizer"], (z, d)
        # ZeRO-1 shards only the state
        assert z["params"] == d["params"] and z["grads"] == d["grads"]
    # the shards add up: every parameter byte is on exactly one rank
    assert fsdp[0]["memory"]["params"] + fsdp[1]["memory"]["params"] == ddp[0]["memory"]["params"]


def saved_activation_bytes(model, x, y) -> int:
    """Bytes autograd keeps for the backward of one forward: the activation memory, measured.

    saved_tensors_hooks sees every tensor an op saves for backward. Parameters are not activations
    and are skipped; views of one storage count once. Inside a checkpointed block checkpoint's own
    hooks take over, and it keeps the block's input alive to rerun it: a forward pre-hook counts it.
    """
    blocks = getattr(model, "module", model).transformer.h
    seen = {p.untyped_storage().data_ptr() for p in model.parameters()}  # never counted
    total = 0

    def count(t):
        nonlocal total
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
        return t

    def keep_input(module, args):  # checkpoint keeps each block's input to rerun the block
        count(args[0])

    hooks = [block.register_forward_pre_hook(keep_input) for block in blocks]
    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        model(x, y)
    for hook in hooks:
        hook.remove()
    return total


def test_activation_checkpointing_saves_memory(dist06, corpus, tmp_path):
    """06's parallelize with --activation_checkpointing keeps much less for backward (its arithmetic
    is tested above, with DDP and FSDP), measured through DDP on one micro-batch of 6 rows x 64
    tokens of the default model (12.53 MB -> 1.23 MB); without the flag, nothing changes."""
    dist06.init_distributed("cpu")  # a world of one: DDP needs a process group
    try:
        data = dist06.load_tokens(corpus / "tinyshakespeare-char", "train")
        x, y = dist06.get_batch(data, 6, 64, step=0)
        for checkpointing in (False, True):
            cfg = dist06.DistConfig(strategy="ddp", activation_checkpointing=checkpointing,
                                    device="cpu", dtype="float32", data_dir=str(corpus),
                                    out_dir=str(tmp_path))
            torch.manual_seed(0)
            model = dist06.GPT(dist06.GPTConfig(**cfg.model_args(65)))
            before = saved_activation_bytes(model, x, y)
            after = saved_activation_bytes(dist06.parallelize(model, cfg), x, y)
            if checkpointing:
                assert after < 0.5 * before, (before, after)
            else:
                assert after == before, (before, after)
    finally:
        dist06.shutdown_distributed()


def test_compile_per_block_keeps_the_arithmetic(dist06, corpus, tmp_path, monkeypatch, capsys):
    """--compile compiles each block (before FSDP shards it, with activation checkpointing inside)
    and trains exactly as one process does. The test compiles with the aot_eager backend: it traces
    the blocks as inductor would but runs the traced ops as they are, which takes seconds, not a
    minute."""
    compiled = []
    compile_module = torch.nn.Module.compile

    def compile_for_test(module, *args, **kwargs):
        # "Block": not yet sharded (FSDP renames it FSDPBlock)
        compiled.append(type(module).__name__)
        compile_module(module, backend="aot_eager")

    monkeypatch.setattr(torch.nn.Module, "compile", compile_for_test)
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    settings = dict(strategy="fsdp", compile=True, activation_checkpointing=True, **RUNS["sgd-2"])
    result = dist06.main(argv(settings, data_dir=corpus, out_dir=tmp_path / "run"))
    assert compiled == ["Block"] * BASE["n_layer"]
    assert "MB after one step" in capsys.readouterr().out  # every run prints its memory table
    ref_weights, ref_losses, _ = reference_run(dist06, corpus, "sgd-2")
    for name, tensor in result["local_state"].items():
        torch.testing.assert_close(tensor, ref_weights[name], **tolerance("sgd-2"), msg=name)
    torch.testing.assert_close(list(result["losses"].values()), ref_losses, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_full_checkpoint_loads_in_05_and_resumes_in_a_world_of_one(dist06, pre05, corpus, two_ranks,
                                                                     tmp_path, monkeypatch):
    """The file rank 0 writes is 05's format (05's load_checkpoint reads it), and another world size
    and strategy resume from it."""
    out = two_ranks["_out"]
    model, tokenizer, ckpt = pre05.load_checkpoint(out / "fsdp-adamw-2" / "ckpt.pt")
    assert ckpt["iter_num"] == K and ckpt["stage"] == "distributed"
    assert tokenizer.n_vocab == model.config.vocab_size
    weights = full_weights(two_ranks["fsdp-adamw-2"], "fsdp")
    for name, p in model.named_parameters():
        assert torch.equal(p, weights[name]), name
    # zero1 on 2 ranks wrote step K/2; a world of one (plain python) continues it with fsdp
    shutil.copytree(out / "zero1-resume-half", tmp_path / "run")
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    settings = dict(strategy="fsdp", **RUNS["adamw-2"])
    result = dist06.main(argv(settings, data_dir=corpus, out_dir=tmp_path / "run",
                              init_from="resume"))
    ref_weights, ref_losses, _ = reference_run(dist06, corpus, "adamw-2")
    for name, tensor in result["local_state"].items():
        torch.testing.assert_close(tensor, ref_weights[name], rtol=0, atol=ADAMW_ATOL, msg=name)
    torch.testing.assert_close(list(result["losses"].values()), ref_losses[K // 2:], rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("strategy, sharded", [("ddp", False), ("zero1", False), ("fsdp", True)])
def test_a_resume_takes_the_optimizer_settings_given_now(dist06, corpus, tmp_path, monkeypatch,
                                                         strategy, sharded):
    """Adam's moments come from the checkpoint, betas and weight decay from the flags given now
    (a checkpoint's param_groups would keep the old ones), in all three ways 06 loads one."""
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    settings = dict(strategy=strategy, sharded_checkpoint=sharded, **RUNS["adamw-1"])
    dist06.main(argv(settings, data_dir=corpus, out_dir=tmp_path, max_iters=2))
    seen = []
    step = dist06.train_step

    def recording(model, optimizer, *args):
        seen.append([(g["weight_decay"], tuple(g["betas"])) for g in optimizer.param_groups])
        return step(model, optimizer, *args)

    monkeypatch.setattr(dist06, "train_step", recording)
    dist06.main(argv(settings, data_dir=corpus, out_dir=tmp_path, max_iters=3, init_from="resume",
                     weight_decay=0.0, beta1=0.5))
    assert seen == [[(0.0, (0.5, 0.99)), (0.0, (0.5, 0.99))]]


def test_a_sharded_save_removes_only_its_own_earlier_saves(dist06, corpus, tmp_path, monkeypatch):
    """A sharded save removes the dcp-<step> folder it supersedes (the one the pointer named), and
    nothing else of out_dir's that starts with dcp-: a user's copy of a save, notes, a dcp-2024."""
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    for folder in ("dcp-000001.bak", "dcp-notes", "dcp-2024"):
        (tmp_path / folder).mkdir()
    (tmp_path / "dcp-2024.txt").write_text("notes")
    settings = dict(strategy="ddp", sharded_checkpoint=True, **RUNS["adamw-1"])
    dist06.main(argv(settings, data_dir=corpus, out_dir=tmp_path, max_iters=2,
                     checkpoint_interval=1))
    kept = {"dcp-000001.bak", "dcp-notes", "dcp-2024", "dcp-2024.txt"}
    assert {p.name for p in tmp_path.glob("dcp-*")} == kept | {"dcp-000002", "dcp-latest.pt"}


@pytest.mark.slow
def test_zero1_resume_keeps_optimizer_state_beside_its_parameters(dist06, corpus, two_ranks,
                                                                  tmp_path, monkeypatch):
    """ZeroRedundancyOptimizer.load_state_dict puts 0-dim state (Adam's step) on the CPU, where
    fused CUDA AdamW rejects it (pytorch/pytorch#124133); 06's resume puts it back beside its
    parameter.
    Without a GPU, the parameters stand on the meta device, so that the CPU is the wrong place."""
    shutil.copytree(two_ranks["_out"] / "zero1-resume-half", tmp_path / "run")
    cfg = dist06.DistConfig(**{**BASE, **RUNS["adamw-2"]}, strategy="zero1", init_from="resume",
                            data_dir=str(corpus), out_dir=str(tmp_path / "run"))
    real_cpu = torch.Tensor.cpu  # a meta tensor has no data to copy: the CPU gets an empty one

    def cpu(tensor, *args, **kwargs):
        if tensor.is_meta:
            return torch.empty_like(tensor, device="cpu")
        return real_cpu(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    world = dist06.init_distributed("cpu")
    try:
        model_args = cfg.model_args(dist06.load_meta(cfg.corpus_dir)["n_vocab"])
        with torch.device("meta"):
            model = dist06.GPT(dist06.GPTConfig(**model_args))
        optimizer = dist06.build_optimizer(cfg, model, dataclasses.replace(world, device="meta"))
        assert dist06.resume(cfg, model, optimizer, world)[0] == K // 2
        state = optimizer.optim.state
        assert state and all({"step", "exp_avg", "exp_avg_sq"} <= set(s) for s in state.values())
        for p, s in state.items():
            for key, value in s.items():
                assert value.device == p.device, (key, value.device, p.device)
        # the base class's load_state_dict kept a second copy of the same state in ZeRO's own
        # .state, which its step never reads: 06 drops it (on a GPU, 8P/N bytes of optimizer state
        # per rank)
        second_copy = [v for s in optimizer.state.values() for v in (s or {}).values()]
        assert not any(torch.is_tensor(v) for v in second_copy)
    finally:
        dist06.shutdown_distributed()


@pytest.mark.slow
def test_kill_and_restart_under_torchrun(dist06, corpus, two_ranks, tmp_path):
    """torchrun --max-restarts=1: rank 1 dies after step 3; the job resumes from the step-2
    checkpoint and ends with exactly the weights of the uninterrupted run (same world size, same
    order of ops)."""
    settings = dict(strategy="fsdp", **RUNS["adamw-2"])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "--max-restarts=1", "06_distributed.py"]
    cmd = torchrun + argv(settings, data_dir=corpus, out_dir=tmp_path, fail_at_step=3,
                          init_from="auto")
    # without the variable a restarted rank may read a dead rank's address from the store torchrun
    # shares across attempts, and fail or hang (pytorch/pytorch#135712)
    out = "".join(run_with_deadline(cmd, timeout=240, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"))
    assert "fault injection: rank 1 dies after step 3" in out
    assert "resuming at iter 2 of 4" in out
    restarted = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    uninterrupted = torch.load(two_ranks["_out"] / "fsdp-adamw-2" / "ckpt.pt", weights_only=False)
    assert restarted["iter_num"] == uninterrupted["iter_num"] == K
    for name, tensor in uninterrupted["model"].items():
        assert torch.equal(restarted["model"][name], tensor), name
    for i, state in uninterrupted["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(restarted["optimizer"]["state"][i][key], value), (i, key)


def test_errors(dist06, corpus, tmp_path, monkeypatch, capsys):
    """Bad settings and a half-made torchrun environment fail with a message that names the fix."""
    where = dict(data_dir=str(corpus), out_dir=str(tmp_path / "run"))
    monkeypatch.setenv("WORLD_SIZE", "4")  # as torchrun --nproc_per_node=4 sets it
    split = "batch_size=6 .* does not split across 4 ranks.*multiple of 4"
    with pytest.raises(ValueError, match=split):
        dist06.DistConfig(batch_size=6, **where)
    monkeypatch.setenv("WORLD_SIZE", "3")
    dist06.DistConfig(batch_size=6, **where)  # 2 rows each: fine
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ValueError, match="--strategy='zero3' is not valid; use ddp, zero1, fsdp"):
        dist06.DistConfig(strategy="zero3", **where)
    with pytest.raises(ValueError, match="sharded_checkpoint cannot hold ZeRO"):
        dist06.DistConfig(strategy="zero1", sharded_checkpoint=True, **where)
    with pytest.raises(ValueError, match="--optimizer='adam' is not valid"):
        dist06.DistConfig(optimizer="adam", **where)
    a_file = corpus / "tinyshakespeare-char" / "meta.json"
    with pytest.raises(ValueError, match="is a file, or in one: name a folder"):  # not at a save
        dist06.DistConfig(**{**where, "out_dir": str(a_file)})
    # half of torchrun's environment: say what is missing and how to launch
    monkeypatch.setenv("RANK", "0")
    for var in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    missing = "LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT"
    message = f"RANK is set but {missing} not: launch with torchrun"
    with pytest.raises(ValueError, match=message):
        dist06.DistConfig(**where)
    argv = [f"--{name}={value}" for name, value in where.items()]
    assert message in user_error(dist06, capsys, argv)  # one line, before any work


def user_error(dist06, capsys, argv) -> str:
    """main(argv) must stop with exit status 2 and one `error:` line on stderr; return that line."""
    with pytest.raises(SystemExit) as exit_info:
        dist06.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("flags, message", [
    (["--strategy=zero3"], "--strategy='zero3' is not valid; use ddp, zero1, fsdp"),
    (["--dtype=float16"], "--dtype='float16' is not valid"),
    (["--device=cuda:7"] if not torch.cuda.is_available() else ["--device=tpu"], "device"),
    (["--n_embd=100", "--n_head=3"], "not divisible by n_head=3"),
    (["--block_size=100000"], "too few for --block_size=100000"),
    (["--init_from=resume"], "--init_from=resume: no checkpoint at"),
    (["--log_interval=0"], "--log_interval=0 must be finite and >= 1"),
    (["--max_iters=-3"], "--max_iters=-3 must be finite and >= 1"),
    (["--grad_clip=-1", "--max_iters=1"], "--grad_clip=-1.0 must be finite and >= 0"),
    (["--threads=-1", "--max_iters=1"], "--threads=-1 must be finite and >= 0"),
    (["--learning_rate=-1", "--max_iters=1"], "--learning_rate=-1.0 must be finite and >= 0"),
    (["--beta2=1.5", "--max_iters=1"], "--beta2=1.5 must be less than 1"),
    (["--seed=-1"], "--seed=-1 must be finite and >= 0"),
    (["--warmup_iters=9", "--lr_decay_iters=9", "--max_iters=1"], "--lr_decay_iters=9 must exceed"),
])  # fmt: skip
def test_user_errors_are_one_line_and_leave_nothing_behind(dist06, corpus, tmp_path, capsys,
                                                            monkeypatch, flags, message):
    monkeypatch.delenv("RANK", raising=False)
    out_dir = tmp_path / "run"
    err = user_error(dist06, capsys, [*flags, f"--data_dir={corpus}", f"--out_dir={out_dir}"])
    assert message in err, err
    assert not out_dir.exists()
    assert not dist.is_initialized()


def test_auto_finds_either_kind_of_checkpoint_and_refuses_the_other_flag(dist06, corpus, tmp_path,
                                                                          capsys, monkeypatch):
    """--init_from=auto (or resume) where out_dir holds the other kind of checkpoint than
    --sharded_checkpoint names stops with one line that names the flag, instead of starting afresh
    beside it (a sharded run restarted without the flag)."""
    monkeypatch.delenv("RANK", raising=False)
    settings = dict(strategy="ddp", **RUNS["sgd-1"])
    cases = (("dcp-latest.pt", {}, "--sharded_checkpoint=true"),
             ("ckpt.pt", {"sharded_checkpoint": True}, "--sharded_checkpoint=false"))
    for on_disk, flags, fix in cases:
        run = tmp_path / on_disk
        run.mkdir()
        (run / on_disk).write_bytes(b"")  # refused before it is read
        for init_from in ("auto", "resume"):
            flags_now = argv({**settings, **flags}, data_dir=corpus, out_dir=run,
                             init_from=init_from)
            err = user_error(dist06, capsys, flags_now)
            assert f"{run / on_disk} is the other kind" in err, err
            assert err.endswith(f"resume it with {fix}\n"), err
        assert [f.name for f in run.iterdir()] == [on_disk]


@pytest.mark.parametrize("sharded_first", [True, False])
def test_overwrite_removes_the_replaced_runs_other_kind(dist06, corpus, tmp_path, capsys,
                                                        monkeypatch, sharded_first):
    """A run with --overwrite and the other --sharded_checkpoint replaces the run in out_dir: its
    checkpoint of the other kind goes at the first save, so that a later resume with the old flag
    is refused (naming the flag) instead of silently continuing the replaced run."""
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    old = dict(strategy="ddp", sharded_checkpoint=sharded_first, **RUNS["sgd-1"])
    new = {**old, "sharded_checkpoint": not sharded_first}
    dist06.main(argv(old, data_dir=corpus, out_dir=tmp_path, max_iters=2))
    dist06.main(argv(new, data_dir=corpus, out_dir=tmp_path, max_iters=1, overwrite=True))
    new_file = "ckpt.pt" if sharded_first else "dcp-latest.pt"
    err = user_error(dist06, capsys, argv(old, data_dir=corpus, out_dir=tmp_path,
                                          init_from="resume", max_iters=3))
    assert f"{tmp_path / new_file} is the other kind" in err, err


def test_resume_refuses_a_checkpoint_that_does_not_fit(dist06, corpus, tmp_path, capsys,
                                                        monkeypatch):
    """A resume (or auto) into an out_dir whose checkpoint another model wrote, that another stage
    wrote (07's, 08's: resumed as a pretraining run, it was overwritten) or that cannot be read
    stops with one line before any work, naming the way on, instead of a traceback or a loss."""
    monkeypatch.delenv("RANK", raising=False)
    settings = dict(strategy="ddp", **RUNS["adamw-1"])
    cfg = dist06.DistConfig(**{**BASE, **settings}, data_dir=str(corpus), out_dir=str(tmp_path))
    model_args = cfg.model_args(dist06.load_meta(cfg.corpus_dir)["n_vocab"])
    fits = {"model_args": model_args, "optimizer": {"state": {}}, "iter_num": 2,
            "stage": "pretrain"}
    cases = (  # what is on disk, the flags given now, what the error says
        ("ckpt.pt", fits, {"n_embd": 64}, "holds another model"),
        ("dcp-latest.pt", fits, {"n_layer": 3, "sharded_checkpoint": True}, "holds another"),
        ("ckpt.pt", {**fits, "stage": "finetune"}, {}, "holds a 'finetune' model"),
        ("ckpt.pt", {**fits, "stage": "dpo"}, {}, "holds a 'dpo' model"),
        ("ckpt.pt", b"", {}, "is not a readable checkpoint"),
    )
    for number, (name, ckpt, flags, message) in enumerate(cases):
        run = tmp_path / str(number)
        run.mkdir()
        if ckpt == b"":
            (run / name).write_bytes(ckpt)
        else:
            torch.save(ckpt, run / name)
        for init_from in ("resume", "auto"):
            flags_now = argv({**settings, **flags}, data_dir=corpus, out_dir=run,
                             init_from=init_from)
            err = user_error(dist06, capsys, flags_now)
            assert f"{run / name} {message}" in err and "another --out_dir" in err, err
            assert [f.name for f in run.iterdir()] == [name] and not dist.is_initialized()


def test_a_checkpoint_from_before_the_gelu_setting_resumes_with_gelu_tanh(dist06, corpus,
                                                                          tmp_path, monkeypatch):
    """model_args without "gelu" (saved before the setting existed) were GPT-2's tanh GELU: such a
    checkpoint fits --gelu=tanh, and the refusal of the default names gelu='tanh'."""
    monkeypatch.delenv("RANK", raising=False)
    paths = dict(data_dir=str(corpus), out_dir=str(tmp_path))
    cfg = dist06.DistConfig(**{**BASE, **RUNS["adamw-1"]}, **paths, gelu="tanh")
    n_vocab = dist06.load_meta(cfg.corpus_dir)["n_vocab"]
    model_args = cfg.model_args(n_vocab)
    del model_args["gelu"]
    torch.save({"model_args": model_args, "optimizer": {"state": {}}, "iter_num": 2,
                "stage": "pretrain"}, tmp_path / "ckpt.pt")
    dist06.check_checkpoint(dataclasses.replace(cfg, init_from="resume"), n_vocab)  # fits
    with pytest.raises(ValueError, match="'gelu': 'tanh'"):
        dist06.check_checkpoint(dataclasses.replace(cfg, init_from="resume", gelu="none"), n_vocab)


@pytest.mark.parametrize("what", ["loss", "val loss"])
def test_a_nan_stops_before_it_overwrites_a_checkpoint(dist06, corpus, tmp_path, capsys,
                                                       monkeypatch, what):
    """A NaN loss (read at log steps, and at every save step) or val loss stops the run before
    the next save, naming the checkpoint to resume from; the step-2 checkpoint stays."""
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    train_step = dist06.train_step
    evaluate = dist06.evaluate

    def nan_train_step(model, optimizer, data, cfg, world, it):
        loss, norm = train_step(model, optimizer, data, cfg, world, it)
        if what == "loss" and it == 3:  # step 4: a save step, not a log step
            loss = loss * float("nan")
        return loss, norm

    def nan_evaluate(model, tokens, cfg, world, step):
        val_loss = evaluate(model, tokens, cfg, world, step)
        if what == "val loss" and step == 4:
            val_loss = float("nan")
        return val_loss

    monkeypatch.setattr(dist06, "train_step", nan_train_step)
    monkeypatch.setattr(dist06, "evaluate", nan_evaluate)
    run = tmp_path / "run"
    flags = argv(dict(strategy="ddp", **RUNS["sgd-1"]), data_dir=corpus, out_dir=run,
                 max_iters=6, lr_decay_iters=6, log_interval=5, eval_interval=2)
    err = user_error(dist06, capsys, flags)
    assert f"{what} is nan at iteration 4" in err, err
    assert f"{run / 'ckpt.pt'} (iter 2) is intact: --init_from=resume" in err, err
    assert torch.load(run / "ckpt.pt", weights_only=False)["iter_num"] == 2


def test_ranks_that_see_different_checkpoints_all_stop(dist06, corpus, tmp_path):
    """--init_from=auto where rank 1 cannot see the checkpoint rank 0 resumes (out_dir is not on
    a shared filesystem): both ranks stop within seconds, naming the requirement, instead of
    starting at different steps and hanging in a collective."""
    settings = dict(strategy="ddp", **RUNS["sgd-1"])
    half = dict(name="shared", argv=argv({**settings, "max_iters": K // 2}, data_dir=corpus))
    unshared = dict(name="unshared", resume_from="shared", unshared=True,
                    argv=argv({**settings, "init_from": "auto"}, data_dir=corpus))
    ranks = run_ranks(tmp_path, [half, unshared], timeout=120)["unshared"]
    for result in ranks:
        assert "out_dir must be on a filesystem that all nodes share" in result["error"], result
        assert "[2, 0]" in result["error"] and result["seconds"] < 10, result


def test_checkpoints_keep_the_dtype_as_given(dist06, corpus, tmp_path, capsys, monkeypatch):
    """A checkpoint records --dtype and --device as the user gave them ("auto"), so a resume on
    another machine resolves them there and says what it chose; the losses are keyed by the step
    count the log prints ("iter 1/2")."""
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    settings = dict(strategy="ddp", **RUNS["adamw-1"], dtype="auto", device="auto")
    run = tmp_path / "run"
    result = dist06.main(argv(settings, data_dir=corpus, out_dir=run, max_iters=2))
    assert sorted(result["losses"]) == [1, 2] and "iter 1/2 | loss" in capsys.readouterr().out
    config = torch.load(run / "ckpt.pt", weights_only=False)["config"]
    assert config["dtype"] == "auto" and config["device"] == "auto", config
    dist06.main(argv(settings, data_dir=corpus, out_dir=run, init_from="resume"))
    device = dist06.pick_device("auto")
    device = "cuda:0" if device == "cuda" else "cpu"  # mps trains on the CPU in 06
    dtype = dist06.pick_dtype("auto", device)
    dtype = "float32" if dtype == "float16" else dtype  # no GradScaler in 06 ("bfloat16" stays)
    assert f"resuming at iter 2 of {K} from {run / 'ckpt.pt'}, on {device} in {dtype}" in \
        capsys.readouterr().out


def test_missing_data_names_the_02_command(dist06, tmp_path, capsys):
    flags = [f"--data_dir={tmp_path}", "--tokenizer=gpt2", f"--out_dir={tmp_path}"]
    err = user_error(dist06, capsys, flags)
    assert "python 02_dataloader.py" in err and "--tokenizers=gpt2" in err, err


@pytest.mark.slow
def test_a_fresh_start_never_overwrites_a_run(dist06, corpus, two_ranks, tmp_path, capsys):
    """Starting afresh where a run's checkpoint lies (full or sharded) is refused, naming the three
    ways on, and the files stay as they were. --init_from=resume of a finished run says so and how
    to extend it."""
    run = tmp_path / "run"
    shutil.copytree(two_ranks["_out"] / "ddp-adamw-1", run)
    shutil.copytree(two_ranks["_out"] / "fsdp-dcp", run, dirs_exist_ok=True)
    before = {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()}
    for flags in ([], ["--sharded_checkpoint"]):
        err = user_error(dist06, capsys, [f"--data_dir={corpus}", f"--out_dir={run}",
                                          "--strategy=fsdp", *flags])
        for way_on in ("--init_from=resume", "another --out_dir", "--overwrite"):
            assert way_on in err, err
    assert {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()} == before
    result = dist06.main(argv(dict(strategy="ddp", **RUNS["adamw-1"]), data_dir=corpus, out_dir=run,
                              init_from="resume"))
    out = capsys.readouterr().out
    assert f"resuming at iter {K} of {K}" in out and "nothing left to do" in out, out
    assert f"--max_iters={2 * K}" in out and result["iter_num"] == K and result["losses"] == {}


def test_overwrite_with_auto_or_resume_is_refused(dist06, corpus, tmp_path, capsys, monkeypatch):
    """--overwrite starts afresh, and --init_from=auto (finding a checkpoint) or resume would not:
    the pair is refused in one line before any work, with or without a checkpoint (a job that
    torchrun restarts meets the same answer on every attempt), and the checkpoint stays."""
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    settings = dict(strategy="ddp", **RUNS["adamw-1"])
    run = tmp_path / "run"
    dist06.main(argv(settings, data_dir=corpus, out_dir=run, max_iters=2))
    before = (run / "ckpt.pt").read_bytes()
    for out_dir, init_from in ((run, "auto"), (run, "resume"), (tmp_path / "empty", "auto")):
        flags = argv(settings, data_dir=corpus, out_dir=out_dir, init_from=init_from,
                     overwrite=True)
        err = user_error(dist06, capsys, flags)
        assert "--overwrite starts afresh: use it with --init_from=scratch" in err, err
    assert (run / "ckpt.pt").read_bytes() == before and not (tmp_path / "empty").exists()
    assert not dist.is_initialized()


@pytest.mark.slow
def test_ctrl_c_on_one_rank_saves_on_every_rank_and_resumes_exactly(two_ranks):
    """Ctrl-C that reaches rank 0 alone during step 1 (as when it reaches one machine of several):
    the ranks learn it at the next log step (here each step), both save that step's state and
    stop, and a resume ends with the weights of the uninterrupted run, bit for bit."""
    for rank in two_ranks["ctrl-c-half"]:
        assert rank["interrupted"] and rank["iter_num"] == 1, rank
    saved = torch.load(two_ranks["_out"] / "ctrl-c-half" / "ckpt.pt", weights_only=False)
    assert saved["iter_num"] == 1  # not a --checkpoint_interval step: saved for the Ctrl-C
    resumed = full_weights(two_ranks["ctrl-c"], "ddp")
    uninterrupted = full_weights(two_ranks["ddp-adamw-2"], "ddp")
    assert two_ranks["ctrl-c"][0]["iter_num"] == K
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name


@pytest.mark.slow
def test_accumulation_keeps_the_gradient_traffic_of_one_micro_batch(two_ranks):
    """Counted inside the ranks, per step: with 2 micro-batches DDP all-reduces as often as with 1
    (no_sync in the first); FSDP reduce-scatters after each micro-batch (twice as often), or after
    the last only with --sync_every_micro_step=false (as with 1); ZeRO-1 ends each step with one
    broadcast per rank (its bucket of updated parameters), not one per parameter."""
    def per_step(name: str, kind: str) -> list[int]:
        return [counts.get(kind, 0) for counts in two_ranks[name][0]["collectives"]]

    ddp = per_step("ddp-sgd-1", "all_reduce")
    fsdp = per_step("fsdp-sgd-1", "reduce_scatter")
    assert min(ddp) > 0 and min(fsdp) > 0, (ddp, fsdp)
    counted = {"ddp, 2 micro-batches": per_step("ddp-sgd-2", "all_reduce"),
               "fsdp, 2": per_step("fsdp-sgd-2", "reduce_scatter"),
               "fsdp, 2, sync in the last": per_step("fsdp-nosync-sgd-2", "reduce_scatter"),
               "zero1, 1": per_step("zero1-sgd-1", "broadcast"),
               "zero1, 2": per_step("zero1-sgd-2", "broadcast")}
    expected = {"ddp, 2 micro-batches": ddp, "fsdp, 2": [2 * n for n in fsdp],
                "fsdp, 2, sync in the last": fsdp, "zero1, 1": [2] * K, "zero1, 2": [2] * K}
    assert counted == expected


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_saves_at_the_next_log_step_and_exits_130(dist06, corpus, tmp_path, capsys,
                                                          monkeypatch, presses):
    """Ctrl-C during step 1: the run saves at the next log step (3, not a checkpoint step), says
    how to continue and exits 130 (a shell's code for Ctrl-C) with no traceback. A second Ctrl-C
    quits at once, saving nothing. The handler is put back either way."""
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    train_step = dist06.train_step

    def pressed_in_step_1(model, optimizer, data, cfg, world, it):
        for _ in range(presses if it == 0 else 0):
            os.kill(os.getpid(), signal.SIGINT)
        return train_step(model, optimizer, data, cfg, world, it)

    monkeypatch.setattr(dist06, "train_step", pressed_in_step_1)
    handler = signal.getsignal(signal.SIGINT)
    run = tmp_path / "run"
    flags = argv(dict(strategy="ddp", **RUNS["sgd-1"]), data_dir=corpus, out_dir=run,
                 log_interval=3, checkpoint_interval=K)
    with pytest.raises(BaseException) as exit_info:  # a KeyboardInterrupt would end pytest
        dist06.main(flags)
    assert isinstance(exit_info.value, SystemExit) and exit_info.value.code == 130
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and signal.getsignal(signal.SIGINT) is handler
    assert out.count("Ctrl-C: saving at the next log step") == 1 and not dist.is_initialized()
    if presses == 2:
        assert not (run / "ckpt.pt").exists(), out
        return
    continue_with = "continue: this command with --init_from=resume"
    assert f"saved {run / 'ckpt.pt'} (iter 3); {continue_with}" in out, out
    assert torch.load(run / "ckpt.pt", weights_only=False)["iter_num"] == 3


@pytest.mark.slow
def test_eight_ranks_train_with_the_default_batch_size(dist06, corpus, tmp_path):
    """torchrun --nproc_per_node=8 with no --batch_size: the default splits over 8 ranks (and 1, 2,
    4, 16), so 8 gloo ranks train a tiny model for 2 steps and agree on every weight."""
    settings = dict(n_layer=1, n_head=1, n_embd=8, block_size=8, max_iters=2, decay_lr=False,
                    eval_iters=1, device="cpu", dtype="float32", data_dir=corpus)
    run = dict(name="eight", argv=[f"--{k}={v}" for k, v in settings.items()])
    ranks = run_ranks(tmp_path, [run], timeout=120, world_size=8)["eight"]
    config = torch.load(tmp_path / "eight" / "ckpt.pt", weights_only=False)["config"]
    assert config["batch_size"] == dist06.DistConfig.batch_size
    for rank in ranks:
        assert rank["iter_num"] == 2 and rank["losses"] == ranks[0]["losses"], rank["losses"]
    full_weights(ranks[:2], "ddp")  # equal replicas
    for rank in ranks[2:]:
        full_weights([ranks[0], rank], "ddp")


def test_the_multi_node_commands_pass_the_checks_at_16_ranks(dist06, corpus, tmp_path,
                                                             monkeypatch):
    """The README's two-node command (16 ranks, --batch_size=64), and the same without a batch size,
    pass the settings check at the world size torchrun sets."""
    monkeypatch.setenv("WORLD_SIZE", "16")
    readme = ["--strategy=fsdp", "--init_from=auto", "--batch_size=64"]
    where = [f"--data_dir={corpus}", f"--out_dir={tmp_path / 'gpt-fsdp'}"]
    assert dist06.parse_config(dist06.DistConfig, readme + where).batch_size == 64
    assert dist06.parse_config(dist06.DistConfig, readme[:2] + where).batch_size % 16 == 0


def test_more_ranks_than_gpus_is_one_line(dist06, corpus, tmp_path, capsys, monkeypatch):
    """torchrun --nproc_per_node=2 on a machine with one GPU (mocked): rather than both ranks
    binding cuda:0 and NCCL failing on a duplicate GPU, rank 1, which has no GPU of its own, says so
    in one line naming the fix, after a wait in silence (for rank 0's line, if rank 0 failed too),
    and exits 2 before the process group starts; torchrun then ends rank 0. Under torchrun's
    --virtual-local-rank each rank sees one GPU as its local rank 0, which is fine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    torchrun_env = dict(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", TORCHELASTIC_RUN_ID="x",
                        MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    for name, value in torchrun_env.items():
        monkeypatch.setenv(name, value)
    flags = ["--dtype=float32", f"--data_dir={corpus}", f"--out_dir={tmp_path / 'run'}"]
    for rank, local_rank in (("0", "0"), ("1", "0")):  # rank 0, and rank 1 under a virtual rank
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        assert dist06.parse_on_every_rank(flags).device == "auto"
    waits = []
    monkeypatch.setattr(time, "sleep", waits.append)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(SystemExit) as exit_info:
        dist06.main(flags)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and waits and waits[0] >= 5, (exit_info.value, waits)
    assert err.startswith("rank 1: error: local rank 1 has no GPU of its own") and \
        err.endswith("--device=cpu\n") and err.count("\n") == 1, err
    assert not dist.is_initialized() and not (tmp_path / "run").exists()



def test_help_under_torchrun_is_printed_by_rank_0_only(dist06, capsys, monkeypatch):
    """--help under torchrun: rank 0 prints it; the others exit 0 at once, printing nothing."""
    waits = []
    monkeypatch.setattr(time, "sleep", waits.append)
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as exit_info:
            dist06.parse_on_every_rank(["--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr()
        assert ("--strategy" in out.out) == (rank == "0") and out.err == "", out
    assert waits == []

@pytest.mark.slow
def test_a_user_error_under_torchrun_is_one_line(corpus, tmp_path):
    """--batch_size=13 on 2 ranks: rank 0 prints the error line once, and every rank stops before
    the process group starts (torchrun then reports the failed ranks in its own words)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "06_distributed.py", "--batch_size=13", f"--data_dir={corpus}",
                f"--out_dir={tmp_path / 'run'}"]
    shell = ["sh", "-c", '"$@"; echo "exit status $?"', "sh", *torchrun]  # run_with_deadline: 0
    out, err = run_with_deadline(shell, timeout=120)
    assert (out + err).count("error: batch_size=13") == 1, out + err
    assert "exit status 0" not in out and "exitcode  : 2" in err, out + err
    assert not (tmp_path / "run").exists()


def test_ranks_wait_for_each_checkpoint_and_zero1_lets_its_copy_go(dist06, corpus, tmp_path,
                                                                   monkeypatch):
    """After each save every rank meets the others at a barrier before its next step (else they run
    ahead and wait in the next collective while rank 0 writes, on a slow filesystem until the
    timeout); and ZeRO-1's copy of every rank's optimizer state on rank 0 goes once it is saved."""
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    events = []
    for owner, name in ((dist06, "save_checkpoint"), (dist, "barrier"), (dist06, "train_step")):
        def spy(*args, _name=name, _function=getattr(owner, name), **kwargs):
            events.append(_name)
            return _function(*args, **kwargs)

        monkeypatch.setattr(owner, name, spy)
    optimizers = []
    consolidate = ZeroRedundancyOptimizer.consolidate_state_dict

    def kept(optimizer, *args, **kwargs):
        optimizers.append(optimizer)
        return consolidate(optimizer, *args, **kwargs)

    monkeypatch.setattr(ZeroRedundancyOptimizer, "consolidate_state_dict", kept)
    flags = argv(dict(strategy="zero1", **RUNS["adamw-1"]), data_dir=corpus, out_dir=tmp_path)
    dist06.main(flags)
    after_saves = [events[i + 1] for i, event in enumerate(events) if event == "save_checkpoint"]
    assert after_saves == ["barrier"] * (K // BASE["checkpoint_interval"]), events
    assert len(optimizers) == len(after_saves) and not optimizers[0]._all_state_dicts


def test_fsdp_clips_with_foreach_kernels(dist06, corpus, tmp_path, monkeypatch):
    """FSDP's gradients are DTensors, which clip_grad_norm_ takes through its fused foreach kernels
    (torch.distributed.tensor registers DTensor as foreach-capable), not one norm and one multiply
    per parameter."""
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    norms = []
    foreach_norm = torch._foreach_norm

    def spy(tensors, *args, **kwargs):
        norms.append(type(tensors[0]).__name__)
        return foreach_norm(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_norm", spy)
    flags = argv(dict(strategy="fsdp", **RUNS["sgd-1"]), data_dir=corpus, out_dir=tmp_path,
                 max_iters=1)
    dist06.main(flags)
    assert norms == ["DTensor"], norms


def test_relative_paths_start_at_the_project_folder(dist06, corpus, tmp_path, monkeypatch,
                                                    capsys):
    """A relative --out_dir or --data_dir names a folder beside 06_distributed.py, wherever it runs
    from, so each stage finds what an earlier one wrote."""
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    err = user_error(dist06, capsys, ["--data_dir=no-such-data", "--out_dir=unused"])
    assert str(ROOT / "no-such-data" / "tinyshakespeare-char" / "meta.json") in err, err
    out_dir = f"out/test-relative-{os.getpid()}"
    try:
        dist06.main(argv(dict(strategy="ddp", **RUNS["sgd-1"]), data_dir=corpus, out_dir=out_dir,
                         max_iters=1))
        assert (ROOT / out_dir / "ckpt.pt").exists() and not (tmp_path / "out").exists()
    finally:
        shutil.rmtree(ROOT / out_dir, ignore_errors=True)


def test_only_a_bare_abort_is_launched_again():
    """The 2-rank launch is repeated once (exit 6) only for a SIGABRT with no Python traceback in
    any rank's stderr: a traceback is a bug of ours, so it fails at once."""
    traceback = "Traceback (most recent call last):\n  File ...\nValueError: oops\n"
    peer = "terminate called after throwing an instance of 'gloo::IoException'\n"
    assert launch_status([-signal.SIGABRT, -signal.SIGKILL], ["", peer]) == 6
    assert launch_status([-signal.SIGKILL, -signal.SIGABRT], [traceback, peer]) == 9
    assert launch_status([1, -signal.SIGKILL], [traceback, ""]) == 9
    assert launch_status([0, 0], ["", ""]) == 0


if __name__ == "__main__":  # python tests/test_06_distributed.py SPEC: a launch of the ranks
    launch_ranks(sys.argv[1])


def test_05_resumes_a_checkpoint_of_06(dist06, pre05, corpus, two_ranks, tmp_path):
    """06 promises 05's format: 05's own --init_from=resume continues an FSDP run's checkpoint
    (06 records no thread count, so 05 picks its own) and takes the two remaining steps, which
    lower the val loss of the weights it resumed (3.98 -> 3.94 here; untrained: 4.10)."""
    shutil.copytree(two_ranks["_out"] / "fsdp-adamw-2", tmp_path / "run")
    settings = {**BASE, **RUNS["adamw-2"], "max_iters": K + 2, "lr_decay_iters": K + 2,
                "sample_interval": 0, "threads": 0, "init_from": "resume", "data_dir": str(corpus),
                "out_dir": str(tmp_path / "run")}
    fields = {f.name for f in pre05.fields(pre05.TrainConfig)}
    cfg = pre05.TrainConfig(**{k: v for k, v in settings.items() if k in fields})
    result = pre05.train(cfg)
    assert result["iter_num"] == K + 2
    # on the batches 05 evaluated: below the loss of the weights it resumed, and of untrained ones
    tokens = dist06.load_tokens(corpus / "tinyshakespeare-char", "val")
    resumed, _, _ = pre05.load_checkpoint(two_ranks["_out"] / "fsdp-adamw-2" / "ckpt.pt")
    torch.manual_seed(BASE["seed"])
    untrained = dist06.GPT(resumed.config)
    losses = [val_loss_as_05(dist06, model, tokens, cfg, K + 2) for model in (resumed, untrained)]
    assert result["val_loss"] < losses[0] < losses[1], (result["val_loss"], losses)


@pytest.mark.parametrize("strategy, sharded", [("ddp", False), ("fsdp", False), ("zero1", False),
                                               ("ddp", True)])
def test_plain_sgd_resumes_in_every_strategy(dist06, corpus, tmp_path, monkeypatch, strategy,
                                              sharded):
    """Plain SGD saves no optimizer state: its resume loads none, and trains on."""
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    settings = dict(strategy=strategy, sharded_checkpoint=sharded, **RUNS["sgd-1"])
    dist06.main(argv(settings, data_dir=corpus, out_dir=tmp_path, max_iters=2))
    result = dist06.main(argv(settings, data_dir=corpus, out_dir=tmp_path, max_iters=3,
                              init_from="resume"))
    assert result["iter_num"] == 3 and list(result["losses"]) == [3]


def test_an_unreadable_pointer_is_replaced_by_a_sharded_run_with_overwrite(dist06, corpus,
                                                                           tmp_path, monkeypatch):
    """check_checkpoint's fix for an unreadable dcp-latest.pt, --init_from=scratch --overwrite,
    must work: the first save cannot read the old pointer, and replaces it."""
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "dcp-latest.pt").write_bytes(b"not a checkpoint")
    settings = dict(strategy="ddp", sharded_checkpoint=True, **RUNS["adamw-1"])
    result = dist06.main(argv(settings, data_dir=corpus, out_dir=tmp_path, max_iters=2,
                              overwrite=True))
    assert result["iter_num"] == 2
    assert torch.load(tmp_path / "dcp-latest.pt", weights_only=True)["path"] == "dcp-000002"


@pytest.mark.parametrize("out_dir", ["", ".", "out/.."])
def test_an_out_dir_that_is_the_project_folder_is_refused(dist06, corpus, tmp_path, capsys,
                                                          monkeypatch, out_dir):
    """'' or '.' would put ckpt.pt (and, sharded, the dcp-* folders) among the scripts."""
    project = tmp_path.resolve()  # PROJECT is a resolved path: a bug writes here, not among ours
    monkeypatch.setattr(dist06, "PROJECT", project)
    with pytest.raises(SystemExit) as stop:
        dist06.parse_config(dist06.DistConfig, [f"--data_dir={corpus}", f"--out_dir={out_dir}"])
    assert stop.value.code == 2 and "is the project folder" in capsys.readouterr().err
    assert list(project.iterdir()) == []
