"""Tests for 11_evaluate.py: each choice's log-probability is transformers' (on 10's export), the
three scores are what their definitions say, packed batches score as one example at a time does,
the judge copes with numbers, words and errors (a stub, and 10_serve.py's server), a download with
the wrong hash leaves nothing, a text's perplexity and bits per byte equal the model's own forward
one position at a time, and bad input is one line."""

import contextlib
import dataclasses
import http.server
import json
import math
import socket
import threading
import uuid

import pytest
import tiktoken
import torch
import transformers
from conftest import ROOT, exit_status, interrupted, load_script, roughen

CHARS = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@pytest.fixture(scope="module")
def ev11():
    return load_script("11_evaluate")


def rough_model(ev, vocab_size, block_size=64, seed=0):
    """A tiny GPT with large random weights (std 0.3): confident, varied predictions, so the
    choices score far apart and a wrong token or position changes the numbers, not the 6th
    decimal."""
    torch.manual_seed(seed)
    config = ev.GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2,
                          n_embd=32)  # fmt: skip
    model = ev.GPT(config)
    return roughen(model, biases=True)


def save_ckpt(model, spec, path, stage="pretrain"):
    """A checkpoint as 05-08 write it (the keys load_checkpoint reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {"batch_size": 2, "gradient_accumulation_steps": 3, "block_size": 64}
    ckpt = {"model": model.state_dict(), "model_args": dataclasses.asdict(model.config),
            "tokenizer": spec, "config": config, "stage": stage, "iter_num": 5}  # fmt: skip
    torch.save(ckpt, path)
    return path


HELLASWAG_LINES = [  # HellaSwag's own fields; the endings follow ctx after a space
    {"ind": 24, "ctx": "A man is sitting on a roof. he", "label": 3, "split": "val",
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."]},
    {"ind": 7, "ctx": "The chef cracks two eggs into a bowl and", "label": 0,
     "endings": ["whisks them.", "paints the ceiling blue with a very small brush, slowly.",
                 "sings.", "puts the bowl in the oven at 200 degrees for an hour."]},
    {"ind": 9, "ctx": " ".join(["A very long context that will not fit."] * 12), "label": 1,
     "endings": ["It ends.", "It ends here, at last, after all that.", "No."]},
]
PLAIN_LINES = [  # choices are appended as written
    {"context": "The capital of France is", "choices": [" Paris", " London", " a city"],
     "label": 0},
    {"context": "2 + 2 =", "choices": [" 4", " five", " 22", " four, of course"], "label": 0},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def gpt2_model(ev11):
    return rough_model(ev11, 50257)


@pytest.fixture(scope="module")
def examples(ev11, tmp_path_factory):
    """Both formats, read back by load_task."""
    folder = tmp_path_factory.mktemp("tasks")
    hellaswag = ev11.load_task(str(write_jsonl(folder / "hs.jsonl", HELLASWAG_LINES)))
    plain = ev11.load_task(str(write_jsonl(folder / "plain.jsonl", PLAIN_LINES)))
    return hellaswag + plain


# -----------------------------------------------------------------------------
# Scoring


def test_each_choice_logprob_is_transformers_on_10s_export(ev11, gpt2_model, examples, tmp_path):
    """Every choice's summed log-probability, packed and batched and llm.c's way, equals
    GPT2LMHeadModel's on the same weights (exported by 10), with the encoding llm.c uses: context
    and " " + ending encoded apart; a long context keeps its last tokens."""
    load_script("10_serve").export_hf(gpt2_model, {"kind": "gpt2"}, tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    enc = tiktoken.get_encoding("gpt2")
    block_size = gpt2_model.config.block_size
    hs_line = HELLASWAG_LINES[0]
    assert examples[0]["context"] == hs_line["ctx"]
    assert examples[0]["choices"] == [" " + e for e in hs_line["endings"]]
    encoded = [ev11.encode_example(enc, e, block_size, "test") for e in examples]
    packed = ev11.score_examples(gpt2_model, encoded, batch_tokens=64)
    theirs = []
    for example in examples:
        choices = [enc.encode(c) for c in example["choices"]]
        room = block_size + 1 - max(len(c) for c in choices)
        context = enc.encode(example["context"])[-room:]
        scores = []
        for choice in choices:
            row = torch.tensor([context + choice])
            with torch.no_grad():
                logprobs = hf(row[:, :-1]).logits.log_softmax(-1)[0]  # (T-1, V)
            targets = row[0, 1:]
            per_token = logprobs[torch.arange(len(targets)), targets]
            scores.append(per_token[-len(choice) :].sum().item())
        theirs.append(scores)
    assert [e["cut"] for e in encoded] == [False, False, True, False, False]
    for ours, reference, e in zip(packed, theirs, encoded):
        expected = torch.tensor(reference)
        torch.testing.assert_close(torch.tensor(ours), expected, atol=1e-4, rtol=0)
        llmc_way = ev11.score_rows(gpt2_model, e)
        torch.testing.assert_close(torch.tensor(llmc_way), expected, atol=1e-4, rtol=0)
    spread = max(max(s) - min(s) for s in theirs)
    assert spread > 1.0  # the choices really score apart


def test_packed_batches_score_as_one_example_at_a_time(ev11, gpt2_model, examples):
    """Many examples per pass, in any batch size, equal one example per pass (packed or llm.c's
    rows): no token sees another choice, another example or the padding."""
    enc = tiktoken.get_encoding("gpt2")
    encoded = [ev11.encode_example(enc, e, 64, "test") for e in examples]
    alone = [ev11.score_rows(gpt2_model, e) for e in encoded]
    for batch_tokens in (1, 100, 10_000):  # one example per pass, a few, all at once
        batched = ev11.score_examples(gpt2_model, encoded, batch_tokens=batch_tokens)
        for got, want in zip(batched, alone):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=1e-6)


def test_the_head_never_sees_more_rows_than_a_chunk(ev11, gpt2_model, monkeypatch):
    """The fp32 logits are (rows, V) for a chunk of rows at a time, never the whole batch."""
    shapes = []
    head = gpt2_model.lm_head
    monkeypatch.setattr(head, "forward", lambda x: shapes.append(x.shape) or x @ head.weight.t())
    h = torch.randn(50, 32)
    targets = torch.randint(50257, (50,))
    chunked = ev11.target_logprobs(gpt2_model, h, targets, max_logits=50257 * 8)
    assert max(s[0] for s in shapes) == 8 and sum(s[0] for s in shapes) == 50
    whole = (h @ head.weight.t()).log_softmax(-1)[torch.arange(50), targets]
    torch.testing.assert_close(chunked, whole)


def test_the_three_scores_follow_their_definitions(ev11):
    """Built so that each score picks a different choice: the highest sum (acc), per character
    (acc_norm, lm-evaluation-harness), per token (acc_token_mean, llm.c)."""
    choices = ["x" * 40, "y" * 12, "z" * 100]
    sums = [-10.0, -12.0, -15.0]
    n_tokens = [2, 12, 10]
    per_char = [s / len(c) for s, c in zip(sums, choices)]  # -0.25, -1.0, -0.15
    per_token = [s / t for s, t in zip(sums, n_tokens)]  # -5.0, -1.0, -1.5
    expected_picks = {"acc": sums.index(max(sums)), "acc_norm": per_char.index(max(per_char)),
                      "acc_token_mean": per_token.index(max(per_token))}  # fmt: skip
    assert sorted(expected_picks.values()) == [0, 1, 2]  # three different choices
    labels = [0, 2, 2, 1]
    examples = [{"context": "c", "choices": choices, "label": label} for label in labels]
    encoded = [{"choices": [[0] * n for n in n_tokens], "cut": False} for _ in labels]
    result = ev11.task_scores(examples, encoded, [sums] * len(labels), "made")
    for metric, choice in expected_picks.items():
        correct = labels.count(choice)
        assert result[metric] == correct / len(labels)
        low, high = result[f"{metric}_interval"]
        assert low <= correct / len(labels) <= high
    assert result["examples"][0]["picks"] == expected_picks
    assert result["chance"] == 1 / 3 and result["n"] == 4


def test_wilson_interval_is_95_percent(ev11):
    """The interval covers the true accuracy about 95% of the time, by simulation."""
    gen = torch.Generator().manual_seed(0)
    for p, n in ((0.3, 200), (0.9, 40)):
        hits = (torch.rand(4000, n, generator=gen) < p).sum(1).tolist()
        covered = [low <= p <= high for low, high in (ev11.wilson_interval(k, n) for k in hits)]
        assert 0.93 < sum(covered) / len(covered) < 0.97


# -----------------------------------------------------------------------------
# The command line: the report, the JSON, --compare, the path rule, bad input


def test_command_line_report_json_and_compare(ev11, gpt2_model, tmp_path, capsys):
    """The interface: --ckpt --task=FILE --limit --out_json (--compare): the JSON holds the scores,
    and per example the label, each choice's summed log-probability, tokens and characters; the
    scores recomputed from those are the reported ones."""
    first = save_ckpt(gpt2_model, {"kind": "gpt2"}, tmp_path / "a" / "ckpt.pt")
    second = save_ckpt(rough_model(ev11, 50257, seed=1), {"kind": "gpt2"}, tmp_path / "b.pt")
    task = write_jsonl(tmp_path / "hs.jsonl", HELLASWAG_LINES + PLAIN_LINES)
    out = tmp_path / "eval.json"
    ev11.main([f"--ckpt={first}", f"--task={task}", "--limit=4", f"--out_json={out}",
               f"--compare={second}", "--device=cpu"])  # fmt: skip
    report = capsys.readouterr().out
    assert "acc_norm" in report and "chance" in report and "1 contexts cut" in report
    assert "tokens seen: 1,920" in report  # 5 iterations of 2 x 3 x 64 tokens
    result = json.loads(out.read_text())
    assert {"task", "n", "acc", "acc_norm", "acc_token_mean", "examples"} <= set(result)
    assert result["n"] == 4 and len(result["examples"]) == 4
    assert result["compare"]["model"]["ckpt"] == str(second)
    assert result["examples"] != result["compare"]["examples"]  # two models, two sets of scores
    enc = tiktoken.get_encoding("gpt2")
    for scores in (result, result["compare"]):
        correct = {"acc": 0, "acc_norm": 0, "acc_token_mean": 0}
        for row, line in zip(scores["examples"], HELLASWAG_LINES + PLAIN_LINES):
            choices = [" " + e for e in line["endings"]] if "endings" in line else line["choices"]
            assert row["n_chars"] == [len(c) for c in choices]
            assert row["n_tokens"] == [len(enc.encode(c)) for c in choices]
            s = row["logprobs"]
            norm = [a / b for a, b in zip(s, row["n_chars"])]
            mean = [a / b for a, b in zip(s, row["n_tokens"])]
            for metric, values in (("acc", s), ("acc_norm", norm), ("acc_token_mean", mean)):
                correct[metric] += values.index(max(values)) == row["label"]
        for metric, count in correct.items():
            assert scores[metric] == count / 4


def test_relative_paths_resolve_against_the_project_folder(ev11, gpt2_model, tmp_path,
                                                           monkeypatch):  # fmt: skip
    """Run from another folder, a relative --out_json lands under the project folder."""
    ckpt = save_ckpt(gpt2_model, {"kind": "gpt2"}, tmp_path / "ckpt.pt")
    task = write_jsonl(tmp_path / "plain.jsonl", PLAIN_LINES)
    relative = f"out/test-11-{uuid.uuid4().hex}.json"
    monkeypatch.chdir(tmp_path)
    try:
        ev11.main([f"--ckpt={ckpt}", f"--task={task}", f"--out_json={relative}", "--device=cpu"])
        assert (ROOT / relative).is_file() and not (tmp_path / relative).exists()
    finally:
        (ROOT / relative).unlink(missing_ok=True)


def bad_line(path, number, row):
    rows = [dict(PLAIN_LINES[0]) for _ in range(3)]
    rows[number - 1] = row
    return write_jsonl(path, rows)


BAD_TASKS = {  # a line's flaw -> what the error must name
    "missing field": ({"context": "a", "label": 0}, ["line 2", "'choices'"]),
    "label out of range": ({"context": "a", "choices": [" b", " c"], "label": 2}, ["label 2"]),
    "empty choice": ({"context": "a", "choices": [" b", ""], "label": 0}, ["choice 1 is empty"]),
    "not JSON": ("{oops", ["line 2", "not JSON"]),
}


@pytest.mark.parametrize("flaw", BAD_TASKS)
def test_bad_task_file_is_one_line_naming_the_problem(ev11, gpt2_model, tmp_path, capsys, flaw):
    row, words = BAD_TASKS[flaw]
    ckpt = save_ckpt(gpt2_model, {"kind": "gpt2"}, tmp_path / "ckpt.pt")
    task = bad_line(tmp_path / "t.jsonl", 2, row)
    if flaw == "not JSON":
        task.write_text(task.read_text().replace(json.dumps(row), row))
    with pytest.raises(SystemExit) as e:
        ev11.main([f"--ckpt={ckpt}", f"--task={task}", "--device=cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error:") and err.count("\n") == 1
    assert all(word in err for word in words), err


def test_bad_settings_and_files_are_one_line(ev11, tmp_path, capsys):
    char_model = rough_model(ev11, len(CHARS))
    char_ckpt = save_ckpt(char_model, {"kind": "char", "chars": CHARS}, tmp_path / "char.pt")
    not_a_ckpt = tmp_path / "notes.pt"
    not_a_ckpt.write_text("not a checkpoint")
    plain = write_jsonl(tmp_path / "plain.jsonl", PLAIN_LINES)  # '2', '+', '=' are not in CHARS
    answers = tmp_path / "test_responses.json"
    answers.write_text(json.dumps(RESPONSES))
    cases = [
        ([f"--ckpt={char_ckpt}", f"--task={plain}"], "'+2=' are not in this char model"),
        ([f"--ckpt={not_a_ckpt}", f"--task={plain}"], "is not a checkpoint"),
        ([f"--ckpt={char_ckpt}"], "nothing to do"),
        ([f"--ckpt={char_ckpt}", f"--task={tmp_path / 'none.jsonl'}"], "no such file"),
        ([f"--responses={plain}"], "--judge_url and --judge_model"),
        ([f"--ckpt={char_ckpt}", f"--text_file={tmp_path / 'none.txt'}"], "no such file"),
        ([f"--ckpt={char_ckpt}", f"--text_file={plain}", "--stride=-1"], "--stride"),
        ([f"--ckpt={char_ckpt}", f"--text_file={plain}", "--threads=3000000000"], "Overflow"),
        ([f"--ckpt={char_ckpt}", f"--text_file={plain}", f"--task={plain}"], "one evaluation"),
        ([f"--responses={plain}", f"--task={plain}", "--judge_url=http://x", "--judge_model=m"],
         "one evaluation"),  # the judge alone would run, the task silently skipped
        ([f"--ckpt={char_ckpt}", f"--task={plain}", f"--out_json={char_ckpt}"],
         "exists: move it away"),  # a checkpoint is never overwritten with scores
        ([f"--responses={answers}", "--judge_url=http://x", "--judge_model=m",
          f"--out_json={answers}"], "exists: move it away"),  # nor the answers judged, nor any file
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            ev11.main([*argv, "--device=cpu"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, err
    assert torch.load(char_ckpt, weights_only=True)["model_args"]  # still a checkpoint
    assert json.loads(answers.read_text()) == RESPONSES


class Scored(Exception):
    """Raised by a stand-in for score_examples and text_scores: a model's scoring began."""


def scored(*args, **kwargs):
    raise Scored


BAD_SECOND = {  # the second model's flaw -> what the error must say beside its path
    "unknown character": "'é' are not in this char model",  # CHARS has no 'é'
    "not a checkpoint": "is not a checkpoint",
    "missing": "train one",
}


@pytest.mark.parametrize("flaw", BAD_SECOND)
@pytest.mark.parametrize("mode", ["task", "text_file"])
def test_compare_checks_the_second_model_before_the_first_is_scored(ev11, tmp_path, capsys,
                                                                     monkeypatch, mode, flaw):
    """--compare with a second model that cannot read the input, a file that is no checkpoint, or
    none: one line naming it, before the first model is scored (which can take long)."""
    chars = CHARS + "é"
    first = save_ckpt(rough_model(ev11, len(chars)), {"kind": "char", "chars": chars},
                      tmp_path / "first.pt")  # fmt: skip
    second = tmp_path / "second.pt"
    if flaw == "unknown character":
        save_ckpt(rough_model(ev11, len(CHARS)), {"kind": "char", "chars": CHARS}, second)
    elif flaw == "not a checkpoint":
        second.write_text("not a checkpoint")
    example = {"context": "A café is", "choices": [" warm.", " cold."], "label": 0}
    task = write_jsonl(tmp_path / "cafe.jsonl", [example])
    (tmp_path / "cafe.txt").write_text("A café is warm.\n" * 3, encoding="utf-8")
    flag = f"--task={task}" if mode == "task" else f"--text_file={tmp_path / 'cafe.txt'}"
    monkeypatch.setattr(ev11, "score_examples", scored)
    monkeypatch.setattr(ev11, "text_scores", scored)
    with pytest.raises(SystemExit) as e:
        ev11.main([f"--ckpt={first}", f"--compare={second}", flag, "--device=cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error:") and err.count("\n") == 1
    assert str(second) in err and BAD_SECOND[flaw] in err, err


@pytest.mark.parametrize("text", ['{"instruction": "a"}\n{"instruction": "b"}\n', "Red.\nBlue.\n"])
def test_responses_that_are_not_json_name_the_file_and_what_it_holds(ev11, tmp_path, capsys,
                                                                     text):  # fmt: skip
    """A JSONL or plain-text --responses file: one line naming the file and that 09 --answers
    writes a JSON list, before any request."""
    path = tmp_path / "test_responses.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        ev11.main([f"--responses={path}", "--judge_url=http://x", "--judge_model=m"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert str(path) in err and "not JSON" in err and "09 --answers writes a JSON list" in err


@pytest.mark.parametrize("entries", [[1, 2], [{"instruction": "a", "output": "b"}, 5], []])
def test_responses_that_are_not_a_list_of_objects_are_one_error(ev11, tmp_path, entries):
    path = tmp_path / "responses.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(ValueError, match="a JSON list of entries"):
        ev11.load_responses(path)


def test_hellaswag_is_read_from_data_where_02_fetches_it(ev11, tmp_path, monkeypatch, capsys):
    """No data/hellaswag_val.jsonl: one line naming the 02 command, before a model loads; with
    the file there, its lines load in HellaSwag's format."""
    monkeypatch.setattr(ev11, "DATA_DIR", tmp_path)
    not_a_model = tmp_path / "x.pt"  # loading it would fail with another message
    not_a_model.write_bytes(b"x")
    with pytest.raises(SystemExit) as stop:
        ev11.main(["--task=hellaswag", f"--ckpt={not_a_model}"])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: no ") and "02_dataloader.py --fetch=hellaswag" in error
    write_jsonl(tmp_path / "hellaswag_val.jsonl", HELLASWAG_LINES)
    examples = ev11.load_task("hellaswag", limit=2)
    assert [e["label"] for e in examples] == [3, 0]
    assert examples[0]["choices"][0] == " " + HELLASWAG_LINES[0]["endings"][0]


# -----------------------------------------------------------------------------
# The judge


RESPONSES = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue.", "model_response": "Red."},
    {"instruction": "Add 2 and 3.", "input": "", "output": "5", "model_response": "5"},
    {"instruction": "Say hi.", "input": "", "output": "Hi!", "model_response": "Hello."},
]
REPLIES = {"Red.": "Score: 85", "5": "100", "Hello.": "I would rather not say.",
           "Nothing.": None}  # a reply with "content": null, as some servers send
TOO_LONG = "A very long answer."  # the stub answers it with 400, as a judge does a long prompt


@contextlib.contextmanager
def stub_judge(status=200):
    """An OpenAI-style chat endpoint on a free port: it answers from REPLIES by the model's answer
    found in the prompt, or with `status` and an error body (with 400 for TOO_LONG)."""
    prompts = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt = body["messages"][0]["content"]
            prompts.append(prompt)
            answer = prompt.split("### Model's answer:\n")[1].split("\n")[0]
            content = REPLIES.get(answer)
            reply = {"choices": [{"message": {"role": "assistant", "content": content}}]}
            code = 400 if answer == TOO_LONG else status
            if code == 400:
                reply = {"error": {"code": "context_length_exceeded"}}
            elif status != 200:
                reply = {"error": {"message": "model 'judge' not found"}}
            data = json.dumps(reply).encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", prompts
    finally:
        server.shutdown()
        server.server_close()


def judge(ev11, tmp_path, entries, *flags) -> tuple[dict, list]:
    """main's result for entries written as a test_responses.json and judged by stub_judge, and
    the prompts the judge was sent."""
    responses = tmp_path / "test_responses.json"
    responses.write_text(json.dumps(entries))
    with stub_judge() as (url, prompts):
        argv = [f"--responses={responses}", f"--judge_url={url}", "--judge_model=judge"]
        return ev11.main([*argv, *flags, "--device=cpu"]), prompts


def test_no_score_at_all_is_a_null_mean_in_strict_json(ev11, tmp_path, capsys):
    """Every reply without a number: no mean, written as null (NaN is not JSON)."""
    out = tmp_path / "judged.json"
    result, _ = judge(ev11, tmp_path, RESPONSES[2:], f"--out_json={out}")  # "Hello.": no number
    assert result["scores"] == [] and result["mean"] is None

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    assert json.loads(out.read_text(), parse_constant=refuse)["mean"] is None


def test_a_null_reply_is_one_without_a_number(ev11, tmp_path):
    entry = {"instruction": "Say nothing.", "input": "", "output": "", "model_response": "Nothing."}
    result, _ = judge(ev11, tmp_path, [entry])
    assert result["scores"] == [] and result["no_number"] == [{"entry": 0, "reply": ""}]


def test_judge_scores_numbers_and_counts_replies_without_one(ev11, tmp_path, capsys):
    out = tmp_path / "judged.json"
    result, prompts = judge(ev11, tmp_path, RESPONSES, f"--out_json={out}")
    assert result["scores"] == [85, 100] and result["mean"] == 92.5
    assert [item["entry"] for item in result["no_number"]] == [2]  # shown, not scored 0
    assert result["by_tens"][8] == 1 and result["by_tens"][9] == 1
    first = prompts[0]  # the instruction (07's template), the reference and the answer
    assert "Name a colour." in first and "Blue." in first and "Red." in first
    report = capsys.readouterr().out
    assert "mean 92.5" in report and "I would rather not say." in report
    assert json.loads(out.read_text())["mean"] == 92.5


def test_a_request_that_fails_after_the_first_is_shown_and_skipped(ev11, tmp_path, capsys):
    """The judge refuses one answer (400, too long) after judging others: the run goes on, the
    failure is shown on its own line (not glued to the progress line) and listed, and --out_json
    holds every answer judged, before and after it."""
    entries = [*RESPONSES[:2], {**RESPONSES[0], "model_response": TOO_LONG}, RESPONSES[2]]
    out = tmp_path / "judged.json"
    result, prompts = judge(ev11, tmp_path, entries, f"--out_json={out}")
    assert len(prompts) == 4 and [item["entry"] for item in result["failed"]] == [2]
    assert result["scores"] == [85, 100] and [i["entry"] for i in result["no_number"]] == [3]
    assert "400" in result["failed"][0]["error"]
    assert json.loads(out.read_text())["failed"] == result["failed"]
    report = capsys.readouterr().out
    assert "\nentry 2 not scored:" in report and "failed requests: 1" in report


def test_failing_or_unreachable_judge_is_one_line_naming_the_url(ev11, tmp_path, capsys):
    responses = tmp_path / "r.json"
    responses.write_text(json.dumps(RESPONSES))
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with stub_judge(status=404) as (failing, _):
        for url, words in ((closed, "ollama serve"), (failing, "answered 404")):
            with pytest.raises(SystemExit) as e:
                ev11.main([f"--responses={responses}", f"--judge_url={url}",
                           "--judge_model=judge", "--device=cpu"])  # fmt: skip
            err = capsys.readouterr().err
            assert e.value.code == 2 and url in err and words in err and err.count("\n") == 1


@pytest.mark.parametrize("reply, score", [("85", 85), ("Score: 42/100", 42), ("none", None),
                                          ("1000 points, so 7", 7)])  # fmt: skip
def test_parse_score_takes_the_first_number_up_to_100(ev11, reply, score):
    assert ev11.parse_score(reply) == score


def test_judge_through_10s_server(ev11, tmp_path):
    """10_serve.py speaks OpenAI's API: the whole judge path runs against it (its tiny model's
    replies, each scored or shown), and a model it does not serve is one line."""
    serve10 = load_script("10_serve")
    model = rough_model(serve10, 50257, block_size=256)  # the judge's prompt: ~150 tokens
    server = serve10.make_server(model, serve10.get_tokenizer({"kind": "gpt2"}), "tiny", port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    responses = tmp_path / "r.json"
    responses.write_text(json.dumps(RESPONSES[:1]))  # a tiny model's whole context: ~1 s
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        argv = [f"--responses={responses}", f"--judge_url={url}", "--device=cpu"]
        result = ev11.main([*argv, "--judge_model=tiny"])
        assert result["n"] == 1 == len(result["scores"]) + len(result["no_number"])
        with pytest.raises(SystemExit) as e:  # a model it does not have
            ev11.main([*argv, "--judge_model=llama3.1"])
        assert e.value.code == 2
    finally:
        server.shutdown()
        server.server_close()


# -----------------------------------------------------------------------------
# A text: perplexity and bits per byte


@pytest.mark.parametrize(
    "n_tokens, block_size, stride", [(10, 4, 2), (50, 16, 5), (9, 16, 3), (33, 8, 8)]
)
def test_strided_windows_score_every_target_once(ev11, n_tokens, block_size, stride):
    windows = ev11.strided_windows(n_tokens, block_size, stride)
    T = min(block_size, n_tokens - 1)
    scored = []
    for begin, end, n in windows:
        assert end - begin == T and 1 <= n <= T
        scored += range(end - n + 1, end + 1)  # target positions in the text
        assert n == T or end - n - begin >= T - stride  # context of the first scored target
    assert scored == list(range(1, n_tokens))


def context_start(t: int, T: int, stride: int, n_tokens: int) -> int:
    """Where the context of target t begins, read off strided_windows' docstring, one position at
    a time: windows of T tokens, the first ids[0:T] (targets 1..T), each next one ending `stride`
    later, the last one ending the text; a target is scored by the first window that reaches it."""
    end = T
    while end < t:
        end = min(end + stride, n_tokens - 1)
    return end - T


@pytest.mark.parametrize("stride", [1, 10, 32])
def test_perplexity_equals_a_reference_computed_one_position_at_a_time(ev11, stride):
    """Each target's negative log-likelihood from the GPT's own forward over exactly the context the
    windows promise it: stride 1 is a sliding window (the last 32 tokens), 32 no overlap. Three
    windows share a forward pass, and the last pass is a short one."""
    line = "To be, or not to be: that is the question — Whether 'tis nobler in the mind to suffer "
    text = (line + "café. ") * 3
    tok = ev11.CharTokenizer.from_text(text)
    model = rough_model(ev11, tok.n_vocab, block_size=32).eval()
    result = ev11.text_scores(model, tok, text, stride=stride, batch_tokens=3 * 32)
    ids = tok.encode(text)
    nats = 0.0
    with torch.no_grad():
        for t in range(1, len(ids)):  # every target but the first character
            begin = context_start(t, 32, stride, len(ids))
            logits, _ = model(torch.tensor([ids[begin:t]]))  # (1, 1, V): the last position
            nats -= logits[0, -1].log_softmax(dim=-1)[ids[t]].item()
    n_bytes = len(text[1:].encode("utf-8"))  # the first character is context only
    assert n_bytes > len(text) - 1  # '—' and 'é' take more than one byte
    assert result["tokens"] == len(text) - 1 and result["bytes"] == n_bytes
    assert result["perplexity"] == pytest.approx(math.exp(nats / (len(text) - 1)), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)


def test_bits_per_byte_of_gpt2_scores_every_token(ev11):
    """With GPT-2's tokenizer the text follows an <|endoftext|>, so all its bytes are scored."""
    tok = ev11.get_tokenizer({"kind": "gpt2"})
    model = rough_model(ev11, tok.n_vocab, block_size=16).eval()
    text = "Hello, naïve world! 👋"
    result = ev11.text_scores(model, tok, text)
    ids = torch.tensor([tok.eot_token] + tok.encode(text))
    logits, _ = model(ids[None, :-1])
    nats = torch.nn.functional.cross_entropy(logits[0], ids[1:], reduction="sum").item()
    assert result["bytes"] == len(text.encode("utf-8"))
    bits_per_byte = nats / math.log(2) / len(text.encode())
    assert result["bits_per_byte"] == pytest.approx(bits_per_byte, rel=1e-5)


def test_text_file_on_the_command_line_with_compare_and_json(ev11, tmp_path, capsys):
    text = "to be, or not to be.\n" * 5
    (tmp_path / "eval.txt").write_text(text, encoding="utf-8")
    spec = {"kind": "char", "chars": CHARS}
    first = save_ckpt(rough_model(ev11, len(CHARS), seed=0), spec, tmp_path / "a.pt")
    second = save_ckpt(rough_model(ev11, len(CHARS), seed=1), spec, tmp_path / "b.pt")
    argv = [f"--ckpt={first}", f"--compare={second}", f"--text_file={tmp_path / 'eval.txt'}",
            f"--out_json={tmp_path / 'out.json'}", "--device=cpu"]  # fmt: skip
    result = ev11.main(argv)
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["tokens"] == len(text) - 1 and saved["compare"]["tokens"] == len(text) - 1
    assert saved["bits_per_byte"] != saved["compare"]["bits_per_byte"]  # two models, two numbers
    for scores in (result, result["compare"]):
        assert f"bits per byte {scores['bits_per_byte']:.4f}" in out


def test_compare_lays_out_both_models_windows_before_scoring(ev11, gpt2_model, tmp_path, capsys,
                                                              monkeypatch):  # fmt: skip
    """--text_file --compare, a char model beside a GPT-2 (fewer tokens, read after an
    <|endoftext|>): for every --stride, the run is refused with text_scores' own one line for
    the first model that text_scores refuses, before either is scored; else scoring begins."""
    text = "To be, or not to be, that is the question.\n"
    (tmp_path / "eval.txt").write_text(text, encoding="utf-8")
    first = save_ckpt(rough_model(ev11, len(CHARS)), {"kind": "char", "chars": CHARS},
                      tmp_path / "first.pt")  # fmt: skip
    second = save_ckpt(gpt2_model, {"kind": "gpt2"}, tmp_path / "second.pt")
    models = [ev11.load_checkpoint(path)[:2] for path in (first, second)]
    text_scores = ev11.text_scores
    monkeypatch.setattr(ev11, "text_scores", scored)
    argv = [f"--ckpt={first}", f"--compare={second}", f"--text_file={tmp_path / 'eval.txt'}"]
    refusers = set()  # which models text_scores refused, for some stride
    for stride in range(1, 66):  # past both windows (64 tokens at most)
        errors = {}
        for i, (model, tok) in enumerate(models):
            try:
                text_scores(model.eval(), tok, text, stride)
            except ValueError as e:
                errors[i] = f"error: {e}\n"
        refusers.add(tuple(errors))
        if errors:
            with pytest.raises(SystemExit):
                ev11.main([*argv, f"--stride={stride}", "--device=cpu"])
            assert capsys.readouterr().err == next(iter(errors.values())), stride
        else:
            with pytest.raises(Scored):
                ev11.main([*argv, f"--stride={stride}", "--device=cpu"])
    assert {(), (1,), (0, 1)} <= refusers  # none, the second only, both


def test_a_text_file_that_is_not_utf8_is_one_line(ev11, tmp_path, capsys):
    ckpt = save_ckpt(rough_model(ev11, len(CHARS)), {"kind": "char", "chars": CHARS},
                     tmp_path / "ckpt.pt")  # fmt: skip
    (tmp_path / "eval.txt").write_bytes(b"abc \xff\xfe cab\n")  # Latin-1 bytes, not UTF-8
    with pytest.raises(SystemExit) as e:
        ev11.main([f"--ckpt={ckpt}", f"--text_file={tmp_path / 'eval.txt'}", "--device=cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "is not UTF-8 text" in err and err.count("\n") == 1


def test_ctrl_c_stops_with_one_line_and_no_json(ev11, tmp_path, capsys, monkeypatch):
    ckpt = save_ckpt(rough_model(ev11, len(CHARS)), {"kind": "char", "chars": CHARS},
                     tmp_path / "ckpt.pt")  # fmt: skip
    (tmp_path / "eval.txt").write_text("to be.\n" * 3, encoding="utf-8")

    monkeypatch.setattr(ev11, "text_scores", interrupted)
    argv = [f"--ckpt={ckpt}", f"--text_file={tmp_path / 'eval.txt'}",
            f"--out_json={tmp_path / 'out.json'}", "--device=cpu"]  # fmt: skip
    assert exit_status(ev11.main, argv) == 130
    assert capsys.readouterr().err.strip() == "Ctrl-C: stopped"
    assert not (tmp_path / "out.json").exists()


def test_a_judge_that_cannot_be_reached_midway_stops_at_once(ev11, tmp_path, capsys,
                                                              monkeypatch):
    """A judge that stops answering after the first answer (it died, the network went) ends the
    run with one error line at once, instead of a timeout for every answer left."""
    post = ev11.requests.post
    calls = []

    def dies_after_one(*args, **kwargs):
        calls.append(args)
        if len(calls) > 1:
            raise ev11.requests.ConnectionError("refused")
        return post(*args, **kwargs)

    monkeypatch.setattr(ev11.requests, "post", dies_after_one)
    with pytest.raises(SystemExit) as stop:
        judge(ev11, tmp_path, RESPONSES)
    assert stop.value.code == 2 and len(calls) == 2
    assert "cannot reach the judge" in capsys.readouterr().err
