"""One interface for every method: apply, count, merge, save and load adapters.

    model = llama.Transformer(llama.ModelArgs.from_name("llama-7b"))
    peft.apply(model, peft.LoraConfig(r=8, target_modules=("wq", "wv")))   # freezes the base, attaches in place
    peft.trainable_parameters(model)                                        # 4,194,304
    peft.save_adapter(model, "out/alpaca-lora")                             # adapter.safetensors + adapter.json
    peft.load_adapter(fresh_model, "out/alpaca-lora")                       # re-applies the config, loads weights
    peft.merge(model)                                                       # LoRA / DoRA / Adapter V2 bias+scale

A method is a config dataclass (with a `method` name, checked on its own when built) plus a module with
`validate(model, config) -> plan` (every check of the request against this model, before anything changes),
`attach(model, config, plan) -> parameter names` (no checks left: it only builds) and, where the method can fold
into the weights, `merge(model)` / `unmerge(model)`. A `LoraConfig` with `quantize_base=True` is validated and
attached by `peft.qlora`; merging stays `peft.lora`'s (every LoRA layer, NF4 or not, merges itself).
`apply` records what it attached in `model.peft_state`, which every other function here reads.

On a multimodal model with a text trunk of its own (`llama.MllamaTransformer`) the text-only methods attach to that
trunk (`model.text_model`; parameter names get the prefix `text_model.`), and the visual methods
(`adapter_v2_visual`, `excitor_visual`) attach to the whole model, reading its frozen image encoder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from llama.formats.io import atomic_write_bytes, staged_folder

from . import adapter_v1, adapter_v2, adapter_v2_visual, excitor, excitor_visual, lora, qlora
from .adapter_v1 import AdapterV1Config
from .adapter_v2 import AdapterV2Config
from .adapter_v2_visual import AdapterV2VisualConfig
from .excitor import ExcitorConfig
from .excitor_visual import ExcitorVisualConfig
from .lora_core import LoraConfig
from .targets import check_model, text_trunk
from .visual import is_multimodal

Config = Union[LoraConfig, AdapterV1Config, AdapterV2Config, ExcitorConfig, AdapterV2VisualConfig,
               ExcitorVisualConfig]

# method name -> (config class, module implementing validate and attach [and merge/unmerge])
METHODS = {
    "lora": (LoraConfig, lora),
    "adapter_v1": (AdapterV1Config, adapter_v1),
    "adapter_v2": (AdapterV2Config, adapter_v2),
    "excitor": (ExcitorConfig, excitor),
    "adapter_v2_visual": (AdapterV2VisualConfig, adapter_v2_visual),
    "excitor_visual": (ExcitorVisualConfig, excitor_visual),
}
VISUAL_METHODS = ("adapter_v2_visual", "excitor_visual")  # attach to a whole multimodal model
MERGEABLE = ("lora", "adapter_v2", "adapter_v2_visual")
FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE = "adapter.json", "adapter.safetensors"
# ModelArgs fields that fix the shapes of every adapter parameter
SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden_dim", "vocab_size",
                "tie_word_embeddings")


@dataclass
class PeftState:
    """What `apply` attached: the config and the qualified names of the adapter's parameters."""

    config: Config
    parameter_names: tuple[str, ...]
    merged: bool = False


def _state(model: nn.Module, action: str) -> PeftState:
    state = getattr(model, "peft_state", None)
    if state is None:
        raise ValueError(f"cannot {action}: no adapter is attached to this model; call peft.apply(model, config) "
                         f"or peft.load_adapter(model, path) first")
    return state


def apply(model: nn.Module, config: Config) -> nn.Module:
    """Freeze every base parameter and attach the method described by `config`, in place; return the model.

    The whole request is checked first (the model, and the config against it: targets, layers, ranks, attach points
    still free); a bad one raises and leaves the model untouched."""
    check_model(model)
    if type(config) not in [cls for cls, _ in METHODS.values()]:
        raise TypeError(f"unknown PEFT config {type(config).__name__}; use one of "
                        f"{', '.join(cls.__name__ for cls, _ in METHODS.values())}")
    existing = getattr(model, "peft_state", None)
    if existing is not None:
        raise ValueError(f"this model already has an adapter attached ({existing.config.method}); a method is "
                         f"applied once per model: build a fresh model to apply another (load_adapter changes weights)")
    # LoRA on NF4 base weights (QLoRA) is LoRA's config with quantize_base: its own validate and attach
    method = qlora if isinstance(config, LoraConfig) and config.quantize_base else METHODS[config.method][1]
    if config.method in VISUAL_METHODS:
        if not is_multimodal(model):
            raise TypeError(f"{config.method} needs a multimodal model with an image encoder (e.g. "
                            f"llama.build('llama-3.2-11b-vision')), got a text-only {type(model).__name__}; use "
                            f"{config.method.removesuffix('_visual')} for text-only fine-tuning")
        target, prefix = model, ""
    else:
        target, prefix = text_trunk(model)
    plan = method.validate(target, config)
    names = [prefix + name for name in method.attach(target, config, plan)]
    declared = set(names)
    for name, p in model.named_parameters(remove_duplicate=False):  # freeze the base, train the adapter
        p.requires_grad_(name in declared)
    model.peft_state = PeftState(config, tuple(names))
    return model


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters the attached method declares (for Adapter V2 this includes the unfrozen norm gains)."""
    state = _state(model, "list adapter parameters")
    params = dict(model.named_parameters())
    return {name: params[name] for name in state.parameter_names}


def trainable_parameters(model: nn.Module) -> int:
    """Number of trainable (requires_grad) parameter elements, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge(model: nn.Module) -> nn.Module:
    """Fold the adapter into the base weights (LoRA, DoRA, QLoRA → high precision; Adapter V2's bias and scale)."""
    state = _state(model, "merge")
    method = state.config.method
    if method not in MERGEABLE:
        raise ValueError(f"{method} cannot be merged into the weights: its extra attention terms depend on the "
                         f"input; keep the adapter attached (mergeable methods: {', '.join(MERGEABLE)})")
    if state.merged:
        raise ValueError("the adapter is already merged; call peft.unmerge(model) first")
    METHODS[method][1].merge(model)
    state.merged = True
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge` (exact up to rounding: ~1e-16 relative in float64, lossy in bf16/fp16)."""
    state = _state(model, "unmerge")
    if not state.merged:
        raise ValueError("the adapter is not merged; nothing to unmerge")
    METHODS[state.config.method][1].unmerge(model)
    state.merged = False
    return model


# -- serialisation ------------------------------------------------------------------------------------------------
def config_to_dict(config: Config) -> dict:
    fields = dataclasses.asdict(config)
    return {"method": config.method, **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}}


def config_from_dict(data: dict) -> Config:
    data = dict(data)
    method = data.pop("method", None)
    if method not in METHODS:
        raise ValueError(f"unknown PEFT method {method!r} in the adapter config; known: {', '.join(METHODS)}")
    return METHODS[method][0](**data)


def model_shape(model: nn.Module) -> dict:
    """The text trunk's shape fields (a multimodal model's trunk for visual adapters too)."""
    args = text_trunk(model)[0].args
    return {key: getattr(args, key) for key in SHAPE_FIELDS}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies of the adapter parameters, by qualified name."""
    return {name: p.detach().to("cpu").contiguous().clone() for name, p in adapter_parameters(model).items()}


def save_adapter(model: nn.Module, path: Union[str, os.PathLike]) -> Path:
    """Write the adapter only: `path/adapter.safetensors` and `path/adapter.json` (method, every hyper-parameter,
    the base model's shape). Both are written into a temporary folder that replaces `path` in one rename
    (`llama.formats.io.staged_folder`): an interrupted save leaves the old adapter or the new one, never a mix."""
    state = _state(model, "save an adapter")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"save_adapter needs a folder path (str or pathlib.Path), got {type(path).__name__}")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; pass a folder path for the adapter (it is created if missing)")
    tensors = adapter_state_dict(model)
    meta = {"format_version": FORMAT_VERSION, "config": config_to_dict(state.config), "model": model_shape(model),
            "parameters": {name: list(t.shape) for name, t in tensors.items()}}
    with staged_folder(folder, replaced=lambda name: name in (CONFIG_FILE, WEIGHTS_FILE)) as stage:
        atomic_write_bytes(stage / WEIGHTS_FILE, save_safetensors(tensors, metadata={"method": state.config.method}))
        atomic_write_bytes(stage / CONFIG_FILE, (json.dumps(meta, indent=2) + "\n").encode())
    return folder


def load_adapter(model: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Load an adapter written by `save_adapter`. A bare model gets the saved config applied first; a model that
    already carries an adapter must carry the same method and config (its weights are replaced).

    Transactional: both files are read and checked (format, config, base-model shape, every tensor's name, shape
    and finiteness) before the model is touched, and if attaching or copying still fails the model is restored to
    exactly what it was."""
    check_model(model)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_adapter needs a folder path (str or pathlib.Path), got {type(path).__name__}")
    folder = Path(path)
    config, listed = _read_adapter_config(folder, model)
    tensors = _read_adapter_tensors(folder, listed)
    state = getattr(model, "peft_state", None)
    if state is not None:
        if state.config.method != config.method:
            raise ValueError(f"the adapter at {folder} is {config.method} but the model carries "
                             f"{state.config.method}; load it onto a fresh model")
        if config_to_dict(state.config) != config_to_dict(config):
            raise ValueError(f"the adapter's config {config} differs from the attached one {state.config}; "
                             f"load it onto a fresh model")
        if state.merged:
            raise ValueError("the attached adapter is merged; call peft.unmerge(model) before loading new weights")
    with _restored_on_failure(model):
        if state is None:
            apply(model, config)
        params = adapter_parameters(model)
        if set(tensors) != set(params) or any(tuple(tensors[n].shape) != tuple(p.shape) for n, p in params.items()):
            missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
            shapes = [f"{n}: saved {list(tensors[n].shape)}, model {list(p.shape)}" for n, p in params.items()
                      if n in tensors and tuple(tensors[n].shape) != tuple(p.shape)]
            raise ValueError(f"{folder / WEIGHTS_FILE} does not match the adapter this config attaches: missing "
                             f"{missing[:5]}, unexpected {extra[:5]}, mis-shaped {shapes[:3]}; the files come from "
                             f"different saves: save the adapter again")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name].to(p.dtype))
    return model


def _read_adapter_config(folder: Path, model: nn.Module) -> tuple[Config, dict[str, list[int]]]:
    """(config, {parameter name: shape}) from adapter.json, checked against the base model's shape."""
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_FILE} and {WEIGHTS_FILE}; save one with peft.save_adapter")
    try:
        meta = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{folder / CONFIG_FILE} is not valid JSON ({e}); the file is corrupt or truncated: save "
                         f"the adapter again") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise ValueError(f"{folder / CONFIG_FILE}: unsupported adapter format_version {version!r} (expected "
                         f"{FORMAT_VERSION}); it was not written by peft.save_adapter")
    for key, kind in (("config", dict), ("model", dict), ("parameters", dict)):
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"{folder / CONFIG_FILE} has no {key!r} object; the file is damaged: save the adapter "
                             f"again")
    try:
        config = config_from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{folder / CONFIG_FILE}: its 'config' is not a valid adapter config: {e}") from None
    saved_shape, shape = meta["model"], model_shape(model)
    diff = {k: (saved_shape.get(k), shape[k]) for k in SHAPE_FIELDS if saved_shape.get(k) != shape[k]}
    if diff:
        raise ValueError("the adapter was trained on a model of a different shape: "
                         + ", ".join(f"{k} saved {a} vs model {b}" for k, (a, b) in diff.items())
                         + "; load it onto the same base model")
    return config, meta["parameters"]


def _read_adapter_tensors(folder: Path, listed: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """adapter.safetensors, checked against the names and shapes adapter.json lists and for NaN / inf."""
    path = folder / WEIGHTS_FILE
    try:
        tensors = load_safetensors(path.read_bytes())
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read {path}: the safetensors file is corrupt or truncated ({e}); save the adapter "
                         f"again") from None
    shapes = {name: list(t.shape) for name, t in tensors.items()}
    if shapes != listed:
        differ = sorted(set(shapes) ^ set(listed)) or [n for n in shapes if shapes[n] != listed[n]]
        raise ValueError(f"{path} and {folder / CONFIG_FILE} disagree on the adapter's tensors ({differ[:5]}); the "
                         f"files come from different saves: save the adapter again")
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise ValueError(f"{path}: tensor {name} is {t.dtype}; adapter weights are floating point")
        bad = (~torch.isfinite(t)).nonzero()
        if len(bad):
            raise ValueError(f"{path}: tensor {name} holds {t[tuple(bad[0])].item()} at {bad[0].tolist()} "
                             f"({len(bad)} non-finite values); the training that wrote it diverged")
    return tensors


@contextlib.contextmanager
def _restored_on_failure(model: nn.Module) -> Iterator[None]:
    """Undo an attach if what follows fails. Attaching only rebinds attributes (child modules, attention
    extensions, `peft_state`) and flips requires_grad, never writes into a base tensor, so restoring every
    module's attribute dictionaries and the flags restores the model exactly."""
    saved = {m: {k: dict(v) if k in ("_parameters", "_buffers", "_modules") else v for k, v in vars(m).items()}
             for m in model.modules()}
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        yield
    except BaseException:
        for module, attributes in saved.items():
            vars(module).clear()
            vars(module).update(attributes)
        for p, flag in flags.items():
            p.requires_grad_(flag)
        raise
