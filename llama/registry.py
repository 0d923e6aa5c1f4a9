"""`llama.build(name_or_args)`: the module for any preset or args object, text-only or multimodal.

Presets described by `ModelArgs` live in `llama.config.PRESETS` and are built as `llama.Transformer`, or as
`Llama4Multimodal` when they carry Llama 4's `vision_args` (`llama.vision.llama4_model.module_for`). A family with
args of its own (Llama 3.2 Vision: `MllamaArgs`) adds two things here, from its own files:

    register_architecture(MllamaArgs, MllamaTransformer, count_mllama_parameters)   # args type -> module, formula
    register_preset("llama-3.2-11b-vision", args, published=..., source=..., family=...)

`build` then accepts either the preset's name or an args object of any registered type; `all_presets()` is what
`python -m llama.zoo` lists.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from .config import PRESETS, ModelArgs, Preset, count_parameters
from .vision.llama4_model import module_for


@dataclass(frozen=True)
class Architecture:
    """How to build and count the models described by one args type."""

    module: Callable[[Any], nn.Module]  # args -> the model (e.g. Transformer)
    count: Callable[[Any], int]  # closed-form parameter count from the released shapes, independent of the module


# ModelArgs: the text Transformer, or Llama4Multimodal when the args carry Llama 4's vision_args
ARCHITECTURES: dict[type, Architecture] = {ModelArgs: Architecture(module_for, count_parameters)}
MULTIMODAL_PRESETS: dict[str, Preset] = {}


def register_architecture(args_type: type, module: Callable[[Any], nn.Module], count: Callable[[Any], int]) -> None:
    """Make `build(args)` return `module(args)` for every `args` of `args_type`."""
    ARCHITECTURES[args_type] = Architecture(module, count)


def register_preset(name: str, args: Any, *, published: Optional[int], source: str, family: str,
                    exact: bool = True) -> None:
    """Add a named preset whose args are of a registered (non-text) type (`exact`: see `llama.config.Preset`)."""
    if name in PRESETS or name in MULTIMODAL_PRESETS:
        raise ValueError(f"preset {name!r} is already registered")
    MULTIMODAL_PRESETS[name] = Preset(args, published, source, family, exact=exact)


def all_presets() -> dict[str, Preset]:
    """Every preset, text first, then the multimodal ones in registration order."""
    return {**PRESETS, **MULTIMODAL_PRESETS}


def preset_args(name: str) -> Any:
    """The args object of the preset `name` (a ModelArgs for text presets)."""
    presets = all_presets()
    if name not in presets:
        close = difflib.get_close_matches(name, presets, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model name {name!r}{hint} (llama.registry.all_presets() lists every preset)")
    if name in PRESETS:
        return ModelArgs.from_name(name)  # a fresh copy: ModelArgs is mutable
    return copy.deepcopy(presets[name].args)


def architecture(args: Any) -> Architecture:
    if type(args) not in ARCHITECTURES:
        known = ", ".join(t.__name__ for t in ARCHITECTURES)
        raise TypeError(f"llama.build needs a preset name or an args object ({known}), got {type(args).__name__}")
    return ARCHITECTURES[type(args)]


def build(name_or_args: Union[str, Any], *, device: Union[str, torch.device, None] = None,
          dtype: Optional[torch.dtype] = None) -> nn.Module:
    """The model for a preset name or an args object: `Transformer` for text presets, the multimodal module else
    (`Llama4Multimodal` for llama-4-*-vision, `MllamaTransformer` for llama-3.2-*-vision).

    device="meta" builds the structure without allocating memory (for counting parameters); dtype casts the
    floating-point parameters after building.
    """
    args = preset_args(name_or_args) if isinstance(name_or_args, str) else name_or_args
    arch = architecture(args)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = arch.module(args)
    return model.to(dtype) if dtype is not None else model


def count_parameters_of(args: Any) -> int:
    """The closed-form count of any registered args object."""
    return architecture(args).count(args)
