"""Benchmarks that are not a stage's lesson: they print the rows of the README's results table.

The stage scripts keep the benchmarks that teach (01: naive vs incremental BPE training, 03:
manual attention vs SDPA, 09: generation with vs without the KV cache). What is measured here is
the project's speed, not a lesson, so it lives outside them:

    python tests/bench.py encode      # 01: our GPT-2 encoder against tiktoken, same ids
    python tests/bench.py model       # 04: forward+backward tokens/s of `small` and `gpt2`, fp32
    python tests/bench.py pretrain    # 05: ms/iter of the CPU recipe for each thread count x dtype
    python tests/bench.py answers     # 07: GPT-2 small's greedy answers, with and without KV cache
    python tests/bench.py serve       # 10: the server's tokens/s, 1 and 8 clients (05's model)
    python tests/bench.py evaluate    # 11: multiple choice, packed and batched vs one per pass
    python tests/bench.py             # all six
    python tests/bench.py nanogpt --nanogpt=PATH   # 05 beside your clone of nanoGPT, same recipe

Numbers from a small shared machine mean little unless nothing else runs: run it on a quiet
machine, and compare figures taken in the same run.
"""

import argparse
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import DATA_DIR, ROOT, load_script  # noqa: E402  (the scripts load through importlib)


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def bench_encode():
    """Bytes/s of 01's GPT-2 encoder (cold chunk cache, then warm) against tiktoken, same text."""
    import tiktoken

    tok01 = load_script("01_tokenizer")
    text = (DATA_DIR / "tinyshakespeare.txt").read_text(encoding="utf-8")
    n_bytes = len(text.encode("utf-8"))
    ours, reference = tok01.gpt2(DATA_DIR), tiktoken.get_encoding("gpt2")
    reference.encode("warm up")  # tiktoken builds its regex lazily
    expected, tiktoken_s = timed(reference.encode, text)
    rows = [("tiktoken (Rust)", tiktoken_s, expected)]
    for name in ["ours, cold cache", "ours, warm cache"]:  # the first run fills the chunk cache
        ids, seconds = timed(ours.encode, text)
        rows.append((name, seconds, ids))
    print(f"\n01: GPT-2 encode of {n_bytes:,} bytes (tiny Shakespeare)")
    print(f"{'encoder':<18} {'seconds':>8} {'MB/s':>7} {'time / tiktoken':>16} {'same ids':>9}")
    for name, seconds, ids in rows:
        print(f"{name:<18} {seconds:>8.3f} {n_bytes / seconds / 1e6:>7.2f} "
              f"{seconds / tiktoken_s:>15.2f}x {str(ids == expected):>9}")


def bench_model(iters: int = 5):
    """Forward+backward of 04's GPT in fp32 on CPU: median ms, tokens/s and achieved GFLOP/s.

    Achieved FLOP/s = the model's training FLOPs per token x tokens/s. There is no datasheet peak
    for a CPU, so no MFU here; compare the GFLOP/s with a plain matmul's, printed first.
    """
    gpt04 = load_script("04_gpt")
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    matmul = min(timed(torch.mm, a, b)[1] for _ in range(5))
    print(f"\n04: forward+backward, fp32, {torch.get_num_threads()} threads "
          f"(a {n}x{n} fp32 matmul here: {2 * n**3 / matmul / 1e9:,.0f} GFLOP/s)")
    print(f"{'model':>8} {'params':>8} {'B x T':>8} {'ms/iter':>9} {'tokens/s':>9} {'GFLOP/s':>8}")
    for preset, B, T in [("small", 8, 128), ("gpt2", 2, 64)]:
        torch.manual_seed(0)
        model = gpt04.GPT(gpt04.preset_config(preset))
        idx = torch.randint(model.config.vocab_size, (B, T))
        times = []
        for _ in range(iters + 1):  # the first iteration warms up (allocations, kernel choice)
            t0 = time.perf_counter()
            _, loss = model(idx, targets=idx)
            loss.backward()
            model.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        dt = statistics.median(times[1:])
        flops = gpt04.flops_per_token(model, T) * B * T / dt
        print(f"{preset:>8} {model.num_params() / 1e6:>7.1f}M {f'{B}x{T}':>8} {dt * 1e3:>9.1f} "
              f"{B * T / dt:>9,.0f} {flops / 1e9:>8.1f}")


def bench_pretrain(iters: int = 200):
    """05's CPU recipe for `iters` iterations with 1 and all threads, in fp32 and bf16.

    Each row is 05's own train() (data, model, optimizer, logging) in a temporary out_dir, with
    evaluation cut to one batch at the end; ms/iter is the median over its log windows. Needs
    data/tinyshakespeare-char (python 02_dataloader.py).
    """
    pre05 = load_script("05_pretrain")
    pre05.plot_losses = lambda *args: None  # the out_dirs are temporary: no plot to point at
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "bfloat16"):
            for threads in sorted({1, cores}):
                cfg = pre05.TrainConfig(out_dir=f"{tmp}/{dtype}-{threads}",
                                        max_iters=iters,
                                        lr_decay_iters=iters,
                                        eval_interval=10**9,
                                        eval_iters=1,
                                        log_interval=10,
                                        max_new_tokens=0,
                                        device="cpu",
                                        dtype=dtype,
                                        threads=threads)
                rows.append((threads, dtype, pre05.train(cfg)))
    print(f"\n05: the CPU recipe, {iters} iterations each (median ms/iter over windows of 10)")
    print(f"{'threads':>7} {'dtype':>9} {'ms/iter':>8} {'tokens/s':>9}")
    for threads, dtype, r in rows:
        print(f"{threads:>7} {dtype:>9} {r['ms_per_iter']:>8.1f} {r['tokens_per_s']:>9,.0f}")


def bench_serve(ckpt="out/shakespeare-char/ckpt.pt", requests: int = 4, max_tokens: int = 256):
    """Tokens/s of 10_serve.py's server as the openai client sees it, with 1 and 8 clients at once.

    Each client sends `requests` completions one after another (temperature 0.8; a char model never
    stops early); tokens/s = all completion tokens / wall time. The server runs in a thread of this
    process, on a free port, with one CPU thread. A relative ckpt starts at the project folder.
    """
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import openai

    serve10 = load_script("10_serve")
    torch.set_num_threads(1)
    model, tokenizer, _ = serve10.load_checkpoint(ROOT / ckpt)
    server = serve10.make_server(model.eval(), tokenizer, "shakespeare", "127.0.0.1", 0)
    quiet = {"log_message": lambda self, *args: None}  # no access-log line per request
    server.RequestHandlerClass = type("QuietHandler", (server.RequestHandlerClass,), quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")

    def one_client(i):
        tokens = 0
        for r in range(requests):
            completion = client.completions.create(model="shakespeare", prompt="ROMEO:",
                                                   max_tokens=max_tokens, temperature=0.8,
                                                   seed=1000 * i + r)
            tokens += completion.usage.completion_tokens
        return tokens

    one_client(0)  # warm up
    print(f"\n10: the server on {ckpt}, 1 CPU thread, {requests} x {max_tokens} tokens per client")
    for clients in (1, 8):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            tokens = sum(pool.map(one_client, range(clients)))
        dt = time.perf_counter() - t0
        print(f"{clients} client(s): {tokens} tokens in {dt:.1f} s = {tokens / dt:,.0f} tokens/s")
    server.shutdown()


class ConcatKVCache:
    """03's KVCache grown by concatenation (as Hugging Face's DynamicCache), for comparison:
    simpler, but every token copies the whole cache of every layer. max_len is ignored."""

    def __init__(self, n_layer: int, max_len: int = 0):
        self.k, self.v, self.length = [None] * n_layer, [None] * n_layer, 0

    def attend(self, attn, x, layer: int, mask=None):
        (B, T, C), start = x.size(), self.length
        q, k, v = attn.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2) for t in (q, k, v))
        if start > 0:
            k, v = torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        self.length = start + T if layer == len(self.k) - 1 else start
        if mask is None and T > 1 and start > 0:
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                             is_causal=mask is None and T > 1)
        return attn.c_proj(y.transpose(1, 2).reshape(B, T, C))


def bench_answers(n: int = 8, max_new_tokens: int = 128):
    """09 --answers: greedy answers to 07's first n test entries in one batch (its default),
    GPT-2 small (random weights, fp32): with 03's KV cache (09's), with a cache grown by
    concatenation instead, and with the whole context rerun for every token. All three must give
    the same tokens."""
    import json

    import tiktoken

    gen09, enc = load_script("09_generate"), tiktoken.get_encoding("gpt2")
    data = json.loads((DATA_DIR / "instruction-data.json").read_text(encoding="utf-8"))
    entries = load_script("07_finetune").split_data(data)["test"][:n]
    template = gen09.Template(enc, {"stage": "finetune"})
    prompts = [template.prompt(e) for e in entries]
    torch.manual_seed(0)
    model = gen09.GPT(gen09.GPTConfig()).eval()  # 124M

    def answer(new_tokens, use_cache=True):
        return gen09.generate(model, prompts, new_tokens, temperature=0,
                              eot_token=enc.eot_token, use_cache=use_cache)

    shortest = min(map(len, prompts))
    longest = max(map(len, prompts))
    print(f"\n09 --answers: greedy, GPT-2 small (random weights), fp32, one batch of {n} prompts "
          f"of {shortest}-{longest} tokens, {max_new_tokens} new tokens each")
    answer(2)  # warm up
    rows, buffers = [], gen09.KVCache
    for name, cache in (("03's KV cache (09)", buffers), ("concatenated cache", ConcatKVCache)):
        gen09.KVCache = cache
        try:
            answers, seconds = timed(answer, max_new_tokens)
            rows.append((name, answers, seconds))
        finally:
            gen09.KVCache = buffers
    answers, seconds = timed(answer, max_new_tokens, False)
    rows.append(("rerun the context", answers, seconds))
    tokens = sum(map(len, rows[0][1]))
    for name, out, seconds in rows:
        ratio = seconds / rows[0][2]
        print(f"{name:<19} {seconds:>7.1f} s {tokens / seconds:>8.1f} tokens/s {ratio:>6.2f}x "
              f"the time, same tokens: {out == rows[0][1]}")


# nanoGPT's README recipe for character-level Shakespeare on a CPU; 05 takes the same flags
NANOGPT_RECIPE = ["--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128",
                  "--dropout=0.0", "--eval_iters=200", "--log_interval=100", "--device=cpu"]


def bench_evaluate(n_examples: int = 16, rounds: int = 2):
    """11: multiple-choice scoring, packed and batched (ours) against llm.c's way (one example, a
    row per choice, per forward pass), on GPT-2 small's shapes with random weights (speed does not
    depend on the weights). Examples are HellaSwag-shaped: a context of 20-100 tokens, 4 endings
    of 10-30. Examples/s of both on the same examples, the best of `rounds`; same scores."""
    ev = load_script("11_evaluate")
    torch.manual_seed(0)
    rng = random.Random(0)
    config = ev.GPTConfig()  # GPT-2 small's shapes: the defaults
    model = ev.GPT(config).eval()
    encoded = []
    for _ in range(n_examples):
        context = [rng.randrange(50257) for _ in range(rng.randint(20, 100))]
        choices = [[rng.randrange(50257) for _ in range(rng.randint(10, 30))] for _ in range(4)]
        encoded.append({"context": context, "choices": choices, "cut": False})

    def one_per_pass():
        return [ev.score_rows(model, example) for example in encoded]

    def packed():
        return ev.score_examples(model, encoded)

    packed()  # warm-up: allocations, kernel choice
    rows = []
    for name, fn in (("llm.c's way: one example per pass", one_per_pass),
                     ("ours: packed, batched", packed)):
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            scores = fn()
            best = min(best, time.perf_counter() - t0)
        rows.append((name, n_examples / best, scores))
    reference = torch.tensor(rows[0][2])
    same = all(torch.allclose(torch.tensor(s), reference, atol=1e-3) for _, _, s in rows)
    print(f"\n11: multiple choice, gpt2 shapes (random weights), {n_examples} examples x 4 "
          f"choices, fp32, {torch.get_num_threads()} threads; same scores: {same}")
    print(f"{'scorer':<36} {'examples/s':>10} {'speedup':>8}")
    for name, rate, _ in rows:
        print(f"{name:<36} {rate:>10.2f} {rate / rows[0][1]:>7.2f}x")


def run_timed(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, the last val loss printed) of one whole process."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    val_losses = re.findall(r"val loss[^0-9]*([0-9]+\.[0-9]+)", done.stdout, re.IGNORECASE)
    return seconds, float(val_losses[-1])


def bench_nanogpt(nanogpt: str, iters: int = 2000, rounds: int = 3):
    """nanoGPT's CPU recipe and 05 with the same flags, alternately, as whole processes.

    nanoGPT runs from a temporary copy of your clone (its prepare.py writes into data/), on
    data/tinyshakespeare.txt; 05 reads data/tinyshakespeare-char/ (python 02_dataloader.py). Each
    round runs both; the medians of wall time and the final val losses are printed.
    """
    clone = Path(nanogpt).expanduser()
    if not (clone / "train.py").exists():
        sys.exit(f"error: no nanoGPT at {clone}; clone it "
                 "(git clone https://github.com/karpathy/nanoGPT) and pass --nanogpt=PATH")
    if not (DATA_DIR / "tinyshakespeare-char" / "meta.json").exists():
        sys.exit("error: no prepared Shakespeare; run python 02_dataloader.py first")
    recipe = NANOGPT_RECIPE + [f"--max_iters={iters}", f"--lr_decay_iters={iters}",
                               f"--eval_interval={iters}", f"--warmup_iters={min(100, iters // 2)}"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "nanoGPT"
        shutil.copytree(clone, work, ignore=shutil.ignore_patterns(".git", "out*"))
        shutil.copy(DATA_DIR / "tinyshakespeare.txt", work / "data/shakespeare_char/input.txt")
        prepare = [sys.executable, "data/shakespeare_char/prepare.py"]
        subprocess.run(prepare, cwd=work, check=True, capture_output=True)
        theirs = [sys.executable, "train.py", "config/train_shakespeare_char.py",
                  "--compile=False", *recipe]
        ours = [sys.executable, "05_pretrain.py", *recipe]
        warm_up = ["--max_iters=2", "--lr_decay_iters=2", "--warmup_iters=1", "--eval_iters=1"]
        run_timed(ours + warm_up + [f"--out_dir={tmp}/warm"], ROOT)  # nothing one-time timed
        walls = {"nanoGPT": [], "05": []}
        for r in range(rounds):
            for name, cmd, cwd in (("nanoGPT", theirs, work), ("05", ours, ROOT)):
                seconds, val_loss = run_timed(cmd + [f"--out_dir={tmp}/{name}-{r}"], cwd)
                walls[name].append(seconds)
                print(f"round {r + 1} {name:<8} wall {seconds:6.1f} s   final val loss {val_loss}")
    theirs_s = statistics.median(walls["nanoGPT"])
    ours_s = statistics.median(walls["05"])
    print(f"median wall: nanoGPT {theirs_s:.1f} s, 05 {ours_s:.1f} s: 05 runs at "
          f"{theirs_s / ours_s:.2f}x nanoGPT's speed ({iters} iterations, {rounds} rounds)")


BENCHES = {"encode": bench_encode,
           "model": bench_model,
           "pretrain": bench_pretrain,
           "answers": bench_answers,
           "serve": bench_serve,
           "evaluate": bench_evaluate}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("what", nargs="*", choices=[*BENCHES, "nanogpt"], default=[],
                        help="which benchmarks (default: all but nanogpt)")
    parser.add_argument("--nanogpt", default="", help="nanogpt: the path to your clone of nanoGPT")
    parser.add_argument("--iters", type=int, default=2000, help="nanogpt: iterations per run")
    parser.add_argument("--rounds", type=int, default=3, help="nanogpt: runs of each")
    args = parser.parse_args(argv)
    if "nanogpt" in args.what:
        bench_nanogpt(args.nanogpt, args.iters, args.rounds)
        args.what.remove("nanogpt")
        if not args.what:
            return
    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.what or BENCHES:
        BENCHES[name]()


if __name__ == "__main__":
    main()
