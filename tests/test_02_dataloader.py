"""Tests for 02_dataloader.py: download, cleaning, token files, and the two batch sources.

References used instead of the code's own outputs: slicing the token array by hand, a
single-process batch (for the rank slices), rasbt's `range(0, len - T, stride)` loop (for the
sliding windows), tiktoken (for GPT-2 token files), and hand-built cleaning examples.
"""

import hashlib
import http.server
import threading
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch
from conftest import exit_status, interrupted
from torch.utils.data import DataLoader

# -----------------------------------------------------------------------------
# helpers


@pytest.fixture
def tokens(tmp_path):
    """A memmap of 5000 distinct token ids, so a window's first id tells where it starts."""
    ids = np.random.default_rng(1).permutation(5000).astype(np.uint16)
    path = tmp_path / "tokens.bin"
    ids.tofile(path)
    return np.memmap(path, dtype=np.uint16, mode="r")


def start_of(data, token) -> int:
    return int(np.flatnonzero(np.asarray(data) == token)[0])


# -----------------------------------------------------------------------------
# get_batch: shapes, shift, ranks, determinism, errors


@pytest.mark.parametrize("batch_size,block_size", [(1, 1), (4, 8), (8, 64)])
def test_get_batch_shapes_and_one_token_shift(dl02, tokens, batch_size, block_size):
    x, y = dl02.get_batch(tokens, batch_size, block_size, step=3, seed=7)
    assert x.shape == y.shape == (batch_size, block_size)
    assert x.dtype == y.dtype == torch.int64
    for row_x, row_y in zip(x, y):
        i = start_of(tokens, row_x[0].item())  # distinct ids: the first one locates the window
        assert row_x.tolist() == tokens[i:i + block_size].tolist()
        assert row_y.tolist() == tokens[i + 1:i + block_size + 1].tolist()


def test_get_batch_follows_the_seeded_spec(dl02, tokens):
    """SPEC: the starts of global batch `step` come from np.random.default_rng([seed, step])."""
    starts = np.random.default_rng([5, 11]).integers(0, len(tokens) - 16, size=4)
    x, _ = dl02.get_batch(tokens, 4, 16, step=11, seed=5)
    assert x[:, 0].tolist() == tokens[starts].tolist()


@pytest.mark.parametrize("world_size", [2, 4])
def test_get_batch_rank_slices_reassemble_the_global_batch(dl02, tokens, world_size):
    batch_size, block_size = 8, 16
    full_x, full_y = dl02.get_batch(tokens, batch_size, block_size, step=2, seed=3)
    parts = [dl02.get_batch(tokens, batch_size, block_size, 2, 3, rank, world_size)
             for rank in range(world_size)]
    for x, y in parts:
        assert x.shape == y.shape == (batch_size // world_size, block_size)
    torch.testing.assert_close(torch.cat([x for x, _ in parts]), full_x)
    torch.testing.assert_close(torch.cat([y for _, y in parts]), full_y)
    starts = [{start_of(tokens, t) for t in x[:, 0].tolist()} for x, _ in parts]
    for a in range(world_size):  # the ranks' windows are disjoint
        for b in range(a + 1, world_size):
            assert not starts[a] & starts[b]


def test_get_batch_is_deterministic_and_varies_with_step_and_seed(dl02, tokens):
    x1, y1 = dl02.get_batch(tokens, 4, 16, step=5, seed=0)
    x2, y2 = dl02.get_batch(tokens, 4, 16, step=5, seed=0)
    torch.testing.assert_close(x1, x2)
    torch.testing.assert_close(y1, y2)
    assert not torch.equal(x1, dl02.get_batch(tokens, 4, 16, step=6, seed=0)[0])
    assert not torch.equal(x1, dl02.get_batch(tokens, 4, 16, step=5, seed=1)[0])


def test_get_batch_on_the_shortest_possible_data(dl02):
    data = np.array([10, 11, 12], dtype=np.uint16)  # block_size 2 fits exactly once
    x, y = dl02.get_batch(data, 3, 2, step=0)
    assert x.tolist() == [[10, 11]] * 3 and y.tolist() == [[11, 12]] * 3


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_size=0), "block_size must be positive"),
    (dict(block_size=-3), "block_size must be positive"),
    (dict(block_size=5000), "5000 tokens but one .* needs block_size \\+ 1 = 5001"),
    (dict(batch_size=6, world_size=4), "batch_size 6 does not split across 4 ranks"),
    (dict(rank=2, world_size=2), "rank 2 is outside"),
])
def test_get_batch_errors(dl02, tokens, kwargs, match):
    args = dict(batch_size=4, block_size=8, step=0) | kwargs
    with pytest.raises(ValueError, match=match):
        dl02.get_batch(tokens, **args)


# -----------------------------------------------------------------------------
# prepare_corpus / load_tokens: the memmap round trip and its checks


def test_char_corpus_round_trip_uint16(dl02, tmp_path):
    text = "hello world, hello tokens.\n" * 20
    spec = dl02.CharTokenizer.from_text(text).to_dict()
    meta = dl02.prepare_corpus(text, tmp_path, spec, val_fraction=0.1)
    split = int(len(text) * 0.9)  # the split is on the text, by hand
    assert meta == {"tokenizer": spec, "n_vocab": len(set(text)), "dtype": "uint16",
                    "train_tokens": split, "val_tokens": len(text) - split}
    tok = dl02.get_tokenizer(spec)
    train, val = dl02.load_tokens(tmp_path, "train"), dl02.load_tokens(tmp_path, "val")
    assert isinstance(train, np.memmap) and train.dtype == np.uint16
    assert tok.decode(train.tolist()) == text[:split]
    assert tok.decode(val.tolist()) == text[split:]


def test_char_corpus_round_trip_uint32(dl02, tmp_path):
    """More than 2**16 distinct characters: ids no longer fit in uint16."""
    chars = "".join(chr(c) for c in range(0x20000, 0x20000 + 70_000))  # CJK, no surrogates
    text = chars + chars[::-1]
    spec = dl02.CharTokenizer.from_text(text).to_dict()
    meta = dl02.prepare_corpus(text, tmp_path, spec, val_fraction=0.25)
    assert meta["dtype"] == "uint32" and meta["n_vocab"] == 70_000
    train = dl02.load_tokens(tmp_path, "train")
    assert train.dtype == np.uint32 and train.max() >= 2**16
    split = int(len(text) * 0.75)
    assert dl02.get_tokenizer(spec).decode(train.tolist()) == text[:split]


def test_gpt2_corpus_matches_tiktoken(dl02, tmp_path, shakespeare_text):
    text = shakespeare_text[:20_000]
    meta = dl02.prepare_corpus(text, tmp_path, {"kind": "gpt2"}, val_fraction=0.1)
    enc = tiktoken.get_encoding("gpt2")
    split = int(len(text) * 0.9)
    assert meta["dtype"] == "uint16" and meta["n_vocab"] == 50257
    assert dl02.load_tokens(tmp_path, "train").tolist() == enc.encode(text[:split])
    assert dl02.load_tokens(tmp_path, "val").tolist() == enc.encode(text[split:])


@pytest.fixture
def prepared(dl02, tmp_path):
    text = "abcdefghij" * 10
    dl02.prepare_corpus(text, tmp_path, dl02.CharTokenizer.from_text(text).to_dict())
    return tmp_path


def test_load_tokens_rejects_a_file_written_with_another_dtype(dl02, prepared):
    path = prepared / "train.bin"
    np.fromfile(path, dtype=np.uint16).astype(np.uint32).tofile(path)
    with pytest.raises(ValueError, match="looks written as uint32, not uint16"):
        dl02.load_tokens(prepared, "train")


def test_load_tokens_rejects_a_truncated_file(dl02, prepared):
    path = prepared / "val.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ValueError, match="truncated .* prepare the corpus again"):
        dl02.load_tokens(prepared, "val")


def test_load_tokens_rejects_a_vocabulary_too_big_for_the_dtype(dl02, prepared):
    meta = (prepared / "meta.json").read_text().replace('"n_vocab": 10', '"n_vocab": 70000')
    (prepared / "meta.json").write_text(meta)
    with pytest.raises(ValueError, match="n_vocab 70000 does not fit in uint16"):
        dl02.load_tokens(prepared, "train")


def test_load_tokens_missing_meta_and_bad_split(dl02, prepared, tmp_path):
    with pytest.raises(ValueError, match="unknown split 'test'"):
        dl02.load_tokens(prepared, "test")
    hint = "not found; prepare it with: python 02_dataloader.py"
    with pytest.raises(FileNotFoundError, match=hint):
        dl02.load_tokens(tmp_path / "nowhere", "train")


def test_load_meta_names_the_command_that_prepares_the_corpus(dl02, tmp_path):
    """05 and 06 only read data/<dataset>-<tokenizer>/; when it is missing, the message is the
    fix."""
    with pytest.raises(FileNotFoundError) as error:
        dl02.load_meta(tmp_path / "tinyshakespeare-gpt2")
    assert str(error.value) == (
        f"{tmp_path / 'tinyshakespeare-gpt2' / 'meta.json'} not found; prepare it with: "
        "python 02_dataloader.py --dataset=tinyshakespeare --tokenizers=gpt2 "
        f"--data_dir={tmp_path} "
        "(and --text_file=FILE if it is your own text)")


def test_load_meta_load_tokens_get_batch_run_on_their_own(dl02, prepared):
    """Later stages copy exactly these three units: they must need nothing else from 02."""
    import ast
    import inspect
    import json
    from pathlib import Path

    names = ("load_meta", "load_tokens", "get_batch")
    source = "\n\n".join(inspect.getsource(getattr(dl02, name)) for name in names)
    namespace = {"json": json, "Path": Path, "np": np, "torch": torch}
    exec(compile(ast.parse(source), "<copies>", "exec"), namespace)
    data = namespace["load_tokens"](prepared, "train")
    x, y = namespace["get_batch"](data, 4, 8, step=3, seed=1)
    expected = dl02.get_batch(dl02.load_tokens(prepared, "train"), 4, 8, step=3, seed=1)
    torch.testing.assert_close((x, y), expected)
    with pytest.raises(ValueError, match="rank 2 is outside"):
        namespace["get_batch"](data, 4, 8, step=0, rank=2, world_size=2)


def test_prepare_corpus_replaces_an_earlier_corpus(dl02, tmp_path):
    dl02.prepare_corpus("abcdefghij" * 100, tmp_path, {"kind": "char", "chars": "abcdefghij"})
    meta = dl02.prepare_corpus("abc" * 10, tmp_path, {"kind": "char", "chars": "abc"})
    assert dl02.load_meta(tmp_path) == meta and meta["train_tokens"] == 27
    assert dl02.load_tokens(tmp_path, "val").tolist() == [0, 1, 2]


def test_prepare_corpus_errors(dl02, tmp_path):
    with pytest.raises(ValueError, match="val_fraction must be in"):
        dl02.prepare_corpus("abc", tmp_path, {"kind": "char", "chars": "abc"}, val_fraction=1.0)
    with pytest.raises(ValueError, match="split is empty"):
        dl02.prepare_corpus("a", tmp_path, {"kind": "char", "chars": "a"})
    spec = {"kind": "char", "chars": "abc"}
    meta = dl02.prepare_corpus("abc" * 10, tmp_path, spec)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match="split is empty"):  # 1 - 1e-17 is 1.0: no val text
        dl02.prepare_corpus("abc" * 10, tmp_path, spec, val_fraction=1e-17)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # the corpus untouched
    assert dl02.load_meta(tmp_path) == meta


# -----------------------------------------------------------------------------
# SlidingWindowDataset and RankBatchSampler


@pytest.mark.parametrize("block_size,stride", [(4, 1), (4, 3), (4, 4), (4, 5), (19, 7)])
def test_sliding_window_matches_the_reference_loop(dl02, block_size, stride):
    tokens = np.random.default_rng(0).integers(0, 100, size=20).astype(np.uint16)
    dataset = dl02.SlidingWindowDataset(tokens, block_size, stride)
    starts = list(range(0, len(tokens) - block_size, stride))  # rasbt's GPTDatasetV1 loop
    assert len(dataset) == len(starts)
    for i, start in enumerate(starts):
        x, y = dataset[i]
        assert x.dtype == torch.int64 and x.shape == y.shape == (block_size,)
        assert x.tolist() == tokens[start:start + block_size].tolist()
        assert y.tolist() == tokens[start + 1:start + block_size + 1].tolist()
    with pytest.raises(IndexError):
        dataset[len(starts)]


def test_sliding_window_accepts_lists_and_memmaps(dl02, tokens):
    from_list = dl02.SlidingWindowDataset(list(range(10)), 3, 2)
    assert from_list[1][0].tolist() == [2, 3, 4]
    from_memmap = dl02.SlidingWindowDataset(tokens, 8, 8)
    assert from_memmap[2][1].tolist() == tokens[17:25].tolist()


@pytest.mark.parametrize("args,match", [
    ((list(range(10)), 4, 0), "stride must be positive"),
    ((list(range(10)), 0, 1), "block_size must be positive"),
    ((list(range(4)), 4, 1), "4 tokens but one .* needs block_size \\+ 1 = 5"),
])
def test_sliding_window_errors(dl02, args, match):
    with pytest.raises(ValueError, match=match):
        dl02.SlidingWindowDataset(*args)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("shuffle", [True, False])
def test_rank_batch_sampler_reassembles_the_global_batches(dl02, tokens, world_size, shuffle):
    # 37 windows -> 4 batches of 8, 5 dropped
    dataset = dl02.SlidingWindowDataset(tokens[:300], 8, 8)
    batch_size = 8

    def batches(rank, world, epoch=0):
        sampler = dl02.RankBatchSampler(len(dataset), batch_size, rank, world,
                                        shuffle=shuffle, seed=1)
        sampler.set_epoch(epoch)
        return [x for x, _ in DataLoader(dataset, batch_sampler=sampler)]

    single = batches(0, 1)
    assert len(single) == len(dataset) // batch_size == 4
    per_rank = [batches(rank, world_size) for rank in range(world_size)]
    for step, full in enumerate(single):
        torch.testing.assert_close(torch.cat([b[step] for b in per_rank]), full)
    seen = [start_of(tokens, x0) for b in per_rank for x in b for x0 in x[:, 0].tolist()]
    assert len(seen) == len(set(seen)) == 32  # disjoint: no window twice in an epoch
    if shuffle:
        assert not torch.equal(batches(0, 1, epoch=1)[0], single[0])  # new order each epoch
    else:
        torch.testing.assert_close(single[0], torch.stack([dataset[i][0] for i in range(8)]))


def test_rank_batch_sampler_errors(dl02):
    with pytest.raises(ValueError, match="batch_size 6 does not split across 4 ranks"):
        dl02.RankBatchSampler(100, 6, rank=0, world_size=4)
    with pytest.raises(ValueError, match="do not fill one batch"):
        dl02.RankBatchSampler(3, 4)


# -----------------------------------------------------------------------------
# cleaning, on hand-built examples


@pytest.mark.parametrize("form,text,expected", [
    ("NFC", "cafe\u0301\nplain", "caf\u00e9\nplain"),  # e + combining acute -> é
    ("NFC", "\ufb01ne \uff21", "\ufb01ne \uff21"),  # NFC keeps compatibility characters
    ("NFKC", "\ufb01ne \uff21 x\u00b2", "fine A x2"),  # ligature, full-width A, superscript
])
def test_normalize_unicode(dl02, form, text, expected):
    out, report = dl02.normalize_unicode(text, form)
    assert out == expected
    assert report["lines_changed"] == int(text != expected)


def test_normalize_unicode_bad_form(dl02):
    with pytest.raises(ValueError, match="unknown normalization form 'NFX'"):
        dl02.normalize_unicode("a", "NFX")


def test_normalize_whitespace(dl02):
    text = "a \r\nb\u200bc\u00a0d\x0c\n\n\n\n  indented  inside\t\r"
    out, report = dl02.normalize_whitespace(text)
    assert out == "a\nbc d\n\n  indented  inside\n"
    # \r\n and \r, zero-width, \x0c, no-break space, "a " and "inside\t", one newline run
    assert sum(report["fixes"].values()) == 8
    assert report["fixes"]["trailing spaces at line ends"] == 2
    assert report["fixes"]["runs of 3+ newlines"] == 1


def test_normalize_whitespace_leaves_clean_text_alone(dl02, shakespeare_text):
    text = shakespeare_text[:5000]  # no \r, no trailing spaces, no blank-line runs here
    assert dl02.normalize_whitespace(text) == (text, {"step": "normalize_whitespace", "fixes": {}})


def test_deduplicate_paragraphs(dl02):
    long_a = "To be, or not to be, that is the question:\nWhether 'tis nobler"
    long_b = "Now is the winter of our discontent\nMade glorious summer by this sun"
    short = "ROMEO:\nAy."
    text = "\n\n".join([long_a, short, long_b, short, long_a + "\n", long_b])
    out, report = dl02.deduplicate_paragraphs(text, min_chars=50)
    assert out == "\n\n".join([long_a, short, long_b, short])  # short repeats are kept
    assert report["paragraphs_removed"] == 2
    assert report["chars_removed"] == len(long_a) + len(long_b)
    # the report's examples: reprs, cut to 60 characters
    assert report["examples"] == [repr(long_a[:60] + "..."), repr(long_b[:60] + "...")]


def test_quality_filter(dl02):
    good = "KING:\nWhat say you, lords?"
    numbers = "12 34 56 78 90\n-- -- --"
    shouting = "Help me, help me, I pray you" + "!" * 11
    fine_run = "Waiting for you, my lord" + "." * 10  # exactly max_char_run in a row is allowed
    text = "\n\n".join([good, numbers, shouting, fine_run, ""])
    out, report = dl02.quality_filter(text, min_letter_fraction=0.5, max_char_run=10)
    assert out == "\n\n".join([good, fine_run, ""])
    assert report["paragraphs_removed"] == 2
    assert report["too_few_letters"] == 1
    assert report["repeated_chars"] == 1


def test_clean_text_normalizes_before_deduplicating(dl02):
    """The same paragraph in composed and decomposed form is a duplicate only after NFC."""
    paragraph = "The caf\u00e9 on the corner serves the best coffee in the whole town."
    decomposed = paragraph.replace("\u00e9", "e\u0301")
    out, reports = dl02.clean_text(paragraph + "\n\n" + decomposed + "  \n")
    assert out == paragraph
    assert [r["step"] for r in reports] == ["normalize_unicode", "normalize_whitespace",
                                            "deduplicate_paragraphs", "quality_filter"]
    assert reports[2]["paragraphs_removed"] == 1
    line = dl02.format_report(reports[2])
    assert line.startswith("deduplicate_paragraphs: paragraphs_removed=1 chars_removed=")
    assert line.endswith(f"  e.g. {reports[2]['examples'][0]}")
    whitespace_line = "normalize_whitespace: fixes={'trailing spaces at line ends': 1}"
    assert dl02.format_report(reports[1]) == whitespace_line  # no examples, no "e.g."


# -----------------------------------------------------------------------------
# download / fetch against a local HTTP server


PAYLOAD = bytes(range(256)) * 1000  # every byte value, several streamed blocks


@pytest.fixture
def server(monkeypatch):
    """A tiny HTTP server on 127.0.0.1: /payload.bin serves PAYLOAD, /error returns 500."""
    for var in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            if self.path in ("/payload.bin", "/short.bin"):
                self.send_response(200)
                announced = len(PAYLOAD) + 1000 * (self.path == "/short.bin")
                self.send_header("Content-Length", str(announced))
                self.end_headers()
                self.wfile.write(PAYLOAD)
            else:
                self.send_error(500, "boom")

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", hits
    httpd.shutdown()
    httpd.server_close()


def test_get_batch_returns_contiguous_tensors(dl02):
    """Strided views would make the pinned, non-blocking copy to a GPU stage and block."""
    data = np.arange(1000, dtype=np.uint16)
    x, y = dl02.get_batch(data, 8, 16, step=0, rank=1, world_size=2)
    assert x.is_contiguous() and y.is_contiguous()


def test_download_success_and_cache(dl02, server, tmp_path):
    base, hits = server
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    path = dl02.download(f"{base}/payload.bin", tmp_path / "payload.bin", sha)
    assert path == tmp_path / "payload.bin" and path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["payload.bin"]  # no .tmp left
    # right hash on disk: no request
    dl02.download(f"{base}/payload.bin", tmp_path / "payload.bin", sha)
    assert hits == ["/payload.bin"]
    path.write_bytes(b"mine")  # another hash on disk: not a download of ours (the user's)
    with pytest.raises(ValueError, match="payload.bin is not the file expected"):
        dl02.download(f"{base}/payload.bin", path, sha)
    assert path.read_bytes() == b"mine" and hits == ["/payload.bin"]  # kept, no request


def test_download_checksum_mismatch_leaves_nothing(dl02, server, tmp_path):
    base, _ = server
    with pytest.raises(Exception, match="0{64}") as error:  # message shows the expected hash
        dl02.download(f"{base}/payload.bin", tmp_path / "payload.bin", "0" * 64)
    assert isinstance(error.value, (ValueError, RuntimeError))
    assert hashlib.sha256(PAYLOAD).hexdigest() in str(error.value)
    assert "payload.bin" in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_download_without_a_hash_checks_the_byte_count(dl02, server, tmp_path):
    """sha256=None (e.g. Hugging Face's weights): the byte count must be what the server
    announced."""
    base, hits = server
    path = dl02.download(f"{base}/payload.bin", tmp_path / "payload.bin")
    assert path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["payload.bin"]
    # there: not fetched again
    assert dl02.download(f"{base}/payload.bin", path, sha256=None) == path
    assert hits == ["/payload.bin"]
    # announces more than it sends
    with pytest.raises((RuntimeError, ValueError), match="short.bin"):
        dl02.download(f"{base}/short.bin", tmp_path / "short.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["payload.bin"]  # nothing half-written


def test_download_http_error_leaves_nothing(dl02, server, tmp_path):
    base, hits = server
    with pytest.raises(Exception, match="500") as error:
        dl02.download(f"{base}/error", tmp_path / "x.txt", "0" * 64)
    assert isinstance(error.value, (ValueError, RuntimeError))
    assert f"{base}/error" in str(error.value)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "x.txt").write_bytes(b"mine")  # a file of the user's, with another hash:
    with pytest.raises(ValueError, match="x.txt is not the file expected"):
        dl02.download(f"{base}/error", tmp_path / "x.txt", "0" * 64)
    assert (tmp_path / "x.txt").read_bytes() == b"mine"  # never replaced, nor deleted
    assert hits == ["/error"]  # refused before any request


def test_fetch(dl02, server, tmp_path, monkeypatch):
    base, _ = server
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    monkeypatch.setitem(dl02.SOURCES, "local", (f"{base}/payload.bin", sha, "local.bin"))
    assert dl02.fetch("local", tmp_path) == tmp_path / "local.bin"
    assert (tmp_path / "local.bin").read_bytes() == PAYLOAD
    with pytest.raises(ValueError, match="unknown source 'nope'; known sources: tinyshakespeare"):
        dl02.fetch("nope", tmp_path)


def test_fetch_flag_downloads_that_source_alone(dl02, server, tmp_path, monkeypatch, capsys):
    """--fetch=NAME (11's HellaSwag): that file, checked, into --data_dir; no corpus prepared."""
    base, _ = server
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    monkeypatch.setitem(dl02.SOURCES, "hellaswag", (f"{base}/payload.bin", sha, "hs.jsonl"))
    dl02.main(["--fetch=hellaswag", f"--data_dir={tmp_path}"])
    assert [p.name for p in tmp_path.iterdir()] == ["hs.jsonl"]
    assert (tmp_path / "hs.jsonl").read_bytes() == PAYLOAD
    assert capsys.readouterr().out == f"{tmp_path / 'hs.jsonl'}: hellaswag\n"
    with pytest.raises(SystemExit) as stop:  # not a source we know: argparse's one line
        dl02.main(["--fetch=wikipedia", f"--data_dir={tmp_path}"])
    assert stop.value.code == 2
    assert "invalid choice: 'wikipedia'" in capsys.readouterr().err


def test_ctrl_c_is_one_line_and_exit_130(dl02, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dl02, "run", interrupted)
    assert exit_status(dl02.main, [f"--data_dir={tmp_path}"]) == 130
    assert capsys.readouterr().err.strip() == "Ctrl-C: stopped"


def test_sources_hashes_match_the_offline_copies(dl02, shakespeare_path, instruction_data_path,
                                                 preference_data_path):
    for name, path in [("tinyshakespeare", shakespeare_path),
                       ("instruction-data", instruction_data_path),
                       ("preference-data", preference_data_path)]:
        assert hashlib.sha256(path.read_bytes()).hexdigest() == dl02.SOURCES[name][1], name


# -----------------------------------------------------------------------------
# the command line: the one home of prepared data, flags, user errors


SMALL_TEXT = "First Citizen:\nSpeak, speak.  \n\n\n\nAll:\nResolved. resolved.\n" * 30


def test_main_demo_on_a_small_text(dl02, tmp_path, capsys):
    text_file = tmp_path / "small.txt"
    text_file.write_text(SMALL_TEXT)
    dl02.main([f"--text_file={text_file}", f"--data_dir={tmp_path / 'data'}", "--block_size=8"])
    out = capsys.readouterr().out
    assert "trailing spaces at line ends" in out
    assert "ranks 0 and 1 of 2 together give the same batch: True" in out
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["small-char", "small-gpt2"]
    for kind in ("char", "gpt2"):
        out_dir = tmp_path / "data" / f"small-{kind}"
        assert dl02.load_meta(out_dir)["train_tokens"] > 0
        assert len(dl02.load_tokens(out_dir, "val")) > 0


def test_main_demo_on_a_text_of_one_window(dl02, tmp_path, capsys):
    """A train split that holds one window of block_size (not two) still gets its demo."""
    text_file = tmp_path / "tiny.txt"
    text_file.write_text("abcdefghij" * 10)  # 90 train characters, 10 val
    argv = [f"--text_file={text_file}", f"--data_dir={tmp_path}", "--tokenizers=char",
            "--block_size=60", "--batch_size=2"]
    dl02.main(argv)
    assert "1 windows; window 0 starts 'abcdefghij'" in capsys.readouterr().out


@pytest.mark.parametrize("clean", ["--clean=false", "--clean=true", "--clean"])
def test_main_clean_flag_bare_or_with_a_value(dl02, tmp_path, clean, capsys):
    text_file = tmp_path / "small.txt"
    text_file.write_text(SMALL_TEXT)
    dl02.main([f"--text_file={text_file}", f"--data_dir={tmp_path}", "--tokenizers=char",
               "--dataset=mine", clean])
    meta = dl02.load_meta(tmp_path / "mine-char")
    cleaned = dl02.clean_text(SMALL_TEXT)[0]
    assert len(cleaned) < len(SMALL_TEXT)
    expected = SMALL_TEXT if clean == "--clean=false" else cleaned
    assert meta["train_tokens"] + meta["val_tokens"] == len(expected)
    assert ("cleaned:" in capsys.readouterr().out) == (clean != "--clean=false")


def test_default_run_prepares_tinyshakespeare_in_the_data_home(
        dl02, tmp_path, shakespeare_path, shakespeare_text, instruction_data_path,
        preference_data_path):
    """`python 02_dataloader.py` writes data/tinyshakespeare-char/ and -gpt2/: the path 05 and 06
    read, data_dir / f"{dataset}-{tokenizer}", holding train.bin, val.bin and meta.json; and it
    fetches the JSON files 07 and 08 read (checked against their sha256)."""
    for source in (shakespeare_path, instruction_data_path, preference_data_path):  # no download
        (tmp_path / source.name).write_bytes(source.read_bytes())
    dl02.main([f"--data_dir={tmp_path}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "instruction-data-with-preference.json", "instruction-data.json", "tinyshakespeare-char",
        "tinyshakespeare-gpt2", "tinyshakespeare.txt"]
    text = cleaned_by_hand(shakespeare_text)
    assert len(text) < len(shakespeare_text)  # there was something to clean
    split = int(len(text) * 0.9)
    for kind in ("char", "gpt2"):
        corpus = tmp_path / f"tinyshakespeare-{kind}"
        assert sorted(p.name for p in corpus.iterdir()) == ["meta.json", "train.bin", "val.bin"]
        meta = dl02.load_meta(corpus)
        assert meta["tokenizer"]["kind"] == kind
        enc = dl02.get_tokenizer(meta["tokenizer"])
        assert dl02.load_tokens(corpus, "val").tolist() == enc.encode(text[split:])
    assert dl02.load_meta(tmp_path / "tinyshakespeare-char")["train_tokens"] == split


def cleaned_by_hand(raw: str) -> str:
    """What clean_text must make of tiny Shakespeare, by plain string operations, not its regexes.

    The file is NFC, every character but the newline is printable (no \\r, control, zero-width
    or exotic space), and no paragraph of 50+ characters repeats: its only blemishes are spaces
    at line ends and runs of blank lines, which cleaning strips and shortens to one blank line."""
    assert unicodedata.is_normalized("NFC", raw)
    assert all(ch == "\n" or ch.isprintable() for ch in raw)
    long_paragraphs = [p.strip() for p in raw.split("\n\n") if len(p.strip()) >= 50]
    assert len(set(long_paragraphs)) == len(long_paragraphs)
    text = "\n".join(line.rstrip(" ") for line in raw.split("\n"))
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text


@pytest.mark.parametrize("argv,message", [
    (["--text_file=no/such.txt"], "error: --text_file=no/such.txt: no such file"),
    (["--val_fraction=0"], "error: --val_fraction=0.0; use a fraction between 0 and 1"),
    (["--val_fraction=1.5"], "error: --val_fraction=1.5; use a fraction between 0 and 1"),
    (["--tokenizers=char,bpe"], "error: --tokenizers=char,bpe; use char, gpt2 or char,gpt2"),
    (["--dataset=wikipedia"], "error: --dataset=wikipedia: the corpus we fetch is tinyshakespeare"),
    (["--block_size=0"], "error: --block_size=0, --batch_size=4, --seed=0: use sizes > 0"),
    (["--batch_size=-1"], "error: --block_size=32, --batch_size=-1, --seed=0: use sizes > 0"),
    (["--seed=-1"], "error: --block_size=32, --batch_size=4, --seed=-1: use sizes > 0, a seed"),
    (["--block_size=2000000", "--text_file={small}"],
     "error: --block_size=2000000: the train split has"),
    (["--text_file={binary}"], "error: {binary} is not UTF-8 text; give a UTF-8 text file"),
    (["--text_file={empty}", "--block_size=1"], "error: {empty} has no text left; use more text"),
    (["--text_file={junk}", "--block_size=1"],
     "error: {junk} has no text left; use more text (or --clean=false)"),
])
def test_main_user_errors_are_one_line_before_any_work(dl02, tmp_path, capsys, argv, message):
    """A user's mistake is one line naming its fix, before anything is fetched or prepared; an
    empty text (or one that cleaning empties) says so, not "use a smaller block_size"."""
    files = {"small": tmp_path / "small.txt", "binary": tmp_path / "binary.bin",
             "empty": tmp_path / "empty.txt", "junk": tmp_path / "junk.txt"}
    files["small"].write_text(SMALL_TEXT)
    files["binary"].write_bytes(bytes(range(256)))
    files["empty"].write_text("")
    files["junk"].write_text("==== ---- ====\n")  # no letters: cleaning removes it all
    data_dir = tmp_path / "data"
    message = message.format(**files)
    with pytest.raises(SystemExit) as exit_info:
        dl02.main([a.format(**files) for a in argv] + [f"--data_dir={data_dir}"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    assert captured.err.startswith(message) and captured.err.count("\n") == 1, captured.err
    assert not data_dir.exists()  # nothing downloaded, nothing prepared


@pytest.mark.parametrize("argv,message", [
    (["--text=x.txt"], "unrecognized arguments: --text=x.txt"),  # a prefix of --text_file
    (["--block=8"], "unrecognized arguments: --block=8"),  # a prefix of --block_size
    (["--block-size=8"], "unrecognized arguments: --block-size=8"),  # the old spelling
    (["--clean=maybe"], "invalid choice: 'maybe'"),
])
def test_main_rejects_abbreviations_and_bad_flags(dl02, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        dl02.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--tokenizer=char"], "unrecognized arguments: --tokenizer=char (did you mean --tokenizers?)"),
    (["--data-dir=x"], "unrecognized arguments: --data-dir=x (did you mean --data_dir?)"),
    (["--zzz=1"], "unrecognized arguments: --zzz=1 (see --help)"),
])
def test_main_suggests_the_closest_flag(dl02, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        dl02.main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_main_help_lists_each_flag_with_its_type_and_default_once(dl02, capsys):
    """--help in the style of 04-10: `--name TYPE  meaning (default: X)`, each default once."""
    with pytest.raises(SystemExit) as exit_info:
        dl02.main(["--help"])
    flat = " ".join(capsys.readouterr().out.split())  # argparse wraps long lines
    assert exit_info.value.code == 0
    assert f"] {dl02.__doc__.splitlines()[0]} options:" in flat  # the description line
    assert "--block_size int tokens per window" in flat and "--val_fraction float" in flat
    assert flat.count("(default: ") == 11  # once for each of the eleven flags
    for default in ("(default: None:", "(default: char,gpt2)", "(default: data)"):
        assert flat.count(default) == 1, default


def test_main_relative_paths_start_at_the_project_folder(dl02, tmp_path, monkeypatch, capsys):
    """--text_file and --data_dir, relative, name the same place wherever the user runs from, so
    05 finds what 02 wrote: they start at PROJECT (the script's folder; here a stand-in)."""
    assert dl02.PROJECT == Path(dl02.__file__).resolve().parent
    project = tmp_path / "project"
    project.mkdir()
    (project / "small.txt").write_text(SMALL_TEXT)
    monkeypatch.setattr(dl02, "PROJECT", project)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    dl02.main(["--text_file=small.txt", "--data_dir=prepared", "--tokenizers=char",
               "--block_size=8"])
    assert dl02.load_meta(project / "prepared" / "small-char")["train_tokens"] > 0
    assert list(elsewhere.iterdir()) == []  # nothing written where the user stands


def test_gpt2_corpus_keeps_endoftext_as_the_separator_token(dl02, tmp_path):
    """Corpora join documents with <|endoftext|>; tiktoken would refuse it unless allowed."""
    import tiktoken

    text = "First document.<|endoftext|>Second one." * 50
    dl02.prepare_corpus(text, tmp_path, {"kind": "gpt2"}, val_fraction=0.5)
    enc = tiktoken.get_encoding("gpt2")
    tokens = list(dl02.load_tokens(tmp_path, "train"))
    assert tokens == enc.encode(text[: len(text) // 2], allowed_special="all")
    assert enc.eot_token in tokens


@pytest.mark.parametrize("theirs", ["train.bin", "meta.json", "notes.txt"])
def test_main_replaces_its_own_corpus_and_refuses_a_folder_it_did_not_write(
        dl02, tmp_path, capsys, theirs):
    """Nothing is lost: a rerun replaces the corpus 02 wrote (its meta.json says so) or fills an
    empty folder, but a <dataset>-<tokenizer>/ folder holding someone else's files (a train.bin or
    a meta.json that is not 02's) is refused before any work, in one line naming it and the fix."""
    text_file = tmp_path / "mine.txt"
    text_file.write_text(SMALL_TEXT)
    data_dir = tmp_path / "data"
    (data_dir / "mine-char").mkdir(parents=True)  # empty: ours to fill
    argv = [f"--text_file={text_file}", f"--data_dir={data_dir}", "--clean=false"]
    dl02.main(argv + ["--tokenizers=char"])
    text_file.write_text(SMALL_TEXT * 2)
    dl02.main(argv)  # the rerun replaces 02's own corpus
    meta = dl02.load_meta(data_dir / "mine-char")
    assert meta["train_tokens"] + meta["val_tokens"] == len(SMALL_TEXT * 2)
    user_dir = data_dir / "mine-gpt2"
    for path in user_dir.iterdir():  # 02's gpt2 corpus gives way to someone's file
        path.unlink()
    (user_dir / theirs).write_text('{"USER": 1}')
    text_file.write_text(SMALL_TEXT * 3)  # a char corpus written again would differ
    before = {p: p.read_bytes() for p in data_dir.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exit_info:
        dl02.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {user_dir} ") and "move it away" in err
    assert {p: p.read_bytes() for p in data_dir.rglob("*") if p.is_file()} == before
    with pytest.raises(ValueError, match="move it away"):  # prepare_corpus itself refuses too
        dl02.prepare_corpus(SMALL_TEXT, user_dir, {"kind": "gpt2"})
    assert (user_dir / theirs).read_text() == '{"USER": 1}'


@pytest.mark.parametrize("where", ["data_dir", "inside", "corpus", "fetch"])
def test_main_refuses_a_file_where_a_folder_goes_before_any_work(dl02, tmp_path, capsys, where):
    """A --data_dir that is a file (or inside one), or a file named like a corpus folder, is one
    line naming it and the fix, before anything is written; not a bare [Errno 17] or [Errno 20]
    (the latter came after the char corpus was already written)."""
    text_file = tmp_path / "mine.txt"
    text_file.write_text(SMALL_TEXT)
    blocker = tmp_path / "blocker"
    blocker.write_text("USER")
    data_dir = {"data_dir": blocker, "inside": blocker / "sub", "corpus": tmp_path,
                "fetch": blocker}[where]
    argv = [f"--data_dir={data_dir}", f"--text_file={text_file}"]
    if where == "corpus":
        blocker = tmp_path / "mine-gpt2"
        blocker.write_text("USER")
    if where == "fetch":
        argv = [f"--data_dir={data_dir}", "--fetch=hellaswag"]
    with pytest.raises(SystemExit) as exit_info:
        dl02.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert "Errno" not in err and str(blocker.name) in err
    assert "give a folder" in err or "move it away" in err
    assert blocker.read_text() == "USER"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"mine.txt", "blocker",
                                                                 blocker.name})
