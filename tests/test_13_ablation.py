"""Tests for 13_ablation.py: Muon's update, which parameters it takes, the rows, the table.

The rows train for a few iterations on a small corpus, so the file runs in seconds on a CPU.
"""

from types import SimpleNamespace

import pytest
import torch
from conftest import exit_status, interrupted, load_script

m = load_script("13_ablation")


@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (32, 32)], ids=["wide", "tall", "square"])
def test_orthogonalize_sends_every_singular_value_near_one(shape):
    """U diag(S) V^T with S over two orders of magnitude comes out close to U V^T."""
    torch.manual_seed(0)
    rows, cols = shape
    k = min(shape)
    U, _ = torch.linalg.qr(torch.randn(rows, k))
    V, _ = torch.linalg.qr(torch.randn(cols, k))
    S = torch.logspace(-1, 1, k)
    out = m.orthogonalize(U @ torch.diag(S) @ V.T)
    assert out.shape == shape
    singular_values = torch.linalg.svdvals(out)
    assert singular_values.min() > 0.6 and singular_values.max() < 1.3
    target = U @ V.T  # the nearest orthogonal matrix
    cosine = (out * target).sum() / (out.norm() * target.norm())
    assert cosine > 0.95


def test_muon_steps_along_the_orthogonalized_nesterov_momentum():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(24, 8))  # tall: the update is scaled by sqrt(24 / 8)
    opt = m.Muon([p], lr=0.1, momentum=0.9)
    momentum = torch.zeros_like(p)
    for _ in range(3):
        before = p.detach().clone()
        grad = torch.randn_like(p)
        p.grad = grad.clone()
        opt.step()
        momentum = 0.9 * momentum + 0.1 * grad
        nesterov = 0.1 * grad + 0.9 * momentum
        expected = before - 0.1 * 3**0.5 * m.orthogonalize(nesterov)
        torch.testing.assert_close(p.detach(), expected)


def recipe(**overrides):
    """NANOGPT_CPU_RECIPE as ablate builds it, for 65 characters; overrides win."""
    settings = dict(m.NANOGPT_CPU_RECIPE, vocab_size=65, max_iters=20, lr_decay_iters=20,
                    muon_lr=0.02, seed=1337, device="cpu", dtype="float32")
    return m.SimpleNamespace(**{**settings, **overrides})


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    config = m.ModernConfig.flavour("llama3", n_layer=2, vocab_size=65)
    model = m.ModernGPT(config)
    adamw, muon = m.make_optimizers(model, recipe(), muon=True)
    in_muon = {id(p) for group in muon.param_groups for p in group["params"]}
    in_adamw = {id(p) for group in adamw.param_groups for p in group["params"]}
    for name, p in model.named_parameters():
        hidden_matrix = name.startswith("transformer.h.") and p.dim() == 2
        assert (id(p) in in_muon) == hidden_matrix, name
        assert (id(p) in in_adamw) != hidden_matrix, name
    (everything,) = m.make_optimizers(model, recipe(), muon=False)
    assert sum(len(g["params"]) for g in everything.param_groups) == len(list(model.parameters()))


def test_the_first_row_is_05s_gpt():
    """Its settings build 05's model (with GPT-2's tanh GELU): 05's weights load by name and give
    05's logits."""
    pre05 = load_script("05_pretrain")
    first_row = m.ABLATION[0][1]
    shape = {k: m.NANOGPT_CPU_RECIPE[k] for k in ("block_size", "n_layer", "n_head", "n_embd")}
    gpt2_block = dict(bias=pre05.TrainConfig.bias, gelu="tanh")
    theirs = pre05.GPT(pre05.GPTConfig(vocab_size=65, **shape, **gpt2_block))
    config = m.ModernConfig(vocab_size=65, n_kv_head=shape["n_head"], **shape, **first_row)
    model = m.ModernGPT(config)
    model.load_state_dict(theirs.state_dict())  # strict: the same parameters, the same names
    idx = torch.randint(65, (2, 16))
    torch.testing.assert_close(model(idx)[0], theirs.eval()(idx)[0])


def test_each_row_adds_its_change_and_the_last_is_the_modern_block():
    settings = {}
    for name, change, _ in m.ABLATION:
        before = settings
        settings = {**settings, **change}
        changed = {k for k in settings if settings[k] != before.get(k)}
        assert changed == set(change), name
    config = m.ModernConfig(**{"n_head": 4, "n_kv_head": 4, **settings})
    modern = m.ModernConfig.flavour("qwen3")
    for field in ("norm", "pos", "mlp", "qk_norm", "bias"):
        assert getattr(config, field) == getattr(modern, field), field
    assert config.n_kv_head < config.n_head
    assert [optimizer for *_, optimizer in m.ABLATION][-1] == "muon"


def test_muon_trains_a_row(char_corpus):
    data = {split: m.load_tokens(char_corpus / "tinyshakespeare-char", split)
            for split in ("train", "val")}
    settings = m.ABLATION[-2][1] | dict(norm="rmsnorm", pos="rope", mlp="swiglu")
    short = recipe(max_iters=30, lr_decay_iters=30, warmup_iters=0, eval_iters=2)
    untrained = recipe(max_iters=0, lr_decay_iters=1, eval_iters=2)
    before = m.train_row(settings, "muon", data, untrained)["val_loss"]
    after = m.train_row(settings, "muon", data, short)["val_loss"]
    assert after < before - 0.5


def test_a_row_evaluates_the_val_split_only_and_gets_the_same_val_loss(char_corpus, monkeypatch):
    """The table shows no train loss, so after training a row draws eval_iters val batches and no
    train batch; its val loss is the one an evaluation of both splits gives (the README's table)."""
    data = {split: m.load_tokens(char_corpus / "tinyshakespeare-char", split)
            for split in ("train", "val")}
    drawn, models = [], []
    get_batch, estimate_loss = m.get_batch, m.estimate_loss

    def spy_get_batch(ids, *args, **kwargs):
        drawn.append("train" if ids is data["train"] else "val")
        return get_batch(ids, *args, **kwargs)

    def spy_estimate_loss(model, *args):
        models.append(model)
        return estimate_loss(model, *args)

    monkeypatch.setattr(m, "get_batch", spy_get_batch)
    monkeypatch.setattr(m, "estimate_loss", spy_estimate_loss)
    short = recipe(max_iters=3, lr_decay_iters=3, warmup_iters=0, eval_iters=2)
    row = m.train_row(m.ABLATION[0][1], "adamw", data, short)
    assert drawn == ["train"] * 3 + ["val"] * 2
    assert row["val_loss"] == estimate_loss(models[0], data, short, 3)["val"]


def test_the_first_row_is_not_charged_for_the_process_first_slow_steps(
    char_corpus, capsys, monkeypatch
):
    """A process's first steps are slow (PyTorch's set-up, cold caches); untimed steps take them,
    so the first row's time compares fairly with the rows after it. On a clock that a batch moves
    on by 100 s for the process's first 3 batches and by 1 s after, every row takes 1 s a step."""
    now = [0.0]
    batches = []
    get_batch = m.get_batch

    def slow_at_first(*args, **kwargs):
        batches.append(args)
        now[0] += 100 if len(batches) <= 3 else 1
        return get_batch(*args, **kwargs)

    monkeypatch.setattr(m, "get_batch", slow_at_first)
    monkeypatch.setattr(m, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(m, "ABLATION", m.ABLATION[:2])
    table = m.main(["--max_iters=2", "--eval_iters=1", f"--data_dir={char_corpus}"])
    assert [row["seconds"] for row in table] == [2, 2]  # 2 steps at 1 s


@pytest.mark.parametrize("split, share", [("val", "larger"), ("train", "smaller")])
def test_a_split_shorter_than_a_window_is_one_line_before_any_training(
    tmp_path, shakespeare_text, capsys, monkeypatch, split, share
):
    """02 with a tiny (or a huge) --val_fraction leaves a split shorter than the recipe's window:
    found when the data is loaded, not after a row has trained, and the line names a flag that
    exists (02's --val_fraction), not block_size, which 13 does not have."""
    dl = load_script("02_dataloader")
    text = shakespeare_text[:5000]
    short = 30 / len(text)  # 30 characters: under one window of block_size + 1
    val_fraction = short if split == "val" else 1 - short
    spec = dl.CharTokenizer.from_text(text).to_dict()
    dl.prepare_corpus(text, tmp_path / "tinyshakespeare-char", spec, val_fraction)
    trained = []
    train_row = m.train_row

    def spy_train_row(*args):
        trained.append(args)
        return train_row(*args)

    monkeypatch.setattr(m, "train_row", spy_train_row)
    with pytest.raises(SystemExit) as exit_info:
        m.main([f"--data_dir={tmp_path}", "--max_iters=2", "--eval_iters=1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error:") and err.count("\n") == 1
    assert f"{split}.bin" in err and f"{share} --val_fraction" in err
    assert trained == []


@pytest.mark.parametrize("flags, eval_iters", [
    ([], m.NANOGPT_CPU_RECIPE["eval_iters"]),  # the README's table: 2,000 iterations, 200 batches
    (["--max_iters=20"], 20),  # a short run: no more val batches than training steps
    (["--max_iters=20", "--eval_iters=5"], 5),
    (["--eval_iters=7"], 7),
])  # fmt: skip
def test_eval_iters_is_the_recipes_unless_the_run_is_shorter_or_the_flag_says(
    char_corpus, capsys, monkeypatch, flags, eval_iters
):
    """A quick look (--max_iters=20) evaluates as many val batches as it trains steps, not the
    recipe's 200, which took minutes where training took seconds; --eval_iters chooses."""
    recipes = []

    def train_row(settings, optimizer_name, data, recipe):
        recipes.append(recipe)
        return dict(params=1, val_loss=1.0, seconds=1.0, tokens_per_s=1.0, kv_bytes=1)

    monkeypatch.setattr(m, "train_row", train_row)
    m.main([*flags, f"--data_dir={char_corpus}"])
    assert {r.eval_iters for r in recipes[1:]} == {eval_iters}  # [0]: the untimed warm-up
    assert f"val loss over {eval_iters} batches" in capsys.readouterr().out


def test_the_table_has_a_row_per_change(char_corpus, capsys):
    table = m.main(["--max_iters=2", "--rounds=2", "--eval_iters=1", f"--data_dir={char_corpus}"])
    out = capsys.readouterr().out
    assert [row["name"] for row in table] == [name for name, *_ in m.ABLATION]
    for row in table:
        numbers = [f"{row['params']:,}", f"{row['kv_bytes']:,}", f"{row['val_loss']:.4f}"]
        cells = [row["name"], *numbers]
        assert "| " + " | ".join(cells) + " |" in out
    assert out.count("round 2/2") == len(m.ABLATION)


@pytest.mark.parametrize("flags, says", [
    (["--rounds=0"], "--rounds"),
    (["--max_iters=0"], "--max_iters"),
    (["--eval_iters=-1"], "--eval_iters=-1"),
    (["--muon_lr=0"], "--muon_lr"),
    (["--muon_lr=nan"], "--muon_lr=nan"),  # else the Muon row trains to a nan
    (["--seed=-1"], "--seed=-1"),  # numpy's generators take none below 0
    (["--data_dir=no/such/dir"], "python 02_dataloader.py"),
    (["--max_itres=5"], "did you mean --max_iters"),
])
def test_bad_flags_are_one_line(flags, says, capsys):
    with pytest.raises(SystemExit) as exit_info:
        m.main(flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and says in err and err.count("\n") == 1


def test_a_corpus_that_cannot_be_read_is_one_line(tmp_path, capsys):
    (tmp_path / "tinyshakespeare-char" / "meta.json").mkdir(parents=True)  # a folder, not a file
    with pytest.raises(SystemExit) as exit_info:
        m.main([f"--data_dir={tmp_path}", "--max_iters=2"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error:") and err.count("\n") == 1


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    monkeypatch.setattr(m, "ablate", interrupted)
    assert exit_status(m.main, ["--max_iters=2"]) == 130
    assert capsys.readouterr().err.strip() == "Ctrl-C: stopped"
