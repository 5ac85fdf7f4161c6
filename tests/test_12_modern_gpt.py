"""Tests for 12_modern_gpt.py: logits equal transformers' Llama and Qwen3, GQA's cache, the CLI.

Every model is tiny (2 layers, 64 wide, vocab 100), so the file runs in seconds on a CPU.
"""

import json
import shutil

import pytest
import torch
from conftest import ROOT, exit_status, interrupted, load_script

m = load_script("12_modern_gpt")
transformers = pytest.importorskip("transformers")

VOCAB = 100


def hf_model(arch: str, n_kv_head: int, tied: bool, **extra):
    """A random transformers Llama or Qwen3 of 2 layers, 64 wide; every weight non-trivial."""
    torch.manual_seed(0)
    config = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                  num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=n_kv_head, max_position_embeddings=64,
                  tie_word_embeddings=tied, rms_norm_eps=1e-6, **extra)
    if arch == "qwen3":  # a head_dim that is not hidden / heads, as Qwen3's own
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=32, **config))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    with torch.no_grad():  # norms start at 1: randomise them so a misplaced norm shows
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() == 1 else 0.1)
            if p.dim() == 1:
                p.add_(1.0)
    return model.eval()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_logits_equal_transformers(tmp_path, arch, n_kv_head, tied):
    reference = hf_model(arch, n_kv_head, tied, rope_theta=500.0)
    reference.save_pretrained(tmp_path)
    model = m.load_hf(tmp_path)
    assert not model.training
    assert model.config.qk_norm == (arch == "qwen3")
    assert model.config.tie_embeddings == tied
    idx = torch.randint(VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(idx).logits
        logits, loss = model(idx)
    assert loss is None
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_the_loss_is_the_mean_next_token_cross_entropy():
    model = m.ModernGPT(m.ModernConfig.flavour("qwen3", vocab_size=VOCAB, n_embd=64))
    idx = torch.randint(VOCAB, (2, 8))
    targets = torch.randint(VOCAB, (2, 8))
    targets[0, :3] = -100
    logits, loss = model(idx, targets)
    keep = targets != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("field, value, named", [
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}, "llama3"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "linear"),
    ("architectures", ["MistralForCausalLM"], "MistralForCausalLM"),
    ("attention_bias", True, "attention_bias"),
    ("hidden_act", "gelu", "hidden_act"),
    ("use_sliding_window", True, "use_sliding_window"),
])
def test_an_unimplemented_setting_is_refused_by_name(tmp_path, field, value, named):
    hf_model("llama", 2, True).save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    hf = json.loads(config_file.read_text())
    hf.pop("rope_parameters")
    hf[field] = value
    config_file.write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=named):
        m.load_hf(tmp_path)


def test_old_config_files_give_rope_theta_at_the_top(tmp_path):
    hf_model("llama", 2, True).save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    hf = json.loads(config_file.read_text())
    theta = hf.pop("rope_parameters")["rope_theta"] + 1.0
    hf.update(rope_theta=theta, rope_scaling=None)  # as SmolLM2's and Qwen3's files have it
    config_file.write_text(json.dumps(hf))
    assert m.load_hf(tmp_path).config.rope_theta == theta


@pytest.mark.parametrize("settings, named", [
    (dict(n_head=4, n_kv_head=3), "n_kv_head"),
    (dict(pos="rope", n_head=4, n_kv_head=4, head_size=15), "odd"),
    (dict(n_embd=64, n_head=5, n_kv_head=5), "n_embd=64"),
    (dict(norm="batchnorm"), "norm"),
])
def test_impossible_shapes_are_refused(settings, named):
    with pytest.raises(ValueError, match=named):
        m.ModernConfig(**settings)


def test_swiglu_keeps_the_mlp_parameter_count():
    for C in (64, 768, 4096):
        hidden = m.swiglu_hidden(C, multiple_of=1)
        assert abs(3 * C * hidden - 8 * C * C) <= 3 * C  # 3 C H = 8 C^2, H an integer
    assert m.swiglu_hidden(4096, multiple_of=256) == 11008  # Llama 2 7B's intermediate_size
    gelu = m.ModernGPT(m.ModernConfig(vocab_size=VOCAB, n_embd=96, bias=False))
    swiglu = m.ModernGPT(m.ModernConfig(vocab_size=VOCAB, n_embd=96, bias=False,
                                        mlp="swiglu", multiple_of=1))
    assert swiglu.num_params() == gelu.num_params()


def test_rope_rotates_so_only_the_distance_counts():
    cos, sin = m.rope_angles(torch.arange(20), 16, theta=100.0)
    q = torch.randn(1, 1, 1, 16).expand(1, 1, 20, 16)
    k = torch.randn(1, 1, 1, 16).expand(1, 1, 20, 16)
    q_rot = m.apply_rope(q, cos, sin)[0, 0]  # (20, 16): one q at positions 0..19
    k_rot = m.apply_rope(k, cos, sin)[0, 0]
    torch.testing.assert_close(q_rot[7] @ k_rot[3], q_rot[14] @ k_rot[10])  # distance 4
    torch.testing.assert_close(q_rot.norm(dim=-1), q[0, 0].norm(dim=-1))  # a rotation


@pytest.mark.parametrize("flavour", ["gpt2", "llama3", "qwen3"])
def test_cached_generation_equals_uncached(flavour):
    torch.manual_seed(0)
    config = m.ModernConfig.flavour(flavour, vocab_size=VOCAB, n_layer=2, n_embd=64,
                                    block_size=64)
    model = m.ModernGPT(config).eval()
    with torch.no_grad():  # 04's init makes near ties and repeats: larger weights vary more
        for p in model.parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, 0.5)
    prompt = torch.randint(VOCAB, (2, 5))
    cached = m.generate(model, prompt, 30, use_cache=True)
    uncached = m.generate(model, prompt, 30, use_cache=False)
    assert torch.equal(cached, uncached)
    assert len(set(cached[0, 5:].tolist())) > 3  # not one token repeated


@pytest.mark.parametrize("flavour", ["llama3", "qwen3"])
def test_a_bf16_model_runs_rope_in_bf16(flavour):
    """load_hf(dtype=torch.bfloat16) and model.to(bfloat16): RoPE's fp32 angles must not turn q
    and k into fp32 beside a bf16 v (SDPA refuses mixed dtypes); the logits stay near fp32's."""
    torch.manual_seed(0)
    config = m.ModernConfig.flavour(flavour, vocab_size=VOCAB, n_layer=2, n_embd=64)
    model = m.ModernGPT(config).eval()
    idx = torch.randint(VOCAB, (2, 16))
    with torch.no_grad():
        exact, _ = model(idx)
        logits, _ = model.to(torch.bfloat16)(idx)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), exact, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("flavour", ["gpt2", "qwen3"])
def test_a_prompt_fed_in_chunks_through_the_cache_gives_the_same_logits(flavour):
    config = m.ModernConfig.flavour(flavour, vocab_size=VOCAB, n_layer=2, n_embd=64)
    model = m.ModernGPT(config).eval()
    idx = torch.randint(VOCAB, (2, 12))
    cache = m.GroupedKVCache(config, max_len=12)
    with torch.no_grad():
        whole, _ = model(idx)
        chunks = [model(idx[:, a:b], cache=cache)[0] for a, b in [(0, 5), (5, 6), (6, 12)]]
    torch.testing.assert_close(torch.cat(chunks, dim=1), whole)


def test_the_cache_holds_n_kv_head_heads():
    config = m.ModernConfig.flavour("llama3", vocab_size=VOCAB, n_layer=2, n_embd=64)
    model = m.ModernGPT(config).eval()
    cache = m.GroupedKVCache(config, max_len=12)
    with torch.no_grad():
        model(torch.randint(VOCAB, (1, 12)), cache=cache)
    assert cache.k[0].shape == (1, config.n_kv_head, 12, config.head_size)
    held = sum(t.nbytes for t in cache.k + cache.v)
    assert m.cache_bytes_per_token(config, dtype_bytes=4) * 12 == held
    assert config.n_kv_head < config.n_head


def test_the_cli_prints_each_flavours_sizes(capsys):
    m.main([])
    out = capsys.readouterr().out
    for name in m.ModernConfig.FLAVOURS:
        assert name in out
    assert "bytes/token" in out


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    monkeypatch.setattr(m, "print_flavours", interrupted)
    assert exit_status(m.main, []) == 130
    assert capsys.readouterr().err.strip() == "Ctrl-C: stopped"


def word_tokenizer(folder):
    """A tokenizer.json of VOCAB whole words w0..w99, split at spaces."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
    tok.save(str(folder / "tokenizer.json"))


def test_the_cli_loads_a_folder_and_continues_the_prompt(tmp_path, capsys):
    reference = hf_model("qwen3", 2, True)
    reference.save_pretrained(tmp_path)
    word_tokenizer(tmp_path)
    text = m.main([f"--hf_dir={tmp_path}", "--prompt=w5 w6 w7", "--max_new_tokens=6"])
    ids = [int(word[1:]) for word in text.split()]
    expected = reference.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=6,
                                  do_sample=False, eos_token_id=None)
    assert ids == expected[0].tolist()
    assert "kv heads" in capsys.readouterr().out


def test_a_relative_hf_dir_starts_in_the_project_folder(tmp_path, monkeypatch):
    folder = ROOT / "out" / "test_12_relative"
    try:
        hf_model("llama", 2, True).save_pretrained(folder)
        monkeypatch.chdir(tmp_path)
        model = m.load_hf("out/test_12_relative")
        assert model.config.n_kv_head == 2
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_10s_gpt2_export_is_refused_as_another_architecture(tmp_path, capsys):
    """10's --export_hf folder is a Hugging Face folder of a GPT-2, with no tokenizer.json: the
    line names its architecture and the two 12 reads, not "give a Hugging Face model folder"."""
    serve10 = load_script("10_serve")
    chars = "abcdefgh \n"
    gpt = serve10.GPT(serve10.GPTConfig(block_size=16, vocab_size=len(chars), n_layer=1,
                                        n_head=2, n_embd=16))
    serve10.export_hf(gpt, {"kind": "char", "chars": chars}, tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        m.main([f"--hf_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error:") and err.count("\n") == 1
    assert "GPT2LMHeadModel" in err and "Llama and Qwen3 only" in err


@pytest.mark.parametrize("flags, says", [
    (["--hf_dir=no/such/folder"], "config.json"),
    (["--max_new_tokens=0"], "max_new_tokens"),
    (["--temperature=-1"], "temperature"),
    (["--temperature=nan"], "temperature"),  # nan fails every comparison
    (["--prompt="], "prompt"),
])
def test_bad_flags_are_one_line(flags, says, capsys):
    with pytest.raises(SystemExit) as exit_info:
        m.main(flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and says in err and err.count("\n") == 1


def drop_a_shard(folder):
    """An interrupted download: one shard the index names is not there."""
    shards = sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())
                        ["weight_map"].values()))
    (folder / shards[1]).unlink()
    return shards[1]


def edit_config(**changes):
    """A config.json of another model than the weights (None: the field removed)."""
    def edit(folder):
        hf = json.loads((folder / "config.json").read_text())
        hf.update(changes)
        kept = {key: value for key, value in hf.items() if value is not None}
        (folder / "config.json").write_text(json.dumps(kept))
        return "config.json"
    return edit


def cut_in_half(name):
    """A download cut short: the file's first half only."""
    def cut(folder):
        text = (folder / name).read_text()
        (folder / name).write_text(text[: len(text) // 2])
        return name
    return cut


@pytest.mark.parametrize("break_folder, says", [
    (drop_a_shard, "download the model's weights"),
    (edit_config(intermediate_size=128), "download the model again"),  # shapes
    (edit_config(num_hidden_layers=3), "download the model again"),  # a layer missing
    (edit_config(intermediate_size=None), "intermediate_size"),
    (cut_in_half("config.json"), "download it again"),
    (cut_in_half("tokenizer.json"), "download it again"),
], ids=["shard", "shape", "tensor", "field", "config", "tokenizer"])
def test_a_broken_folder_is_one_line_naming_the_file_and_the_fix(tmp_path, capsys,
                                                                break_folder, says):
    """A folder whose download was cut short, or whose config.json is another model's, fails with
    one `error:` line that names the file (or the field) and the fix, not a traceback."""
    hf_model("llama", 2, False).save_pretrained(tmp_path, max_shard_size="100KB")
    word_tokenizer(tmp_path)
    named = break_folder(tmp_path)
    capsys.readouterr()  # transformers' progress bar
    assert exit_status(m.main, [f"--hf_dir={tmp_path}", "--max_new_tokens=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1
    assert named in err and says in err


def test_a_prompt_longer_than_the_context_asks_to_shorten_it():
    """Fewer new tokens cannot help a prompt that fills block_size alone: the error says to
    shorten the prompt; a prompt that leaves room is told how many new tokens fit."""
    config = m.ModernConfig.flavour("llama3", vocab_size=VOCAB, n_layer=1, n_embd=64,
                                    block_size=16)
    model = m.ModernGPT(config).eval()
    with pytest.raises(ValueError, match="shorten the prompt") as too_long:
        m.generate(model, torch.zeros(1, 20, dtype=torch.long), 1)
    assert "new tokens" not in str(too_long.value)
    with pytest.raises(ValueError, match=f"at most {16 - 10} new tokens"):
        m.generate(model, torch.zeros(1, 10, dtype=torch.long), 10)
