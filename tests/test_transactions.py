"""Multi-file saves are transactions: an interrupted save leaves the old checkpoint or the new one, never a mix.

A subprocess re-saves a folder and is killed with SIGKILL at one point of the save (after the k-th file, just
before the folder swap, just after it); the folder must then load as exactly the old or exactly the new model,
keep the files that are not part of the checkpoint, and the next save must clear what the killed one left. A save
that fails with an exception leaves nothing behind, and `peft.load_adapter` leaves the model untouched on failure.
"""

from __future__ import annotations

import errno
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import llama
import llama.formats.io as io
import peft
from llama import ModelArgs, Transformer

REPO = Path(__file__).resolve().parents[1]
ARGS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=128)

# The child re-saves `folder` with the model of seed 1 and SIGKILLs itself at `kill_at`: "file:k" after the k-th
# file it writes, "swap" just before the new folder is swapped in, "swapped" just after.
CHILD = textwrap.dedent("""
    import os, signal, sys
    import torch
    import llama, llama.formats.io as io
    folder, fmt, options, kill_at = sys.argv[1], sys.argv[2], eval(sys.argv[3]), sys.argv[4]
    kind, _, k = kill_at.partition(":")
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    written, write, swap = [0], io.atomic_write, io._swap_in

    def counting_write(*args):
        write(*args)
        written[0] += 1
        if kind == "file" and written[0] == int(k):
            die()

    def swap_then_die(stage, target):
        if kind == "swap":
            die()
        swap(stage, target)
        if kind == "swapped":
            die()

    io.atomic_write, io._swap_in = counting_write, swap_then_die
    torch.manual_seed(1)
    llama.save(llama.Transformer(llama.ModelArgs(**{ARGS})), folder, format=fmt, **options)
""").replace("{ARGS}", repr(ARGS))


def model(seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelArgs(**ARGS))


def same_weights(a: Transformer, b: Transformer) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def killed_save(folder: Path, fmt: str, options: dict, kill_at: str) -> None:
    done = subprocess.run([sys.executable, "-c", CHILD, str(folder), fmt, repr(options), kill_at], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]


# (old save, new save, kill points): re-saving a sharded HF folder as a single file (the files of the two saves
# have different names, so a half-done save would mix them), and a 2-shard Meta folder as 1 shard.
SCENARIOS = {
    "hf-sharded-to-single": ("hf", {"max_shard_size": "40KB"}, {"max_shard_size": "5GB"},
                             ["file:1", "file:2", "swap", "swapped"]),
    "meta-2-shards-to-1": ("meta", {"num_shards": 2}, {"num_shards": 1}, ["file:1", "swapped"]),
}
CASES = [(name, kill_at) for name, (*_, points) in SCENARIOS.items() for kill_at in points]


@pytest.mark.parametrize("scenario, kill_at", CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_sigkill_leaves_the_old_or_the_new_checkpoint(tmp_path, scenario, kill_at):
    fmt, old_options, new_options, _ = SCENARIOS[scenario]
    folder = tmp_path / "ckpt"
    old, new = model(0), model(1)
    llama.save(old, folder, format=fmt, **old_options)
    (folder / "tokenizer.model").write_bytes(b"kept")  # not part of the checkpoint: must survive every save
    killed_save(folder, fmt, new_options, kill_at)

    loaded = llama.load(folder)
    expected = new if kill_at == "swapped" else old
    assert same_weights(loaded, expected)
    assert (folder / "tokenizer.model").read_bytes() == b"kept"
    leftovers = list(tmp_path.glob(".ckpt.saving-*"))
    assert leftovers  # a killed process cannot clean up after itself ...
    llama.save(new, folder, format=fmt, **new_options)  # ... the next save into the same place does
    assert not list(tmp_path.glob(".ckpt.saving-*"))
    assert same_weights(llama.load(folder), new) and (folder / "tokenizer.model").read_bytes() == b"kept"


def test_a_failed_save_leaves_no_debris(tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    llama.save(model(0), folder, format="hf", max_shard_size="40KB")
    before = sorted(p.name for p in folder.iterdir())

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        llama.save(model(1), folder, format="hf")
    with pytest.raises(OSError, match="No space left"):
        llama.save(model(1), tmp_path / "new" / "deeper" / "ckpt", format="hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no stage folder, no new parent folders
    assert sorted(p.name for p in folder.iterdir()) == before and same_weights(llama.load(folder), model(0))


def test_sigkill_during_save_adapter_leaves_the_old_adapter(tmp_path):
    base = model(0)
    peft.apply(base, peft.LoraConfig(r=2, target_modules=("wq",)))
    peft.save_adapter(base, tmp_path / "adapter")
    child = textwrap.dedent(f"""
        import os, signal, torch, llama, peft, llama.formats.io as io
        io._swap_in = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
        torch.manual_seed(0)
        m = peft.apply(llama.Transformer(llama.ModelArgs(**{ARGS!r})), peft.LoraConfig(r=2, target_modules=("wq",)))
        torch.nn.init.ones_(m.layers[0].attention.wq.lora_B)
        peft.save_adapter(m, {str(tmp_path / "adapter")!r})
    """)
    done = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    fresh = peft.load_adapter(model(0), tmp_path / "adapter")
    assert torch.count_nonzero(fresh.layers[0].attention.wq.lora_B) == 0  # the old adapter (B = 0), whole
