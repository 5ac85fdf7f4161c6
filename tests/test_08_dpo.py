"""Tests for 08_dpo.py: the DPO loss, rewards, masks, log-probs, the frozen reference, a short run.

Expected values are worked out by hand with math.log / math.exp (loss, label smoothing, log-probs,
masks), or come from a reference computation: each sequence scored alone by the model, 07's own
collate_fn for the finetuning format, 05's checkpoint loader for what 09 will load.
"""

import json
import math

import pytest
import torch
from torch.testing import assert_close

LN2 = math.log(2)


def tiny_gpt(dpo08, vocab_size=32, block_size=32, n_embd=16, n_layer=2):
    return dpo08.GPT(dpo08.GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=2,
                                     n_embd=n_embd))


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
    """Padding, masks and the chosen/rejected row order, against a plain per-sequence computation."""
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


def test_pairs_are_formatted_exactly_as_07_finetuned(dpo08, ft07):
    """The chosen sequence is 07's training example with the chosen answer as its output."""
    tok = dpo08.get_tokenizer({"kind": "gpt2"})
    encode, _ = dpo08.text_encoder(tok)
    entries = dpo08.load_preference_data()[:20]
    pairs = dpo08.PreferenceDataset(entries, encode, tok.eot_token)
    for entry, (prompt, chosen, rejected) in zip(entries, pairs):
        for answer, ids in ((entry["chosen"], chosen), (entry["rejected"], rejected)):
            example = ft07.InstructionDataset([{**entry, "output": answer}], encode)[0]
            x07, y07 = ft07.collate_fn([example], pad_token_id=tok.eot_token, mask_prompt=False)
            x, y, mask = dpo08.collate_pairs([(prompt, ids, ids)], pad_token_id=tok.eot_token)
            assert x[0].tolist() == x07[0].tolist() and y[0].tolist() == y07[0].tolist()
            # 07 also learned the "### Response:" header; DPO scores the answer and the end token only
            assert tok.decode(y[0][mask[0]].tolist()) == answer + "<|endoftext|>"
            assert tok.decode(prompt) == dpo08.format_input(entry) + dpo08.RESPONSE_HEADER


def test_dataset_drops_pairs_without_room_for_an_answer(dpo08):
    encode = lambda text: list(range(len(text)))  # noqa: E731 one id per character: lengths are len()
    short = {"instruction": "a", "input": "", "chosen": "bb", "rejected": "c"}
    long = {"instruction": "a", "input": "", "chosen": "b" * 50, "rejected": "c"}
    huge = {"instruction": "a" * 300, "input": "", "chosen": "b", "rejected": "c"}
    prompt = len(dpo08.format_input(short)) + len(dpo08.RESPONSE_HEADER)
    ds = dpo08.PreferenceDataset([short, long, huge], encode, end_id=99, max_length=prompt + 2)
    assert len(ds) == 2 and (ds.n_truncated, ds.n_dropped) == (1, 1)
    assert [(len(p), c[-1], r) for p, c, r in ds][0] == (prompt, 99, [0, 99])


# -----------------------------------------------------------------------------
# the reference model


def test_at_step_zero_the_loss_is_ln2_and_the_margins_are_zero(dpo08):
    policy = tiny_gpt(dpo08)
    reference = dpo08.make_reference(policy)
    batch = dpo08.collate_pairs([([1, 2, 3], [4, 5, 31], [6, 31]), ([7], [9, 31], [10, 11, 12, 31])], 31)
    for average in (False, True):
        losses, chosen, rejected = dpo08.dpo_batch(policy, reference, batch, beta=0.1, average=average)
        assert_close(losses, torch.full((2,), LN2))
        assert_close(chosen, torch.zeros(2))
        assert_close(rejected, torch.zeros(2))
        assert dpo08.pair_metrics(losses, chosen, rejected)["accuracy"] == 0.0  # all ties


def test_reference_is_a_frozen_copy_and_gets_no_gradient(dpo08):
    policy = tiny_gpt(dpo08)
    reference = dpo08.make_reference(policy)
    assert not reference.training and policy.training
    assert all(not p.requires_grad for p in reference.parameters())
    ref_params, pol_params = dict(reference.named_parameters()), dict(policy.named_parameters())
    assert all(ref_params[k].data_ptr() != pol_params[k].data_ptr() for k in ref_params)  # own storage
    assert reference.lm_head.weight is reference.transformer.wte.weight  # still tied, within the copy
    batch = dpo08.collate_pairs([([1, 2], [3, 31], [4, 5, 31])], 31)
    dpo08.dpo_batch(policy, reference, batch)[0].mean().backward()
    assert all(p.grad is None for p in reference.parameters())
    assert policy.lm_head.weight.grad is not None


# -----------------------------------------------------------------------------
# the whole run on a tiny character model


@pytest.fixture(scope="module")
def tiny_run(dpo08, tmp_path_factory, preference_data_path):
    """A tiny char GPT saved as a 07 checkpoint, and a short DPO run on the 48 shortest pairs."""
    tmp = tmp_path_factory.mktemp("dpo")
    data = json.loads(preference_data_path.read_text(encoding="utf-8"))
    length = lambda e: len(dpo08.format_input(e)) + max(len(e["chosen"]), len(e["rejected"]))  # noqa: E731
    data = sorted(data, key=length)[:48]
    (tmp / "pairs.json").write_text(json.dumps(data))
    text = "".join(dpo08.format_input(e) + dpo08.RESPONSE_HEADER + e["chosen"] + e["rejected"] for e in data)
    tok = dpo08.CharTokenizer.from_text(text + "\n")
    torch.manual_seed(0)
    model = tiny_gpt(dpo08, vocab_size=tok.n_vocab, block_size=256, n_embd=32, n_layer=1)
    ckpt = {"model": model.state_dict(), "model_args": dpo08.asdict(model.config), "optimizer": None,
            "config": {}, "iter_num": 0, "best_val_loss": float("inf"), "rng": None,
            "tokenizer": tok.to_dict(), "stage": "finetune"}
    dpo08.save_checkpoint(tmp / "ft.pt", ckpt)
    cfg = dpo08.DPOConfig(ckpt_path=str(tmp / "ft.pt"), out_dir=str(tmp / "dpo"),
                          data_path=str(tmp / "pairs.json"), max_iters=12, learning_rate=3e-3, min_lr=3e-4,
                          warmup_iters=2, beta=0.1,
                          eval_interval=6, log_interval=6, max_new_tokens=4, num_responses=2, device="cpu",
                          dtype="float32", threads=1)
    return dpo08.dpo(cfg), ckpt, cfg


@pytest.mark.slow
def test_a_short_run_raises_the_margin_and_the_accuracy_on_training_pairs(tiny_run):
    result, _, _ = tiny_run
    before, after = result["before"]["train"], result["after"]["train"]
    assert before["loss"] == pytest.approx(LN2) and before["margin"] == 0 and before["accuracy"] == 0
    assert after["margin"] > before["margin"] + 0.1
    assert after["accuracy"] > 0.75
    assert after["loss"] < LN2 - 0.05
    assert after["chosen_reward"] > after["rejected_reward"]


@pytest.mark.slow
def test_the_reference_never_changes(tiny_run):
    result, ckpt, _ = tiny_run
    reference, policy = result["reference"], result["policy"]
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, ckpt["model"][name]), name
    assert not torch.equal(policy.state_dict()["lm_head.weight"], ckpt["model"]["lm_head.weight"])


@pytest.mark.slow
def test_the_run_writes_a_dpo_checkpoint_responses_and_a_log(dpo08, tiny_run):
    result, _, cfg = tiny_run
    out = dpo08.Path(cfg.out_dir)
    model, tok, ckpt = dpo08.load_checkpoint(out / "ckpt.pt")  # what 09 does
    assert ckpt["stage"] == "dpo" and ckpt["iter_num"] == 12 and ckpt["tokenizer"]["kind"] == "char"
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, result["policy"].state_dict()[name]), name
    records = json.loads((out / "dpo_responses.json").read_text(encoding="utf-8"))
    assert len(records) == 2
    assert {"instruction", "input", "chosen", "rejected", "before_dpo", "after_dpo"} <= set(records[0])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [line["iter"] for line in log] == [0, 6, 12]
    assert log[-1]["train_margin"] == pytest.approx(result["after"]["train"]["margin"])


# -----------------------------------------------------------------------------
# command line and errors


def test_help_lists_the_dpo_flags(dpo08, capsys):
    with pytest.raises(SystemExit) as exit_info:
        dpo08.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--beta", "--label_smoothing", "--average_log_probs", "--ckpt_path", "--eval_interval"):
        assert flag in out


def test_a_missing_checkpoint_says_how_to_make_one(dpo08, tmp_path):
    cfg = dpo08.DPOConfig(ckpt_path=str(tmp_path / "none.pt"), device="cpu")
    with pytest.raises(FileNotFoundError, match="07_finetune.py") as error:
        dpo08.dpo(cfg)
    assert "--init_from=gpt2" in str(error.value)


@pytest.mark.parametrize("flag, message", [
    ("--beta=0", "beta"), ("--label_smoothing=0.5", "label_smoothing"), ("--batch_size=0", "batch_size"),
    ("--init_from=gpt3", "init_from"), ("--dtype=fp8", "dtype"), ("--eval_pairs=0", "eval_pairs"),
])
def test_bad_settings_get_a_clear_error(dpo08, capsys, flag, message):
    name, value = flag[2:].split("=")
    with pytest.raises(ValueError, match=message):
        dpo08.DPOConfig(**{name: type(getattr(dpo08.DPOConfig, name))(value)})
    with pytest.raises(SystemExit):  # on the command line: argparse prints the message with the usage
        dpo08.parse_config(dpo08.DPOConfig, [flag])
    assert message in capsys.readouterr().err


def test_bad_preference_data_gets_a_clear_error(dpo08, tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{"instruction": "a", "input": "", "chosen": "b", "rejected": "c"},
                                {"instruction": "a", "chosen": "b"}]))
    with pytest.raises(ValueError, match="entry 1"):
        dpo08.load_preference_data(path)
