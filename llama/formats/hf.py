"""The Hugging Face layout: `config.json` plus `model.safetensors` (or shards listed in `model.safetensors.index.json`).

Shapes: V vocab, C model dim, H query heads, Hkv key/value heads, D head dim, F SwiGLU hidden size, K in features.

Two things differ from Meta's layout besides the names:
  1. RoPE convention. Meta rotates adjacent pairs (x_{2j}, x_{2j+1}) of each head; HF's `rotate_half` rotates
     (x_j, x_{j+D/2}). HF's converter therefore reorders the output rows of wq and wk inside every head:
         HF_row[j] = Meta_row[2j],   HF_row[D/2 + j] = Meta_row[2j + 1]      (j < D/2)
     with n = H heads for wq and n = Hkv for wk; wv and wo are untouched. q and k of a head get the same
     reordering, so every q·k score is unchanged (HF `convert_llama_weights_to_hf.py`, `permute`).
  2. Tied embeddings (Llama 3.2 1B/3B): HF stores the shared matrix once, as `model.embed_tokens.weight`, and
     omits `lm_head.weight`; Meta stores it twice.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch

from ..checks import ConfigError
from ..config import ModelArgs, RopeScaling
from .io import (CheckpointError, check_fields, check_state_dict, field_error, iter_safetensors, read_json,
                 require_dense, torch_load_tensors, write_json, write_safetensors)
from .meta import match_preset

CONFIG_FILE = "config.json"
# Dynamic NTK: HF scales RoPE past `max_position_embeddings`, so for that scaling the field holds L0 and the longest
# input our model accepts (`ModelArgs.max_seq_len`) is kept under this extra key (HF keeps unknown config keys).
MAX_SEQ_LEN_KEY = "max_seq_len"
SAFETENSORS_FILE, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_FILE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"  # older, pickle-based HF uploads
SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
IGNORED_RE = re.compile(r"\.rotary_emb\.inv_freq$")  # a buffer some early conversions saved per layer

# Meta name -> HF name. Layer-level entries are relative to `layers.{i}.` / `model.layers.{i}.`.
TOP_LEVEL = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
PER_LAYER = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
             "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
             "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
             "feed_forward.w2": "mlp.down_proj",
             "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
# config.json numbers and flags (checked for their type before anything reads them), and the config.json name of
# each ModelArgs field (for error messages).
CONFIG_INTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
               "vocab_size", "max_position_embeddings", "head_dim", MAX_SEQ_LEN_KEY)
CONFIG_REALS = ("rms_norm_eps", "rope_theta")
CONFIG_BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias")
ROPE_INTS, ROPE_REALS = ("original_max_position_embeddings",), ("rope_theta", "factor", "low_freq_factor",
                                                                 "high_freq_factor", "beta_fast", "beta_slow",
                                                                 "attention_factor", "mscale", "mscale_all_dim")
CONFIG_NAMES = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
                "n_kv_heads": "num_key_value_heads", "ffn_hidden_dim": "intermediate_size", "norm_eps": "rms_norm_eps",
                "max_seq_len": "max_position_embeddings", "rope_theta": "rope_theta"}
_FROM_HF_TOP = {v: k for k, v in TOP_LEVEL.items()}
_FROM_HF_LAYER = {v: k for k, v in PER_LAYER.items()}
_META_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)\.weight$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")


def hf_name(meta_key: str) -> str:
    if meta_key in TOP_LEVEL:
        return TOP_LEVEL[meta_key]
    m = _META_LAYER_RE.match(meta_key)
    if m and m.group(2) in PER_LAYER:
        return f"model.layers.{m.group(1)}.{PER_LAYER[m.group(2)]}.weight"
    return meta_key


def meta_name(hf_key: str) -> Optional[str]:
    """The Meta name of an HF key, or None if LlamaForCausalLM has no such parameter."""
    if hf_key in _FROM_HF_TOP:
        return _FROM_HF_TOP[hf_key]
    m = _HF_LAYER_RE.match(hf_key)
    if m and m.group(2) in _FROM_HF_LAYER:
        return f"layers.{m.group(1)}.{_FROM_HF_LAYER[m.group(2)]}.weight"
    return None


# ---------------------------------------------------------------------------------------------------------------
# The q/k row permutation (HF `convert_llama_weights_to_hf.py`, `permute`)


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta rows (pairs interleaved) -> HF rows (halves). [n·D, K] -> [n·D, K]."""
    D = w.shape[0] // n_heads
    return w.reshape(n_heads, D // 2, 2, -1).transpose(1, 2).reshape(n_heads * D, -1)  # via [n, 2, D/2, K]


def permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rows (halves) -> Meta rows (pairs interleaved). [n·D, K] -> [n·D, K]."""
    D = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, D // 2, -1).transpose(1, 2).reshape(n_heads * D, -1)  # via [n, D/2, 2, K]


def _permuted(sd: dict[str, torch.Tensor], args: ModelArgs, fn) -> dict[str, torch.Tensor]:
    out = {}
    for key, w in sd.items():
        if key.endswith("attention.wq.weight"):
            w = fn(w, args.n_heads)
        elif key.endswith("attention.wk.weight"):
            w = fn(w, args.n_kv_heads)
        out[key] = w
    return out


# ---------------------------------------------------------------------------------------------------------------
# config.json <-> ModelArgs


def args_from_config(config: dict, *, path: Path) -> ModelArgs:
    """ModelArgs for an HF LlamaForCausalLM config.json (transformers 4.x or 5.x field layout)."""
    model_type = config.get("model_type", "llama")
    if model_type != "llama":
        raise CheckpointError(f"{path} describes a {model_type!r} model; only dense Llama checkpoints "
                   f"(model_type 'llama', LlamaForCausalLM) can be loaded here")
    unsupported = {k: config[k] for k in ("attention_bias", "mlp_bias") if config.get(k)}
    if config.get("hidden_act", "silu") != "silu":
        unsupported["hidden_act"] = config["hidden_act"]
    if unsupported:
        raise CheckpointError(f"{path} sets {unsupported}, which no LLaMA model uses (bias-free projections, SiLU "
                   f"gate); this Transformer cannot represent it: use the model's own code")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if key not in config:
            raise CheckpointError(f"{path} has no {key!r}; it is not a complete LlamaConfig (restore the original "
                       f"or re-save it with LlamaConfig.save_pretrained)")
    check_fields(config, path, ints=CONFIG_INTS, reals=CONFIG_REALS, bools=CONFIG_BOOLS)
    max_pos = config.get("max_position_embeddings", 2048)
    theta, scaling = rope_from_config(config, max_pos, path)
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim")
    try:
        args = ModelArgs(
            dim=dim, n_layers=config["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or n_heads, vocab_size=config["vocab_size"],
            ffn_hidden_dim=config["intermediate_size"], norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=theta, rope_scaling=scaling, max_seq_len=max_seq_len_from_config(config, scaling),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            head_dim=None if head_dim is None or n_heads < 1 or head_dim == dim // n_heads else head_dim)
    except ConfigError as e:
        raise field_error(path, e, CONFIG_NAMES) from None
    preset = match_preset(args, compare_context=True)
    if preset is not None:  # recover Meta's FFN rule (multiple_of, multiplier) and the preset's name
        args.multiple_of, args.ffn_dim_multiplier = preset.multiple_of, preset.ffn_dim_multiplier
        args.name = preset.name
    return args


def rope_from_config(config: dict, max_pos: int, path: Path, default_theta: float = 10000.0
                     ) -> tuple[float, Optional[RopeScaling]]:
    """(theta, scaling) of an HF config, dense Llama or Llama 4 text, read with HF's conventions for L0."""
    # transformers >= 5: rope_parameters = {rope_type, rope_theta, ...}; 4.x: rope_theta + rope_scaling = {...}.
    for name in ("rope_parameters", "rope_scaling"):
        fields = config.get(name) or {}
        if not isinstance(fields, dict):
            raise CheckpointError(f"{path}: {name!r} must be a JSON object or null, got {fields!r}; restore the "
                                  f"original")
        check_fields(fields, f"{path} ({name})", ints=ROPE_INTS, reals=ROPE_REALS)
    params = config.get("rope_parameters") or {}
    scaling = dict(params if params.get("rope_type", "default") != "default" else (config.get("rope_scaling") or {}))
    theta = params.get("rope_theta", config.get("rope_theta", default_theta))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "dynamic":  # HF's dynamic NTK scales past max_position_embeddings, whatever else is set
        scaling["original_max_position_embeddings"] = max_pos
    if rope_type == "yarn" and not scaling.get("original_max_position_embeddings"):
        scaling["original_max_position_embeddings"] = max_pos  # HF's default for YaRN's L0
    if rope_type == "yarn" and scaling.get("factor") is None:
        scaling["factor"] = max_pos / scaling["original_max_position_embeddings"]
    try:
        return theta, RopeScaling.from_hf(scaling)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot use its RoPE scaling {scaling}: {e}; llama.rope implements llama3, "
                   f"linear, dynamic and yarn with HF's fields") from e


def max_seq_len_from_config(config: dict, scaling: Optional[RopeScaling], default: int = 2048) -> int:
    """ModelArgs.max_seq_len for an HF config (see MAX_SEQ_LEN_KEY); HF's dynamic NTK has no longest input, so
    without the key ours accepts its design length s · L0."""
    max_pos = config.get("max_position_embeddings", default)
    if MAX_SEQ_LEN_KEY in config:
        return config[MAX_SEQ_LEN_KEY]
    return int(scaling.factor * max_pos) if scaling is not None and scaling.rope_type == "dynamic" else max_pos


def positions_config(args: ModelArgs) -> dict:
    """The config fields for positions: max_position_embeddings is L0 under dynamic NTK (with MAX_SEQ_LEN_KEY)."""
    if args.rope_scaling is not None and args.rope_scaling.rope_type == "dynamic":
        return {"max_position_embeddings": args.rope_scaling.original_max_position_embeddings,
                MAX_SEQ_LEN_KEY: args.max_seq_len}
    return {"max_position_embeddings": args.max_seq_len}


def config_from_args(args: ModelArgs, dtype: torch.dtype) -> dict:
    """A config.json that `LlamaForCausalLM.from_pretrained` reads (transformers 5; the legacy `rope_theta` and
    `rope_scaling` fields are written too, so transformers 4.x reads the same RoPE)."""
    require_dense(args, "this model")
    legacy_scaling = args.rope_scaling.to_hf() if args.rope_scaling is not None else None
    rope = {**(legacy_scaling or {"rope_type": "default"}), "rope_theta": args.rope_theta}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        **positions_config(args),
        "rms_norm_eps": args.norm_eps,
        "vocab_size": args.vocab_size,
        "tie_word_embeddings": args.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "rope_parameters": rope,
        "rope_theta": args.rope_theta,
        "rope_scaling": legacy_scaling,
        "dtype": str(dtype).removeprefix("torch."),
    }


# ---------------------------------------------------------------------------------------------------------------
# Reading


def weight_files(folder: Path) -> list[Path]:
    """The files holding the weights: a single file, or every shard named in an index (which must all exist)."""
    for index_name, single_name in ((SAFETENSORS_INDEX, SAFETENSORS_FILE), (BIN_INDEX, BIN_FILE)):
        index, single = folder / index_name, folder / single_name
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index} has no 'weight_map'; the index is corrupt: restore it or re-save")
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (folder / f).exists()]
            if missing:
                raise CheckpointError(f"{index} lists shard files that are not in {folder}: {missing}; download "
                           f"or copy every shard the index names")
            return [folder / f for f in files]
        if single.exists():
            return [single]
    raise CheckpointError(f"{folder} has {CONFIG_FILE} but no weights ({SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, "
                          f"{BIN_FILE} or {BIN_INDEX}); copy the weight files next to config.json")


def read_hf(folder: Path) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """(ModelArgs, state dict in Meta names and Meta's RoPE row order) of an HF Llama folder."""
    config_path = folder / CONFIG_FILE
    args = args_from_config(read_json(config_path), path=config_path)
    files = weight_files(folder)
    index = folder / (SAFETENSORS_INDEX if files[0].suffix == ".safetensors" else BIN_INDEX)
    expected_map = read_json(index)["weight_map"] if index.exists() else None

    sd, unexpected, seen = {}, [], {}
    for path in files:
        pairs = iter_safetensors(path) if path.suffix == ".safetensors" else torch_load_tensors(path).items()
        for key, tensor in pairs:
            if key in seen:
                raise CheckpointError(f"{key} appears in both {seen[key]} and {path.name}; the shards overlap: "
                           f"restore a matching set of shards")
            seen[key] = path.name
            if IGNORED_RE.search(key):
                continue
            name = meta_name(key)
            if name is None:
                unexpected.append(key)
            else:
                sd[name] = tensor
    if expected_map is not None:
        absent = [k for k, f in expected_map.items() if seen.get(k) != f]
        if absent:
            raise CheckpointError(f"{index.name} places {absent[:5]} in shards that do not hold them; the index "
                       f"and the shards come from different saves: restore a matching set")
    if args.tie_word_embeddings and "tok_embeddings.weight" in sd:
        lm_head = sd.pop("output.weight", None)
        if lm_head is not None and not torch.equal(lm_head, sd["tok_embeddings.weight"]):
            raise CheckpointError(f"{config_path} says tie_word_embeddings=true but lm_head.weight differs from "
                       f"model.embed_tokens.weight; set tie_word_embeddings to false in config.json")
        sd["output.weight"] = sd["tok_embeddings.weight"]
    check_state_dict(sd, args, config_file=str(config_path), weights=str(folder), file_name=hf_name,
                     extra_unexpected=tuple(unexpected))
    return args, _permuted(sd, args, permute_from_hf)


# ---------------------------------------------------------------------------------------------------------------
# Writing


def write_hf(args: ModelArgs, sd: dict[str, torch.Tensor], folder: Path, max_shard_size: int) -> None:
    """Write safetensors (sharded with an index above max_shard_size bytes), then config.json."""
    config = config_from_args(args, next(iter(sd.values())).dtype)
    hf = {hf_name(k): v for k, v in _permuted(sd, args, permute_to_hf).items()
          if not (args.tie_word_embeddings and k == "output.weight")}
    write_safetensors_shards(hf, folder, max_shard_size)
    write_json(folder / CONFIG_FILE, config)


def write_safetensors_shards(tensors: dict[str, torch.Tensor], folder: Path, max_shard_size: int) -> None:
    """model.safetensors, or model-0000k-of-0000n.safetensors files of at most max_shard_size bytes + an index."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():  # greedy fill in model order, as transformers does
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    n = len(shards)
    names = [SAFETENSORS_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for name, shard in zip(names, shards):
        write_safetensors(folder / name, shard, metadata={"format": "pt"})
    if n > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
        write_json(folder / SAFETENSORS_INDEX, index)


def parse_size(size) -> int:
    """Bytes (>= 1) from an int or a string like '5GB' (10^9) or '4GiB' (2^30)."""
    m = re.fullmatch(r"\s*(\d+\.?\d*|\.\d+)\s*([KMGT]?)(i?)B?\s*", size, flags=re.IGNORECASE) \
        if isinstance(size, str) else None
    if isinstance(size, int) and not isinstance(size, bool):
        n_bytes = size
    elif m is not None:
        base = 1024 if m.group(3) else 1000
        n_bytes = int(float(m.group(1)) * base ** "_KMGT".index(m.group(2).upper() or "_"))
    else:
        n_bytes = 0
    if n_bytes < 1:
        raise CheckpointError(f"max_shard_size {size!r} is not a positive size; use a number of bytes or a string "
                              f"like '5GB' or '500MB'")
    return n_bytes
