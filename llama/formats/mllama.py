"""Llama 3.2 Vision checkpoints: Hugging Face `MllamaForConditionalGeneration` folders <-> `MllamaTransformer`.

`llama.load` / `llama.save` (llama/formats/checkpoint.py) call `read_hf` and `write_hf` here for folders whose
config.json says model_type "mllama" and for `MllamaTransformer` models.

Shapes: V text vocab, C text dim, H / Hkv heads, D head dim, W encoder width, Wc = channels·patch², R tile grids,
        T tiles, N tokens per tile, L self-attention layers, X cross-attention blocks.

Names (ours = Meta's reference module names, `MllamaTransformer.state_dict()` <-> HF hub files, as transformers 5.24
`save_pretrained` writes them; its in-memory prefixes `model.language_model.` / `model.vision_model.` /
`model.multi_modal_projector.` are read too):
    vision_model.vision_encoder.X               vision_model.X' (patch_embed [W, Wc] = patch_embedding [W, C, p, p]
                                                flattened; tables indexed by aspect-ratio id in both, see the encoder)
    vision_model.vision_projection              multi_modal_projector
    text_model.tok_embeddings ++ learnable_embedding   language_model.model.embed_tokens [V + 8, C]
    text_model.layers.i.*                       language_model.model.layers.{i + blocks before i}.* (q/k rows permuted
                                                between Meta's interleaved and HF's half-split RoPE, as for dense Llama)
    cross_attention_layers.k.*                  language_model.model.layers.{s_k + k}.cross_attn* (no RoPE, so no
                                                permutation)
    text_model.norm / output                    language_model.model.norm / language_model.lm_head
HF's `cross_attention_layers` are indices in that merged list: block k sits at s_k + k, where s_k is the
self-attention layer it precedes (Meta's fusion schedule).

`intermediate_layers_indices` are read as Meta's `return_intermediate` (the state *entering* each listed layer), the
meaning the published configs were written for. transformers 5.24 instead takes the state *leaving* the layer, one
layer later than Meta's reference and earlier transformers (its encoder stopped recording the input of each layer);
a transformers 5.24 model with indices i therefore equals ours with i + 1.

Meta's own layout for 3.2 Vision (params.json + consolidated.NN.pth) is not read or written: the tensor names of the
released files (HF's converter expects fused `wqkv`, `inner_attention` norms, (row, col) tile tables) are not
documented in the sources this project follows; load the HF folder instead.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from ..config import ModelArgs
from ..registry import MULTIMODAL_PRESETS
from ..vision.mllama_config import MllamaArgs, MllamaVisionArgs, tile_grids
from .hf import (CONFIG_FILE, PER_LAYER, max_seq_len_from_config, permute_from_hf, permute_to_hf, positions_config,
                 rope_from_config, weight_files, write_safetensors_shards)
from .io import CheckpointError, check_state_dict, iter_safetensors, read_json, torch_load_tensors, write_json
from .meta import match_preset

HF_MODEL_TYPE = "mllama"
ENCODER, LEGACY_PREFIXES = "vision_model.vision_encoder.", {"model.language_model.": "language_model.model.",
                                                          "model.vision_model.": "vision_model.",
                                                          "model.multi_modal_projector.": "multi_modal_projector.",
                                                          "lm_head.": "language_model.lm_head."}

# encoder names, ours -> HF (relative to vision_model.vision_encoder. / vision_model.)
_ENCODER_TOP = {"class_embedding": "class_embedding", "positional_embedding": "gated_positional_embedding.embedding",
                "tile_positional_embedding.weight": "gated_positional_embedding.tile_embedding.weight",
                "positional_embedding_gate": "gated_positional_embedding.gate",
                "pre_tile_pos_embed.embedding.weight": "pre_tile_positional_embedding.embedding.weight",
                "pre_tile_pos_embed.gate": "pre_tile_positional_embedding.gate",
                "post_tile_pos_embed.embedding.weight": "post_tile_positional_embedding.embedding.weight",
                "post_tile_pos_embed.gate": "post_tile_positional_embedding.gate",
                "ln_pre.weight": "layernorm_pre.weight", "ln_pre.bias": "layernorm_pre.bias",
                "ln_post.weight": "layernorm_post.weight", "ln_post.bias": "layernorm_post.bias"}
_ENCODER_LAYER = {"attn.wq.weight": "self_attn.q_proj.weight", "attn.wk.weight": "self_attn.k_proj.weight",
                  "attn.wv.weight": "self_attn.v_proj.weight", "attn.wo.weight": "self_attn.o_proj.weight",
                  "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
                  "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
                  "ln_1.weight": "input_layernorm.weight", "ln_1.bias": "input_layernorm.bias",
                  "ln_2.weight": "post_attention_layernorm.weight", "ln_2.bias": "post_attention_layernorm.bias",
                  "gate_attn": "gate_attn", "gate_ffn": "gate_ffn"}
_CROSS_LAYER = {"attention.wq.weight": "cross_attn.q_proj.weight", "attention.wk.weight": "cross_attn.k_proj.weight",
                "attention.wv.weight": "cross_attn.v_proj.weight", "attention.wo.weight": "cross_attn.o_proj.weight",
                "attention.q_norm.weight": "cross_attn.q_norm.weight",
                "attention.k_norm.weight": "cross_attn.k_norm.weight",
                "attention_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
                "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
                "feed_forward.w2.weight": "mlp.down_proj.weight",
                "gate_attn": "cross_attn_attn_gate", "gate_ffwd": "cross_attn_mlp_gate"}
_SELF_LAYER = {f"{ours}.weight": f"{theirs}.weight" for ours, theirs in PER_LAYER.items()}
_TEXT_TOP = {"text_model.norm.weight": "language_model.model.norm.weight",
             "text_model.output.weight": "language_model.lm_head.weight",
             "vision_model.vision_projection.weight": "multi_modal_projector.weight",
             "vision_model.vision_projection.bias": "multi_modal_projector.bias"}
_EMBED = "language_model.model.embed_tokens.weight"


def is_mllama_folder(folder: Path, fmt: str) -> bool:
    if fmt == "hf":
        return read_json(folder / CONFIG_FILE).get("model_type") == HF_MODEL_TYPE
    params = read_json(folder / "params.json")
    return "vision_chunk_size" in params.get("model", params)


def merged_indices(args: MllamaArgs) -> tuple[list[int], list[int]]:
    """HF layer index of each self-attention layer and of each cross-attention block (one merged list)."""
    schedule = args.fusion_schedule
    cross = [s + k for k, s in enumerate(schedule)]
    self_layers = [i + sum(s <= i for s in schedule) for i in range(args.text.n_layers)]
    return self_layers, cross


# ---------------------------------------------------------------------------------------------------------------
# Names and tensors: ours <-> HF


def hf_key(key: str, args: MllamaArgs) -> str:
    """The HF hub name of one of our parameter names (both embedding tables are parts of `embed_tokens`)."""
    self_idx, cross_idx = merged_indices(args)
    if key in ("text_model.tok_embeddings.weight", "learnable_embedding.weight"):
        return _EMBED
    if key in _TEXT_TOP:
        return _TEXT_TOP[key]
    if key.startswith(ENCODER):
        rest = key[len(ENCODER):]
        if rest == "patch_embed.weight":
            return "vision_model.patch_embedding.weight"
        if m := re.match(r"(transformer|global_transformer)\.resblocks\.(\d+)\.(.+)$", rest):
            return f"vision_model.{m[1]}.layers.{m[2]}.{_ENCODER_LAYER[m[3]]}"
        return f"vision_model.{_ENCODER_TOP[rest]}"
    if m := re.match(r"text_model\.layers\.(\d+)\.(.+)$", key):
        return f"language_model.model.layers.{self_idx[int(m[1])]}.{_SELF_LAYER[m[2]]}"
    m = re.match(r"cross_attention_layers\.(\d+)\.(.+)$", key)
    return f"language_model.model.layers.{cross_idx[int(m[1])]}.{_CROSS_LAYER[m[2]]}"


def to_hf_state_dict(sd: dict[str, torch.Tensor], args: MllamaArgs) -> dict[str, torch.Tensor]:
    """Our state dict -> HF hub names and layouts (embedding tables concatenated, q/k rows permuted)."""
    t, v = args.text, args.vision
    out = {_EMBED: torch.cat([sd["text_model.tok_embeddings.weight"], sd["learnable_embedding.weight"]])}
    for key, w in sd.items():
        name = hf_key(key, args)
        if name == _EMBED:
            continue
        if key.endswith("patch_embed.weight"):
            w = w.reshape(v.dim, v.in_channels, v.patch_size, v.patch_size)  # [W, Wc] -> [W, C, p, p]
        elif key.startswith("text_model.layers.") and key.endswith("attention.wq.weight"):
            w = permute_to_hf(w, t.n_heads)
        elif key.startswith("text_model.layers.") and key.endswith("attention.wk.weight"):
            w = permute_to_hf(w, t.n_kv_heads)
        out[name] = w
    return out


def from_hf_state_dict(hf: dict[str, torch.Tensor], args: MllamaArgs) -> tuple[dict[str, torch.Tensor], list[str]]:
    """HF names -> ours; returns (state dict, HF keys with no counterpart)."""
    t, v = args.text, args.vision
    self_idx, cross_idx = merged_indices(args)
    self_of = {j: i for i, j in enumerate(self_idx)}
    cross_of = {j: k for k, j in enumerate(cross_idx)}
    top = {theirs: ours for ours, theirs in _TEXT_TOP.items()}
    enc_top = {theirs: ours for ours, theirs in _ENCODER_TOP.items()}
    enc_layer, cross_layer = ({b: a for a, b in table.items()} for table in (_ENCODER_LAYER, _CROSS_LAYER))
    self_layer = {b: a for a, b in _SELF_LAYER.items()}
    sd, unknown = {}, []
    for key, w in hf.items():
        key = next((new + key[len(old):] for old, new in LEGACY_PREFIXES.items() if key.startswith(old)), key)
        m_layer = re.match(r"language_model\.model\.layers\.(\d+)\.(.+)$", key)
        m_enc = re.match(r"vision_model\.(transformer|global_transformer)\.layers\.(\d+)\.(.+)$", key)
        if key == _EMBED:
            V = t.vocab_size
            sd["text_model.tok_embeddings.weight"], sd["learnable_embedding.weight"] = w[:V], w[V:]
        elif key in top:
            sd[top[key]] = w
        elif key == "vision_model.patch_embedding.weight":
            sd[ENCODER + "patch_embed.weight"] = w.reshape(w.shape[0], -1)
        elif key.startswith("vision_model.") and key[len("vision_model."):] in enc_top:
            sd[ENCODER + enc_top[key[len("vision_model."):]]] = w
        elif m_enc and m_enc[3] in enc_layer:
            sd[f"{ENCODER}{m_enc[1]}.resblocks.{m_enc[2]}.{enc_layer[m_enc[3]]}"] = w
        elif m_layer and int(m_layer[1]) in self_of and m_layer[2] in self_layer:
            name = self_layer[m_layer[2]]
            if name == "attention.wq.weight":
                w = permute_from_hf(w, t.n_heads)
            elif name == "attention.wk.weight":
                w = permute_from_hf(w, t.n_kv_heads)
            sd[f"text_model.layers.{self_of[int(m_layer[1])]}.{name}"] = w
        elif m_layer and int(m_layer[1]) in cross_of and m_layer[2] in cross_layer:
            sd[f"cross_attention_layers.{cross_of[int(m_layer[1])]}.{cross_layer[m_layer[2]]}"] = w
        else:
            unknown.append(key)
    return sd, unknown


# ---------------------------------------------------------------------------------------------------------------
# config.json <-> MllamaArgs


def args_from_config(config: dict, *, path: Path) -> MllamaArgs:
    try:
        return _args_from_config(config, path)
    except CheckpointError:
        raise
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} describes a Llama 3.2 Vision model MllamaTransformer cannot build: {e}") from e


def _args_from_config(config: dict, path: Path) -> MllamaArgs:
    tc, vc = config.get("text_config") or {}, config.get("vision_config") or {}
    if tc.get("hidden_act", "silu") != "silu" or vc.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{path}: activations {tc.get('hidden_act')}/{vc.get('hidden_act')} are not Llama 3.2 "
                              f"Vision's (SiLU text, GELU vision)")
    if tc.get("tie_word_embeddings"):
        raise CheckpointError(f"{path}: tie_word_embeddings is set, but Llama 3.2 Vision's embedding has 8 more rows "
                              f"than its lm_head; they cannot be tied")
    vision = MllamaVisionArgs(
        image_size=vc.get("image_size", 448), patch_size=vc.get("patch_size", 14), dim=vc.get("hidden_size", 1280),
        n_layers=vc.get("num_hidden_layers", 32), n_global_layers=vc.get("num_global_layers", 8),
        n_heads=vc.get("attention_heads", 16), ffn_hidden_dim=vc.get("intermediate_size", 5120),
        max_num_tiles=vc.get("max_num_tiles", 4), intermediate_layers=tuple(vc.get("intermediate_layers_indices")
                                                                              or (3, 7, 15, 23, 30)),
        norm_eps=vc.get("norm_eps", 1e-5), in_channels=vc.get("num_channels", 3))
    grids = [tuple(g) for g in vc.get("supported_aspect_ratios") or vision.tile_grids]
    if grids != list(tile_grids(vision.max_num_tiles)):
        raise CheckpointError(f"{path}: supported_aspect_ratios {grids} differ from every grid of at most "
                              f"{vision.max_num_tiles} tiles in HF's order {list(vision.tile_grids)}; only that list "
                              f"is supported")
    if vc.get("vision_output_dim", vision.output_dim) != vision.output_dim:
        raise CheckpointError(f"{path}: vision_output_dim {vc['vision_output_dim']} != hidden_size × (1 + "
                              f"{len(vision.intermediate_layers)} intermediate layers) = {vision.output_dim}")
    cross = sorted(tc.get("cross_attention_layers") or [3, 8, 13, 18, 23, 28, 33, 38])
    n_total = tc.get("num_hidden_layers", 40)
    max_pos = tc.get("max_position_embeddings", 131072)
    theta, scaling = rope_from_config(tc, max_pos, path, default_theta=500000.0)
    dim, n_heads = tc.get("hidden_size", 4096), tc.get("num_attention_heads", 32)
    text = ModelArgs(dim=dim, n_layers=n_total - len(cross), n_heads=n_heads,
                     n_kv_heads=tc.get("num_key_value_heads", 8), vocab_size=tc.get("vocab_size", 128256),
                     ffn_hidden_dim=tc.get("intermediate_size", 14336), norm_eps=tc.get("rms_norm_eps", 1e-5),
                     rope_theta=theta, rope_scaling=scaling, max_seq_len=max_seq_len_from_config(tc, scaling, max_pos))
    preset = match_preset(text, compare_context=True)
    if preset is not None:  # the Llama 3.1 trunk: recover Meta's FFN rule
        text = dataclasses.replace(text, multiple_of=preset.multiple_of, ffn_dim_multiplier=preset.ffn_dim_multiplier)
    args = MllamaArgs(text=text, vision=vision, n_cross_attention_layers=len(cross),
                      fusion_schedule=tuple(c - k for k, c in enumerate(cross)),
                      image_token_id=config.get("image_token_index", 128256))
    for name, p in MULTIMODAL_PRESETS.items():
        if isinstance(p.args, MllamaArgs) and _same_shapes(p.args, args):
            args.name = args.text.name = name
    return args


def _same_shapes(a: MllamaArgs, b: MllamaArgs) -> bool:
    fields = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden_dim", "norm_eps", "rope_theta",
              "rope_scaling", "max_seq_len")
    return a.vision == b.vision and a.fusion_schedule == b.fusion_schedule and \
        all(getattr(a.text, f) == getattr(b.text, f) for f in fields)


def config_from_args(args: MllamaArgs, dtype: torch.dtype) -> dict:
    """A config.json that `MllamaForConditionalGeneration.from_pretrained` reads (transformers 5 layout; legacy
    rope fields written too)."""
    t, v = args.text, args.vision
    if args.n_learnable_embeddings != 8:
        raise CheckpointError(f"HF's Mllama has exactly 8 extra embedding rows; this model has "
                              f"{args.n_learnable_embeddings}: save it with torch.save(model.state_dict()) instead")
    scaling = t.rope_scaling.to_hf() if t.rope_scaling is not None else None
    # Llama 3's <|begin_of_text|>, <|end_of_text|>, <|finetune_right_pad_id|>; the pad id is also the embedding's
    # padding_idx in HF, so it must be a row of the table
    special = {"bos_token_id": 128000, "eos_token_id": 128001,
               "pad_token_id": 128004 if 128004 < t.vocab_size else None}
    text_config = {
        "model_type": "mllama_text_model", "vocab_size": t.vocab_size, "hidden_size": t.dim,
        "num_hidden_layers": t.n_layers + len(args.fusion_schedule), "num_attention_heads": t.n_heads,
        "num_key_value_heads": t.n_kv_heads, "intermediate_size": t.ffn_hidden_dim, "hidden_act": "silu",
        "rms_norm_eps": t.norm_eps, **positions_config(t), "tie_word_embeddings": False,
        "cross_attention_layers": merged_indices(args)[1],
        "rope_parameters": {**(scaling or {"rope_type": "default"}), "rope_theta": t.rope_theta},
        "rope_theta": t.rope_theta, "rope_scaling": scaling, **special}
    vision_config = {
        "model_type": "mllama_vision_model", "hidden_size": v.dim, "hidden_act": "gelu",
        "num_hidden_layers": v.n_layers, "num_global_layers": v.n_global_layers, "attention_heads": v.n_heads,
        "num_channels": v.in_channels, "intermediate_size": v.ffn_hidden_dim, "vision_output_dim": v.output_dim,
        "image_size": v.image_size, "patch_size": v.patch_size, "norm_eps": v.norm_eps,
        "max_num_tiles": v.max_num_tiles, "intermediate_layers_indices": list(v.intermediate_layers),
        "supported_aspect_ratios": [list(g) for g in v.tile_grids]}
    return {"architectures": ["MllamaForConditionalGeneration"], "model_type": HF_MODEL_TYPE,
            "image_token_index": args.image_token_id, "text_config": text_config, "vision_config": vision_config,
            "dtype": str(dtype).removeprefix("torch.")}


# ---------------------------------------------------------------------------------------------------------------
# Reading and writing folders


def read_hf(folder: Path) -> tuple[MllamaArgs, dict[str, torch.Tensor]]:
    """(MllamaArgs, our state dict) of an HF MllamaForConditionalGeneration folder; every tensor accounted for."""
    config_path = folder / CONFIG_FILE
    args = args_from_config(read_json(config_path), path=config_path)
    hf, seen = {}, {}
    for path in weight_files(folder):
        pairs = iter_safetensors(path) if path.suffix == ".safetensors" else torch_load_tensors(path).items()
        for key, tensor in pairs:
            if key in seen:
                raise CheckpointError(f"{key} appears in both {seen[key]} and {path.name}; the shards overlap")
            seen[key] = path.name
            hf[key] = tensor
    embed = next((hf[k] for k in (_EMBED, "model.language_model.embed_tokens.weight") if k in hf), None)
    if embed is not None and embed.shape[0] != args.vocab_size:
        raise CheckpointError(f"{config_path}: embed_tokens has {embed.shape[0]} rows but vocab_size + 8 = "
                              f"{args.vocab_size}; the config does not belong to these weights")
    sd, unknown = from_hf_state_dict(hf, args)
    check_state_dict(sd, args, config_file=str(config_path), weights=str(folder),
                     file_name=lambda k: hf_key(k, args), extra_unexpected=tuple(unknown))
    return args, sd


def write_hf(args: MllamaArgs, sd: dict[str, torch.Tensor], folder: Path, max_shard_size: int) -> None:
    """Safetensors shards (with an index above max_shard_size bytes), then config.json."""
    config = config_from_args(args, next(iter(sd.values())).dtype)
    write_safetensors_shards(to_hf_state_dict(sd, args), folder, max_shard_size)
    write_json(folder / CONFIG_FILE, config)
