"""Meta's original checkpoint layout: `params.json` plus one `consolidated.NN.pth` per model-parallel rank.

Shapes: V vocab, C model dim, H query heads, Hkv key/value heads, D head dim, F SwiGLU hidden size,
        P model-parallel ranks (= number of `consolidated.NN.pth` shards).

Meta trained and released every dense model with fairscale tensor parallelism, and saved one file per rank. Each
rank holds a slice of every projection (LLaMA 1 `llama/model.py`; Llama 3 `llama-models/models/checkpoint.py`):
  * ColumnParallelLinear (wq wk wv w1 w3 output) splits the output rows:   merge by concatenating along dim 0;
  * RowParallelLinear (wo w2) splits the input columns:                   merge along dim 1;
  * the embedding is a ParallelEmbedding split along C (dim 1) in LLaMA 1 / 2 / Code Llama, but a
    VocabParallelEmbedding split along V (dim 0) from Llama 3 on; the shard shapes tell which;
  * RMSNorm gains are replicated on every rank.
When P exceeds Hkv (Llama 3.1 405B at P = 16, Hkv = 8), each KV head is repeated on P/Hkv consecutive ranks.

Our state dicts use exactly Meta's key names, so only the splitting and `params.json` need translating here.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path
from typing import Optional

import torch

from ..config import PRESETS, ModelArgs, RopeScaling, ffn_hidden_size
from ..tokenizer import Tokenizer
from ..checks import ConfigError
from .io import (LLAMA4_FIELDS, CheckpointError, check_fields, field_error, read_json, require_dense,
                 torch_load_tensors, write_json, write_torch)

PARAMS_FILE = "params.json"
SINGLE_FILE = "consolidated.pth"  # accepted by the HF converter for unsharded checkpoints
SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")
IGNORED_KEYS = ("rope.freqs",)  # precomputed RoPE table in early checkpoints; recomputed from params instead

# Merge dimension per weight (the module name just before `.weight`).
SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}
REPLICATED = ("attention_norm", "ffn_norm", "norm")

# Constants Meta's Llama 3 `apply_scaling` hard-codes for `use_scaled_rope: true`.
META_LLAMA3_SCALING = RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=8192)
# params.json keys for values that differ from those constants. `rope_scaling_factor` and `rope_high_freq_factor`
# are Meta's own names (Llama 4 `args.py`); the other two exist only in folders this project writes.
SCALING_KEYS = {"factor": "rope_scaling_factor", "high_freq_factor": "rope_high_freq_factor",
                "low_freq_factor": "rope_low_freq_factor",
                "original_max_position_embeddings": "rope_original_max_position_embeddings"}


# Numeric fields of a params.json (checked for their type before anything reads them).
PARAMS_INTS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "head_dim", "max_seq_len",
               "rope_original_max_position_embeddings")
PARAMS_REALS = ("ffn_dim_multiplier", "norm_eps", "rope_theta", "rope_scaling_factor", "rope_high_freq_factor",
                "rope_low_freq_factor")


def module_name(key: str) -> str:
    """'layers.3.attention.wq.weight' -> 'wq'; 'tok_embeddings.weight' -> 'tok_embeddings'."""
    return key.rsplit(".", 2)[-2]


# ---------------------------------------------------------------------------------------------------------------
# params.json <-> ModelArgs


def check_params(params: dict, path: Path) -> dict:
    """The fields of a dense params.json, checked before any weight is read; returns them unwrapped."""
    params = params.get("model", params)  # some releases wrap the fields in {"model": {...}}
    other = [k for k in ("moe_args", "nope_layer_interval", "vision_args", "vision_chunk_size") if k in params]
    if other:
        raise CheckpointError(f"{path} describes a Llama 4 or Llama 3.2 Vision model ({other}); this reader takes the "
                   f"dense text generations (LLaMA 1 to Llama 3.3) only")
    for key in ("dim", "n_layers", "n_heads"):
        if key not in params:
            raise CheckpointError(f"{path} has no {key!r} field; it is not a Meta params.json (restore the original)")
    check_fields(params, path, ints=PARAMS_INTS, reals=PARAMS_REALS, bools=("use_scaled_rope",),
                 signed=("vocab_size",))  # LLaMA 1/2: -1, the tokenizer's size
    return params


def args_from_params(params: dict, *, path: Path, vocab_size: Optional[int] = None,
                     max_seq_len: Optional[int] = None) -> ModelArgs:
    """ModelArgs for a Meta params.json; `vocab_size` replaces a -1 entry (LLaMA 1 / 2 take it from the tokenizer)."""
    params = check_params(params, path)
    vocab = params.get("vocab_size", -1)
    if vocab is None or vocab <= 0:
        if vocab_size is None:
            raise CheckpointError(f"{path} has vocab_size {vocab} and no tokenizer or weights tell the real size; "
                       f"put the model's tokenizer.model next to params.json")
        vocab = vocab_size
    try:
        scaling = None
        if params.get("use_scaled_rope", False):
            scaling = dataclasses.replace(META_LLAMA3_SCALING, **{
                field: params[key] for field, key in SCALING_KEYS.items() if key in params})
        args = ModelArgs(
            dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
            n_kv_heads=params.get("n_kv_heads"), vocab_size=vocab, multiple_of=params.get("multiple_of", 256),
            ffn_dim_multiplier=params.get("ffn_dim_multiplier"), norm_eps=params.get("norm_eps", 1e-5),
            rope_theta=params.get("rope_theta", 10000.0), rope_scaling=scaling,
            head_dim=params.get("head_dim"), max_seq_len=params.get("max_seq_len", 2048))
    except ConfigError as e:
        raise field_error(path, e, {f"RopeScaling.{f}": k for f, k in SCALING_KEYS.items()}) from None
    if scaling is not None and "rope_scaling_factor" not in params:
        args = _llama_3_2_factor(args)
    preset = match_preset(args, compare_context=False)
    context = max_seq_len or params.get("max_seq_len") or (preset.max_seq_len if preset else guess_context(args))
    return dataclasses.replace(args, max_seq_len=context, name=preset.name if preset else "")


def _llama_3_2_factor(args: ModelArgs) -> ModelArgs:
    """Llama 3.2 1B / 3B: Meta's params.json says only `use_scaled_rope`, and Meta's reference then hard-codes
    factor 8, but the correct factor is 32 (the HF config; confirmed in meta-llama/llama-models#166). Use 32 when
    the shapes are those of 3.2 1B / 3B; add `"rope_scaling_factor": 8` to params.json to force Meta's value."""
    factor32 = dataclasses.replace(args, rope_scaling=dataclasses.replace(args.rope_scaling, factor=32.0))
    preset = match_preset(factor32, compare_context=False)
    if preset is not None and preset.name.startswith("llama-3.2-"):
        warnings.warn(f"params.json matches {preset.name}: using llama3 RoPE scaling factor 32 (HF and Meta's "
                      f"corrected value) instead of the 8 hard-coded in Meta's reference; add "
                      f"'rope_scaling_factor': 8 to params.json to override", stacklevel=3)
        return factor32
    return args


def params_from_args(args: ModelArgs) -> dict:
    """A params.json in Meta's field names; fields absent from Meta's files are written only when needed."""
    require_dense(args, "this model")
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads}
    if args.n_kv_heads != args.n_heads:
        params["n_kv_heads"] = args.n_kv_heads
    params["vocab_size"] = args.vocab_size
    multiple_of, multiplier = _ffn_rule_for(args)
    params["multiple_of"] = multiple_of
    if multiplier is not None:
        params["ffn_dim_multiplier"] = multiplier
    params["norm_eps"] = args.norm_eps
    if args.rope_theta != 10000.0:
        params["rope_theta"] = args.rope_theta
    if args.head_dim != args.dim // args.n_heads:
        params["head_dim"] = args.head_dim  # Llama 4's field name
    scaling = args.rope_scaling
    if scaling is not None:
        if scaling.rope_type != "llama3":
            raise CheckpointError(f"Meta's params.json has no field for {scaling.rope_type!r} RoPE scaling (Meta "
                       f"only ships 'llama3'); save this model with format='hf' instead")
        params["use_scaled_rope"] = True
        for field, key in SCALING_KEYS.items():
            value = getattr(scaling, field)
            if value != getattr(META_LLAMA3_SCALING, field):
                params[key] = value
    return params


def _ffn_rule_for(args: ModelArgs) -> tuple[int, Optional[float]]:
    """(multiple_of, ffn_dim_multiplier) that reproduce args.ffn_hidden_dim under Meta's rounding rule."""
    if ffn_hidden_size(args.dim, args.multiple_of, args.ffn_dim_multiplier) == args.ffn_hidden_dim:
        return args.multiple_of, args.ffn_dim_multiplier
    # An HF intermediate_size off the rule: with multiple_of = F, any multiplier that keeps the scaled size in
    # (0, F] rounds up to exactly F.
    F, base = args.ffn_hidden_dim, int(2 * (4 * args.dim) / 3)
    multiplier = F / base
    assert ffn_hidden_size(args.dim, F, multiplier) == F
    return F, multiplier


def guess_context(args: ModelArgs) -> int:
    """Training context when params.json is silent (Meta passes it at run time) and no preset matches."""
    if args.rope_scaling is not None:
        return 131072  # Llama 3.1+
    if args.vocab_size >= 128000:
        return 8192  # Llama 3
    if args.rope_theta == 1e6:
        return 16384  # Code Llama
    return 2048 if args.norm_eps == 1e-6 else 4096  # LLaMA 1 : Llama 2


def match_preset(args: ModelArgs, *, compare_context: bool):
    """The first dense preset with the same architecture (to recover its context length and FFN rule), or None.

    Some releases share one architecture (Llama 3.1 70B and 3.3 70B): the first in the preset table wins."""
    fields = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden_dim", "norm_eps", "rope_theta",
              "rope_scaling", "head_dim") + (("max_seq_len",) if compare_context else ())
    for name, preset in PRESETS.items():
        if any(getattr(preset.args, f, None) for f in LLAMA4_FIELDS):
            continue  # only dense presets describe what these formats hold
        if all(getattr(preset.args, f) == getattr(args, f) for f in fields):
            return preset.args
    return None


# ---------------------------------------------------------------------------------------------------------------
# Reading: list the shards, load them, merge them


def shard_paths(folder: Path) -> list[Path]:
    """consolidated.00.pth … consolidated.NN.pth in rank order (or the single consolidated.pth)."""
    numbered = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := SHARD_RE.match(p.name)))
    single = folder / SINGLE_FILE
    if numbered and single.exists():
        raise CheckpointError(f"{folder} holds both {SINGLE_FILE} and consolidated.NN.pth shards; keep one set")
    if not numbered:
        if single.exists():
            return [single]
        raise CheckpointError(f"{folder} has {PARAMS_FILE} but no consolidated.NN.pth weight files; copy the "
                   f"weights next to params.json")
    ranks = [r for r, _ in numbered]
    if ranks != list(range(len(ranks))):
        missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
        raise CheckpointError(f"{folder}: model-parallel shards are not numbered 0…{len(ranks) - 1} (found ranks "
                   f"{ranks}, missing {missing}); restore the missing consolidated.NN.pth files")
    return [p for _, p in numbered]


def read_meta(folder: Path, *, max_seq_len: Optional[int] = None) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """(ModelArgs, merged state dict in Meta names) of a Meta checkpoint folder."""
    params_path = folder / PARAMS_FILE
    params = read_json(params_path)
    check_params(params, params_path)
    paths = shard_paths(folder)
    shards = [{k: v for k, v in torch_load_tensors(p).items() if k not in IGNORED_KEYS} for p in paths]
    vocab = _vocab_size(folder, params, shards)
    args = args_from_params(params, path=params_path, vocab_size=vocab, max_seq_len=max_seq_len)
    sd = merge_shards(shards, args, paths)
    out, emb = sd.get("output.weight"), sd.get("tok_embeddings.weight")
    if out is not None and emb is not None and out.shape == emb.shape and torch.equal(out, emb):
        # Meta stores Llama 3.2 1B/3B's shared matrix twice; identical rows mean the embeddings are tied.
        args = dataclasses.replace(args, tie_word_embeddings=True)
    return args, sd


def _vocab_size(folder: Path, params: dict, shards: list[dict]) -> Optional[int]:
    """The real vocab when params.json says -1: the tokenizer's size, which must match the embedding rows."""
    if params.get("model", params).get("vocab_size", -1) not in (-1, None):
        return None
    rows = _embedding_rows(shards, params.get("model", params).get("dim"))
    for candidate in (folder / "tokenizer.model", folder.parent / "tokenizer.model"):  # LLaMA 1 kept it one up
        if candidate.exists():
            n_words = Tokenizer(candidate).n_words
            if rows is not None and n_words != rows:
                raise CheckpointError(f"{candidate} has {n_words} tokens but the embedding in {folder} has {rows} "
                           f"rows; use the tokenizer.model that was released with these weights")
            return n_words
    return rows  # no tokenizer: the embedding's row count is the vocab


def _embedding_rows(shards: list[dict], dim: Optional[int]) -> Optional[int]:
    emb = [s["tok_embeddings.weight"] for s in shards if "tok_embeddings.weight" in s]
    if len(emb) != len(shards) or not emb:
        return None
    rows = emb[0].shape[0]
    return rows * len(shards) if len(shards) > 1 and emb[0].shape[1] == dim else rows


def merge_shards(shards: list[dict[str, torch.Tensor]], args: ModelArgs,
                 paths: list[Path]) -> dict[str, torch.Tensor]:
    """One state dict from P model-parallel shards (see the module docstring for the per-weight rule)."""
    P = len(shards)
    if P == 1:
        return dict(shards[0])
    keys = list(shards[0])
    for path, shard in zip(paths[1:], shards[1:]):
        if set(shard) != set(keys):
            only0, only_r = sorted(set(keys) - set(shard)), sorted(set(shard) - set(keys))
            raise CheckpointError(f"shards disagree on their keys: {paths[0].name} has {only0[:5]} that "
                       f"{path.name} lacks, {path.name} has {only_r[:5]} that {paths[0].name} lacks; "
                       f"the shards come from different checkpoints: restore a matching set")
    merged = {}
    for key in keys:
        parts = [s[key] for s in shards]
        name = module_name(key)
        if name in REPLICATED:
            for path, part in zip(paths[1:], parts[1:]):
                if part.shape != parts[0].shape or not torch.equal(part, parts[0]):
                    raise CheckpointError(f"{key} is replicated on every rank but {path.name} differs from "
                               f"{paths[0].name}; the shards come from different checkpoints")
            merged[key] = parts[0]
            continue
        dim = _embedding_dim(parts, args, key) if name == "tok_embeddings" else SPLIT_DIM.get(name)
        if dim is None:  # unknown key: keep rank 0's copy so the key check can name it
            merged[key] = parts[0]
            continue
        other = [tuple(p.shape[:dim]) + tuple(p.shape[dim + 1:]) for p in parts]
        if len({tuple(p.shape) for p in parts}) != 1 or len(set(other)) != 1:
            shapes = ", ".join(f"{path.name}: {list(p.shape)}" for path, p in zip(paths, parts))
            raise CheckpointError(f"shards of {key} have mismatched shapes ({shapes}); model-parallel ranks of one "
                       f"checkpoint split it evenly along dim {dim}: restore a matching set of shards")
        merged[key] = torch.cat(parts, dim=dim)
        if name in ("wk", "wv"):
            merged[key] = _drop_repeated_kv(merged[key], args, P, key)
    return merged


def _embedding_dim(parts: list[torch.Tensor], args: ModelArgs, key: str) -> int:
    """0 if each rank holds all C columns of a vocab slice (Llama 3+), 1 if a slice of C (LLaMA 1/2, Code Llama)."""
    cols = parts[0].shape[1]
    if cols == args.dim:
        return 0
    if cols * len(parts) == args.dim:
        return 1
    raise CheckpointError(f"{key} shards are [{parts[0].shape[0]}, {cols}], which is neither a vocab slice nor a "
                          f"1/{len(parts)} slice of dim={args.dim}: the {len(parts)} consolidated.NN.pth files "
                          f"(one extra or missing?) or params.json do not match these weights; restore the "
                          f"original set")


def _drop_repeated_kv(w: torch.Tensor, args: ModelArgs, P: int, key: str) -> torch.Tensor:
    """With P > Hkv, rank r stores KV head r // (P/Hkv): keep one copy of each. [P·D, C] -> [Hkv·D, C]."""
    D, Hkv = args.head_dim, args.n_kv_heads
    if w.shape[0] != P * D or P <= Hkv or P % Hkv:
        return w  # the ordinary case; shape errors are reported by the key check
    heads = w.view(P, D, -1)  # [P, D, C]
    rep = P // Hkv
    for r in range(P):
        if not torch.equal(heads[r], heads[r - r % rep]):
            raise CheckpointError(f"{key}: {P} ranks for {Hkv} KV heads should repeat each head on {rep} ranks, "
                       f"but rank {r} differs from rank {r - r % rep}; check n_kv_heads in params.json")
    return heads[::rep].reshape(Hkv * D, -1)


# ---------------------------------------------------------------------------------------------------------------
# Writing: split into P shards


def embedding_split_dim(args: ModelArgs) -> int:
    """Split the embedding like the generation it resembles: along V for Llama 3-sized vocabularies, else along C."""
    return 0 if args.vocab_size >= 128000 else 1


def split_state_dict(sd: dict[str, torch.Tensor], args: ModelArgs, num_shards: int) -> list[dict[str, torch.Tensor]]:
    """The inverse of `merge_shards`: P state dicts, one per model-parallel rank."""
    P = num_shards
    if P == 1:
        return [sd]
    emb_dim = embedding_split_dim(args)
    need = {"n_heads": args.n_heads, "ffn_hidden_dim": args.ffn_hidden_dim, "vocab_size": args.vocab_size}
    if emb_dim == 1:
        need["dim"] = args.dim
    bad = [f"{k}={v}" for k, v in need.items() if v % P]
    if args.n_kv_heads % P and P % args.n_kv_heads:
        bad.append(f"n_kv_heads={args.n_kv_heads}")
    if bad:
        raise CheckpointError(f"cannot split into {P} model-parallel shards: {', '.join(bad)} not divisible by {P} "
                   f"(n_kv_heads must divide or be divided by it); choose num_shards dividing all of them")
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(P)]
    for key, w in sd.items():
        name = module_name(key)
        if name in REPLICATED:
            parts = [w] * P
        elif name in ("wk", "wv") and P > args.n_kv_heads:
            heads = w.view(args.n_kv_heads, args.head_dim, -1)  # [Hkv, D, C]
            parts = [heads[r // (P // args.n_kv_heads)] for r in range(P)]  # repeat each KV head on P/Hkv ranks
        else:
            dim = emb_dim if name == "tok_embeddings" else SPLIT_DIM[name]
            parts = list(w.chunk(P, dim=dim))
        for shard, part in zip(shards, parts):
            shard[key] = part
    return shards


def write_meta(args: ModelArgs, sd: dict[str, torch.Tensor], folder: Path, num_shards: int) -> None:
    """Write consolidated.NN.pth shards, then params.json."""
    params = params_from_args(args)
    for rank, shard in enumerate(split_state_dict(sd, args, num_shards)):
        write_torch(folder / f"consolidated.{rank:02d}.pth", shard)
    write_json(folder / PARAMS_FILE, params)
