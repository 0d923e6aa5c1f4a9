"""Llama 4 checkpoints: Hugging Face `Llama4ForCausalLM` / `Llama4ForConditionalGeneration` and Meta's Llama 4 layout.

`llama.load` / `llama.save` (llama/formats/checkpoint.py) call `read_hf`, `read_meta`, `write_hf`, `write_meta` here when
the folder or the model is a Llama 4 one; everything else (detection, building the model, atomic writes, stale
files) stays in the shared code.

Shapes: V vocab, C model dim, H / Hkv heads, D head dim, E experts, F expert hidden size, P model-parallel ranks.

In memory (= `Transformer.state_dict()`): Meta's module names with unfused tensors:
    layers.i.attention.{wq,wk,wv,wo}.weight, layers.i.attention_norm.weight, layers.i.ffn_norm.weight
    dense layers: layers.i.feed_forward.{w1,w2,w3}.weight
    MoE layers:   layers.i.feed_forward.router.weight [E, C]
                  layers.i.feed_forward.experts.{w1,w3} [E, C, F], .experts.w2 [E, F, C]
                  layers.i.feed_forward.shared_expert.{w1,w2,w3}.weight
Hugging Face (transformers 5.24 `modeling_llama4.py`): the same tensors under HF names, with the experts' gate
    and up matrices fused into `experts.gate_up_proj` [E, C, 2F] = [w1 | w3] on the last axis. q/k rows are NOT
    permuted: HF Llama 4 keeps Meta's interleaved (complex) RoPE. Multimodal folders (`Llama4ForConditionalGeneration`,
    model_type "llama4") keep the text model under `language_model.` and the vision encoder, adapter and projector
    beside it; those are read and written by `llama/formats/llama4_vision.py` into a `Llama4Multimodal`.
Meta (taken from llama-models' load hooks and HF's converter, not checked against a real download because
    none is available offline): per rank, `attention.wqkv.weight` = [wq_r; wk_r; wv_r] and dense
    `feed_forward.mlp.fc1_weight` = [w1_r; w3_r]; experts flattened, `moe_w_in_eD_F` [E·C, F/P] (w1),
    `moe_w_swiglu_eD_F` (w3), `moe_w_out_eF_D` [E·F/P, C] (w2); router transposed (`router_DE` [C, E]); norms renamed
    (`attention.wqkv.layer_norm_weight`, `feed_forward.norm.weight` in MoE layers,
    `feed_forward.mlp.layer_norm_weight` in dense layers). What those sources do not pin down, and this module therefore
    does not handle: KV heads repeated across ranks when P > Hkv (refused), and quantized (fp8 / int4) Meta
    checkpoints. Vision tensors keep their Meta names in memory (`llama4_vision.py` has their split dimensions).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Optional

import torch

from ..config import PRESETS, ModelArgs, MoEArgs, RopeScaling, ffn_hidden_size, moe_hidden_size
from . import llama4_vision as vision
from .hf import (CONFIG_BOOLS, CONFIG_INTS, CONFIG_REALS, max_seq_len_from_config, positions_config, rope_from_config,
                 weight_files, write_safetensors_shards)
from .io import (LLAMA4_FIELDS, CheckpointError, check_fields, check_state_dict, iter_safetensors, read_json,
                 torch_load_tensors, write_json, write_torch)
from .meta import PARAMS_INTS, PARAMS_REALS, shard_paths  # shared with the dense reader

# Llama 4's own numeric fields (checked for their type before anything reads them).
HF_INTS = CONFIG_INTS + ("num_local_experts", "num_experts_per_tok", "interleave_moe_layer_step",
                         "intermediate_size_mlp", "attention_chunk_size", "no_rope_layer_interval")
HF_REALS = CONFIG_REALS + ("floor_scale", "attn_scale", "router_aux_loss_coef")
HF_BOOLS = CONFIG_BOOLS + ("use_qk_norm", "attn_temperature_tuning")
PARAMS_L4_INTS = PARAMS_INTS + ("nope_layer_interval", "attention_chunk_size")
PARAMS_L4_REALS = PARAMS_REALS + ("ffn_exp", "floor_scale", "attn_scale")
HF_MODEL_TYPES = ("llama4_text", "llama4")


def uses_llama4(args: ModelArgs) -> bool:
    """True if `args` needs this module's formats (any Llama 4 feature switched on)."""
    return any(getattr(args, f) for f in LLAMA4_FIELDS)


def is_llama4_folder(folder: Path, fmt: str) -> bool:
    """A Llama 4 config.json (model_type llama4 / llama4_text) or params.json (moe_args, NoPE, ...)."""
    if fmt == "hf":
        return read_json(folder / "config.json").get("model_type") in HF_MODEL_TYPES
    params = read_json(folder / "params.json")
    return any(k in params.get("model", params) for k in LLAMA4_FIELDS)


def read(folder: Path, fmt: str, *, max_seq_len: Optional[int] = None) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """(ModelArgs, our state dict) of a Llama 4 folder in format 'hf' or 'meta' (called by `llama.load`)."""
    args, sd = read_meta(folder, max_seq_len=max_seq_len) if fmt == "meta" else read_hf(folder)
    if max_seq_len is not None:
        args.max_seq_len = max_seq_len
    return args, sd


# ---------------------------------------------------------------------------------------------------------------
# Names: ours <-> HF (per layer, relative to `layers.{i}.` / `model.layers.{i}.`)

_HF_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_HF_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
    "attention_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "feed_forward.gate_proj.weight", "feed_forward.w3.weight": "feed_forward.up_proj.weight",
    "feed_forward.w2.weight": "feed_forward.down_proj.weight",
    "feed_forward.router.weight": "feed_forward.router.weight",
    "feed_forward.experts.w2": "feed_forward.experts.down_proj",
    "feed_forward.shared_expert.w1.weight": "feed_forward.shared_expert.gate_proj.weight",
    "feed_forward.shared_expert.w3.weight": "feed_forward.shared_expert.up_proj.weight",
    "feed_forward.shared_expert.w2.weight": "feed_forward.shared_expert.down_proj.weight",
}
_HF_FUSED = "feed_forward.experts.gate_up_proj"  # [E, C, 2F] = [experts.w1 | experts.w3]
_OURS_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_FROM_HF_LAYER = {v: k for k, v in _HF_LAYER.items()}
_FROM_HF_TOP = {v: k for k, v in _HF_TOP.items()}


def to_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> `Llama4ForCausalLM` names (experts' w1 and w3 fused)."""
    out = {}
    for key, w in sd.items():
        if key in _HF_TOP:
            out[_HF_TOP[key]] = w
            continue
        i, rest = _OURS_LAYER_RE.match(key).groups()
        if rest == "feed_forward.experts.w1":
            out[f"model.layers.{i}.{_HF_FUSED}"] = torch.cat([w, sd[f"layers.{i}.feed_forward.experts.w3"]], dim=-1)
        elif rest != "feed_forward.experts.w3":
            out[f"model.layers.{i}.{_HF_LAYER[rest]}"] = w
    return out


def from_hf_state_dict(hf: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """`Llama4ForCausalLM` names -> ours; returns (state dict, HF keys with no counterpart)."""
    sd, unknown = {}, []
    for key, w in hf.items():
        m = _HF_LAYER_RE.match(key)
        if key in _FROM_HF_TOP:
            sd[_FROM_HF_TOP[key]] = w
        elif m and m.group(2) == _HF_FUSED:
            w1, w3 = w.chunk(2, dim=-1)  # [E, C, F] each
            sd[f"layers.{m.group(1)}.feed_forward.experts.w1"] = w1
            sd[f"layers.{m.group(1)}.feed_forward.experts.w3"] = w3
        elif m and m.group(2) in _FROM_HF_LAYER:
            sd[f"layers.{m.group(1)}.{_FROM_HF_LAYER[m.group(2)]}"] = w
        else:
            unknown.append(key)
    return sd, unknown


# ---------------------------------------------------------------------------------------------------------------
# config.json <-> ModelArgs


def _interval_of(flags: list, n_layers: int, what: str, path) -> Optional[int]:
    """The n with flags[i] == ((i+1) % n == 0) for every layer, None if no layer is flagged."""
    flags = [bool(f) for f in flags[:n_layers]]
    if not any(flags):
        return None
    n = flags.index(True) + 1
    if flags != [(i + 1) % n == 0 for i in range(n_layers)]:
        raise CheckpointError(f"{path}: {what} {flags} is not one layer in every n; this Transformer derives the "
                   f"pattern from an interval (Meta's nope_layer_interval / interleave_moe_layer_step)")
    return n


def _require_shared_expert(args: ModelArgs) -> None:
    if args.moe_args is not None and not args.moe_args.shared_expert:
        raise CheckpointError("this MoE has no shared expert (an ablation variant); neither HF's nor Meta's Llama 4 "
                   "format can hold it: save it with torch.save(model.state_dict()) instead")


def _config_error(path, e: Exception) -> CheckpointError:
    return CheckpointError(f"{path} describes a Llama 4 model this Transformer cannot build: {e}")


def args_from_hf_config(config: dict, *, path) -> tuple[ModelArgs, str]:
    """(ModelArgs, weight-name prefix) of a Llama4ForCausalLM or Llama4ForConditionalGeneration config.json."""
    try:
        return _args_from_hf_config(config, path)
    except (TypeError, ValueError, KeyError) as e:
        raise e if isinstance(e, CheckpointError) else _config_error(path, e) from e


def _args_from_hf_config(config: dict, path) -> tuple[ModelArgs, str]:
    prefix, vision_args = "", None
    if config.get("model_type") == "llama4":  # multimodal: the text trunk lives in text_config / language_model.
        vision_args = vision.args_from_hf(config, path=path)
        config, prefix = config.get("text_config") or {}, "language_model."
    check_fields(config, path, ints=HF_INTS, reals=HF_REALS, bools=HF_BOOLS)
    if config.get("attention_bias") or config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{path}: attention biases or a non-SiLU activation are not Llama 4; cannot load")
    L = config.get("num_hidden_layers", 48)
    no_rope = config.get("no_rope_layers") or [int((i + 1) % config.get("no_rope_layer_interval", 4) != 0)
                                    for i in range(L)]
    step = config.get("interleave_moe_layer_step", 1)
    moe_layers = config.get("moe_layers")
    if moe_layers is not None:  # an explicit list overrides the step in HF
        step = _interval_of([i in moe_layers for i in range(L)], L, "moe_layers", path)
    theta, scaling = rope_from_config(config, config.get("max_position_embeddings", 131072), path,
                           default_theta=500000.0)
    moe = None if step is None else MoEArgs(
        num_experts=config.get("num_local_experts", 16), top_k=config.get("num_experts_per_tok", 1),
        interleave_moe_layer_step=step, load_balance_coef=config.get("router_aux_loss_coef", 1e-3))
    dim, n_heads = config.get("hidden_size", 5120), config.get("num_attention_heads", 40)
    head_dim = config.get("head_dim")
    args = ModelArgs(
        dim=dim, n_layers=L, n_heads=n_heads, n_kv_heads=config.get("num_key_value_heads", 8),
        head_dim=None if head_dim in (None, dim // n_heads) else head_dim, vocab_size=config.get("vocab_size", 202048),
        norm_eps=config.get("rms_norm_eps", 1e-5), rope_theta=theta, rope_scaling=scaling,
        max_seq_len=max_seq_len_from_config(config, scaling, default=131072),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        ffn_hidden_dim=config.get("intermediate_size_mlp", 16384), moe_hidden_dim=config.get("intermediate_size", 8192),
        nope_layer_interval=_interval_of([not r for r in no_rope], L, "no_rope_layers", path),
        attention_chunk_size=config.get("attention_chunk_size"), use_qk_norm=bool(config.get("use_qk_norm", True)),
        attn_temperature_tuning=bool(config.get("attn_temperature_tuning", True)),
        floor_scale=float(config.get("floor_scale", 8192)), attn_scale=float(config.get("attn_scale", 0.1)),
        moe_args=moe, rope_complex64=True, vision_args=vision_args)
    return _with_preset_rule(args), prefix


def _with_preset_rule(args: ModelArgs) -> ModelArgs:
    """Recover Meta's sizing rule (multiple_of, multiplier, ffn_exp) and name from a matching Llama 4 preset."""
    fields = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "moe_hidden_dim", "use_qk_norm",
              "nope_layer_interval", "attention_chunk_size", "rope_scaling", "rope_theta", "vision_args")
    for name, preset in PRESETS.items():
        p = preset.args
        same = all(getattr(p, f) == getattr(args, f) for f in fields)
        if same and p.moe_args is not None and args.moe_args is not None \
                and p.moe_args.num_experts == args.moe_args.num_experts:
            return dataclasses.replace(args, multiple_of=p.multiple_of, ffn_dim_multiplier=p.ffn_dim_multiplier,
                            ffn_exp=p.ffn_exp, name=name)
    return args


def hf_config_from_args(args: ModelArgs, dtype: torch.dtype) -> dict:
    """A config.json that `Llama4ForCausalLM.from_pretrained` reads (transformers 5 field layout), or with
    vision_args the `Llama4ForConditionalGeneration` one (the text config nested under text_config)."""
    text = _hf_text_config(args, dtype)
    if args.vision_args is None:
        return text
    v = args.vision_args
    return {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4", "text_config": text,
            "vision_config": vision.hf_config(v), "image_token_index": v.image_token_id,
            "tie_word_embeddings": args.tie_word_embeddings, "dtype": text["dtype"]}


def _hf_text_config(args: ModelArgs, dtype: torch.dtype) -> dict:
    scaling = args.rope_scaling.to_hf() if args.rope_scaling is not None else None
    moe = args.moe_args
    _require_shared_expert(args)
    if args.floor_scale != int(args.floor_scale):
        raise CheckpointError(f"HF's Llama4TextConfig takes an integer floor_scale, got {args.floor_scale}; round it "
                   f"or save with format='meta'")
    return {
        "architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text",
        "hidden_size": args.dim, "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim, "vocab_size": args.vocab_size,
        "intermediate_size": args.moe_hidden_dim if moe else args.ffn_hidden_dim,
        "intermediate_size_mlp": args.ffn_hidden_dim, "hidden_act": "silu", "rms_norm_eps": args.norm_eps,
        **positions_config(args), "tie_word_embeddings": args.tie_word_embeddings,
        "attention_bias": False,
        "num_local_experts": moe.num_experts if moe else 1, "num_experts_per_tok": moe.top_k if moe else 1,
        "interleave_moe_layer_step": moe.interleave_moe_layer_step if moe else 1,
        "moe_layers": [i for i in range(args.n_layers) if args.layer_spec(i).moe],
        "router_aux_loss_coef": moe.load_balance_coef if moe else 0.0,
        "no_rope_layers": [int(args.layer_spec(i).use_rope) for i in range(args.n_layers)],
        "attention_chunk_size": args.attention_chunk_size, "use_qk_norm": args.use_qk_norm,
        "attn_temperature_tuning": args.attn_temperature_tuning, "floor_scale": int(args.floor_scale),
        "attn_scale": args.attn_scale,
        "rope_parameters": {**(scaling or {"rope_type": "default"}), "rope_theta": args.rope_theta},
        "rope_theta": args.rope_theta, "rope_scaling": scaling,
        "dtype": str(dtype).removeprefix("torch."),
    }


# ---------------------------------------------------------------------------------------------------------------
# HF folders


def read_hf(folder: Path) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """(ModelArgs, our state dict) of a Llama4ForCausalLM / Llama4ForConditionalGeneration folder."""
    config_path = folder / "config.json"
    args, prefix = args_from_hf_config(read_json(config_path), path=config_path)
    hf, visual, outside = {}, {}, []
    for path in weight_files(folder):
        pairs = iter_safetensors(path) if path.suffix == ".safetensors" else torch_load_tensors(path).items()
        for key, tensor in pairs:
            if key.startswith(prefix):
                hf[key[len(prefix):]] = tensor
            elif args.vision_args is not None and vision.from_hf(key) is not None:
                visual[vision.from_hf(key)] = tensor  # vision_model.*, multi_modal_projector.*
            else:
                outside.append(key)  # named by the key check below
    sd, unknown = from_hf_state_dict(hf)
    sd.update(visual)
    unknown = [prefix + k for k in unknown] + outside
    if args.tie_word_embeddings and "output.weight" not in sd and "tok_embeddings.weight" in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    check_state_dict(sd, args, config_file=str(config_path), weights=str(folder), extra_unexpected=tuple(unknown))
    return args, sd


def write_hf(args: ModelArgs, sd: dict[str, torch.Tensor], folder: Path, max_shard_size: int) -> None:
    """model.safetensors (or shards + index, as the dense writer), then config.json."""
    config = hf_config_from_args(args, next(iter(sd.values())).dtype)  # refuses what HF cannot hold, first
    text = {k: v for k, v in sd.items() if not vision.is_vision_key(k)}
    prefix = "language_model." if args.vision_args is not None else ""
    hf = {prefix + k: v.contiguous() for k, v in to_hf_state_dict(text).items()
          if not (args.tie_word_embeddings and k == "lm_head.weight")}
    hf.update({k: v.contiguous() for k, v in vision.to_hf_state_dict(sd).items()})
    write_safetensors_shards(hf, folder, max_shard_size)
    write_json(folder / "config.json", config)


# ---------------------------------------------------------------------------------------------------------------
# Meta folders: params.json <-> ModelArgs

_META_SCALING_KEYS = {"factor": "rope_scaling_factor", "high_freq_factor": "rope_high_freq_factor",
                      "low_freq_factor": "rope_low_freq_factor",  # the last two are this project's own keys:
                      "original_max_position_embeddings": "rope_original_max_position_embeddings"}  # Meta hard-codes
# Llama 4 `args.py`: use_scaled_rope without explicit values means Scout's factor 16, high 1 (low 1, L0 8192 fixed).
_META_L4_SCALING = RopeScaling("llama3", factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
                    original_max_position_embeddings=8192)
_MOE_KEYS = ("num_experts", "capacity_factor", "auto_scale_F", "top_k", "interleave_moe_layer_step")


def args_from_params(params: dict, *, path, max_seq_len: Optional[int] = None) -> ModelArgs:
    """ModelArgs of a Meta Llama 4 params.json ([LM4] `args.py` field names)."""
    try:
        return _args_from_params(params.get("model", params), max_seq_len, path)
    except (TypeError, ValueError, KeyError) as e:
        raise e if isinstance(e, CheckpointError) else _config_error(path, e) from e


def _args_from_params(params: dict, max_seq_len: Optional[int], path) -> ModelArgs:
    check_fields(params, path, ints=PARAMS_L4_INTS, reals=PARAMS_L4_REALS,
                 bools=("use_scaled_rope", "use_qk_norm", "attn_temperature_tuning"))
    scaling = None
    if params.get("use_scaled_rope"):
        scaling = dataclasses.replace(_META_L4_SCALING, **{f: params[k] for f, k in _META_SCALING_KEYS.items()
                                                if params.get(k) is not None})
    moe = params.get("moe_args")
    args = ModelArgs(
        dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"], n_kv_heads=params.get("n_kv_heads"),
        head_dim=params.get("head_dim"), vocab_size=params["vocab_size"], multiple_of=params.get("multiple_of", 256),
        ffn_dim_multiplier=params.get("ffn_dim_multiplier"), ffn_exp=params.get("ffn_exp"),
        norm_eps=params.get("norm_eps", 1e-5), rope_theta=float(params.get("rope_theta", 500000.0)),
        rope_scaling=scaling, nope_layer_interval=params.get("nope_layer_interval"),
        use_qk_norm=bool(params.get("use_qk_norm", False)),
        attn_temperature_tuning=bool(params.get("attn_temperature_tuning", False)),
        floor_scale=float(params.get("floor_scale", 8192.0)), attn_scale=float(params.get("attn_scale", 0.1)),
        attention_chunk_size=params.get("attention_chunk_size"),
        moe_args=MoEArgs(**{k: moe[k] for k in _MOE_KEYS if k in moe}) if moe else None,
        max_seq_len=max_seq_len or params.get("max_seq_len") or 131072, rope_complex64=True,
        vision_args=vision.args_from_params(params["vision_args"], path=path) if params.get("vision_args") else None)
    if not (max_seq_len or params.get("max_seq_len")):
        preset = _with_preset_rule(args)
        if preset.name:
            args = dataclasses.replace(args, max_seq_len=PRESETS[preset.name].args.max_seq_len, name=preset.name)
    return args


def params_from_args(args: ModelArgs) -> dict:
    """params.json in Meta's Llama 4 field names; refuses sizes Meta's rules cannot express."""
    m = args.moe_args
    _require_shared_expert(args)
    if m is not None and (args.ffn_exp is None or moe_hidden_size(args.dim, args.ffn_exp, args.ffn_dim_multiplier,
                                                        args.multiple_of, m) != args.moe_hidden_dim):
        raise CheckpointError(f"expert hidden size {args.moe_hidden_dim} does not follow Meta's rule from ffn_exp="
                   f"{args.ffn_exp}, multiple_of={args.multiple_of}; save with format='hf' instead")
    has_dense = any(not args.layer_spec(i).moe for i in range(args.n_layers))
    if has_dense and ffn_hidden_size(args.dim, args.multiple_of, args.ffn_dim_multiplier) != args.ffn_hidden_dim:
        raise CheckpointError(f"dense hidden size {args.ffn_hidden_dim} does not follow Meta's rule; save with "
                   f"format='hf' instead")
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
              "head_dim": args.head_dim, "vocab_size": args.vocab_size, "multiple_of": args.multiple_of,
              "ffn_dim_multiplier": args.ffn_dim_multiplier, "ffn_exp": args.ffn_exp, "norm_eps": args.norm_eps,
              "rope_theta": args.rope_theta, "use_scaled_rope": args.rope_scaling is not None,
              "nope_layer_interval": args.nope_layer_interval, "use_qk_norm": args.use_qk_norm,
              "attn_temperature_tuning": args.attn_temperature_tuning, "floor_scale": int(args.floor_scale),
              "attn_scale": args.attn_scale, "attention_chunk_size": args.attention_chunk_size,
              "max_seq_len": args.max_seq_len}
    if args.rope_scaling is not None:
        if args.rope_scaling.rope_type != "llama3":
            raise CheckpointError(f"Meta's params.json has no field for {args.rope_scaling.rope_type!r} RoPE scaling; "
                       f"save with format='hf' instead")
        params.update({k: getattr(args.rope_scaling, f) for f, k in _META_SCALING_KEYS.items()})
    if m is not None:
        params["moe_args"] = {k: getattr(m, k) for k in _MOE_KEYS}
    if args.vision_args is not None:
        params["vision_args"] = vision.params(args.vision_args)
    return params


# ---------------------------------------------------------------------------------------------------------------
# Meta folders: tensors. Each rank's shard is first unfused into our names (local slices), then slices are joined
# along the model-parallel axis of each tensor (fairscale column-parallel: output rows; row-parallel: input columns).

_IGNORED_META_RE = re.compile(r"(_extra_state|global_gate_stats_3E|running_gate_stats_3E|expert_activation_DE"
                   r"|^rope\.freqs)$")
_SPLIT_DIM = {"attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0, "attention.wo.weight": 1,
              "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0, "feed_forward.w2.weight": 1,
              "feed_forward.experts.w1": 2, "feed_forward.experts.w3": 2, "feed_forward.experts.w2": 1,
              "feed_forward.shared_expert.w1.weight": 0, "feed_forward.shared_expert.w3.weight": 0,
              "feed_forward.shared_expert.w2.weight": 1, "tok_embeddings.weight": 0, "output.weight": 0}
_META_RENAME = {  # unfused tensors that only change name
    "attention.wo.weight": "attention.wo.weight",
    "attention.wqkv.layer_norm_weight": "attention_norm.weight",
    "feed_forward.norm.weight": "ffn_norm.weight", "feed_forward.mlp.layer_norm_weight": "ffn_norm.weight",
    "feed_forward.mlp.fc2_weight": "feed_forward.w2.weight",
    "feed_forward.w_in_shared_FD.weight": "feed_forward.shared_expert.w1.weight",
    "feed_forward.w_swiglu_FD.weight": "feed_forward.shared_expert.w3.weight",
    "feed_forward.w_out_shared_DF.weight": "feed_forward.shared_expert.w2.weight",
}
_TO_META = {v: k for k, v in _META_RENAME.items() if k != "feed_forward.mlp.layer_norm_weight"}


def _unfuse_rank(shard: dict[str, torch.Tensor], args: ModelArgs, P: int) -> dict[str, torch.Tensor]:
    """One rank's Meta tensors -> our names, still holding that rank's slice."""
    E, C, D = (args.moe_args.num_experts if args.moe_args else 0), args.dim, args.head_dim
    out = {}
    for key, w in shard.items():
        m = _OURS_LAYER_RE.match(key)
        if m is None:
            out[key] = w  # tok_embeddings, norm, output
            continue
        i, rest = m.groups()
        p = f"layers.{i}."
        if rest == "attention.wqkv.weight":  # [q_r; k_r; v_r] with H/P and Hkv/P heads
            q, k, v = w.split([args.n_heads // P * D, args.n_kv_heads // P * D, args.n_kv_heads // P * D])
            out |= {p + "attention.wq.weight": q, p + "attention.wk.weight": k, p + "attention.wv.weight": v}
        elif rest == "feed_forward.mlp.fc1_weight":  # [w1_r; w3_r]
            w1, w3 = w.chunk(2, dim=0)
            out |= {p + "feed_forward.w1.weight": w1, p + "feed_forward.w3.weight": w3}
        elif rest == "feed_forward.router_DE":
            out[p + "feed_forward.router.weight"] = w.t()  # [C, E] -> [E, C]
        elif rest in ("feed_forward.experts.moe_w_in_eD_F", "feed_forward.experts.moe_w_swiglu_eD_F"):
            name = "w1" if "moe_w_in" in rest else "w3"
            out[p + f"feed_forward.experts.{name}"] = w.view(E, C, -1)  # [E·C, F/P] -> [E, C, F/P]
        elif rest == "feed_forward.experts.moe_w_out_eF_D":
            out[p + "feed_forward.experts.w2"] = w.view(E, -1, C)  # [E·F/P, C] -> [E, F/P, C]
        elif rest in _META_RENAME:
            out[p + _META_RENAME[rest]] = w
        else:
            out[key] = w  # unknown: the key check names it
    return out


def _split_dim(key: str) -> Optional[int]:
    if vision.is_vision_key(key):
        return vision.split_dim(key)
    m = _OURS_LAYER_RE.match(key)
    return _SPLIT_DIM.get(m.group(2) if m else key)


def merge_meta_shards(shards: list[dict[str, torch.Tensor]], args: ModelArgs) -> dict[str, torch.Tensor]:
    P = len(shards)
    if args.n_kv_heads % P:
        raise CheckpointError(f"{P} model-parallel shards for {args.n_kv_heads} KV heads: KV heads repeated across "
                   f"ranks (P > Hkv) are not handled for Llama 4; re-shard the checkpoint to P <= Hkv")
    local = [_unfuse_rank(s, args, P) for s in shards]
    merged = {}
    for key in local[0]:
        dim = _split_dim(key)
        parts = [rank[key] for rank in local]
        merged[key] = parts[0] if dim is None or P == 1 else torch.cat(parts, dim=dim)
    return merged


def split_for_meta(sd: dict[str, torch.Tensor], args: ModelArgs, P: int) -> list[dict[str, torch.Tensor]]:
    """The inverse of `merge_meta_shards`: P rank shards in Meta's Llama 4 names."""
    moe = args.moe_args
    sizes = {"n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads, "vocab_size": args.vocab_size,
             "moe_hidden_dim": args.moe_hidden_dim if moe else P, "ffn_hidden_dim": args.ffn_hidden_dim}
    bad = [f"{k}={v}" for k, v in sizes.items() if v % P]
    if bad:
        raise CheckpointError(f"cannot split into {P} model-parallel shards: {', '.join(bad)} not divisible by {P}")
    if args.vision_args is not None:
        vision.check_splittable(args.vision_args, P)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(P)]
    for key, w in sd.items():
        dim = _split_dim(key)
        for r, part in enumerate([w] * P if dim is None else w.chunk(P, dim=dim)):
            shards[r][key] = part
    return [_fuse_rank(s, args) for s in shards]


def _fuse_rank(local: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    out = {}
    for key, w in local.items():
        m = _OURS_LAYER_RE.match(key)
        if m is None:
            out[key] = w.contiguous()
            continue
        i, rest = m.groups()
        p = f"layers.{i}."
        spec = args.layer_spec(int(i))
        if rest == "attention.wq.weight":
            out[p + "attention.wqkv.weight"] = torch.cat(
                [w, local[p + "attention.wk.weight"], local[p + "attention.wv.weight"]])
        elif rest == "feed_forward.w1.weight":
            out[p + "feed_forward.mlp.fc1_weight"] = torch.cat([w, local[p + "feed_forward.w3.weight"]])
        elif rest == "feed_forward.router.weight":
            out[p + "feed_forward.router_DE"] = w.t().contiguous()
        elif rest in ("feed_forward.experts.w1", "feed_forward.experts.w3"):
            name = "moe_w_in_eD_F" if rest.endswith("w1") else "moe_w_swiglu_eD_F"
            out[p + f"feed_forward.experts.{name}"] = w.reshape(-1, w.shape[-1])  # [E, C, F/P] -> [E·C, F/P]
        elif rest == "feed_forward.experts.w2":
            out[p + "feed_forward.experts.moe_w_out_eF_D"] = w.reshape(-1, w.shape[-1])  # -> [E·F/P, C]
        elif rest == "ffn_norm.weight":
            out[p + ("feed_forward.norm.weight" if spec.moe else "feed_forward.mlp.layer_norm_weight")] = w
        elif rest in _TO_META:
            out[p + _TO_META[rest]] = w.contiguous()
        # wk, wv, w3 went into the fused tensors above
    return out


def read_meta(folder: Path, *, max_seq_len: Optional[int] = None) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    params_path = folder / "params.json"
    args = args_from_params(read_json(params_path), path=params_path, max_seq_len=max_seq_len)
    shards = [{k: v for k, v in torch_load_tensors(path).items() if not _IGNORED_META_RE.search(k)}
              for path in shard_paths(folder)]
    sd = merge_meta_shards(shards, args)  # vision tensors (a multimodal params.json) keep Meta's names
    check_state_dict(sd, args, config_file=str(params_path), weights=str(folder))
    return args, sd


def write_meta(args: ModelArgs, sd: dict[str, torch.Tensor], folder: Path, num_shards: int) -> None:
    params = params_from_args(args)
    for rank, shard in enumerate(split_for_meta(sd, args, num_shards)):
        write_torch(folder / f"consolidated.{rank:02d}.pth", shard)
    write_json(folder / "params.json", params)
