"""Stage 10: the model out of this repo: a Hugging Face export, and an OpenAI-compatible server.

A model trained here lives in a ckpt.pt that only these scripts read; its users live elsewhere:
  - Hugging Face's format is read by transformers, vLLM, TGI, lm-evaluation-harness and llama.cpp's
    converters. `--export_hf=DIR` writes it with our own code: config.json, model.safetensors (8 bytes
    of header length, a JSON header, the raw tensors: no pickle) in 04's names, whose loader we run
    backwards, and GPT-2's tokenizer files (OpenAI's, renamed).
  - OpenAI's HTTP API is spoken by chat UIs and SDKs. `--serve` answers GET /v1/models and POST
    /v1/completions and /v1/chat/completions (streamed as server-sent events on request) with 09's
    KV-cache generation and 07's chat template, on the standard library's HTTP server: no new
    dependency. A lesson and a local tool: for real traffic, serve the export with vLLM or TGI.

References: the safetensors format (github.com/huggingface/safetensors); transformers' GPT2Config;
OpenAI's API reference (completions, chat completions, streaming); server-sent events (HTML standard).

Run it (after `python 05_pretrain.py`, which writes out/shakespeare-char/ckpt.pt):
  python 10_serve.py --export_hf=out/hf                          # 05's model in Hugging Face's format
  python 10_serve.py --ckpt=out/finetune/ckpt.pt --serve         # 07's model at http://127.0.0.1:8000/v1
  curl http://127.0.0.1:8000/v1/chat/completions -H "Content-Type: application/json" \
      -d '{"model": "finetune", "messages": [{"role": "user", "content": "Name a colour."}]}'
  python 10_serve.py --ckpt=out/finetune/ckpt.pt --serve --device=cuda   # on one GPU
"""

import argparse
import codecs
import contextlib
import json
import math
import pickle
import struct
import sys
import threading
import time
import uuid
from dataclasses import dataclass, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Annotated, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_CKPT = "out/shakespeare-char/ckpt.pt"  # what `python 05_pretrain.py` writes

# -----------------------------------------------------------------------------
# Export: a checkpoint as a Hugging Face GPT-2 (config.json, model.safetensors, tokenizer files)


def gpt_to_hf_state_dict(model) -> dict[str, torch.Tensor]:
    """Our weights in Hugging Face's GPT2LMHeadModel layout: 04's hf_to_gpt_state_dict, backwards. The
    names are already its own (04 chose them so), but its Conv1D stores the four projection weights as
    (in, out): transposed back. lm_head is left out (transformers ties it to wte itself), and a model
    trained with bias=False gets zero biases: GPT-2 has them everywhere."""
    sd = {name: (p.t() if name.endswith(HF_TRANSPOSED) else p).detach().cpu().contiguous()
          for name, p in model.state_dict().items() if name != "lm_head.weight"}  # fmt: skip
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is None and name != "lm_head":
            sd[f"{name}.bias"] = torch.zeros(module.weight.shape[0], dtype=module.weight.dtype)
    return sd


def save_safetensors(tensors: dict[str, torch.Tensor], path) -> None:
    """The format 04's load_safetensors reads: 8 bytes (little-endian) giving the length of a JSON header
    {name: {"dtype", "shape", "data_offsets": [begin, end]}}, then the tensors' raw bytes. No pickle."""
    dtype_names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors.items():
        end = offset + t.numel() * t.element_size()
        header[name] = {"dtype": dtype_names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # pad with spaces: the tensors start 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for t in tensors.values():
            f.write(t.reshape(-1).view(torch.uint8).numpy())  # the raw bytes, no copy


def export_hf(model, tokenizer_spec: dict, out_dir, overwrite: bool = False) -> Path:
    """Write the model to out_dir as a Hugging Face GPT-2 that loads with no code of ours:
    AutoModelForCausalLM.from_pretrained(out_dir), and AutoTokenizer for a GPT-2-token model, whose
    tokenizer files are OpenAI's under Hugging Face's names (encoder.json is vocab.json, vocab.bpe is
    merges.txt). transformers has no character tokenizer: a char model gets chars.json and a README.txt."""
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty: pick an empty --export_hf directory, or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "chars.json", "README.txt"):
        (out / name).unlink(missing_ok=True)  # no tokenizer of an earlier export may stay behind
    c, eot_id = model.config, 50256 if tokenizer_spec["kind"] == "gpt2" else None  # <|endoftext|>
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
              "n_positions": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head,
              "activation_function": "gelu_new",  # GELU's tanh approximation, as our MLP
              "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True,  # nn.LayerNorm's eps; lm_head = wte
              "bos_token_id": eot_id, "eos_token_id": eot_id}  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_safetensors(gpt_to_hf_state_dict(model), out / "model.safetensors")
    if eot_id is None:
        (out / "chars.json").write_text(json.dumps(tokenizer_spec, ensure_ascii=False))
        (out / "README.txt").write_text(
            "A character-level GPT-2: token id i is the character chars[i] of chars.json. transformers has\n"
            "no tokenizer for it, so encode a text as [chars.index(ch) for ch in text] and decode ids as\n"
            "''.join(chars[i] for i in ids). A character outside chars.json cannot be encoded, and a text\n"
            "(prompt and new tokens) holds at most n_positions tokens (config.json): the model's context.\n")
        return out
    from tiktoken.load import read_file_cached  # tiktoken fetched these (sha256-checked) to build GPT-2's

    for hf_name, name in (("vocab.json", "encoder.json"), ("merges.txt", "vocab.bpe")):
        (out / hf_name).write_bytes(read_file_cached(f"{GPT2_URL}/{name}", GPT2_FILES[name]))
    eot = "<|endoftext|>"
    tokenizer_config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": c.block_size,
                        "bos_token": eot, "eos_token": eot, "unk_token": eot}  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return out


# -----------------------------------------------------------------------------
# Serve: OpenAI's HTTP API (completions, chat completions, streamed as server-sent events)


def stream_text(model, tok, prompt: list[int], req: dict, end_token=None):
    """Yield (text, None) for each new token (text may be "" while held back), then (the rest,
    finish_reason): "stop" at end_token or a stop string, "length" after max_tokens tokens."""
    generator = torch.Generator(device=model.lm_head.weight.device)
    generator.manual_seed(req["seed"]) if req["seed"] is not None else generator.seed()
    stream, finish = TextStream(tok, req["stop"]), "length"
    steps = generate_tokens(model, [prompt], req["temperature"], None, req["top_p"], generator)
    for _, (next_ids, _) in zip(range(req["max_tokens"]), steps):
        if (token := next_ids.item()) != end_token:
            yield stream.add(token), None
        if token == end_token or stream.stopped:
            finish = "stop"
            break
    yield stream.finish(), finish


class APIError(Exception):
    """A request we refuse, as OpenAI does: an HTTP status and {"error": {message, type, param, code}}."""

    def __init__(self, msg: str, param=None, code="invalid_value", status=400):
        super().__init__(msg)
        self.status, self.body = status, {"error": {"message": msg, "type": "invalid_request_error",
                                                    "param": param, "code": code}}  # fmt: skip


MAX_TOKENS = 4096  # per request: past the context the window slides (generate_tokens); this bounds the wait
# The optional settings: name -> (default, check, what a value must be). type(v): JSON's true is no int.
SAMPLING = {
    "max_tokens": (16, lambda v: type(v) is int and 0 < v <= MAX_TOKENS, f"an integer in [1, {MAX_TOKENS}]"),
    "temperature": (1.0, lambda v: type(v) in (int, float) and 0 <= v <= 2, "a number from 0 to 2"),
    "top_p": (1.0, lambda v: type(v) in (int, float) and 0 < v <= 1, "a number in (0, 1]"),
    "seed": (None, lambda v: type(v) is int and 0 <= v < 2**63, "an integer in [0, 2**63)"),
    "stream": (False, lambda v: type(v) is bool, "true or false"),
    "stop": ((), lambda v: type(v) is str or type(v) is list and len(v) < 5 and {type(s) for s in v} <= {str},
             "a string, or a list of up to 4"),
}  # fmt: skip


def parse_request(server, body, chat: bool) -> tuple[list[int], dict, int | None]:
    """Check a request's body: (prompt ids, settings, end token), or an APIError naming the bad field."""
    if not isinstance(body, dict):
        raise APIError("the body must be a JSON object", code="invalid_json")
    if body.get("model") != server.model_name:
        raise APIError(f"no model {json.dumps(body.get('model'))}: this server has '{server.model_name}'",
                       "model", "model_not_found")  # fmt: skip
    tok, block_size, req = server.tok, server.model.config.block_size, {}
    for name, (default, ok, must) in SAMPLING.items():
        if (value := body.get(name)) is not None and not ok(value):  # null = absent, as OpenAI
            raise APIError(f"'{name}' must be {must}, got {json.dumps(value)}", name)
        req[name] = default if value is None else value
    req["stop"] = [req["stop"]] if type(req["stop"]) is str else list(req["stop"])
    param, text = ("messages", body.get("messages")) if chat else ("prompt", body.get("prompt"))
    if chat:  # 07's template holds one instruction: the last message, which must be the user's
        ok = type(text) is list and text and all(type(m) is dict for m in text)
        text = text[-1].get("content") if ok and text[-1].get("role") == "user" else None
        req["stop"].append("\n\n### ")  # the next header: a model that goes on after its answer writes one
        req["max_tokens"] = body.get("max_tokens") or block_size  # an answer ends at its end token
    if type(text) is not str:
        raise APIError("'messages' must be a list of {role, content}, the last the user's" if chat else
                       f"'prompt' must be a string, got {json.dumps(text)}", param)  # fmt: skip
    known = set(getattr(tok, "chars", ""))  # a char model's characters; GPT-2's BPE encodes any text
    try:
        if not chat:  # the user's own text: a character that the model lacks is an error
            prompt = tok.encode(text) if known else tok.encode(text, allowed_special="all")
        else:  # 07's template, in two parts as 07 encoded it (BPE could merge tokens across the seam)
            parts = [format_input({"instruction": text}), RESPONSE_HEADER]
            if known:  # a char model lacks some of the template's characters ('#'): "?" stands in, as in 07
                parts = ["".join(c if c in known else "?" for c in part) for part in parts]
            special = {} if known else {"disallowed_special": ()}  # as 07: a typed "<|endoftext|>" is text
            prompt = tok.encode(parts[0], **special) + tok.encode(parts[1], **special)
    except ValueError as e:
        raise APIError(str(e), param) from None
    if not 1 <= len(prompt) <= block_size:
        raise APIError(f"the prompt has {len(prompt)} tokens; the context holds 1 to {block_size}", param,
                       "context_length_exceeded")  # fmt: skip
    return prompt, req, tok.encode("\n")[0] if chat and known else tok.eot_token  # as 07: a char model's \n


class OpenAIHandler(BaseHTTPRequestHandler):
    """The subset of OpenAI's API that chat UIs and SDKs use. ThreadingHTTPServer gives each connection
    a thread; they take turns on the model (server.lock), so requests queue and all get answered."""

    def do_GET(self):
        if self.path.rstrip("/") != "/v1/models":
            return self.send_json(APIError(f"no route GET {self.path}", code="not_found", status=404))
        model = {"id": self.server.model_name, "object": "model", "created": 0, "owned_by": "you"}
        self.send_json({"object": "list", "data": [model]})

    def do_POST(self):
        chat = self.path == "/v1/chat/completions"
        try:  # read the whole body first: closing a socket with unread data resets it, losing our answer
            if not (length := self.headers.get("Content-Length", "0")).isdigit():  # a negative one would hang
                raise APIError(f"Content-Length must be the body's size in bytes, got {length!r}")
            raw = self.rfile.read(int(length))
            if not chat and self.path != "/v1/completions":
                raise APIError(f"no route POST {self.path}", code="not_found", status=404)
            try:
                body = json.loads(raw)
            except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
                raise APIError(f"the body is not valid JSON: {e}", code="invalid_json") from None
            prompt, req, end_token = parse_request(self.server, body, chat)
        except APIError as e:
            return self.send_json(e)
        with self.server.lock:  # one generation at a time: the others wait here
            self.respond(chat, prompt, req, end_token)

    def respond(self, chat: bool, prompt: list[int], req: dict, end_token):
        """One JSON answer, or with stream=true server-sent events ("data: {...}\\n\\n"), ending in [DONE]."""
        chunks = stream_text(self.server.model, self.server.tok, prompt, req, end_token)
        kind, key = ("text_completion", "text") if not chat else (
            ("chat.completion.chunk", "delta") if req["stream"] else ("chat.completion", "message"))
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": kind, "created": int(time.time())}

        def answer(text: str, finish: str | None) -> dict:
            content = {"role": "assistant", "content": text} if chat else text
            choice = {"index": 0, key: content, "finish_reason": finish}
            return head | {"model": self.server.model_name, "choices": [choice]}

        try:
            if not req["stream"]:
                pieces = list(chunks)  # one per new token, then the end
                n, m = len(prompt), len(pieces) - 1
                usage = {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}
                return self.send_json(answer("".join(t for t, _ in pieces), pieces[-1][1]) | {"usage": usage})
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for text, finish in chunks:
                if text or finish:
                    self.wfile.write(f"data: {json.dumps(answer(text, finish))}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
        except ConnectionError:  # the client left mid-answer: stop generating; the server goes on
            chunks.close()

    def send_json(self, obj):  # a dict (200), or an APIError: its body and status
        status, obj = (obj.status, obj.body) if isinstance(obj, APIError) else (200, obj)
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def make_server(model, tok, model_name: str, host="127.0.0.1", port=8000) -> ThreadingHTTPServer:
    """A ThreadingHTTPServer answering with OpenAIHandler; port 0 picks a free one (server.server_address).
    serve_forever() runs it, shutdown() from another thread stops it. The model computes in fp32 (TF32
    on CUDA): one token at a time is bound by per-step overhead more than by the matmuls' precision."""
    server = ThreadingHTTPServer((host, port), OpenAIHandler)
    server.model, server.tok, server.model_name, server.lock = model.eval(), tok, model_name, threading.Lock()
    return server


# -----------------------------------------------------------------------------
# Command line


@dataclass
class ServeConfig:
    """Export a checkpoint of 05-08 as a Hugging Face model, or serve it with OpenAI's API (or both)."""

    ckpt: Annotated[str, "a checkpoint of 05-08 (default: 05's Shakespeare model)"] = DEFAULT_CKPT
    export_hf: Annotated[str, "write the model to this directory in Hugging Face's format"] = ""
    overwrite: Annotated[bool, "let --export_hf write into a directory that is not empty"] = False
    serve: Annotated[bool, "answer OpenAI's API over HTTP (no authentication!) until Ctrl-C"] = False
    host: Annotated[str, "the address to listen on; 127.0.0.1 = this machine only"] = "127.0.0.1"
    port: Annotated[int, "the port to listen on; 0 = any free one"] = 8000
    device: Annotated[str, "auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps"] = "auto"
    threads: Annotated[int, "CPU threads; 0 = PyTorch's default"] = 0

    def __post_init__(self):  # checked before loading anything; parse_config prints the error
        self.device = pick_device(self.device)  # "auto" -> cuda, mps or cpu
        if not (self.export_hf or self.serve):
            raise ValueError("nothing to do: pass --export_hf=DIR, --serve, or both")
        out = Path(self.export_hf)
        if self.export_hf and out.is_dir() and any(out.iterdir()) and not self.overwrite:
            raise ValueError(f"--export_hf={out} is not empty: pick an empty directory, or pass --overwrite")
        if not 0 <= self.port < 65536 or self.threads < 0:
            raise ValueError(f"need 0 <= --port < 65536 and --threads >= 0, got {self.port}, {self.threads}")
        if not Path(self.ckpt).is_file():
            raise FileNotFoundError(f"--ckpt={self.ckpt}: no such file; 05-08 write out_dir/ckpt.pt (this "
                                    f"default one: `python 05_pretrain.py`)")


def main(argv=None):
    cfg = parse_config(ServeConfig, argv)  # a bad setting: one "error:" line, exit status 2
    if cfg.device.startswith("cuda"):  # TF32 for the fp32 matmuls
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    try:
        model, tok, ckpt = load_checkpoint(cfg.ckpt)
    except ValueError as e:  # a file that is not a checkpoint of these scripts
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if cfg.export_hf:
        out = export_hf(model, ckpt["tokenizer"], cfg.export_hf, cfg.overwrite)
        print(f"wrote {out}; load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    if not cfg.serve:
        return out
    name = Path(cfg.ckpt).resolve().parent.name  # out/finetune/ckpt.pt serves "finetune"
    server = make_server(model.to(cfg.device), tok, name, cfg.host, cfg.port)
    print(f"serving {name!r} with OpenAI's API at http://{cfg.host}:{server.server_address[1]}/v1 "
          f"(Ctrl-C stops)", flush=True)  # fmt: skip
    with server, contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: close the socket and end
        server.serve_forever()


# -----------------------------------------------------------------------------
# Appendix: pieces copied unchanged from earlier stages, so that this file runs on its own.
# Each is its origin's text byte for byte (tests/test_copies.py checks); read them there.


# copied from 01_tokenizer.py: CharTokenizer
class CharTokenizer:
    """One token per character: from_text("hello") gives e=0 h=1 l=2 o=3, so "hole" -> [1, 3, 2, 0]."""

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars):
            raise ValueError("chars has repeated characters; build it with CharTokenizer.from_text(text)")
        self.chars, self.n_vocab, self.eot_token = chars, len(chars), None  # None: no end-of-text token
        self.stoi, self.itos = {ch: i for i, ch in enumerate(chars)}, dict(enumerate(chars))

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[ch] for ch in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the vocabulary; build the tokenizer "
                             "from text that contains it (CharTokenizer.from_text)") from None

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
    """{"kind": "char", "chars": ...} -> CharTokenizer; {"kind": "gpt2"} -> tiktoken's GPT-2 encoding."""
    if spec.get("kind") == "char":
        return CharTokenizer(spec["chars"])
    if spec.get("kind") == "gpt2":
        import tiktoken  # only when asked for: char-only scripts do not need it

        return tiktoken.get_encoding("gpt2")
    raise ValueError(f"unknown tokenizer kind {spec.get('kind')!r}; use {{'kind': 'char', 'chars': ...}} "
                     "or {'kind': 'gpt2'}")


# copied from 01_tokenizer.py: GPT2_URL
GPT2_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main"  # + "/" + filename


# copied from 01_tokenizer.py: GPT2_FILES
GPT2_FILES = {"encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
              "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"}  # sha256s


# copied from 03_attention.py: CausalSelfAttention
class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, one F.scaled_dot_product_attention call: (B, T, C) -> (B, T, C)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if n_head <= 0 or n_embd % n_head != 0:
            raise ValueError(f"n_embd={n_embd} is not divisible by n_head={n_head}: each head gets n_embd // "
                             "n_head channels; choose an n_head that divides n_embd (GPT-2: 768 and 12)")
        self.n_embd, self.n_head = n_embd, n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)  # q, k, v of all heads in one matmul
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)  # mixes the heads' outputs
        self.attn_dropout_p = dropout  # SDPA takes dropout on the weights as an argument
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        qkv = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in qkv)  # (B, nh, T, hs)
        dropout_p = self.attn_dropout_p if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): the heads side by side again
        return self.resid_dropout(self.c_proj(y))


# copied from 03_attention.py: KVCache
class KVCache:
    """The keys and values of every token so far, per layer, in (B, n_head, max_len, head_size) buffers."""

    def __init__(self, n_layer: int, max_len: int):
        self.k, self.v, self.length, self.max_len = [None] * n_layer, [None] * n_layer, 0, max_len

    def attend(self, attn, x: torch.Tensor, layer: int, mask=None) -> torch.Tensor:
        """attn's (a CausalSelfAttention's) attention for new tokens x (B, T, C) over the cache and x."""
        (B, T, C), start = x.size(), self.length
        q, k, v = attn.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2) for t in (q, k, v))
        if self.k[layer] is None:  # the first call allocates; every later one writes in place
            self.k[layer] = k.new_zeros(B, attn.n_head, self.max_len, C // attn.n_head)
            self.v[layer] = torch.zeros_like(self.k[layer])
        self.k[layer][:, :, start : start + T], self.v[layer][:, :, start : start + T] = k, v
        k, v = self.k[layer][:, :, : start + T], self.v[layer][:, :, : start + T]  # views: no copy
        self.length = start + T if layer == len(self.k) - 1 else start  # the last layer moves it on
        if mask is None and T > 1 and start > 0:  # a later chunk: the causal triangle, shifted by start
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1)
        return attn.c_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C); no dropout at inference


# copied from 04_gpt.py: GPTConfig
@dataclass
class GPTConfig:
    """The numbers that define a GPT; the defaults are GPT-2 small (124M), PRESETS the other sizes."""

    block_size: int = 1024  # longest sequence the model can see (number of learned positions)
    vocab_size: int = 50257  # GPT-2's BPE: 50,000 merges + 256 bytes + <|endoftext|>
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block; each head has n_embd // n_head dimensions
    n_embd: int = 768  # width of the residual stream
    dropout: float = 0.0  # 0 for pretraining (GPT-2 used 0.1); try 0.1+ when finetuning small data
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2; False is a bit faster and as good
    PRESETS: ClassVar[dict[str, dict]] = {  # a class constant, not a field
        "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
        "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
        "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
        "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
        "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),  # nanoGPT's shakespeare-char
        "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64),  # tests and quick demos
    }

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if isinstance(value := getattr(self, name), bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                             f"choose an n_head that divides n_embd (e.g. n_embd={self.n_head * 64})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in cls.PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})


# copied from 04_gpt.py: MLP
class MLP(nn.Module):
    """Position-wise feed-forward: widen 4x, GELU, project back. (B, T, C) -> (B, T, C)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU, so that its weights give its outputs
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C)


# copied from 04_gpt.py: Block
class Block(nn.Module):
    """One transformer block, pre-LayerNorm: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config.n_embd, config.n_head, config.dropout, config.bias)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
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
        for name, p in self.named_parameters():  # GPT-2's residual projections: std / sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None):
        """idx, targets: (B, T) token ids and next tokens (-100: skip) -> logits (B, T, vocab_size), loss."""
        self._check_input(idx)
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab_size)
        loss = None
        if targets is not None:  # in fp32 whatever the logits' dtype (bf16 under autocast)
            loss = F.cross_entropy(logits.float().view(B * T, -1), targets.reshape(B * T), ignore_index=-100)
        return logits, loss

    def _check_input(self, idx):
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"idx must be a (B, T) tensor of integer token ids, not {tuple(idx.shape)} "
                             f"{idx.dtype}; for one sequence use idx[None], for other dtypes idx.long()")
        if idx.size(1) > (block_size := self.config.block_size):
            raise ValueError(f"sequence length {idx.size(1)} exceeds block_size={block_size} (no position "
                             f"embedding beyond it); crop to the last tokens with idx[:, -{block_size}:]")
        # eager CPU tensors only: min/max would make the CPU wait for a GPU and break torch.compile's graph
        if idx.numel() and idx.device.type == "cpu" and not torch.compiler.is_compiling():
            lo, hi, vocab_size = idx.min().item(), idx.max().item(), self.config.vocab_size
            if lo < 0 or hi >= vocab_size:
                raise ValueError(f"token ids must be in [0, {vocab_size}), got ids from {lo} to {hi}; the "
                                 "tokenizer and the model disagree: set GPTConfig.vocab_size to its n_vocab")

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, the tied wte/lm_head once; non_embedding=True leaves out wpe (a lookup, no FLOPs)."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        return n - self.transformer.wpe.weight.numel() if non_embedding else n


# copied from 04_gpt.py: HF_TRANSPOSED
HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


# copied from 04_gpt.py: parse_config
def parse_config(cls, argv=None):
    """The dataclass cls from the command line: a --field=value flag per Annotated field (bools also
    bare), cls.PRESETS first when cls has them; a ValueError from cls is one `error:` line, exit 2."""

    def to_bool(text: str) -> bool:
        if text.lower() not in ("1", "true", "yes", "0", "false", "no"):
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        return text.lower() in ("1", "true", "yes")

    presets = getattr(cls, "PRESETS", {})
    parser = argparse.ArgumentParser(description=(cls.__doc__ or "").split("\n")[0], allow_abbrev=False,
                                     epilog="".join(f"preset {k}: {v}\n" for k, v in presets.items()),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(cls):  # `n_layer: Annotated[int, "transformer blocks"] = 4`: type, help, default
        kind, help_text = f.type.__origin__, f.type.__metadata__[0]
        flag = kind is bool
        parser.add_argument(f"--{f.name}", type=to_bool if flag else kind, metavar=kind.__name__,
                            nargs="?" if flag else None, const=True if flag else None,
                            default=argparse.SUPPRESS,  # absent flags stay absent: the preset or default
                            help=f"{help_text} (default: {f.default!r})".replace("%", "%%"))
    parser.error = lambda message: parser.exit(2, f"error: {message} (see --help)\n")  # one line, no usage
    given = vars(parser.parse_args(argv))
    preset = given.get("preset", getattr(cls, "preset", None))
    try:
        if presets and preset not in presets:
            raise ValueError(f"--preset={preset!r} is not valid; use {', '.join(presets)}")
        return cls(**{**presets.get(preset, {}), **given})
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# copied from 04_gpt.py: pick_device
def pick_device(device: str = "auto") -> str:
    """"auto" -> cuda if there is a GPU, else mps (Apple silicon), else cpu; others are checked."""
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if device == "auto":
        return next(kind for kind in ("cuda", "mps", "cpu") if available[kind])
    kind, _, index = device.partition(":")
    if kind not in available or (index and not index.isdigit()):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:<index> or mps")
    if not available[kind] or (index and kind == "cuda" and int(index) >= torch.cuda.device_count()):
        raise ValueError(f"device {device!r} is not available on this machine; use --device=auto (or cpu)")
    return device


# copied from 05_pretrain.py: load_checkpoint
def load_checkpoint(path):
    """(model, tokenizer, checkpoint dict) from a checkpoint of 05-08; the model is on the CPU. mmap:
    what is not used (Adam's state) is never read. A torch.compile'd model's "_orig_mod." is dropped."""
    if not (path := Path(path)).exists():
        raise FileNotFoundError(f"no checkpoint at {path}; train one with `python 05_pretrain.py` "
                                f"(it writes out_dir/ckpt.pt), or check the path")
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError):  # not torch.save's format, or not just tensors
        ckpt = None
    if not isinstance(ckpt, dict) or not {"model", "model_args", "tokenizer"} <= set(ckpt):
        raise ValueError(f"{path} is not a checkpoint of these scripts (05_pretrain.py to 08_dpo.py write "
                         f"them as out_dir/ckpt.pt); check the path")
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    return model, get_tokenizer(ckpt["tokenizer"]), ckpt


# copied from 07_finetune.py: final_hidden
def final_hidden(model, idx, position_ids=None, mask=None, cache=None):
    """(B, T) ids -> (B, T, n_embd) after ln_f; with a cache (03's KVCache), idx are the tokens after it."""
    tr, start = model.transformer, 0 if cache is None else cache.length
    if position_ids is None:
        position_ids = torch.arange(start, start + idx.size(1), device=idx.device)  # (T,)
    x = tr.drop(tr.wte(idx) + tr.wpe(position_ids))  # (B, T, C)
    for layer, block in enumerate(tr.h):
        h = block.ln_1(x)
        x = x + (block.attn(h) if cache is None else cache.attend(block.attn, h, layer, mask))
        x = x + block.mlp(block.ln_2(x))
    return tr.ln_f(x)


# copied from 07_finetune.py: RESPONSE_HEADER
RESPONSE_HEADER = "\n\n### Response:\n"  # between the prompt and the answer


# copied from 07_finetune.py: format_input
def format_input(entry: dict) -> str:
    """Alpaca's prompt for an entry: a fixed preamble, "### Instruction:", and "### Input:" if any."""
    instruction_text = (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{entry['instruction']}"
    )
    input_text = f"\n\n### Input:\n{entry['input']}" if entry.get("input") else ""
    return instruction_text + input_text


# copied from 09_generate.py: check_sampling
def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be a positive integer (or None/0 for no limit), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus filter), got {top_p}")


# copied from 09_generate.py: sample
def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None) -> torch.Tensor:
    """One token per row of logits (B, V) -> (B,), drawn with `generator` (seeded).

    temperature 0 is greedy (argmax); otherwise the logits are divided by it (< 1 sharper, > 1
    flatter; towards 0, one-hot on the argmax). top_k keeps the k largest logits (ties too); top_p
    the fewest most likely tokens whose probabilities reach top_p (Holtzman et al. 2019): of probs
    [0.5, 0.3, 0.15, 0.05], top_p=0.8 keeps two; the third goes, the mass above it reaches 0.8.
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[..., -1:]  # (B, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        probs, order = torch.sort(F.softmax(logits, dim=-1), dim=-1, descending=True)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # the tokens ranked above already reach top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))  # rank -> token order
    probs = F.softmax(logits, dim=-1)
    return (probs / torch.empty_like(probs).exponential_(generator=generator)).argmax(dim=-1)  # multinomial


# copied from 09_generate.py: BatchCache
class BatchCache:
    """03's KVCache (kv) plus, for left-padded rows: key_real (B, length), False at padding; next_pos
    (B, 1), each row's next position id; padded, whether any cached key is padding (else no mask)."""

    def __init__(self, n_layer: int, max_len: int):
        self.kv, self.key_real, self.next_pos, self.padded = KVCache(n_layer, max_len), None, None, False


# copied from 09_generate.py: forward_cached
def forward_cached(model, idx, cache=None, attention_mask=None, last_only=False):
    """The GPT forward pass around a BatchCache (None: the whole context, nothing kept).

    idx (B, T) are the NEW tokens: their keys/values join the cache, and they attend to everything
    in it. attention_mask (B, T): False at (left) padding. Position ids count each row's real
    tokens, on from the cache: [pad pad a b] gets [0 0 0 1], what `a b` alone gets. Returns logits
    (B, T, V), or (B, 1, V) with last_only (the head is 38.6M of GPT-2's 124M weights). The head runs
    in fp32 outside autocast: sampling and perplexity see exact logits (bf16's steps are 0.125-0.5 at
    GPT-2's logit sizes). For inference: call model.eval() first (dropout off).
    """
    B, T = idx.shape
    t0, limit = 0 if cache is None else cache.kv.length, model.config.block_size
    if t0 + T > limit:
        raise ValueError(f"{t0} cached + {T} new tokens exceed the context of {limit} positions; crop the "
                         f"input or start a new cache (generate_tokens slides the window)")  # fmt: skip
    real = torch.ones_like(idx, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    position_ids = (cache.next_pos if t0 else 0) + (real.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T)
    padded, key_real = attention_mask is not None and not bool(real.all()), real  # key_real: (B, L)
    if cache is not None:
        cache.key_real = real if cache.key_real is None else torch.cat([cache.key_real, real], dim=1)
        cache.padded |= padded
        padded, key_real = cache.padded, cache.key_real
    mask = None  # no padding: causal suffices (KVCache.attend shifts it for a later chunk)
    if padded:
        q_pos = torch.arange(t0, t0 + T, device=idx.device)[:, None]  # (T, 1)
        k_pos = torch.arange(t0 + T, device=idx.device)[None, :]  # (1, L)
        mask = (k_pos <= q_pos) & key_real[:, None, :]  # (B, T, L) causal and key is real
        mask = (mask | (k_pos == q_pos))[:, None]  # (B, 1, T, L); a padded query sees itself: no NaN
    # no cache: plain causal attention (perplexity), or, for the padding mask, a cache used once
    kv = cache.kv if cache is not None else KVCache(model.config.n_layer, T) if padded else None
    h = final_hidden(model, idx, position_ids, mask, kv)  # (B, T, C)
    with torch.autocast(idx.device.type, enabled=False):
        logits = model.lm_head((h[:, -1:] if last_only else h).float())  # (B, T or 1, V)
    if cache is not None:
        cache.next_pos = position_ids[:, -1:] + 1  # (B, 1)
    return logits


# copied from 09_generate.py: left_pad
def left_pad(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """[[5, 6, 7], [8]] -> idx [[5, 6, 7], [0, 0, 8]], mask [[1, 1, 1], [0, 0, 1]] (bool). Left: every
    row's last token is in the last column, so each step appends one new column."""
    if not prompts or not all(prompts):
        raise ValueError("every prompt needs at least one token; start from the eot token or a newline")
    T = max(len(p) for p in prompts)
    idx = torch.tensor([[0] * (T - len(p)) + list(p) for p in prompts], device=device)  # pad id 0: masked
    return idx, torch.tensor([[False] * (T - len(p)) + [True] * len(p) for p in prompts], device=device)


# copied from 09_generate.py: generate_tokens
@torch.no_grad()
def generate_tokens(model, prompts, temperature=1.0, top_k=None, top_p=None, generator=None, use_cache=True):
    """Yield (next_ids (B,), logits (B, V)) for ever, a step per token; the caller decides when to stop.

    prompts: token-id lists of any lengths (left-padded). use_cache=False reruns the whole context
    each step (the same tokens, O(T) times the work). The model knows positions 0 .. block_size-1
    only: a longer prompt keeps its last block_size tokens, and a full context slides to its last
    block_size // 2 tokens, re-encoded from position 0 into a fresh cache. Why not slide by one, as
    04's generate does? Each cached key was computed at its absolute position; moving the window by
    one changes them all, so the cache is stale every step: no cache at all. Halving costs one
    prefill per block_size // 2 tokens. Each row of a batch slides as it would alone.
    """
    block_size, keep = model.config.block_size, max(1, model.config.block_size // 2)
    device = model.lm_head.weight.device
    idx, mask = left_pad([p[-block_size:] for p in prompts], device)  # (B, T) each
    cache, logits = None, None
    while True:
        if logits is None:  # encode the whole window: the prompt, after a slide, or every step uncached
            cache = BatchCache(model.config.n_layer, block_size) if use_cache else None
            logits = forward_cached(model, idx, cache, attention_mask=mask, last_only=True)[:, -1]  # (B, V)
        next_ids = sample(logits, temperature, top_k, top_p, generator)  # (B,)
        yield next_ids, logits
        idx = torch.cat([idx, next_ids[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if idx.size(1) > block_size:  # full: slide the rows that are, re-pad, re-encode
            rows = [[t for t, real in zip(row, is_real) if real]
                    for row, is_real in zip(idx.tolist(), mask.tolist())]  # each row's own tokens
            idx, mask = left_pad([row[-keep:] if len(row) > block_size else row for row in rows], device)
            logits = None
        else:  # with the cache only the new token; without it, the whole window again
            logits = forward_cached(model, next_ids[:, None], cache)[:, -1] if use_cache else None


# copied from 09_generate.py: token_bytes
def token_bytes(tok, token_id: int) -> bytes:
    """The UTF-8 bytes of a token: a GPT-2 token may hold part of a character ('é' is 2 bytes)."""
    if hasattr(tok, "decode_single_token_bytes"):  # tiktoken; a char tokenizer's tokens are whole characters
        return tok.decode_single_token_bytes(token_id)
    return tok.decode([token_id]).encode("utf-8")


# copied from 09_generate.py: TextStream
class TextStream:
    """Token ids in, text out once it is certain: whole characters only, never past a stop string.

    (1) A BPE token may end inside a UTF-8 character (decoded alone: '\\ufffd'); an incremental
    decoder keeps the bytes until the character is whole. (2) A stop string may come split over
    tokens ("\\n\\n###" as "\\n\\n" + "###"), so text that may begin one is held back until it is
    completed (generation stops; it is never shown) or ruled out (it is shown).

    >>> tok = CharTokenizer("\\nHi")
    >>> stream = TextStream(tok, stop_strings=["\\n\\n"])
    >>> [stream.add(i) for i in tok.encode("Hi\\n")], stream.add(tok.encode("\\n")[0]), stream.stopped
    (['H', 'i', ''], '', True)
    """

    def __init__(self, tok, stop_strings=(), on_text=None):
        self.tok, self.stop_strings, self.on_text = tok, [s for s in stop_strings if s], on_text
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text, self.shown, self.stopped = "", 0, False  # shown: characters handed to on_text

    def add(self, token_id: int) -> str:
        """Feed one token; return (and pass to on_text) the text that became certain."""
        self.text += self.decoder.decode(token_bytes(self.tok, token_id))
        # a stop string can only start in the unshown part: everything shown was ruled out
        if hits := [i for s in self.stop_strings if (i := self.text.find(s, self.shown)) >= 0]:
            self.text, self.stopped = self.text[: min(hits)], True
        return self._show(len(self.text) if self.stopped else len(self.text) - self._held_back())

    def finish(self) -> str:
        """Generation ended (eot, max_new_tokens): show what was held back, incomplete bytes as '\\ufffd'."""
        if not self.stopped:
            self.text += self.decoder.decode(b"", final=True)
        return self._show(len(self.text))

    def _held_back(self) -> int:  # the longest end of the text that begins a stop string
        for n in range(min(len(self.text), max((len(s) - 1 for s in self.stop_strings), default=0)), 0, -1):
            if any(s.startswith(self.text[-n:]) for s in self.stop_strings):
                return n
        return 0

    def _show(self, upto: int) -> str:
        chunk, self.shown = self.text[self.shown : upto], max(self.shown, upto)
        if chunk and self.on_text is not None:
            self.on_text(chunk)
        return chunk


if __name__ == "__main__":
    main()
