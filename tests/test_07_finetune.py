"""Tests for 07_finetune.py: template, split, collate masks, LoRA, the loop, the test split it
writes, OpenAI's weights (offline), and the user errors that stop a run before any model loads.

Every expected value is written out by hand (masks, template, LoRA's update) or comes from a
reference computation (per-token cross-entropy, the unmerged model).
"""

import copy
import json
import os
import re
import signal
import types
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import exit_status, interrupted
from torch.testing import assert_close

P = -100  # the ignore index, short for the hand-written target tables

ENTRY = {
    "instruction": "Name the author of 'Pride and Prejudice'.",
    "input": "",
    "output": "Jane Austen.",
}


def tiny_gpt(ft07, vocab_size=64, block_size=32, n_embd=16, n_layer=2):
    config = ft07.GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer,
                            n_head=2, n_embd=n_embd)
    return ft07.GPT(config)


def grads(model, x, y) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(x, y)[1].backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


# -----------------------------------------------------------------------------
# data and template


def test_format_input_is_the_alpaca_template(ft07):
    expected = (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName the author of 'Pride and Prejudice'."
    )
    assert ft07.format_input(ENTRY) == expected
    with_input = {"instruction": "Rewrite the sentence.", "input": "The car is fast.", "output": ""}
    assert ft07.format_input(with_input) == (
        expected.split("\n\n")[0]
        + "\n\n### Instruction:\nRewrite the sentence.\n\n### Input:\nThe car is fast."
    )
    assert ft07.RESPONSE_HEADER == "\n\n### Response:\n"


def test_split_is_the_books_85_10_5_in_file_order(ft07, instruction_data_path):
    data = ft07.load_instruction_data()  # through 02's fetch: the sha256-checked file in data/
    assert data == json.loads(instruction_data_path.read_text(encoding="utf-8"))
    splits = ft07.split_data(data)
    assert [len(splits[k]) for k in ("train", "test", "val")] == [935, 110, 55]
    assert splits["train"] + splits["test"] + splits["val"] == data


def test_bad_data_gets_a_clear_error(ft07, tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([ENTRY, {"instruction": "no output"}]))
    with pytest.raises(ValueError, match="entry 1"):
        ft07.load_instruction_data(path)
    with pytest.raises(ValueError, match="too few"):
        ft07.split_data([ENTRY] * 5)
    path.write_text("[" * 100_000)  # deeper than Python's recursion limit: no traceback
    with pytest.raises(ValueError, match="is not a JSON file"):
        ft07.load_instruction_data(path)
    path.write_text('[{"instruction": "\\ud800", "output": "a"}]')  # a lone surrogate: no text
    with pytest.raises(ValueError, match="is not a JSON file"):  # now, not after the training
        ft07.load_instruction_data(path)
    for bad_input in (5, ["x", "y"]):  # not pasted into the prompt as "5" or "['x', 'y']"
        path.write_text(json.dumps([ENTRY, {**ENTRY, "input": bad_input}]))
        with pytest.raises(ValueError, match="entry 1"):
            ft07.load_instruction_data(path)


def test_a_data_file_with_a_byte_order_mark_loads(ft07, tmp_path):
    """Windows editors save JSON with a UTF-8 BOM; 07 reads it as 09 does, the mark dropped."""
    path = tmp_path / "data.json"
    path.write_text(json.dumps([ENTRY]), encoding="utf-8-sig")
    assert ft07.load_instruction_data(path) == [ENTRY]


def test_char_tokenizer_replaces_or_names_unknown_characters(ft07):
    tok = ft07.CharTokenizer("\n ?abc")
    encode, unknown = ft07.text_encoder(tok, "?")
    assert encode("a#b") == tok.encode("a?b")
    assert unknown == {"#": 1}
    strict, _ = ft07.text_encoder(tok, "")
    with pytest.raises(ValueError, match="#"):
        strict("a#b")
    assert ft07.end_token_id(tok) == tok.encode("\n")[0]


def test_examples_drop_those_whose_prompt_fills_the_context(ft07):
    # one id per character: lengths are len()
    encode = lambda text: list(range(len(text)))  # noqa: E731
    short = {"instruction": "a", "input": "", "output": "b"}
    long = {"instruction": "a", "input": "", "output": "b" * 50}
    huge = {"instruction": "a" * 200, "input": "", "output": "b"}
    prompt = len(ft07.format_input(short))  # the instruction has 1 character
    full = prompt + len(ft07.RESPONSE_HEADER) + 1
    examples = ft07.tokenize_examples([short, long, huge], encode, max_length=full)
    assert [len(ids) for ids, _ in examples] == [full, full + 49]  # huge dropped, long kept whole
    assert [p for _, p in examples] == [prompt, prompt]


def test_prepare_data_says_what_it_cuts_and_drops(ft07, tmp_path, capsys):
    short = {"instruction": "a", "input": "", "output": "b"}
    entries = [{**short, "output": "b" * 50}, {**short, "instruction": "a" * 200}] + [short] * 18
    (tmp_path / "data.json").write_text(json.dumps(entries))
    chars = "".join(sorted(set(ft07.format_input(entries[1]) + ft07.RESPONSE_HEADER + "b?\n")))
    full = len(ft07.format_input(short) + ft07.RESPONSE_HEADER) + 1  # a short example fits exactly
    model = tiny_gpt(ft07, vocab_size=len(chars), block_size=full)
    data_path = str(tmp_path / "data.json")
    cfg = types.SimpleNamespace(unknown_char="?", data_path=data_path, batch_size=4)
    data = ft07.prepare_data(cfg, model, {"kind": "char", "chars": chars})
    out = capsys.readouterr().out
    assert f"1 training examples cut at the context ({full} tokens), 1 dropped" in out
    sizes = (len(data["train"]), len(data["val"]), len(data["test"]))
    assert sizes == (17 - 1, 1, 2)  # 85/10/5 of 20


# -----------------------------------------------------------------------------
# collate: masks worked out by hand


@pytest.mark.parametrize("mask_prompt", [True, False])
def test_collate_masks_exactly_the_prompt_and_the_padding(ft07, mask_prompt):
    # (ids, prompt length); pad/end token 99
    batch = [([1, 2, 3, 4, 5], 3), ([6, 7], 1), ([8, 9, 10], 2)]
    x, y = ft07.collate_fn(batch, pad_token_id=99, mask_prompt=mask_prompt)
    assert x.tolist() == [[1, 2, 3, 4, 5], [6, 7, 99, 99, 99], [8, 9, 10, 99, 99]]
    if mask_prompt:  # targets inside the prompt masked; the first 99 (end of text) is a target
        expected = [[P, P, 4, 5, 99], [7, 99, P, P, P], [P, 10, 99, P, P]]
    else:
        expected = [[2, 3, 4, 5, 99], [7, 99, P, P, P], [9, 10, 99, P, P]]
    assert y.tolist() == expected
    x3, y3 = ft07.collate_fn(batch, pad_token_id=99, allowed_max_length=3, mask_prompt=mask_prompt)
    assert x3.tolist() == [row[:3] for row in x.tolist()]
    assert y3.tolist() == [row[:3] for row in expected]


def test_loss_is_the_mean_over_response_tokens(ft07):
    model = tiny_gpt(ft07)
    batch = [([1, 2, 3, 4, 5, 6], 3), ([7, 8, 9], 2)]
    x, y = ft07.collate_fn(batch, pad_token_id=0)
    logits, loss = model(x, y)
    logp = logits.log_softmax(-1)
    # reference: position i predicts token i+1; count positions prompt-1 .. len-1 (the last
    # predicts the end)
    terms = [-logp[r, i, (ids + [0])[i + 1]]
             for r, (ids, p) in enumerate(batch) for i in range(p - 1, len(ids))]
    assert len(terms) == 4 + 2
    assert_close(loss, torch.stack(terms).mean())


def test_masked_padding_has_no_effect_on_gradients(ft07):
    model = tiny_gpt(ft07)
    batch = [([1, 2, 3, 4, 5, 6, 7, 8], 4), ([9, 10, 11], 2)]
    x, y = ft07.collate_fn(batch, pad_token_id=0)
    reference = grads(model, x, y)
    x2 = x.clone()
    # other tokens where row 1 is padding (targets masked)
    x2[1, 3:] = torch.tensor([40, 41, 42, 43, 44])
    for name, g in grads(model, x2, y).items():
        assert_close(g, reference[name], rtol=0, atol=1e-7, msg=name)
    # and the check can fail: changing a target that counts (row 1's end token) changes the
    # gradients
    y2 = y.clone()
    y2[1, 2] = 5
    changed = grads(model, x, y2)
    assert any(not torch.allclose(changed[n], reference[n]) for n in reference)


# -----------------------------------------------------------------------------
# LoRA


def test_lora_linear_computes_w_plus_scaled_ba(ft07):
    base = nn.Linear(2, 2, bias=False)
    base.weight.data = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    lora = ft07.LoRALinear(base, rank=1, alpha=2.0)  # scaling alpha / rank = 2
    lora.lora_A.data = torch.tensor([[1.0, 0.0]])  # (r, in)
    lora.lora_B.data = torch.tensor([[1.0], [0.0]])  # (out, r)
    # W + 2 * B A = [[1 + 2, 2], [3, 4]]; x = [1, 1] -> [5, 7]
    assert lora(torch.tensor([[1.0, 1.0]])).tolist() == [[5.0, 7.0]]


def test_lora_at_init_equals_the_base_model_exactly(ft07):
    base = tiny_gpt(ft07)
    model = ft07.apply_lora(copy.deepcopy(base), rank=4, alpha=8)
    idx = torch.randint(64, (2, 16))
    assert torch.equal(model(idx)[0], base(idx)[0])


def test_lora_trains_only_the_adapters(ft07):
    model = ft07.apply_lora(tiny_gpt(ft07), rank=4, alpha=8)
    C, L, r = 16, 2, 4
    # r * (in + out) for c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
    per_layer = r * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C))
    params = list(model.parameters())  # a tied tensor appears once
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    assert trainable == L * per_layer
    assert total == tiny_gpt(ft07).num_params() + L * per_layer
    idx = torch.randint(64, (2, 16))
    g = grads(model, idx, idx)
    names = {n for n, _ in model.named_parameters()}
    assert set(g) == {n for n in names if ".lora_" in n}  # only adapters receive a gradient
    assert all(g[n].abs().sum() > 0 for n in g if n.endswith("lora_B"))  # (A's is 0 while B = 0)


def test_the_optimizer_holds_the_adapters_only_and_decays_matrices_only(ft07):
    """07 builds its AdamW with 05's configure_optimizers: with LoRA only the adapters (both
    2-D, so all decayed); fully finetuned, every weight, and no decay on biases and gains."""
    model = ft07.apply_lora(tiny_gpt(ft07), rank=4, alpha=8)
    optimizer = ft07.configure_optimizers(model, 0.1, 1e-3, (0.9, 0.999), "cpu")
    decayed, not_decayed = optimizer.param_groups
    adapters = [p for name, p in model.named_parameters() if ".lora_" in name]
    assert {id(p) for p in decayed["params"]} == {id(p) for p in adapters}
    assert decayed["weight_decay"] == 0.1 and not_decayed["params"] == []
    full = tiny_gpt(ft07)
    optimizer = ft07.configure_optimizers(full, 0.1, 1e-3, (0.9, 0.999), "cpu")
    decayed, not_decayed = optimizer.param_groups
    assert len(decayed["params"]) + len(not_decayed["params"]) == len(list(full.parameters()))
    assert all(p.dim() == 1 for p in not_decayed["params"]) and not_decayed["weight_decay"] == 0.0


@pytest.mark.parametrize("targets", [("c_attn",), ("c_attn", "c_proj", "c_fc")])
def test_merged_lora_gives_the_same_logits(ft07, targets):
    base = tiny_gpt(ft07)
    model = ft07.apply_lora(copy.deepcopy(base), rank=4, alpha=8, targets=targets)
    for m in model.modules():
        if isinstance(m, ft07.LoRALinear):
            nn.init.normal_(m.lora_B, std=0.1)  # a non-zero update, as after training
    idx = torch.randint(64, (2, 16))
    with torch.no_grad():
        logits = model(idx)[0]
        merged = ft07.merge_lora(model)
        assert not any(isinstance(m, ft07.LoRALinear) for m in merged.modules())
        assert merged.state_dict().keys() == base.state_dict().keys()  # a plain GPT again
        assert_close(merged(idx)[0], logits, rtol=0, atol=1e-5)
        assert not torch.allclose(merged(idx)[0], base(idx)[0], atol=1e-3)  # the update is in there


def test_extend_context_interpolates_the_position_table(ft07):
    model = tiny_gpt(ft07, block_size=4)
    longer = ft07.extend_context(model, 7)
    old, new = model.transformer.wpe.weight, longer.transformer.wpe.weight
    assert new.shape == (7, 16) and longer.config.block_size == 7
    # new position p reads old position p * (4 - 1) / (7 - 1) = p / 2: even p an old row, odd p a
    # midpoint
    assert_close(new[::2], old)
    assert_close(new[1::2], (old[:-1] + old[1:]) / 2)
    c_attn = model.transformer.h[0].attn.c_attn.weight
    assert_close(longer.transformer.h[0].attn.c_attn.weight, c_attn)
    assert longer(torch.randint(64, (1, 7)))[0].shape == (1, 7, 64)


# -----------------------------------------------------------------------------
# the whole loop


@pytest.fixture(scope="module")
def char_setup(ft07, instruction_data_path, tmp_path_factory):
    """40 short entries and a tiny char-level "05 checkpoint" whose context fits them."""
    data = json.loads(instruction_data_path.read_text(encoding="utf-8"))
    text = lambda e: ft07.format_input(e) + ft07.RESPONSE_HEADER + e["output"]  # noqa: E731
    entries = [e for e in data if len(text(e)) < 220][:40]
    chars = "".join(sorted(set("".join(map(text, entries)) + "\n")))
    tmp = tmp_path_factory.mktemp("ft07")
    (tmp / "data.json").write_text(json.dumps(entries))
    torch.manual_seed(0)
    model = tiny_gpt(ft07, vocab_size=len(chars), block_size=224, n_embd=32)
    # a little pretraining on the plain text (no template), so that LoRA has a base worth adapting:
    # with random frozen embeddings (std 0.02) the logits cannot move far, whatever the adapters do
    plain_text = "\n".join(e["instruction"] + " " + e["output"] for e in entries)
    ids = torch.tensor(ft07.CharTokenizer(chars).encode(plain_text))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        starts = torch.randint(len(ids) - 65, (8,)).tolist()
        x = torch.stack([ids[i : i + 64] for i in starts])  # (8, 64)
        y = torch.stack([ids[i + 1 : i + 65] for i in starts])
        model(x, y)[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    ckpt = {"model": model.state_dict(), "model_args": ft07.asdict(model.config), "optimizer": None,
            "config": {}, "iter_num": 0, "best_val_loss": float("inf"), "rng": None,
            "tokenizer": {"kind": "char", "chars": chars}, "stage": "pretrain"}
    ft07.save_checkpoint(tmp / "base" / "ckpt.pt", ckpt)
    return tmp, entries


@pytest.mark.slow
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_finetune_loss_falls_and_the_checkpoint_loads(ft07, char_setup, lora_rank, capsys,
                                                      monkeypatch):
    tmp, entries = char_setup
    out_dir = tmp / f"out{lora_rank}"
    result = ft07.main([
        f"--ckpt={tmp / 'base' / 'ckpt.pt'}", f"--data_path={tmp / 'data.json'}",
        f"--out_dir={out_dir}", f"--lora_rank={lora_rank}", "--max_iters=30", "--batch_size=4",
        f"--learning_rate={1e-2 if lora_rank else 3e-3}",
        "--min_block_size=0", "--eval_interval=15", "--device=cpu",
        "--dtype=float32",
    ])  # fmt: skip
    assert len(result["train_losses"]) == 30
    assert result["after"]["loss"] < result["before"]["loss"]
    out = capsys.readouterr().out
    test_path = out_dir / "test.json"  # the test split, and how 09 answers it
    assert f"--ckpt={out_dir / 'ckpt.pt'} --answers={test_path} --temperature=0" in out
    # r * (in + out) per adapted Linear, n_embd 32, 2 layers: 2 * 4 * (128 + 64 + 160 + 160) = 4,096
    assert ("parameters: 4,096 trainable of" if lora_rank else "(100.00%)") in out

    # the checkpoint: 05's format, a plain (merged) GPT that reproduces the final validation loss
    model, tokenizer, ckpt = ft07.load_checkpoint(out_dir / "ckpt.pt")
    assert ckpt["stage"] == "finetune" and ckpt["iter_num"] == 30
    assert ckpt["val_loss"] == pytest.approx(result["after"]["loss"], abs=1e-6)
    assert ckpt["model"].keys() == tiny_gpt(ft07).state_dict().keys()
    encode, _ = ft07.text_encoder(tokenizer)
    end_id = ft07.end_token_id(tokenizer)
    splits = ft07.split_data(entries)
    val = ft07.tokenize_examples(splits["val"], encode, model.config.block_size)
    val_loss = ft07.evaluate_loss(model, val, 4, end_id)["loss"]
    assert val_loss == pytest.approx(result["after"]["loss"], abs=1e-5)

    # the training loss fell: the response loss on the whole training split, base model vs finetuned
    base, _, _ = ft07.load_checkpoint(tmp / "base" / "ckpt.pt")
    train = ft07.tokenize_examples(splits["train"], encode, model.config.block_size)
    before, after = (ft07.evaluate_loss(m, train, 8, end_id)["loss"] for m in (base, model))
    assert after < (0.95 if lora_rank else 0.9) * before  # measured: 0.86 and 0.75

    assert json.loads(test_path.read_text(encoding="utf-8")) == splits["test"]


def finetune_args(tmp, out_dir, *flags) -> list[str]:
    """07's flags for a short CPU run on char_setup's model and entries, into out_dir."""
    return [f"--ckpt={tmp / 'base' / 'ckpt.pt'}", f"--data_path={tmp / 'data.json'}",
            f"--out_dir={out_dir}", "--batch_size=4", "--min_block_size=0", "--device=cpu",
            "--dtype=float32", *flags]


@pytest.mark.parametrize("mask_prompt", [True, False])
def test_the_first_step_learns_from_the_answer_tokens_only(ft07, char_setup, tmp_path,
                                                             mask_prompt):
    """Step 1's loss is the loaded model's cross-entropy on batch 0, worked out here per example
    without padding: the mean over the answer's targets (and the end token), and with
    --mask_prompt=false over the prompt's too. The two differ, so each run tells them apart."""
    tmp, entries = char_setup
    flags = ["--max_iters=1", f"--mask_prompt={mask_prompt}"]
    result = ft07.main(finetune_args(tmp, tmp_path, *flags))
    model, tokenizer, _ = ft07.load_checkpoint(tmp / "base" / "ckpt.pt")
    end_id = ft07.end_token_id(tokenizer)
    train = ft07.split_data(entries)["train"]  # every example fits the context: none dropped
    seed = ft07.FinetuneConfig.seed
    batch = [train[i] for i in ft07.batch_indices(0, len(train), 4, seed)]

    def mean_loss(answer_only: bool) -> float:
        terms = []
        for entry in batch:
            prompt = tokenizer.encode(ft07.format_input(entry))
            answer = tokenizer.encode(ft07.RESPONSE_HEADER + entry["output"])
            ids = prompt + answer + [end_id]
            with torch.no_grad():
                logp = model(torch.tensor([ids[:-1]]))[0][0].log_softmax(-1)  # (T, V)
            first = len(prompt) - 1 if answer_only else 0  # position first predicts ids[first + 1]
            terms += [-logp[i, ids[i + 1]] for i in range(first, len(ids) - 1)]
        return torch.stack(terms).mean().item()

    expected = mean_loss(answer_only=mask_prompt)
    assert result["train_losses"][0] == pytest.approx(expected, rel=1e-5)
    assert abs(mean_loss(answer_only=not mask_prompt) - expected) > 0.01


@pytest.mark.slow
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_ctrl_c_saves_and_the_resumed_run_ends_as_an_uninterrupted_one(
    ft07, char_setup, tmp_path, monkeypatch, capsys, lora_rank
):
    """A real SIGINT while step 2 runs: that step ends, ckpt.pt is saved at step 2, the command to
    go on is printed, the exit status is 130. Resumed, the run ends with the weights (bit for
    bit) of a run never stopped: the model with its adapters, Adam's moments and the batch order
    all go on where they were."""
    tmp, _ = char_setup
    flags = [f"--lora_rank={lora_rank}", "--max_iters=5", "--eval_interval=3",
             "--learning_rate=1e-2"]
    ft07.main(finetune_args(tmp, tmp_path / "whole", *flags))
    original_batch_indices = ft07.batch_indices

    def batch_indices(step, *args):
        if step == 1:  # the second step's batch: Ctrl-C while it runs
            os.kill(os.getpid(), signal.SIGINT)
        return original_batch_indices(step, *args)

    monkeypatch.setattr(ft07, "batch_indices", batch_indices)
    out_dir = tmp_path / "stopped"
    with pytest.raises(SystemExit) as exit_info:
        ft07.main(finetune_args(tmp, out_dir, *flags))
    assert exit_info.value.code == 130
    out = capsys.readouterr().out
    hint = f"continue: python 07_finetune.py --init_from=resume --out_dir={out_dir}"
    assert f"at step 2 of 5; {hint}" in out
    assert ft07.load_checkpoint(out_dir / "ckpt.pt")[2]["iter_num"] == 2
    assert not (out_dir / "test.json").exists()  # written at the end
    auto = [f"--ckpt={tmp / 'base' / 'ckpt.pt'}", "--init_from=auto"]  # resume if there is a run
    for folder, start in [(out_dir, "resume"), (tmp_path / "new", "scratch")]:
        cfg = ft07.parse_config(ft07.FinetuneConfig, [*auto, f"--out_dir={folder}"])
        assert cfg.init_from == start
    monkeypatch.setattr(ft07, "batch_indices", original_batch_indices)
    result = ft07.main(["--init_from=resume", f"--out_dir={out_dir}"])  # the run's own settings
    assert len(result["train_losses"]) == 3 and result["iter_num"] == 5
    whole = ft07.load_checkpoint(tmp_path / "whole" / "ckpt.pt")[2]
    resumed = ft07.load_checkpoint(out_dir / "ckpt.pt")[2]
    assert whole["model"].keys() == resumed["model"].keys()
    for name, tensor in whole["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name


def test_a_second_ctrl_c_quits_at_once(ft07):
    before = signal.getsignal(signal.SIGINT)
    with ft07.CtrlC() as ctrl_c:
        os.kill(os.getpid(), signal.SIGINT)  # the first: noted, the step goes on
        assert ctrl_c.pressed
        with pytest.raises(SystemExit) as stop:  # at once, with a shell's code and no traceback
            os.kill(os.getpid(), signal.SIGINT)
    assert stop.value.code == 130
    assert signal.getsignal(signal.SIGINT) is before  # put back


def test_ctrl_c_before_the_loop_is_one_line_and_exit_130(ft07, char_setup, tmp_path,
                                                        monkeypatch, capsys):
    """Loading the model and preparing the data come before the loop's CtrlC."""
    tmp, _ = char_setup

    monkeypatch.setattr(ft07, "load_model", interrupted)
    assert exit_status(ft07.main, finetune_args(tmp, tmp_path, "--max_iters=1")) == 130
    assert capsys.readouterr().err.strip() == "Ctrl-C: stopped"


def test_a_resume_takes_the_learning_rate_given_now(ft07, char_setup, tmp_path):
    """Adam's moments come from the checkpoint, the lr (constant here, the book's) from today's
    flags: load_state_dict alone would keep the saved one."""
    tmp, _ = char_setup
    ft07.main(finetune_args(tmp, tmp_path, "--max_iters=1", "--weight_decay=0.1"))
    ft07.main(["--init_from=resume", f"--out_dir={tmp_path}", "--max_iters=2",
               "--learning_rate=1e-3", "--weight_decay=0.0"])  # fmt: skip
    groups = torch.load(tmp_path / "ckpt.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-3, 0.0), (1e-3, 0.0)]


def test_a_resume_with_other_lora_flags_names_the_saved_ones(ft07, char_setup, tmp_path, capsys):
    """The adapters and the stretched positions are the run's: others would fit neither its
    weights nor Adam's moments."""
    tmp, _ = char_setup
    lora = ["--lora_rank=4", "--lora_alpha=8.0", "--lora_targets=c_attn,c_fc"]
    ft07.main(finetune_args(tmp, tmp_path, *lora, "--max_iters=1"))
    capsys.readouterr()
    before = (tmp_path / "ckpt.pt").read_bytes()
    saved = " ".join([*lora, "--min_block_size=0"])
    changed_flags = ["--lora_rank=2", "--lora_rank=0", "--lora_alpha=16", "--lora_targets=c_attn",
                     "--min_block_size=256"]
    for changed in changed_flags:
        err = run_main(ft07, capsys, ["--init_from=resume", f"--out_dir={tmp_path}", changed])
        assert f"{tmp_path / 'ckpt.pt'} was trained with {saved}" in err, err
    assert (tmp_path / "ckpt.pt").read_bytes() == before


def test_relative_paths_start_at_the_project_folder(ft07, char_setup, tmp_path, monkeypatch):
    """Run from another folder: a relative --ckpt, --data_path and --out_dir resolve against the
    folder the script lives in (PROJECT; here a stand-in), never the current folder."""
    tmp, _ = char_setup
    assert ft07.PROJECT == Path(ft07.__file__).resolve().parent
    project = tmp_path / "project"
    (project / "base").mkdir(parents=True)
    (project / "base" / "ckpt.pt").write_bytes((tmp / "base" / "ckpt.pt").read_bytes())
    (project / "data.json").write_bytes((tmp / "data.json").read_bytes())
    monkeypatch.setattr(ft07, "PROJECT", project)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ft07.main(["--ckpt=base/ckpt.pt", "--data_path=data.json", "--out_dir=out/ft", "--max_iters=1",
               "--batch_size=4", "--min_block_size=0", "--device=cpu"])
    assert (project / "out" / "ft" / "ckpt.pt").exists()
    assert list(elsewhere.iterdir()) == []


@pytest.mark.slow
def test_finetune_from_openai_weights(ft07, char_setup, tmp_path, monkeypatch, capsys):
    """--init_from=gpt2, the book's path, offline: a tiny "gpt2" stands where 04's --save_ckpt
    writes OpenAI's weights (data/gpt2/ckpt.pt); without it, the error names that 04 command."""
    tmp, _ = char_setup
    monkeypatch.setattr(ft07, "DATA_DIR", tmp_path)
    args = ["--init_from=gpt2", f"--data_path={tmp / 'data.json'}", f"--out_dir={tmp_path / 'out'}"]
    with pytest.raises(SystemExit) as exit_info:
        ft07.main(args)
    assert exit_info.value.code == 2
    assert "python 04_gpt.py --init_from=gpt2 --save_ckpt" in capsys.readouterr().err
    torch.manual_seed(0)
    # GPT-2's vocabulary and context
    reference = ft07.GPT(ft07.GPTConfig(n_layer=2, n_head=2, n_embd=32))
    ckpt = {
        "model": reference.state_dict(),
        "iter_num": 0,
        "model_args": asdict(reference.config),
        "tokenizer": {"kind": "gpt2"},
    }
    ft07.save_checkpoint(tmp_path / "gpt2" / "ckpt.pt", ckpt)
    out_dir = tmp_path / "out"
    result = ft07.main([
        "--init_from=gpt2", f"--data_path={tmp / 'data.json'}", f"--out_dir={out_dir}",
        "--max_iters=4", "--batch_size=4", "--learning_rate=1e-3",
        "--device=cpu", "--dtype=float32",
    ])  # fmt: skip
    assert result["after"]["loss"] < result["before"]["loss"]
    model, tokenizer, ckpt = ft07.load_checkpoint(out_dir / "ckpt.pt")
    assert ckpt["tokenizer"] == {"kind": "gpt2"} and ft07.end_token_id(tokenizer) == 50256
    assert model.config.block_size == 1024 and model.config.vocab_size == 50257


def test_a_lora_checkpoint_loads_in_09_as_the_merged_model(ft07, gen09, tmp_path):
    model = ft07.apply_lora(tiny_gpt(ft07), rank=4, alpha=8)
    for m in model.modules():
        if isinstance(m, ft07.LoRALinear):
            nn.init.normal_(m.lora_B, std=0.1)
    spec = {"kind": "char", "chars": "".join(chr(65 + i) for i in range(64))}
    (tmp_path / "base.pt").touch()  # --ckpt must exist
    cfg = ft07.FinetuneConfig(ckpt=str(tmp_path / "base.pt"), out_dir=str(tmp_path), lora_rank=4,
                              lora_alpha=8)
    optimizer = ft07.configure_optimizers(model, 0.1, 1e-3, (0.9, 0.999), "cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    ft07.FinetuneRun(cfg, model, optimizer, scaler, spec).save(7, 1.6)
    loaded, tokenizer, ckpt = gen09.load_checkpoint(tmp_path / "ckpt.pt")
    saved = (ckpt["stage"], ckpt["iter_num"], ckpt["val_loss"], tokenizer.n_vocab)
    assert saved == ("finetune", 7, 1.6, 64)
    idx = torch.randint(64, (2, 16))
    with torch.no_grad():
        # the adapters are in the weights
        assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=1e-5)
    assert any(isinstance(m, ft07.LoRALinear) for m in model.modules())  # saving merged a copy


# -----------------------------------------------------------------------------
# user errors: one `error:` line, exit status 2, before any model loads; no run overwritten


def run_main(ft07, capsys, argv) -> str:
    """main(argv) must stop with exit status 2 and one line `error: ...` on stderr; returns it."""
    with pytest.raises(SystemExit) as e:
        ft07.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture
def no_model(ft07, monkeypatch):
    """Fail the test if a model gets loaded: the check must come first."""
    fail = lambda *args: pytest.fail("a model was loaded before the check")  # noqa: E731
    monkeypatch.setattr(ft07, "load_model", fail)


def test_missing_checkpoint_says_what_to_do(ft07, tmp_path, capsys, no_model):
    missing = tmp_path / "nothing.pt"
    argv = [f"--ckpt={missing}", f"--out_dir={tmp_path / 'out'}", "--device=cpu"]
    err = run_main(ft07, capsys, argv)
    assert re.search(r"no checkpoint at .*nothing\.pt.*05_pretrain\.py.*--init_from=gpt2", err), err
    assert not (tmp_path / "out").exists()  # nothing left behind


def test_a_file_that_is_not_a_checkpoint_is_called_so(ft07, tmp_path, capsys):
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    argv = [f"--ckpt={tmp_path / 'notes.pt'}", f"--out_dir={tmp_path / 'out'}", "--device=cpu"]
    err = run_main(ft07, capsys, argv)
    assert "not a checkpoint of these scripts" in err and "weights_only" not in err
    assert not (tmp_path / "out").exists()


def test_a_data_file_that_is_not_json_is_named(ft07, char_setup, tmp_path, capsys, no_model):
    tmp, _ = char_setup
    (tmp_path / "README.md").write_text("# not JSON")
    argv = [f"--ckpt={tmp / 'base' / 'ckpt.pt'}", f"--out_dir={tmp_path / 'out'}",
            f"--data_path={tmp_path / 'README.md'}", "--device=cpu"]
    err = run_main(ft07, capsys, argv)
    assert f"{tmp_path / 'README.md'} is not a JSON file" in err and "JSON list of" in err


def test_a_bad_data_file_stops_before_a_model_loads(ft07, char_setup, tmp_path, capsys, no_model):
    tmp, _ = char_setup
    (tmp_path / "data.json").write_text(json.dumps([ENTRY, {"instruction": "no output"}]))
    argv = [f"--ckpt={tmp / 'base' / 'ckpt.pt'}", f"--out_dir={tmp_path / 'out'}",
            f"--data_path={tmp_path / 'data.json'}", "--device=cpu"]
    err = run_main(ft07, capsys, argv)
    assert "entry 1" in err


def test_an_earlier_run_is_never_overwritten_unasked(ft07, char_setup, tmp_path, capsys, no_model):
    tmp, _ = char_setup
    base = torch.load(tmp / "base" / "ckpt.pt", weights_only=True)
    ft07.save_checkpoint(tmp_path / "ckpt.pt", {**base, "stage": "finetune"})  # a 07 run's
    earlier = (tmp_path / "ckpt.pt").read_bytes()
    args = [f"--ckpt={tmp / 'base' / 'ckpt.pt'}", f"--out_dir={tmp_path}", "--device=cpu"]
    err = run_main(ft07, capsys, args)
    assert "--out_dir" in err and "--overwrite" in err and "--init_from=resume" in err
    assert (tmp_path / "ckpt.pt").read_bytes() == earlier
    asked = ft07.parse_config(ft07.FinetuneConfig, [*args, "--overwrite"])
    assert asked.overwrite  # asked: accepted
    (tmp_path / "ckpt.pt").write_bytes(b"an earlier run")  # no checkpoint: said so, and kept
    for overwrite in ([], ["--overwrite"]):  # not 07's: --overwrite does not replace it either
        assert "not a checkpoint of these scripts" in run_main(ft07, capsys, [*args, *overwrite])
    assert (tmp_path / "ckpt.pt").read_bytes() == b"an earlier run"
    (tmp_path / "ckpt.pt").unlink()
    (tmp_path / "test.json").write_text("mine")  # the test split 07 writes at a run's end
    for init_from in ("scratch", "auto"):  # no ckpt.pt: nothing to resume, auto starts afresh
        err = run_main(ft07, capsys, [*args, f"--init_from={init_from}"])
        assert "holds an earlier run (ckpt.pt, test.json)" in err and "resume" not in err, err
        assert "--init_from=scratch --overwrite" in err  # the fix that works for auto too
        ft07.parse_config(ft07.FinetuneConfig, [*args, "--init_from=scratch", "--overwrite"])
    assert (tmp_path / "test.json").read_text() == "mine"


def test_an_out_dir_that_is_a_file_is_refused_before_any_work(ft07, char_setup, tmp_path, capsys,
                                                               no_model):
    tmp, _ = char_setup
    (tmp_path / "notes").write_text("mine")
    args = [f"--ckpt={tmp / 'base' / 'ckpt.pt'}", f"--out_dir={tmp_path / 'notes'}", "--device=cpu"]
    assert "is a file, or in one: name a folder" in run_main(ft07, capsys, args)
    args[1] = f"--out_dir={tmp_path / 'notes' / 'run'}"  # a folder under a file: the same
    assert "notes/run is a file, or in one: name a folder" in run_main(ft07, capsys, args)
    assert (tmp_path / "notes").read_text() == "mine"


def test_a_save_that_the_disk_refuses_is_one_line(ft07, char_setup, tmp_path, capsys,
                                                   monkeypatch):
    """A write the system refuses (an out_dir made read-only, a full disk) is the user's to fix:
    one `error:` line naming it, not a PermissionError traceback."""
    tmp, _ = char_setup

    def refused(path, ckpt):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(ft07, "save_checkpoint", refused)
    err = run_main(ft07, capsys, finetune_args(tmp, tmp_path, "--max_iters=1"))
    assert "Permission denied" in err and "ckpt.pt" in err


def test_resuming_another_stages_run_names_it_and_offers_no_overwrite(ft07, char_setup, tmp_path,
                                                                      capsys):
    """--init_from=resume --out_dir=out/shakespeare-char: 05's run is no 07 run, and the way out
    must not be --overwrite, which would replace 05's model."""
    tmp, _ = char_setup
    (tmp_path / "ckpt.pt").write_bytes((tmp / "base" / "ckpt.pt").read_bytes())  # 05's
    err = run_main(ft07, capsys, ["--init_from=resume", f"--out_dir={tmp_path}", "--device=cpu"])
    assert "holds a 'pretrain' model, no 07 run to resume" in err and "--overwrite" not in err
    assert (tmp_path / "ckpt.pt").read_bytes() == (tmp / "base" / "ckpt.pt").read_bytes()


@pytest.mark.parametrize("stage", ["pretrain", "dpo"])  # 05's (06's) run, or 08's
def test_another_stages_run_in_out_dir_is_refused_offering_only_another_out_dir(
        ft07, char_setup, tmp_path, capsys, no_model, stage):
    """`--ckpt=out/tiny/best.pt --out_dir=out/tiny`: out_dir holds 05's run. --init_from=resume
    would fail (no 07 run to resume) and --overwrite would replace 05's resumable run, so the
    error offers neither, only another --out_dir, which works. --overwrite replaces 07's own runs
    only: with it, the same error, and 05's run stays."""
    tmp, _ = char_setup
    base = torch.load(tmp / "base" / "ckpt.pt", weights_only=True)
    ft07.save_checkpoint(tmp_path / "ckpt.pt", {**base, "stage": stage})
    theirs = (tmp_path / "ckpt.pt").read_bytes()
    args = [f"--ckpt={tmp / 'base' / 'ckpt.pt'}", f"--out_dir={tmp_path}", "--device=cpu"]
    err = run_main(ft07, capsys, args)
    assert f"{stage!r}" in err and "another --out_dir" in err, err
    assert "--overwrite" not in err and "--init_from=resume" not in err, err
    assert (tmp_path / "ckpt.pt").read_bytes() == theirs
    assert run_main(ft07, capsys, [*args, "--overwrite"]) == err
    assert (tmp_path / "ckpt.pt").read_bytes() == theirs
    ft07.parse_config(ft07.FinetuneConfig, [*args, f"--out_dir={tmp_path / 'new'}"])  # the fix


def test_a_run_folder_as_ckpt_names_the_checkpoint_in_it(ft07, char_setup, tmp_path, capsys,
                                                         no_model):
    """--ckpt=out/ft (the folder, which holds ckpt.pt) is no missing model to train again: the
    error names the file to pass, and that file works."""
    tmp, _ = char_setup
    folder = tmp / "base"
    args = [f"--ckpt={folder}", f"--out_dir={tmp_path / 'out'}", "--device=cpu"]
    err = run_main(ft07, capsys, args)
    fixed = f"--ckpt={folder / 'ckpt.pt'}"
    assert fixed in err and "05_pretrain.py" not in err, err
    cfg = ft07.parse_config(ft07.FinetuneConfig, [fixed, *args[1:]])  # the fix, as named
    assert cfg.ckpt == str(folder / "ckpt.pt")
    assert not (tmp_path / "out").exists()


def test_the_start_model_is_never_the_file_the_run_writes(ft07, char_setup, tmp_path, capsys,
                                                          no_model):
    """--ckpt=out_dir/ckpt.pt with --overwrite: the first save would replace the start model."""
    tmp, _ = char_setup
    start = tmp_path / "ckpt.pt"
    start.write_bytes((tmp / "base" / "ckpt.pt").read_bytes())
    args = [f"--ckpt={start}", f"--out_dir={tmp_path}", "--overwrite", "--device=cpu"]
    assert "is this run's ckpt.pt; use another --out_dir" in run_main(ft07, capsys, args)
    assert start.read_bytes() == (tmp / "base" / "ckpt.pt").read_bytes()


@pytest.mark.parametrize("flags, message", [
    ("--unknown_char=~", "--unknown_char"),  # not among the checkpoint's characters
    ("--min_block_size=0 --data_path={long}",
     "0 training and 0 validation examples fit the context"),
    ("--batch_size=35 --data_path={data}", "too few for --batch_size=35"),  # 34 training examples
])
def test_data_the_model_cannot_take_is_one_error_line(ft07, char_setup, tmp_path, capsys, flags,
                                                      message):
    tmp, entries = char_setup
    long = tmp_path / "long.json"  # every prompt longer than the checkpoint's 224 positions
    longer = [{**e, "instruction": e["instruction"] + " x" * 120} for e in entries]
    long.write_text(json.dumps(longer))
    argv = [f"--ckpt={tmp / 'base' / 'ckpt.pt'}", f"--out_dir={tmp_path / 'out'}",
            "--device=cpu", *flags.format(long=long, data=tmp / "data.json").split()]
    assert message in run_main(ft07, capsys, argv)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, message", [
    ("--device=tpu", "tpu"), ("--lora_rank=-1", "--lora_rank"),
    ("--lora_targets=lm_head", "lm_head"),
    ("--batch_size=0", "--batch_size"), ("--max_iters=0 --epochs=0", "no steps"),
    ("--init_from=gpt3", "gpt3"), ("--dtype=fp8", "--dtype"),
    ("--init_from=resume", "no run to resume"), ("--grad_clip=-1", "--grad_clip"),
    ("--grad_clip=nan", "--grad_clip=nan must be finite and >= 0"), ("--epochs=inf", "--epochs"),
    ("--seed=-1", "--seed"), ("--learning_rate=-1", "--learning_rate"),
    ("--threads=-1", "--threads"), ("--ckpt=tests", "no checkpoint at"),
    ("--data_path=tests", "tests is not a file"),  # a folder
])  # fmt: skip
def test_bad_values_get_one_error_line(ft07, char_setup, tmp_path, capsys, no_model, flags,
                                      message):
    tmp, _ = char_setup
    argv = [f"--ckpt={tmp / 'base' / 'ckpt.pt'}", f"--out_dir={tmp_path}", *flags.split()]
    assert message in run_main(ft07, capsys, argv)


FLAGS = ["--max_iter=10", "--lora=4", "--overwrite=maybe", "--batch-size=4", "--ckpt_path=x"]


@pytest.mark.parametrize("flag", FLAGS)
def test_flags_are_spelled_out_in_full(ft07, capsys, no_model, flag):
    assert flag.split("=")[0] in run_main(ft07, capsys, [flag])  # no abbreviations, no guesses


def test_help_lists_the_flags(ft07, capsys):
    """--help shows the config docstring's first line: it must be a whole sentence."""
    with pytest.raises(SystemExit) as e:
        ft07.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--lora_rank" in out
    description = ft07.FinetuneConfig.__doc__.split("\n")[0]
    assert description in out and description.endswith(".")


@pytest.mark.parametrize("settings, message", [
    (dict(dtype="fp8"), "--dtype"), (dict(lora_rank=-1), "--lora_rank"),
    (dict(init_from="gpt3"), "--init_from"), (dict(grad_clip=-1.0), "--grad_clip"),
    (dict(lora_targets="c_attn,lm_head"), "--lora_targets"),  # lm_head is tied to wte
    (dict(lora_rank=4, lora_alpha=0.0), "--lora_alpha"),  # scaling alpha / rank = 0: no learning
])
def test_bad_settings_get_a_clear_error_before_anything_loads(ft07, settings, message):
    with pytest.raises(ValueError, match=message):
        ft07.FinetuneConfig(**settings)


def test_a_save_of_nan_weights_keeps_the_last_good_checkpoint(ft07, char_setup, tmp_path):
    """A Ctrl-C after the loss diverged saves through FinetuneRun.save: it must not write NaN
    weights over the last good ckpt.pt (main turns the error into one line)."""
    tmp, _ = char_setup
    cfg = ft07.FinetuneConfig(ckpt=str(tmp / "base" / "ckpt.pt"), out_dir=str(tmp_path),
                              device="cpu", dtype="float32")
    model = ft07.GPT(ft07.GPTConfig(block_size=8, vocab_size=10, n_layer=1, n_head=1, n_embd=8))
    optimizer = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    run = ft07.FinetuneRun(cfg, model, optimizer, scaler, {"kind": "char", "chars": "0123456789"})
    run.save(1, 2.0)
    good = (tmp_path / "ckpt.pt").read_bytes()
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN weights at step 2"):
        run.save(2, 2.0)
    assert (tmp_path / "ckpt.pt").read_bytes() == good


def test_a_run_saved_on_a_gpu_in_float16_resumes_on_a_cpu(ft07, char_setup, tmp_path, capsys):
    """The device and the dtype are the resuming machine's: a GPU run's float16, replayed on a
    CPU, would stop the resume (CPU has no fp16 training here)."""
    tmp, _ = char_setup
    ft07.main(finetune_args(tmp, tmp_path, "--max_iters=2"))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    ckpt["config"].update(device="cuda", dtype="float16")  # as a GPU without bf16 saves it
    ckpt["iter_num"] = 1
    torch.save(ckpt, tmp_path / "ckpt.pt")
    capsys.readouterr()
    result = ft07.main(["--init_from=resume", f"--out_dir={tmp_path}"])
    assert result["iter_num"] == 2


def test_a_resume_writes_where_it_read(ft07, char_setup, tmp_path, monkeypatch):
    """A run moved into the default out_dir, resumed with no --out_dir, goes on there: the saved
    settings' out_dir (the folder it was made in) is not where the resume writes. A saved setting
    07 no longer has (an older version's) is dropped."""
    tmp, _ = char_setup
    monkeypatch.setattr(ft07, "PROJECT", tmp_path)
    default = tmp_path / ft07.FinetuneConfig.out_dir
    ft07.main(finetune_args(tmp, default, "--max_iters=2"))
    ckpt = torch.load(default / "ckpt.pt", weights_only=False)
    ckpt["config"]["out_dir"] = str(tmp_path / "elsewhere")  # where the run was made
    ckpt["config"]["num_responses"] = 5  # a setting of older versions: left out, not an error
    torch.save(ckpt, default / "ckpt.pt")
    ft07.main(["--init_from=resume", "--max_iters=3"])
    assert torch.load(default / "ckpt.pt", weights_only=True)["iter_num"] == 3
    assert not (tmp_path / "elsewhere").exists()


def test_overwrite_with_a_resume_is_refused(ft07, char_setup, tmp_path, capsys):
    """--overwrite starts afresh: beside --init_from=auto (which would resume the run in out_dir)
    or resume it is one error line, the run untouched; a resume of a run begun with --overwrite
    does not take it from the checkpoint."""
    tmp, _ = char_setup
    ft07.main(finetune_args(tmp, tmp_path, "--max_iters=1", "--overwrite"))
    saved = (tmp_path / "ckpt.pt").read_bytes()
    for init_from in ("auto", "resume"):
        args = finetune_args(tmp, tmp_path, "--max_iters=2", f"--init_from={init_from}",
                             "--overwrite")
        assert "--overwrite starts afresh" in run_main(ft07, capsys, args)
        assert (tmp_path / "ckpt.pt").read_bytes() == saved
    ft07.main(["--init_from=resume", f"--out_dir={tmp_path}", "--max_iters=2", "--device=cpu"])
    assert ft07.load_checkpoint(tmp_path / "ckpt.pt")[2]["iter_num"] == 2


@pytest.mark.parametrize("out_dir", ["", ".", "out/.."])
def test_an_out_dir_that_is_the_project_folder_is_refused(ft07, char_setup, tmp_path, capsys,
                                                          monkeypatch, no_model, out_dir):
    """'' or '.' would put ckpt.pt and test.json among the scripts."""
    tmp, _ = char_setup
    project = tmp_path.resolve()  # PROJECT is a resolved path: a bug writes here, not among ours
    monkeypatch.setattr(ft07, "PROJECT", project)
    args = [f"--ckpt={tmp / 'base' / 'ckpt.pt'}", f"--out_dir={out_dir}", "--device=cpu"]
    assert "is the project folder: name another" in run_main(ft07, capsys, args)
    assert list(project.iterdir()) == []
