"""Stage 10: the model out of this repo: a Hugging Face export, and an OpenAI-compatible server.

A model trained here lives in a ckpt.pt that only these scripts read; its users live elsewhere:
  - Hugging Face's format is read by transformers, vLLM, TGI, lm-evaluation-harness and
    llama.cpp's converters. `--export_hf=DIR` writes it with our own code: config.json,
    model.safetensors (8 bytes of header length, a JSON header, the raw tensors: no pickle) in
    04's names, whose loader we run backwards, and GPT-2's tokenizer files (OpenAI's, renamed).
  - OpenAI's HTTP API is spoken by chat UIs and SDKs. `--serve` answers GET /v1/models and POST
    /v1/completions and /v1/chat/completions (streamed as server-sent events on request) with 09's
    sampling on 03's KV cache and 07's chat template, on the standard library's HTTP server: no new
    dependency. A lesson and a local tool: for real traffic, serve the export with vLLM or TGI.

References: the safetensors format (github.com/huggingface/safetensors); transformers' GPT2Config;
OpenAI's API reference (completions, chat, streaming); server-sent events (HTML standard).

Run it (after `python 05_pretrain.py`, which writes out/shakespeare-char/ckpt.pt):
  python 10_serve.py --export_hf=out/hf                   # 05's model in Hugging Face's format
  python 10_serve.py --ckpt=out/finetune/ckpt.pt --serve  # 07's model at http://127.0.0.1:8000/v1
  curl http://127.0.0.1:8000/v1/chat/completions -H "Content-Type: application/json" \
      -d '{"model": "finetune", "messages": [{"role": "user", "content": "Name a colour."}]}'
  python 10_serve.py --ckpt=out/finetune/ckpt.pt --serve --device=cuda   # on one GPU
"""

import argparse
import codecs
import errno
import json
import math
import os
import pickle
import socket
import struct
import sys
import threading
import time
import uuid
from dataclasses import dataclass, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Annotated

import torch
import torch.nn as nn
import torch.nn.functional as F

PROJECT = Path(__file__).resolve().parent  # relative paths (flags, defaults) resolve here
DEFAULT_CKPT = "out/shakespeare-char/ckpt.pt"  # what `python 05_pretrain.py` writes

# -----------------------------------------------------------------------------
# Export: a checkpoint as a Hugging Face GPT-2 (config.json, model.safetensors, tokenizer files)

def gpt_to_hf_state_dict(model) -> dict[str, torch.Tensor]:
    """Our weights in Hugging Face's GPT2LMHeadModel layout: 04's hf_to_gpt_state_dict, backwards.
    The names are already its own (04 chose them so), but its Conv1D stores the four projection
    weights as (in, out): transposed back. lm_head is left out (transformers ties it to wte
    itself), and a model trained with bias=False gets zero biases: GPT-2 has them everywhere."""
    hf_state = {name: p.detach().cpu() for name, p in model.state_dict().items()}
    del hf_state["lm_head.weight"]
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":  # each a Conv1D in GPT-2
            hf_state[f"{name}.weight"] = hf_state[f"{name}.weight"].t().contiguous()
        gpt2_has_bias = isinstance(module, (nn.Linear, nn.LayerNorm)) and name != "lm_head"
        if gpt2_has_bias and module.bias is None:
            hf_state[f"{name}.bias"] = torch.zeros(len(module.weight), dtype=module.weight.dtype)
    return hf_state


def save_safetensors(tensors: dict[str, torch.Tensor], path) -> None:
    """The format 04's load_safetensors reads, no pickle: 8 bytes (little-endian) giving the length
    of a JSON header {name: {"dtype", "shape", "data_offsets": [begin, end]}}, then raw bytes."""
    dtype_names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        end = offset + t.numel() * t.element_size()
        dtype = dtype_names[t.dtype]
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
    header_bytes = json.dumps(header).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # pad with spaces: the data starts 8-aligned
    tmp = Path(f"{path}.tmp")  # renamed once whole: a Ctrl-C leaves no half a model
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(header_bytes)) + header_bytes)  # its length, then it
            for t in tensors.values():
                f.write(t.reshape(-1).view(torch.uint8).numpy())  # the raw bytes, no copy
        os.replace(tmp, path)
    finally:  # a Ctrl-C or a full disk: no .tmp left behind either
        tmp.unlink(missing_ok=True)


def export_hf(model, tokenizer_spec: dict, out_dir, overwrite: bool = False) -> Path:
    """Write the model to out_dir as a Hugging Face GPT-2 that loads with no code of ours:
    AutoModelForCausalLM.from_pretrained(out_dir), and AutoTokenizer for GPT-2's tokens (OpenAI's
    files, renamed). transformers has no char tokenizer: char models get chars.json, README.txt."""
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty: use an empty --export_hf folder or --overwrite")
    # --overwrite replaces the files an export writes and deletes none: another may be the user's
    gpt2 = [n for n in ("vocab.json", "merges.txt", "tokenizer_config.json") if (out / n).exists()]
    if tokenizer_spec["kind"] == "char" and gpt2:
        fix = "AutoTokenizer would load it for this char model: remove it, or pick an empty folder"
        raise FileExistsError(f"{out} holds a GPT-2 tokenizer ({', '.join(gpt2)}); {fix}")
    out.mkdir(parents=True, exist_ok=True)
    c = model.config
    eot_id = 50256 if tokenizer_spec["kind"] == "gpt2" else None  # <|endoftext|>; chars: none
    config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": c.vocab_size, "n_positions": c.block_size,
        "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head,
        "activation_function": {"tanh": "gelu_new", "none": "gelu"}[c.gelu],  # its names
        "layer_norm_epsilon": 1e-5,  # nn.LayerNorm's eps
        "tie_word_embeddings": True,  # lm_head = wte
        "bos_token_id": eot_id, "eos_token_id": eot_id,
    }  # fmt: skip
    save_safetensors(gpt_to_hf_state_dict(model), out / "model.safetensors")
    # config.json last: a folder that holds one holds a whole model (a Ctrl-C stops before it)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    readme = (  # a char model's README.txt: a file with this text is an export's, no user's
        "A character-level GPT-2: token id i is the character chars[i], where\n"
        "chars = json.load(open('chars.json'))['chars']. transformers has no tokenizer\n"
        "for it: encode a text as [chars.index(ch) for ch in text], decode ids as\n"
        "''.join(chars[i] for i in ids). Other characters cannot be encoded, and a text\n"
        "(prompt and new tokens) holds at most n_positions tokens (config.json).\n"
    )
    if eot_id is None:
        (out / "chars.json").write_text(json.dumps(tokenizer_spec, ensure_ascii=False))
        (out / "README.txt").write_text(readme)
        return out
    # tiktoken fetched these files (sha256-checked) to build GPT-2's encoding: read from its cache
    from tiktoken.load import read_file_cached
    for hf_name, openai_name in (("vocab.json", "encoder.json"), ("merges.txt", "vocab.bpe")):
        data = read_file_cached(f"{GPT2_URL}/{openai_name}", GPT2_FILES[openai_name])
        (out / hf_name).write_bytes(data)
    eot = "<|endoftext|>"
    tokenizer_config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": c.block_size,
                        "bos_token": eot, "eos_token": eot, "unk_token": eot}  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    # a char export's README.txt and the chars.json it names would tell of the model replaced
    if (out / "README.txt").is_file() and (out / "README.txt").read_bytes() == readme.encode():
        for name in ("chars.json", "README.txt"):
            (out / name).unlink(missing_ok=True)
    return out


# -----------------------------------------------------------------------------
# Serve: OpenAI's HTTP API (completions, chat completions, streamed as server-sent events)

# One request at a time (the server's lock), so one sequence: none of 09's batch bookkeeping (left
# padding, a mask, each row's positions), only its rules. The model knows block_size positions; when
# the context is full, the window slides by half: the last block_size // 2 tokens are re-encoded
# into a fresh cache (sliding by one would leave every cached key stale: each was computed at its
# position), so an answer may outrun the context. 09's sample draws each token: temperature and
# top_p reshape the probabilities p (temperature 0: argmax), then argmax(p / E), E ~ Exp(1) from the
# seeded generator, is a draw from p, as torch.multinomial's: E_i / p_i is exponential with rate
# p_i; the least is i w.p. p_i. Token for token: 09's generate_tokens on a batch of one (tested).
@torch.no_grad()
def generate_tokens(model, prompt: list[int], temperature=1.0, top_p=None, generator=None):
    """Yield the ids that follow prompt (1+ ids), one a step, for ever: the caller stops it."""
    block_size = model.config.block_size
    device = model.lm_head.weight.device
    context = prompt[-block_size:]  # (parse_request refuses a longer prompt; a caller's is cut)
    cache = KVCache(model.config.n_layer, block_size)  # 03's
    while True:
        idx = torch.tensor([context[cache.length :]], device=device)  # (1, T): what is not cached
        hidden = final_hidden(model, idx, cache=cache)[:, -1]  # (1, C): positions from cache.length
        logits = model.lm_head(hidden)  # (1, V)
        token = sample(logits, temperature, top_p=top_p, generator=generator).item()
        yield token
        context.append(token)  # context is a copy: the caller's prompt stays as it was
        if len(context) > block_size:  # no position left for this token: slide, into a new cache
            context = context[-max(1, block_size // 2) :]  # its last half, at least 1 token
            cache = KVCache(model.config.n_layer, block_size)


def stream_text(model, tok, prompt: list[int], settings: dict, end_token=None):
    """Yield (text, None) per new token before end_token (text "" while held back), then (the
    rest, finish_reason): "stop" at end_token or a stop string, "length" after max_tokens tokens."""
    generator = torch.Generator(device=model.lm_head.weight.device)
    generator.seed()  # a random seed of its own
    if settings["seed"] is not None:  # or the one the request names
        generator.manual_seed(settings["seed"])
    stream = TextStream(tok, settings["stop"])
    steps = generate_tokens(model, prompt, settings["temperature"], settings["top_p"], generator)
    for _, token in zip(range(settings["max_tokens"]), steps):  # range first: none made past them
        if token != end_token:
            yield stream.add(token), None
        if token == end_token or stream.stopped:
            yield stream.finish(), "stop"
            return
    yield stream.finish(), "length"


class APIError(Exception):
    """A request we refuse, as OpenAI does: a status and {"error": {message, type, param, code}}."""

    def __init__(self, msg: str, param=None, code="invalid_value", status=400):
        super().__init__(msg)
        self.status = status
        error = {"message": msg, "type": "invalid_request_error", "param": param, "code": code}
        self.body = {"error": error}


MAX_TOKENS = 4096  # per request: the window slides past the context; this bounds the wait
MAX_BODY = 1_000_000  # bytes: a prompt of a context's tokens is a few kB
ROUTES = ["GET /v1/models", "POST /v1/completions", "POST /v1/chat/completions"]


# The optional settings: name -> (default, check, what a value must be). The checks ask type(v),
# not isinstance: JSON's true is a bool, and a Python bool is an int. n (answers per request) takes
# 1 only: ignoring another value would answer a request that was not made. So do the fields below
# it (OpenAI's, for what this server lacks): clients send them at their defaults, asking nothing.
SAMPLING = {
    "max_tokens": (16, lambda v: type(v) is int and 0 < v <= MAX_TOKENS,
                   f"an integer in [1, {MAX_TOKENS}]"),
    "temperature": (1.0, lambda v: type(v) in (int, float) and 0 <= v <= 2, "a number in [0, 2]"),
    "top_p": (1.0, lambda v: type(v) in (int, float) and 0 < v <= 1, "a number in (0, 1]"),
    "seed": (None, lambda v: type(v) is int and 0 <= v < 2**63, "an integer in [0, 2**63)"),
    "stream": (False, lambda v: type(v) is bool, "true or false"),
    "stop": ((), lambda v: type(v) is str or (type(v) is list and len(v) <= 4
             and all(type(s) is str for s in v)), "a string, or a list of up to 4"),
    "n": (1, lambda v: type(v) is int and v == 1, "1 (one answer per request here)"),
    "frequency_penalty": (0, lambda v: v == 0 and type(v) is not bool, "0 (no penalties here)"),
    "presence_penalty": (0, lambda v: v == 0 and type(v) is not bool, "0 (no penalties here)"),
    "logprobs": (False, lambda v: v is False, "false (no log probabilities here)"),
    "stream_options": (None, lambda v: v == {"include_usage": False}, "null (no usage chunk)"),
}


def parse_settings(body: dict, text_field: str) -> dict:
    """SAMPLING's settings from a request's body, each checked; absent or null gets the default.
    Any other field is refused, as OpenAI does: a typo (max_tokns) would be ignored in silence.
    But "user" (an end user's name, for OpenAI's abuse monitoring) changes no answer: ignored."""
    known = ["model", text_field, *SAMPLING, "max_completion_tokens", "user"]
    for name in body:
        if name not in known:
            message = f"unknown field '{name}': this server takes {', '.join(known)}"
            raise APIError(message, name, "unknown_parameter")
    settings = {}
    for name, (default, ok, must) in SAMPLING.items():
        value = body.get(name)
        if value is not None and not ok(value):
            raise APIError(f"'{name}' must be {must}, got {json.dumps(value)}", name)
        settings[name] = default if value is None else value  # null = absent, as OpenAI
    stop = settings["stop"]
    settings["stop"] = [stop] if type(stop) is str else list(stop)
    return settings


def encode_chat(tok, instruction: str) -> list[int]:
    """07's template, in two parts as 07 encoded it (BPE could merge tokens across the seam)."""
    prompt = []
    for part in (format_input({"instruction": instruction}), RESPONSE_HEADER):
        if hasattr(tok, "chars"):  # "?" for template characters a char model lacks ('#'), as in 07
            part = "".join(ch if ch in tok.stoi else "?" for ch in part)
            prompt += tok.encode(part)
        else:  # GPT-2, as 07: a typed "<|endoftext|>" is text
            prompt += tok.encode(part, disallowed_special=())
    return prompt


def parse_request(server, body, chat: bool) -> tuple[list[int], dict, int | None]:
    """(prompt ids, settings, end token) from a body, or an APIError naming the field (param)."""
    if not isinstance(body, dict):
        raise APIError("the body must be a JSON object", code="invalid_json")
    if body.get("max_completion_tokens") is not None:  # OpenAI's newer name for chat's max_tokens
        if body.get("max_tokens") not in (None, body["max_completion_tokens"]):
            raise APIError("max_tokens and max_completion_tokens differ: send one", "max_tokens")
        body = body | {"max_tokens": body["max_completion_tokens"]}
    param = "messages" if chat else "prompt"  # the field that holds the text
    settings = parse_settings(body, param)
    if body.get("model") != server.model_name:
        model = json.dumps(body.get("model"))
        message = f"no model {model}: this server has '{server.model_name}'"
        raise APIError(message, "model", "model_not_found", 404 if "model" in body else 400)
    tok = server.tok
    block_size = server.model.config.block_size
    if chat:
        # 07's template holds one instruction: the last message's, which must be the user's
        # (earlier turns, system ones too, are dropped)
        messages = body.get("messages")
        dicts = type(messages) is list and messages and all(type(m) is dict for m in messages)
        last = messages[-1] if dicts else {}
        if last.get("role") != "user" or type(last.get("content")) is not str:
            raise APIError("'messages' must be [{role, content}, ...], the last the user's", param)
        text = last["content"]
        # the next header: a model that goes on after its answer writes one
        settings["stop"].append("\n\n### ")
        if body.get("max_tokens") is None:  # a whole context: an answer ends at its end token
            settings["max_tokens"] = block_size
    else:
        text = body.get("prompt")
        if type(text) is not str:
            raise APIError(f"'prompt' must be a string, got {json.dumps(text)}", param)
    # a char model reads only its training text's characters: the others are a 400 naming them, on
    # both endpoints. An OpenAI API user expects no silent "?" (BPE encodes any text), and OpenAI's
    # answer has no field to say that the question was changed. GPT-2: nothing to check.
    missing = "".join(sorted(set(text) - set(getattr(tok, "chars", text))))  # GPT-2's: any text
    if missing:
        message = f"this model knows only the characters of its training text, not {missing!r}"
        raise APIError(message + ": replace or remove them", param)
    if chat:
        prompt = encode_chat(tok, text)
    elif hasattr(tok, "chars"):
        prompt = tok.encode(text)
    else:  # the user's own text: GPT-2's BPE encodes a typed "<|endoftext|>" as its end token
        prompt = tok.encode(text or "<|endoftext|>", allowed_special="all")  # "": a new document
    if not 1 <= len(prompt) <= block_size:  # a 400 on both endpoints, as OpenAI's: never a cut
        what = "07's template with your message" if chat else "the prompt"
        message = f"{what} has {len(prompt)} tokens; the context holds 1 to {block_size}"
        raise APIError(message, param, "context_length_exceeded" if prompt else "invalid_value")
    end_token = tok.eot_token  # None for a char model
    if chat and hasattr(tok, "chars"):  # as 07: a char model's answer ends at a newline
        end_token = tok.encode("\n")[0]
    return prompt, settings, end_token


class OpenAIHandler(BaseHTTPRequestHandler):
    """The subset of OpenAI's API that chat UIs and SDKs use. ThreadingHTTPServer gives each
    connection a thread; they take turns on the model (server.lock): requests queue, none lost."""

    def __getattr__(self, name: str):  # BaseHTTPRequestHandler calls do_<METHOD>: do_GET, do_PUT
        if not name.startswith("do_"):  # (and sends an HTML 501 page for a method without one)
            raise AttributeError(name)
        return self.answer_request  # every method: so each error is OpenAI's JSON

    def answer_request(self):
        try:
            # the whole body first: a socket closed with unread data is reset, and our answer lost
            length = self.headers.get("Content-Length", "0")
            if not length.isdecimal():  # a negative one would hang the read; "²" is a digit
                raise APIError(f"Content-Length must be the body's size in bytes, got {length!r}")
            if int(length) > MAX_BODY:  # refused unread (a client still sending may see a reset)
                raise APIError(f"the body is over {MAX_BODY:,} bytes", status=413)
            raw = self.rfile.read(int(length))
            route = f"{self.command} {self.path.partition('?')[0].rstrip('/') or '/'}"  # no ?x=1
            name = self.server.model_name
            model = {"id": name, "object": "model", "created": 0, "owned_by": "you"}
            if route == f"GET /v1/models/{name}":  # one model: the openai client's models.retrieve
                return self.send_json(model)
            if route not in ROUTES:  # PUT, DELETE...: OpenAI answers a 404 too, not HTTP's 405
                message = f"no route {route}: this server answers {', '.join(ROUTES)}"
                raise APIError(message, code="not_found", status=404)
            if route == "GET /v1/models":
                return self.send_json({"object": "list", "data": [model]})
            chat = route == "POST /v1/chat/completions"
            try:  # ValueError: a JSONDecodeError or UnicodeDecodeError; RecursionError: [[[...]]]
                body = json.loads(raw)
            except (ValueError, RecursionError) as e:
                raise APIError(f"the body is not valid JSON: {e}", code="invalid_json") from None
            prompt, settings, end_token = parse_request(self.server, body, chat)
        except APIError as e:
            return self.send_json(e.body, e.status)
        with self.server.lock:  # one generation at a time: the others wait here
            self.respond(chat, prompt, settings, end_token)

    def respond(self, chat: bool, prompt: list[int], settings: dict, end_token):
        """One JSON object with its usage in tokens, or with stream=true server-sent events."""
        chunks = stream_text(self.server.model, self.server.tok, prompt, settings, end_token)
        kind = "chat.completion" if chat else "text_completion"  # the answer's "object"
        key = "message" if chat else "text"  # the key that holds a choice's text
        if chat and settings["stream"]:  # a streamed chat's pieces: chunks, each with a delta
            kind += ".chunk"
            key = "delta"
        # the fields that every chunk of this answer repeats
        shared = {"id": f"cmpl-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                  "model": self.server.model_name}  # fmt: skip

        def answer(text: str, finish: str | None) -> dict:
            content = {"role": "assistant", "content": text} if chat else text
            return shared | {"choices": [{"index": 0, key: content, "finish_reason": finish}]}

        try:
            if not settings["stream"]:
                pieces = list(chunks)  # one per new token (the end token: none), then the end
                text = "".join(piece for piece, _ in pieces)
                usage = {"prompt_tokens": len(prompt), "completion_tokens": len(pieces) - 1}
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                return self.send_json(answer(text, pieces[-1][1]) | {"usage": usage})
            self.send_events(chunks, answer)
        except ConnectionError:  # the client left mid-answer: stop generating; the server goes on
            chunks.close()

    def send_events(self, chunks, answer):
        """Server-sent events: a "data: {...}\\n\\n" per piece of text, sent as soon as it is
        decoded, the last with its finish_reason, then "data: [DONE]\\n\\n"."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for text, finish in chunks:
            if text or finish:  # "" while held back: nothing to send yet
                self.wfile.write(f"data: {json.dumps(answer(text, finish))}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")

    def send_json(self, reply: dict, status=200):
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def make_server(model, tok, model_name: str, host="127.0.0.1", port=8000) -> ThreadingHTTPServer:
    """A ThreadingHTTPServer answering with OpenAIHandler; port 0 picks a free one (see
    server.server_address). serve_forever() runs it, shutdown() from another thread stops it. The
    model computes in fp32, its matmuls in TF32 on CUDA (switched on here, for the whole process):
    a prompt's prefill is matmul-bound; a token at a time is bound by per-step overhead."""
    if model.lm_head.weight.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    server = ThreadingHTTPServer((host, port), OpenAIHandler)
    server.model = model.eval()
    server.tok = tok
    server.model_name = model_name
    server.lock = threading.Lock()
    return server


# -----------------------------------------------------------------------------
# Command line

def ckpt_hint(ckpt: Path) -> str:
    """What makes a missing checkpoint: 04 saves OpenAI's GPT-2 in data/gpt2*/, 05, 07 and 08
    write out_dir/ckpt.pt (by default out/shakespeare-char, finetune, dpo), the file in a folder."""
    if (ckpt / "ckpt.pt").is_file():  # an out_dir: the checkpoint is the file in it
        return f"a folder: --ckpt={ckpt / 'ckpt.pt'} names its checkpoint"
    if ckpt.suffix and ckpt.name not in ("ckpt.pt", "best.pt") and not ckpt.is_dir():
        return "05-08 write out_dir/ckpt.pt (05 best.pt too), 04 data/gpt2*/: check the path"
    folder = ckpt if ckpt.is_dir() or not ckpt.suffix else ckpt.parent  # out/run: a folder
    if folder.parent == PROJECT / "data" and folder.name.startswith("gpt2"):
        return f"`python 04_gpt.py --init_from={folder.name} --save_ckpt` writes it"
    writers = {"finetune": "07_finetune.py", "dpo": "08_dpo.py"}
    script = writers.get(folder.name.split("-")[0], "05_pretrain.py")  # out/dpo-avg: 08's too
    if folder.is_relative_to(PROJECT):  # as a user types it: 05-08 resolve it there too
        folder = folder.relative_to(PROJECT)
    return f"`python {script} --out_dir={folder}` writes it"


def check_address(host: str, port: int) -> None:
    """Take host:port and let go at once, so that a port in use or an unknown host is one line
    before the model loads; the server takes it for good once the model has loaded."""
    fix = "use --host=127.0.0.1 (this machine only) or 0.0.0.0 (all its networks)"
    if not host:  # bind() reads "" as every network: a choice to make explicitly
        raise ValueError(f"--host={host}: empty means every network; {fix}")
    try:
        with socket.socket() as probe:  # as the server's: IPv4, a port in TIME_WAIT reused
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as e:  # socket.gaierror too: a host name that does not resolve
        if e.errno in (errno.EADDRINUSE, errno.EACCES):  # in use; below 1024: root's
            raise ValueError(f"--port={port}: {e.strerror}; pick a free one or --port=0") from None
        raise ValueError(f"--host={host}: {e.strerror}; {fix}") from None


@dataclass
class ServeConfig:
    """Export a checkpoint of 05-08 as a Hugging Face model, serve it with OpenAI's API, or both."""

    ckpt: Annotated[str, "a ckpt.pt of 05-08 (relative: to this script's folder)"] = DEFAULT_CKPT
    export_hf: Annotated[str, "save the model in Hugging Face's format, in this folder"] = ""
    overwrite: Annotated[bool, "--export_hf may hold files: the export's own are replaced"] = False
    serve: Annotated[bool, "answer OpenAI's API over HTTP until Ctrl-C; no password"] = False
    host: Annotated[str, "127.0.0.1 = only this computer may connect; 0.0.0.0 = any"] = "127.0.0.1"
    port: Annotated[int, "the port to listen on; 0 = any free one"] = 8000
    device: Annotated[str, "run on: auto (a GPU if there is one), cpu, cuda, cuda:1, mps"] = "auto"
    threads: Annotated[int, "CPU threads to use; 0 = PyTorch's choice"] = 0

    def __post_init__(self):  # checked before loading anything; parse_config prints the error
        self.device = pick_device(self.device)  # "auto" -> cuda, mps or cpu
        if not (self.export_hf or self.serve):
            raise ValueError("nothing to do: pass --export_hf=DIR, --serve, or both")
        self.ckpt = str(PROJECT / self.ckpt)  # an absolute path stays as it is
        if self.export_hf:
            export_dir = PROJECT / self.export_hf
            self.export_hf = str(export_dir)
            if any(path.is_file() for path in (export_dir, *export_dir.parents)):
                raise ValueError(f"--export_hf={export_dir} is a file, or in one: name a folder")
            if export_dir.is_dir() and any(export_dir.iterdir()) and not self.overwrite:
                fix = "pick an empty folder, or --overwrite"
                raise ValueError(f"--export_hf={export_dir} is not empty: {fix}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"need 0 <= --port < 65536, got {self.port}")
        if self.threads < 0:
            raise ValueError(f"need --threads >= 0 (0 = PyTorch's default), got {self.threads}")
        if not Path(self.ckpt).is_file():
            hint = ckpt_hint(Path(self.ckpt))
            raise FileNotFoundError(f"--ckpt={self.ckpt}: no such file; {hint}")
        if self.serve:
            check_address(self.host, self.port)


def main(argv=None):
    cfg = parse_config(ServeConfig, argv)  # a bad setting: one "error:" line, exit status 2
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    try:
        model, tok, checkpoint = load_checkpoint(cfg.ckpt)
        if cfg.export_hf:
            out = export_hf(model, checkpoint["tokenizer"], cfg.export_hf, cfg.overwrite)
            load = f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})"
            print(f"wrote {out}; load it with {load}")
        if not cfg.serve:
            return out
        name = Path(cfg.ckpt).resolve().parent.name  # out/finetune/ckpt.pt serves "finetune"
        server = make_server(model.to(cfg.device), tok, name, cfg.host, cfg.port)  # TF32: CUDA
        url = f"http://{cfg.host}:{server.server_address[1]}/v1"  # the port picked, for --port=0
        print(f"serving {name!r} with OpenAI's API at {url} (Ctrl-C stops)", flush=True)
        with server:  # closes the socket
            server.serve_forever()
    except (ValueError, OSError) as e:  # not a checkpoint of ours; a folder we cannot write
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # the way to stop a server, or an export: one line, no traceback
        print("\nCtrl-C: stopped", flush=True)
        if cfg.serve:  # a request's thread may be in the model: an exit under it aborts (SIGABRT)
            os._exit(130)  # at once: the finally blocks have run, the socket closed
        sys.exit(130)  # the shell's code for "ended by Ctrl-C", as 05's


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


# copied from 01_tokenizer.py: GPT2_URL
GPT2_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main"  # + "/" + filename


# copied from 01_tokenizer.py: GPT2_FILES
GPT2_FILES = {  # file name -> sha256 of its exact bytes
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


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


# copied from 03_attention.py: KVCache
class KVCache:
    """The keys and values of every token so far: per layer, (B, n_head, max_len, head_size)."""

    def __init__(self, n_layer: int, max_len: int):
        self.k = [None] * n_layer  # per layer: (B, n_head, max_len, head_size) keys
        self.v = [None] * n_layer  # per layer: the values, the same shape
        self.length = 0  # tokens cached so far
        self.max_len = max_len

    def attend(self, attn, x: torch.Tensor, layer: int, mask=None) -> torch.Tensor:
        """attn (a CausalSelfAttention) on the new tokens x (B, T, C), over the cache and x."""
        B, T, C = x.size()
        hs = C // attn.n_head  # head size
        start = self.length  # the new tokens' positions: start .. end - 1
        end = start + T
        q, k, v = attn.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, attn.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, attn.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, attn.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if self.k[layer] is None:  # the first call allocates; every later one writes in place
            self.k[layer] = k.new_zeros(B, attn.n_head, self.max_len, hs)
            self.v[layer] = torch.zeros_like(self.k[layer])
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        k = self.k[layer][:, :, :end]  # (B, nh, end, hs): a view, no copy
        v = self.v[layer][:, :, :end]  # (B, nh, end, hs)
        if layer == len(self.k) - 1:  # the last layer moves the cache on
            self.length = end
        if mask is None and T > 1 and start > 0:  # a later chunk: query i sees keys 0 .. start + i
            mask = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
        is_causal = mask is None and T > 1  # here only if start == 0: the top-left triangle fits
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return attn.c_proj(y)  # no dropout at inference


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


# copied from 05_pretrain.py: load_checkpoint
def load_checkpoint(path):
    """(model, tokenizer, checkpoint dict) from a checkpoint of 05-08, the model on the CPU. mmap:
    unread parts (Adam's state, to sample) stay on disk; a compiled model's "_orig_mod." goes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train one with `python 05_pretrain.py` "
                                f"(it writes out_dir/ckpt.pt), or check the path")
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError):  # not one, or cut short
        ckpt = None
    if not isinstance(ckpt, dict) or not {"model", "model_args", "tokenizer"} <= set(ckpt):
        raise ValueError(f"{path} is not a checkpoint of these scripts (05_pretrain.py to "
                         f"08_dpo.py write them as out_dir/ckpt.pt); check the path")
    model = GPT(GPTConfig(**ckpt["model_args"]))
    state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    model.load_state_dict(state)
    return model, get_tokenizer(ckpt["tokenizer"]), ckpt


# copied from 09_generate.py: final_hidden
def final_hidden(model, idx, position_ids=None, mask=None, cache=None):
    """(B, T) ids -> (B, T, n_embd) after ln_f; with a cache (03's KVCache), idx come after it."""
    transformer = model.transformer
    if position_ids is None:
        start = 0 if cache is None else cache.length  # the tokens the cache holds already
        position_ids = torch.arange(start, start + idx.size(1), device=idx.device)  # (T,)
    tok_emb = transformer.wte(idx)  # (B, T, C)
    pos_emb = transformer.wpe(position_ids)  # (T, C), or (B, T, C) with a row's own positions
    x = transformer.drop(tok_emb + pos_emb)  # (B, T, C)
    for layer, block in enumerate(transformer.h):
        h = block.ln_1(x)
        if cache is None:
            x = x + block.attn(h)
        else:
            x = x + cache.attend(block.attn, h, layer, mask)
        x = x + block.mlp(block.ln_2(x))
    return transformer.ln_f(x)


# copied from 07_finetune.py: RESPONSE_HEADER
RESPONSE_HEADER = "\n\n### Response:\n"  # between the prompt and the answer


# copied from 07_finetune.py: format_input
def format_input(entry: dict) -> str:
    """Alpaca's prompt for entry: a fixed preamble, "### Instruction:", and "### Input:" if any."""
    instruction_text = (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{entry['instruction']}"
    )
    if not entry.get("input"):
        return instruction_text
    return instruction_text + f"\n\n### Input:\n{entry['input']}"


# copied from 09_generate.py: check_sampling
def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature >= 0:  # nan too
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be a positive integer (None: no limit), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus filter), got {top_p}")


# copied from 09_generate.py: sample
def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None) -> torch.Tensor:
    """One token per row of logits (B, V) -> (B,), drawn with `generator` (seeded).

    temperature 0 is greedy (argmax); otherwise the logits are divided by it (< 1 sharper, > 1
    flatter; towards 0, one-hot on the argmax). top_k keeps the k largest logits (ties too); top_p
    the fewest most likely tokens whose probabilities reach top_p (Holtzman et al. 2019): of probs
    [0.5, 0.3, 0.15, 0.05], top_p=0.75 keeps two; the third goes: the mass above it, 0.8, reaches
    0.75 (at exactly 0.8 float rounding would decide).
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / max(temperature, 1e-6)  # a tinier one: the same, and no inf
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[..., -1:]  # (B, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        probs = F.softmax(logits, dim=-1)  # (B, V)
        ranked, order = torch.sort(probs, dim=-1, descending=True)  # order: rank -> token id
        mass_above = ranked.cumsum(dim=-1) - ranked  # of the tokens ranked above each one
        drop_ranked = (mass_above >= top_p) & (mass_above > 0)  # the first one always stays
        drop = drop_ranked.scatter(-1, order, drop_ranked)  # rank order -> token order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    exponential = torch.empty_like(probs).exponential_(generator=generator)  # (B, V) E_i ~ Exp(1)
    return (probs / exponential).argmax(dim=-1)  # token i with probability p_i, as multinomial


# copied from 09_generate.py: token_bytes
def token_bytes(tok, token_id: int) -> bytes:
    """The UTF-8 bytes of a token: a GPT-2 token may hold part of a character ('é' is 2 bytes)."""
    if hasattr(tok, "decode_single_token_bytes"):  # tiktoken
        return tok.decode_single_token_bytes(token_id)
    return tok.decode([token_id]).encode("utf-8")  # a char tokenizer's: whole characters


# copied from 09_generate.py: TextStream
class TextStream:
    """Token ids in, text out once it is certain: whole characters only, never past a stop string.

    (1) A BPE token may end inside a UTF-8 character (decoded alone: '\\ufffd'); an incremental
    decoder keeps the bytes until the character is whole. (2) A stop string may come split over
    tokens ("\\n\\n###" as "\\n\\n" + "###"), so text that may begin one is held back until it is
    completed (generation stops; it is never shown) or ruled out (it is shown).

    >>> tok = CharTokenizer("\\nHi")
    >>> stream = TextStream(tok, stop_strings=["\\n\\n"])
    >>> [stream.add(i) for i in tok.encode("Hi\\n")]
    ['H', 'i', '']
    >>> stream.add(tok.encode("\\n")[0]), stream.stopped
    ('', True)
    """

    def __init__(self, tok, stop_strings=(), on_text=None):
        self.tok = tok
        self.stop_strings = [s for s in stop_strings if s]
        self.on_text = on_text
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.shown = 0  # characters handed to on_text
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Feed one token; return (and pass to on_text) the text that became certain."""
        self.text += self.decoder.decode(token_bytes(self.tok, token_id))
        # a stop string can only start in the unshown part: everything shown was ruled out
        starts = [self.text.find(s, self.shown) for s in self.stop_strings]
        starts = [i for i in starts if i >= 0]
        if starts:
            self.text = self.text[: min(starts)]
            self.stopped = True
        held_back = 0 if self.stopped else self._held_back()
        return self._show(len(self.text) - held_back)

    def finish(self) -> str:
        """Generation ended (eot, max_new_tokens): show what was held back, incomplete bytes
        as '\\ufffd'."""
        if not self.stopped:
            self.text += self.decoder.decode(b"", final=True)
        return self._show(len(self.text))

    def _held_back(self) -> int:  # the longest end of the text that begins a stop string
        longest = max((len(s) - 1 for s in self.stop_strings), default=0)  # a stop string, less 1
        for n in range(min(len(self.text), longest), 0, -1):
            if any(s.startswith(self.text[-n:]) for s in self.stop_strings):
                return n
        return 0

    def _show(self, upto: int) -> str:
        chunk = self.text[self.shown : upto]
        self.shown = max(self.shown, upto)
        if chunk and self.on_text is not None:
            self.on_text(chunk)
        return chunk


if __name__ == "__main__":
    main()
