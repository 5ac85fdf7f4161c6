"""Tests for 03_attention.py: every version computes the same function, causality, padding, errors.

References are independent of the code under test: a hand-computed example, a per-query loop that
never builds a mask, weights copied into the per-head version by this file's own slicing, and the
unpadded computation of each sequence on its own.
"""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import exit_status, interrupted
from torch.testing import assert_close

C, NH = 16, 4  # default width and heads for the small modules below
MULTI_HEAD = ["MultiHeadAttentionWrapper", "MultiHeadAttention", "CausalSelfAttention",
              "PaddedCausalSelfAttention"]
CAUSAL = ["CausalAttention"] + MULTI_HEAD


def make(m, name, n_embd=C, n_head=NH, dropout=0.0, bias=True):
    """A module of class `name`; the single head gets the size one head of n_head would have."""
    if name == "CausalAttention":
        return m.CausalAttention(n_embd, n_embd // n_head, dropout=dropout, bias=bias)
    return getattr(m, name)(n_embd, n_head, dropout=dropout, bias=bias)


def call(module, x):
    """module(x); the padded class gets an all-real mask: it must then be plain causal attention."""
    if type(module).__name__ == "PaddedCausalSelfAttention":
        return module(x, torch.ones(x.shape[:2], dtype=torch.bool))
    return module(x)


@torch.no_grad()
def load_fused_into_heads(wrapper, fused):
    """Copy a MultiHeadAttention's weights into a MultiHeadAttentionWrapper, by hand.

    c_attn's output is [q | k | v], each n_embd wide, and channels [h*hs, (h+1)*hs) of each third
    belong to head h (that is what `view(B, T, n_head, hs)` means). Deliberately not the script's
    fused_state_dict, so a layout bug in either one shows up.
    """
    n_embd, hs = fused.n_embd, fused.n_embd // fused.n_head
    for h, head in enumerate(wrapper.heads):
        for third, linear in enumerate((head.W_q, head.W_k, head.W_v)):
            rows = slice(third * n_embd + h * hs, third * n_embd + (h + 1) * hs)
            linear.weight.copy_(fused.c_attn.weight[rows])
            if linear.bias is not None:
                linear.bias.copy_(fused.c_attn.bias[rows])
    wrapper.c_proj.load_state_dict(fused.c_proj.state_dict())


def same_weights(m, n_embd=C, n_head=NH, bias=True):
    """(wrapper, mha, csa) holding the same weights."""
    mha = m.MultiHeadAttention(n_embd, n_head, bias=bias).eval()
    wrapper = m.MultiHeadAttentionWrapper(n_embd, n_head, bias=bias).eval()
    load_fused_into_heads(wrapper, mha)
    csa = m.CausalSelfAttention(n_embd, n_head, bias=bias).eval()
    csa.load_state_dict(mha.state_dict())
    return wrapper, mha, csa


def padded_and_plain(m, n_embd=C, n_head=NH):
    """(PaddedCausalSelfAttention, CausalSelfAttention) holding the same weights."""
    padded = m.PaddedCausalSelfAttention(n_embd, n_head).eval()
    plain = m.CausalSelfAttention(n_embd, n_head).eval()
    plain.load_state_dict(padded.state_dict())
    return padded, plain


# -----------------------------------------------------------------------------
# steps 1-3 against formulas


def test_simple_self_attention_hand_computed(attn03):
    # two orthogonal tokens: scores = identity, each row softmaxes to [e, 1] / (e + 1)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    e = math.e
    expected = torch.tensor([[e / (e + 1), 1 / (e + 1)], [1 / (e + 1), e / (e + 1)]])
    assert_close(attn03.simple_self_attention(x), expected)
    batch = torch.randn(3, 5, 4)  # batched input = each sequence on its own
    out = attn03.simple_self_attention(batch)
    for b in range(3):
        assert_close(out[b], attn03.simple_self_attention(batch[b]))


def test_self_attention_matches_formula(attn03):
    attn = attn03.SelfAttention(6, 4, bias=True)
    x = torch.randn(2, 5, 6)
    q, k, v = (x @ W.weight.T + W.bias for W in (attn.W_q, attn.W_k, attn.W_v))
    weights = torch.softmax(q @ k.transpose(1, 2) / 2.0, dim=-1)  # sqrt(d_out) = sqrt(4) = 2
    assert_close(attn(x), weights @ v, atol=1e-5, rtol=0)


def reference_causal_head(x, head):
    """Query t attends to keys 0..t by slicing them out: no mask, no -inf, one query at a time."""
    q, k, v = (F.linear(x, W.weight, W.bias) for W in (head.W_q, head.W_k, head.W_v))  # (T, d)
    rows = []
    for t in range(x.size(0)):
        w = torch.softmax(q[t] @ k[: t + 1].T / math.sqrt(k.size(-1)), dim=0)  # (t+1,)
        rows.append(w @ v[: t + 1])
    return torch.stack(rows)  # (T, d)


def test_causal_attention_matches_per_query_loop(attn03):
    head = attn03.CausalAttention(8, 4, bias=True).eval()
    x = torch.randn(2, 6, 8)
    out = head(x)
    for b in range(2):
        assert_close(out[b], reference_causal_head(x[b], head), atol=1e-5, rtol=0)
    weights = head.attention_weights(x)  # zero above the diagonal, rows sum to 1
    assert torch.all(weights.triu(diagonal=1) == 0)
    assert_close(weights.sum(-1), torch.ones(2, 6))


# -----------------------------------------------------------------------------
# step 4 and 5: the same weights give the same function


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("B,T,n_embd,n_head", [(2, 7, 16, 4), (1, 1, 8, 1), (3, 12, 24, 6)])
def test_versions_agree(attn03, bias, B, T, n_embd, n_head):
    wrapper, mha, csa = same_weights(attn03, n_embd, n_head, bias)
    x = torch.randn(B, T, n_embd)
    with torch.no_grad():
        y = mha(x)
        assert_close(wrapper(x), y, atol=1e-5, rtol=0)
        assert_close(csa(x), y, atol=1e-5, rtol=0)
        # the padding-mask path with no padding is the is_causal path
        padded = attn03.PaddedCausalSelfAttention(n_embd, n_head, bias=bias).eval()
        padded.load_state_dict(csa.state_dict())
        assert_close(padded(x, torch.ones(B, T, dtype=torch.bool)), y, atol=1e-5, rtol=0)


def test_causal_self_attention_takes_x_only(attn03):
    """The class every later stage copies has no padding path: forward(x), is_causal SDPA."""
    assert list(inspect.signature(attn03.CausalSelfAttention.forward).parameters) == ["self", "x"]


def test_one_head_of_wrapper_is_causal_attention(attn03):
    wrapper, _, _ = same_weights(attn03, n_head=1)
    x = torch.randn(2, 5, C)
    with torch.no_grad():
        assert_close(wrapper(x), wrapper.c_proj(wrapper.heads[0](x)))
        expected = reference_causal_head(x[0], wrapper.heads[0])
        assert_close(wrapper.heads[0](x)[0], expected, atol=1e-5, rtol=0)


def test_fused_state_dict_matches_hand_copy(attn03):
    wrapper = attn03.MultiHeadAttentionWrapper(C, NH)
    mha = attn03.MultiHeadAttention(C, NH)
    mha.load_state_dict(wrapper.fused_state_dict())
    back = attn03.MultiHeadAttentionWrapper(C, NH)
    # fused -> heads by this file's slicing: the round trip is exact
    load_fused_into_heads(back, mha)
    for (name, p), (_, p_back) in zip(wrapper.state_dict().items(), back.state_dict().items()):
        assert torch.equal(p, p_back), name
    x = torch.randn(2, 6, C)
    with torch.no_grad():
        assert_close(mha(x), wrapper(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("padding", ["none", "all real", "left"])
def test_sdpa_gradients_match_manual(attn03, padding):
    _, mha, csa = same_weights(attn03)
    x, dy = torch.randn(2, 9, C), torch.randn(2, 9, C)
    mask = torch.ones(2, 9, dtype=torch.bool)
    if padding == "left":
        mask[1, :3] = False

    def grads(module, loss_fn):  # gradients of the loss w.r.t. the input and every weight
        x_ = x.clone().requires_grad_()
        return torch.autograd.grad(loss_fn(module, x_), [x_, *module.parameters()])

    # SDPA: the padded batch at once, loss on real tokens only; manual: each sequence alone, no pads
    if padding == "none":
        grads_sdpa = grads(csa, lambda m, x_: (m(x_) * dy).sum())
    else:
        padded = attn03.PaddedCausalSelfAttention(C, NH).eval()
        padded.load_state_dict(csa.state_dict())
        grads_sdpa = grads(padded, lambda m, x_: (m(x_, mask) * dy)[mask].sum())
    def manual_loss(m, x_):  # each sequence alone, its pads removed
        rows = [(m(x_[b : b + 1, mask[b]]) * dy[b : b + 1, mask[b]]).sum() for b in range(2)]
        return sum(rows)

    grads_manual = grads(mha, manual_loss)
    for g_sdpa, g_manual in zip(grads_sdpa, grads_manual, strict=True):
        assert_close(g_sdpa, g_manual, atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# causality


@pytest.mark.parametrize("t", [0, 3, 6])
@pytest.mark.parametrize("name", CAUSAL)
def test_future_never_changes_the_past(attn03, name, t):
    module = make(attn03, name).eval()
    x = torch.randn(2, 8, C)
    x_changed = x.clone()
    x_changed[:, t + 1 :] = 3 * torch.randn(2, 8 - t - 1, C)
    with torch.no_grad():
        y, y_changed = call(module, x), call(module, x_changed)
    assert_close(y_changed[:, : t + 1], y[:, : t + 1])
    # the change did arrive later on
    assert not torch.allclose(y_changed[:, t + 1 :], y[:, t + 1 :])


def test_self_attention_is_not_causal(attn03):
    # the control for the test above: without the mask the future leaks into the past
    attn = attn03.SelfAttention(C, 4)
    x = torch.randn(1, 8, C)
    x_changed = x.clone()
    x_changed[:, 4:] += 1.0
    with torch.no_grad():
        assert not torch.allclose(attn(x_changed)[:, :4], attn(x)[:, :4])


# -----------------------------------------------------------------------------
# padding mask


def padding_mask(kind, T=7):
    rows = {
        "right": [[1] * 7, [1] * 4 + [0] * 3, [1] + [0] * 6],
        "left": [[1] * 7, [0] * 3 + [1] * 4, [0] * 6 + [1]],
        "holes": [[1, 0, 1, 1, 0, 1, 1], [0, 1, 1, 0, 0, 1, 0], [1] * 7],
    }[kind]
    return torch.tensor(rows, dtype=torch.bool)


@pytest.mark.parametrize("kind", ["right", "left", "holes"])
def test_padding_never_influences_real_tokens(attn03, kind):
    padded, plain = padded_and_plain(attn03)
    mask = padding_mask(kind)  # (3, 7)
    x = torch.randn(3, 7, C)
    x_other_pads = torch.where(mask[..., None], x, 100 * torch.randn_like(x))
    with torch.no_grad():
        y = padded(x, attention_mask=mask)
        assert torch.isfinite(y).all()
        assert_close(padded(x_other_pads, attention_mask=mask)[mask], y[mask])
        # attention has no notion of position: a real token's output equals the same computation
        # on the real tokens alone, pads removed
        for b in range(3):
            alone = plain(x[b : b + 1, mask[b]])  # (1, n_real, C)
            assert_close(y[b, mask[b]], alone[0], atol=1e-5, rtol=0)
        if kind == "right":  # what 07/08 rely on: right pads never reach real tokens, even unmasked
            assert_close(plain(x_other_pads)[mask], y[mask], atol=1e-5, rtol=0)
        else:  # control: without the mask, earlier pads do reach real tokens
            assert not torch.allclose(plain(x_other_pads)[mask], plain(x)[mask])


def test_mask_accepts_bool_int_and_float(attn03):
    padded = attn03.PaddedCausalSelfAttention(C, NH).eval()
    mask = padding_mask("left")
    x = torch.randn(3, 7, C)
    with torch.no_grad():
        y = padded(x, attention_mask=mask)
        assert_close(padded(x, attention_mask=mask.long()), y)
        assert_close(padded(x, attention_mask=mask.float()), y)


def test_fully_padded_rows_give_no_nan(attn03):
    csa = attn03.PaddedCausalSelfAttention(C, NH).eval()
    mask = torch.tensor([[0] * 5, [0, 0, 1, 1, 1]], dtype=torch.bool)  # row 0 entirely padding
    x = torch.randn(2, 5, C, requires_grad=True)
    y = csa(x, attention_mask=mask)
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(csa.c_attn.weight.grad).all()
    # a query with no real key in reach attends to itself only: its output is c_proj(v of itself)
    v = F.linear(x, csa.c_attn.weight[2 * C :], csa.c_attn.bias[2 * C :])  # (B, T, C)
    expected = csa.c_proj(v)
    assert_close(y[0], expected[0], atol=1e-5, rtol=0)
    assert_close(y[1, :2], expected[1, :2], atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(7,), (3, 6), (2, 7), (3, 7, 1)])
def test_mask_shape_error(attn03, shape):
    padded = attn03.PaddedCausalSelfAttention(C, NH)
    with pytest.raises(ValueError, match="attention_mask"):
        padded(torch.randn(3, 7, C), attention_mask=torch.ones(shape, dtype=torch.bool))


# -----------------------------------------------------------------------------
# KV cache: any split of a sequence into chunks, fed in order, gives what the whole sequence gives


@pytest.mark.parametrize("chunks", [[1] * 7, [3, 1, 1, 2], [7], [2, 5], [4, 3]])
@pytest.mark.parametrize("B", [1, 3])
def test_kv_cache_chunk_by_chunk_equals_the_whole_sequence(attn03, chunks, B):
    csa = attn03.CausalSelfAttention(C, NH).eval()
    x = torch.randn(B, 7, C)
    cache = attn03.KVCache(n_layer=1, max_len=7)
    with torch.no_grad():
        pieces, start = [], 0
        for size in chunks:
            pieces.append(cache.attend(csa, x[:, start : start + size], layer=0))
            start += size
            assert cache.length == start
        assert_close(torch.cat(pieces, dim=1), csa(x), atol=1e-5, rtol=0)


def test_kv_cache_length_moves_on_after_the_last_layer(attn03):
    layers = [attn03.CausalSelfAttention(C, NH).eval() for _ in range(3)]
    cache, x = attn03.KVCache(n_layer=3, max_len=4), torch.randn(2, 4, C)
    with torch.no_grad():
        for i, attn in enumerate(layers):
            cache.attend(attn, x, layer=i)
            assert cache.length == (4 if i == 2 else 0)  # every layer writes at the same positions
        # and each layer keeps its own keys: layer i's are attn i's
        for i, attn in enumerate(layers):
            k = F.linear(x, attn.c_attn.weight[C : 2 * C], attn.c_attn.bias[C : 2 * C])  # (B, T, C)
            assert_close(cache.k[i], k.view(2, 4, NH, C // NH).transpose(1, 2))


def test_kv_cache_with_left_padding_equals_each_row_alone(attn03):
    """Step 6's mask in the cache: the prompt with it, then each new token over real keys only."""
    csa = attn03.CausalSelfAttention(C, NH).eval()
    # row 0: 2 pads, then 2 tokens
    real = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    x = torch.randn(2, 4 + 3, C)  # a 4-token padded prompt, then 3 new tokens
    cache = attn03.KVCache(n_layer=1, max_len=7)
    causal, self_ = torch.ones(4, 4, dtype=torch.bool).tril(), torch.eye(4, dtype=torch.bool)
    prompt_mask = (causal & real[:, None, :]) | self_  # (B, T, T) causal, real keys, and itself
    with torch.no_grad():
        outs = [cache.attend(csa, x[:, :4], 0, prompt_mask[:, None])]
        for t in range(4, 7):
            real = torch.cat([real, torch.ones(2, 1, dtype=torch.bool)], dim=1)
            outs.append(cache.attend(csa, x[:, t : t + 1], 0, real[:, None, None, :]))
        y = torch.cat(outs, dim=1)
        for b in range(2):  # attention knows no positions: a row alone is its real tokens alone
            alone = csa(x[b : b + 1, real[b]])[0]
            assert_close(y[b, real[b]], alone, atol=1e-5, rtol=0)


# -----------------------------------------------------------------------------
# shapes, errors, dropout


@pytest.mark.parametrize("B,T,n_embd,n_head", [(1, 1, 8, 1), (2, 5, 12, 3), (3, 16, 32, 8)])
def test_shapes(attn03, B, T, n_embd, n_head):
    x = torch.randn(B, T, n_embd)
    assert attn03.simple_self_attention(x).shape == (B, T, n_embd)
    assert attn03.simple_self_attention(x[0]).shape == (T, n_embd)
    assert attn03.SelfAttention(n_embd, 5)(x).shape == (B, T, 5)
    assert attn03.SelfAttention(n_embd, 5).attention_weights(x).shape == (B, T, T)
    assert make(attn03, "CausalAttention", n_embd, n_head)(x).shape == (B, T, n_embd // n_head)
    for name in MULTI_HEAD:
        assert call(make(attn03, name, n_embd, n_head), x).shape == (B, T, n_embd), name


@pytest.mark.parametrize("name", MULTI_HEAD)
@pytest.mark.parametrize("n_embd,n_head", [(10, 3), (16, 5), (16, 0)])
def test_n_head_must_divide_n_embd(attn03, name, n_embd, n_head):
    with pytest.raises(ValueError, match=f"n_embd={n_embd} is not divisible by n_head={n_head}"):
        getattr(attn03, name)(n_embd, n_head)


@pytest.mark.parametrize("name", CAUSAL)
def test_dropout_only_in_training(attn03, name):
    module = make(attn03, name, dropout=0.5)
    if hasattr(module, "resid_dropout"):
        module.resid_dropout.p = 0.0  # isolate the dropout on the attention weights
    no_dropout = make(attn03, name, dropout=0.0)
    no_dropout.load_state_dict(module.state_dict())
    x = torch.randn(2, 8, C)
    with torch.no_grad():
        module.train()
        y1, y2 = call(module, x), call(module, x)
        assert not torch.allclose(y1, y2)  # a fresh random mask each call
        module.eval()
        assert_close(call(module, x), call(no_dropout.eval(), x))


# -----------------------------------------------------------------------------
# the benchmark's measurements


def test_peak_memory_counts_live_tensors(attn03):
    x = torch.randn(256, 1024)  # 1 MiB
    # (t + t) stays alive while (t + t) * t is allocated: peak = exactly two tensors of x's size
    # (tensor operands only: a Python scalar would add its own 0-dim tensor of a few bytes)
    assert attn03.peak_memory_forward(lambda t: (t + t) * t, x, "cpu") == 2 * x.nbytes
    assert attn03.peak_memory_forward(lambda t: (t + t).sum(), x, "cpu") >= x.nbytes


def test_sdpa_never_materialises_the_score_matrix(attn03):
    T, n_embd, n_head = 512, 32, 4
    _, mha, csa = same_weights(attn03, n_embd, n_head)
    x = torch.randn(1, T, n_embd)
    scores_bytes = n_head * T * T * 4  # one (B, nh, T, T) fp32 matrix
    with torch.inference_mode():
        assert attn03.peak_memory_forward(mha, x, "cpu") >= 2 * scores_bytes
        assert attn03.peak_memory_forward(csa, x, "cpu") < scores_bytes / 4


def test_cli_demo_and_bench_run(attn03, capsys):
    attn03.main([])
    out = capsys.readouterr().out
    assert "6. padding" in out and "right padding" in out
    attn03.main(["--bench", "--device=cpu", "--seq_lens=8,16", "--n_embd=16", "--n_head=4",
                 "--repeat=1"])
    out = capsys.readouterr().out
    assert "max |diff|" in out and "speedup" in out
    assert [line.split()[0] for line in out.splitlines()[-2:]] == ["8", "16"]  # one row per T
    attn03.main(["--bench=false", "--seq_lens=8"])  # =false is the demo again
    assert "6. padding" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bench", "--n_embd=10", "--n_head=3"], "--n_head=3 must divide --n_embd=10"),
        (["--bench", "--n_embd=-12", "--n_head=3"], "both > 0"),  # -12 % 3 == 0
        (["--bench", "--n_embd=0", "--n_head=3"], "both > 0"),
        (["--bench=maybe"], "expected true or false"),
        (["--seq_lens=8,x"], "comma-separated integers"),
        (["--benc"], "unrecognized arguments: --benc"),  # no abbreviations
        (["--repeat=0"], "--repeat: 0 is not positive"),
        (["--seq_lens=8,0"], "--seq_lens: 0 is not positive"),
        (["--n-head=3"], "unrecognized arguments: --n-head=3 (did you mean --n_head?)"),
        (["--bnech"], "unrecognized arguments: --bnech (did you mean --bench?)"),
        (["--zzz"], "unrecognized arguments: --zzz (see --help)"),
    ],
)
def test_cli_errors_are_one_line(attn03, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        attn03.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_cli_ctrl_c_is_one_line_and_exit_130(attn03, capsys, monkeypatch):
    monkeypatch.setattr(attn03, "bench", interrupted)
    assert exit_status(attn03.main, ["--bench"]) == 130
    assert capsys.readouterr().err.strip() == "Ctrl-C: stopped"


def test_cli_help_lists_each_flag_with_its_type_and_default_once(attn03, capsys):
    """--help in the style of 04-10: `--name TYPE  meaning (default: X)`, each default once."""
    with pytest.raises(SystemExit) as exit_info:
        attn03.main(["--help"])
    flat = " ".join(capsys.readouterr().out.split())  # argparse wraps long lines
    assert exit_info.value.code == 0
    assert f"] {attn03.__doc__.splitlines()[0]} options:" in flat  # the description line
    assert "--n_head int attention heads" in flat and "--bench [bool]" in flat
    assert flat.count("(default: ") == 8  # once for each of the eight flags
    assert flat.count("(default: 128,256,512,1024,2048)") == 1  # as one would type it


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_cuda_without_gpu_is_one_line(attn03, capsys):
    with pytest.raises(SystemExit) as exit_info:
        attn03.main(["--bench", "--device=cuda"])
    assert exit_info.value.code == 2 and capsys.readouterr().err.startswith("error: --device=cuda")
