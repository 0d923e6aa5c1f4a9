"""Low-level checkpoint I/O shared by the Meta and Hugging Face formats: safe reads, atomic writes, key checks.

Safety: weights are read only with `safetensors` or `torch.load(weights_only=True)`, which refuses to unpickle
anything but tensors and plain containers. Atomicity, at two levels:
  * a file is written to a temporary name, flushed and fsync'ed, then moved over its final name (`atomic_write`);
  * a checkpoint of several files is written into a temporary sibling folder that replaces the target folder in
    one rename (`staged_folder`), so an interrupted save leaves the old checkpoint or the new one, never a mix of
    the two, and a failed save leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..checks import ConfigError, check_bool, check_int, check_real
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


def check_fields(data: dict, path, *, ints: tuple = (), reals: tuple = (), bools: tuple = (),
                 signed: tuple = ()) -> None:
    """The types of a config file's fields (those present and not null), before any arithmetic on them.

    `ints` must be positive integers (those also in `signed`: any integer), `reals` finite numbers, `bools` true or
    false. Numbers written as strings, NaN / Infinity (Python's json reads both) and "true" in quotes are refused
    with the file and the key named."""
    try:
        for key in ints:
            if data.get(key) is not None:
                check_int(repr(key), data[key], minimum=None if key in signed else 1)
        for key in reals:
            if data.get(key) is not None:
                check_real(repr(key), data[key])
        for key in bools:
            if data.get(key) is not None:
                check_bool(repr(key), data[key])
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}; fix that field of the file") from None


def field_error(path, error: ConfigError, names: Optional[dict] = None) -> CheckpointError:
    """A `ModelArgs` error re-raised with the file and the file's own name for the field (`names`: ours -> its)."""
    names = names or {}
    ours = error.field.rsplit(".", 1)[-1]
    key = names.get(error.field, names.get(ours, ours))
    return CheckpointError(f"{path}: field {key!r}: {error}")


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


LLAMA4_FIELDS = ("moe_args", "nope_layer_interval", "use_qk_norm", "attention_chunk_size", "attn_temperature_tuning",
                 "vision_args")


def require_dense(args: ModelArgs, what: str) -> None:
    """Refuse Llama 4 configurations: their checkpoints fuse wqkv / w1·w3 and hold experts (not handled here)."""
    used = [f for f in LLAMA4_FIELDS if getattr(args, f, None)]
    if used:
        raise CheckpointError(f"{what} uses Llama 4 features ({', '.join(used)}); llama.load / llama.save handle the "
                   f"dense generations (LLaMA 1 to Llama 3.3) only")


def expected_shapes(args) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter of the model `args` describes (`llama.build(args)`), built on the meta
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


def fsync_file(path: Path) -> None:
    """Flush a written file's data to the disk."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(folder: Path) -> None:
    """Persist the directory entries (the renames) themselves; not possible on every platform."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp_path) for a temporary file next to `path`, fsync it, rename it to `path`, fsync the folder.

    The one atomic write of the project: a crash at any moment leaves either the old file or the new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        fsync_file(tmp_path)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


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


# ---------------------------------------------------------------------------------------------------------------
# Multi-file transactions: write a whole folder beside the target, then swap it in


STAGE_MARK = ".saving-"  # temporary sibling folders are named .<target>.saving-<pid>-<random>


@contextlib.contextmanager
def staged_folder(folder: Path, replaced: Callable[[str], bool]) -> Iterator[Path]:
    """Yield an empty temporary folder beside `folder`; on success it becomes `folder`, on failure it disappears.

    Files of an existing `folder` for which `replaced(name)` is False (a tokenizer, a README, a model card) are
    carried into the new folder as hard links before the swap; the rest of the old checkpoint goes with the swap.
    The swap is one `renameat2(RENAME_EXCHANGE)` on Linux (the old and new folders trade places atomically), else
    two renames with the old folder moved aside first. A process killed before the swap leaves the old folder
    untouched; the temporary folder it leaves is removed by the next save into the same place.
    """
    folder = Path(folder).resolve()
    if Path.cwd().resolve().is_relative_to(folder):
        raise CheckpointError(f"{folder} holds the current working directory; a save replaces its folder as a whole, "
                              f"so pass a sub-folder (e.g. {folder / 'checkpoint'})")
    created = _make_parents(folder.parent)
    _remove_abandoned_stages(folder)
    stage = Path(tempfile.mkdtemp(prefix=f".{folder.name}{STAGE_MARK}{os.getpid()}-", dir=folder.parent))
    try:
        yield stage
        if folder.exists():
            _carry_over(folder, stage, replaced)
        fsync_dir(stage)
        _swap_in(stage, folder)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for parent in created:  # the innermost first; only folders this save created, and only if still empty
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise
    shutil.rmtree(stage, ignore_errors=True)  # after an exchange it holds the old checkpoint
    fsync_dir(folder.parent)


def _make_parents(parent: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (innermost first) so a failed save can remove them."""
    missing = [p for p in [parent, *parent.parents] if not p.exists()]
    parent.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_abandoned_stages(folder: Path) -> None:
    """Delete temporary folders that a killed save into `folder` left (their process no longer runs)."""
    prefix = f".{folder.name}{STAGE_MARK}"
    for stale in folder.parent.glob(prefix + "*"):
        pid = stale.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _carry_over(old: Path, new: Path, replaced: Callable[[str], bool]) -> None:
    for entry in old.iterdir():
        if replaced(entry.name) or (new / entry.name).exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, new / entry.name)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _swap_in(stage: Path, folder: Path) -> None:
    """Make `stage` the folder at `folder`; the old folder (if any) ends up at `stage`."""
    if not folder.exists():
        os.rename(stage, folder)
        return
    if _exchange(stage, folder):
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}{STAGE_MARK}{os.getpid()}-", dir=folder.parent))
    aside.rmdir()
    os.rename(folder, aside)  # a crash between these two renames leaves the old checkpoint at `aside`
    os.rename(stage, folder)
    os.rename(aside, stage)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux's renameat2(RENAME_EXCHANGE); False where that is not available."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):  # kernel or file system without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
