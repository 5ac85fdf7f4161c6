"""Tests for 08_dpo.py: the DPO loss, rewards, masks, log-probs, the frozen reference, a short run.

Expected values are worked out by hand with math.log / math.exp (loss, label smoothing, log-probs,
masks), or come from a reference computation: each sequence scored alone by the model, 07's own
collate_fn for the finetuning format, tiktoken encoding prompt and answer together as 07 does,
05's checkpoint loader for what 09 will load, a float64 LM head for the precision of the
log-probs under bf16 autocast.
"""

import itertools
import json
import math
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import count_device_reads, exit_status, interrupted, load_script
from torch.testing import assert_close

LN2 = math.log(2)


def tiny_gpt(dpo08, vocab_size=32, block_size=32, n_embd=16, n_layer=2):
    config = dpo08.GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer,
                             n_head=2, n_embd=n_embd)
    return dpo08.GPT(config)


def neg_log_sigmoid(x: float) -> float:
    return math.log(1 + math.exp(-x))  # -log(1 / (1 + e^-x))


# -----------------------------------------------------------------------------
# the loss and the rewards, by hand


def test_dpo_loss_and_rewards_match_a_hand_computation(dpo08):
    # pair 0: pi (-5, -7), ref (-6, -6.5): log-ratios +1 and -0.5; pair 1 prefers the wrong answer
    policy_chosen, policy_rejected = torch.tensor([-5.0, -10.0]), torch.tensor([-7.0, -4.0])
    reference_chosen, reference_rejected = torch.tensor([-6.0, -9.0]), torch.tensor([-6.5, -6.0])
    beta = 0.5
    losses, chosen, rejected = dpo08.dpo_loss(policy_chosen, policy_rejected, reference_chosen,
                                              reference_rejected, beta=beta)
    # pair 0: rewards 0.5 * 1 = 0.5 and 0.5 * -0.5 = -0.25, margin 0.75
    # pair 1: rewards 0.5 * -1 = -0.5 and 0.5 * 2 = 1.0, margin -1.5
    assert_close(chosen, torch.tensor([0.5, -0.5]))
    assert_close(rejected, torch.tensor([-0.25, 1.0]))
    assert_close(losses, torch.tensor([neg_log_sigmoid(0.75), neg_log_sigmoid(-1.5)]))
    assert abs(neg_log_sigmoid(0.75) - 0.3869) < 1e-4  # the number in dpo_loss's docstring
    metrics = dpo08.pair_metrics(losses, chosen, rejected)
    assert metrics["margin"] == pytest.approx((0.75 - 1.5) / 2)
    assert metrics["accuracy"] == 0.5
    assert metrics["loss"] == pytest.approx((neg_log_sigmoid(0.75) + neg_log_sigmoid(-1.5)) / 2)


def test_rewards_carry_no_gradient_and_the_loss_does(dpo08):
    policy_chosen = torch.tensor([-5.0], requires_grad=True)
    policy_rejected = torch.tensor([-7.0], requires_grad=True)
    losses, chosen, rejected = dpo08.dpo_loss(policy_chosen, policy_rejected, torch.tensor([-6.0]),
                                              torch.tensor([-6.5]), beta=0.5)
    assert not chosen.requires_grad and not rejected.requires_grad
    losses.sum().backward()
    # d/dpc -log sigmoid(beta * (pc - rc - pr + rr)) = -beta * sigmoid(-m), m = 0.75
    push = 0.5 / (1 + math.exp(0.75))
    assert policy_chosen.grad.item() == pytest.approx(-push)  # gradient descent raises the chosen
    assert policy_rejected.grad.item() == pytest.approx(push)  # and lowers the rejected


def test_label_smoothing_zero_is_plain_dpo_and_matches_the_hand_formula(dpo08):
    args = (torch.tensor([-5.0, -10.0]), torch.tensor([-7.0, -4.0]), torch.tensor([-6.0, -9.0]),
            torch.tensor([-6.5, -6.0]))
    plain = dpo08.dpo_loss(*args, beta=0.5)[0]
    assert torch.equal(dpo08.dpo_loss(*args, beta=0.5, label_smoothing=0.0)[0], plain)
    eps = 0.1
    smoothed = dpo08.dpo_loss(*args, beta=0.5, label_smoothing=eps)[0]
    # (1 - eps) * -log sigmoid(m) + eps * -log sigmoid(-m), margins m = 0.75 and -1.5
    expected = [(1 - eps) * neg_log_sigmoid(m) + eps * neg_log_sigmoid(-m) for m in (0.75, -1.5)]
    assert_close(smoothed, torch.tensor(expected))
    # its minimum sits at m = ln((1 - eps) / eps), where plain DPO would still push
    m = torch.tensor([math.log((1 - eps) / eps)], requires_grad=True)
    zero = torch.zeros(1)
    dpo08.dpo_loss(m, zero, zero, zero, beta=1.0, label_smoothing=eps)[0].backward()
    assert abs(m.grad.item()) < 1e-6


# -----------------------------------------------------------------------------
# sequence log-probs and masks, by hand


def test_sequence_logprobs_summed_and_averaged_by_hand(dpo08):
    # vocabulary of 2; logits (0, ln 3) give p = (1/4, 3/4) at every position
    logits = torch.tensor([0.0, math.log(3)]).expand(2, 4, 2)
    targets = torch.tensor([[1, 1, 0, 1], [0, 1, 0, 0]])
    mask = torch.tensor([[False, True, True, True], [False, False, True, False]])
    summed = dpo08.sequence_logprobs(logits, targets, mask)
    expected_0 = math.log(3 / 4) + math.log(1 / 4) + math.log(3 / 4)  # positions 1, 2, 3
    expected_1 = math.log(1 / 4)  # position 2 only
    assert_close(summed, torch.tensor([expected_0, expected_1]))
    averaged = dpo08.sequence_logprobs(logits, targets, mask, average=True)
    assert_close(averaged, torch.tensor([expected_0 / 3, expected_1 / 1]))


def test_collate_pairs_masks_the_prompt_and_the_padding(dpo08):
    # the docstring's example: pad 0, end token 9
    batch = [([1, 2], [3, 4, 9], [5, 9]), ([7], [8, 9], [6, 6, 6, 9])]
    x, y, mask = dpo08.collate_pairs(batch, pad_token_id=0)
    F, T = False, True
    # rows: chosen of pair 0, chosen of pair 1, rejected of pair 0, rejected of pair 1
    assert x.tolist() == [[1, 2, 3, 4], [7, 8, 0, 0], [1, 2, 5, 0], [7, 6, 6, 6]]
    assert y.tolist() == [[2, 3, 4, 9], [8, 9, 0, 0], [2, 5, 9, 0], [6, 6, 6, 9]]
    assert mask.tolist() == [[F, T, T, T], [T, T, F, F], [F, T, T, F], [T, T, T, T]]
    x2, y2, mask2 = dpo08.collate_pairs(batch, pad_token_id=0, allowed_max_length=2)
    assert x2.tolist() == [row[:2] for row in x.tolist()]
    assert y2.tolist() == [row[:2] for row in y.tolist()]
    assert mask2.tolist() == [row[:2] for row in mask.tolist()]


def test_batched_logprobs_equal_each_sequence_scored_alone(dpo08):
    """Padding, masks and the chosen/rejected row order, against a plain per-sequence
    computation."""
    model = tiny_gpt(dpo08).eval()
    batch = [([1, 2, 3], [4, 5, 31], [6, 31]), ([7, 8], [9, 31], [10, 11, 12, 13, 31])]
    x, y, mask = dpo08.collate_pairs(batch, pad_token_id=31)
    chosen, rejected = dpo08.pair_logprobs(model, x, y, mask)
    for average in (False, True):
        got = torch.cat(dpo08.pair_logprobs(model, x, y, mask, average))
        expected = []
        for answer_of in (lambda pair: pair[1], lambda pair: pair[2]):
            for pair in batch:
                prompt, answer = pair[0], answer_of(pair)
                seq = torch.tensor(prompt + answer)
                logp = model(seq[None, :-1])[0][0].log_softmax(-1)  # (len - 1, vocab)
                terms = [logp[len(prompt) - 1 + i, token] for i, token in enumerate(answer)]
                total = torch.stack(terms).sum()
                expected.append(total / len(answer) if average else total)
        assert_close(got, torch.stack(expected))
    assert chosen.shape == rejected.shape == (2,)


def test_logprobs_come_from_an_fp32_head_under_bf16_autocast(dpo08):
    """The blocks may run in bf16; the LM head and log_softmax must not (issue 14).

    GPT-2's logits are tens of nats. We scale a tiny model's embedding (the tied head) so that
    its logits are too; then a bf16 head rounds them by ~0.1 each, while DPO's signal (log pi -
    log ref) is of that size. Both paths get the same hidden states (from bf16 blocks); only the
    head differs.
    """
    model = tiny_gpt(dpo08, vocab_size=64, n_embd=32).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(50)  # logits of tens, as GPT-2's
    batch = [([1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 63], [11, 12, 63]),
             ([7, 8], [9, 10, 11, 63], [12, 63])]
    x, y, mask = dpo08.collate_pairs(batch, pad_token_id=63)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16)
    with torch.no_grad():
        with ctx:
            h = dpo08.final_hidden(model, x)  # (2B, T, C): bf16 matmuls in the blocks
            old_logits = model.lm_head(h)  # the old path: a bf16 head ...
        assert old_logits.dtype == torch.bfloat16
        exact_logits = h.double() @ model.lm_head.weight.double().T  # float64
        exact = dpo08.sequence_logprobs(exact_logits, y, mask)
        old = dpo08.sequence_logprobs(old_logits.float(), y, mask)  # ... cast to float afterwards
        new = torch.cat(dpo08.pair_logprobs(model, x, y, mask, ctx=ctx))
    assert new.dtype == torch.float32
    assert_close(new.double(), exact, rtol=0, atol=1e-4)
    assert (old.double() - exact).abs().max() > 1e-2  # the bf16 head is off by far more


def test_final_hidden_is_the_model_without_its_head(dpo08):
    torch.manual_seed(0)
    model = tiny_gpt(dpo08, vocab_size=64, n_embd=32).eval()
    idx = torch.randint(64, (2, 9))
    with torch.no_grad():
        got = model.lm_head(dpo08.final_hidden(model, idx))
        assert_close(got, model(idx)[0], atol=1e-5, rtol=0)


def test_pairs_are_formatted_exactly_as_07_finetuned(dpo08, ft07):
    """The chosen sequence is 07's training example with the chosen answer as its output."""
    tok = dpo08.get_tokenizer({"kind": "gpt2"})
    encode, _ = dpo08.text_encoder(tok)
    entries = dpo08.load_preference_data()[:20]
    pairs, n_cut, n_dropped = dpo08.tokenize_pairs(entries, encode, tok.eot_token, max_length=1024)
    assert len(pairs) == 20 and n_dropped == 0
    for entry, (prompt, chosen, rejected) in zip(entries, pairs):
        for answer, ids in ((entry["chosen"], chosen), (entry["rejected"], rejected)):
            example_entry = {**entry, "output": answer}
            example = ft07.tokenize_examples([example_entry], encode, max_length=1024)[0]
            x07, y07 = ft07.collate_fn([example], pad_token_id=tok.eot_token, mask_prompt=False)
            x, y, mask = dpo08.collate_pairs([(prompt, ids, ids)], pad_token_id=tok.eot_token)
            assert x[0].tolist() == x07[0].tolist() and y[0].tolist() == y07[0].tolist()
            # 07 also learned the "### Response:" header; DPO scores the answer and the end
            # token only
            assert tok.decode(y[0][mask[0]].tolist()) == answer + "<|endoftext|>"
            assert tok.decode(prompt) == dpo08.format_input(entry) + dpo08.RESPONSE_HEADER


def answer_starts_cleanly(answer: str) -> bool:
    """tokenize_pairs' condition: the answer starts with a non-space, or with one whitespace
    character and then a non-space (or is empty)."""
    return not answer[:1].isspace() or (answer[1:2] != "" and not answer[1:2].isspace())


def test_header_and_answer_apart_give_07s_ids_when_the_answer_starts_cleanly(
    dpo08, preference_data_path
):
    r"""07 encodes RESPONSE_HEADER + answer together, tokenize_pairs apart; tiktoken decides.

    The header ends with "\n". When the answer starts cleanly, GPT-2's pre-split leaves that
    newline a chunk of its own, and BPE never merges across chunks: the same ids. Otherwise the
    newline shares a chunk with the answer's leading whitespace, and BPE merges "\n\n" or
    "\n\xa0" into one token: other ids. rasbt's answers all start cleanly."""
    tok = dpo08.get_tokenizer({"kind": "gpt2"})
    encode, _ = dpo08.text_encoder(tok)
    entry = {"instruction": "Greet me.", "input": ""}
    prompt_ids = encode(dpo08.format_input(entry))

    def apart_and_together(answer):  # 08's (prompt + answer) ids, and 07's
        pair = {**entry, "chosen": answer, "rejected": answer}
        pairs, _, _ = dpo08.tokenize_pairs([pair], encode, tok.eot_token, max_length=1024)
        prompt, chosen, _ = pairs[0]
        return prompt + chosen[:-1], prompt_ids + encode(dpo08.RESPONSE_HEADER + answer)

    whitespace = ["", " ", "\n", "\t", "\r", "\xa0", "\u3000"]
    rests = ["Hi", " Hi", "!", "12", "'s", ""]
    clean = 0
    for first, second, rest in itertools.product(whitespace, whitespace, rests):
        answer = first + second + rest
        if answer_starts_cleanly(answer):
            apart, together = apart_and_together(answer)
            assert apart == together, repr(answer)
            clean += 1
    assert clean > 50
    for answer in ("\n\nHi", "\n Hi", "\n", "\xa0 Hi", "\xa0"):  # a newline token forms
        assert not answer_starts_cleanly(answer)
        apart, together = apart_and_together(answer)
        assert apart != together, repr(answer)
    for answer in ("  Hi", " \nHi", "\t\tHi"):  # one chunk, but BPE has no token to merge into
        apart, together = apart_and_together(answer)
        assert not answer_starts_cleanly(answer) and apart == together
    data = json.loads(preference_data_path.read_text(encoding="utf-8"))
    assert all(answer_starts_cleanly(e[k]) for e in data for k in ("chosen", "rejected"))


def test_dataset_drops_pairs_without_room_for_an_answer(dpo08):
    encode = lambda text: list(range(len(text)))  # noqa: E731 one id per character: lengths are len()
    short = {"instruction": "a", "input": "", "chosen": "bb", "rejected": "c"}
    long = {"instruction": "a", "input": "", "chosen": "b" * 50, "rejected": "c"}
    huge = {"instruction": "a" * 300, "input": "", "chosen": "b", "rejected": "c"}
    prompt = len(dpo08.format_input(short)) + len(dpo08.RESPONSE_HEADER)
    entries = [short, long, huge]
    pairs, n_cut, n_dropped = dpo08.tokenize_pairs(entries, encode, 99, max_length=prompt + 2)
    assert len(pairs) == 2 and (n_cut, n_dropped) == (1, 1)
    assert [(len(p), c[-1], r) for p, c, r in pairs][0] == (prompt, 99, [0, 99])


def char_model_lacking(dpo08, start, lacking: str):
    """start's 07 checkpoint with a char model whose vocabulary lacks the characters `lacking`
    (it has "&" and "?"), saved by 07 with --unknown_char='&': (checkpoint, its tokenizer)."""
    tmp, ckpt = start
    entries = json.loads((tmp / "pairs.json").read_text(encoding="utf-8"))
    header = dpo08.RESPONSE_HEADER
    text = "".join(dpo08.format_input(e) + header + e["chosen"] + e["rejected"] for e in entries)
    chars = "".join(sorted(set(text + "&?\n") - set(lacking)))
    tok = dpo08.CharTokenizer(chars)
    torch.manual_seed(0)
    model = tiny_gpt(dpo08, vocab_size=tok.n_vocab, block_size=256, n_embd=32, n_layer=1)
    return {**ckpt, "model": model.state_dict(), "model_args": dpo08.asdict(model.config),
            "tokenizer": tok.to_dict(), "config": {"unknown_char": "&"}}, tok


def test_pairs_are_encoded_with_07s_unknown_char(dpo08, start):
    """07 --unknown_char='&' finetuned on '&' for each character its char model lacks: DPO's
    pairs must be encoded the same way (not with '?'), or the policy sees text 07 never taught."""
    tmp, _ = start
    ckpt, tok = char_model_lacking(dpo08, start, lacking="e")
    cfg = run_config(dpo08, tmp, tmp / "unused")
    data = dpo08.prepare_pairs(cfg, ckpt, 256)
    entries = json.loads((tmp / "pairs.json").read_text(encoding="utf-8"))
    train = dpo08.split_data(entries)["train"]
    end_id = tok.encode("\n")[0]
    encode = lambda text: tok.encode(text.replace("e", "&"))  # noqa: E731 as 07 encoded
    expected, _, _ = dpo08.tokenize_pairs(train, encode, end_id, 256)
    assert data["train"] == expected


def test_a_dpo_checkpoint_keeps_07s_unknown_char_for_09(dpo08, start, tmp_path):
    """09 encodes prompts with the unknown_char in a checkpoint's config: an 08 checkpoint must
    carry 07's, and the key (not a DPOConfig setting) must not stop a resume."""
    tmp, _ = start
    ckpt, tok = char_model_lacking(dpo08, start, lacking="e")
    dpo08.save_checkpoint(tmp_path / "amp.pt", ckpt)
    settings = dict(ckpt=tmp_path / "amp.pt", max_iters=1, batch_size=2, eval_pairs=2)
    dpo08.main(run_argv(tmp, tmp_path / "dpo", **settings))
    saved = torch.load(tmp_path / "dpo" / "ckpt.pt", weights_only=True)
    assert saved["config"]["unknown_char"] == "&"
    assert load_script("09_generate").Template(tok, saved).unknown_char == "&"
    result = dpo08.main(["--init_from=resume", f"--out_dir={tmp_path / 'dpo'}", "--max_iters=2"])
    assert result["iter_num"] == 2


# -----------------------------------------------------------------------------
# the reference model


def test_at_step_zero_the_loss_is_ln2_and_the_margins_are_zero(dpo08):
    policy = tiny_gpt(dpo08)
    reference = dpo08.make_reference(policy)
    pairs = [([1, 2, 3], [4, 5, 31], [6, 31]), ([7], [9, 31], [10, 11, 12, 31])]
    batch = dpo08.collate_pairs(pairs, 31)
    for average in (False, True):
        losses, chosen, rejected = dpo08.dpo_batch(policy, reference, batch, beta=0.1,
                                                   average=average)
        assert_close(losses, torch.full((2,), LN2))
        assert_close(chosen, torch.zeros(2))
        assert_close(rejected, torch.zeros(2))
        assert dpo08.pair_metrics(losses, chosen, rejected)["accuracy"] == 0.0  # all ties


def test_reference_is_a_frozen_copy_and_gets_no_gradient(dpo08):
    policy = tiny_gpt(dpo08)
    reference = dpo08.make_reference(policy)
    assert not reference.training and policy.training
    assert all(not p.requires_grad for p in reference.parameters())
    ref_params = dict(reference.named_parameters())
    pol_params = dict(policy.named_parameters())
    # own storage
    assert all(ref_params[k].data_ptr() != pol_params[k].data_ptr() for k in ref_params)
    # still tied, within the copy
    assert reference.lm_head.weight is reference.transformer.wte.weight
    batch = dpo08.collate_pairs([([1, 2], [3, 31], [4, 5, 31])], 31)
    dpo08.dpo_batch(policy, reference, batch)[0].mean().backward()
    assert all(p.grad is None for p in reference.parameters())
    assert policy.lm_head.weight.grad is not None


# -----------------------------------------------------------------------------
# the whole run on a tiny character model


@pytest.fixture(scope="module")
def start(dpo08, tmp_path_factory, preference_data_path):
    """A tiny char GPT saved as a 07 checkpoint, and the 48 shortest pairs: (dir, ckpt dict)."""
    tmp = tmp_path_factory.mktemp("dpo")
    data = json.loads(preference_data_path.read_text(encoding="utf-8"))
    def length(e):
        return len(dpo08.format_input(e)) + max(len(e["chosen"]), len(e["rejected"]))

    data = sorted(data, key=length)[:48]
    (tmp / "pairs.json").write_text(json.dumps(data))
    header = dpo08.RESPONSE_HEADER
    text = "".join(dpo08.format_input(e) + header + e["chosen"] + e["rejected"] for e in data)
    tok = dpo08.CharTokenizer.from_text(text + "\n")
    torch.manual_seed(0)
    model = tiny_gpt(dpo08, vocab_size=tok.n_vocab, block_size=256, n_embd=32, n_layer=1)
    ckpt = {"model": model.state_dict(), "model_args": dpo08.asdict(model.config),
            "tokenizer": tok.to_dict(), "config": {}, "stage": "finetune", "iter_num": 0,
            "best_val_loss": float("inf"), "val_loss": float("inf"), "optimizer": None,
            "scaler": None, "rng": None}
    dpo08.save_checkpoint(tmp / "ft.pt", ckpt)
    return tmp, ckpt


def run_settings(tmp, out_dir, **overrides) -> dict:
    settings = dict(ckpt=str(tmp / "ft.pt"), out_dir=str(out_dir),
                    data_path=str(tmp / "pairs.json"), max_iters=12, learning_rate=3e-3,
                    warmup_iters=2, beta=0.1, eval_interval=6, log_interval=6, device="cpu",
                    dtype="float32", threads=1)
    return {**settings, **overrides}


def run_config(dpo08, tmp, out_dir, **overrides):
    return dpo08.DPOConfig(**run_settings(tmp, out_dir, **overrides))


def run_argv(tmp, out_dir, **overrides) -> list[str]:
    """run_config's settings as flags for main; threads=0 leaves torch's thread count alone."""
    settings = run_settings(tmp, out_dir, threads=0, **overrides)
    return [f"--{name}={value}" for name, value in settings.items()]


@pytest.fixture(scope="module")
def tiny_run(dpo08, start):
    """A short DPO run from the tiny 07 checkpoint."""
    tmp, ckpt = start
    cfg = run_config(dpo08, tmp, tmp / "dpo")
    return dpo08.dpo(cfg), ckpt, cfg


@pytest.mark.slow
def test_a_short_run_raises_the_margin_and_the_accuracy_on_training_pairs(tiny_run):
    result, _, _ = tiny_run
    before, after = result["before"]["train"], result["after"]["train"]
    assert before["loss"] == pytest.approx(LN2)
    assert before["margin"] == 0 and before["accuracy"] == 0
    assert after["margin"] > before["margin"] + 0.1
    assert after["accuracy"] > 0.75
    assert after["loss"] < LN2 - 0.05
    assert after["chosen_reward"] > after["rejected_reward"]
    assert len(result["train_losses"]) == 12
    assert all(isinstance(v, float) for v in result["train_losses"])


@pytest.mark.slow
def test_the_reference_never_changes(tiny_run):
    result, ckpt, _ = tiny_run
    reference, policy = result["reference"], result["policy"]
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, ckpt["model"][name]), name
    assert not torch.equal(policy.state_dict()["lm_head.weight"], ckpt["model"]["lm_head.weight"])


@pytest.mark.slow
def test_the_run_writes_a_dpo_checkpoint_and_a_log(dpo08, tiny_run):
    result, _, cfg = tiny_run
    out = dpo08.Path(cfg.out_dir)
    model, tok, ckpt = dpo08.load_checkpoint(out / "ckpt.pt")  # what 09 does
    assert ckpt["stage"] == "dpo" and ckpt["iter_num"] == 12
    assert ckpt["tokenizer"]["kind"] == "char"
    assert ckpt["val_loss"] == pytest.approx(result["after"]["val"]["loss"])
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, result["policy"].state_dict()[name]), name
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [line["iter"] for line in log] == [0, 6, 12]
    assert log[-1]["train_margin"] == pytest.approx(result["after"]["train"]["margin"])


@pytest.mark.slow
def test_the_loop_reads_no_value_from_the_device_per_step(dpo08, start, monkeypatch):
    """Losses stay on the device; values are read on log and eval steps only (issue 14).

    We count every read of a tensor's value (.item(), .tolist(), float(), formatting) made by
    08's own code in two runs that log and evaluate equally often, one three times as long: the
    count must not grow with the steps.
    """
    tmp, _ = start
    reads = count_device_reads(monkeypatch, dpo08.__file__)
    counts = []
    for max_iters in (3, 9):
        reads.clear()
        cfg = run_config(dpo08, tmp, tmp / f"reads{max_iters}", max_iters=max_iters,
                         log_interval=100, eval_interval=100)
        dpo08.dpo(cfg)
        counts.append(len(reads))
    assert counts[0] > 0  # the counter sees 08's reads (the log and eval lines)
    assert counts[0] == counts[1]


# -----------------------------------------------------------------------------
# Ctrl-C and resume


def interrupt_at(dpo08, monkeypatch, step: int, times: int = 1):
    """Make the training batch of `step` send this process SIGINT `times` times, as Ctrl-C
    would (evaluation never asks batch_indices)."""
    batch_indices = dpo08.batch_indices

    def patched(batch_step, *args):
        if batch_step == step:
            for _ in range(times):
                signal.raise_signal(signal.SIGINT)
        return batch_indices(batch_step, *args)

    monkeypatch.setattr(dpo08, "batch_indices", patched)


@pytest.mark.slow
def test_ctrl_c_saves_and_the_hint_resumes_to_the_same_weights(dpo08, start, tmp_path,
                                                                 monkeypatch, capsys):
    """4 steps in one go == Ctrl-C during step 2, exit 130, the printed command, 2 more steps:
    the same bits in the policy and in Adam's state. The resume takes the run's own settings
    from its checkpoint (the command names only --init_from and --out_dir), rebuilds the
    reference from --ckpt, and the batches are a function of the step."""
    tmp, _ = start
    settings = dict(max_iters=4, eval_interval=3, batch_size=4, eval_pairs=4)
    full = tmp_path / "full"
    dpo08.main(run_argv(tmp, full, **settings))
    split = tmp_path / "split"
    handler = signal.getsignal(signal.SIGINT)
    interrupt_at(dpo08, monkeypatch, step=1)  # the second step (0-based)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        dpo08.main(run_argv(tmp, split, **settings))
    monkeypatch.undo()
    assert exit_info.value.code == 130  # as a shell reports Ctrl-C
    assert signal.getsignal(signal.SIGINT) is handler  # dpo() restored the Ctrl-C handler
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Ctrl-C: saving after this step" in out
    assert f"saved {split / 'ckpt.pt'} (step 2)" in out
    command = out.split("continue: ")[1].split()  # python 08_dpo.py --init_from=... --out_dir=...
    assert command[:2] == ["python", "08_dpo.py"] and f"--out_dir={split}" in command
    resumed = dpo08.main(command[2:])
    assert "resuming at step 2 of 4" in capsys.readouterr().out
    assert resumed["iter_num"] == 4 and resumed["before"] is None
    a = torch.load(full / "ckpt.pt", weights_only=True)
    b = torch.load(split / "ckpt.pt", weights_only=True)
    assert a["iter_num"] == b["iter_num"] == 4
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for i, state in a["optimizer"]["state"].items():
        assert all(torch.equal(state[k], b["optimizer"]["state"][i][k]) for k in state)
    assert a["val_loss"] == b["val_loss"] and a["best_val_loss"] == b["best_val_loss"]
    log = [json.loads(line)["iter"] for line in (split / "log.jsonl").read_text().splitlines()]
    assert log == [0, 3, 4]


def test_a_second_ctrl_c_quits_at_once(dpo08, start, tmp_path, monkeypatch):
    tmp, _ = start
    interrupt_at(dpo08, monkeypatch, step=1, times=2)
    cfg = run_config(dpo08, tmp, tmp_path, max_iters=4, eval_interval=100, eval_pairs=8)
    with pytest.raises(SystemExit) as stop:  # a shell's code for Ctrl-C, no traceback
        dpo08.dpo(cfg)
    assert stop.value.code == 130
    assert not (tmp_path / "ckpt.pt").exists()  # no save: it quit during step 2


def test_ctrl_c_before_the_loop_is_one_line_and_exit_130(dpo08, start, tmp_path, monkeypatch,
                                                        capsys):
    """Loading the models and the first evaluation come before the loop's CtrlC."""
    tmp, _ = start

    monkeypatch.setattr(dpo08, "dpo", interrupted)
    assert exit_status(dpo08.main, run_argv(tmp, tmp_path, max_iters=1)) == 130
    assert capsys.readouterr().err.strip() == "Ctrl-C: stopped"


def test_a_run_saved_without_fp16_resumes_with_it(dpo08, start, tmp_path):
    """Without fp16 the gradient scaler is off and saves {}: a float16 resume starts a new one."""
    tmp, _ = start
    settings = dict(max_iters=1, batch_size=2, eval_pairs=2)
    dpo08.main(run_argv(tmp, tmp_path, **settings))
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["scaler"] == {}
    cfg = run_config(dpo08, tmp, tmp_path, init_from="resume", **{**settings, "max_iters": 2})
    cfg.dtype = "float16"  # as a resume on a GPU gets it: the flag refuses float16 off CUDA
    assert dpo08.dpo(cfg)["iter_num"] == 2
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["scaler"]["scale"] > 0


def test_init_from_auto_resumes_when_out_dir_holds_a_run(dpo08, start, tmp_path):
    tmp, ckpt = start
    cfg = run_config(dpo08, tmp, tmp_path, init_from="auto")
    assert cfg.init_from == "scratch"
    dpo08.save_checkpoint(tmp_path / "ckpt.pt", ckpt)
    cfg = run_config(dpo08, tmp, tmp_path, init_from="auto")
    assert cfg.init_from == "resume"


def test_resume_needs_a_dpo_run_with_its_optimizer_state(dpo08, capsys, start, tmp_path):
    tmp, ckpt = start
    argv = [f"--out_dir={tmp_path}", "--init_from=resume"]
    assert_user_error(dpo08, capsys, argv, f"no {tmp_path / 'ckpt.pt'} to resume",
                      "--init_from=scratch")
    dpo08.save_checkpoint(tmp_path / "ckpt.pt", ckpt)  # 07's: weights only
    argv = [f"--ckpt={tmp / 'ft.pt'}", f"--out_dir={tmp_path}", "--init_from=resume"]
    assert_user_error(dpo08, capsys, argv, "holds a 'finetune' model, no DPO run to resume",
                      "another --out_dir")


def test_the_reference_is_never_the_file_a_save_replaces(dpo08, capsys, start, tmp_path):
    """--ckpt=out_dir/ckpt.pt would lose 07's model at the first save, and a resume would take
    the policy for the reference: refused, with --overwrite too, before anything is written."""
    tmp, ckpt = start
    dpo08.save_checkpoint(tmp_path / "ckpt.pt", ckpt)
    written = (tmp_path / "ckpt.pt").read_bytes()
    for init_from in ("scratch", "resume"):
        argv = [f"--ckpt={tmp_path / 'ckpt.pt'}", f"--out_dir={tmp_path}", "--overwrite",
                f"--data_path={tmp / 'pairs.json'}", f"--init_from={init_from}"]
        assert_user_error(dpo08, capsys, argv, "the file a save replaces", "--out_dir")
    assert (tmp_path / "ckpt.pt").read_bytes() == written


@pytest.mark.slow
def test_relative_paths_resolve_against_the_project_folder(dpo08, start, tmp_path, monkeypatch):
    """Run from another folder, a relative --out_dir and --ckpt still mean PROJECT/<path>."""
    tmp, _ = start
    monkeypatch.chdir(tmp_path)
    out_dir = Path("out") / f"test-08-relative-{os.getpid()}"
    ckpt = os.path.relpath(tmp / "ft.pt", dpo08.PROJECT)  # ../../tmp/...: from the project
    assert not (tmp_path / ckpt).exists()  # from the current folder it means nothing
    try:
        argv = run_argv(tmp, out_dir, ckpt=ckpt, max_iters=1, eval_pairs=8)
        dpo08.main(argv)
        assert (dpo08.PROJECT / out_dir / "ckpt.pt").exists()
        assert not (tmp_path / out_dir).exists()
    finally:
        shutil.rmtree(dpo08.PROJECT / out_dir, ignore_errors=True)


# -----------------------------------------------------------------------------
# command line and errors: one `error:` line, exit status 2, nothing written


def test_help_lists_the_dpo_flags(dpo08, capsys):
    with pytest.raises(SystemExit) as exit_info:
        dpo08.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--beta", "--label_smoothing", "--average_log_probs", "--ckpt",
                 "--eval_interval", "--overwrite"):
        assert flag in out


def assert_user_error(dpo08, capsys, argv, *words):
    """main(argv) stops with one `error: ...` line naming words, exit status 2, and no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        dpo08.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


@pytest.mark.parametrize("below", ["", "run"])  # the file itself, or a folder under it
def test_an_out_dir_that_is_a_file_is_refused_before_any_work(dpo08, start, tmp_path, capsys,
                                                               monkeypatch, below):
    tmp, _ = start
    (tmp_path / "notes").write_text("mine")
    out_dir = tmp_path / "notes" / below
    monkeypatch.setattr(dpo08, "load_models", lambda *a: pytest.fail("loaded the models"))
    argv = run_argv(tmp, out_dir, max_iters=1)
    assert_user_error(dpo08, capsys, argv, "is a file, or in one: name a folder")
    assert (tmp_path / "notes").read_text() == "mine"


def test_a_missing_checkpoint_says_how_to_make_one(dpo08, capsys, tmp_path):
    cfg = dpo08.DPOConfig(ckpt=str(tmp_path / "none.pt"), out_dir=str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="07_finetune.py") as error:
        dpo08.load_models(cfg)
    assert "--init_from=gpt2" in str(error.value)
    argv = [f"--ckpt={tmp_path / 'none.pt'}", f"--out_dir={tmp_path / 'out'}"]
    assert_user_error(dpo08, capsys, argv, "07_finetune.py")
    assert not (tmp_path / "out").exists()


def test_a_pretraining_checkpoint_is_sent_to_07_first(dpo08, capsys, start, tmp_path):
    """05's model has not learned to answer: the error says so and names 07's command, rather
    than that the pairs do not fit its context."""
    tmp, ckpt = start
    pretrained = tmp_path / "pretrain.pt"
    dpo08.save_checkpoint(pretrained, {**ckpt, "stage": "pretrain"})
    argv = [f"--ckpt={pretrained}", f"--data_path={tmp / 'pairs.json'}",
            f"--out_dir={tmp_path / 'out'}", "--device=cpu"]
    command = f"python 07_finetune.py --ckpt={pretrained}"
    assert_user_error(dpo08, capsys, argv, "'pretrain'", command)
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_a_checkpoint_is_called_that(dpo08, capsys, tmp_path):
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    argv = [f"--ckpt={tmp_path / 'notes.pt'}", f"--out_dir={tmp_path / 'out'}", "--device=cpu"]
    assert_user_error(dpo08, capsys, argv, "not a checkpoint of these scripts")
    assert not (tmp_path / "out").exists()


def test_an_existing_checkpoint_is_never_overwritten_unasked(dpo08, capsys, start, tmp_path):
    tmp, ckpt = start
    dpo08.save_checkpoint(tmp_path / "ckpt.pt", {**ckpt, "stage": "dpo"})  # an 08 run's
    earlier = (tmp_path / "ckpt.pt").read_bytes()
    argv = [f"--ckpt={tmp / 'ft.pt'}", f"--out_dir={tmp_path}", "--device=cpu"]
    assert_user_error(dpo08, capsys, argv, "--overwrite", "--out_dir", "--init_from=resume")
    assert (tmp_path / "ckpt.pt").read_bytes() == earlier
    (tmp_path / "ckpt.pt").write_bytes(b"someone else's run")  # no checkpoint: said so, kept
    assert_user_error(dpo08, capsys, argv, "not a checkpoint of these scripts")
    assert (tmp_path / "ckpt.pt").read_bytes() == b"someone else's run"
    cfg = dpo08.DPOConfig(ckpt=str(tmp / "ft.pt"), out_dir=str(tmp_path), overwrite=True)
    assert cfg.overwrite


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])  # 05's (06's) run, or 07's
def test_another_stages_run_in_out_dir_is_refused_offering_only_another_out_dir(
        dpo08, capsys, start, tmp_path, monkeypatch, stage):
    """out_dir holds 05's or 07's run: --init_from=resume would fail (no DPO run to resume) and
    --overwrite would replace a run 08 did not write, so the error offers neither, only another
    --out_dir, which works; nothing is loaded or written first."""
    tmp, ckpt = start
    dpo08.save_checkpoint(tmp_path / "ckpt.pt", {**ckpt, "stage": stage})
    theirs = (tmp_path / "ckpt.pt").read_bytes()
    monkeypatch.setattr(dpo08, "load_models", lambda *a: pytest.fail("loaded the models"))
    argv = run_argv(tmp, tmp_path, max_iters=1)
    err = assert_user_error(dpo08, capsys, argv, "another --out_dir")
    assert "--overwrite" not in err and "--init_from=resume" not in err, err
    assert (tmp_path / "ckpt.pt").read_bytes() == theirs
    assert list(tmp_path.iterdir()) == [tmp_path / "ckpt.pt"]
    run_config(dpo08, tmp, tmp_path / "dpo")  # the fix it names


@pytest.mark.parametrize("init_from", ["scratch", "auto"])  # auto: no ckpt.pt, so scratch
def test_an_earlier_runs_log_is_never_overwritten_unasked(dpo08, capsys, start, tmp_path,
                                                          init_from):
    """A folder with a log.jsonl and no ckpt.pt (a run stopped before its first save, or another
    script's): a new run refuses it, as it refuses a ckpt.pt; --overwrite starts the log afresh."""
    tmp, _ = start
    (tmp_path / "log.jsonl").write_text('{"iter": 7}\n')
    argv = run_argv(tmp, tmp_path, init_from=init_from, max_iters=1, batch_size=2, eval_pairs=2)
    err = assert_user_error(dpo08, capsys, argv, "log.jsonl", "--out_dir")
    assert "--init_from=resume" not in err  # no ckpt.pt to resume: not offered
    assert "--init_from=scratch --overwrite" in err  # what works for auto too
    assert (tmp_path / "log.jsonl").read_text() == '{"iter": 7}\n'
    assert not (tmp_path / "ckpt.pt").exists()
    dpo08.main([*argv, "--init_from=scratch", "--overwrite"])  # the fix it names
    log = [json.loads(line)["iter"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log == [0, 1]


def test_a_resume_with_nothing_left_to_do_says_how_to_train_longer(dpo08, capsys, start,
                                                                   tmp_path):
    """A resume at or past --max_iters (the run's own, or a smaller one given now) trains and
    writes nothing, and says so in one line, naming the flags that go on: exit status 0."""
    tmp, _ = start
    dpo08.main(run_argv(tmp, tmp_path, max_iters=2, batch_size=2, eval_pairs=2))
    saved = (tmp_path / "ckpt.pt").read_bytes()
    log = (tmp_path / "log.jsonl").read_text()
    capsys.readouterr()
    for more in ([], ["--max_iters=1"]):
        result = dpo08.main(["--init_from=resume", f"--out_dir={tmp_path}", *more])
        assert result["iter_num"] == 2 and result["after"] is None
        lines = capsys.readouterr().out.splitlines()
        hint = [line for line in lines if line.startswith("nothing left to do")]
        assert len(hint) == 1, lines
        assert (tmp_path / "ckpt.pt").read_bytes() == saved
        assert (tmp_path / "log.jsonl").read_text() == log
    command = hint[0].split("to train longer: ")[1].removesuffix(")").split()
    assert command[:2] == ["python", "08_dpo.py"] and command[-1] == "--max_iters=4"
    assert dpo08.main(command[2:])["iter_num"] == 4  # the command, as printed, goes on


def test_pairs_that_do_not_fit_the_context_are_a_user_error(dpo08, capsys, start, tmp_path):
    tmp, ckpt = start
    small = tiny_gpt(dpo08, vocab_size=ckpt["model_args"]["vocab_size"], block_size=16)
    small_ckpt = {**ckpt, "model": small.state_dict(), "model_args": dpo08.asdict(small.config)}
    dpo08.save_checkpoint(tmp_path / "small.pt", small_ckpt)
    argv = [f"--ckpt={tmp_path / 'small.pt'}", f"--data_path={tmp / 'pairs.json'}",
            f"--out_dir={tmp_path / 'out'}", "--device=cpu"]
    assert_user_error(dpo08, capsys, argv, "fit the context of 16 tokens", "--batch_size")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, message", [
    ("--beta=0", "beta"), ("--label_smoothing=0.5", "label_smoothing"),
    ("--batch_size=0", "batch_size"), ("--eval_interval=0", "eval_interval"),
    ("--device=tpu", "tpu"), ("--dtype=fp8", "fp8"), ("--eval_pairs=0", "eval_pairs"),
    ("--eval_pairs=-7", "eval_pairs"),
    ("--seed=-1", "seed"), ("--learning_rate=nan", "learning_rate"),
    ("--grad_clip=-1", "grad_clip"), ("--beta=inf", "beta"), ("--learning_rate=inf", "finite"),
])
def test_bad_settings_get_a_clear_error(dpo08, capsys, flag, message):
    name, value = flag[2:].split("=")
    with pytest.raises(ValueError, match=message):
        dpo08.DPOConfig(**{name: type(getattr(dpo08.DPOConfig, name))(value)})
    assert_user_error(dpo08, capsys, [flag], message)


def test_a_data_file_that_is_not_json_says_what_data_path_takes(dpo08, capsys, start, tmp_path):
    """An empty or non-JSON --data_path: the error names the file and what --data_path must
    hold, before a model is loaded."""
    tmp, _ = start
    path = tmp_path / "pairs.json"
    argv = [f"--ckpt={tmp / 'ft.pt'}", f"--data_path={path}", f"--out_dir={tmp_path / 'out'}"]
    for text in ("", "# notes, not JSON"):
        path.write_text(text)
        assert_user_error(dpo08, capsys, argv, f"{path} is not JSON", "--data_path",
                          "JSON list of pairs")
    assert not (tmp_path / "out").exists()


def test_unknown_and_abbreviated_flags_are_errors(dpo08, capsys):
    # 08 starts from 07's checkpoint (--ckpt) or resumes its own run: no OpenAI weights here
    assert_user_error(dpo08, capsys, ["--init_from=gpt2"], "--init_from", "scratch, resume, auto")
    # the checkpoint to read is --ckpt in every script
    assert_user_error(dpo08, capsys, ["--ckpt_path=out/finetune/ckpt.pt"], "--ckpt_path")
    # no abbreviations: --bet is not --beta
    assert_user_error(dpo08, capsys, ["--bet=0.2"], "--bet")


def test_bad_preference_data_gets_a_clear_error(dpo08, capsys, start, tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{"instruction": "a", "input": "", "chosen": "b", "rejected": "c"},
                                {"instruction": "a", "chosen": "b"}]))
    with pytest.raises(ValueError, match="entry 1"):
        dpo08.load_preference_data(path)
    tmp, _ = start
    argv = [f"--ckpt={tmp / 'ft.pt'}", f"--data_path={path}", f"--out_dir={tmp_path / 'out'}"]
    assert_user_error(dpo08, capsys, argv, "entry 1")
    assert not (tmp_path / "out").exists()
    for text in ("", "[" * 100_000):  # empty; deeper than Python's recursion limit
        path.write_text(text)
        assert_user_error(dpo08, capsys, argv, f"{path} is not JSON")
    argv[1] = f"--data_path={tmp_path}"  # a folder
    assert_user_error(dpo08, capsys, argv, f"{tmp_path} is not a file", "--data_path")


def test_a_run_saved_on_a_gpu_in_float16_resumes_on_a_cpu(dpo08, start, tmp_path):
    """The device and the dtype are the resuming machine's: a GPU run's float16, replayed on a
    CPU, would stop the resume (CPU has no fp16 training here)."""
    tmp, _ = start
    settings = dict(max_iters=2, batch_size=2, eval_pairs=2)
    dpo08.main(run_argv(tmp, tmp_path, **settings))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    ckpt["config"].update(device="cuda", dtype="float16")  # as a GPU without bf16 saves it
    ckpt["iter_num"] = 1
    torch.save(ckpt, tmp_path / "ckpt.pt")
    result = dpo08.main(["--init_from=resume", f"--out_dir={tmp_path}"])
    assert result["iter_num"] == 2


def test_a_resume_takes_the_weight_decay_given_now(dpo08, start, tmp_path):
    """Adam's moments come from the checkpoint, the decay from the flag given now (the lr is set
    at every step anyway): load_state_dict alone would keep the saved one."""
    tmp, _ = start
    dpo08.main(run_argv(tmp, tmp_path, max_iters=1, batch_size=2, eval_pairs=2))
    dpo08.main(["--init_from=resume", f"--out_dir={tmp_path}", "--max_iters=2",
                "--weight_decay=0.0"])  # fmt: skip
    groups = torch.load(tmp_path / "ckpt.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.0]


def test_a_save_of_nan_weights_keeps_the_last_good_checkpoint(dpo08, start, tmp_path):
    """A run that diverged (or a Ctrl-C after it) saves through DPORun.save: it must not write NaN
    weights over the last good ckpt.pt (main turns the error into one line)."""
    tmp, _ = start
    settings = dict(max_iters=1, batch_size=2, eval_pairs=2)
    result = dpo08.main(run_argv(tmp, tmp_path, **settings))
    good = (tmp_path / "ckpt.pt").read_bytes()
    cfg = run_config(dpo08, tmp, tmp_path, init_from="resume", **settings)
    policy = result["policy"]
    optimizer = torch.optim.AdamW(policy.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    start_ckpt = {"tokenizer": {"kind": "char", "chars": "ab"}, "config": {},  # 07's, in part
                  "iter_num": 0, "val_loss": None}
    run = dpo08.DPORun(cfg, policy, optimizer, scaler, start_ckpt, None)
    with torch.no_grad():
        policy.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN weights at step 2"):
        run.save(2, 0.5)
    assert (tmp_path / "ckpt.pt").read_bytes() == good


def test_the_end_prints_the_09_command_that_answers_07s_test_split(dpo08, start, tmp_path,
                                                                   capsys):
    tmp, _ = start
    (tmp_path / "ft.pt").write_bytes((tmp / "ft.pt").read_bytes())  # 07's, no test.json beside
    argv = run_argv(tmp, tmp_path / "dpo", ckpt=tmp_path / "ft.pt", max_iters=1, batch_size=2,
                    eval_pairs=2)
    dpo08.main(argv)
    assert "answers for 11's judge" not in capsys.readouterr().out  # it would fail as printed
    (tmp_path / "test.json").write_text("[]")  # 07 writes its test split at a run's end
    dpo08.main([*argv, "--overwrite"])
    line = capsys.readouterr().out.split("answers for 11's judge: ")[1].splitlines()[0]
    command = line.split()
    assert command[:4] == ["python", "09_generate.py", f"--ckpt={tmp_path / 'dpo' / 'ckpt.pt'}",
                           f"--answers={tmp_path / 'test.json'}"]  # beside 07's checkpoint
    gen09 = load_script("09_generate")
    cfg = gen09.parse_config(gen09.GenerateConfig, command[2:])  # flags 09 takes, as printed
    assert cfg.temperature == 0 and cfg.max_new_tokens == 256


def test_a_resume_writes_where_it_read(dpo08, start, tmp_path, monkeypatch):
    """A run moved into the default out_dir, resumed with no --out_dir, goes on there."""
    tmp, _ = start
    monkeypatch.setattr(dpo08, "PROJECT", tmp_path)
    default = tmp_path / dpo08.DPOConfig.out_dir
    dpo08.main(run_argv(tmp, default, max_iters=2, batch_size=2, eval_pairs=2))
    ckpt = torch.load(default / "ckpt.pt", weights_only=False)
    ckpt["config"]["out_dir"] = str(tmp_path / "elsewhere")  # where the run was made
    ckpt["config"]["num_responses"] = 5  # a setting of older versions: left out, not an error
    torch.save(ckpt, default / "ckpt.pt")
    dpo08.main(["--init_from=resume", "--max_iters=3"])
    assert torch.load(default / "ckpt.pt", weights_only=True)["iter_num"] == 3
    assert not (tmp_path / "elsewhere").exists()


def test_a_resume_against_another_reference_is_refused(dpo08, start, tmp_path, capsys):
    """The reference is the model the run began from. 07 run again over --ckpt (other weights,
    another step and val loss), or a resume with another --ckpt, would silently change what the
    policy is measured against: refused in one line that names the way on, the run untouched."""
    tmp, ckpt = start
    reference = tmp_path / "ft.pt"
    shutil.copy(tmp / "ft.pt", reference)
    out_dir = tmp_path / "dpo"
    dpo08.main(run_argv(tmp, out_dir, ckpt=reference, max_iters=2, batch_size=2, eval_pairs=2))
    saved = (out_dir / "ckpt.pt").read_bytes()
    weights = {name: w + 0.01 for name, w in ckpt["model"].items()}
    rerun = {**ckpt, "model": weights, "iter_num": 5, "val_loss": 1.5}  # 07's next run
    dpo08.save_checkpoint(reference, rerun)  # 07 run again over the run's --ckpt
    argv = ["--init_from=resume", f"--out_dir={out_dir}", "--max_iters=4"]
    assert_user_error(dpo08, capsys, argv, str(reference), "--init_from=scratch --overwrite")
    shutil.copy(tmp / "ft.pt", reference)  # restored: the run's own reference again
    dpo08.save_checkpoint(tmp_path / "other.pt", rerun)
    other = [*argv, f"--ckpt={tmp_path / 'other.pt'}"]
    assert_user_error(dpo08, capsys, other, "--init_from=scratch --overwrite")
    assert (out_dir / "ckpt.pt").read_bytes() == saved
    assert dpo08.main(argv)["iter_num"] == 4  # restored, it goes on


def test_a_moved_project_resumes_its_run(dpo08, start, tmp_path, monkeypatch):
    """A --ckpt inside the project is saved relative to it: after the project folder moves (or a
    clone elsewhere goes on), --init_from=resume finds 07's model in its new place and goes on."""
    tmp, _ = start
    old, new = tmp_path.resolve() / "old", tmp_path.resolve() / "new"
    (old / "out" / "finetune").mkdir(parents=True)
    shutil.copy(tmp / "ft.pt", old / "out" / "finetune" / "ckpt.pt")
    monkeypatch.setattr(dpo08, "PROJECT", old)
    settings = dict(ckpt="out/finetune/ckpt.pt", max_iters=2, batch_size=2, eval_pairs=2)
    dpo08.main(run_argv(tmp, "out/dpo", **settings))
    old.rename(new)
    monkeypatch.setattr(dpo08, "PROJECT", new)
    result = dpo08.main(["--init_from=resume", "--out_dir=out/dpo", "--max_iters=3"])
    assert result["iter_num"] == 3
    assert torch.load(new / "out" / "dpo" / "ckpt.pt", weights_only=True)["iter_num"] == 3


def test_overwrite_with_a_resume_is_refused(dpo08, capsys, start, tmp_path):
    """--overwrite starts afresh: beside --init_from=auto (which would resume the run in out_dir)
    or resume it is one error line, the run untouched; a resume of a run begun with --overwrite
    does not take it from the checkpoint."""
    tmp, _ = start
    argv = run_argv(tmp, tmp_path, max_iters=1, batch_size=2, eval_pairs=2)
    dpo08.main([*argv, "--overwrite"])
    saved = (tmp_path / "ckpt.pt").read_bytes()
    for init_from in ("auto", "resume"):
        assert_user_error(dpo08, capsys, [*argv, f"--init_from={init_from}", "--overwrite"],
                          "--overwrite", "--init_from=scratch")
        assert (tmp_path / "ckpt.pt").read_bytes() == saved
    result = dpo08.main(["--init_from=resume", f"--out_dir={tmp_path}", "--max_iters=2"])
    assert result["iter_num"] == 2


@pytest.mark.parametrize("out_dir", ["", ".", "out/.."])
def test_an_out_dir_that_is_the_project_folder_is_refused(dpo08, capsys, start, tmp_path,
                                                          monkeypatch, out_dir):
    """'' or '.' would put ckpt.pt and log.jsonl among the scripts."""
    tmp, _ = start
    project = tmp_path.resolve()  # PROJECT is a resolved path: a bug writes here, not among ours
    monkeypatch.setattr(dpo08, "PROJECT", project)
    argv = [*run_argv(tmp, tmp, max_iters=1), f"--out_dir={out_dir}"]
    assert_user_error(dpo08, capsys, argv, "project", "--out_dir")
    assert list(project.iterdir()) == []
