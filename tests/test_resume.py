"""Crash-safe checkpoints: SIGKILL a training process (mid-run, and in the middle of writing a checkpoint), resume,
and get bit-for-bit the loss sequence and weights of an uninterrupted run. Plus the resume errors."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peft.training import data as D
from peft.training import checkpointing
from peft.training.config import load_config
from peft.training.recipe import run

REPO = Path(__file__).resolve().parents[1]

# The child process: the same run() the scripts use, one thread (bit-exact on CPU), and a hook that SIGKILLs the
# process itself either after a given step or while it writes the `latest` pointer of a given checkpoint.
DRIVER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads(1)
from peft.training import checkpointing
from peft.training.config import load_config
from peft.training.recipe import run
kill_after = int(os.environ.get("KILL_AFTER_STEP", "0"))
kill_save = os.environ.get("KILL_WRITING_POINTER", "")
if kill_save:
    real = checkpointing.atomic_write_bytes
    def dying(path, data):
        if path.name == "latest" and data.decode() == kill_save:
            os.kill(os.getpid(), signal.SIGKILL)  # the step directory is complete and renamed; the pointer is not
        real(path, data)
    checkpointing.atomic_write_bytes = dying
def hook(step, record):
    if step == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
run(load_config(None, sys.argv[1:]), callbacks=[hook], quiet=True)
"""


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    docs = [e.prompt + " " + e.response for e in D.task_examples("mix", 400)]
    return str(D.builtin_tokenizer(tmp_path_factory.mktemp("tok"), 400, documents=docs).path)


def overrides(out_dir, tokenizer_path, method=(), steps=12):
    return [f"--train.out_dir={out_dir}", f"--data.tokenizer={tokenizer_path}", "--data.source=task",
            "--data.task=sort", "--data.n_train=200", "--data.n_eval=8", "--data.seq_len=48", "--eval.n_generate=0",
            "--model.preset=tiny-llama-2-gqa", "--model.dim=32", "--model.n_layers=2", "--model.max_seq_len=48",
            f"--train.steps={steps}", "--train.batch_size=4", "--train.micro_batch_size=2", "--train.save_every=4",
            "--train.lr=3e-3", "--train.warmup_steps=2", "--train.progress=false", *method]


def launch(args, **env):
    proc = subprocess.run([sys.executable, "-c", DRIVER.format(repo=str(REPO)), *args], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, timeout=300)
    return proc


def losses(out_dir):
    return [json.loads(line)["loss"] for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method, kill", [
    ((), {"KILL_AFTER_STEP": "7"}),  # full fine-tuning, killed between two checkpoints
    # LoRA with dropout (the RNG state matters), adapter-only checkpoints, killed while committing checkpoint 8
    (("--method.name=lora", "--method.r=4", "--method.dropout=0.2"), {"KILL_WRITING_POINTER": "step-00000008"}),
])
def test_sigkill_and_resume_is_bit_exact(tmp_path, tokenizer_path, method, kill):
    ref_dir, dir_ = tmp_path / "uninterrupted", tmp_path / "killed"
    ref = launch(overrides(ref_dir, tokenizer_path, method))
    assert ref.returncode == 0, ref.stderr[-2000:]

    killed = launch(overrides(dir_, tokenizer_path, method), **kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    ckpts = dir_ / "checkpoints"
    assert (ckpts / "latest").read_text() == "step-00000004"  # the previous checkpoint is the committed one
    assert checkpointing.latest(ckpts).name == "step-00000004"
    assert len(losses(dir_)) in (7, 8)  # steps logged after the checkpoint are re-done on resume

    resumed = launch(overrides(dir_, tokenizer_path, method) + ["--train.resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(dir_) == losses(ref_dir)  # bit-exact: float equality of all 12 losses
    assert len(losses(ref_dir)) == 12
    a = load_file(str(ref_dir / "checkpoints" / "step-00000012" / "trainable.safetensors"))
    b = load_file(str(ckpts / "step-00000012" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if method:  # adapter-only checkpoint: only LoRA tensors, none of the frozen base
        assert a and all("lora" in k for k in a)
    metrics_csv = (dir_ / "metrics.csv").read_text().splitlines()
    assert [int(line.split(",")[0]) for line in metrics_csv[1:]] == list(range(1, 13))  # each step exactly once


def test_checkpoint_contents(tmp_path, tokenizer_path):
    cfg = load_config(None, overrides(tmp_path, tokenizer_path, ("--method.name=lora", "--method.r=2"), steps=4))
    out = run(cfg, quiet=True)
    step_dir = tmp_path / "checkpoints" / "step-00000004"
    state = torch.load(step_dir / "state.pt", weights_only=True)
    assert state["step"] == 4 and state["data_position"] == 16
    assert state["optimizer"]["state"] and state["schedule"]["last_epoch"] == 4
    assert set(state["rng"][0]) >= {"torch", "python"}
    tensors = load_file(str(step_dir / "trainable.safetensors"))
    trainable = {n for n, p in out.model.named_parameters() if p.requires_grad}
    assert set(tensors) == trainable and all(t.numel() for t in tensors.values())
    meta = json.loads((step_dir / "meta.json").read_text())
    assert meta["meta"]["method"]["name"] == "lora" and meta["meta"]["model"]["dim"] == 32
    assert not list((tmp_path / "checkpoints").glob(".*tmp*"))


class Stop(Exception):
    """Raised by a callback to end a run after a checkpoint, as a crash would (no final/, no results.json)."""


def crash_after(step):
    def hook(done, record):
        if done == step:
            raise Stop
    return [hook]


def unfinished_run(tmp_path, tokenizer_path, *extra):
    """An 8-step run that stopped during step 5, after its step-4 checkpoint (callbacks run before saving)."""
    with pytest.raises(Stop):
        run(load_config(None, overrides(tmp_path, tokenizer_path, steps=8) + list(extra)), crash_after(5), quiet=True)
    assert checkpointing.latest(tmp_path / "checkpoints").name == "step-00000004"


def test_resume_refuses_changed_settings_and_records_allowed_ones(tmp_path, tokenizer_path):
    unfinished_run(tmp_path, tokenizer_path)
    resume = overrides(tmp_path, tokenizer_path, steps=8) + ["--train.resume=true"]
    # a new learning rate or shape would not continue the recorded run: refused, each change listed, nothing written
    with pytest.raises(ValueError, match=r"differ from its config.toml: model.dim 32 -> 64; train.lr 0.003 -> 0.01"
                                         r"\. A resumed run continues the recorded one"):
        run(load_config(None, resume + ["--train.lr=0.01", "--model.dim=64"]), quiet=True)
    assert not (tmp_path / "resumes.jsonl").exists()
    # bookkeeping keys may change (here the micro-batch size: memory, not the gradient); the resume records them
    out = run(load_config(None, [a for a in resume if "micro_batch" not in a] + ["--train.micro_batch_size=4"]),
              quiet=True)
    record = json.loads((tmp_path / "resumes.jsonl").read_text())
    assert record == {"from_step": 4, "changed": {"train.micro_batch_size": [2, 4]}}
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["resumes"] == [record] and results["steps"] == 8
    # the totals cover the whole run, not only the steps after the resume
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 9))
    assert results["tokens"] == out.result.tokens == sum(r["tokens"] for r in logged)
    # a finished run is never continued or rewritten
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="holds a finished run"):
        run(load_config(None, resume), quiet=True)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_checkpoint_refuses_other_settings_without_config_file(tmp_path, tokenizer_path):
    """The loop's own check (callers of peft.training.train keep no config.toml): every optimisation setting."""
    unfinished_run(tmp_path, tokenizer_path)
    (tmp_path / "config.toml").unlink()
    resume = overrides(tmp_path, tokenizer_path, steps=8) + ["--train.resume=true"]
    with pytest.raises(ValueError, match=r"written with different settings.*lr: checkpoint 0.003 vs now 0.01"):
        run(load_config(None, resume + ["--train.lr=0.01"]), quiet=True)
    with pytest.raises(ValueError, match=r"written with different settings.*method.name: checkpoint 'full' vs now "
                                         r"'lora'"):
        run(load_config(None, resume + ["--method.name=lora"]), quiet=True)
    with pytest.raises(ValueError, match=r"written with different settings.*model.dim: checkpoint 32 vs now 64"):
        run(load_config(None, resume + ["--model.dim=64"]), quiet=True)


def test_resume_without_checkpoint_and_overwrite_are_errors(tmp_path, tokenizer_path):
    with pytest.raises(ValueError, match="holds no checkpoint"):
        run(load_config(None, overrides(tmp_path, tokenizer_path, steps=2) + ["--train.resume=true"]), quiet=True)
    unfinished_run(tmp_path / "a", tokenizer_path)
    with pytest.raises(ValueError, match="already holds checkpoints of an unfinished run; continue it with --resume"):
        run(load_config(None, overrides(tmp_path / "a", tokenizer_path, steps=8)), quiet=True)
    run(load_config(None, overrides(tmp_path / "b", tokenizer_path, steps=2)), quiet=True)
    with pytest.raises(ValueError, match="holds a finished run"):
        run(load_config(None, overrides(tmp_path / "b", tokenizer_path, steps=2)), quiet=True)


def test_dangling_pointer_is_explained(tmp_path):
    (tmp_path / "latest").write_text("step-00000099")
    with pytest.raises(ValueError, match="missing or incomplete"):
        checkpointing.latest(tmp_path)
    assert checkpointing.latest(tmp_path / "nothing") is None
