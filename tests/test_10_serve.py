"""Tests for 10_serve.py, the model's way out of this repo: the Hugging Face export, checked by
transformers itself (its logits and greedy tokens equal ours, its tokenizer gives tiktoken's ids),
and the OpenAI-compatible server, driven by the official openai client on 127.0.0.1 (a free port,
a thread of this process)."""

import contextlib
import dataclasses
import http.client
import json
import os
import queue
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor

import openai  # not importorskip: test-only dependencies, CI installs requirements-dev.txt
import pytest
import tiktoken
import torch
import transformers
from conftest import ROOT, roughen


def rough_model(serve10, vocab_size, bias=True, block_size=64, seed=0, gelu="tanh"):
    """A tiny GPT with large random weights (std 0.3, biases too): confident, varied predictions,
    so a wrong transpose or a missing bias changes the greedy tokens, not just the fifth decimal."""
    torch.manual_seed(seed)
    config = serve10.GPTConfig(
        block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32, bias=bias,
        gelu=gelu,
    )
    model = serve10.GPT(config)
    return roughen(model, biases=True)


CHARS = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
CHAR_SPEC = {"kind": "char", "chars": CHARS}


# -----------------------------------------------------------------------------
# The Hugging Face export


# GPT-2's tanh GELU, and the exact one that 05 trains with: each under its Hugging Face name
@pytest.mark.parametrize("kind, bias, gelu", [("gpt2", True, "tanh"), ("char", False, "none")])
def test_transformers_loads_the_export_with_our_logits_and_greedy_tokens(
    serve10, tmp_path, kind, bias, gelu
):
    vocab_size = 50257 if kind == "gpt2" else len(CHARS)
    spec = {"kind": "gpt2"} if kind == "gpt2" else CHAR_SPEC
    model = rough_model(serve10, vocab_size, bias=bias, gelu=gelu)
    serve10.export_hf(model, spec, tmp_path / "hf")
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", output_loading_info=True
    )
    assert not any(info.values()), info  # every weight found (zero biases too), none left over
    hf.eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied, as ours

    idx = torch.randint(vocab_size, (2, 64))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], atol=1e-4, rtol=1e-4)
    prompt = torch.randint(vocab_size, (8,)).tolist()
    steps = serve10.generate_tokens(model, prompt, temperature=0)  # the server's generation
    ours = [t for _, t in zip(range(30), steps)]
    assert len(set(ours)) > 5 and 50256 not in ours  # varied, and no end token for HF to stop at
    generated = hf.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False)
    theirs = generated[0, 8:].tolist()  # the new tokens, after the prompt's 8
    assert theirs == ours

    if kind == "char":  # weights + config + the character table, and what to do about tokenization
        assert json.loads((tmp_path / "hf" / "chars.json").read_text()) == spec
        assert "chars.json" in (tmp_path / "hf" / "README.txt").read_text()
        assert not (tmp_path / "hf" / "vocab.json").exists()


def test_safetensors_file_is_the_format(serve10, gpt04, tmp_path):
    """Our writer against the safetensors library and 04's reader: same names, shapes, dtypes,
    values."""
    from safetensors.torch import load_file

    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).half(),
        "c": torch.randn(2, 3).to(torch.bfloat16),
        "d": torch.randn(4, 2).t().contiguous(),
    }
    path = tmp_path / "t.safetensors"
    serve10.save_safetensors(tensors, path)
    header_length = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert header_length % 8 == 0
    for loaded in (load_file(path), gpt04.load_safetensors(path)):
        assert loaded.keys() == tensors.keys()
        for name, t in tensors.items():
            assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t)


def test_exported_tokenizer_gives_tiktokens_ids(serve10, tmp_path):
    serve10.export_hf(rough_model(serve10, 50257), {"kind": "gpt2"}, tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = tiktoken.get_encoding("gpt2")
    texts = [
        "Hello, I'm a language model,",
        "  two spaces\n\nand lines\t tab",
        "naïve café: 東京 🤖!",
        "numbers 1234567 and 3.14159",
        "it's don't we'll THEY'RE",
        "<|endoftext|>a document break",
    ]
    for text in texts:
        ids = ours.encode(text, allowed_special={"<|endoftext|>"})
        assert theirs(text)["input_ids"] == ids
        assert theirs.decode(ids) == text
    assert theirs.eos_token_id == 50256 and theirs.model_max_length == 64


def test_export_refuses_a_non_empty_directory_unless_overwrite(serve10, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        serve10.export_hf(rough_model(serve10, len(CHARS)), CHAR_SPEC, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_overwrite_replaces_the_exports_own_files_and_deletes_none(serve10, tmp_path):
    """--overwrite replaces the files that this export writes and no other: a user's README.txt
    and chars.json stay beside a GPT-2 export (transformers reads neither). A char model's export
    beside GPT-2's tokenizer files is refused, the folder left as it was: AutoTokenizer would load
    them for the char model, and a file's name does not say whose it is."""
    mine = {"README.txt": "my notes", "chars.json": "my table", "notes.txt": "mine"}
    for name, text in mine.items():
        (tmp_path / name).write_text(text)
    first = rough_model(serve10, 50257)
    serve10.export_hf(first, {"kind": "gpt2"}, tmp_path, overwrite=True)
    second = rough_model(serve10, 50257, seed=1)
    serve10.export_hf(second, {"kind": "gpt2"}, tmp_path, overwrite=True)  # an export's: replaced
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    idx = torch.randint(50257, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, second(idx)[0], atol=1e-4, rtol=1e-4)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).eos_token_id == 50256
    assert {name: (tmp_path / name).read_text() for name in mine} == mine

    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(FileExistsError, match="vocab.json, merges.txt, tokenizer_config.json"):
        serve10.export_hf(rough_model(serve10, len(CHARS)), CHAR_SPEC, tmp_path, overwrite=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_overwrite_with_a_gpt2_model_removes_a_char_exports_notes(serve10, tmp_path):
    """A GPT-2 export with --overwrite over a char model's export leaves none of its README.txt
    and chars.json: they would describe the model it replaced. Known by the README's text (the
    export's own), they go; a user's, of other words, stays (the test above)."""
    serve10.export_hf(rough_model(serve10, len(CHARS)), CHAR_SPEC, tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    model = rough_model(serve10, 50257)
    serve10.export_hf(model, {"kind": "gpt2"}, tmp_path, overwrite=True)
    assert not (tmp_path / "README.txt").exists() and not (tmp_path / "chars.json").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    idx = torch.randint(50257, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], atol=1e-4, rtol=1e-4)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).eos_token_id == 50256


# -----------------------------------------------------------------------------
# The server


@contextlib.contextmanager
def running(serve10, model, tokenizer_spec):
    """make_server on a free port (port=0), serving from a thread of this process until the with
    ends."""
    srv = serve10.make_server(model, serve10.get_tokenizer(tokenizer_spec), "tiny", port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)


DEADLINE_S = 10  # for a raw socket's answer: a tiny model's first token takes milliseconds


def openai_client(server):
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def server(serve10):
    with running(serve10, rough_model(serve10, 50257), {"kind": "gpt2"}) as srv:
        yield srv


@pytest.fixture
def client(server):
    return openai_client(server)


def complete(client, chat=False, stream=False, **kw):
    """The text of one completion (streamed: the chunks joined) and its finish_reason."""
    kw = {"model": "tiny", "max_tokens": 20, "temperature": 0} | kw
    if chat:
        kw.setdefault("messages", [{"role": "user", "content": "Name a colour."}])
        response = client.chat.completions.create(stream=stream, **kw)
        if not stream:
            return response.choices[0].message.content, response.choices[0].finish_reason
        chunks = [(c.choices[0].delta.content or "", c.choices[0].finish_reason) for c in response]
    else:
        kw.setdefault("prompt", "Once upon a time")
        response = client.completions.create(stream=stream, **kw)
        if not stream:
            return response.choices[0].text, response.choices[0].finish_reason
        chunks = [(c.choices[0].text, c.choices[0].finish_reason) for c in response]
    assert len(chunks) > 1 and all(f is None for _, f in chunks[:-1])  # really streamed, one end
    return "".join(t for t, _ in chunks), chunks[-1][1]


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
def test_greedy_answer_is_09s_and_streams_the_same_text(serve10, gen09, server, client, chat):
    text, finish = complete(client, chat)
    tok = server.tok
    prompt = tok.encode("Once upon a time")
    if chat:  # 07's template, encoded in two parts
        instruction = serve10.format_input({"instruction": "Name a colour."})
        prompt = tok.encode(instruction) + tok.encode(serve10.RESPONSE_HEADER)
    steps = gen09.generate_tokens(server.model, [prompt], temperature=0)  # 09's generation
    assert text == tok.decode([t.item() for _, (t, _) in zip(range(20), steps)])
    assert finish == "length" and len(text) > 20
    assert complete(client, chat, stream=True) == (text, finish)


def test_chat_ends_where_07_taught_it(serve10, server):
    """At <|endoftext|>, at the next "### " header, or after a whole context of tokens by
    default."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    body = {"model": "tiny", "stop": "X", "messages": messages}
    prompt, settings, end_token = serve10.parse_request(server, body, chat=True)
    tok = server.tok  # the last message is the instruction, in two parts as 07 encoded it
    instruction = tok.encode(serve10.format_input({"instruction": "Hi"}))
    assert prompt == instruction + tok.encode(serve10.RESPONSE_HEADER)
    assert settings["stop"] == ["X", "\n\n### "]
    assert end_token == 50256
    assert settings["max_tokens"] == 64


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
def test_temperature_and_top_p_sample_as_09s_generation(serve10, gen09, server, client, chat):
    """The server's draw at temperature 0.7 and top_p 0.9 is generate_tokens' with a generator of
    the same seed; a top_p so small that one token is left is the greedy answer."""
    tok = server.tok
    prompt = tok.encode("Once upon a time")
    if chat:  # 07's template, encoded in two parts
        instruction = serve10.format_input({"instruction": "Name a colour."})
        prompt = tok.encode(instruction) + tok.encode(serve10.RESPONSE_HEADER)
    settings = {"max_tokens": 24, "seed": 5}
    sampled = complete(client, chat, temperature=0.7, top_p=0.9, **settings)[0]
    generator = torch.Generator().manual_seed(5)
    steps = gen09.generate_tokens(server.model, [prompt], 0.7, top_p=0.9, generator=generator)
    assert sampled == tok.decode([t.item() for _, (t, _) in zip(range(24), steps)])
    greedy = complete(client, chat, temperature=0, **settings)[0]
    assert complete(client, chat, temperature=1.0, top_p=1e-9, **settings)[0] == greedy
    assert sampled != greedy  # so the two checks above are different checks


@pytest.mark.parametrize("temperature", [0, 0.8])
def test_the_servers_generation_is_09s_also_where_the_window_slides(serve10, gen09, temperature):
    """10 generates one sequence on 03's cache, 09 a batch on its own bookkeeping: the same tokens,
    from a prompt longer than the context through three contexts of new tokens (each full context
    slides to its last half and is re-encoded), with the same draws from a seeded generator."""
    model = rough_model(serve10, len(CHARS), block_size=16).eval()
    prompt = torch.randint(len(CHARS), (20,)).tolist()
    settings = dict(temperature=temperature, top_p=0.9)
    generator = torch.Generator().manual_seed(3)
    ours = serve10.generate_tokens(model, prompt, generator=generator, **settings)
    ours = [token for _, token in zip(range(48), ours)]
    generator = torch.Generator().manual_seed(3)
    theirs = gen09.generate_tokens(model, [prompt], generator=generator, **settings)
    theirs = [ids.item() for _, (ids, _) in zip(range(48), theirs)]
    assert ours == theirs
    assert len(set(ours)) > 3  # varied: a wrong slide would show


def test_seed_makes_sampling_repeatable(client):
    first = complete(client, temperature=1.0, seed=7)[0]
    assert complete(client, temperature=1.0, seed=7, stream=True)[0] == first
    assert complete(client, temperature=1.0, seed=8)[0] != first


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_ends_the_answer_before_it(client, stream):
    full = complete(client, max_tokens=30)[0]
    stop = full[12:15]
    text, finish = complete(client, max_tokens=30, stop=["never there", stop], stream=stream)
    assert (text, finish) == (full[: full.index(stop)], "stop")


def request(server, method, path, body=b""):
    """A raw HTTP request (the openai client cannot send broken JSON): (status, parsed JSON
    body)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    status, data = response.status, response.read()
    conn.close()
    return status, json.loads(data)


OK = {"model": "tiny", "prompt": "Hello"}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]}
P, C = "/v1/completions", "/v1/chat/completions"
BAD_REQUESTS = {  # name: (path, body, status, param)
    "malformed JSON": (P, b'{"model": "tiny", "prompt": ', 400, None),
    "not an object": (P, b'["tiny", "Hello"]', 400, None),
    "not UTF-8": (P, b'{"model": "\xff"}', 400, None),
    "nested too deep": (P, b"[" * 100_000 + b"]" * 100_000, 400, None),  # json's recursion
    "missing prompt": (P, {"model": "tiny"}, 400, "prompt"),
    "missing model": (P, {"prompt": "Hello"}, 400, "model"),
    "missing messages": (C, {"model": "tiny"}, 400, "messages"),
    "prompt not a string": (P, OK | {"prompt": 5}, 400, "prompt"),
    "max_tokens a string": (P, OK | {"max_tokens": "10"}, 400, "max_tokens"),
    "temperature a string": (P, OK | {"temperature": "hot"}, 400, "temperature"),
    "stream not a bool": (P, OK | {"stream": 1}, 400, "stream"),
    "seed a float": (P, OK | {"seed": 1.5}, 400, "seed"),
    "stop a number": (P, OK | {"stop": 3}, 400, "stop"),
    "messages not a list": (C, CHAT | {"messages": "Hi"}, 400, "messages"),
    "message without content": (C, CHAT | {"messages": [{"role": "user"}]}, 400, "messages"),
    "last message not the user's": (
        C, CHAT | {"messages": [{"role": "system", "content": "Hi"}]}, 400, "messages"
    ),
    "prompt longer than the context": (P, OK | {"prompt": "word " * 65}, 400, "prompt"),
    "chat longer than the context": (
        C, CHAT | {"messages": [{"role": "user", "content": "word " * 40}]}, 400, "messages"
    ),
    "max_tokens 0": (P, OK | {"max_tokens": 0}, 400, "max_tokens"),
    "max_tokens past the limit": (P, OK | {"max_tokens": 4097}, 400, "max_tokens"),
    "temperature 3": (P, OK | {"temperature": 3}, 400, "temperature"),
    "top_p 0": (P, OK | {"top_p": 0}, 400, "top_p"),
    "unknown model": (P, OK | {"model": "gpt-4"}, 404, "model"),  # OpenAI's status for it
    "misspelt field": (P, OK | {"max_tokns": 5}, 400, "max_tokns"),
    "misspelt model field": (P, {"modle": "tiny", "prompt": "Hi"}, 400, "modle"),
    "an OpenAI field not served": (C, CHAT | {"logprobs": True}, 400, "logprobs"),
    "chat's field in a completion": (P, OK | {"messages": CHAT["messages"]}, 400, "messages"),
    "n 2": (P, OK | {"n": 2}, 400, "n"),
    "n 2 in chat": (C, CHAT | {"n": 2}, 400, "n"),
    "a frequency_penalty": (C, CHAT | {"frequency_penalty": 0.5}, 400, "frequency_penalty"),
    "a presence_penalty": (P, OK | {"presence_penalty": -1}, 400, "presence_penalty"),
    "a penalty of false": (P, OK | {"presence_penalty": False}, 400, "presence_penalty"),
    "logprobs 0 in a completion": (P, OK | {"logprobs": 0}, 400, "logprobs"),  # the token's own
    "a usage chunk": (C, CHAT | {"stream_options": {"include_usage": True}}, 400, "stream_options"),
    "max_tokens and max_completion_tokens differ": (
        C, CHAT | {"max_tokens": 5, "max_completion_tokens": 6}, 400, "max_tokens"
    ),
    "unknown path": ("/v1/embeddings", OK, 404, None),
}  # fmt: skip


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_request_gets_openais_error_shape_and_the_server_goes_on(server, client, name):
    path, body, status, param = BAD_REQUESTS[name]
    if not isinstance(body, bytes):
        body = json.dumps(body)
    got_status, got = request(server, "POST", path, body)
    assert got_status == status
    assert set(got) == {"error"} and set(got["error"]) == {"message", "type", "param", "code"}
    assert got["error"]["param"] == param and got["error"]["message"]
    assert complete(client)[1] == "length"  # a normal request right after is answered


def test_fields_that_change_nothing_are_taken(client):
    """n: 1 (one answer, the only kind) and "user" (an end user's name, for OpenAI's abuse
    monitoring), which SDKs and chat UIs may send, are taken and change nothing."""
    assert complete(client, n=1, user="someone") == complete(client)
    assert complete(client, chat=True, n=1, user="someone") == complete(client, chat=True)


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
def test_openais_fields_at_their_defaults_are_taken(client, chat):
    """What OpenAI's clients and frameworks send with their defaults, asking for nothing this
    server lacks (no penalties, no log probabilities, no usage chunk), is answered as if absent;
    another value of such a field is a 400 naming it (BAD_REQUESTS)."""
    defaults = {"frequency_penalty": 0, "presence_penalty": 0.0, "logprobs": False}
    assert complete(client, chat, **defaults) == complete(client, chat)
    nulls = {"frequency_penalty": None, "logprobs": None, "stream_options": None}
    assert complete(client, chat, stream=True, **nulls) == complete(client, chat)
    usage_off = {"stream_options": {"include_usage": False}}
    assert complete(client, chat, stream=True, **usage_off) == complete(client, chat)


def test_max_completion_tokens_is_chats_max_tokens(client):
    """The openai client's max_completion_tokens (OpenAI's newer name for max_tokens in chat) is
    max_tokens, also beside a null max_tokens or an equal one, and not chat's default of a whole
    context; two different numbers are a 400 (BAD_REQUESTS)."""
    five = complete(client, chat=True, max_tokens=5)
    assert five[1] == "length"
    assert complete(client, chat=True, max_tokens=None, max_completion_tokens=5) == five
    assert complete(client, chat=True, max_tokens=5, max_completion_tokens=5) == five
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, chat=True, max_tokens=None, max_completion_tokens=0)
    assert "max" in e.value.body["param"]  # the number checked as max_tokens'


def test_one_model_is_retrieved_by_its_id(server, client):
    """GET /v1/models/<id> (the openai client's models.retrieve): the served model's object, as
    listed by GET /v1/models; another id is a 404."""
    assert client.models.retrieve("tiny") == client.models.list().data[0]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    status, got = request(server, "GET", "/v1/models/tiny?x=1")
    assert status == 200 and got["id"] == "tiny"


def test_an_empty_prompt_starts_a_new_document(server, client, serve10):
    """"" is a prompt OpenAI answers: a GPT-2-token model starts from <|endoftext|>, as 09 does. A
    char model has no such token: a 400 naming the prompt, which is not too long (the code says
    so: not context_length_exceeded)."""
    answer = client.completions.create(model="tiny", prompt="", max_tokens=8, temperature=0)
    from_eot = complete(client, prompt="<|endoftext|>", max_tokens=8)
    assert (answer.choices[0].text, answer.choices[0].finish_reason) == from_eot
    assert answer.usage.prompt_tokens == 1
    with running(serve10, rough_model(serve10, len(CHARS)), CHAR_SPEC) as srv:
        status, got = request(srv, "POST", P, json.dumps({"model": "tiny", "prompt": ""}))
        assert status == 400 and got["error"]["param"] == "prompt"
        assert got["error"]["code"] == "invalid_value", got
        assert complete(openai_client(srv), prompt="ROMEO:")[1] == "length"


def test_unknown_get_path_is_404_and_the_client_sees_openais_errors(server, client):
    status, got = request(server, "GET", "/v1/nothing")
    assert status == 404 and "error" in got
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="Hi")
    assert e.value.body["code"] == "model_not_found"
    assert complete(client)[1] == "length"


def test_a_query_string_is_no_part_of_the_route(server):
    """A query string (?x=1, as a proxy or an SDK's default_query may add) is ignored on every
    route: each answers as it does without one."""
    status, got = request(server, "GET", "/v1/models?x=1")
    assert status == 200 and [m["id"] for m in got["data"]] == ["tiny"]
    for path, body in ((P, OK), (C, CHAT)):
        body = json.dumps(body | {"max_tokens": 2})
        status, got = request(server, "POST", f"{path}?x=1&y=2", body)
        assert status == 200 and got["choices"][0]["finish_reason"] == "length", got


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS", "NONSUCH"])
def test_a_method_no_route_takes_gets_openais_json_error(server, client, method):
    """PUT, DELETE or any method no route takes gets what OpenAI's API answers a method it does
    not serve: a 404 in its JSON error shape, naming the request, not the standard library's HTML
    501 page (the body is read first: a socket closed on unread data is reset)."""
    for path in ("/v1/models", C):
        status, got = request(server, method, path, json.dumps(CHAT))
        assert status == 404
        assert set(got) == {"error"} and set(got["error"]) == {"message", "type", "param", "code"}
        assert f"{method} {path}" in got["error"]["message"]
    status, got = request(server, method, "/", json.dumps(CHAT))  # the root: named as "/"
    assert status == 404 and f"no route {method} /:" in got["error"]["message"]
    assert complete(client)[1] == "length"  # and the server goes on


def test_eight_concurrent_clients_all_get_complete_answers(client):
    prompts = [f"Client number {i} says" for i in range(8)]
    expected = [complete(client, prompt=p) for p in prompts]  # one at a time

    def ask(i):  # half of them streamed
        return complete(client, prompt=prompts[i], stream=i % 2 == 1)

    with ThreadPoolExecutor(8) as pool:  # all at once
        answers = list(pool.map(ask, range(8)))
    assert answers == expected


def test_two_overlapping_requests_are_answered_one_at_a_time(serve10, server, client, monkeypatch):
    """The server's lock: a second request waits for the first answer to end. The first answer
    holds on until the second request waits at the lock (or, without one, generates too), so that
    they overlap whatever the threads' timing; none may generate while the other does."""
    counts = {"waiting": 0, "generating": 0, "most_generating": 0}
    changed = threading.Condition()
    lock = server.lock

    class WatchedLock:  # the server's own lock, counting who has come to it
        def __enter__(self):
            with changed:
                counts["waiting"] += 1
                changed.notify_all()
            return lock.__enter__()

        def __exit__(self, *exc_info):
            return lock.__exit__(*exc_info)

    def second_came() -> bool:  # to the lock, or (without a lock) into generation
        return counts["waiting"] == 2 or counts["generating"] == 2

    stream_text = serve10.stream_text

    def watched_stream_text(*args, **kwargs):
        with changed:
            counts["generating"] += 1
            counts["most_generating"] = max(counts["most_generating"], counts["generating"])
            changed.notify_all()
            both_came = changed.wait_for(second_came, timeout=DEADLINE_S)
            assert both_came, f"the second request did not come in {DEADLINE_S} s"
        try:
            yield from stream_text(*args, **kwargs)
        finally:
            with changed:
                counts["generating"] -= 1

    monkeypatch.setattr(server, "lock", WatchedLock())
    monkeypatch.setattr(serve10, "stream_text", watched_stream_text)
    prompts = ["One at", "a time"]
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda p: complete(client, prompt=p), prompts))
    assert counts["most_generating"] == 1, "two answers were generated at once"
    monkeypatch.undo()  # the answers, each as it is alone
    assert answers == [complete(client, prompt=p) for p in prompts]


def test_client_dropping_mid_stream_leaves_the_server_answering(server, client):
    body = json.dumps(OK | {"max_tokens": 64, "stream": True}).encode()
    # a deadline for each recv and one for them all: a server that does not stream fails the test
    # in seconds, whether it closes the connection (recv gives b"") or keeps it open (timeout)
    sock = socket.create_connection(server.server_address, timeout=DEADLINE_S)
    request_head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    sock.sendall(request_head + body)
    received = b""
    deadline = time.monotonic() + DEADLINE_S
    while b"data: " not in received:  # the answer has begun
        assert time.monotonic() < deadline, f"no event in {DEADLINE_S} s: {received[:300]!r}"
        chunk = sock.recv(4096)  # TimeoutError after DEADLINE_S seconds of silence
        assert chunk, f"the server closed the connection without an event: {received[:300]!r}"
        received += chunk
    assert b"text/event-stream" in received
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
    sock.close()
    assert complete(client, stream=True)[1] == "length"
    assert complete(client)[1] == "length"


def test_a_body_over_the_limit_is_refused_unread(server):
    """Content-Length over MAX_BODY: 413 before reading (reading it would allocate it all)."""
    sock = socket.create_connection(server.server_address, timeout=DEADLINE_S)
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999\r\n\r\n"
    sock.sendall(head)
    status_line = sock.makefile("rb").readline()
    sock.close()
    assert status_line.split()[1] == b"413", status_line


@pytest.mark.parametrize("length", [b"-1", b"1e3", "\u00b2".encode("latin-1")])  # "²".isdigit()
def test_a_content_length_that_is_not_a_number_is_a_400(server, client, length):
    sock = socket.create_connection(server.server_address, timeout=DEADLINE_S)
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %s\r\n\r\n" % length
    sock.sendall(head)
    status_line = sock.makefile("rb").readline()
    sock.close()
    assert status_line.split()[1] == b"400", status_line
    assert complete(client)[1] == "length"  # the server goes on


def test_stream_is_server_sent_events_ending_in_done(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    body = json.dumps(CHAT | {"stream": True, "max_tokens": 5})
    conn.request("POST", "/v1/chat/completions", body)
    response = conn.getresponse()
    assert response.getheader("Content-Type") == "text/event-stream"
    events = response.read().decode().split("\n\n")
    conn.close()
    chunks = events[:-2]
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: {") for e in chunks)
    assert [json.loads(e[6:])["object"] for e in chunks] == ["chat.completion.chunk"] * len(chunks)


def test_character_model_server(serve10):
    """A character model: characters outside its vocabulary are a 400 naming them, on both
    endpoints alike (never a silent "?"); chat replaces only its template's own (07's has '#'),
    and ends the answer at a newline, as 07 trained it."""
    model = rough_model(serve10, len(CHARS), block_size=256)
    with running(serve10, model, CHAR_SPEC) as srv:
        client = openai_client(srv)
        text = "Café for 2, ROMEO?"
        missing = sorted(set(text) - set(CHARS))  # é and 2
        chat = {"messages": [{"role": "user", "content": text}]}
        asks = {"prompt": client.completions.create, "messages": client.chat.completions.create}
        for param, create in asks.items():
            request = {"prompt": text} if param == "prompt" else chat
            with pytest.raises(openai.BadRequestError) as refused:
                create(model="tiny", max_tokens=5, **request)
            error = refused.value.body
            assert error["param"] == param and "from_text" not in error["message"]
            assert all(ch in error["message"] for ch in missing), error["message"]
        text, finish = complete(client, chat=True, temperature=1.0, seed=0, max_tokens=200)
        assert "\n" not in text and (finish == "stop") == (len(text) < 200)
        greedy = complete(client, prompt="ROMEO:", max_tokens=50)
        assert complete(client, prompt="ROMEO:", max_tokens=50, stream=True) == greedy


@pytest.fixture
def tf32_off():
    """TF32 switched off for a test, and back as it was after: the flag is the process's."""
    matmul_before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = matmul_before


def test_make_server_switches_tf32_on_for_a_cuda_model(serve10, tf32_off):
    """make_server's docstring says the fp32 matmuls run in TF32 on CUDA: it switches TF32 on
    itself, so a server made by a test or a benchmark computes as `--serve` does."""
    tok = serve10.get_tokenizer(CHAR_SPEC)
    serve10.make_server(rough_model(serve10, len(CHARS)), tok, "tiny", port=0).server_close()
    assert not torch.backends.cuda.matmul.allow_tf32  # a CPU model: left as it was
    if torch.cuda.is_available():
        cuda_model = rough_model(serve10, len(CHARS)).cuda()
    else:  # what make_server reads of a model: where its weights are, and eval()
        weight = types.SimpleNamespace(device=torch.device("cuda"))
        cuda_model = types.SimpleNamespace(lm_head=types.SimpleNamespace(weight=weight))
        cuda_model.eval = lambda: cuda_model
    serve10.make_server(cuda_model, tok, "tiny", port=0).server_close()
    assert torch.backends.cuda.matmul.allow_tf32  # cuDNN's: convolutions, none here


# -----------------------------------------------------------------------------
# The command line


STARTUP_DEADLINE_S = 60  # python, torch and the checkpoint loaded, on a busy machine


def first_line_with(proc, word: str, seconds: float) -> str:
    """The first line of proc's stdout that holds word. A thread reads it, so that a process that
    never prints it fails the test after `seconds` instead of hanging it (readline has no
    deadline)."""
    found = queue.Queue()

    def read():
        for line in proc.stdout:
            if word in line:
                found.put(line)
                return
        found.put(None)  # stdout closed: the process ended

    threading.Thread(target=read, daemon=True).start()
    try:
        line = found.get(timeout=seconds)
    except queue.Empty:
        pytest.fail(f"no {word!r} line on stdout in {seconds} s")
    assert line is not None, f"the process exited before printing {word!r}"
    return line


def save_ckpt(model, spec, path):
    """A checkpoint as 05-08 write it (the keys load_checkpoint reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {
        "model": model.state_dict(),
        "model_args": dataclasses.asdict(model.config),
        "tokenizer": spec,
        "config": {},
        "stage": "finetune",
        "iter_num": 0,
    }
    torch.save(ckpt, path)
    return path


def test_export_from_the_command_line(serve10, tmp_path, capsys):
    model = rough_model(serve10, len(CHARS), bias=False)
    ckpt = save_ckpt(model, CHAR_SPEC, tmp_path / "out" / "finetune" / "ckpt.pt")
    export_dir = tmp_path / "hf"
    out = serve10.main([f"--ckpt={ckpt}", f"--export_hf={export_dir}", "--device=cpu"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    idx = torch.randint(len(CHARS), (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], atol=1e-4, rtol=1e-4)
    capsys.readouterr()  # transformers' progress bars
    bpe_dir = tmp_path / "bpe"  # a GPT-2 tokenizer, which a char model must not be exported beside
    bpe_dir.mkdir()
    (bpe_dir / "vocab.json").write_text("{}")
    refused = [
        ([f"--export_hf={export_dir}"], "is not empty"),
        ([], "nothing to do"),
        (["--serve", "--port=70000"], "--port"),
        ([f"--export_hf={ckpt}"], "is a file, or in one"),  # the checkpoint stays as it was
        ([f"--export_hf={ckpt / 'hf'}"], "is a file, or in one"),  # found before loading
        ([f"--export_hf={bpe_dir}", "--overwrite"], "GPT-2 tokenizer (vocab.json)"),
    ]
    for argv, message in refused:
        with pytest.raises(SystemExit) as e:
            serve10.main([f"--ckpt={ckpt}", "--device=cpu", *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, err
    assert serve10.load_checkpoint(ckpt)[2]["stage"]


@pytest.mark.parametrize("mid_answer", [False, True])
def test_serve_from_the_command_line_and_stop_it_with_ctrl_c(serve10, tmp_path, mid_answer):
    """`python 10_serve.py --serve --port=0` answers the openai client under the checkpoint's
    name; Ctrl-C (SIGINT) stops it with one line and no traceback, exit status 130, also while a
    request's thread is inside the model (an interpreter exit under it aborted: SIGABRT)."""
    ckpt_path = tmp_path / "out" / "tiny" / "ckpt.pt"
    ckpt = save_ckpt(rough_model(serve10, 50257), {"kind": "gpt2"}, ckpt_path)
    command = [sys.executable, "10_serve.py", f"--ckpt={ckpt}", "--serve", "--port=0"]
    command += ["--device=cpu", "--threads=1"]
    proc = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
        # SIGINT as from a terminal: a shell that runs pytest in the background ignores it, and
        # its children inherit that; the default restored, the server sees what a user's does
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        line = first_line_with(proc, "serving", seconds=STARTUP_DEADLINE_S)
        url = line.split(" at ")[1].split()[0]  # http://127.0.0.1:PORT/v1
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=30)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        assert complete(client, chat=True)[1] == "length"
        if mid_answer:  # the first token streamed: the answer's thread is generating the next
            stream = client.completions.create(model="tiny", prompt="a", max_tokens=4096,
                                               stream=True)
            next(iter(stream))
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=DEADLINE_S)
    finally:
        with contextlib.suppress(ProcessLookupError):  # gone already, if Ctrl-C stopped it
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert "Traceback" not in err, err
    assert len(out.split()) > 1 and len(out.strip().splitlines()) == 1, out  # one line, words
    assert proc.returncode == 130


def test_ctrl_c_during_an_export_is_one_line_and_leaves_no_half_model(serve10, tmp_path, capsys,
                                                                     monkeypatch):
    ckpt = save_ckpt(rough_model(serve10, len(CHARS)), CHAR_SPEC, tmp_path / "ckpt.pt")

    def interrupted(source, target):  # Ctrl-C as the weights are written, before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(serve10.os, "replace", interrupted)
    with pytest.raises(SystemExit) as stop:
        serve10.main([f"--ckpt={ckpt}", f"--export_hf={tmp_path / 'hf'}", "--device=cpu"])
    out, err = capsys.readouterr()
    assert stop.value.code == 130 and out.strip() == "Ctrl-C: stopped" and not err
    assert list((tmp_path / "hf").iterdir()) == []  # no .tmp, and no config without its weights


def test_a_port_in_use_or_a_bad_host_is_one_line_before_loading(
    serve10, tmp_path, capsys, monkeypatch
):
    """Each is `error: --setting: why; the fix`, exit status 2, before the model is loaded."""
    ckpt = save_ckpt(rough_model(serve10, len(CHARS)), CHAR_SPEC, tmp_path / "ckpt.pt")
    monkeypatch.setattr(serve10, "load_checkpoint", lambda path: pytest.fail("loaded the model"))
    with socket.create_server(("127.0.0.1", 0)) as taken:  # a port in use, by another socket
        port = taken.getsockname()[1]
        fixes = {f"--port={port}": "--port=0", "--host=no.such.host": "--host=127.0.0.1",
                 "--host=": "0.0.0.0"}  # empty: every network, which a user says explicitly
        for setting, fix in fixes.items():
            with pytest.raises(SystemExit) as e:
                serve10.main([f"--ckpt={ckpt}", "--serve", "--device=cpu", setting])
            err = capsys.readouterr().err
            assert e.value.code == 2 and err.startswith(f"error: {setting}:"), err
            assert err.count("\n") == 1 and fix in err, err


def test_a_missing_checkpoint_names_the_script_that_writes_it(
    serve10, pre05, ft07, dpo08, tmp_path, capsys, monkeypatch
):
    """Each stage's default out_dir, read from its own config, and 04's data/gpt2*/: the hint is
    the command that writes the missing ckpt.pt, its --out_dir the checkpoint's folder."""
    project = tmp_path / "project"  # empty: every default checkpoint is missing
    monkeypatch.setattr(serve10, "PROJECT", project)
    configs = {"05_pretrain.py": pre05.TrainConfig, "07_finetune.py": ft07.FinetuneConfig}
    configs["08_dpo.py"] = dpo08.DPOConfig
    hints = {f"{config.out_dir}/ckpt.pt": f"python {script} --out_dir={config.out_dir}`"
             for script, config in configs.items()}
    hints["data/gpt2-medium/ckpt.pt"] = "python 04_gpt.py --init_from=gpt2-medium --save_ckpt`"
    hints[f"{tmp_path}/elsewhere/ckpt.pt"] = f"--out_dir={tmp_path}/elsewhere`"
    for ckpt, hint in hints.items():
        with pytest.raises(SystemExit):
            serve10.main([f"--ckpt={ckpt}", "--serve", "--device=cpu"])
        err = capsys.readouterr().err
        assert err.startswith(f"error: --ckpt={project / ckpt}: no such file") and hint in err
    with pytest.raises(SystemExit):  # a file no script writes: no command would make it
        serve10.main(["--ckpt=out/nope.pt", "--serve", "--device=cpu"])
    err = capsys.readouterr().err
    assert "check the path" in err and "--out_dir" not in err, err
    with pytest.raises(SystemExit):  # 05's best.pt: 05 writes it
        serve10.main(["--ckpt=out/run/best.pt", "--serve", "--device=cpu"])
    assert "`python 05_pretrain.py --out_dir=out/run` writes it" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a folder's name, not there yet: 08's, by its name
        serve10.main(["--ckpt=out/dpo-new", "--serve", "--device=cpu"])
    assert "`python 08_dpo.py --out_dir=out/dpo-new` writes it" in capsys.readouterr().err
    (project / "out" / "run").mkdir(parents=True)  # an out_dir given as --ckpt, still empty
    with pytest.raises(SystemExit):
        serve10.main(["--ckpt=out/run", "--serve", "--device=cpu"])
    assert "`python 05_pretrain.py --out_dir=out/run` writes it" in capsys.readouterr().err
    (project / "out" / "run" / "ckpt.pt").write_bytes(b"")  # with a checkpoint: name the file
    with pytest.raises(SystemExit):
        serve10.main(["--ckpt=out/run", "--serve", "--device=cpu"])
    err = capsys.readouterr().err
    assert f"a folder: --ckpt={project / 'out' / 'run' / 'ckpt.pt'} names its checkpoint" in err
    with pytest.raises(SystemExit):  # no --ckpt: 05's model, the Quick start's
        serve10.main(["--serve", "--device=cpu"])
    hint = f"`python 05_pretrain.py --out_dir={pre05.TrainConfig.out_dir}`"
    assert hint in capsys.readouterr().err


def test_relative_paths_start_from_the_project_folder(serve10, tmp_path, monkeypatch):
    """Run from anywhere, a relative --ckpt and --export_hf mean the same folders: the project's,
    where 05-08 wrote the checkpoint."""
    out_dir = ROOT / "out"
    out_dir_was_there = out_dir.exists()
    run_dir = out_dir / f"test-10-{os.getpid()}"  # under the project, removed at the end
    monkeypatch.chdir(tmp_path)
    try:
        save_ckpt(rough_model(serve10, len(CHARS)), CHAR_SPEC, run_dir / "ckpt.pt")
        relative = run_dir.relative_to(ROOT)
        argv = [f"--ckpt={relative}/ckpt.pt", f"--export_hf={relative}/hf", "--device=cpu"]
        assert serve10.main(argv) == run_dir / "hf"
        assert (run_dir / "hf" / "config.json").is_file() and not any(tmp_path.iterdir())
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        if not out_dir_was_there:
            with contextlib.suppress(OSError):  # not empty: another test's, or a user's, files
                out_dir.rmdir()
