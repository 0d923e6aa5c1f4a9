"""Arguments and results of reference calls, written to files: tensors to safetensors, the rest to JSON.

Shared by both sides of `tests/reference/isolation.py` (the test process and the reference process); it imports only
the standard library, torch and safetensors, which both sides have.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def dump(obj, folder: Path, name: str) -> None:
    """Write `obj` (tensors, dtypes, paths, numbers, strings, None, and lists/tuples/dicts of those) as
    folder/name.json + folder/name.safetensors."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(x):
        if isinstance(x, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = x.detach().cpu().contiguous().clone()  # safetensors refuses shared or strided storage
            return {"__tensor__": key}
        if isinstance(x, torch.dtype):
            return {"__dtype__": str(x).removeprefix("torch.")}
        if isinstance(x, Path):
            return str(x)
        if isinstance(x, (list, tuple)):
            return [encode(v) for v in x]
        if isinstance(x, dict):
            return {"__dict__": [[encode(k), encode(v)] for k, v in x.items()]}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot pass a {type(x).__name__} to or from a reference process")

    text = json.dumps(encode(obj))
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(text, encoding="utf-8")


def load(folder: Path, name: str):
    """The object `dump` wrote."""
    tensors = load_file(str(folder / f"{name}.safetensors"))

    def decode(x):
        if isinstance(x, list):
            return [decode(v) for v in x]
        if isinstance(x, dict):
            if "__tensor__" in x:
                return tensors[x["__tensor__"]]
            if "__dtype__" in x:
                return getattr(torch, x["__dtype__"])
            return {decode(k): decode(v) for k, v in x["__dict__"]}
        return x

    return decode(json.loads((folder / f"{name}.json").read_text(encoding="utf-8")))
