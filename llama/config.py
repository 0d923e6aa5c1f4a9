"""Model configuration: one dataclass for every LLaMA generation, and a named preset for every released size.

The field names follow Meta's `params.json` (`dim`, `n_layers`, `n_heads`, `n_kv_heads`, `multiple_of`,
`ffn_dim_multiplier`, `norm_eps`, `rope_theta`), so a Meta checkpoint's params map onto this class one to one.
Generations differ only by rows of the preset table at the bottom of this file (sources: Meta's papers,
reference code and `params.json` files, and HF `config.json` files; parameter counts computed from those shapes).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Optional

from .checks import ConfigError, check_bool, check_int, check_real

ROPE_SCALING_TYPES = ("llama3", "linear", "dynamic", "yarn")


@dataclass(frozen=True)
class RopeScaling:
    """Frequency scaling of RoPE for context extension (formulas in `llama.rope.scaled_frequencies`).

    factor s and the pre-training context L0 (`original_max_position_embeddings`) have no safe default (Llama 3.1
    uses s=8, Llama 3.2 s=32, Llama 4 Scout s=16), so they must be given; only `linear` can do without L0.
    """

    rope_type: str = "llama3"  # llama3 (Meta) | linear (PI) | dynamic (NTK) | yarn
    factor: Optional[float] = None  # s: context extension ratio, >= 1
    # llama3 only (Meta `apply_scaling`): wavelengths > L0/low are divided by s, < L0/high kept, blended between.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: Optional[int] = None  # L0: pre-training context
    # YaRN only (arXiv 2309.00071 §3.2): ramp bounds in rotations over L0, and the attention temperature (§3.4).
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: Optional[float] = None  # None -> 0.1·ln(s) + 1 (or the mscale ratio below)
    mscale: Optional[float] = None  # DeepSeek-style variant: factor = mscale_fn(s, mscale)/mscale_fn(s, mscale_all_dim)
    mscale_all_dim: Optional[float] = None
    truncate: bool = True  # YaRN ramp bounds rounded outward to whole dimensions (HF default)

    def __post_init__(self):
        if self.rope_type not in ROPE_SCALING_TYPES:
            raise ConfigError("RopeScaling.rope_type", f"unknown rope scaling type {self.rope_type!r}; use one of "
                                                       f"{ROPE_SCALING_TYPES} (or rope_scaling=None)")
        if self.factor is None:
            raise ConfigError("RopeScaling.factor", f"rope scaling {self.rope_type!r} needs `factor` (the context "
                              f"extension ratio s >= 1, e.g. 8 for Llama 3.1); pass RopeScaling({self.rope_type!r}, "
                              f"factor=...)")
        check_real("RopeScaling.factor", self.factor, minimum=1.0, strict=False)  # s < 1 would shrink the context
        if self.original_max_position_embeddings is None and self.rope_type != "linear":
            raise ConfigError("RopeScaling.original_max_position_embeddings", f"rope scaling {self.rope_type!r} needs "
                              f"`original_max_position_embeddings` (the pre-training context L0, e.g. 8192 for "
                              f"Llama 3)")
        check_int("RopeScaling.original_max_position_embeddings", self.original_max_position_embeddings, optional=True)
        for key in ("low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow"):
            check_real(f"RopeScaling.{key}", getattr(self, key))
        check_real("RopeScaling.attention_factor", self.attention_factor, minimum=0.0, optional=True)
        for key in ("mscale", "mscale_all_dim"):
            check_real(f"RopeScaling.{key}", getattr(self, key), minimum=0.0, strict=False, optional=True)
        check_bool("RopeScaling.truncate", self.truncate)
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor >= 0:
            if not (self.high_freq_factor == self.low_freq_factor > 0):  # Llama 4 Scout: low == high == 1, no blend
                raise ConfigError("RopeScaling.low_freq_factor", f"llama3 rope scaling needs high_freq_factor >= "
                                  f"low_freq_factor > 0 (got low={self.low_freq_factor}, high={self.high_freq_factor})")
        if self.rope_type == "yarn" and not self.beta_fast > self.beta_slow > 0:
            raise ConfigError("RopeScaling.beta_fast", f"yarn needs beta_fast > beta_slow > 0 (got {self.beta_fast}, "
                                                       f"{self.beta_slow})")

    @classmethod
    def from_hf(cls, params: Optional[dict]) -> Optional["RopeScaling"]:
        """From a HF `rope_scaling` / `rope_parameters` dict (None or rope_type "default" -> no scaling).

        Note for `dynamic`: HF's `max_position_embeddings` is the length up to which RoPE is unscaled; pass it here
        as `original_max_position_embeddings` (the caller fills it in when the dict lacks it).
        """
        if not params:
            return None
        params = dict(params)
        rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
        params.pop("type", None)
        params.pop("rope_theta", None)
        params.pop("partial_rotary_factor", None)
        if rope_type == "default":
            return None
        known = {f.name for f in dataclasses.fields(cls)} - {"rope_type"}
        unknown = set(params) - known
        if unknown:
            raise ValueError(f"unsupported rope scaling keys {sorted(unknown)} for type {rope_type!r}")
        return cls(rope_type, **{k: v for k, v in params.items() if v is not None})

    def to_hf(self) -> dict:
        """The HF `rope_scaling` dict of this scaling (keys HF's rope-init function of that type reads)."""
        keys = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                "linear": ("factor",),
                "dynamic": ("factor",),
                "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor",
                         "mscale", "mscale_all_dim", "truncate")}[self.rope_type]
        out = {"rope_type": self.rope_type}
        out.update({k: getattr(self, k) for k in keys if getattr(self, k) is not None})
        return out


@dataclass(frozen=True)
class MoEArgs:
    """Llama 4 mixture-of-experts feed-forward (Meta `moe_args`; formulas in `llama.moe`).

    A layer i is MoE iff (i + 1) % interleave_moe_layer_step == 0 (Scout: step 1, every layer; Maverick: step 2,
    odd layers), the rest keep the dense SwiGLU.
    """

    num_experts: int = 16  # E routed experts (plus one always-on shared expert)
    top_k: int = 1  # experts per token (Llama 4: 1)
    interleave_moe_layer_step: int = 1
    # Meta's sizing rule for the expert hidden size: with auto_scale_F the dense size is divided by
    # (capacity_factor + 1), so the routed expert + shared expert touch as many weights as one dense FFN.
    capacity_factor: float = 1.0
    auto_scale_F: bool = True  # noqa: N815  (Meta's name)
    shared_expert: bool = True  # Llama 4 always has one; False only for ablations (plain Switch-style MoE)
    # Switch Transformer training (arXiv 2101.03961 §2.2): each expert takes at most
    # ceil(expert_capacity_factor · tokens·top_k / E) tokens per forward; the rest skip the routed expert.
    # None: no limit (inference in Meta's and HF's references never drops tokens).
    expert_capacity_factor: Optional[float] = None
    # Coefficients a training loop may use with `Transformer.aux_losses()` (Switch α = 1e-2, ST-MoE c_z = 1e-3).
    load_balance_coef: float = 1e-2
    router_z_loss_coef: float = 1e-3

    def __post_init__(self):
        for key in ("num_experts", "top_k", "interleave_moe_layer_step"):  # step 1: every layer MoE
            check_int(f"MoEArgs.{key}", getattr(self, key))
        if self.top_k > self.num_experts:
            raise ConfigError("MoEArgs.top_k", f"MoEArgs.top_k ({self.top_k}) is larger than num_experts "
                              f"({self.num_experts}); a token cannot pick more experts than exist: lower top_k or add "
                              f"experts")
        check_real("MoEArgs.capacity_factor", self.capacity_factor, minimum=0.0)
        check_real("MoEArgs.expert_capacity_factor", self.expert_capacity_factor, minimum=0.0, optional=True)
        for key in ("load_balance_coef", "router_z_loss_coef"):
            check_real(f"MoEArgs.{key}", getattr(self, key), minimum=0.0, strict=False)
        for key in ("auto_scale_F", "shared_expert"):
            check_bool(f"MoEArgs.{key}", getattr(self, key))


@dataclass(frozen=True)
class Llama4VisionArgs:
    """Llama 4 vision encoder, pixel-shuffle adapter and projector (Meta `vision_args`; `llama.vision.llama4_encoder`).

    Square tiles of `image_size` pixels are cut into a g×g grid of patches (g = image_size / patch_size); pixel
    shuffle with ratio r turns the g·g patch vectors of width `dim` into (g·r)² vectors of width dim/r², which the
    adapter MLP maps to `output_dim` and the projector to the text model's width. LayerNorm eps is 1e-5 and the
    input has 3 (RGB) channels in both references (neither reads them from the config).
    """

    image_size: int = 336  # tile side in pixels (Meta `image_size.height` = `.width`)
    patch_size: int = 14
    dim: int = 1408  # encoder width
    n_layers: int = 34
    n_heads: int = 16
    mlp_ratio: float = 4.0  # encoder MLP hidden = int(mlp_ratio·dim)
    output_dim: int = 4096  # adapter width (HF `projector_output_dim` = `vision_output_dim`)
    pixel_shuffle_ratio: float = 0.5
    rope_theta: float = 10000.0  # 2D RoPE base
    image_token_id: int = 200092  # `<|patch|>`: the prompt positions that receive image features

    def __post_init__(self):
        for key in ("image_size", "patch_size", "dim", "n_layers", "n_heads", "output_dim"):
            check_int(f"Llama4VisionArgs.{key}", getattr(self, key))
        check_int("Llama4VisionArgs.image_token_id", self.image_token_id, minimum=0)
        for key in ("mlp_ratio", "pixel_shuffle_ratio", "rope_theta"):
            check_real(f"Llama4VisionArgs.{key}", getattr(self, key), minimum=0.0)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size}) "
                             f"so the tile is a whole grid of patches")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 4:
            raise ValueError(f"the vision head dim dim/n_heads ({self.dim}/{self.n_heads}) must be a whole multiple "
                             f"of 4: 2D RoPE rotates half of each head's pairs by the column, half by the row")
        s = self.shuffle_factor
        if s * self.pixel_shuffle_ratio != 1 or self.grid_size % s:
            raise ValueError(f"pixel_shuffle_ratio {self.pixel_shuffle_ratio} must be 1/s for an integer s dividing "
                             f"the patch grid side {self.grid_size} (Llama 4: 0.5 on a 24×24 grid)")

    @property
    def grid_size(self) -> int:
        """g: patches along each side of a tile (Llama 4: 336 / 14 = 24)."""
        return self.image_size // self.patch_size

    @property
    def shuffle_factor(self) -> int:
        """s = 1/r: pixel shuffle stacks s×s neighbouring patches into one vector (Llama 4: 2)."""
        return round(1 / self.pixel_shuffle_ratio)

    @property
    def tokens_per_tile(self) -> int:
        """Image tokens one tile fills in the prompt: (g/s)² (Llama 4: 12² = 144)."""
        return (self.grid_size // self.shuffle_factor) ** 2


@dataclass(frozen=True)
class LayerSpec:
    """What one decoder layer does, derived from `ModelArgs` (all False/None for dense LLaMA 1-3)."""

    use_rope: bool = True  # False: a Llama 4 NoPE ("global") layer
    attention_chunk_size: Optional[int] = None  # chunked local causal attention (Llama 4 RoPE layers)
    qk_norm: bool = False  # parameter-free RMS norm of q and k after RoPE (Llama 4 Scout)
    temperature_tuning: bool = False  # q scaled by 1 + attn_scale·ln(1 + floor((m+1)/floor_scale)) (NoPE layers)
    moe: bool = False  # routed experts + shared expert instead of the dense SwiGLU


@dataclass
class ModelArgs:
    """Architecture hyper-parameters of one LLaMA model (generations 1 to 3.3; Llama 4 text via the last block)."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None -> n_heads (multi-head attention)
    vocab_size: int = 32000
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    max_seq_len: int = 2048  # context the model was trained for; longer inputs are refused
    tie_word_embeddings: bool = False  # Llama 3.2 1B/3B share tok_embeddings and output
    head_dim: Optional[int] = None  # None -> dim // n_heads
    ffn_hidden_dim: Optional[int] = None  # explicit override of the multiple_of rule (HF `intermediate_size`)
    # --- Llama 4 (Meta params.json names; every default keeps the dense behaviour above) ---
    nope_layer_interval: Optional[int] = None  # layers with (i+1) % interval == 0 use no RoPE (iRoPE), Llama 4: 4
    attention_chunk_size: Optional[int] = None  # RoPE layers attend only inside chunks of this many positions
    use_qk_norm: bool = False  # RMS-normalise q and k (no weight) after RoPE on RoPE layers (Scout)
    attn_temperature_tuning: bool = False  # NoPE layers: q ·= 1 + attn_scale·ln(1 + floor((m+1)/floor_scale))
    floor_scale: float = 8192.0
    attn_scale: float = 0.1
    moe_args: Optional[MoEArgs] = None  # None: dense SwiGLU in every layer
    ffn_exp: Optional[float] = None  # Meta's expert sizing: hidden = int(ffn_exp·dim) before the 2/3 rule
    moe_hidden_dim: Optional[int] = None  # explicit expert hidden size (HF `intermediate_size` of Llama 4)
    # RoPE arithmetic: False rotates in the activation dtype (HF Llama 1-3, exact float64 parity); True rotates
    # q, k as complex64 numbers like Meta's references and HF Llama 4 (float32 even in a float64 model).
    rope_complex64: bool = False
    # --- Llama 4 multimodal: a vision encoder whose features replace the embeddings of image tokens (early fusion).
    # Built by `llama.vision.llama4_model.Llama4Multimodal`; `Transformer(args)` is always the text trunk alone.
    vision_args: Optional[Llama4VisionArgs] = None
    name: str = ""

    def __post_init__(self):
        """Check every field (type, finiteness, range) before anything is built; derive the sizes left as None."""
        self.rope_scaling = _sub_config("rope_scaling", self.rope_scaling, RopeScaling)
        self.moe_args = _sub_config("moe_args", self.moe_args, MoEArgs)
        self.vision_args = _sub_config("vision_args", self.vision_args, Llama4VisionArgs)
        for key in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            setattr(self, key, check_int(f"ModelArgs.{key}", getattr(self, key)))
        for key in ("n_kv_heads", "head_dim", "ffn_hidden_dim", "moe_hidden_dim", "nope_layer_interval",
                    "attention_chunk_size"):  # None: derived (the first four) or off (the last two)
            setattr(self, key, check_int(f"ModelArgs.{key}", getattr(self, key), optional=True))
        for key in ("norm_eps", "rope_theta", "floor_scale"):
            setattr(self, key, check_real(f"ModelArgs.{key}", getattr(self, key), minimum=0.0))
        for key in ("ffn_dim_multiplier", "ffn_exp"):
            setattr(self, key, check_real(f"ModelArgs.{key}", getattr(self, key), minimum=0.0, optional=True))
        self.attn_scale = check_real("ModelArgs.attn_scale", self.attn_scale, minimum=0.0, strict=False)
        for key in ("tie_word_embeddings", "use_qk_norm", "attn_temperature_tuning", "rope_complex64"):
            check_bool(f"ModelArgs.{key}", getattr(self, key))
        if not isinstance(self.name, str):
            raise ConfigError("ModelArgs.name", f"ModelArgs.name must be a string, got {self.name!r}")
        self._derive_sizes()

    def _derive_sizes(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ConfigError("ModelArgs.n_heads", f"dim ({self.dim}) is not divisible by n_heads "
                                  f"({self.n_heads}); choose n_heads dividing dim or set head_dim explicitly")
            self.head_dim = self.dim // self.n_heads
        if self.head_dim % 2:
            raise ConfigError("ModelArgs.head_dim", f"head_dim must be even for RoPE (pairs of dimensions rotate "
                                                    f"together), got {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError("ModelArgs.n_kv_heads", f"n_heads ({self.n_heads}) is not divisible by n_kv_heads "
                              f"({self.n_kv_heads}); grouped-query attention needs every KV head to serve the same "
                              f"number of query heads")
        if self.ffn_hidden_dim is None:
            self.ffn_hidden_dim = ffn_hidden_size(self.dim, self.multiple_of, self.ffn_dim_multiplier)
        if self.vision_args is not None and not self.vision_args.image_token_id < self.vocab_size:
            raise ConfigError("Llama4VisionArgs.image_token_id", f"the image token id "
                              f"{self.vision_args.image_token_id} is outside the vocabulary [0, {self.vocab_size}); "
                              f"set Llama4VisionArgs.image_token_id to the `<|patch|>` id")
        if self.moe_args is None:
            return
        step = self.moe_args.interleave_moe_layer_step
        if self.n_layers % step:
            raise ConfigError("MoEArgs.interleave_moe_layer_step", f"interleave_moe_layer_step ({step}) must divide "
                              f"n_layers ({self.n_layers}) so the dense/MoE pattern tiles the stack (Scout 48/1, "
                              f"Maverick 48/2); change either")
        if self.moe_hidden_dim is None:
            if self.ffn_exp is None:
                raise ConfigError("ModelArgs.ffn_exp", "an MoE model needs the expert hidden size: set ffn_exp "
                                  "(Meta, e.g. 4.0) or moe_hidden_dim (HF intermediate_size)")
            self.moe_hidden_dim = moe_hidden_size(self.dim, self.ffn_exp, self.ffn_dim_multiplier, self.multiple_of,
                                                  self.moe_args)

    def layer_spec(self, layer_id: int) -> LayerSpec:
        """Per-layer flags (Meta Llama 4 `TransformerBlock.__init__`); dense for LLaMA 1-3."""
        nope = self.nope_layer_interval is not None and (layer_id + 1) % self.nope_layer_interval == 0
        moe = self.moe_args is not None and (layer_id + 1) % self.moe_args.interleave_moe_layer_step == 0
        return LayerSpec(use_rope=not nope,
                         attention_chunk_size=None if nope else self.attention_chunk_size,
                         qk_norm=self.use_qk_norm and not nope,
                         temperature_tuning=self.attn_temperature_tuning and nope,
                         moe=moe)

    @property
    def n_rep(self) -> int:
        """Query heads per KV head (GQA group size; 1 for multi-head attention)."""
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelArgs":
        """The preset called `name` (see `list_models()`), with optional field overrides."""
        if name not in PRESETS:
            close = difflib.get_close_matches(name, PRESETS, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown model name {name!r}{hint} (llama.list_models() lists all presets)")
        # rebuilt from the preset's own fields, so derived sizes (head_dim, FFN/expert hidden) follow the overrides
        return cls(**{**PRESETS[name].fields, **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _sub_config(key: str, value, cls):
    """None, an instance of `cls`, or a dict of its fields (as read from JSON/TOML) turned into one."""
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"ModelArgs.{key}", f"ModelArgs.{key} must be a {cls.__name__}, a dict of its fields or "
                                              f"None, got {type(value).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(f"ModelArgs.{key}", f"ModelArgs.{key} has unknown fields {unknown}; {cls.__name__} "
                                              f"takes {sorted(known)}")
    return cls(**value)


def ffn_hidden_size(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """SwiGLU hidden size, Meta's rule (LLaMA §2.2: "2/3·4d instead of 4d"), then multiplier and rounding up."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


def moe_hidden_size(dim: int, ffn_exp: float, ffn_dim_multiplier: Optional[float], multiple_of: int,
                    moe: MoEArgs) -> int:
    """Expert hidden size, Meta Llama 4 `MoE.__init__`: int(ffn_exp·D) -> 2/3 -> multiplier -> /(cf+1) -> round up.

    Scout/Maverick: 20480 -> 13653 -> 16383 -> 8191 -> 8192.
    """
    hidden = int(2 * int(ffn_exp * dim) / 3)
    hidden = int((ffn_dim_multiplier or 1.0) * hidden)
    if moe.auto_scale_F:
        hidden = int(hidden / (moe.capacity_factor + 1))
    return multiple_of * math.ceil(hidden / multiple_of)


def _ffn_parameters(args: ModelArgs, layer_id: int, active: bool) -> int:
    """Weights of one layer's FFN; with `active`, only those one token touches (top_k routed experts)."""
    D = args.dim
    if not args.layer_spec(layer_id).moe:
        return 3 * D * args.ffn_hidden_dim
    E, Fe = args.moe_args.num_experts, args.moe_hidden_dim
    routed = args.moe_args.top_k if active else E
    shared = 3 * D * Fe if args.moe_args.shared_expert else 0
    return routed * 3 * D * Fe + shared + D * E  # routed experts + shared expert + router


def count_parameters(args: ModelArgs) -> int:
    """Closed-form parameter count summed over the released shapes, independent of the module code."""
    return _count(args, active=False)


def count_active_parameters(args: ModelArgs, include_embedding: bool = True) -> int:
    """Parameters one token touches in a forward pass: the top_k routed experts of each MoE layer instead of all.

    include_embedding=True counts the whole input embedding table like Meta's "17B active" (Llama 4 model card;
    ours from the released shapes: Scout 17,172,894,720, Maverick 17,184,691,200); False leaves it out
    (16,138,408,960 / 16,150,205,440).
    For a dense model this is the total count (minus the embedding table when excluded).
    """
    total = _count(args, active=True)
    if not include_embedding and not args.tie_word_embeddings:
        total -= args.vocab_size * args.dim
    return total


def _count(args: ModelArgs, active: bool) -> int:
    D, L, H, KV, hd, V = args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.head_dim, args.vocab_size
    embed = V * D * (1 if args.tie_word_embeddings else 2)
    attention = D * H * hd + 2 * D * KV * hd + H * hd * D
    ffn = sum(_ffn_parameters(args, i, active) for i in range(L))
    vision = 0 if args.vision_args is None else count_vision_parameters(args.vision_args, D)
    return embed + D + L * (attention + 2 * D) + ffn + vision


def count_vision_parameters(v: Llama4VisionArgs, text_dim: int) -> int:
    """Llama 4 vision encoder + adapter + projector, in closed form (Scout/Maverick: 850,960,896 + 20,971,520)."""
    C, P, F = v.dim, v.grid_size ** 2, int(v.mlp_ratio * v.dim)
    patches = 3 * v.patch_size ** 2 * C  # unfold + linear, no bias
    embeddings = C + (P + 1) * C + 2 * 2 * C  # class token, positions of P patches + class, ln_pre, ln_post
    layer = 4 * (C * C + C) + (C * F + F) + (F * C + C) + 2 * 2 * C  # q k v o, MLP, two LayerNorms (all biased)
    adapter = C * v.shuffle_factor ** 2 * v.output_dim + v.output_dim ** 2  # two bias-free layers
    return patches + embeddings + v.n_layers * layer + adapter + v.output_dim * text_dim


# ---------------------------------------------------------------------------------------------------------------
# Presets. `published` is the exact count we compute from the Meta/HF releases' shapes (see `llama.zoo`).


@dataclass(frozen=True)
class Preset:
    args: ModelArgs
    published: Optional[int]  # the release's parameter count (None for tiny test presets)
    source: str = ""
    family: str = ""
    fields: dict = field(default_factory=dict)  # the constructor arguments of `args` (derived sizes left out)
    # True: `published` is an exact published total (HF safetensors count). False: no exact total was published
    # (papers and model cards round, e.g. "6.7B"), so `published` is counted from the released shapes (`source`).
    exact: bool = True


PRESETS: dict[str, Preset] = {}


def _add(name: str, published: Optional[int], source: str, family: str, exact: bool = True, **kw) -> None:
    PRESETS[name] = Preset(ModelArgs(name=name, **kw), published, source, family, dict(name=name, **kw), exact)


_L3_SCALING = RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)
# Llama 3.2 1B/3B use factor 32 (HF config; Meta's reference hard-codes 8, fixed after release: llama-models#166).
_L32_SCALING = dataclasses.replace(_L3_SCALING, factor=32.0)

# LLaMA 1 (arXiv 2302.13971, Table 2): MHA, eps 1e-6 (released params.json), theta 1e4, context 2048.
for _name, (_d, _l, _h, _n) in {
    "llama-7b": (4096, 32, 32, 6_738_415_616),
    "llama-13b": (5120, 40, 40, 13_015_864_320),
    "llama-33b": (6656, 60, 52, 32_528_943_616),
    "llama-65b": (8192, 80, 64, 65_285_660_672),
}.items():
    _add(_name, _n, "LLaMA paper Tab. 2 (6.7/13.0/32.5/65.2B); exact count from the released shapes", "LLaMA 1",
         exact=False, dim=_d, n_layers=_l, n_heads=_h, norm_eps=1e-6, max_seq_len=2048)

# Llama 2 (arXiv 2307.09288, Tab. 1): eps 1e-5, context 4096; GQA (8 KV heads) only for 70B.
_add("llama-2-7b", 6_738_415_616, "HF safetensors total 6,738,417,664 minus 2,048 inv_freq buffer elements",
     "Llama 2", dim=4096, n_layers=32, n_heads=32, max_seq_len=4096)
_add("llama-2-13b", 13_015_864_320, "HF total minus 2,560 inv_freq elements", "Llama 2",
     dim=5120, n_layers=40, n_heads=40, max_seq_len=4096)
_add("llama-2-70b", 68_976_648_192, "HF total minus 5,120 inv_freq elements", "Llama 2",
     dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3, max_seq_len=4096)

# Code Llama (arXiv 2308.12950): theta 1e6 for 16k context; 7B/13B/70B have 32,016 rows (4 infilling tokens).
_add("code-llama-7b", 6_738_546_688, "computed from HF config (no exact published count)", "Code Llama",
     exact=False, dim=4096, n_layers=32, n_heads=32, vocab_size=32016, rope_theta=1e6, max_seq_len=16384)
_add("code-llama-13b", 13_016_028_160, "computed from HF config", "Code Llama", exact=False,
     dim=5120, n_layers=40, n_heads=40, vocab_size=32016, rope_theta=1e6, max_seq_len=16384)
_add("code-llama-34b", 33_743_970_304, "computed from HF config", "Code Llama", exact=False,
     dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.0, rope_theta=1e6, max_seq_len=16384)
_add("code-llama-70b", 68_976_910_336, "computed from HF config", "Code Llama", exact=False,
     dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32016, multiple_of=4096, ffn_dim_multiplier=1.3,
     rope_theta=1e6, max_seq_len=16384)
# 70B Instruct / Python: theta 1e4 and 4096 context (Meta, codellama#188).
_add("code-llama-70b-instruct", 68_976_910_336, "computed from HF config", "Code Llama", exact=False,
     dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32016, multiple_of=4096, ffn_dim_multiplier=1.3,
     rope_theta=1e4, max_seq_len=4096)

# Llama 3 (arXiv 2407.21783, Tab. 3): GQA everywhere, vocab 128,256, theta 5e5; 3.1 adds llama3 RoPE scaling.
_L3 = dict(vocab_size=128256, n_kv_heads=8, rope_theta=500000.0)
_add("llama-3-8b", 8_030_261_248, "HF safetensors total", "Llama 3",
     dim=4096, n_layers=32, n_heads=32, multiple_of=1024, ffn_dim_multiplier=1.3, max_seq_len=8192, **_L3)
_add("llama-3-70b", 70_553_706_496, "HF safetensors total", "Llama 3",
     dim=8192, n_layers=80, n_heads=64, multiple_of=4096, ffn_dim_multiplier=1.3, max_seq_len=8192, **_L3)
_add("llama-3.1-8b", 8_030_261_248, "HF safetensors total", "Llama 3.1",
     dim=4096, n_layers=32, n_heads=32, multiple_of=1024, ffn_dim_multiplier=1.3, max_seq_len=131072,
     rope_scaling=_L3_SCALING, **_L3)
_add("llama-3.1-70b", 70_553_706_496, "HF safetensors total", "Llama 3.1",
     dim=8192, n_layers=80, n_heads=64, multiple_of=4096, ffn_dim_multiplier=1.3, max_seq_len=131072,
     rope_scaling=_L3_SCALING, **_L3)
_add("llama-3.1-405b", 405_853_388_800, "HF safetensors total", "Llama 3.1",
     dim=16384, n_layers=126, n_heads=128, multiple_of=4096, ffn_dim_multiplier=1.2, max_seq_len=131072,
     rope_scaling=_L3_SCALING, **_L3)
_add("llama-3.2-1b", 1_235_814_400, "HF safetensors total; model card 1.23B", "Llama 3.2",
     dim=2048, n_layers=16, n_heads=32, multiple_of=256, ffn_dim_multiplier=1.5, max_seq_len=131072,
     rope_scaling=_L32_SCALING, tie_word_embeddings=True, **_L3)
_add("llama-3.2-3b", 3_212_749_824, "HF safetensors total; model card 3.21B", "Llama 3.2",
     dim=3072, n_layers=28, n_heads=24, multiple_of=256, ffn_dim_multiplier=1.0, max_seq_len=131072,
     rope_scaling=_L32_SCALING, tie_word_embeddings=True, **_L3)
_add("llama-3.3-70b", 70_553_706_496, "HF safetensors total", "Llama 3.3",
     dim=8192, n_layers=80, n_heads=64, multiple_of=4096, ffn_dim_multiplier=1.3, max_seq_len=131072,
     rope_scaling=_L3_SCALING, **_L3)

# Llama 4 text trunks (Meta llama-models `models/llama4/args.py`, HF `Llama4TextConfig`): iRoPE with a
# NoPE layer every 4th layer, chunked local attention (8192) on the RoPE layers, temperature tuning on NoPE layers,
# 1 shared + E routed experts with a sigmoid top-1 router. Counts are the text part of the HF safetensors totals.
_L4 = dict(dim=5120, n_layers=48, n_heads=40, n_kv_heads=8, vocab_size=202048, multiple_of=2048,
           ffn_dim_multiplier=1.2, ffn_exp=4.0, norm_eps=1e-5, rope_theta=500000.0, nope_layer_interval=4,
           attention_chunk_size=8192, attn_temperature_tuning=True, floor_scale=8192.0, attn_scale=0.1,
           rope_complex64=True)
_add("llama-4-scout", 107_769_861_120, "HF Llama-4-Scout-17B-16E total 108,641,793,536 minus vision encoder, "
     "adapter and projector (871,932,416)", "Llama 4", max_seq_len=10_485_760, use_qk_norm=True,
     rope_scaling=RopeScaling("llama3", factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
                              original_max_position_embeddings=8192),
     moe_args=MoEArgs(num_experts=16, top_k=1, interleave_moe_layer_step=1), **_L4)
_add("llama-4-maverick", 400_711_848_960, "HF Llama-4-Maverick-17B-128E total 401,583,781,376 minus vision "
     "encoder, adapter and projector (871,932,416)", "Llama 4", max_seq_len=1_048_576, use_qk_norm=False,
     moe_args=MoEArgs(num_experts=128, top_k=1, interleave_moe_layer_step=2), **_L4)

# Llama 4 as released: the same trunks with the vision encoder, pixel-shuffle adapter and projector (Meta
# `vision_args`; HF `Llama4VisionConfig` of both hub configs): 336-pixel tiles of 24×24 patches, 34 layers of width
# 1408, 144 tokens per tile. Counts: HF safetensors totals of Llama-4-{Scout-17B-16E,Maverick-17B-128E}.
_L4_VISION = Llama4VisionArgs(image_size=336, patch_size=14, dim=1408, n_layers=34, n_heads=16, mlp_ratio=4.0,
                              output_dim=4096, pixel_shuffle_ratio=0.5)
for _name, _n in (("llama-4-scout", 108_641_793_536), ("llama-4-maverick", 401_583_781_376)):
    _fields = {k: v for k, v in PRESETS[_name].fields.items() if k != "name"}
    _add(f"{_name}-vision", _n, "HF safetensors total (text trunk + vision encoder, adapter, projector)", "Llama 4",
         vision_args=_L4_VISION, **_fields)

# Tiny presets for tests and CPU ablations: the same architecture at toy width, one per generation's features.
_TINY = dict(dim=64, n_layers=2, n_heads=4, vocab_size=256, multiple_of=32, max_seq_len=256)
_add("tiny-llama-1", None, "test preset", "tiny", norm_eps=1e-6, **_TINY)
_add("tiny-llama-2-gqa", None, "test preset", "tiny", n_kv_heads=2, **_TINY)
_add("tiny-llama-3", None, "test preset", "tiny", n_kv_heads=2, rope_theta=500000.0,
     rope_scaling=RopeScaling("llama3", factor=8.0, original_max_position_embeddings=64), **_TINY)
_add("tiny-llama-3.2", None, "test preset", "tiny", n_kv_heads=1, rope_theta=500000.0, tie_word_embeddings=True,
     rope_scaling=RopeScaling("llama3", factor=32.0, original_max_position_embeddings=64), **_TINY)
# Tiny Llama 4: 4 layers so that layer 3 is NoPE; chunks of 16 and floor_scale 16 so chunking and temperature tuning
# act within short test sequences.
_TINY4 = dict(_TINY, n_layers=4, n_kv_heads=2, rope_theta=500000.0, nope_layer_interval=4, attention_chunk_size=16,
              attn_temperature_tuning=True, floor_scale=16.0, attn_scale=0.1, ffn_exp=2.0, rope_complex64=True)
_add("tiny-llama-4-scout", None, "test preset", "tiny", use_qk_norm=True,
     moe_args=MoEArgs(num_experts=4, interleave_moe_layer_step=1), **_TINY4)
_add("tiny-llama-4-maverick", None, "test preset", "tiny", use_qk_norm=False,
     moe_args=MoEArgs(num_experts=8, interleave_moe_layer_step=2), **_TINY4)
# Tiny Llama 4 multimodal: 32-pixel tiles of 8×8 patches -> 16 image tokens per tile; image token id 200 (< vocab).
_add("tiny-llama-4-scout-vision", None, "test preset", "tiny", use_qk_norm=True,
     moe_args=MoEArgs(num_experts=4, interleave_moe_layer_step=1),
     vision_args=Llama4VisionArgs(image_size=32, patch_size=4, dim=48, n_layers=2, n_heads=4, mlp_ratio=4.0,
                                  output_dim=40, pixel_shuffle_ratio=0.5, image_token_id=200), **_TINY4)


def list_models() -> list[str]:
    """Names of every preset, released sizes first."""
    return list(PRESETS)
