"""Shared test helpers: load the numbered scripts, find the data files, keep tests deterministic.

The scripts are called `01_tokenizer.py` ... `09_generate.py`; a name that starts with a digit
cannot be imported with `import`, so `load_script` goes through importlib. Every script is
self-contained (it copies what it needs from earlier ones), so loading one never loads another.
"""

import importlib.util
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "data"


def load_script(name: str):
    """Import `ROOT/<name>.py` as a module named `<name>` (cached after the first call).

    subtle: the module must be in sys.modules *before* it executes, or @dataclass fails to
    resolve the module of its own class (it looks the module up by name).
    """
    if name in sys.modules:
        return sys.modules[name]
    path = ROOT / f"{name}.py"
    if not path.exists():
        pytest.skip(f"{path.name} does not exist yet")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def run_with_deadline(cmd: list[str], timeout: float, **env: str) -> tuple[str, str]:
    """Run cmd in the repo under a deadline; return (stdout, stderr), or fail showing both.

    The command runs in its own session, and its whole process group is killed at the deadline and
    at the end: a plain subprocess timeout would leave orphans behind (a hung rank, a torchrun
    worker). RANK and friends are dropped so that a child never thinks it is part of our world.
    """
    world = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in world} | env
    env = {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish in {timeout} s (a hung collective?):\n"
                    f"{out[-4000:]}\n{err[-4000:]}")
    finally:
        try:  # nothing of it may outlive the test
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    command = " ".join(cmd)
    assert proc.returncode == 0, (
        f"{command} failed ({proc.returncode}):\n{out[-4000:]}\n{err[-4000:]}")
    return out, err


READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__",
         "__format__", "__contains__")


def count_device_reads(monkeypatch, script: str) -> list:
    """Count every read of a tensor's value (.item(), .tolist(), bool(), float(), formatting...)
    made by code in the file `script`: on a GPU each is a sync, the CPU waiting for the device.
    Returns the list that grows by one per read (clear it between measurements)."""
    reads = []
    for method in READS:
        original = getattr(torch.Tensor, method)

        def counted(self, *args, _original=original, **kwargs):
            if sys._getframe(1).f_code.co_filename == script:
                reads.append(1)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counted)
    return reads


def interrupted(*args, **kwargs):
    """A stand-in for the function a script's main calls: it raises what Python raises in the main
    thread at a Ctrl-C, so a test sees what main makes of it."""
    raise KeyboardInterrupt


def exit_status(main, *args) -> int:
    """The status main(*args) exits with. A KeyboardInterrupt that escapes main fails the test:
    escaping pytest.raises(SystemExit), it would end the whole pytest session instead."""
    try:
        main(*args)
    except SystemExit as stop:
        return stop.code
    except KeyboardInterrupt:
        pytest.fail("a Ctrl-C escaped main: a traceback, not one line")
    pytest.fail("main returned instead of exiting")


def roughen(model, biases: bool = False):
    """model in eval mode, its weights redrawn at std 0.3 (GPT-2's init: 0.02), LayerNorm gains
    left at 1 (biases=True redraws the biases too). A tiny GPT at 0.02 has near-uniform logits:
    its greedy answers often end at once (''), so a bug that writes '' or swaps two models would
    pass. At 0.3 its predictions are confident and varied."""
    kept = ("ln_1.weight", "ln_2.weight", "ln_f.weight")
    if not biases:
        kept = (".bias", *kept)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(kept):
                p.normal_(0.0, 0.3)
    return model.eval()


def _script_fixture(name):
    @pytest.fixture(scope="session")
    def fixture():
        return load_script(name)

    return fixture


tok01 = _script_fixture("01_tokenizer")
dl02 = _script_fixture("02_dataloader")
attn03 = _script_fixture("03_attention")
gpt04 = _script_fixture("04_gpt")
pre05 = _script_fixture("05_pretrain")
dist06 = _script_fixture("06_distributed")
ft07 = _script_fixture("07_finetune")
dpo08 = _script_fixture("08_dpo")
gen09 = _script_fixture("09_generate")
serve10 = _script_fixture("10_serve")


def _data_file(source: str) -> Path:
    """The path of a known data file: data/ if it is there, else 02's own download."""
    dl = load_script("02_dataloader")
    filename = dl.SOURCES[source][2]
    path = DATA_DIR / filename
    return path if path.exists() else dl.fetch(source, DATA_DIR)


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    return _data_file("tinyshakespeare")


@pytest.fixture(scope="session")
def shakespeare_text(shakespeare_path) -> str:
    return shakespeare_path.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def char_corpus(tmp_path_factory, shakespeare_text) -> Path:
    """A data_dir holding tinyshakespeare-char/ as 02 prepares it (train.bin, val.bin, meta.json).

    05 and 06 read prepared data only; pass `--data_dir=<this>` (dataset tinyshakespeare,
    tokenizer char).
    """
    dl = load_script("02_dataloader")
    root = tmp_path_factory.mktemp("data")
    spec = dl.CharTokenizer.from_text(shakespeare_text).to_dict()
    dl.prepare_corpus(shakespeare_text, root / "tinyshakespeare-char", spec)
    return root


@pytest.fixture(scope="session")
def gpt2_files() -> tuple[Path, Path]:
    """OpenAI's encoder.json and vocab.bpe: data/'s, else 01's own download (checked)."""
    tok = load_script("01_tokenizer")
    paths = []
    for name, sha256 in tok.GPT2_FILES.items():
        path = DATA_DIR / name
        if not path.exists():
            tok.download(f"{tok.GPT2_URL}/{name}", path, sha256)
        paths.append(path)
    return tuple(paths)


@pytest.fixture(scope="session")
def instruction_data_path() -> Path:
    return _data_file("instruction-data")


@pytest.fixture(scope="session")
def preference_data_path() -> Path:
    return _data_file("preference-data")


@pytest.fixture(autouse=True)
def _deterministic():
    """One thread and a fixed seed for every test.

    One thread on purpose: the tiny models here are bound by per-op overhead, and with two
    threads a step slows down 10x whenever another process (a second rank, the OS) wants a core.
    """
    torch.set_num_threads(1)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
