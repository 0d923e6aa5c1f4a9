"""Llama 4 multimodal checkpoints: the vision encoder, adapter and projector in HF's and Meta's layouts.

`llama/formats/llama4.py` reads and writes the text trunk and calls this module for the rest of a multimodal folder.

In memory (= `Llama4Multimodal.state_dict()`) and in Meta's consolidated.NN.pth files the names are Meta's:
    vision_embeddings.vision_encoder.{conv1._linear.weight, class_embedding, positional_embedding_vlm,
        ln_pre.*, ln_post.*, transformer.resblocks.j.{attn.w{q,k,v,o}.*, mlp.c_fc.*, mlp.c_proj.*, ln_1.*, ln_2.*}}
    vision_embeddings.vision_adapter.mlp.{c_fc,c_proj}.weight,  vision_projection.weight
Hugging Face (`Llama4ForConditionalGeneration`, transformers 5.24; names as in its converter
    `convert_llama4_weights_to_hf.py`): `vision_model.{patch_embedding.linear, class_embedding,
    positional_embedding_vlm, layernorm_pre, layernorm_post, model.layers.j.{self_attn.{q,k,v,o}_proj, mlp.fc1,
    mlp.fc2, input_layernorm, post_attention_layernorm}, vision_adapter.mlp.{fc1,fc2}}`,
    `multi_modal_projector.linear_1.weight`; the same tensors, no permutation (both rotate adjacent pairs).
Meta's model-parallel split (fairscale column-parallel layers split output rows, row-parallel ones input columns;
    the table of HF's converter): patch linear, wq/wk/wv and c_fc (weights and biases), the adapter's c_fc and the
    projector along dim 0; wo, c_proj weights (encoder and adapter) along dim 1; their biases, the LayerNorms and
    the class / position embeddings replicated.
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from ..config import Llama4VisionArgs
from .io import CheckpointError

ENCODER = "vision_embeddings.vision_encoder."
_BLOCK_RE = re.compile(r"^vision_embeddings\.vision_encoder\.transformer\.resblocks\.(\d+)\.(.+)$")
_HF_BLOCK_RE = re.compile(r"^vision_model\.model\.layers\.(\d+)\.(.+)$")

_HF_TOP = {
    ENCODER + "conv1._linear.weight": "vision_model.patch_embedding.linear.weight",
    ENCODER + "class_embedding": "vision_model.class_embedding",
    ENCODER + "positional_embedding_vlm": "vision_model.positional_embedding_vlm",
    ENCODER + "ln_pre.weight": "vision_model.layernorm_pre.weight",
    ENCODER + "ln_pre.bias": "vision_model.layernorm_pre.bias",
    ENCODER + "ln_post.weight": "vision_model.layernorm_post.weight",
    ENCODER + "ln_post.bias": "vision_model.layernorm_post.bias",
    "vision_embeddings.vision_adapter.mlp.c_fc.weight": "vision_model.vision_adapter.mlp.fc1.weight",
    "vision_embeddings.vision_adapter.mlp.c_proj.weight": "vision_model.vision_adapter.mlp.fc2.weight",
    "vision_projection.weight": "multi_modal_projector.linear_1.weight",
}
_HF_BLOCK = {f"{ours}.{p}": f"{hf}.{p}" for ours, hf in (
    ("attn.wq", "self_attn.q_proj"), ("attn.wk", "self_attn.k_proj"), ("attn.wv", "self_attn.v_proj"),
    ("attn.wo", "self_attn.o_proj"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"),
    ("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm")) for p in ("weight", "bias")}
_FROM_HF_TOP = {v: k for k, v in _HF_TOP.items()}
_FROM_HF_BLOCK = {v: k for k, v in _HF_BLOCK.items()}


def is_vision_key(key: str) -> bool:
    """True for the tensors of the vision encoder, adapter and projector (ours = Meta's names)."""
    return key.startswith(("vision_embeddings.", "vision_projection."))


def to_hf(key: str) -> str:
    """Our (Meta's) vision tensor name -> HF's."""
    m = _BLOCK_RE.match(key)
    return f"vision_model.model.layers.{m.group(1)}.{_HF_BLOCK[m.group(2)]}" if m else _HF_TOP[key]


def from_hf(key: str) -> Optional[str]:
    """HF's vision tensor name -> ours (None if it is not one)."""
    m = _HF_BLOCK_RE.match(key)
    if m and m.group(2) in _FROM_HF_BLOCK:
        return f"{ENCODER}transformer.resblocks.{m.group(1)}.{_FROM_HF_BLOCK[m.group(2)]}"
    return _FROM_HF_TOP.get(key)


# Meta's model-parallel split of each vision tensor (None: replicated on every rank).
_SPLIT_BLOCK = {"attn.wq.weight": 0, "attn.wq.bias": 0, "attn.wk.weight": 0, "attn.wk.bias": 0, "attn.wv.weight": 0,
                "attn.wv.bias": 0, "attn.wo.weight": 1, "mlp.c_fc.weight": 0, "mlp.c_fc.bias": 0,
                "mlp.c_proj.weight": 1}
_SPLIT_TOP = {ENCODER + "conv1._linear.weight": 0, "vision_embeddings.vision_adapter.mlp.c_fc.weight": 0,
              "vision_embeddings.vision_adapter.mlp.c_proj.weight": 1, "vision_projection.weight": 0}


def split_dim(key: str) -> Optional[int]:
    m = _BLOCK_RE.match(key)
    return _SPLIT_BLOCK.get(m.group(2)) if m else _SPLIT_TOP.get(key)


def check_splittable(v: Llama4VisionArgs, P: int) -> None:
    sizes = {"vision dim": v.dim, "vision n_heads": v.n_heads, "vision MLP hidden": int(v.mlp_ratio * v.dim),
             "vision output_dim": v.output_dim}
    bad = [f"{k}={n}" for k, n in sizes.items() if n % P]
    if bad:
        raise CheckpointError(f"cannot split the vision encoder into {P} model-parallel shards: {', '.join(bad)} not "
                              f"divisible by {P}; choose num_shards dividing them")


# ---------------------------------------------------------------------------------------------------------------
# configs


def _square(value, what: str, path) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise CheckpointError(f"{path}: {what} {value} is not square; Llama 4 tiles are square")
        return int(value[0])
    if isinstance(value, dict):
        return _square([value.get("height"), value.get("width")], what, path)
    return int(value)


def args_from_hf(config: dict, *, path) -> Llama4VisionArgs:
    """Llama4VisionArgs of a `Llama4Config` (model_type "llama4"): its vision_config and image_token_index."""
    vc = config.get("vision_config")
    if not isinstance(vc, dict) or not vc:
        raise CheckpointError(f"{path} is a Llama4ForConditionalGeneration config without a vision_config; restore "
                              f"the original config.json")
    C, r = vc.get("hidden_size", 768), vc.get("pixel_shuffle_ratio", 0.5)
    F, O = vc.get("intermediate_size", 5632), vc.get("projector_output_dim", 4096)
    problems = []
    if vc.get("hidden_act", "gelu") != "gelu":
        problems.append(f"hidden_act {vc['hidden_act']!r} (the encoder is GELU)")
    if vc.get("num_channels", 3) != 3:
        problems.append(f"num_channels {vc['num_channels']} (the encoder takes RGB)")
    if round(C / r ** 2) != F:  # HF sizes the encoder MLP and the adapter's input with the same field
        problems.append(f"intermediate_size {F} != hidden_size/pixel_shuffle_ratio² = {C / r ** 2:g}")
    if vc.get("projector_input_dim", O) != O or vc.get("vision_output_dim", O) != O:
        problems.append(f"projector_input_dim {vc.get('projector_input_dim')}, projector_output_dim {O} and "
                        f"vision_output_dim {vc.get('vision_output_dim')} differ (the adapter is O -> O -> projector)")
    if problems:
        raise CheckpointError(f"{path}: the vision_config is not one Llama4ForConditionalGeneration can run: "
                              + "; ".join(problems))
    rope = vc.get("rope_parameters") or {}
    try:
        return Llama4VisionArgs(
            image_size=_square(vc.get("image_size", 448), "image_size", path),
            patch_size=_square(vc.get("patch_size", 14), "patch_size", path), dim=C,
            n_layers=vc.get("num_hidden_layers", 34), n_heads=vc.get("num_attention_heads", 16), mlp_ratio=F / C,
            output_dim=O, pixel_shuffle_ratio=r, rope_theta=float(rope.get("rope_theta", vc.get("rope_theta", 1e4))),
            image_token_id=config.get("image_token_index", config.get("image_token_id", 200092)))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its vision_config describes an encoder this project cannot build: {e}") from e


def hf_config(v: Llama4VisionArgs) -> dict:
    """The vision_config of a Llama4Config, in transformers 5.24's field names."""
    if int(v.mlp_ratio * v.dim) != v.dim * v.shuffle_factor ** 2:
        raise CheckpointError(f"HF's Llama4VisionConfig uses one intermediate_size for the encoder MLP "
                              f"({int(v.mlp_ratio * v.dim)}) and the adapter input ({v.dim * v.shuffle_factor ** 2}); "
                              f"they differ here, so save with format='meta' instead")
    return {"model_type": "llama4_vision_model", "hidden_size": v.dim, "num_hidden_layers": v.n_layers,
            "num_attention_heads": v.n_heads, "num_channels": 3, "intermediate_size": int(v.mlp_ratio * v.dim),
            "image_size": v.image_size, "patch_size": v.patch_size, "pixel_shuffle_ratio": v.pixel_shuffle_ratio,
            "projector_input_dim": v.output_dim, "projector_output_dim": v.output_dim,
            "vision_output_dim": v.output_dim, "hidden_act": "gelu", "norm_eps": 1e-5,
            "multi_modal_projector_bias": False, "projector_dropout": 0.0, "attention_dropout": 0.0,
            "rope_parameters": {"rope_type": "default", "rope_theta": v.rope_theta}}


def args_from_params(vision: dict, *, path) -> Llama4VisionArgs:
    """Llama4VisionArgs of Meta's params.json `vision_args` (llama-models `VisionArgs`); `rope_theta` and
    `image_token_id` are this project's own keys (Meta hard-codes 10,000 and takes the id from the tokenizer)."""
    try:
        return Llama4VisionArgs(
            image_size=_square(vision["image_size"], "image_size", path),
            patch_size=_square(vision["patch_size"], "patch_size", path), dim=vision["dim"],
            n_layers=vision["n_layers"], n_heads=vision["n_heads"], mlp_ratio=float(vision["mlp_ratio"]),
            output_dim=vision["output_dim"], pixel_shuffle_ratio=float(vision["pixel_shuffle_ratio"]),
            rope_theta=float(vision.get("rope_theta", 10000.0)), image_token_id=vision.get("image_token_id", 200092))
    except KeyError as e:
        raise CheckpointError(f"{path}: vision_args has no {e.args[0]!r}; it is not Meta's Llama 4 vision_args "
                              f"(image_size, patch_size, dim, n_layers, n_heads, mlp_ratio, output_dim, "
                              f"pixel_shuffle_ratio)") from e
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: vision_args describes an encoder this project cannot build: {e}") from e


def params(v: Llama4VisionArgs) -> dict:
    """Meta's `vision_args` for params.json."""
    return {"image_size": {"height": v.image_size, "width": v.image_size},
            "patch_size": {"height": v.patch_size, "width": v.patch_size}, "dim": v.dim, "n_layers": v.n_layers,
            "n_heads": v.n_heads, "mlp_ratio": v.mlp_ratio, "output_dim": v.output_dim,
            "pixel_shuffle_ratio": v.pixel_shuffle_ratio, "rope_theta": v.rope_theta,
            "image_token_id": v.image_token_id}


def to_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {to_hf(k): w for k, w in sd.items() if is_vision_key(k)}
