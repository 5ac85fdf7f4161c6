"""Tests for 01_tokenizer.py: our GPT-2 BPE against tiktoken, our fast trainer against the naive
one."""

import functools
import hashlib
import json
import random
from pathlib import Path

import pytest
import tiktoken
from conftest import exit_status, interrupted

HARD_STRINGS = [
    "",
    "Hello world",
    "hello  world   ",  # runs of spaces, trailing spaces
    "   leading, and \t tabs\t\t",
    "\n\n\n  \n\t\t x \r\n\r\n",  # runs of newlines
    "I'm you're he'll they've we'd it's DON'T 'S 'll'",  # contractions (GPT-2's are lowercase only)
    # digits, Arabic-Indic digits, superscripts, roman numeral
    "12345 3.14159 1,000,000 007 ٣٤٥ ²³ Ⅻ",
    "héllo naïve café Ünïcödé e\u0301 a\u0308",  # accents, precomposed and combining
    "日本語のテキスト、中文字符。한국어 Ελληνικά русский עברית العربية",
    "👋🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ 🤖🤖🤖",  # skin tone, ZWJ sequence, flag, variation selector
    "x=1;y+=2//3 <tag> &amp; @user #hash $100 ~/path/to/file.py",
    # nbsp, zero-width space, line separator, ideographic space, NEL
    "a\u00a0b\u200bc\u2028d\u3000e\x85f",
    "".join(map(chr, range(32))) + "\x7f \x1c\x1d a\x1e\x1f",  # control characters
    "\ud800 lone surrogate and a pair \ud83d\ude00",  # not valid UTF-8: tiktoken replaces them
    "<|endoftext <|endoftext| endoftext|> <|endoftext |>",  # almost special tokens: plain text
    "a" * 500 + " " * 100 + "\n" * 50 + "!" * 40,
    # every code point up to CJK: letters, marks, numbers, ...
    "".join(map(chr, range(0x20, 0x3000))),
    # a sample of the rest
    "".join(chr(c) for c in range(0x3000, 0x110000, 401) if not 0xD800 <= c < 0xE000),
]

# the short ones that are valid UTF-8 (no surrogates), for round trips and training
SHORT_HARD_STRINGS = [s for s in HARD_STRINGS
                      if len(s) < 1000 and not any("\ud800" <= c <= "\udfff" for c in s)]


@pytest.fixture(scope="module")
def ours(tok01, gpt2_files):
    return tok01.BPETokenizer.from_gpt2(*gpt2_files)


@pytest.fixture(scope="module")
def ref():
    return tiktoken.get_encoding("gpt2")


# -----------------------------------------------------------------------------
# GPT-2: token for token the same as tiktoken


def test_gpt2_matches_tiktoken_on_shakespeare(ours, ref, shakespeare_text):
    expected = ref.encode(shakespeare_text)
    ids = ours.encode(shakespeare_text)
    assert len(ids) == len(expected)
    assert ids == expected
    assert ours.decode(ids) == ref.decode(expected) == shakespeare_text


def test_gpt2_matches_tiktoken_on_instruction_data(ours, ref, instruction_data_path):
    entries = json.loads(instruction_data_path.read_text(encoding="utf-8"))
    fields = [value for entry in entries for value in entry.values()]
    assert len(fields) >= 3 * len(entries) > 3000
    for text in fields:
        assert ours.encode(text) == ref.encode(text), text
    everything = "\n\n".join(fields)
    assert ours.decode(ours.encode(everything)) == everything


@pytest.mark.parametrize("text", HARD_STRINGS, ids=range(len(HARD_STRINGS)))
def test_gpt2_matches_tiktoken_on_hard_strings(ours, ref, text):
    ids = ours.encode(text)
    assert ids == ref.encode(text)
    assert ours.encode_ordinary(text) == ref.encode_ordinary(text)
    assert ours.decode(ids) == ref.decode(ids)


def test_split_pattern_equals_original_gpt2_pattern(tok01, shakespeare_text):
    """We use tiktoken's possessive form of the pre-split; it must cut exactly where GPT-2's
    does."""
    import regex

    original = regex.compile(  # openai/gpt-2 src/encoder.py
        r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    ours = regex.compile(tok01.GPT2_SPLIT_PATTERN)
    for text in [shakespeare_text, *HARD_STRINGS]:
        assert ours.findall(text) == original.findall(text)
    # the last space before a word goes with the word; trailing whitespace stays whole
    assert ours.findall("a   b  \n\n c'll ") == ["a", "  ", " b", "  \n\n", " c", "'ll", " "]


def test_whole_chunk_shortcut_changes_nothing(tok01, ours):
    """Every GPT-2 token that is one pre-split chunk encodes to itself by plain BPE, so looking
    whole chunks up directly (as tiktoken does) gives the same ids as merging."""
    split = tok01.regex.compile(tok01.GPT2_SPLIT_PATTERN)
    checked = 0
    for idx, token in ours.vocab.items():
        text = token.decode("utf-8", errors="ignore")
        if idx == ours.eot_token or text.encode("utf-8") != token or split.findall(text) != [text]:
            continue
        assert ours.apply_merges([ours.byte_ids[b] for b in token]) == [idx], token
        checked += 1
    assert checked > 40_000


def test_bytes_to_unicode_is_gpt2_byte_order(tok01, gpt2_files):
    table = tok01.bytes_to_unicode()
    encoder = json.loads(gpt2_files[0].read_text(encoding="utf-8"))
    # GPT-2's ids 0..255 are the bytes, in this order
    first_256 = sorted(encoder, key=encoder.get)[:256]
    assert list(table.values()) == first_256
    assert sorted(table) == list(range(256))
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("a")] == "a"
    assert all(ch.isprintable() and not ch.isspace() for ch in table.values())


def test_gpt2_helper_and_ids(tok01, ref, gpt2_files):
    assert gpt2_files[0].parent == gpt2_files[1].parent
    tok = tok01.gpt2(gpt2_files[0].parent)
    assert tok.n_vocab == ref.n_vocab == 50257
    assert tok.eot_token == ref.eot_token == 50256
    assert tok.encode("Hello world") == [15496, 995]  # the example in tiktoken's README


# -----------------------------------------------------------------------------
# Special tokens


SPECIAL_TEXTS = ["<|endoftext|>", "a<|endoftext|>b", "<|endoftext|><|endoftext|> x\n<|endoftext|>"]


@pytest.mark.parametrize("text", SPECIAL_TEXTS)
@pytest.mark.parametrize("allowed", ["all", {"<|endoftext|>"}])
def test_allowed_special_matches_tiktoken(ours, ref, text, allowed):
    ids = ours.encode(text, allowed_special=allowed)
    assert ids == ref.encode(text, allowed_special=allowed)
    assert 50256 in ids
    assert ours.decode(ids) == text


@pytest.mark.parametrize("allowed", ["none_raise", set()])
def test_disallowed_special_raises_like_tiktoken(ours, ref, allowed):
    text = "the end.<|endoftext|>"
    with pytest.raises(ValueError) as expected:
        ref.encode(text) if allowed == "none_raise" else ref.encode(text, allowed_special=allowed)
    with pytest.raises(ValueError) as got:
        ours.encode(text, allowed_special=allowed)
    first_line = "Encountered text corresponding to disallowed special token '<|endoftext|>'."
    assert str(expected.value).startswith(first_line) and str(got.value).startswith(first_line)
    expected = ref.encode(text, disallowed_special=())
    assert ours.encode_ordinary(text) == ref.encode_ordinary(text) == expected


@pytest.mark.parametrize("allowed", ["none", {"<|fim|>"}, ["<|endoftext|>"]])
def test_bad_allowed_special_raises(ours, allowed):
    with pytest.raises(ValueError, match="allowed_special|unknown special"):
        ours.encode("hi", allowed_special=allowed)


# -----------------------------------------------------------------------------
# Decoding


# a byte that never occurs in UTF-8, a lone continuation byte, truncated 3- and 4-byte characters,
# a lead byte followed by a non-continuation byte
@pytest.mark.parametrize("byte_values",
                         [[0xFF], [0x80], [0xE2, 0x82], [0xF0, 0x9F, 0x98], [0xC3, 0x28]])
def test_decode_invalid_utf8_like_tiktoken(ours, ref, byte_values):
    ids = [ours.byte_ids[b] for b in byte_values]
    assert ref.decode_bytes(ids) == bytes(byte_values)  # the ids are the right ones for these bytes
    assert "\ufffd" in ours.decode(ids)
    assert ours.decode(ids) == ref.decode(ids)


def test_decode_random_ids_like_tiktoken(ours, ref):
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(ours.n_vocab) for _ in range(rng.randrange(1, 400))]
        assert ours.decode(ids) == ref.decode(ids)
        assert ours.decode_bytes(ids) == ref.decode_bytes(ids)


@pytest.mark.parametrize("bad_id", [50257, -1, 10**9])
def test_decode_unknown_id_raises(ours, bad_id):
    with pytest.raises(ValueError, match=f"token id {bad_id} is not in the vocabulary"):
        ours.decode([15496, bad_id, 995])


# -----------------------------------------------------------------------------
# Training: the fast trainer must learn exactly what the naive one learns


def test_trainers_on_hand_computed_example(tok01):
    """Wikipedia's example, as one chunk: "aaabdaaabac".
    Counts: (a,a) 4 (overlapping), (a,b) 2 -> merge (a,a) -> 256: [256 a b d 256 a b a c];
    then (256,a) and (a,b) tie at 2 -> the smaller pair (a,b) -> 257: [256 257 d 256 257 a c];
    then (256,257) 2 -> 258: [258 d 258 a c]. Four more merges (all counts 1) leave one token."""
    a, b = ord("a"), ord("b")
    expected = {(a, a): 256, (a, b): 257, (256, 257): 258}
    for train in (tok01.train_bpe_naive, tok01.train_bpe):
        assert train("aaabdaaabac", 3, pattern=r"(?s).+") == expected
        assert len(train("aaabdaaabac", 7, pattern=r"(?s).+")) == 7
        with pytest.raises(ValueError, match="no pair left to merge after 7 merges"):
            train("aaabdaaabac", 10, pattern=r"(?s).+")


@pytest.mark.parametrize("text", ["", "a", "a!"])  # empty, one byte, one-byte chunks
def test_a_text_without_pairs_asks_for_more_text(tok01, text, tmp_path, capsys):
    """A text with no pair to merge at all gets "use more text", not a vocab_size to lower: even
    the smallest one the command line takes (258) needs a merge."""
    for train in (tok01.train_bpe_naive, tok01.train_bpe):
        with pytest.raises(ValueError, match="the text is empty or has no pair") as error:
            train(text, 1)
        assert "vocab_size" not in str(error.value)
    (tmp_path / "text.txt").write_text(text)
    argv = [f"--train={tmp_path / 'text.txt'}", "--vocab_size=258", f"--out={tmp_path / 'b.json'}"]
    assert exit_status(tok01.main, argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: the text is empty") and captured.out == ""
    assert list(tmp_path.iterdir()) == [tmp_path / "text.txt"]  # nothing written


OVERLAPS = "aaaa aaaaa aa baaab abab ababab bbbb 🙂🙂🙂 日本日本日本 '\n\n" * 4 + "zzzzzzzzzz aaa"


@pytest.mark.parametrize("which, n_merges",
                         [("shakespeare", 200), ("overlaps", 34), ("unicode", 120)])
def test_fast_trainer_equals_naive(tok01, shakespeare_text, which, n_merges):
    text = {"shakespeare": shakespeare_text[:4000], "overlaps": OVERLAPS,
            "unicode": "\n".join(SHORT_HARD_STRINGS) * 2}[which]
    naive = tok01.train_bpe_naive(text, n_merges)
    fast = tok01.train_bpe(text, n_merges)
    assert list(fast.items()) == list(naive.items())  # same pairs, same ids, same order


def test_encode_equals_merging_in_training_order(tok01, shakespeare_text):
    """After training, encode must reproduce what the naive trainer did to its corpus: apply
    merge 0 everywhere, then merge 1, ... (our encoder instead merges by priority, chunk by
    chunk)."""
    text = shakespeare_text[:3000]
    tok = tok01.BPETokenizer.train(text, 400)
    texts = tok01.regex.findall(tok01.GPT2_SPLIT_PATTERN, text)
    chunks = [list(chunk.encode("utf-8")) for chunk in texts]
    for pair, idx in tok.merges.items():
        chunks = [tok01.merge(ids, pair, idx) for ids in chunks]
    assert tok.encode(text) == [i for ids in chunks for i in ids]


def test_train_save_load_round_trip(tok01, shakespeare_text, tmp_path):
    text = shakespeare_text[:20_000]
    tok = tok01.BPETokenizer.train(text, 512)
    assert tok.n_vocab == 512 and tok.eot_token == 511 and len(tok.merges) == 255
    path = tok.save(tmp_path / "bpe.json")
    # readable: tokens as text, merges as [a, b, new]
    data = json.loads(path.read_text(encoding="utf-8"))
    a, b, new = data["merges"][0]
    assert new == 256 and data["vocab"][str(a)] + data["vocab"][str(b)] == data["vocab"]["256"]
    assert data["vocab"]["32"] == "Ġ" and data["special_tokens"] == {"<|endoftext|>": 511}
    loaded = tok01.BPETokenizer.load(path)
    assert loaded.merges == tok.merges and loaded.special_tokens == tok.special_tokens
    assert loaded.vocab == tok.vocab
    hard = "\n".join(SHORT_HARD_STRINGS)
    sample = shakespeare_text[50_000:52_000] + "\n" + hard + "<|endoftext|>"
    ids = tok.encode(sample, allowed_special="all")
    assert loaded.encode(sample, allowed_special="all") == ids
    assert ids[-1] == 511 and max(ids[:-1]) < 511
    assert loaded.decode(ids) == sample
    assert len(ids) < 0.8 * len(sample.encode("utf-8"))  # the merges compress


def test_trained_tokenizer_round_trips_unseen_text(tok01, shakespeare_text):
    tok = tok01.BPETokenizer.train(shakespeare_text[:10_000], 300)
    for text in SHORT_HARD_STRINGS:  # bytes never seen in training still encode (byte-level BPE)
        assert tok.decode(tok.encode(text)) == text


def test_gpt2_save_load_round_trip(tok01, ours, ref, tmp_path):
    loaded = tok01.BPETokenizer.load(ours.save(tmp_path / "gpt2.json"))
    text = "\n".join(SHORT_HARD_STRINGS)
    assert loaded.encode(text) == ref.encode(text)
    assert loaded.byte_ids == ours.byte_ids and loaded.n_vocab == 50257


def test_bad_training_and_loading_input(tok01, tmp_path):
    with pytest.raises(ValueError, match="vocab_size must be at least 257"):
        tok01.BPETokenizer.train("hello", 256)
    path = tmp_path / "chars.json"
    path.write_text(json.dumps({"kind": "char", "chars": "ab"}))
    with pytest.raises(ValueError, match="not a BPETokenizer file"):
        tok01.BPETokenizer.load(path)
    with pytest.raises(ValueError, match="missing or not a BPETokenizer file"):
        tok01.BPETokenizer.load(tmp_path / "no_such.json")
    with pytest.raises(ValueError, match="token ids must be"):
        tok01.BPETokenizer({(97, 98): 300})


def test_load_refuses_json_that_save_did_not_write(tok01, tmp_path, capsys):
    """JSON of another shape than save()'s (a key missing, a field of the wrong type, not an object)
    is one ValueError naming the file and how to write one, not a KeyError from deep in load; and
    --decode with it as --tokenizer is one line, exit status 2."""
    path = tok01.BPETokenizer.train("to be or not to be", 260).save(tmp_path / "bpe.json")
    saved = json.loads(path.read_text(encoding="utf-8"))
    tok01.BPETokenizer.load(path)  # the file save() wrote loads: each change below breaks it
    broken = [{key: value for key, value in saved.items() if key != drop} for drop in saved]
    broken += [{**saved, "vocab": []}, {**saved, "vocab": {"0": "x"}}, {**saved, "merges": [[1]]},
               {**saved, "special_tokens": ["<|endoftext|>"]}, {**saved, "pattern": "("},
               {**saved, "pattern": 1}, [saved], "bpe", None]
    for data in broken:
        path.write_text(json.dumps(data), encoding="utf-8")
        with pytest.raises(ValueError, match="not a BPETokenizer file"):
            tok01.BPETokenizer.load(path)
        assert exit_status(tok01.main, ["--decode", "1", f"--tokenizer={path}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path} ") and "--train" in err and err.count("\n") == 1


def test_chunk_cache_stays_correct_when_full(tok01, ours, ref):
    tok = tok01.BPETokenizer(ours.merges, ours.special_tokens, ours.byte_ids)
    # a tiny cache: chunks are evicted all the time
    tok._cache = functools.lru_cache(maxsize=3)(tok._bpe)
    text = "\n".join(SHORT_HARD_STRINGS)
    assert tok.encode(text) == ref.encode(text)
    info = tok._cache.cache_info()
    assert info.currsize <= 3 and info.misses > 3


# -----------------------------------------------------------------------------
# CharTokenizer, get_tokenizer, download, CLI


def test_char_tokenizer_hand_example_and_errors(tok01):
    tok = tok01.CharTokenizer.from_text("hello")
    assert tok.chars == "ehlo" and tok.n_vocab == 4 and tok.eot_token is None
    assert tok.encode("hole") == [1, 3, 2, 0]
    assert tok.decode([1, 3, 2, 0]) == "hole"
    with pytest.raises(ValueError, match="'z' is not in the vocabulary"):
        tok.encode("hez")
    with pytest.raises(ValueError, match="token id 4 is not in the vocabulary"):
        tok.decode([0, 4])
    with pytest.raises(ValueError, match="repeated"):
        tok01.CharTokenizer("abca")


def test_char_tokenizer_round_trip(tok01, shakespeare_text):
    tok = tok01.CharTokenizer.from_text(shakespeare_text)
    assert tok.n_vocab == 65
    ids = tok.encode(shakespeare_text[:5000])
    assert tok.decode(ids) == shakespeare_text[:5000]
    again = tok01.get_tokenizer(tok.to_dict())
    assert again.to_dict() == {"kind": "char", "chars": tok.chars}
    assert again.encode("Hello") == tok.encode("Hello")


def test_get_tokenizer_kinds(tok01, ours, ref):
    gpt2 = tok01.get_tokenizer({"kind": "gpt2"})
    text = "Hello world, it's 2024!"
    assert gpt2.encode(text) == ours.encode(text) == ref.encode(text)
    assert gpt2.n_vocab == 50257 and gpt2.eot_token == 50256
    for spec in [{"kind": "bpe"}, {}]:
        with pytest.raises(ValueError, match="unknown tokenizer kind"):
            tok01.get_tokenizer(spec)


def test_download_existing_file_and_failure(tok01, tmp_path):
    path = tmp_path / "file.txt"
    path.write_bytes(b"hello")
    sha = hashlib.sha256(b"hello").hexdigest()
    unreachable = "http://127.0.0.1:9/file.txt"  # port 9 (discard): connection refused at once
    assert tok01.download(unreachable, path, sha) == path  # right hash already there: no network
    with pytest.raises(RuntimeError, match="127.0.0.1:9"):
        tok01.download(unreachable, tmp_path / "new.txt", sha)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # nothing half-written


def test_download_without_a_hash(tok01, tmp_path):
    """sha256=None (Hugging Face's weights have no pinned hash): a file that is there is complete,
    because a download only gets its name once it has finished; a missing one is fetched."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"weights")
    unreachable = "http://127.0.0.1:9/model.safetensors"
    assert tok01.download(unreachable, path) == path and path.read_bytes() == b"weights"
    assert tok01.download(unreachable, path, sha256=None, timeout=5) == path
    with pytest.raises(RuntimeError, match="127.0.0.1:9.*by hand"):
        tok01.download(unreachable, tmp_path / "other.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_download_shows_progress_for_big_files(tok01, tmp_path, monkeypatch, capsys):
    """Over 16 MB, each 1 MB block rewrites one line (MB done, rate, time left); the last block
    ends it. The server is faked: a response that streams 17 MB."""
    payload = bytes(range(256)) * (17 * 4096)

    class Response:
        headers = {"content-length": str(len(payload))}

        def __enter__(self):
            return self

        def __exit__(self, *args):
            return False

        def raise_for_status(self):
            pass

        def iter_content(self, chunk_size):
            for start in range(0, len(payload), chunk_size):
                yield payload[start:start + chunk_size]

    monkeypatch.setattr(tok01.requests, "get", lambda url, **kwargs: Response())
    sha = hashlib.sha256(payload).hexdigest()
    path = tok01.download("http://127.0.0.1:9/big.bin", tmp_path / "big.bin", sha)
    assert path.read_bytes() == payload
    reports = capsys.readouterr().out.split("\r")
    assert reports[0] == ""  # each report starts with "\r": back to the start of the line
    assert len(reports) == 1 + 17  # one per block
    assert reports[1].startswith("big.bin: 1/17 MB, ") and " MB/s, ~" in reports[1]
    assert all(report.endswith(" s left ") for report in reports[1:-1])  # no newline yet
    assert reports[-1].startswith("big.bin: 17/17 MB, ") and reports[-1].endswith("~0 s left \n")


def test_cli_train_encode_decode(tok01, shakespeare_text, tmp_path, capsys):
    text_file, out = tmp_path / "text.txt", tmp_path / "bpe.json"
    text_file.write_text(shakespeare_text[:20_000], encoding="utf-8")
    tok01.main([f"--train={text_file}", "--vocab_size=300", f"--out={out}"])
    tok = tok01.BPETokenizer.load(out)
    assert tok.n_vocab == 300
    assert "43 merges in" in capsys.readouterr().out
    tok01.main([f"--tokenizer={out}", "--encode=To be, or not"])
    printed = capsys.readouterr().out.splitlines()[0]
    assert json.loads(printed) == tok.encode("To be, or not")
    tok01.main([f"--tokenizer={out}", "--decode", *map(str, tok.encode("To be, or not"))])
    assert capsys.readouterr().out == "To be, or not\n"
    tok01.main([f"--tokenizer={out}", "--allowed_special=all", "--encode=end<|endoftext|>"])
    assert json.loads(capsys.readouterr().out.splitlines()[0])[-1] == 299


def test_cli_help_lists_each_flag_with_its_type_and_default_once(tok01, capsys):
    """--help in the style of 04-10: `--name TYPE  meaning (default: X)`, each default once."""
    with pytest.raises(SystemExit) as exit_info:
        tok01.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    flat = " ".join(out.split())  # argparse wraps long lines
    assert f"] {tok01.__doc__.splitlines()[0]} options:" in flat  # the description line
    assert "--vocab_size int tokens in all" in flat and "--naive_chars int" in flat
    for default in ("(default: 1024)", "(default: out/bpe.json)", "(default: gpt2)"):
        assert flat.count(default) == 1, default


def test_cli_relative_paths_start_at_the_project_folder(tok01, shakespeare_text, tmp_path,
                                                        monkeypatch, capsys):
    """--train=FILE and --out=FILE, relative, mean the same file wherever the user runs from: they
    start at PROJECT (the script's folder; here a stand-in), never at the current folder."""
    assert tok01.PROJECT == Path(tok01.__file__).resolve().parent
    project = tmp_path / "project"
    project.mkdir()
    (project / "text.txt").write_text(shakespeare_text[:5_000], encoding="utf-8")
    monkeypatch.setattr(tok01, "PROJECT", project)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    tok01.main(["--train=text.txt", "--vocab_size=260", "--out=out/bpe.json"])
    assert tok01.BPETokenizer.load(project / "out" / "bpe.json").n_vocab == 260
    assert list(elsewhere.iterdir()) == []  # nothing written where the user stands


def test_cli_train_replaces_only_a_tokenizer_it_wrote(tok01, shakespeare_text, tmp_path, capsys):
    """An existing --out is written over only if it is a tokenizer 01 wrote (a rerun replaces its
    own output); any other file (the user's JSON, text, another stage's file) is refused in one
    line before training, and kept byte for byte."""
    text_file, out = tmp_path / "text.txt", tmp_path / "bpe.json"
    text_file.write_text(shakespeare_text[:5_000], encoding="utf-8")
    for vocab_size in (260, 270):  # the second run replaces the first one's file
        tok01.main([f"--train={text_file}", f"--vocab_size={vocab_size}", f"--out={out}"])
        assert tok01.BPETokenizer.load(out).n_vocab == vocab_size
    capsys.readouterr()
    theirs = {"mine.json": '{"hello": 1}\n', "notes.txt": "my notes\n",
              "meta.json": json.dumps({"kind": "char", "chars": "ab"})}
    for name, content in theirs.items():
        (tmp_path / name).write_text(content)
        argv = [f"--train={text_file}", "--vocab_size=260", f"--out={tmp_path / name}"]
        assert exit_status(tok01.main, argv) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith(f"error: --out={tmp_path / name} is not a file 01 wrote")
        assert captured.err.count("\n") == 1 and captured.out == ""  # before training
        assert (tmp_path / name).read_text() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["text.txt", "bpe.json", *theirs])


def test_cli_out_naming_a_folder_is_refused_before_training(tok01, tmp_path, monkeypatch, capsys):
    """--out=out/ (a folder, there or not) is one line before training that names a file to give
    instead, and that file works; save() to a folder raises and leaves no .tmp behind."""
    monkeypatch.setattr(tok01, "PROJECT", tmp_path)
    (tmp_path / "text.txt").write_text("some text to learn from")
    (tmp_path / "models").mkdir()
    for folder in ("out/", "models", "models/"):
        assert exit_status(tok01.main, ["--train=text.txt", f"--out={folder}"]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith(f"error: --out={folder} is a folder: name a file, e.g. ")
        assert captured.err.count("\n") == 1 and captured.out == ""  # before training
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "text.txt"]
    suggested = captured.err.split("e.g. ")[1].strip()  # the fix it names
    tok01.main(["--train=text.txt", "--vocab_size=258", suggested])
    tok = tok01.BPETokenizer.load(tmp_path / "models" / "bpe.json")
    with pytest.raises(OSError):
        tok.save(tmp_path / "models")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "text.txt"]


def test_cli_out_inside_a_file_is_refused_before_training(tok01, tmp_path, monkeypatch, capsys):
    """--out under a file (text.txt/bpe.json: save() cannot make a folder where a file is) is one
    line naming --out and the file in the way, before training; the file is kept as it was."""
    monkeypatch.setattr(tok01, "PROJECT", tmp_path)
    monkeypatch.setattr(tok01.BPETokenizer, "train", interrupted)  # reached: exit 130, not 2
    (tmp_path / "text.txt").write_text("some text to learn from")
    for out in ("text.txt/bpe.json", "text.txt/more/bpe.json"):
        assert exit_status(tok01.main, ["--train=text.txt", f"--out={out}"]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith(f"error: --out={out} ") and captured.out == ""
        assert f"{tmp_path / 'text.txt'}: name a file in a folder" in captured.err
        assert captured.err.count("\n") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["text.txt"]
    assert (tmp_path / "text.txt").read_text() == "some text to learn from"


@pytest.mark.parametrize("argv", [
    ["--train=any.txt", "--vocab=300"],  # prefix of --vocab_size
    ["--train=any.txt", "--vocab-size=300"],  # the old spelling
    ["--encode=hi", "--allowed=all"],  # prefix of --allowed_special
    ["--bench", "--naive=1000"],  # prefix of --naive_chars
])
def test_cli_rejects_abbreviations_and_dashes(tok01, capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        tok01.main(argv)
    assert exit_info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_cli_ctrl_c_is_one_line_and_exit_130(tok01, monkeypatch, capsys):
    monkeypatch.setattr(tok01, "run", interrupted)
    assert exit_status(tok01.main, ["--bench"]) == 130
    assert capsys.readouterr().err.strip() == "Ctrl-C: stopped"


@pytest.mark.parametrize("argv,message", [
    (["--encode=hi", "--tokenizr=gpt2"],
     "error: unrecognized arguments: --tokenizr=gpt2 (did you mean --tokenizer?)"),
    (["--encdoe=hi"], "error: unrecognized arguments: --encdoe=hi (did you mean --encode?)"),
    (["--bench", "--naive-chars=10"],
     "error: unrecognized arguments: --naive-chars=10 (did you mean --naive_chars?)"),
    (["--bench", "--zzz=1"], "error: unrecognized arguments: --zzz=1 (see --help)"),
])
def test_cli_suggests_the_closest_flag(tok01, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        tok01.main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == message + "\n"


@pytest.mark.parametrize("argv,message", [
    (["--train=no/such/file.txt"], "error: --train=no/such/file.txt: no UTF-8 text file at "),
    (["--train={binary}"], "error: --train={binary}: no UTF-8 text file at {binary}"),
    (["--train=any.txt", "--vocab_size=100"], "error: --vocab_size=100; use at least 258"),
    (["--bench", "--vocab_size=257"], "error: --vocab_size=257; use at least 258"),  # 0 merges
    (["--train={text}", "--out={text}"], "error: --out={text} is not a file 01 wrote"),
    (["--bench", "--naive_chars=0"], "error: --naive_chars=0; use a positive count"),
    (["--encode=the end<|endoftext|>"],
     "error: --encode's text holds <|endoftext|>; --allowed_special=all: one token"),
    (["--encode=hi", "--tokenizer=no/such.json"], "error: "),
    (["--encode=hi", "--tokenizer=README.md"], "error: "),
    (["--encode=hi", "--decode", "1"], "error: argument --decode: not allowed with argument"),
    (["--decode", "1", "x"], "error: argument --decode: invalid int value: 'x'"),
    ([], "error: say what to do: --train=FILE, --encode=TEXT, --decode IDS or --bench"),
])
def test_cli_user_errors_are_one_line_and_exit_2(tok01, capsys, tmp_path, argv, message):
    """A user's mistake gets one line saying what to do, status 2, no traceback, before any work."""
    binary = tmp_path / "binary.bin"
    binary.write_bytes(bytes(range(256)))  # not UTF-8
    text = tmp_path / "text.txt"  # the user's: never written over
    text.write_text("some text to learn from")
    argv = [a.format(binary=binary, text=text) for a in argv]
    message = message.format(binary=binary, text=text)
    with pytest.raises(SystemExit) as exit_info:
        tok01.main(argv)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    assert captured.err.startswith(message) and captured.err.count("\n") == 1, captured.err
    if argv and "--tokenizer=" in argv[-1]:  # the file, and how to make one
        assert argv[-1].split("=")[1] in captured.err and "--train" in captured.err
    assert captured.out == ""  # nothing ran
    assert text.read_text() == "some text to learn from"


def test_merge_logger_reports_progress(tok01, capsys):
    log = tok01.merge_logger(10, every=5)
    for i in range(10):
        log(i, (97, 98), 256 + i, 1000 - i)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("  merge 5/10: (97, 98) -> 260 (996 occurrences); ")
    assert lines[0].endswith("s left") and "merges/s" in lines[0]
    assert lines[1].startswith("  merge 10/10:") and lines[1].endswith("~0 s left")


def test_bench_compares_the_trainers(tok01, shakespeare_path, capsys):
    """The lesson in numbers: the naive and the incremental trainer learn the same merges, and a
    run longer than a few seconds shows progress (here: every 100 merges)."""
    tok01.main(["--bench", "--vocab_size=457", "--naive_chars=3000"])
    out = capsys.readouterr().out
    assert "naive trainer (recount), 200 merges on the first 3,000 characters:" in out
    assert "  merge 100/200: " in out and "  merge 200/200: " in out
    trainers = ("naive (recount)", "ours")
    rows = [line.split() for line in out.splitlines() if line.startswith(trainers)]
    assert [row[-4] for row in rows] == ["3,000", "3,000", f"{shakespeare_path.stat().st_size:,}"]
    assert "same merges as the naive trainer: True" in out
