"""The whole pipeline end to end, through the scripts' command lines, as a user runs it.

tokenizer (01) -> data (02) -> pretrain (05) -> finetune (07) -> DPO (08) -> generate (09), on tiny
settings. Each stage reads what the stage before it wrote: 05 trains on the token files that 02
prepared, 07 starts from 05's checkpoint, 08 from 07's, and 09 answers 07's test split with 08's
model and samples from it. The last check
ties the chain to the model code: 09's greedy text equals 04's own `generate` on the DPO checkpoint.
"""

import json
import sys

import pytest
import torch
from conftest import load_script, run_with_deadline

pytestmark = pytest.mark.slow


def run(*args: str) -> str:
    """`python <args>` in the repo under a deadline (conftest's run_with_deadline); its stdout."""
    return run_with_deadline([sys.executable, *args], timeout=120)[0]


def test_the_pipeline_through_the_command_lines(tmp_path, shakespeare_path):
    # 1. tokenizer: train a small BPE on Shakespeare, then encode and decode through the CLI
    bpe = tmp_path / "bpe.json"
    run("01_tokenizer.py", f"--train={shakespeare_path}", "--vocab_size=300", f"--out={bpe}")
    line = "To be, or not to be: that is the question."
    encoded = run("01_tokenizer.py", f"--encode={line}", f"--tokenizer={bpe}")
    ids = json.loads(encoded.splitlines()[0])
    assert len(ids) < len(line.encode())  # the merges compress
    decoded = run("01_tokenizer.py", "--decode", *map(str, ids), f"--tokenizer={bpe}")
    assert decoded.rstrip("\n") == line

    # 2. data: 02 cleans and tokenizes the corpus into data_dir/<dataset>-<tokenizer>/, which 05
    # reads
    data = tmp_path / "data"
    run("02_dataloader.py", "--tokenizers=char", f"--text_file={shakespeare_path}",
        "--dataset=tinyshakespeare", f"--data_dir={data}")
    meta = json.loads((data / "tinyshakespeare-char" / "meta.json").read_text())
    assert meta["tokenizer"]["kind"] == "char" and meta["train_tokens"] > 900_000

    # 3. pretrain a tiny char-level GPT on those token files
    pre = tmp_path / "pretrain"
    run("05_pretrain.py", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32",
        "--batch_size=8", "--max_iters=30", "--warmup_iters=5", "--lr_decay_iters=30",
        "--eval_interval=15", "--eval_iters=2", "--max_new_tokens=10", "--threads=1",
        "--dtype=float32", f"--data_dir={data}", f"--out_dir={pre}")

    # 4. finetune it on instructions (few steps; a char model gets its context stretched)
    ft = tmp_path / "finetune"
    run("07_finetune.py", f"--ckpt={pre / 'ckpt.pt'}", f"--out_dir={ft}", "--max_iters=3",
        "--batch_size=2", "--min_block_size=256", "--eval_interval=3", "--threads=1",
        "--dtype=float32")
    test = json.loads((ft / "test.json").read_text())  # the held-out split, for 09 to answer
    assert len(test) >= 100

    # 5. DPO from the finetuned checkpoint
    dpo = tmp_path / "dpo"
    run("08_dpo.py", f"--ckpt={ft / 'ckpt.pt'}", f"--out_dir={dpo}", "--max_iters=2",
        "--batch_size=2", "--eval_interval=2", "--eval_pairs=4", "--threads=1",
        "--dtype=float32")
    assert (dpo / "ckpt.pt").exists()

    # 6. answer 07's test split with the aligned model, beside it, for 11's judge
    run("09_generate.py", f"--ckpt={dpo / 'ckpt.pt'}", f"--answers={ft / 'test.json'}",
        "--max_new_tokens=8", "--batch_size=32", "--temperature=0", "--device=cpu")
    answers = json.loads((dpo / "test_responses.json").read_text())
    assert [{k: a[k] for k in entry} for a, entry in zip(answers, test)] == test
    assert all(isinstance(a["model_response"], str) for a in answers)

    # 7. generate from the aligned model; greedy, so the text is determined by the weights
    prompt = "ROMEO:"
    out = run("09_generate.py", f"--ckpt={dpo / 'ckpt.pt'}", f"--prompt={prompt}",
              "--max_new_tokens=30", "--temperature=0", "--device=cpu")

    # 04's own generate on the same checkpoint must write the same text
    pre05 = load_script("05_pretrain")
    model, tok, ckpt = pre05.load_checkpoint(dpo / "ckpt.pt")
    assert ckpt["stage"] == "dpo"
    idx = torch.tensor([tok.encode(prompt)])
    gpt04 = load_script("04_gpt")
    expected = tok.decode(gpt04.generate(model.eval(), idx, 30, temperature=0.0)[0].tolist())
    assert expected in out, f"09 printed:\n{out}\n04's generate:\n{expected}"
