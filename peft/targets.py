"""Where adapters attach: the model's linear layers by Meta name, a MoE layer's routed experts, the top L layers.

Every method in this package attaches through the override points of `llama.model` and nothing else:
  * a `nn.Linear` child (wq wk wv wo w1 w2 w3 output) is replaced by a module with the same call signature;
  * a Llama 4 MoE layer's `experts` module (`llama.moe.Experts`) is replaced by one with the same `one` / `all`;
  * `Attention.extension` is set to an `AttentionExtension` (LLaMA-Adapter, LLaMA-Excitor).
This file names those places, finds them, and checks requests for them; `peft.apply` runs every check before
anything is modified, so a bad request leaves the model untouched.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch
from torch import nn

# Meta's names of the linear layers that may be adapted, in the order they run.
ATTENTION_LINEARS = ("wq", "wk", "wv", "wo")
FFN_LINEARS = ("w1", "w2", "w3")
BLOCK_LINEARS = ATTENTION_LINEARS + FFN_LINEARS  # every linear inside a decoder layer (QLoRA's "all linear layers")
LINEAR_NAMES = BLOCK_LINEARS + ("output",)
# A Llama 4 MoE layer's routed experts: the target name, and its three stacked matrices (gate, down, up)
EXPERT_TARGET = "experts"
EXPERT_MATRICES = ("w1", "w2", "w3")


def check_model(model: nn.Module) -> None:
    """PEFT methods need a `llama.Transformer`-shaped model (`.args`, `.layers[i].attention`, `.output`), or a
    multimodal model whose `text_model` is one."""
    trunk, _ = text_trunk(model)
    if not (hasattr(trunk, "args") and hasattr(trunk, "layers") and hasattr(trunk, "output")):
        raise TypeError(f"expected a llama.Transformer (with .args, .layers and .output), got {type(model).__name__}")


def text_trunk(model: nn.Module) -> tuple[nn.Module, str]:
    """(the text Transformer, its name prefix): a multimodal model's `text_model`, else the model itself."""
    trunk = getattr(model, "text_model", None)
    return (trunk, "text_model.") if isinstance(trunk, nn.Module) else (model, "")


def check_target_names(names: Sequence[str], allowed: Sequence[str] = LINEAR_NAMES) -> tuple[str, ...]:
    """Validate target module names; return them as a tuple in the order given, without duplicates."""
    if isinstance(names, str):
        names = (names,)
    names = tuple(dict.fromkeys(names))
    if not names:
        raise ValueError(f"target_modules is empty; choose at least one of {', '.join(allowed)}")
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(f"unknown target module name(s) {unknown}; valid names are {', '.join(allowed)} "
                         f"(Meta's names: wq wk wv wo attention, w1 gate / w3 up / w2 down of the FFN, output head)")
    return names


def iter_linears(model: nn.Module, names: Sequence[str], layers: Optional[Sequence[int]] = None
                 ) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    """Yield (qualified name, parent module, attribute, child) for every targeted linear layer.

    Matching is by the child's attribute name, so nested blocks (e.g. a shared expert's w1 in a Llama 4 MoE layer)
    are found as well. `layers` restricts block linears to those decoder layers; `output` is never in a layer.
    """
    wanted = set(names)
    keep = None if layers is None else set(layers)
    for index, layer in enumerate(model.layers):
        if keep is not None and index not in keep:
            continue
        for parent_name, parent in layer.named_modules():
            for attr, child in parent.named_children():
                if attr in wanted and attr != "output":
                    prefix = f"layers.{index}." + (f"{parent_name}." if parent_name else "")
                    yield prefix + attr, parent, attr, child
    if "output" in wanted:
        yield "output", model, "output", model.output


def iter_experts(model: nn.Module, layers: Optional[Sequence[int]] = None
                 ) -> Iterator[tuple[str, nn.Module, nn.Module]]:
    """Yield (qualified name, MoE parent, experts module) for every MoE layer's routed experts in `layers`."""
    keep = None if layers is None else set(layers)
    for index, layer in enumerate(model.layers):
        if keep is not None and index not in keep:
            continue
        parent = layer.feed_forward
        child = getattr(parent, EXPERT_TARGET, None)
        if child is not None and all(isinstance(getattr(child, w, None), torch.Tensor) for w in EXPERT_MATRICES):
            yield f"layers.{index}.feed_forward.{EXPERT_TARGET}", parent, child


def check_plain_linears(found: Sequence[tuple[str, nn.Module, str, nn.Module]]) -> None:
    """Every layer about to be replaced is still the model's own bias-free nn.Linear (no adapter attached yet)."""
    for name, _, _, child in found:
        if type(child) is not nn.Linear:
            raise ValueError(f"{name} is a {type(child).__name__}, not a plain nn.Linear: an adapter is already "
                             f"attached there; build a fresh model")
        if child.bias is not None:
            raise ValueError(f"{name} has a bias; adapters here expect bias-free linear layers, as every LLaMA "
                             f"linear layer is")


def check_free_extensions(model: nn.Module, layers: Sequence[int]) -> None:
    """No attention layer in `layers` carries an `AttentionExtension` yet (one per layer)."""
    for i in layers:
        extension = model.layers[i].attention.extension
        if extension is not None:
            raise ValueError(f"layer {i} already has an attention extension ({type(extension).__name__}); "
                             f"build a fresh model")


def top_layers(model: nn.Module, n_adapted: int, what: str) -> list[int]:
    """Indices of the topmost `n_adapted` decoder layers (LLaMA-Adapter §3.1: "the topmost L layers")."""
    n_layers = len(model.layers)
    if not isinstance(n_adapted, int) or isinstance(n_adapted, bool) or n_adapted <= 0:
        raise ValueError(f"{what} must be a positive integer, got {n_adapted!r}")
    if n_adapted > n_layers:
        raise ValueError(f"{what}={n_adapted} but the model has only {n_layers} layers; "
                         f"set {what} to at most {n_layers}")
    return list(range(n_layers - n_adapted, n_layers))


def check_layer_indices(model: nn.Module, layers: Optional[Sequence[int]]) -> Optional[tuple[int, ...]]:
    """Validate an explicit list of decoder-layer indices (None = all layers)."""
    if layers is None:
        return None
    n_layers = len(model.layers)
    bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"layer indices {bad} are out of range for a model with {n_layers} layers; "
                         f"use indices 0 … {n_layers - 1}")
    return tuple(sorted(set(layers)))


def shared_parameter_ids(model: nn.Module) -> set[int]:
    """ids of parameters that appear under more than one name (tied output/tok_embeddings in Llama 3.2 1B/3B)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {pid for pid, count in seen.items() if count > 1}
