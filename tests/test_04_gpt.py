"""Tests for 04_gpt.py: the GPT-2 model, its counts, generate(), and loading Hugging Face weights.

The references: Hugging Face transformers' GPT2LMHeadModel (logits on the same random weights,
parameter counts of all four GPT-2 sizes), the safetensors package (files it writes, we read),
ln(vocab_size) for the loss of an untrained model, and plain argmax loops for greedy decoding.
"""

import json
import math
import re
import shutil
import struct
from dataclasses import fields
from pathlib import Path

import pytest
import requests
import torch
from conftest import ROOT, exit_status, interrupted

TINY = dict(block_size=16, vocab_size=101, n_layer=2, n_head=4, n_embd=32)


def tiny_model(gpt04, **overrides):
    model = gpt04.GPT(gpt04.GPTConfig(**{**TINY, **overrides}))
    return model.eval()


# --- shapes, loss, causality ------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("with_targets", [True, False])
def test_forward_shapes(gpt04, bias, with_targets):
    model = tiny_model(gpt04, bias=bias)
    idx = torch.randint(TINY["vocab_size"], (3, 7))
    logits, loss = model(idx, targets=idx if with_targets else None)
    assert logits.shape == (3, 7, TINY["vocab_size"])
    assert (loss is not None) == with_targets
    if with_targets:
        assert loss.shape == ()


def test_loss_at_init_is_about_ln_vocab(gpt04):
    """An untrained model should be unsure of everything: cross-entropy near ln(vocab_size)."""
    model = gpt04.GPT(gpt04.preset_config("tiny", vocab_size=1000))
    idx = torch.randint(1000, (4, 32))
    _, loss = model(idx, targets=torch.randint(1000, (4, 32)))
    assert abs(loss.item() - math.log(1000)) < 0.1


@pytest.mark.parametrize("how", ["autocast", "bf16 weights"])
def test_loss_is_fp32_from_bf16_logits(gpt04, how):
    """bf16 logits, fp32 loss: the log-softmax runs on logits.float(), never in bf16."""
    model = tiny_model(gpt04)
    idx = torch.randint(TINY["vocab_size"], (2, 8))
    if how == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, loss = model(idx, targets=idx)
    else:
        logits, loss = model.to(torch.bfloat16)(idx, targets=idx)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    flat_logits = logits.float().view(-1, TINY["vocab_size"])
    expected = torch.nn.functional.cross_entropy(flat_logits, idx.view(-1))
    torch.testing.assert_close(loss, expected)


def test_loss_ignores_minus_100(gpt04):
    """Targets of -100 drop out of the mean: the loss equals a hand-masked cross-entropy."""
    model = tiny_model(gpt04)
    idx = torch.randint(TINY["vocab_size"], (2, 6))
    targets = idx.clone()
    targets[0, :4] = -100
    logits, loss = model(idx, targets=targets)
    keep = targets != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, expected)


def test_causality(gpt04):
    """Changing token t changes no logits before t (and does change the ones from t on)."""
    model = tiny_model(gpt04)
    idx = torch.randint(TINY["vocab_size"], (1, 12))
    changed = idx.clone()
    changed[0, 8] = (idx[0, 8] + 1) % TINY["vocab_size"]
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


# --- config, counts, init ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_embd=100, n_head=12), "not divisible by n_head"),
        (dict(n_layer=0), "n_layer must be a positive integer"),
        (dict(vocab_size=-5), "vocab_size must be a positive integer"),
        (dict(block_size=1.5), "block_size must be a positive integer"),
        (dict(n_head=0), "n_head must be a positive integer"),
        (dict(dropout=1.0), "dropout must be in [0, 1)"),
    ],
)
def test_config_validation(gpt04, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        gpt04.GPTConfig(**kwargs)


def test_unknown_preset_lists_the_choices(gpt04):
    with pytest.raises(ValueError, match="gpt2-medium"):
        gpt04.preset_config("gpt3")
    assert gpt04.preset_config("tiny", vocab_size=65).vocab_size == 65


@pytest.mark.parametrize("preset", ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"])
def test_param_count_matches_huggingface(gpt04, preset):
    """Built on the meta device (shapes only, no memory), against HF's GPT-2 of the same size."""
    import transformers  # not importorskip: CI installs requirements-dev.txt, and this must run
    config = gpt04.preset_config(preset)
    hf_config = transformers.GPT2Config(
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_embd=config.n_embd,
        n_positions=config.block_size,
    )
    with torch.device("meta"):
        ours, theirs = gpt04.GPT(config), transformers.GPT2LMHeadModel(hf_config)
    assert ours.num_params() == theirs.num_parameters()
    if preset == "gpt2":
        assert ours.num_params() == 124_439_808  # the number everyone quotes for GPT-2 small
        assert ours.num_params(non_embedding=True) == 124_439_808 - 1024 * 768
    assert sum(gpt04.params_by_component(ours).values()) == ours.num_params()


def test_flops_per_token_by_hand(gpt04):
    model = tiny_model(gpt04)
    n = sum(p.numel() for p in model.parameters()) - TINY["block_size"] * TINY["n_embd"]
    L, C = TINY["n_layer"], TINY["n_embd"]
    assert gpt04.flops_per_token(model, seq_len=10) == 6 * n + 12 * L * C * 10
    assert gpt04.flops_per_token(model) == 6 * n + 12 * L * C * TINY["block_size"]


# NVIDIA's datasheets, as they print them, for bf16 tensor cores, TF32 tensor cores and fp32, in
# TFLOP/s. The H100 and L4 sheets give the tensor cores' figures with 2:4 sparsity only: the dense
# peak is half (/ 2 below). The L40S and L40 sheets print the dense figure beside the sparse one.
DATASHEETS = {
    "NVIDIA H100 80GB HBM3": (1979 / 2, 989 / 2, 67),  # H100 SXM5
    "NVIDIA H100 PCIe": (1513 / 2, 756 / 2, 51),
    "NVIDIA L40S": (362.05, 183, 91.6),
    "NVIDIA L40": (181.05, 90.5, 90.5),
    "NVIDIA L4": (242 / 2, 120 / 2, 30.3),
}


@pytest.mark.parametrize("name", DATASHEETS)
def test_peak_flops_by_exact_gpu_name_and_dtype(gpt04, monkeypatch, name):
    """MFU's denominator is the datasheet peak of this exact GPU in the dtype that runs: "H100
    PCIe" is not an SXM H100, "L4" not an L40; fp32 runs as TF32 only while TF32 is on."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    bf16, tf32, fp32 = (tflops * 1e12 for tflops in DATASHEETS[name])
    for dtype in ("bfloat16", "float16"):
        assert gpt04.peak_flops("cuda", dtype) == pytest.approx(bf16, rel=0.01)
    tf32_before = torch.backends.cuda.matmul.allow_tf32  # the process's setting: put it back
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert gpt04.peak_flops("cuda", "float32") == pytest.approx(tf32, rel=0.01)
        torch.backends.cuda.matmul.allow_tf32 = False
        assert gpt04.peak_flops("cuda", "float32") == pytest.approx(fp32, rel=0.01)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32_before
    assert gpt04.peak_flops("cuda", "bfloat16", override=5e12) == 5e12  # --peak_flops wins


def test_peak_flops_knows_no_peak_for_unknown_gpus_and_cpus(gpt04, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")
    assert gpt04.peak_flops("cuda", "bfloat16") is None  # not a full name: no guess
    assert gpt04.peak_flops("cpu", "float32") is None and gpt04.peak_flops("mps", "float32") is None
    assert gpt04.peak_flops("cpu", "float32", override=2e12) == 2e12


def test_gpt_is_lean(gpt04):
    """generate and from_pretrained are functions (later stages copy what they run); MFU is 05's."""
    for name in ("generate", "from_pretrained", "estimate_mfu"):
        assert not hasattr(gpt04.GPT, name), name


def test_weight_tying(gpt04):
    model = tiny_model(gpt04)
    assert model.lm_head.weight is model.transformer.wte.weight
    # one parameter, counted once, and its gradient gathers both uses
    assert model.num_params() == sum(p.numel() for p in set(model.parameters()))
    idx = torch.randint(TINY["vocab_size"], (2, 5))
    _, loss = model(idx, targets=idx)
    loss.backward()
    assert model.transformer.wte.weight.grad is model.lm_head.weight.grad


def test_gpt2_init_scales_residual_projections(gpt04):
    config = gpt04.GPTConfig(n_layer=8, n_head=4, n_embd=256, vocab_size=512, block_size=32)
    model = gpt04.GPT(config)
    residual = 0.02 / math.sqrt(2 * config.n_layer)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(residual, rel=0.05), name
        elif name.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight")):
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        else:  # LayerNorm gains
            assert torch.all(p == 1), name


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "idx, message",
    [
        (torch.zeros(1, 17, dtype=torch.long), "exceeds block_size=16"),
        (torch.tensor([[1, 2, 101]]), r"token ids must be in \[0, 101\)"),
        (torch.tensor([[-1, 2, 3]]), r"token ids must be in \[0, 101\)"),
        (torch.zeros(5, dtype=torch.long), "must be a \\(B, T\\) tensor"),
        (torch.zeros(1, 5), "must be a \\(B, T\\) tensor of integer"),
    ],
)
def test_bad_input_raises_value_error(gpt04, idx, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(gpt04)(idx)


# --- generate ---------------------------------------------------------------------------------


def argmax_loop(model, idx, steps, block_size):
    for _ in range(steps):
        logits, _ = model(idx[:, -block_size:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def test_generate_greedy_equals_argmax_loop(gpt04):
    """Starting at 10 tokens and going to 30 crosses block_size=16: the context must be cropped."""
    model = tiny_model(gpt04)
    idx = torch.randint(TINY["vocab_size"], (2, 10))
    expected = argmax_loop(model, idx, 20, TINY["block_size"])
    torch.testing.assert_close(gpt04.generate(model, idx, 20, temperature=0), expected)
    # top_k=1 leaves one candidate, so sampling at any temperature is greedy too
    torch.testing.assert_close(gpt04.generate(model, idx, 20, temperature=1.5, top_k=1), expected)


def test_generate_top_k_samples_only_the_top_k(gpt04):
    """64 draws for one context at a high temperature: exactly the 3 most likely tokens show up."""
    model = tiny_model(gpt04)
    idx = torch.randint(TINY["vocab_size"], (1, 4)).repeat(64, 1)
    logits, _ = model(idx[:1])
    top3 = set(logits[0, -1].topk(3).indices.tolist())
    out = gpt04.generate(model, idx, 1, temperature=2.0, top_k=3)
    assert out.shape == (64, 5)
    assert set(out[:, -1].tolist()) == top3  # never outside the top 3, and it samples, not argmax


def test_generate_rejects_bad_arguments(gpt04):
    model = tiny_model(gpt04)
    with pytest.raises(ValueError, match="temperature"):
        gpt04.generate(model, torch.zeros(1, 1, dtype=torch.long), 1, temperature=-1)
    with pytest.raises(ValueError, match="top_k"):
        gpt04.generate(model, torch.zeros(1, 1, dtype=torch.long), 1, top_k=0)


# --- safetensors reader -------------------------------------------------------------------------


def test_load_safetensors_reads_what_the_safetensors_package_writes(gpt04, tmp_path):
    import safetensors.torch as safetensors_torch
    tensors = {
        "a.f32": torch.randn(3, 4),
        "b.f16": torch.randn(5).half(),
        "c.bf16": torch.randn(2, 3, 4).bfloat16(),
        "d.i64": torch.arange(-3, 3),
        "e.scalar": torch.tensor(2.5),
        "f.empty": torch.zeros(0, 7),
        "g.bool": torch.tensor([True, False, True]),
    }
    path = tmp_path / "t.safetensors"
    safetensors_torch.save_file(tensors, path, metadata={"format": "pt"})
    loaded = gpt04.load_safetensors(path)
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape, name
        assert torch.equal(loaded[name], t), name


def write_raw(path, header: dict, data: bytes):
    header_bytes = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + data)


def test_load_safetensors_by_hand(gpt04, tmp_path):
    """The format from scratch: one little-endian float32 tensor [1.0, -2.0] after the header."""
    path = tmp_path / "hand.safetensors"
    header = {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    write_raw(path, header, struct.pack("<2f", 1.0, -2.0))
    torch.testing.assert_close(gpt04.load_safetensors(path)["x"], torch.tensor([1.0, -2.0]))


@pytest.mark.parametrize(
    "header, data, message",
    [
        (
            {"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
            b"\0" * 8,
            "inconsistent offsets",
        ),
        (
            {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
            b"\0" * 8,
            "inconsistent offsets",
        ),
        (
            {"x": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}},
            b"\0" * 2,
            "does not support",
        ),
    ],
)
def test_load_safetensors_rejects_bad_files(gpt04, tmp_path, header, data, message):
    path = tmp_path / "bad.safetensors"
    write_raw(path, header, data)
    with pytest.raises(ValueError, match=message):
        gpt04.load_safetensors(path)


def test_load_safetensors_truncated_or_missing(gpt04, tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(ValueError, match="header length"):
        gpt04.load_safetensors(path)
    with pytest.raises(FileNotFoundError):
        gpt04.load_safetensors(tmp_path / "nothing.safetensors")


# --- Hugging Face GPT-2: names, weights, logits --------------------------------------------------


def random_hf_gpt2(activation_function="gelu_new"):
    """A small HF GPT2LMHeadModel with every weight random (biases and LayerNorms too).

    HF initialises biases to 0 and LayerNorm to (1, 0) and its weights small; left that way, a
    mapping that drops or swaps biases would go unnoticed, and so would the exact GELU in place of
    GPT-2's tanh approximation (they differ by < 1e-3, visible only for inputs of order 1).
    Eager attention (a plain softmax): an independent reference for our SDPA path.
    """
    import transformers  # not importorskip: CI installs requirements-dev.txt, and this must run
    sizes = dict(vocab_size=TINY["vocab_size"], n_positions=TINY["block_size"])
    sizes.update(n_embd=TINY["n_embd"])
    sizes.update(n_layer=TINY["n_layer"], n_head=TINY["n_head"], bos_token_id=0, eos_token_id=0)
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf_config = transformers.GPT2Config(**sizes, **no_dropout,
                                        activation_function=activation_function)
    hf_config._attn_implementation = "eager"
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            # activations of order 1, where GELU's tanh approximation and the exact one differ
            # by ~1e-3
            p.normal_(1.0 if ".ln_" in name and name.endswith("weight") else 0.0, 0.3)
    return hf


def save_in_hf_naming(hf, path, prefix):
    """Write hf's weights the way Hugging Face's model.safetensors files hold them.

    prefix="": OpenAI-era checkpoints ("h.0.attn.c_attn.weight"), "transformer.": newer ones.
    The tied lm_head is left out (as save_pretrained does), and the attention-mask buffers that old
    checkpoints carry are put in, since the loader must skip them.
    """
    import safetensors.torch as safetensors_torch
    sd = {prefix + k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
    del sd[prefix + "lm_head.weight"]
    T = TINY["block_size"]
    sd[prefix + "h.0.attn.bias"] = torch.ones(1, 1, T, T).tril()
    sd[prefix + "h.0.attn.masked_bias"] = torch.tensor(-1e4)
    safetensors_torch.save_file({k: v.contiguous() for k, v in sd.items()}, path)


@pytest.mark.parametrize("prefix, gelu, hf_gelu", [
    ("", "tanh", "gelu_new"),  # OpenAI's GPT-2
    ("transformer.", "tanh", "gelu_new"),
    ("", "none", "gelu"),  # the exact GELU that 05 trains with
])  # fmt: skip
def test_logits_match_huggingface_gpt2(gpt04, tmp_path, prefix, gelu, hf_gelu):
    hf = random_hf_gpt2(hf_gelu)
    path = tmp_path / "model.safetensors"
    save_in_hf_naming(hf, path, prefix)
    model = tiny_model(gpt04, gelu=gelu)
    model.load_state_dict(gpt04.hf_to_gpt_state_dict(gpt04.load_safetensors(path)))
    assert model.lm_head.weight is model.transformer.wte.weight  # loading kept the tie

    idx = torch.randint(TINY["vocab_size"], (3, TINY["block_size"]))
    with torch.no_grad():
        expected = hf(idx).logits
        logits, _ = model(idx)
        # HF shifts labels inside; compare on shifted targets
        expected_loss = hf(idx, labels=idx).loss
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    _, shifted_loss = model(idx[:, :-1], targets=idx[:, 1:])
    torch.testing.assert_close(shifted_loss, expected_loss, atol=1e-4, rtol=1e-4)


def test_right_padding_needs_no_mask_matches_huggingface_gpt2(gpt04, tmp_path):
    """Right-padded batch, no mask on our side: real tokens' logits equal HF's with attention_mask.

    What 07 and 08 rely on: causal attention already keeps right pads away from real tokens.
    """
    hf = random_hf_gpt2()
    model = tiny_model(gpt04)
    model.load_state_dict(gpt04.hf_to_gpt_state_dict(hf.state_dict()))
    idx = torch.randint(TINY["vocab_size"], (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        expected = hf(idx, attention_mask=mask).logits
        logits, _ = model(idx)
        alone, _ = model(idx[1:, :6])  # the short sequence on its own, no padding at all
    real = mask.bool()
    torch.testing.assert_close(logits[real], expected[real], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1, :6], alone[0], atol=1e-5, rtol=1e-5)


def test_hf_to_gpt_transposes_conv1d_and_rejects_other_checkpoints(gpt04):
    C = 4
    sd = {
        "wte.weight": torch.randn(10, C),
        "h.0.attn.c_attn.weight": torch.randn(C, 3 * C),  # Conv1D: (in, out)
        "h.0.attn.c_attn.bias": torch.randn(3 * C),
        "h.0.attn.bias": torch.ones(1, 1, 3, 3),
    }
    out = gpt04.hf_to_gpt_state_dict(sd)
    names = ["wte.weight", "h.0.attn.c_attn.weight", "h.0.attn.c_attn.bias"]
    assert out.keys() == {"transformer." + name for name in names} | {"lm_head.weight"}
    conv1d = sd["h.0.attn.c_attn.weight"]
    torch.testing.assert_close(out["transformer.h.0.attn.c_attn.weight"], conv1d.T)
    torch.testing.assert_close(out["transformer.h.0.attn.c_attn.bias"], sd["h.0.attn.c_attn.bias"])
    assert out["lm_head.weight"] is out["transformer.wte.weight"]
    with pytest.raises(ValueError, match="GPT-2 checkpoint"):
        gpt04.hf_to_gpt_state_dict({"model.embed_tokens.weight": torch.zeros(2, 2)})


# --- from_pretrained and the download, without network ---------------------------------------


class FakeResponse:
    """Just enough of requests.Response for the download that 04 copies from 01."""

    def __init__(self, body: bytes, announced: int | None = None):
        self.body, self.history = body, []
        size = len(body) if announced is None else announced
        self.headers = requests.structures.CaseInsensitiveDict({"Content-Length": str(size)})
        self.status_code = 200

    def raise_for_status(self):
        pass

    def iter_content(self, chunk_size=1):
        for i in range(0, len(self.body), 1000):
            yield self.body[i : i + 1000]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_from_pretrained_downloads_then_loads(gpt04, tmp_path, monkeypatch):
    """The first call fetches Hugging Face's URL into cache_dir/gpt2/ and the logits are HF's."""
    hf = random_hf_gpt2()
    monkeypatch.setitem(gpt04.GPT_PRESETS, "gpt2", TINY)
    served = tmp_path / "served.safetensors"
    save_in_hf_naming(hf, served, prefix="")
    urls = []

    def fake_get(url, *args, **kwargs):
        urls.append(url)
        return FakeResponse(served.read_bytes())

    monkeypatch.setattr(gpt04.requests, "get", fake_get)
    model = gpt04.from_pretrained("gpt2", cache_dir=tmp_path / "cache")
    assert urls == ["https://huggingface.co/gpt2/resolve/main/model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "cache" / "gpt2").iterdir()) == ["model.safetensors"]
    idx = torch.randint(TINY["vocab_size"], (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-4, rtol=1e-4)


def test_save_ckpt_writes_openais_model_as_a_checkpoint_05_loads(
    gpt04, pre05, tmp_path, monkeypatch, capsys
):
    """OpenAI's weights enter once, at 04: --save_ckpt writes them in 05-09's checkpoint format."""
    # GPT-2's tokens for the sample
    source = gpt04.GPT(gpt04.GPTConfig(**{**TINY, "vocab_size": 50257}))
    monkeypatch.setattr(gpt04, "from_pretrained", lambda model_type, cache_dir: source)
    gpt04.main(["--init_from=gpt2", "--save_ckpt", f"--data_dir={tmp_path}", "--max_new_tokens=2"])
    assert "07_finetune.py --init_from=gpt2" in capsys.readouterr().out
    model, tokenizer, ckpt = pre05.load_checkpoint(tmp_path / "gpt2" / "ckpt.pt")
    assert ckpt["stage"] == "openai"
    assert ckpt["tokenizer"] == {"kind": "gpt2"}
    assert ckpt["iter_num"] == 0
    idx = torch.randint(50257, (1, 8))
    torch.testing.assert_close(model.eval()(idx)[0], source.cpu().eval()(idx)[0], rtol=0, atol=0)
    assert not list(tmp_path.glob("**/*.tmp"))


def test_from_pretrained_checks_the_size_and_leaves_no_partial_file(gpt04, tmp_path, monkeypatch):
    """The server announced 20 bytes and sent 11: an error, and nothing left in the cache."""
    def short_response(*args, **kwargs):
        return FakeResponse(b"hello world", announced=20)

    monkeypatch.setattr(gpt04.requests, "get", short_response)
    with pytest.raises(RuntimeError, match=r"\b11\b.*\b20\b"):
        gpt04.from_pretrained("gpt2", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # no partial file, and no empty gpt2/ folder


def offline(*args, **kwargs):
    raise requests.ConnectionError("Name or service not known")


def test_from_pretrained_without_network_says_what_to_do(gpt04, tmp_path, monkeypatch):
    """Offline: an error naming where to put the file by hand, nothing left behind; and a file put
    there by hand is what the next call loads, still offline."""
    monkeypatch.setattr(gpt04.requests, "get", offline)
    with pytest.raises(RuntimeError) as error:
        gpt04.from_pretrained("gpt2", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # no partial file, and no empty gpt2/ folder
    by_hand = re.search(r"put the file at (\S+) by hand", str(error.value))[1]
    monkeypatch.setitem(gpt04.GPT_PRESETS, "gpt2", TINY)
    hf = random_hf_gpt2()
    save_in_hf_naming(hf, by_hand, prefix="")
    model = gpt04.from_pretrained("gpt2", cache_dir=tmp_path)
    idx = torch.randint(TINY["vocab_size"], (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-4, rtol=1e-4)


def test_init_from_gpt2_offline_is_one_line_and_leaves_nothing(
    gpt04, tmp_path, monkeypatch, capsys
):
    """`04 --init_from=gpt2` without network: exit 2, one `error:` line saying where to put the
    file, no traceback, and no empty data_dir/gpt2/ left behind."""
    monkeypatch.setattr(gpt04.requests, "get", offline)
    with pytest.raises(SystemExit) as exit_info:
        gpt04.main(["--init_from=gpt2", f"--data_dir={tmp_path}", "--device=cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: download of ") and err.count("\n") == 1, err
    assert f"put the file at {tmp_path}" in err
    assert list(tmp_path.iterdir()) == []


class CutByCtrlC(FakeResponse):
    """A download that a Ctrl-C stops after its first block."""

    def iter_content(self, chunk_size=1):
        yield self.body[:1000]
        interrupted()


@pytest.mark.parametrize("init_from", ["gpt2", "scratch"])
def test_ctrl_c_is_one_line_and_exit_130(gpt04, tmp_path, monkeypatch, capsys, init_from):
    """A Ctrl-C while OpenAI's weights download (gpt2) or while the demo samples (scratch): one
    line, a shell's 130, no traceback, and no partial download left in data_dir."""
    monkeypatch.setattr(gpt04.requests, "get", lambda *args, **kwargs: CutByCtrlC(bytes(5000)))
    monkeypatch.setattr(gpt04, "generate", interrupted)
    with pytest.raises(BaseException) as stop:  # an escaped KeyboardInterrupt would end pytest
        gpt04.main([f"--init_from={init_from}", f"--data_dir={tmp_path}", "--device=cpu"])
    assert stop.type is SystemExit and stop.value.code == 130
    assert capsys.readouterr().err.strip() == "Ctrl-C: stopped"
    assert list(tmp_path.iterdir()) == []


def test_no_tokenizer_files_offline_is_one_line(gpt04, monkeypatch, capsys):
    """tiktoken fetches GPT-2's BPE files on first use: offline, that is one `error:` line too."""
    import tiktoken

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(SystemExit) as exit_info:
        gpt04.main(["--max_new_tokens=1", "--device=cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: ") and "Name or service not known" in err


def test_a_relative_data_dir_resolves_against_the_project_folder(
    gpt04, tmp_path, monkeypatch, capsys
):
    """A relative --data_dir, run from another folder, lands in the project, where 05-10 look."""
    source = gpt04.GPT(gpt04.GPTConfig(**{**TINY, "vocab_size": 50257}))
    monkeypatch.setattr(gpt04, "from_pretrained", lambda model_type, cache_dir: source)
    monkeypatch.chdir(tmp_path)
    relative = f".test-04-{tmp_path.name}"  # beside the scripts, removed at the end
    try:
        gpt04.main(["--init_from=gpt2", "--save_ckpt", f"--data_dir={relative}",
                    "--max_new_tokens=1"])
        assert (ROOT / relative / "gpt2" / "ckpt.pt").exists()
        assert list(tmp_path.iterdir()) == []  # nothing in the current folder
    finally:
        shutil.rmtree(ROOT / relative, ignore_errors=True)


def test_from_pretrained_uses_the_cache(gpt04, tmp_path, monkeypatch):
    """With the file in the cache, from_pretrained loads it and never touches the network.

    ("gpt2" is shrunk to the tiny test size so that the cached file is small.)
    """
    hf = random_hf_gpt2()
    monkeypatch.setitem(gpt04.GPT_PRESETS, "gpt2", TINY)

    def no_network(*args, **kwargs):
        raise AssertionError("from_pretrained must not download a cached file")

    monkeypatch.setattr(gpt04.requests, "get", no_network)
    (tmp_path / "gpt2").mkdir()
    save_in_hf_naming(hf, tmp_path / "gpt2" / "model.safetensors", prefix="")
    model = gpt04.from_pretrained("gpt2", cache_dir=tmp_path)
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied: one Parameter
    # nothing left on "meta"
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    idx = torch.randint(TINY["vocab_size"], (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="gpt2-xl"):
        gpt04.from_pretrained("gpt5", cache_dir=tmp_path)


# --- the command line --------------------------------------------------------------------------


def test_help(gpt04, capsys):
    """Every flag, with its default once (argparse adds it; no help text says it again)."""
    with pytest.raises(SystemExit) as exit_info:
        gpt04.main(["--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    flags = [f.name for f in fields(gpt04.SampleConfig)]
    assert all(f"--{name}" in out for name in flags) and "--init_from" in out
    assert out.count("default") == len(flags)


def test_demo_counts_gpt2_and_samples(gpt04, capsys):
    gpt04.main(["--max_new_tokens=3", "--device=cpu"])
    out = capsys.readouterr().out
    assert "124,439,808" in out and "training FLOPs per token" in out and "sample from" in out
    gpt04.main(["--preset=gpt2-xl", "--max_new_tokens=2", "--temperature=0", "--top_k=0"])
    out = capsys.readouterr().out
    assert "1,557,611,200" in out and "sample from" in out  # gpt2-xl counted on "meta", in no time
    for prompt in ("", "a<|endoftext|>b"):  # none: from <|endoftext|>; a typed one is text
        gpt04.main([f"--prompt={prompt}", "--max_new_tokens=2", "--device=cpu"])
        assert "sample from" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--device=tpu"], "unknown device 'tpu'"),
        (["--device=cuda:99"], "device 'cuda:99' is not available"),
        (["--temperature=-1"], "must be >= 0"),
        (["--temperature=nan"], "must be >= 0"),  # nan fails every comparison, and min()
        # torch.manual_seed takes 64 bits: a bigger seed was an OverflowError traceback
        (["--seed=99999999999999999999"], "--seed=99999999999999999999: use an integer in"),
        (["--seed=-1"], "--seed=-1: use an integer in"),
        # a file where OpenAI's weights go (relative to the project): a traceback from mkdir
        (["--init_from=gpt2", "--data_dir=04_gpt.py"], "--data_dir=04_gpt.py is a file"),
        (["--preset=gpt3"], "--preset='gpt3' is not valid"),
        (["--dtype=float16", "--device=cpu"], "float16 needs loss scaling"),
        (["--init_fro=gpt2"], "unrecognized arguments: --init_fro"),  # no abbreviations
        # a misspelt flag: the closest one is suggested, from the flags of this script
        (["--max_new_token=3"], "--max_new_token=3 (did you mean --max_new_tokens?)"),
        (["--temprature", "0.5"], "--temprature 0.5 (did you mean --temperature?)"),
        (["--max_new_tokens=many"], "invalid int value"),
    ],
)
def test_cli_errors_are_one_line(gpt04, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        gpt04.main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and message in captured.err, captured.err
    assert captured.err.count("\n") == 1 and captured.out == ""  # one line, before any work


def test_a_data_dir_below_a_file_is_one_line(gpt04, tmp_path, monkeypatch, capsys):
    """A --data_dir that no folder can be made at (a file on its path) is an OSError in the
    download: one `error:` line naming the path, exit 2, no traceback."""
    monkeypatch.setattr(gpt04.requests, "get", offline)
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    data_dir = tmp_path / "notes.txt" / "weights"
    argv = ["--init_from=gpt2", f"--data_dir={data_dir}", "--device=cpu"]
    assert exit_status(gpt04.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "notes.txt" in err, err


def test_an_unknown_flag_far_from_every_flag_gets_no_suggestion(gpt04, capsys):
    with pytest.raises(SystemExit):
        gpt04.main(["--xyzzy=1"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --xyzzy=1" in err and "did you mean" not in err


def test_ctrl_c_while_saving_the_weights_leaves_no_partial_file(gpt04, tmp_path, monkeypatch,
                                                                capsys):
    """--save_ckpt writes ckpt.pt.tmp, then renames it: a Ctrl-C mid-write leaves neither file
    (gpt2-xl's is 6 GB)."""
    tiny = gpt04.GPT(gpt04.preset_config("tiny"))
    monkeypatch.setattr(gpt04, "from_pretrained", lambda *args, **kwargs: tiny)

    def cut_short(obj, path):
        Path(path).write_bytes(b"half a checkpoint")
        interrupted()

    monkeypatch.setattr(gpt04.torch, "save", cut_short)
    argv = ["--init_from=gpt2", "--save_ckpt", f"--data_dir={tmp_path}", "--device=cpu"]
    assert exit_status(gpt04.main, argv) == 130
    assert capsys.readouterr().err.strip() == "Ctrl-C: stopped"
    assert list((tmp_path / "gpt2").iterdir()) == []
