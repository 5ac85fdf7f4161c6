"""Tests for 09_generate.py: the KV cache against the model's own forward, sampling filters against
sets computed here from the logits, batching against one prompt at a time, the full-context rule
against a plain re-implementation of its docstring, stopping, streaming, and the command line's
messages."""

import dataclasses
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, count_device_reads, exit_status, interrupted, roughen

VOCAB = 48


def rough_model(gen09, block_size=128, vocab_size=VOCAB, seed=0):
    """A tiny GPT with large random weights: GPT-2's init (std 0.02) gives near-uniform logits and
    greedy decoding that repeats one token; std 0.3 gives varied, confident predictions, so a broken
    cache changes the tokens, not just the fourth decimal."""
    torch.manual_seed(seed)
    config = gen09.GPTConfig(
        block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32
    )
    model = gen09.GPT(config)
    return roughen(model)


def reference_greedy(model, prompt, n_new):
    """Greedy decoding with the GPT's own forward over the whole context at every step, following
    the full-context rule of generate_tokens' docstring (crop a long prompt to block_size; when the
    context outgrows block_size, keep its last block_size // 2 tokens). Returns (tokens, logits)."""
    block_size = model.config.block_size
    keep = block_size // 2
    context, tokens, all_logits = list(prompt[-block_size:]), [], []
    with torch.no_grad():
        for _ in range(n_new):
            logits = model(torch.tensor([context]))[0][0, -1]  # (V,)
            token = int(logits.argmax())
            tokens.append(token)
            all_logits.append(logits)
            context.append(token)
            if len(context) > block_size:
                context = context[-keep:]
    return tokens, torch.stack(all_logits)


def run_steps(gen09, model, prompts, n_new, use_cache=True, **sampling):
    """n_new steps of generate_tokens: (tokens (B, n_new), logits (B, n_new, V))."""
    sampling.setdefault("temperature", 0)
    steps = gen09.generate_tokens(model, prompts, use_cache=use_cache, **sampling)
    pairs = [step for _, step in zip(range(n_new), steps)]
    return torch.stack([t for t, _ in pairs], dim=1), torch.stack([lg for _, lg in pairs], dim=1)


# -----------------------------------------------------------------------------
# The KV cache


def test_a_batch_reads_the_device_once_per_new_token(gen09, monkeypatch):
    """One sync per step for the whole batch (the new ids, for the stops), plus one for the
    prompt's padding: on a GPU each read makes the CPU wait."""
    model = rough_model(gen09, block_size=64).eval()
    reads = count_device_reads(monkeypatch, gen09.__file__)
    out = gen09.generate(model, [[1, 2, 3], [4, 5]], 12, temperature=0, eot_token=VOCAB)
    assert [len(row) for row in out] == [12, 12]  # VOCAB: an id never drawn, so no early stop
    assert 12 <= len(reads) <= 12 + 1  # at least one per step: the count sees 09's reads


def test_final_hidden_is_the_model_without_its_head_with_or_without_a_cache(gen09):
    model = rough_model(gen09, block_size=16, vocab_size=32).eval()
    idx = torch.randint(32, (2, 11))
    with torch.no_grad():
        expected = model(idx)[0]  # (B, T, vocab)
        got = model.lm_head(gen09.final_hidden(model, idx))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        cache = gen09.KVCache(model.config.n_layer, 16)
        pieces = []
        for start, end in [(0, 4), (4, 5), (5, 6), (6, 11)]:  # a prompt, two tokens, then a chunk
            pieces.append(gen09.final_hidden(model, idx[:, start:end], cache=cache))
            assert cache.length == end
        got = model.lm_head(torch.cat(pieces, dim=1))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_forward_cached_matches_model_forward_chunk_by_chunk(gen09):
    """Prefill, single tokens, then a multi-token chunk on top of the cache: every position's logits
    equal the GPT's own forward over the whole sequence."""
    model = rough_model(gen09, block_size=32)
    idx = torch.randint(VOCAB, (2, 30))
    expected, _ = model(idx)  # (2, 30, V)
    cache = gen09.BatchCache(model.config.n_layer, model.config.block_size)
    pieces, start = [], 0
    for size in (7, 1, 1, 5, 1, 15):  # chunks with t0 > 0 and T > 1 need the explicit causal mask
        pieces.append(gen09.forward_cached(model, idx[:, start : start + size], cache))
        start += size
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gen09.forward_cached(model, idx), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="exceed the context"):
        gen09.forward_cached(model, idx[:, :3], cache)  # 30 + 3 > 32


def test_greedy_with_cache_equals_without_over_100_tokens(gen09):
    model = rough_model(gen09, block_size=128)
    prompt = torch.randint(VOCAB, (8,)).tolist()
    ref_tokens, ref_logits = reference_greedy(model, prompt, 110)
    assert len(set(ref_tokens)) > 10, "the test model should not repeat one token"
    for use_cache in (True, False):
        tokens, logits = run_steps(gen09, model, [prompt], 110, use_cache=use_cache)
        assert tokens[0].tolist() == ref_tokens
        torch.testing.assert_close(logits[0], ref_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [64, 16])  # 16: the batch fills the context and slides
def test_batched_left_padding_equals_one_prompt_at_a_time(gen09, block_size):
    model = rough_model(gen09, block_size=block_size)
    prompts = [torch.randint(VOCAB, (n,)).tolist() for n in (3, 11, 6, 1)]
    tokens, logits = run_steps(gen09, model, prompts, 25)
    for row, prompt in enumerate(prompts):
        alone_tokens, alone_logits = run_steps(gen09, model, [prompt], 25)
        assert tokens[row].tolist() == alone_tokens[0].tolist()
        torch.testing.assert_close(logits[row], alone_logits[0], atol=1e-5, rtol=1e-5)
        ref_tokens, _ = reference_greedy(model, prompt, 25)  # and the unpadded forward agrees
        assert tokens[row].tolist() == ref_tokens
    uncached_tokens, _ = run_steps(gen09, model, prompts, 25, use_cache=False)
    assert uncached_tokens.tolist() == tokens.tolist()


@pytest.mark.parametrize("prompt_len", [5, 40])  # fits, and longer than the context (16)
def test_full_context_slides_as_documented(gen09, prompt_len):
    """block_size 16: 40 new tokens slide the window several times; a 40-token prompt is cropped."""
    model = rough_model(gen09, block_size=16)
    prompt = torch.randint(VOCAB, (prompt_len,)).tolist()
    ref_tokens, ref_logits = reference_greedy(model, prompt, 40)
    for use_cache in (True, False):
        tokens, logits = run_steps(gen09, model, [prompt], 40, use_cache=use_cache)
        assert tokens[0].tolist() == ref_tokens
        torch.testing.assert_close(logits[0], ref_logits, atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# Sampling


def allowed_set(logits_row, top_k=None, top_p=None):
    """The tokens top-k / top-p may emit, computed by hand from one row of logits (in float64)."""
    order = sorted(range(len(logits_row)), key=lambda i: -logits_row[i])
    if top_k is not None:
        order = order[:top_k]
    # top-p acts on the distribution left after top-k: renormalise over the survivors
    z = [math.exp(logits_row[i] - logits_row[order[0]]) for i in order]
    probs = [p / sum(z) for p in z]
    kept, mass = [], 0.0
    for i, p in zip(order, probs):
        if top_p is not None and mass >= top_p:
            break
        kept.append(i)
        mass += p
    return set(kept)


@pytest.mark.parametrize(
    "top_k, top_p", [(5, None), (None, 0.5), (None, 0.9), (10, 0.7), (1, None)]
)
def test_top_k_top_p_never_leave_the_allowed_set(gen09, top_k, top_p):
    torch.manual_seed(1)
    logits = torch.randn(3, 50) * 2
    generator = torch.Generator().manual_seed(0)
    for row in range(3):
        allowed = allowed_set(logits[row].double().tolist(), top_k, top_p)
        draws = gen09.sample(logits[row].expand(4000, -1), 1.0, top_k, top_p, generator)
        seen = set(draws.tolist())
        assert seen <= allowed, f"emitted {seen - allowed} outside {allowed}"
        assert seen == allowed or len(allowed) > 20  # many draws reach every allowed token


def test_temperature_to_zero_equals_greedy(gen09):
    logits = torch.randn(64, VOCAB) * 3
    generator = torch.Generator().manual_seed(0)
    assert gen09.sample(logits, 1e-6, generator=generator).tolist() == logits.argmax(-1).tolist()
    # far tinier: logits / temperature would overflow to inf, and inf - inf is NaN (token 0)
    for temperature, top_p in [(1e-39, None), (1.0, 1e-300), (1e-39, 1e-300)]:
        drawn = gen09.sample(logits, temperature, top_p=top_p, generator=generator)
        assert drawn.tolist() == logits.argmax(-1).tolist(), (temperature, top_p)
    model = rough_model(gen09, block_size=64)
    prompt = torch.randint(VOCAB, (4,)).tolist()
    greedy, _ = run_steps(gen09, model, [prompt], 30, temperature=0)
    cold, _ = run_steps(gen09, model, [prompt], 30, temperature=1e-6, generator=generator)
    assert cold.tolist() == greedy.tolist()


def test_seed_makes_sampling_reproducible(gen09):
    model = rough_model(gen09, block_size=64)
    generators = [torch.Generator().manual_seed(seed) for seed in (7, 7, 8)]
    runs = []
    for generator in generators:
        tokens, _ = run_steps(gen09, model, [[1, 2, 3]], 20, temperature=1.0, generator=generator)
        runs.append(tokens)
    assert runs[0].tolist() == runs[1].tolist() != runs[2].tolist()


@pytest.mark.parametrize(
    "bad", [dict(temperature=-1.0), dict(temperature=float("nan")), dict(top_k=0), dict(top_p=0.0),
            dict(top_p=1.5)]
)
def test_bad_sampling_settings_raise(gen09, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        gen09.sample(torch.randn(1, 5), **{"temperature": 1.0, **bad})


# -----------------------------------------------------------------------------
# Stopping and streaming


def test_stops_at_the_eot_token(gen09):
    """Take the token greedy decoding emits at step 6 and call it "end of text": generation must
    stop right before its first occurrence (and the other row of the batch must go on
    unaffected)."""
    model = rough_model(gen09, block_size=64)
    prompts = [torch.randint(VOCAB, (5,)).tolist(), torch.randint(VOCAB, (9,)).tolist()]
    free = gen09.generate(model, prompts, 40, temperature=0)
    eot = free[0][6]
    stopped = gen09.generate(model, prompts, 40, temperature=0, eot_token=eot)
    for row in range(2):
        expected = free[row][: free[row].index(eot)] if eot in free[row] else free[row]
        assert stopped[row] == expected
    assert len(stopped[0]) <= 6


def test_stops_at_a_stop_string_and_streams_only_text_before_it(gen09):
    chars = "abcdefghijklmnopqrstuvwxyz ,.!?\nABCDEFGHIJ"
    model = rough_model(gen09, block_size=64, vocab_size=len(chars))
    tok = gen09.CharTokenizer(chars)
    prompt = tok.encode("hello")
    full = tok.decode(gen09.generate(model, [prompt], 60, temperature=0)[0])
    stop = full[20:23]  # a 3-character string the model does write
    chunks = []
    stream = gen09.TextStream(tok, [stop, "never appears"], on_text=chunks.append)
    gen09.generate(model, [prompt], 60, temperature=0, streams=[stream])
    expected = full[: full.index(stop)]
    assert stream.stopped and stream.text == expected
    assert "".join(chunks) == expected  # nothing of the stop string was ever shown


def test_stream_shows_whole_characters_only(gen09):
    """GPT-2's byte-level BPE splits 'é', '👋' and '世界' across tokens; decoding token by token
    must never show a broken character, and the pieces must add up to tiktoken's decoding."""
    tok = gen09.get_tokenizer({"kind": "gpt2"})
    text = "Héllo 👋 世界, naïve café!"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids), "the example should split a character"
    stream = gen09.TextStream(tok)
    chunks = [stream.add(i) for i in ids] + [stream.finish()]
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) == tok.decode(ids) == text


def test_stream_holds_back_a_possible_stop_string(gen09):
    tok = gen09.CharTokenizer("\n#ab")
    stream = gen09.TextStream(tok, ["\n\n#"])
    assert [stream.add(i) for i in tok.encode("ab\n")] == ["a", "b", ""]  # "\n" may start "\n\n#"
    assert stream.add(tok.encode("a")[0]) == "\na"  # ruled out: shown
    assert [stream.add(i) for i in tok.encode("\n\n#")] == ["", "", ""] and stream.stopped
    assert stream.text == "ab\na"


# -----------------------------------------------------------------------------
# Command line


def save_tiny_checkpoint(gen09, path, chars, stage="pretrain", iter_num=0, val_loss=None):
    """A checkpoint in the format 05-08 write (the keys of 05's save_checkpoint); chars=None: of
    GPT-2's tokens."""
    spec = {"kind": "char", "chars": chars} if chars else {"kind": "gpt2"}
    tok = gen09.get_tokenizer(spec)
    model = rough_model(gen09, block_size=64, vocab_size=tok.n_vocab)
    path.parent.mkdir(parents=True, exist_ok=True)
    best_val_loss = float("inf") if val_loss is None else val_loss
    torch.save({
        "model": model.state_dict(), "model_args": dataclasses.asdict(model.config),
        "optimizer": {}, "config": {}, "iter_num": iter_num, "best_val_loss": best_val_loss,
        "val_loss": val_loss, "rng": {}, "tokenizer": spec, "stage": stage,
    }, path)  # fmt: skip
    return model, tok


def exits_with_one_error_line(gen09, argv, capsys) -> str:
    """main(argv) must stop with status 2 and one stderr line `error: ...` (no traceback); return
    it."""
    with pytest.raises(SystemExit) as exit_info:
        gen09.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_cli_samples_and_chats_from_a_checkpoint(gen09, tmp_path, capsys, monkeypatch):
    chars = "".join(sorted(set("abcdefghijklmnopqrstuvwxyz ,.:#?\n" + "BIRW")))
    model, tok = save_tiny_checkpoint(gen09, tmp_path / "ckpt.pt", chars, stage="finetune")
    ckpt = f"--ckpt={tmp_path / 'ckpt.pt'}"
    argv = [ckpt, "--prompt=to be", "--max_new_tokens=30", "--temperature=0", "--device=cpu"]
    texts = gen09.main(argv)
    expected = tok.decode(gen09.generate(model, [tok.encode("to be")], 30, temperature=0)[0])
    assert texts == [expected] and "to be" + expected in capsys.readouterr().out

    argv = [ckpt, "--prompt=to be", "--max_new_tokens=30", "--num_samples=3", "--device=cpu"]
    texts = gen09.main(argv)
    out = capsys.readouterr().out
    assert len(texts) == 3 and len(set(texts)) > 1  # one batch, three different samples
    assert all("to be" + text in out for text in texts)

    monkeypatch.setattr("sys.stdin", io.StringIO("Say a word.\n/quit\n"))  # what input() reads
    gen09.main([ckpt, "--chat", "--max_new_tokens=10", "--temperature=0", "--device=cpu"])
    # what 07 feeds its model: unknown characters ('S' is not in chars) as '?', and a newline ends
    # answers
    instruction = gen09.format_input({"instruction": "?ay a word.", "input": ""})
    template = instruction + "\n\n### Response:\n"
    newline = tok.encode("\n")[0]
    reply_ids = gen09.generate(model, [tok.encode(template)], 10, temperature=0, eot_token=newline)
    reply = tok.decode(reply_ids[0])
    assert f"model> {reply}\n" in capsys.readouterr().out

    def ctrl_c(prompt):  # what input() raises at a Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr("builtins.input", ctrl_c)
    with pytest.raises(SystemExit) as stop:  # as anywhere else: one line, status 130
        gen09.main([ckpt, "--chat", "--device=cpu"])
    assert stop.value.code == 130 and capsys.readouterr().err.strip() == "Ctrl-C: stopped"


def test_chat_reports_only_the_characters_the_user_typed(gen09, tmp_path, capsys, monkeypatch):
    """Shakespeare's characters have no '#', so the template's '###' headers go in as 07 trained
    them ('???'), and only what the user typed that the model lacks is reported (issue 12, case
    12)."""
    chars = "".join(sorted(set("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ,.:?!\n")))
    save_tiny_checkpoint(gen09, tmp_path / "ckpt.pt", chars, stage="finetune")
    monkeypatch.setattr("sys.stdin", io.StringIO("Name a colour.\nWhat is 2+2?\n"))
    gen09.main([f"--ckpt={tmp_path / 'ckpt.pt'}", "--chat", "--max_new_tokens=5", "--device=cpu"])
    out = capsys.readouterr().out
    assert "#" not in out
    assert out.count("sent as '?'") == 1  # the first message is all known characters
    assert "sent as '?': '+2'" in out


ENTRIES = [  # 07's format; 'Q' and '7' are not among the model's characters below
    {"instruction": "Name a colour.", "input": "", "output": "red"},
    {"instruction": "Add these.", "input": "7 and 2", "output": "nine"},
    {"instruction": "Say a word about the sea, quickly.", "input": "", "output": "waves"},
    {"instruction": "Quote it.", "input": "to be", "output": "to be"},
    {"instruction": "Why?", "output": "because"},
]


def test_answers_are_each_entrys_greedy_answer_alone_beside_the_checkpoint(gen09, tmp_path,
                                                                           capsys):
    """--answers answers in batches (of 2: prompts of unequal length, left-padded) what each
    entry alone gets: 07's template, unknown characters as '?', ended at a newline (a char model's
    end token); the entries with their answers go beside --ckpt, named after the file."""
    chars = "".join(sorted(set("abcdefghijklmnopqrstuvwxyz ABNRSW,.:?\n")))
    model, tok = save_tiny_checkpoint(gen09, tmp_path / "run" / "ckpt.pt", chars, "finetune")
    (tmp_path / "test.json").write_text(json.dumps(ENTRIES))
    argv = [f"--ckpt={tmp_path / 'run' / 'ckpt.pt'}", f"--answers={tmp_path / 'test.json'}",
            "--batch_size=2", "--max_new_tokens=40", "--temperature=0", "--device=cpu"]
    path = gen09.main(argv)
    assert path == tmp_path / "run" / "test_responses.json"
    records = json.loads(path.read_text())
    assert [{k: v for k, v in r.items() if k != "model_response"} for r in records] == ENTRIES
    newline = tok.encode("\n")[0]
    for entry, record in zip(ENTRIES, records):
        text = gen09.format_input(entry) + "\n\n### Response:\n"
        prompt = tok.encode("".join(c if c in chars else "?" for c in text))
        alone = gen09.generate(model, [prompt], 40, temperature=0, eot_token=newline)[0]
        assert record["model_response"] == tok.decode(alone).strip()
    assert len({r["model_response"] for r in records}) > 1  # a rough model: varied answers
    assert f"5 answers in {path}" in capsys.readouterr().out


@pytest.mark.parametrize("content, flags, message", [
    (None, [], "07_finetune.py writes its test split as out_dir/test.json"),
    ("{}", [], "expected UTF-8 JSON, a list of objects, each with an instruction"),
    ('[{"input": "x"}]', [], "expected UTF-8 JSON, a list of objects, each with an instruction"),
    ("[]", [], "expected UTF-8 JSON, a list of objects, each with an"),  # nothing to answer
    ('[{"instruction": "x"}]', ["answered"], "test_responses.json exists: move it away"),
    ("[]", ["--chat"], "--chat and --answers: choose one"),
    ("[]", ["--batch_size=0"], "--batch_size=0: use 1 or more"),
])
def test_bad_answers_settings_are_one_error_line_before_the_model(gen09, tmp_path, capsys,
                                                                  monkeypatch, content, flags,
                                                                  message):
    save_tiny_checkpoint(gen09, tmp_path / "ckpt.pt", "abc\n", stage="finetune")
    answers = tmp_path / "test.json"
    if content is not None:
        answers.write_text(content)
    responses = tmp_path / "test_responses.json"
    if flags == ["answered"]:  # another model's answers, or an older run's, stay as they are
        responses.write_text("[]")
        flags = []
    monkeypatch.setattr(gen09, "load_model", lambda cfg: pytest.fail("loaded the model"))
    argv = [f"--ckpt={tmp_path / 'ckpt.pt'}", f"--answers={answers}", "--device=cpu", *flags]
    assert message in exits_with_one_error_line(gen09, argv, capsys)
    assert not responses.exists() or responses.read_text() == "[]"  # nothing written, or replaced


@pytest.mark.parametrize("content", [
    '{"instruction": "a"}\n{"instruction": "b"}\n',  # JSON Lines: json's "Extra data"
    "",  # json's "Expecting value"
    None,  # a checkpoint's bytes: not UTF-8 text
    "[" * 100_000,  # nested past Python's recursion limit: json's RecursionError
], ids=["jsonl", "empty", "ckpt", "nested"])  # fmt: skip
def test_answers_that_are_not_json_name_the_flag_and_a_json_list(gen09, tmp_path, capsys,
                                                                 monkeypatch, content):
    """A file that is not JSON at all is refused as a wrong JSON one is: the line names
    --answers=F and the JSON list it expects, not the parser's "Extra data: line 2 column 1"."""
    save_tiny_checkpoint(gen09, tmp_path / "ckpt.pt", "abc\n", stage="finetune")
    answers = tmp_path / "ckpt.pt"
    if content is not None:
        answers = tmp_path / "test.jsonl"
        answers.write_text(content)
    monkeypatch.setattr(gen09, "load_model", lambda cfg: pytest.fail("loaded the model"))
    argv = [f"--ckpt={tmp_path / 'ckpt.pt'}", f"--answers={answers}", "--device=cpu"]
    err = exits_with_one_error_line(gen09, argv, capsys)
    assert f"--answers={answers}: expected UTF-8 JSON, a list of objects" in err


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_answers_read_utf8_with_a_bom_and_name_utf8_for_other_encodings(gen09, tmp_path, capsys,
                                                                        encoding):
    """A UTF-8 file that begins with a BOM (as Windows tools write it) is answered as one without;
    a file in another encoding is one error line that names the UTF-8 it expects."""
    chars = "".join(sorted(set("abcdefghijklmnopqrstuvwxyz ABNRSW,.:?\n")))
    save_tiny_checkpoint(gen09, tmp_path / "ckpt.pt", chars, stage="finetune")
    (tmp_path / "test.json").write_text(json.dumps(ENTRIES[:2]), encoding=encoding)
    argv = [f"--ckpt={tmp_path / 'ckpt.pt'}", f"--answers={tmp_path / 'test.json'}",
            "--max_new_tokens=3", "--device=cpu"]
    if encoding == "utf-16":
        assert "expected UTF-8 JSON" in exits_with_one_error_line(gen09, argv, capsys)
        return
    records = json.loads(gen09.main(argv).read_text())
    assert [{k: v for k, v in r.items() if k != "model_response"} for r in records] == ENTRIES[:2]


def test_answers_say_in_one_line_when_a_prompt_is_cut(gen09, tmp_path, capsys):
    """--answers cuts a prompt longer than the context (64 tokens) from its start, as sampling
    does, and says so as sampling does: one line on stderr with the tokens cut; a prompt that
    fits says nothing."""
    _, tok = save_tiny_checkpoint(gen09, tmp_path / "ckpt.pt", chars=None, stage="finetune")
    entries = [{"instruction": "Name a colour."}, {"instruction": "Say it again. " * 20}]
    (tmp_path / "test.json").write_text(json.dumps(entries))
    argv = [f"--ckpt={tmp_path / 'ckpt.pt'}", f"--answers={tmp_path / 'test.json'}",
            "--batch_size=1", "--max_new_tokens=2", "--device=cpu"]
    gen09.main(argv)
    prompts = [tok.encode(gen09.format_input(e)) + tok.encode("\n\n### Response:\n")
               for e in entries]
    assert len(prompts[0]) <= 64 < len(prompts[1])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(rf"\b{len(prompts[1]) - 64}\b", err), err


def test_answers_end_at_a_new_section_of_the_template(gen09, tmp_path, monkeypatch):
    """An answer that goes on into "\n\n### Instruction:" (a model that learned the template's
    look) is cut there, and stripped."""
    chars = "".join(sorted(set("abcdefghijklmnopqrstuvwxyz ABINRSWY#,.:?\n")))
    _, tok = save_tiny_checkpoint(gen09, tmp_path / "ckpt.pt", chars, stage="finetune")
    (tmp_path / "test.json").write_text(json.dumps(ENTRIES[:2]))

    def generate(model, prompts, *args):  # every row writes the same text, then is cut
        streams = args[6]  # after max_new_tokens ... eot_token
        for stream in streams:
            for token in tok.encode(" Yes.\n\n### Instruction:\nmore"):
                if not stream.stopped:  # as generate: a stopped row adds no more
                    stream.add(token)
        return [[] for _ in prompts]

    monkeypatch.setattr(gen09, "generate", generate)
    path = gen09.main([f"--ckpt={tmp_path / 'ckpt.pt'}", f"--answers={tmp_path / 'test.json'}",
                       "--device=cpu"])
    assert [r["model_response"] for r in json.loads(path.read_text())] == ["Yes.", "Yes."]


def test_ctrl_c_during_answers_keeps_the_batches_done(gen09, tmp_path, capsys, monkeypatch):
    chars = "".join(sorted(set("abcdefghijklmnopqrstuvwxyz ABNRSW,.:?\n")))
    save_tiny_checkpoint(gen09, tmp_path / "ckpt.pt", chars, stage="finetune")
    (tmp_path / "test.json").write_text(json.dumps(ENTRIES))
    original_generate = gen09.generate
    calls = []

    def generate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # Ctrl-C during the second batch
            raise KeyboardInterrupt
        return original_generate(*args, **kwargs)

    monkeypatch.setattr(gen09, "generate", generate)
    argv = [f"--ckpt={tmp_path / 'ckpt.pt'}", f"--answers={tmp_path / 'test.json'}",
            "--batch_size=2", "--max_new_tokens=4", "--device=cpu"]
    assert exit_status(gen09.main, argv) == 130
    assert "Ctrl-C: stopped" in capsys.readouterr().err
    records = json.loads((tmp_path / "test_responses.json").read_text())
    assert [r["instruction"] for r in records] == [e["instruction"] for e in ENTRIES[:2]]


@pytest.mark.parametrize("stage, script, loss", [
    ("dpo", "08_dpo.py", "val DPO loss 1.5000"),  # 08 saves the DPO loss of its pairs
    ("finetune", "07_finetune.py", "val loss 1.5000 on the answers"),
    ("pretrain", "05_pretrain.py", "val loss 1.5000"),
])  # fmt: skip
def test_cli_says_which_checkpoint_it_loaded(gen09, tmp_path, capsys, stage, script, loss):
    """The header names the stage's script and the loss it saved: 08's "val_loss" is DPO's."""
    path = tmp_path / "run" / "ckpt.pt"
    save_tiny_checkpoint(gen09, path, "abc \n", stage=stage, iter_num=1234, val_loss=1.5)
    gen09.main([f"--ckpt={path}", "--max_new_tokens=3", "--device=cpu"])
    first_line = capsys.readouterr().out.splitlines()[0]
    assert str(path) in first_line and script in first_line
    assert "1,234 iterations" in first_line and loss in first_line
    assert stage != "dpo" or "val loss" not in first_line  # not a language model's loss


def test_default_checkpoint_is_05s_shakespeare_model_not_the_newest(
    gen09, tmp_path, capsys, monkeypatch
):
    """The README promises Shakespeare from `python 09_generate.py`, even after 07 and 08 wrote
    newer runs."""
    monkeypatch.setattr(gen09, "PROJECT", tmp_path)  # the project folder, for this test
    shakespeare = tmp_path / "out" / "shakespeare-char" / "ckpt.pt"
    save_tiny_checkpoint(gen09, shakespeare, "abc \n", iter_num=2000)
    os.utime(shakespeare, (1000, 1000))
    save_tiny_checkpoint(gen09, tmp_path / "out" / "dpo" / "ckpt.pt", "xyz \n", stage="dpo")
    gen09.main(["--max_new_tokens=3", "--device=cpu"])
    first_line = capsys.readouterr().out.splitlines()[0]
    expected = "loaded out/shakespeare-char/ckpt.pt: the pretrain model of 05_pretrain.py"
    assert first_line.startswith(expected)
    assert "2,000 iterations" in first_line and "no val loss" in first_line


def default_out_dir(script: str) -> str:
    """The out_dir default written in a stage's own source (`out_dir: Annotated[...] = "out/x"`)."""
    source = (ROOT / script).read_text(encoding="utf-8")
    field = re.search(r'\n    out_dir: Annotated\[\s*str,.*?\]\s*=\s*"([^"]+)"', source, re.DOTALL)
    return field.group(1)


@pytest.mark.parametrize("script", ["05_pretrain.py", "06_distributed.py", "07_finetune.py",
                                    "08_dpo.py"])
def test_a_missing_checkpoint_names_the_script_that_writes_it(gen09, tmp_path, monkeypatch, capsys,
                                                               script):
    """Each stage's default out_dir/ckpt.pt, read from that stage's source: the hint runs it."""
    monkeypatch.setattr(gen09, "PROJECT", tmp_path)  # an empty project: no checkpoints
    ckpt = f"{default_out_dir(script)}/ckpt.pt"
    argv = ["--device=cpu"] if script == "05_pretrain.py" else [f"--ckpt={ckpt}", "--device=cpu"]
    err = exits_with_one_error_line(gen09, argv, capsys)
    assert f"--ckpt={ckpt}" in err and f"python {script}" in err and str(tmp_path / ckpt) in err
    others = {"05_pretrain.py", "06_distributed.py", "07_finetune.py", "08_dpo.py"} - {script}
    assert not any(other in err for other in others)


def test_a_missing_gpt2_checkpoint_names_04(gen09, tmp_path, monkeypatch, capsys):
    """data/gpt2/ckpt.pt is 04's: `04_gpt.py --init_from=gpt2 --save_ckpt` writes it."""
    monkeypatch.setattr(gen09, "PROJECT", tmp_path)
    assert "save_ckpt" in (ROOT / "04_gpt.py").read_text(encoding="utf-8")
    err = exits_with_one_error_line(gen09, ["--ckpt=data/gpt2/ckpt.pt", "--device=cpu"], capsys)
    assert "python 04_gpt.py --init_from=gpt2 --save_ckpt" in err and "05_pretrain" not in err


def test_a_relative_ckpt_starts_at_the_project_folder(gen09, tmp_path, monkeypatch, capsys):
    """Run from elsewhere: --ckpt=<folder>/ckpt.pt is found next to 09, not in the current folder
    (where 05 once wrote out/ and 09 then said "no such file")."""
    monkeypatch.chdir(tmp_path)
    run_dir = Path(tempfile.mkdtemp(prefix=".test09-", dir=ROOT))  # inside the project folder
    try:
        save_tiny_checkpoint(gen09, run_dir / "ckpt.pt", "abc \n")
        folder = run_dir.name  # relative to the project folder
        argv = [f"--ckpt={folder}/ckpt.pt", "--max_new_tokens=3", "--device=cpu"]
        texts = gen09.main(argv)
    finally:
        shutil.rmtree(run_dir)
    assert len(texts) == 1
    assert f"loaded {folder}/ckpt.pt:" in capsys.readouterr().out


def test_a_run_folder_as_ckpt_names_the_checkpoint_in_it(gen09, tmp_path, monkeypatch, capsys):
    """--ckpt=out/ft, the out_dir 07 wrote: the line gives the flag that loads it,
    --ckpt=out/ft/ckpt.pt, not "no such file; make it with 05-08"."""
    monkeypatch.setattr(gen09, "PROJECT", tmp_path)
    save_tiny_checkpoint(gen09, tmp_path / "out" / "ft" / "ckpt.pt", "abc \n", stage="finetune")
    err = exits_with_one_error_line(gen09, ["--ckpt=out/ft", "--device=cpu"], capsys)
    assert "--ckpt=out/ft/ckpt.pt" in err and "make it with" not in err


def test_a_new_document_of_gpt2_tokens_prints_no_start_token(gen09, tmp_path, capsys):
    """With no --prompt a GPT-2-token model starts from <|endoftext|>, a token, not text: each
    sample is printed as the model wrote it, without a literal "<|endoftext|>" before it."""
    save_tiny_checkpoint(gen09, tmp_path / "ckpt.pt", chars=None)
    argv = [f"--ckpt={tmp_path / 'ckpt.pt'}", "--num_samples=2", "--max_new_tokens=5",
            "--device=cpu"]
    texts = gen09.main(argv)
    printed = capsys.readouterr().out.split("\n", 1)[1]  # after the "loaded ..." line
    assert "<|endoftext|>" not in printed
    assert printed.startswith(texts[0]) and texts[1] in printed


def test_a_missing_checkpoint_names_09s_own_flag(gen09, capsys):
    err = exits_with_one_error_line(gen09, ["--ckpt=/nonexistent.pt"], capsys)
    assert "--ckpt=/nonexistent.pt" in err and "--out_dir" not in err


def test_a_file_that_is_not_a_checkpoint_is_called_that(gen09, tmp_path, capsys):
    """README.md, or a torch file of other keys: never torch's advice to load with
    weights_only=False."""
    (tmp_path / "other.pt").write_bytes(b"")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    readme = os.path.join(os.path.dirname(__file__), "..", "README.md")
    for path in (readme, tmp_path / "other.pt"):
        err = exits_with_one_error_line(gen09, [f"--ckpt={path}", "--device=cpu"], capsys)
        assert "is not a checkpoint of these scripts" in err and "weights_only" not in err


def test_gpt2s_tokenizer_out_of_reach_is_one_error_line(gen09, tmp_path, capsys, monkeypatch):
    """Offline with no tiktoken cache, GPT-2's BPE cannot be fetched: requests' ConnectionError
    (an OSError) is the user's to fix, one line, not a traceback."""
    import requests

    save_tiny_checkpoint(gen09, tmp_path / "ckpt.pt", "abc \n")

    def offline(spec):
        raise requests.ConnectionError("cannot reach openaipublic.blob.core.windows.net")

    monkeypatch.setattr(gen09, "get_tokenizer", offline)
    argv = [f"--ckpt={tmp_path / 'ckpt.pt'}", "--device=cpu"]
    assert "cannot reach" in exits_with_one_error_line(gen09, argv, capsys)


def test_text_the_model_cannot_encode_is_a_user_error(gen09, tmp_path, capsys):
    save_tiny_checkpoint(gen09, tmp_path / "ckpt.pt", "abc \n")
    argv = [f"--ckpt={tmp_path / 'ckpt.pt'}", "--prompt=abZ", "--device=cpu"]
    err = exits_with_one_error_line(gen09, argv, capsys)
    assert "'Z'" in err and "vocabulary" in err


def test_bench_prints_a_row_per_length_without_the_warm_up(gen09, capsys, monkeypatch):
    """bench on a tiny model (a fraction of a second): the header, then one row per length, each
    with tokens/s cached and not, the speedup, and ms per token first -> last for both."""
    def tiny(preset, **sizes):
        return gen09.GPTConfig(n_layer=1, n_head=1, n_embd=8, **sizes)

    monkeypatch.setattr(gen09, "preset_config", tiny)
    gen09.bench(SimpleNamespace(device="cpu", dtype="float32", bench_presets="tiny"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("cpu, float32,") and "no cache" in lines[1]
    number = r"[\d,]+\.\d"
    ms = rf"{number} -> {number}"  # ms per token, the first 64 -> the last 64
    row = rf" *tiny +(256|512) +{number} +{number} +{number}x +{ms} +{ms}"
    assert len(lines) == 4 and all(re.fullmatch(row, line) for line in lines[2:])


@pytest.mark.parametrize("name, flags", [
    ("top_p", "--top_p=2"), ("temperature", "--temperature=-1"), ("num_samples", "--num_samples=0"),
    ("temperature", "--temperature=nan"),
    ("device", "--device=tpu"), ("dtype", "--dtype=float8"),
    ("huge", "--bench --bench_presets=small,huge"),
])  # fmt: skip
def test_cli_rejects_bad_settings_before_loading(gen09, capsys, name, flags):
    assert name in exits_with_one_error_line(gen09, flags.split(), capsys)


@pytest.mark.parametrize("mode, flag", [
    ("--answers=test.json", "--stop=e"), ("--answers=test.json", "--prompt=zzz"),
    ("--answers=test.json", "--num_samples=5"), ("--chat", "--stop=e"), ("--chat", "--prompt=zzz"),
])  # fmt: skip
def test_a_sampling_flag_beside_chat_or_answers_is_one_error_line(gen09, tmp_path, capsys,
                                                                  monkeypatch, mode, flag):
    """--chat and --answers prompt in 07's template, one text per message or entry, ended as 07
    taught: --prompt, --num_samples and --stop would do nothing there, so each is refused, named,
    before the model loads, not silently dropped."""
    save_tiny_checkpoint(gen09, tmp_path / "ckpt.pt", "abc\n", stage="finetune")
    (tmp_path / "test.json").write_text(json.dumps(ENTRIES))
    monkeypatch.chdir(tmp_path)  # not a path for --answers: the check comes before the file
    monkeypatch.setattr(gen09, "load_model", lambda cfg: pytest.fail("loaded the model"))
    argv = [f"--ckpt={tmp_path / 'ckpt.pt'}", mode, flag, "--device=cpu"]
    err = exits_with_one_error_line(gen09, argv, capsys)
    assert err.startswith(f"error: {flag.split('=')[0]} is for sampling"), err


def test_a_seed_a_torch_generator_cannot_take_is_refused_before_the_model(gen09, tmp_path,
                                                                        capsys, monkeypatch):
    """Seeds are 0 .. 2**63 - 1 (as 10_serve's): 10**23 or -1 is one line naming --seed before
    the model loads, not torch's "Overflow when unpacking long long" after it; the largest runs."""
    save_tiny_checkpoint(gen09, tmp_path / "ckpt.pt", "abc\n")
    ckpt = f"--ckpt={tmp_path / 'ckpt.pt'}"
    gen09.main([ckpt, f"--seed={2**63 - 1}", "--max_new_tokens=2", "--device=cpu"])
    monkeypatch.setattr(gen09, "load_model", lambda cfg: pytest.fail("loaded the model"))
    for seed in (10**23, -1):
        err = exits_with_one_error_line(gen09, [ckpt, f"--seed={seed}", "--device=cpu"], capsys)
        assert err.startswith(f"error: --seed={seed}:"), err


@pytest.mark.parametrize("flag", ["--max_new_tokens=-1", "--threads=-1", "--num_samples=0"])
def test_a_number_out_of_range_names_only_its_own_flag(gen09, capsys, flag):
    err = exits_with_one_error_line(gen09, [flag, "--device=cpu"], capsys)
    names = ["--max_new_tokens", "--threads", "--num_samples"]
    assert [name for name in names if name in err] == [flag.split("=")[0]], err


def test_help_gives_each_default_once_in_plain_words(gen09, capsys):
    """Each flag's help ends with its default, said once; no pointer into the code."""
    with pytest.raises(SystemExit):
        gen09.main(["--help"])
    out = capsys.readouterr().out
    flags = [f"--{f.name}" for f in dataclasses.fields(gen09.GenerateConfig)]
    helps = re.split(r"\n  (?=--)", out.split("options:")[1])[1:]  # one entry per flag
    assert [h.split()[0] for h in helps] == flags
    for entry in helps:
        assert entry.count("default") == 1, entry
        assert not re.search(r"see \w+_\w+|pick_dtype|GPTConfig", entry), entry


def test_a_prompt_longer_than_the_context_is_cut_with_one_line(gen09, tmp_path, capsys):
    """The model reads 64 tokens (its block_size): a 150-character prompt loses its first 86, and
    stderr says so in one line; a prompt that fits says nothing."""
    save_tiny_checkpoint(gen09, tmp_path / "ckpt.pt", "abc \n")
    ckpt = f"--ckpt={tmp_path / 'ckpt.pt'}"
    for prompt, dropped in (("abc " * 10, None), ("abc c" * 30, 150 - 64)):
        gen09.main([ckpt, f"--prompt={prompt}", "--max_new_tokens=3", "--device=cpu"])
        err = capsys.readouterr().err
        if dropped is None:
            assert err == ""
        else:
            assert err.count("\n") == 1 and re.search(rf"\b{dropped}\b", err), err


def test_a_reader_that_closes_the_pipe_early_ends_it_quietly(gen09, tmp_path):
    """`python 09_generate.py | head -1`: head leaves after the header while 09 writes; 09 stops
    with no traceback (not even Python's "Exception ignored" at exit) and status 141, 128 + SIGPIPE,
    what a Unix tool cut off by a closed pipe reports."""
    save_tiny_checkpoint(gen09, tmp_path / "ckpt.pt", "abc \n")
    cmd = [sys.executable, str(ROOT / "09_generate.py"), f"--ckpt={tmp_path / 'ckpt.pt'}",
           "--max_new_tokens=1000000", "--device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().startswith(b"loaded ")  # the header: 09 is generating now
        proc.stdout.close()  # the reader leaves
        returncode = proc.wait(timeout=30)  # a million tokens: only the closed pipe stops it soon
        err = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stderr.close()
    assert returncode == 141 and err == "", err



def test_ctrl_c_mid_generation_stops_with_one_line(gen09, tmp_path, monkeypatch, capsys):
    """Ctrl-C while 09 writes: one line on stderr and status 130 (128 + SIGINT), no traceback."""
    save_tiny_checkpoint(gen09, tmp_path / "ckpt.pt", "abc \n")

    monkeypatch.setattr(gen09, "sample_from_prompt", interrupted)
    try:
        gen09.main([f"--ckpt={tmp_path / 'ckpt.pt'}", "--device=cpu"])
    except KeyboardInterrupt:  # escaping, it would stop pytest itself
        pytest.fail("Ctrl-C left 09 as a KeyboardInterrupt traceback")
    except SystemExit as exit_info:
        assert exit_info.code == 130
    else:
        pytest.fail("09 went on after a Ctrl-C")
    assert capsys.readouterr().err.strip() == "Ctrl-C: stopped"


def test_cli_rejects_abbreviations(gen09, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gen09.main(["--temp=0"])  # not taken as --temperature
    assert exit_info.value.code == 2 and "--temp" in capsys.readouterr().err


def test_help_lists_the_flags(gen09, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gen09.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    flags = ("--ckpt", "--temperature", "--top_p", "--stop", "--chat", "--bench")
    for flag in flags:
        assert flag in out


def test_sample_draws_what_multinomial_draws_from_the_same_generator(gen09):
    """sample() skips torch.multinomial (its checks have cost host syncs on GPUs) but draws the same
    way, the largest p_i / E_i with E_i ~ Exp(1): the same seed gives the same tokens. (top_k and
    top_p only mask logits before the draw; the tests above check what they keep.)"""
    torch.manual_seed(0)
    for seed in range(100):
        logits = torch.randn(4, 40) * 3
        for temperature in (1.0, 0.7):
            ours = gen09.sample(logits, temperature, generator=torch.Generator().manual_seed(seed))
            probs = F.softmax(logits / temperature, dim=-1)
            generator = torch.Generator().manual_seed(seed)
            theirs = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            assert torch.equal(ours, theirs), (seed, temperature)


def test_the_head_runs_in_fp32_under_autocast(gen09):
    """Perplexity's log-probabilities come from an fp32 head even when the blocks run in bf16
    (issue 14).

    As in 08's test: the tied head is scaled so that the logits are tens of nats, as GPT-2's. From
    the same bf16 hidden states, forward_cached's log-probs equal a float64 head's within 1e-4; the
    GPT's own head, in bf16 under autocast, is off by far more."""
    model = rough_model(gen09, block_size=16)
    with torch.no_grad():
        model.lm_head.weight.mul_(50)  # logits of tens, as GPT-2's
    idx = torch.randint(VOCAB, (2, 10))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, (plain, _) = gen09.forward_cached(model, idx), model(idx)
        h = gen09.final_hidden(model, idx)  # the hidden states forward_cached computes
    assert plain.dtype == torch.bfloat16 and logits.dtype == torch.float32
    exact_logits = h.double() @ model.lm_head.weight.double().T  # a float64 head, the same h
    exact = exact_logits.log_softmax(dim=-1)
    torch.testing.assert_close(logits.log_softmax(dim=-1).double(), exact, atol=1e-4, rtol=0)
    plain_error = (plain.float().log_softmax(dim=-1).double() - exact).abs().max()
    assert plain_error > 1e-2  # bf16's head is off
