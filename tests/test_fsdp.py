"""torchrun + FSDP2 on CPU (gloo): two processes train like one (QLoRA: NF4 base buffers replicated, LoRA factors
sharded), save a non-empty adapter, and only rank 0 writes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peft.training import data as D

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "scripts" / "train.py")


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    docs = [e.prompt + " " + e.response for e in D.task_examples("mix", 400)]
    return str(D.builtin_tokenizer(tmp_path_factory.mktemp("tok"), 400, documents=docs).path)


def args(out_dir, tokenizer_path, *extra):
    return [f"--train.out_dir={out_dir}", f"--data.tokenizer={tokenizer_path}", "--data.task=sort",
            "--data.n_train=200", "--data.n_eval=8", "--data.seq_len=48", "--eval.n_generate=4",
            "--model.dim=32", "--model.n_layers=2", "--model.max_seq_len=48", "--train.steps=4",
            "--train.batch_size=4", "--train.micro_batch_size=2", "--train.lr=3e-3", "--train.warmup_steps=1",
            "--train.save_every=2", "--train.progress=false", "--method.name=qlora", "--method.r=4",
            "--method.target_modules=['wq', 'wv', 'w2']", *extra]


def launch(cmd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=str(REPO))


def torchrun(n, script_args):
    return launch([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", SCRIPT,
                   *script_args])


def records(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one(tmp_path, tokenizer_path):
    single = launch([sys.executable, SCRIPT, *args(tmp_path / "one", tokenizer_path)])
    assert single.returncode == 0, single.stderr[-3000:]
    multi = torchrun(2, args(tmp_path / "two", tokenizer_path))
    assert multi.returncode == 0, multi.stderr[-3000:]

    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3, 4]  # rank 0 alone logs: no duplicated lines
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["tokens"] == a["tokens"]  # the same global batch, split over the two ranks
    assert two[-1]["eval_loss"] == pytest.approx(one[-1]["eval_loss"], rel=1e-5)

    # the saved adapter is gathered from both shards: not empty, same tensors as the single-process run
    a = load_file(str(tmp_path / "one" / "final" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "adapter.safetensors"))
    assert a.keys() == b.keys() and len(b) == 2 * 3 * 2  # 2 layers × 3 targets × (A, B)
    for k in a:
        assert b[k].numel() > 0 and b[k].abs().sum() > 0
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    ckpt = load_file(str(tmp_path / "two" / "checkpoints" / "step-00000004" / "trainable.safetensors"))
    assert ckpt.keys() == a.keys()

    # rank 0 alone printed the resolved config and the summary, and wrote files
    assert multi.stdout.count("[train]") == 1 and multi.stdout.count("world_size        2") == 1
    names = sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir())
    assert names == ["latest", "step-00000002", "step-00000004"]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2

    # crash after step 2 (drop checkpoint 4), resume under FSDP: the same losses, bit for bit
    ckpts = tmp_path / "two" / "checkpoints"
    shutil.rmtree(ckpts / "step-00000004")
    (ckpts / "latest").write_text("step-00000002")
    resumed = torchrun(2, args(tmp_path / "two", tokenizer_path, "--train.resume=true"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["loss"] for r in records(tmp_path / "two")] == [r["loss"] for r in two]


def test_world_size_that_does_not_fit(tmp_path, tokenizer_path):
    bad = torchrun(2, args(tmp_path, tokenizer_path, "--train.batch_size=2", "--train.micro_batch_size=2"))
    assert bad.returncode != 0
    assert "does not fit world_size=2 × micro_batch_size=2" in bad.stderr
    assert "make batch_size a multiple of 4" in bad.stderr
