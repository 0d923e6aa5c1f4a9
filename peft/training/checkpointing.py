"""Training checkpoints that lose nothing, written so that `kill -9` at any moment leaves a loadable checkpoint.

A checkpoint is a directory `checkpoints/step-NNNNNNNN/` holding

    trainable.safetensors   every trainable parameter: the whole model for full fine-tuning, the adapter otherwise
    state.pt                optimizer state, LR-schedule state, global step, data position, every rank's RNG states,
                            and the run's totals so far (tokens, training time)
    meta.json               what the run was (model shape, method, data size, batch size, seed) and the tensor list

and a pointer file `checkpoints/latest` naming the newest complete one.

Crash safety, step by step: files are written into a hidden temporary directory and each is fsync'ed; the directory
is fsync'ed and renamed to its final name (atomic on POSIX); only then is `latest` replaced (temporary file, fsync,
os.replace, fsync of the parent). A kill before the final replace leaves `latest` pointing at the previous
checkpoint, which is never touched; half-written temporary directories are swept by the next save.

Under FSDP2 the full (unsharded) state is gathered to CPU on every rank with `torch.distributed.checkpoint`'s
state-dict helpers (optimizer state keyed by parameter name, so it reloads under any world size) and rank 0 alone
writes. Loading uses safetensors and `torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from llama.formats.io import atomic_write_bytes, fsync_dir, fsync_file

POINTER = "latest"


def check_writable(out_dir: Path) -> None:
    """Fail early (before any training) when the output directory cannot be created or written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"output directory {out_dir} is not writable ({err.strerror}); choose another "
                         f"train.out_dir (--out) or fix its permissions") from None


# =====================================================================================================================
# Save
# =====================================================================================================================

def _step_dir(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"step-{step:08d}"


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _describe(model: nn.Module) -> dict:
    """Name, shape and trainability of every parameter: the fingerprint a resumed run must match."""
    out = {}
    for n, p in model.named_parameters():
        shape = tuple(p.shape)  # for an FSDP2 DTensor this is the global (unsharded) shape
        out[n] = [list(shape), str(p.dtype).removeprefix("torch."), bool(p.requires_grad)]
    return out


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded, CPU copies of the trainable parameters and of the optimizer state (a collective under FSDP)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    names = set(trainable_names(model))
    model_sd = {k: v.detach().contiguous() for k, v in get_model_state_dict(model, options=options).items()
                if k in names}
    return model_sd, get_optimizer_state_dict(model, optimizer, options=options)


def save(ckpt_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, schedule,
         meta: dict, ctx, keep: int = 2, data_position: int = 0, totals: Optional[dict] = None) -> Optional[Path]:
    """Write checkpoint `step` (all ranks call this; rank 0 writes). Returns its directory on rank 0."""
    model_sd, optim_sd = _full_state(model, optimizer)
    rng = ctx.all_gather(_rng_state())
    final = None
    if ctx.is_main:
        if not model_sd or any(t.numel() == 0 for t in model_sd.values()):
            raise RuntimeError(f"refusing to save an empty checkpoint ({len(model_sd)} trainable tensors); the "
                               f"sharded state was not gathered; gather it before saving")
        ckpt_dir = Path(ckpt_dir)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _sweep_temporaries(ckpt_dir)
        final = _step_dir(ckpt_dir, step)
        tmp = ckpt_dir / f".{final.name}.tmp-{os.getpid()}"
        tmp.mkdir()
        save_file(model_sd, str(tmp / "trainable.safetensors"))
        torch.save({"step": step, "data_position": data_position, "optimizer": optim_sd,
                    "schedule": schedule.state_dict(), "rng": rng, "totals": dict(totals or {})}, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, "meta": meta, "parameters": _describe(model)},
                                                  indent=1, default=str))
        for name in ("trainable.safetensors", "state.pt", "meta.json"):
            fsync_file(tmp / name)
        fsync_dir(tmp)
        if final.exists():  # a leftover of a run killed between this rename and the pointer update; never `latest`
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(ckpt_dir)
        atomic_write_bytes(ckpt_dir / POINTER, final.name.encode())  # the commit point
        _prune(ckpt_dir, keep)
    ctx.barrier()
    return final


def _sweep_temporaries(ckpt_dir: Path) -> None:
    for p in ckpt_dir.glob(".step-*.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def _prune(ckpt_dir: Path, keep: int) -> None:
    current = (ckpt_dir / POINTER).read_text().strip()
    done = sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir())
    for p in done[:-keep] if keep > 0 else []:
        if p.name != current:
            shutil.rmtree(p, ignore_errors=True)


# =====================================================================================================================
# Load
# =====================================================================================================================

def latest(ckpt_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint, or None when there is none."""
    pointer = Path(ckpt_dir) / POINTER
    if not pointer.exists():
        return None
    path = Path(ckpt_dir) / pointer.read_text().strip()
    if not (path / "state.pt").exists():
        raise ValueError(f"{pointer} names {path.name}, which is missing or incomplete; the checkpoint directory was "
                         f"edited by hand: point `latest` at an existing step-* directory or start a fresh run")
    return path


def _check_compatible(path: Path, model: nn.Module, meta: dict) -> None:
    saved = json.loads((path / "meta.json").read_text())
    problems = []
    for key in sorted(set(saved["meta"]) | set(meta)):
        a, b = saved["meta"].get(key), json.loads(json.dumps(meta.get(key), default=str))
        if a != b and isinstance(a, dict) and isinstance(b, dict):  # name the keys that differ, not the whole dict
            problems += [f"{key}.{k}: checkpoint {a.get(k)!r} vs now {b.get(k)!r}"
                         for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            problems.append(f"{key}: checkpoint {a!r} vs now {b!r}")
    now = json.loads(json.dumps(_describe(model)))
    if saved["parameters"] != now:
        missing = sorted(set(saved["parameters"]) ^ set(now))
        differ = [k for k in saved["parameters"] if k in now and saved["parameters"][k] != now[k]]
        problems.append(f"parameters differ (only in one side: {missing[:3]}; different shape/dtype/trainability: "
                        f"{differ[:3]})")
    if problems:
        raise ValueError(f"checkpoint {path} was written with different settings, so resuming would not continue "
                         f"that run: {'; '.join(problems)}; resume with the run's own settings (scripts/train.py "
                         f"--resume DIR reads them from DIR/config.toml) or start a fresh run in another out_dir")


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, schedule, meta: dict, ctx
         ) -> tuple[int, dict]:
    """Restore everything `save` wrote (on every rank); return the global step to continue from and the totals."""
    _check_compatible(path, model, meta)
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    rng = state["rng"]
    if len(rng) != ctx.world_size:
        raise ValueError(f"checkpoint {path} was written by {len(rng)} processes; resume it with the same number "
                         f"(torchrun --nproc_per_node {len(rng)}) so every rank's random state is restored")
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, load_file(str(path / "trainable.safetensors")), options=options)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
    schedule.load_state_dict(state["schedule"])
    _set_rng_state(rng[ctx.rank])
    return int(state["step"]), dict(state.get("totals", {}))
