"""One interface for every method: apply, count, merge, save and load adapters.

    model = llama.Transformer(llama.ModelArgs.from_name("llama-7b"))
    peft.apply(model, peft.LoraConfig(r=8, target_modules=("wq", "wv")))   # freezes the base, attaches in place
    peft.trainable_parameters(model)                                        # 4,194,304
    peft.save_adapter(model, "out/alpaca-lora")                             # adapter.safetensors + adapter.json
    peft.load_adapter(fresh_model, "out/alpaca-lora")                       # re-applies the config, loads weights
    peft.merge(model)                                                       # LoRA / DoRA / Adapter V2 bias+scale

A method is a config dataclass (with a `method` name) plus a module with `attach(model, config) -> parameter names`
and, where the method can fold into the weights, `merge(model)` / `unmerge(model)`. `apply` records what it
attached in `model.peft_state`, which every other function here reads.

On a multimodal model (`llama.vision.MllamaTransformer`) the text-only methods attach to its text trunk
(`model.text_model`; parameter names get the prefix `text_model.`), and the visual methods (`adapter_v2_visual`,
`excitor_visual`) attach to the whole model, reading its frozen image encoder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from . import adapter_v1, adapter_v2, adapter_v2_visual, excitor, excitor_visual, lora
from .adapter_v1 import AdapterV1Config
from .adapter_v2 import AdapterV2Config
from .adapter_v2_visual import AdapterV2VisualConfig
from .excitor import ExcitorConfig
from .excitor_visual import ExcitorVisualConfig
from .lora import LoraConfig
from .targets import check_model, text_trunk
from .visual import is_multimodal

Config = Union[LoraConfig, AdapterV1Config, AdapterV2Config, ExcitorConfig, AdapterV2VisualConfig,
               ExcitorVisualConfig]

# method name -> (config class, module implementing attach [and merge/unmerge])
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
    """Freeze every base parameter and attach the method described by `config`, in place; return the model."""
    check_model(model)
    if type(config) not in [cls for cls, _ in METHODS.values()]:
        raise TypeError(f"unknown PEFT config {type(config).__name__}; use one of "
                        f"{', '.join(cls.__name__ for cls, _ in METHODS.values())}")
    existing = getattr(model, "peft_state", None)
    if existing is not None:
        raise ValueError(f"this model already has an adapter attached ({existing.config.method}); a method is "
                         f"applied once per model: build a fresh model to apply another (load_adapter changes weights)")
    attach = METHODS[config.method][1].attach  # each validates fully before changing the model
    if config.method in VISUAL_METHODS:
        if not is_multimodal(model):
            raise TypeError(f"{config.method} needs a multimodal model with an image encoder (e.g. "
                            f"llama.build('llama-3.2-11b-vision')), got a text-only {type(model).__name__}; use "
                            f"{config.method.removesuffix('_visual')} for text-only fine-tuning")
        names = attach(model, config)
    else:
        trunk, prefix = text_trunk(model)
        names = [prefix + name for name in attach(trunk, config)]
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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies of the adapter parameters, by qualified name."""
    return {name: p.detach().to("cpu").contiguous().clone() for name, p in adapter_parameters(model).items()}


def save_adapter(model: nn.Module, path: Union[str, os.PathLike]) -> Path:
    """Write the adapter only: `path/adapter.safetensors` and `path/adapter.json` (method, every hyper-parameter,
    the base model's shape). Each file is written atomically; the JSON goes last."""
    state = _state(model, "save an adapter")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state_dict(model)
    meta = {"format_version": FORMAT_VERSION, "config": config_to_dict(state.config), "model": model_shape(model),
            "parameters": {name: list(t.shape) for name, t in tensors.items()}}
    atomic_write_bytes(folder / WEIGHTS_FILE, save_safetensors(tensors, metadata={"method": state.config.method}))
    atomic_write_bytes(folder / CONFIG_FILE, (json.dumps(meta, indent=2) + "\n").encode())
    return folder


def load_adapter(model: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Load an adapter written by `save_adapter`. A bare model gets the saved config applied first; a model that
    already carries an adapter must carry the same method and config (its weights are replaced)."""
    check_model(model)
    folder = Path(path)
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_FILE} and {WEIGHTS_FILE}; save one with peft.save_adapter")
    meta = json.loads((folder / CONFIG_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unsupported adapter format_version {meta.get('format_version')!r} (expected "
                         f"{FORMAT_VERSION})")
    config = config_from_dict(meta["config"])
    saved_shape, shape = meta["model"], model_shape(model)
    diff = {k: (saved_shape.get(k), shape[k]) for k in SHAPE_FIELDS if saved_shape.get(k) != shape[k]}
    if diff:
        raise ValueError("the adapter was trained on a model of a different shape: "
                         + ", ".join(f"{k} saved {a} vs model {b}" for k, (a, b) in diff.items())
                         + "; load it onto the same base model")
    state = getattr(model, "peft_state", None)
    if state is None:
        apply(model, config)
        state = model.peft_state
    elif state.config.method != config.method:
        raise ValueError(f"the adapter at {folder} is {config.method} but the model carries {state.config.method}; "
                         f"load it onto a fresh model")
    elif config_to_dict(state.config) != config_to_dict(config):
        raise ValueError(f"the adapter's config {config} differs from the attached one {state.config}; "
                         f"load it onto a fresh model")
    if state.merged:
        raise ValueError("the attached adapter is merged; call peft.unmerge(model) before loading new weights")
    tensors = load_safetensors((folder / WEIGHTS_FILE).read_bytes())
    params = adapter_parameters(model)
    if set(tensors) != set(params):
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise ValueError(f"adapter file does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            if tuple(tensors[name].shape) != tuple(p.shape):
                raise ValueError(f"{name}: saved shape {tuple(tensors[name].shape)} vs model {tuple(p.shape)}")
            p.copy_(tensors[name].to(p.dtype))
    return model
