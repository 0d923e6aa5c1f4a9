"""Low-level checkpoint I/O shared by the Meta and Hugging Face formats: safe reads, atomic writes, key checks.

Safety: weights are read only with `safetensors` or `torch.load(weights_only=True)`, which refuses to unpickle
anything but tensors and plain containers. Atomicity: every file is written to a temporary name in the target
folder, flushed and fsync'ed, then moved over the final name with `os.replace`, so a crash never leaves a
half-written file under a name a loader would read.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import ModelArgs
from ..registry import build


class CheckpointError(ValueError):
    """A checkpoint folder or file cannot be read or written; the message names the problem and the fix."""


# ---------------------------------------------------------------------------------------------------------------
# Reading


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the file is corrupt or truncated: restore it "
                   f"from the original download or re-convert the checkpoint") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}; restore the original file")
    return data


def torch_load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A `.pth`/`.bin` state dict, loaded with weights_only=True and memory-mapped (no copy until tensors are used)."""
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (pre-zip) serialisation cannot be memory-mapped; read it normally
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not zipfile.is_zipfile(path):  # not a torch archive at all: random bytes, or cut before its directory
            raise CheckpointError(f"cannot read {path}: the file is corrupt or truncated (not a PyTorch zip "
                       f"archive); re-download it (Meta folders ship checklist.chk with md5 sums) or "
                       f"re-convert the checkpoint (files saved by torch < 1.6 must be re-saved)") from e
        raise CheckpointError(
            f"{path} contains objects other than tensors, which weights_only=True refuses to unpickle ({e}); "
            f"only load checkpoints you trust, and re-save them as a plain state dict of tensors") from e
    except Exception as e:  # noqa: BLE001  random bytes make the unpickler fail in many ways (IndexError, ...)
        raise CheckpointError(f"cannot read {path}: the file is corrupt or truncated ({type(e).__name__}: "
                   f"{str(e).splitlines()[0] if str(e) else ''}); re-download it (Meta folders ship "
                   f"checklist.chk with md5 sums) or re-convert the checkpoint") from e
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]  # training checkpoints sometimes wrap the weights
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} does not hold a flat dict of tensors (got {type(sd).__name__}); save the "
                   f"model's state_dict() rather than the module or an optimizer state")
    return sd


def iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of one safetensors file, read one tensor at a time."""
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {path}: the safetensors file is corrupt or truncated ({e}); "
                   f"re-download or re-convert it") from e


# ---------------------------------------------------------------------------------------------------------------
# Checking a state dict (Meta names) against the shapes a config implies


LLAMA4_FIELDS = ("moe_args", "nope_layer_interval", "use_qk_norm", "attention_chunk_size", "attn_temperature_tuning")


def require_dense(args: ModelArgs, what: str) -> None:
    """Refuse Llama 4 configurations: their checkpoints fuse wqkv / w1·w3 and hold experts (not handled here)."""
    used = [f for f in LLAMA4_FIELDS if getattr(args, f, None)]
    if used:
        raise CheckpointError(f"{what} uses Llama 4 features ({', '.join(used)}); llama.load / llama.save handle the "
                   f"dense generations (LLaMA 1 to Llama 3.3) only")


def expected_shapes(args) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter of `llama.build(args)` (a Transformer for ModelArgs), built on the meta
    device (allocates nothing)."""
    model = build(args, device="meta")
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_state_dict(sd: dict[str, torch.Tensor], args, *, config_file: str, weights: str,
                     file_name: Callable[[str], str] = lambda name: name, extra_unexpected: tuple = ()) -> None:
    """Raise CheckpointError naming every missing, unexpected and mis-shaped key (in the file's own naming)."""
    expected = expected_shapes(args)
    missing = [file_name(k) for k in expected if k not in sd]
    unexpected = list(extra_unexpected) + [file_name(k) for k in sd if k not in expected]
    misshaped = [f"{file_name(k)}: {list(sd[k].shape)} in the weights, {list(shape)} from {config_file}"
                 for k, shape in expected.items() if k in sd and tuple(sd[k].shape) != shape]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_short_list(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys ({len(misshaped)}): {_short_list(misshaped, 6)}")
    if problems:
        raise CheckpointError(
            f"the weights in {weights} do not match {config_file}: " + "; ".join(problems) + ". Fix: make sure "
            f"{config_file} belongs to these weights (n_layers, n_heads, n_kv_heads, dim, vocab and FFN sizes must "
            f"agree), that no shard is missing, and that adapter weights are merged or saved separately")


def _short_list(items: list[str], n: int = 8) -> str:
    head = ", ".join(items[:n])
    return head + (f", … (+{len(items) - n} more)" if len(items) > n else "")


# ---------------------------------------------------------------------------------------------------------------
# Atomic writing


def fsync_dir(folder: Path) -> None:
    """Persist the directory entries (the renames) themselves; not possible on every platform."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp_path) for a temporary file next to `path`, fsync it, then rename it to `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n",
                                       encoding="utf-8"))


def write_torch(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    # Each tensor must own its storage: torch.save of a view writes the whole underlying storage.
    owned = {k: v.detach().contiguous().clone() if v._base is not None or not v.is_contiguous() else v.detach()
             for k, v in tensors.items()}
    atomic_write(path, lambda tmp: torch.save(owned, tmp))


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: Optional[dict] = None) -> None:
    owned = {k: v.detach().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(owned, str(tmp), metadata=metadata))
