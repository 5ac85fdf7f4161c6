"""02_dataloader.py: from raw text to training batches.

A language model learns from one long stream of token ids. This stage builds that stream and
cuts it into batches, in the order the data travels:

1. fetch      download a known corpus (streamed, sha256-checked, written atomically)
2. clean      Unicode and whitespace normalization, exact de-duplication, a quality filter;
              each step says what it removed ("garbage in, garbage out")
3. prepare    tokenize once into flat train.bin / val.bin files (uint16 while the vocabulary fits) +
              meta.json, as nanoGPT's data/*/prepare.py does, in the one home of prepared data,
              data/<dataset>-<tokenizer>/ (e.g. data/tinyshakespeare-char/), which 05 and 06 read
4. load       read the token files back with np.memmap: the OS pages in only the windows we
              touch, so a corpus larger than RAM works the same way as tiny Shakespeare
5. batch      (x, y) pairs where y is x shifted by one token: at every position the model
              predicts the next token. Two sources:
              - get_batch: random windows, stateless (batch = f(seed, step)), for pretraining
              - SlidingWindowDataset + RankBatchSampler: every window at a fixed stride, in
                epochs, for the book-style loop (rasbt's GPTDatasetV1)
              Both are rank-aware: with world_size ranks, rank r gets its own slice of the same
              global batch, so N processes together see exactly what one process sees (06).

References: nanoGPT data/shakespeare_char/prepare.py and train.py get_batch; rasbt's
LLMs-from-scratch ch02 (GPTDatasetV1); C4 (Raffel et al. 2020) and Gopher (Rae et al. 2021) for
de-duplication and quality rules; Lee et al. 2022, "Deduplicating Training Data Makes LMs Better".

Run (CPU is plenty, nothing here trains):
    python 02_dataloader.py  # tiny Shakespeare -> data/tinyshakespeare-{char,gpt2}/, 07/08's data
    python 02_dataloader.py --tokenizers=char --block_size=16
    python 02_dataloader.py --text_file=my.txt --normalize=NFKC  # -> data/my-char/, data/my-gpt2/
    python 02_dataloader.py --fetch=hellaswag   # a download alone: 11's multiple choice
    python 02_dataloader.py --help"""

import argparse
import difflib
import hashlib
import json
import os
import re
import time
import unicodedata
from pathlib import Path

import numpy as np
import requests
import torch
from torch.utils.data import Dataset, Sampler

PROJECT = Path(__file__).resolve().parent  # relative paths (data/, flags) start here
DATA_DIR = PROJECT / "data"  # downloads, and the prepared corpora next to them

# -----------------------------------------------------------------------------
# 1. fetch: the files we know (the corpus; 07's, 08's, 11's data), each with its bytes' hash

_SHAKESPEARE = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare"
_RASBT = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07"
_HELLASWAG = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data"
SOURCES = {  # name -> (url, sha256, filename in data/)
    "tinyshakespeare": (f"{_SHAKESPEARE}/input.txt",
                        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
                        "tinyshakespeare.txt"),
    "instruction-data": (f"{_RASBT}/01_main-chapter-code/instruction-data.json",
                         "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
                         "instruction-data.json"),
    "preference-data": (f"{_RASBT}/04_preference-tuning-with-dpo/"
                        "instruction-data-with-preference.json",
                        "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e",
                        "instruction-data-with-preference.json"),
    "hellaswag": (f"{_HELLASWAG}/hellaswag_val.jsonl",
                  "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588",
                  "hellaswag_val.jsonl"),
}


def fetch(name: str, data_dir=DATA_DIR) -> Path:
    """The local path of the known source `name`, downloaded into data_dir if it is missing."""
    if name not in SOURCES:
        known = ", ".join(SOURCES)
        raise ValueError(f"unknown source {name!r}; known sources: {known}")
    url, sha256, filename = SOURCES[name]
    return download(url, Path(data_dir) / filename, sha256)


# -----------------------------------------------------------------------------
# 2. clean: small steps, each returning (cleaned text, report of what it did)
#
# A model reproduces what it reads, so junk in the corpus (mojibake, boilerplate repeated a
# thousand times, lines of "=====") becomes junk in the samples. Real pipelines (C4, Gopher,
# FineWeb) chain many such steps; these four are the core ideas, small enough to read.

def _examples(items, n=3, width=60) -> list[str]:
    """A few short reprs for a report."""
    shown = []
    for item in items[:n]:
        if len(item) > width:
            item = item[:width] + "..."
        shown.append(repr(item))
    return shown


def normalize_unicode(text: str, form: str = "NFC") -> tuple[str, dict]:
    """Give every character one canonical encoding.

    "é" can be one code point (U+00E9) or "e" + a combining accent (U+0065 U+0301); they look
    identical but tokenize differently, so a model would learn two spellings of every accented
    word. NFC composes them: normalize_unicode("e\\u0301")[0] == "\\u00e9".
    NFKC also folds "compatibility" look-alikes: the ligature "ﬁ" -> "fi", full-width "Ａ" -> "A",
    but also "x²" -> "x2", so it is the stronger and lossier choice."""
    if form not in ("NFC", "NFD", "NFKC", "NFKD"):
        raise ValueError(f"unknown normalization form {form!r}; use NFC, NFD, NFKC or NFKD")
    # line by line is the same as the whole text ("\n" never combines) and lets us count lines
    lines = text.split("\n")
    normalized = [unicodedata.normalize(form, line) for line in lines]
    changed = [old for old, new in zip(lines, normalized) if old != new]
    report = {"step": "normalize_unicode", "form": form,
              "lines_changed": len(changed), "examples": _examples(changed)}
    return "\n".join(normalized), report


_WHITESPACE_RULES = [  # (what, pattern, replacement), applied in this order
    ("\\r\\n or \\r line endings", re.compile(r"\r\n?"), "\n"),
    ("zero-width spaces and BOMs", re.compile("[\u200b\ufeff]"), ""),
    ("control characters", re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"), ""),
    ("exotic spaces (no-break, em, ...)",
     re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]"), " "),
    ("trailing spaces at line ends", re.compile(r"[ \t]+(?=\n|\Z)"), ""),
    ("runs of 3+ newlines", re.compile(r"\n{3,}"), "\n\n"),
]


def normalize_whitespace(text: str) -> tuple[str, dict]:
    """Make invisible differences visible-or-gone: one kind of newline, one kind of space.

    Why: "word\\r\\n" and "word\\n" are different token sequences; a zero-width space splits a
    word in two for the tokenizer; trailing spaces and blank-line runs waste context. Indentation
    and runs of spaces inside a line are kept (in code and verse they mean something).
    Example: normalize_whitespace("a \\r\\n\\n\\n\\nb\\u00a0c")[0] == "a\\n\\nb c"."""
    fixes = {}  # what -> how many, for the rules that changed something
    for what, pattern, replacement in _WHITESPACE_RULES:
        text, n = pattern.subn(replacement, text)
        if n:
            fixes[what] = n
    report = {"step": "normalize_whitespace", "fixes": fixes}
    return text, report


def deduplicate_paragraphs(text: str, min_chars: int = 50) -> tuple[str, dict]:
    """Drop every repeat of a paragraph (blank-line separated) seen earlier; keep the first.

    Repeated text (licence headers, navigation menus, the same article crawled twice) is
    memorized instead of learned and wastes compute (Lee et al. 2022). Short paragraphs are
    exempt: in a play, "ROMEO:\\nAy." legitimately occurs many times; only paragraphs of at least
    min_chars characters (after stripping) count as duplicates.
    We keep a hash per paragraph, not the text: at web scale the set of hashes is what fits in RAM.
    """
    seen = set()  # the hashes of the paragraphs kept so far
    kept = []
    dropped = []
    for paragraph in text.split("\n\n"):
        key = paragraph.strip()
        if len(key) >= min_chars:
            digest = hashlib.sha1(key.encode("utf-8")).digest()
            if digest in seen:
                dropped.append(key)
                continue
            seen.add(digest)
        kept.append(paragraph)
    report = {"step": "deduplicate_paragraphs", "paragraphs_removed": len(dropped),
              "chars_removed": sum(len(p) for p in dropped), "examples": _examples(dropped)}
    return "\n\n".join(kept), report


def quality_filter(text: str, min_letter_fraction: float = 0.5,
                   max_char_run: int = 10) -> tuple[str, dict]:
    """Drop paragraphs that do not look like prose (two rules in the spirit of Gopher's).

    - too few letters: fewer than min_letter_fraction of the non-space characters are letters
      (tables of numbers, "==== ---- ====", lines of symbols);
    - else, repeated characters: the same non-space character more than max_char_run times in a
      row ("aaaaaaaaaaaaaaaa", "Nooooooooooooo!"; a line of "!" has too few letters already).
    Paragraphs with no visible characters are left alone (whitespace is normalize_whitespace's job).
    """
    char_run = re.compile(r"(\S)\1{%d,}" % max_char_run)  # one char, then max_char_run more of it
    kept = []
    too_few_letters = []
    repeated = []
    for paragraph in text.split("\n\n"):
        visible = [ch for ch in paragraph if not ch.isspace()]
        n_letters = sum(ch.isalpha() for ch in visible)
        if visible and n_letters < min_letter_fraction * len(visible):
            too_few_letters.append(paragraph)
        elif char_run.search(paragraph):
            repeated.append(paragraph)
        else:
            kept.append(paragraph)
    report = {"step": "quality_filter",
              "paragraphs_removed": len(too_few_letters) + len(repeated),
              "too_few_letters": len(too_few_letters), "repeated_chars": len(repeated),
              "examples": _examples(too_few_letters + repeated)}
    return "\n\n".join(kept), report


def clean_text(text: str, form: str = "NFC",
               min_chars: int = 50) -> tuple[str, list[dict]]:
    """The whole pipeline. Normalize first, so that de-duplication sees equal text as equal."""
    text, unicode_report = normalize_unicode(text, form)
    text, whitespace_report = normalize_whitespace(text)
    text, duplicates_report = deduplicate_paragraphs(text, min_chars)
    text, quality_report = quality_filter(text)
    return text, [unicode_report, whitespace_report, duplicates_report, quality_report]


def format_report(report: dict) -> str:
    """One line per step: 'quality_filter: paragraphs_removed=2 ...  e.g. '!!!!!!!!!!!!''."""
    counts = [f"{k}={v}" for k, v in report.items() if k not in ("step", "examples")]
    line = f"{report['step']}: {' '.join(counts)}"
    if report.get("examples"):
        line += f"  e.g. {', '.join(report['examples'])}"
    return line


# -----------------------------------------------------------------------------
# 3. prepare: tokenize once, store flat token files + metadata

def token_dtype(n_vocab: int) -> np.dtype:
    """uint16 holds ids 0..65535, enough for GPT-2's 50257 and half the disk of uint32."""
    if n_vocab <= 2**16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def prepare_corpus(text: str, out_dir, tokenizer_spec: dict,
                   val_fraction: float = 0.1) -> dict:
    """Tokenize text into out_dir/train.bin, val.bin and meta.json; return the metadata.

    The split is on the TEXT: the first (1 - val_fraction) of the characters are train, the rest
    val (nanoGPT's shakespeare_char split). A contiguous split, not random windows: neighbouring
    windows overlap, so a random split would put copies of the val text into train.
    The .bin files are raw token ids with no header; meta.json says how to read them."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}; e.g. 0.1")
    tokenizer = get_tokenizer(tokenizer_spec)
    dtype = token_dtype(tokenizer.n_vocab)
    split_at = int(len(text) * (1 - val_fraction))
    parts = {"train": text[:split_at], "val": text[split_at:]}
    if not all(parts.values()):  # now, before an earlier corpus in out_dir is touched
        raise ValueError(f"a split is empty ({len(text)} characters, val_fraction="
                         f"{val_fraction}); use more text or another val_fraction")
    encode_options = {}
    if tokenizer.eot_token is not None:
        # a literal <|endoftext|> in a GPT-2 corpus is a document separator: encode it as the token
        encode_options["allowed_special"] = "all"
    out_dir = Path(out_dir)
    check_out_dir(out_dir)  # before anything in it is touched
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").unlink(missing_ok=True)  # an earlier run's: not the new .bin files
    counts = {}
    for split, part in parts.items():
        encoded = tokenizer.encode(part, **encode_options)
        ids = np.array(encoded, dtype=np.int64)  # text that is not empty: a token at least
        ids.astype(dtype).tofile(out_dir / f"{split}.bin")
        counts[split] = len(ids)
    meta = {"tokenizer": tokenizer_spec, "n_vocab": tokenizer.n_vocab, "dtype": dtype.name,
            "train_tokens": counts["train"], "val_tokens": counts["val"]}
    # written last: a corpus without meta.json is an unfinished one, and load_tokens says so
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return meta


def check_out_dir(out_dir: Path):
    """Refuse an out_dir that may hold what we did not write: we replace only our own corpus."""
    try:
        safe = "train_tokens" in load_meta(out_dir)  # its meta.json has the keys we write: ours
    except (OSError, ValueError, TypeError):  # no meta.json (a cut run's too), not JSON, not ours
        safe = not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir()))
    if not safe:
        raise ValueError(f"{out_dir} holds no corpus of ours (or one cut short): move it away")


# -----------------------------------------------------------------------------
# 4. load: memory-map, after checking the files against their metadata
#
# data/<dataset>-<tokenizer>/ is the one home of prepared data: this file writes it, 05 and 06
# only read it, and when it is missing load_meta's error is the exact command that prepares it.
# A raw .bin has no header, so the same bytes read as uint16 or uint32 give different (wrong) ids
# without any error. load_tokens therefore checks the byte size against token count x dtype size
# from meta.json, says when the file looks written with the other dtype or truncated, and refuses
# rather than train on garbage. np.memmap maps the file instead of reading it: the OS pages in
# only the windows we touch, so a corpus larger than RAM works the same way as tiny Shakespeare.

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


# -----------------------------------------------------------------------------
# 5a. random windows for pretraining: stateless, so resume and multi-GPU come for free
#
# get_batch keeps no state: global batch number `step` is batch_size random windows whose start
# positions come from np.random.default_rng([seed, step]). Every rank draws the same starts and
# keeps its contiguous rows [rank*B/W, (rank+1)*B/W). So the batch is a pure function of
# (seed, step): there is no loader state to checkpoint, a resumed run sees exactly the batches it
# would have seen, and W ranks together see exactly the batch of one process (06 relies on it).
# y is x shifted by one: y[b, t] = data[i_b + t + 1] is the target for the prefix ending at
# x[b, t]. Example with data = [10, 11, 12, 13], block_size = 2 and start i = 1: x = [11, 12],
# y = [12, 13]. The (B, T+1) windows are read with one fancy index; x and y are then contiguous
# copies, since a strided view would make .to("cuda", non_blocking=True) stage a pageable copy
# first (and block), and .view(-1) fails on it. On CUDA the batch goes through pinned memory, so
# its copy is queued behind the GPU's work and the CPU goes on instead of waiting for it.

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


# -----------------------------------------------------------------------------
# 5b. every window at a fixed stride, in epochs: the book-style Dataset + a rank-aware sampler

class SlidingWindowDataset(Dataset):
    """Window i is x = tokens[i*stride : i*stride + T], y = the same shifted by one.

    stride = block_size: windows tile the text without overlap (each token a target at most once
    per epoch); stride < block_size: overlapping windows, more (correlated) examples; stride >
    block_size skips text. The last tokens are dropped when they do not fill a whole window.
    Example: 6 tokens, block_size 2, stride 2 -> starts 0, 2 (start 4 would need token 6).
    """

    def __init__(self, tokens, block_size: int, stride: int):
        self.tokens = np.asarray(tokens)  # a list: copied; an array or a memmap: a view
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if stride <= 0:
            raise ValueError(f"stride must be positive, got {stride}; "
                             "e.g. use stride = block_size")
        if len(self.tokens) < block_size + 1:
            raise ValueError(f"the data has {len(self.tokens)} tokens but one (x, y) window "
                             f"needs block_size + 1 = {block_size + 1}; "
                             "use a smaller block_size or more text")
        self.block_size = block_size
        self.stride = stride

    def __len__(self) -> int:
        return (len(self.tokens) - self.block_size - 1) // self.stride + 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} is out of range for {len(self)} windows")
        start = i * self.stride
        ids = self.tokens[start:start + self.block_size + 1].astype(np.int64)  # (T+1,)
        window = torch.from_numpy(ids)
        return window[:-1], window[1:]  # (T,), (T,)


class RankBatchSampler(Sampler):
    """Batches of dataset indices for one rank: its contiguous slice of each global batch.

    Global batch k is order[k*B:(k+1)*B], where order is a permutation seeded by (seed, epoch)
    (or 0..n-1 without shuffle); rank r gets rows [r*B/W, (r+1)*B/W) of it, the same split as
    get_batch. The last incomplete global batch is dropped so that every rank takes the same
    number of steps (a rank with one step fewer would leave the others waiting in all-reduce).
    Use with a DataLoader:
        DataLoader(dataset, batch_sampler=RankBatchSampler(len(dataset), ...))
    Call set_epoch(e) before each epoch for a new order. (torch's DistributedSampler deals the
    same global batch out interleaved, rank r taking every W-th row; contiguous slices make
    "concatenate the ranks' rows = the single-process batch" literally true.)
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, seed: int = 0):
        if world_size <= 0 or batch_size <= 0 or batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} does not split across "
                             f"{world_size} ranks; use a positive multiple of world_size")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        if n < batch_size:
            raise ValueError(f"{n} examples do not fill one batch of {batch_size}; "
                             "use a smaller batch_size, a smaller stride or more text")
        self.n = n  # examples in the dataset
        self.batch_size = batch_size  # the global batch, all ranks together
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.batch_size

    def __iter__(self):
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        else:
            order = np.arange(self.n)
        per_rank = self.batch_size // self.world_size
        first = self.rank * per_rank  # this rank's first row in each global batch
        for k in range(len(self)):
            global_batch = order[k * self.batch_size:(k + 1) * self.batch_size]
            yield global_batch[first:first + per_rank].tolist()


# -----------------------------------------------------------------------------
# The command line: fetch, clean, prepare into data/<dataset>-<tokenizer>/, and look at a batch

def main(argv=None):
    parser = FlagParser(description=__doc__.split("\n")[0])  # the docstring's first line
    parser.add_argument("--dataset", type=str, help="the corpus's name; tinyshakespeare is "
                        "downloaded (default: %(default)s: tinyshakespeare or --text_file's name)")
    parser.add_argument("--text_file", type=str, help="your UTF-8 text (relative to this folder)")
    parser.add_argument("--tokenizers", type=str, default="char,gpt2",
                        help="char (a token per character), gpt2 (GPT-2's BPE) or char,gpt2")
    parser.add_argument("--normalize", type=str, default="NFC", choices=["NFC", "NFKC"],
                        help="Unicode normal form (NFKC also folds look-alikes: ﬁ -> fi)")
    parser.add_argument("--clean", type=str, nargs="?", const="true", default="true",
                        choices=["true", "false"], help="clean the text first")
    parser.add_argument("--val_fraction", type=float, default=0.1,
                        help="the share of the text (its end) kept for validation")
    parser.add_argument("--block_size", type=int, default=32, help="tokens per window shown")
    parser.add_argument("--batch_size", type=int, default=4, help="windows per batch shown")
    parser.add_argument("--seed", type=int, default=0, help="get_batch's random seed")
    parser.add_argument("--fetch", type=str, choices=list(SOURCES), help="download this file alone")
    parser.add_argument("--data_dir", type=str, default="data",
                        help="downloads, and the <dataset>-<tokenizer>/ folders 05 and 06 read; "
                             "relative paths start at this script's folder")
    args = parser.parse_args(argv)
    try:  # the user's input or network: one line `error: ...`, exit status 2, no traceback
        run(args)
    except (ValueError, OSError, RuntimeError) as e:
        parser.exit(2, f"error: {e}\n")
    except KeyboardInterrupt:  # downloads and meta.json come last: a cut run looks unfinished
        parser.exit(130, "\nCtrl-C: stopped\n")


def run(args):  # main's work, its arguments checked before any of it
    kinds = list(dict.fromkeys(args.tokenizers.split(",")))  # each tokenizer once, in order
    if set(kinds) - {"char", "gpt2"}:
        raise ValueError(f"--tokenizers={args.tokenizers}; use char, gpt2 or char,gpt2")
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"--val_fraction={args.val_fraction}; "
                         "use a fraction between 0 and 1, e.g. 0.1")
    if min(args.block_size, args.batch_size) <= 0 or args.seed < 0:
        raise ValueError(f"--block_size={args.block_size}, --batch_size={args.batch_size}, "
                         f"--seed={args.seed}: use sizes > 0, a seed >= 0")
    data_dir = PROJECT / args.data_dir  # relative to this folder; an absolute path stays as it is
    if any(p.is_file() for p in [data_dir, *data_dir.parents]):  # else a bare [Errno 17]/[Errno 20]
        raise ValueError(f"--data_dir={args.data_dir} is a file or inside one; give a folder")
    if args.fetch:  # a download alone, as 11's HellaSwag
        print(f"{fetch(args.fetch, data_dir)}: {args.fetch}")
        return
    text_file = PROJECT / args.text_file if args.text_file else None
    if text_file and not text_file.is_file():
        raise ValueError(f"--text_file={args.text_file}: no such file ({text_file})")
    name = args.dataset or (text_file.stem if text_file else "tinyshakespeare")
    if not text_file and name != "tinyshakespeare":
        raise ValueError(f"--dataset={name}: the corpus we fetch is tinyshakespeare; "
                         "for your own text, add --text_file=FILE")
    for kind in kinds:  # before any work: we replace only an empty folder or our own corpus
        check_out_dir(data_dir / f"{name}-{kind}")
    path = text_file
    if not text_file:
        path = fetch(name, data_dir)
        for source, stage in [("instruction-data", "07"), ("preference-data", "08")]:
            source_path = fetch(source, data_dir)
            print(f"{source_path}: {source}, JSON for {stage}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text; give a UTF-8 text file") from None
    print(f"{path}: {len(text):,} characters", flush=True)
    if args.clean == "true":
        cleaned, reports = clean_text(text, form=args.normalize)
        for report in reports:
            print("  " + format_report(report))
        print(f"cleaned: {len(text):,} -> {len(cleaned):,} characters")
        text = cleaned
    if not text:  # an empty file, or cleaning removed it all (its report says so): no window fits
        raise ValueError(f"{path} has no text left; use more text (or --clean=false)")
    train_chars = int(len(text) * (1 - args.val_fraction))
    if args.block_size >= train_chars:  # char: a token a character; GPT-2: get_batch checks
        raise ValueError(f"--block_size={args.block_size}: the train split has fewer characters "
                         "than one window; use a smaller block_size or more text")
    specs = {"char": CharTokenizer.from_text(text).to_dict(), "gpt2": {"kind": "gpt2"}}
    for kind in kinds:
        spec = specs[kind]
        out_dir = data_dir / f"{name}-{kind}"
        t0 = time.perf_counter()
        print(f"\n[{kind}] tokenizing {len(text):,} characters into {out_dir} ...", flush=True)
        meta = prepare_corpus(text, out_dir, spec, val_fraction=args.val_fraction)
        train = load_tokens(out_dir, "train")
        tokenizer = get_tokenizer(spec)
        seconds = time.perf_counter() - t0
        n_tokens = meta["train_tokens"] + meta["val_tokens"]
        print(f"vocab {meta['n_vocab']:,} ({meta['dtype']}), "
              f"train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens, "
              f"{len(text) / n_tokens:.2f} characters/token, {seconds:.1f} s")
        show_batches(train, tokenizer, args.batch_size, args.block_size, args.seed)


def show_batches(train, tokenizer, batch_size: int, block_size: int, seed: int):
    """Print what the two batch sources make of the train tokens, decoded."""
    x, y = get_batch(train, batch_size, block_size, step=0, seed=seed)
    print(f"get_batch(step=0): x {tuple(x.shape)}, y {tuple(y.shape)}; row 0:")
    print(f"  x: {tokenizer.decode(x[0].tolist())!r}")
    print(f"  y: {tokenizer.decode(y[0].tolist())!r}")
    if batch_size % 2 == 0:
        rank_rows = []
        for rank in range(2):
            x_rank, _ = get_batch(train, batch_size, block_size, step=0, seed=seed,
                                  rank=rank, world_size=2)
            rank_rows.append(x_rank)
        same = torch.equal(torch.cat(rank_rows), x)
        print(f"  ranks 0 and 1 of 2 together give the same batch: {same}")
    dataset = SlidingWindowDataset(train, block_size, stride=block_size)
    second = min(1, len(dataset) - 1)  # a short text may hold one window
    window_x, _ = dataset[second]
    print(f"SlidingWindowDataset(stride={block_size}): {len(dataset):,} windows; "
          f"window {second} starts {tokenizer.decode(window_x[:10].tolist())!r}...")


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


# copied from 01_tokenizer.py: download
def download(url: str, path, sha256: str | None = None, timeout: float = 30) -> Path:
    """Download url to path, unless a good file is there: streamed to path + ".tmp", checked,
    renamed. sha256=None: no pinned hash (Hugging Face's weights); the byte count is checked."""
    path = Path(path)
    if path.exists():  # ours get this name only once checked; a bad one is the user's: never lost
        if sha256 is None or hashlib.sha256(path.read_bytes()).hexdigest() == sha256:
            return path
        raise ValueError(f"{path} is not the file expected (its sha256 differs): move it away")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    digest = hashlib.sha256()
    done = 0  # bytes written so far
    t0 = time.perf_counter()
    headers = {"Accept-Encoding": "identity"}  # the raw bytes, no gzip
    try:
        with requests.get(url, stream=True, timeout=timeout, headers=headers) as response:
            response.raise_for_status()
            total = int(response.headers.get("content-length", 0))  # exact: identity encoding
            with open(tmp, "wb") as f:
                for block in response.iter_content(chunk_size=1 << 20):
                    done += f.write(block)
                    digest.update(block)
                    if total > 1 << 24:  # progress for big files (> 16 MB)
                        rate = done / (time.perf_counter() - t0)  # bytes/s
                        megabytes = f"{done >> 20:,}/{total >> 20:,} MB"
                        seconds_left = (total - done) / rate
                        end = "\n" if done == total else ""  # the last report ends the line
                        print(f"\r{path.name}: {megabytes}, {rate / 2**20:.1f} MB/s, "
                              f"~{seconds_left:.0f} s left ", end=end, flush=True)
        if total and done != total:
            raise RuntimeError(f"download of {url} stopped after {done} of {total} bytes; retry")
        got = digest.hexdigest()
        if sha256 and got != sha256:
            raise ValueError(f"sha256 mismatch for {url}: expected {sha256}, got {got}; retry; "
                             "if it persists the file changed upstream: check it and update the "
                             f"hash, or put the expected file in {path.parent} by hand")
        os.replace(tmp, path)
    except requests.RequestException as e:
        raise RuntimeError(f"download of {url} failed: {e}; check the URL and your network, "
                           f"or put the file at {path} by hand") from e
    finally:
        tmp.unlink(missing_ok=True)
    return path


# copied from 01_tokenizer.py: FlagParser
class FlagParser(argparse.ArgumentParser):
    """argparse with no abbreviations (--vocab is not --vocab_size) and the help 04-13 print. A
    mistake is one line and exit status 2, not a usage dump; a misspelt flag gets the closest one:
    `error: unrecognized arguments: --vocab_siz=9 (did you mean --vocab_size?)`."""

    class Help(argparse.MetavarTypeHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        """Each flag as `--name TYPE  meaning (default: X)`."""

    def __init__(self, **options):
        super().__init__(allow_abbrev=False, formatter_class=self.Help, **options)

    def error(self, message: str):
        hint = "see --help"
        if message.startswith("unrecognized arguments: "):
            first = message.split()[2].split("=")[0]  # "--vocab_siz=9" -> "--vocab_siz"
            flags = [flag for action in self._actions for flag in action.option_strings]
            close = difflib.get_close_matches(first, flags, n=1)
            if close:
                hint = f"did you mean {close[0]}?"
        self.exit(2, f"error: {message} ({hint})\n")


if __name__ == "__main__":
    main()
