"""torchrun + FSDP2 on CPU (gloo): the shipped config runs under two processes as it is, which train like one (QLoRA:
NF4 base buffers replicated, LoRA factors sharded), save a non-empty adapter, and only rank 0 writes; a batch that
does not split is one line of ours before any work."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peft.training.config import load_config
from peft.training.recipe import run

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "scripts" / "train.py")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny pre-trained base (byte tokenizer) for the shipped fine-tuning config to start from."""
    root = tmp_path_factory.mktemp("base")
    run(load_config(None, ["--data.source=corpus", "--data.tokenizer=bytes", "--data.corpus_chars=20000",
                           "--model.dim=32", "--model.n_layers=2", "--model.max_seq_len=48", "--data.seq_len=48",
                           "--train.steps=2", "--train.batch_size=4", "--train.progress=false",
                           f"--train.out_dir={root}"]), quiet=True)
    return root / "final" / "model"


def args(out_dir, base, *extra):
    """configs/sft_lora.toml as shipped (batch_size 16, micro_batch_size unset), shrunk, on QLoRA: the NF4 base
    buffers are replicated and the LoRA factors sharded."""
    return ["--config", str(REPO / "configs" / "sft_lora.toml"), "--out", str(out_dir), f"--model.checkpoint={base}",
            "--data.tokenizer=bytes", "--data.n_train=200", "--data.n_eval=8", "--data.seq_len=48",
            "--eval.n_generate=4", "--train.steps=4", "--train.warmup_steps=1", "--train.save_every=2", "--no-progress",
            "--method.name=qlora", "--method.r=4", "--method.target_modules=['wq', 'wv', 'w2']", *extra]


def launch(cmd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=str(REPO))


def torchrun(n, script_args):
    return launch([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", SCRIPT,
                   *script_args])


def records(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one(tmp_path, base):
    single = launch([sys.executable, SCRIPT, *args(tmp_path / "one", base)])
    assert single.returncode == 0, single.stderr[-3000:]
    multi = torchrun(2, args(tmp_path / "two", base))
    assert multi.returncode == 0, multi.stderr[-3000:]

    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3, 4]  # rank 0 alone logs: no duplicated lines
    for a, b in zip(one, two):  # over a few steps (docs/training.md: what to expect over more)
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
    assert json.loads((tmp_path / "two" / "results.json").read_text())["world_size"] == 2

    # a crash after step 2 (checkpoint 4, final/ and results.json never written), then --resume under FSDP: the same
    # losses, bit for bit
    two_dir = tmp_path / "two"
    shutil.rmtree(two_dir / "checkpoints" / "step-00000004")
    shutil.rmtree(two_dir / "final")
    (two_dir / "results.json").unlink()
    (two_dir / "checkpoints" / "latest").write_text("step-00000002")
    resumed = torchrun(2, ["--resume", str(two_dir)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["loss"] for r in records(two_dir)] == [r["loss"] for r in two]


def test_batch_that_does_not_split_is_one_line_before_any_work(tmp_path, base):
    bad = torchrun(2, args(tmp_path, base, "--train.batch_size=3"))
    assert bad.returncode != 0
    first = bad.stderr.splitlines()[0]
    assert first == ("error: train.batch_size=3 does not split over 2 processes; make it a multiple of 2 (or run 1 "
                     "or 3 processes)"), bad.stderr
    # rank 0 says it; rank 1 stays quiet unless torchrun has not stopped it 10 s later (a loaded machine)
    assert bad.stderr.count("does not split") in (1, 2) and "error (rank 0)" not in bad.stderr
    assert "peft/training" not in bad.stderr and bad.stdout == ""  # no traceback of ours, nothing printed first
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # nothing written
