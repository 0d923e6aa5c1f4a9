"""Model configuration: one dataclass for every LLaMA generation, and a named preset for every released size.

The field names follow Meta's `params.json` (`dim`, `n_layers`, `n_heads`, `n_kv_heads`, `multiple_of`,
`ffn_dim_multiplier`, `norm_eps`, `rope_theta`), so a Meta checkpoint's params map onto this class one to one.
Generations differ only by rows of the preset table at the bottom of this file (sources: Meta's papers and
reference code; the table and its checks are in the project's research notes on the model family).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Optional

ROPE_SCALING_TYPES = ("llama3", "linear", "dynamic", "yarn")


@dataclass(frozen=True)
class RopeScaling:
    """Frequency scaling of RoPE for context extension.

    `llama3` is Meta's Llama 3.1 rule (factor, low/high frequency factors, original context L0); the other types
    (position interpolation, dynamic NTK, YaRN) are defined in `llama.rope`.
    """

    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # YaRN only (arXiv 2309.00071 §3): ramp bounds in rotations, and an optional explicit attention factor.
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: Optional[float] = None

    def __post_init__(self):
        if self.rope_type not in ROPE_SCALING_TYPES:
            raise ValueError(
                f"unknown rope scaling type {self.rope_type!r}; use one of {ROPE_SCALING_TYPES} (or rope_scaling=None)"
            )
        if not self.factor >= 1.0:
            raise ValueError(f"rope scaling factor must be >= 1 (got {self.factor}); a factor < 1 would shrink context")
        if self.original_max_position_embeddings <= 0:
            raise ValueError("rope scaling needs original_max_position_embeddings > 0 (the pre-training context)")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor >= 0:
            if not (self.high_freq_factor == self.low_freq_factor > 0):  # Llama 4 Scout: low == high == 1, no blend
                raise ValueError(
                    f"llama3 rope scaling needs high_freq_factor >= low_freq_factor > 0 "
                    f"(got low={self.low_freq_factor}, high={self.high_freq_factor})"
                )


@dataclass
class ModelArgs:
    """Architecture hyper-parameters of one LLaMA model (dense generations 1 to 3.3)."""

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
    name: str = ""

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelArgs.{key} must be a positive integer, got {value!r}")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(
                    f"dim ({self.dim}) is not divisible by n_heads ({self.n_heads}); choose n_heads dividing dim "
                    f"or set head_dim explicitly"
                )
            self.head_dim = self.dim // self.n_heads
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"head_dim must be a positive even number for RoPE, got {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) is not divisible by n_kv_heads ({self.n_kv_heads}); grouped-query "
                f"attention needs every KV head to serve the same number of query heads"
            )
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.ffn_dim_multiplier is not None and self.ffn_dim_multiplier <= 0:
            raise ValueError(f"ffn_dim_multiplier must be > 0 or None, got {self.ffn_dim_multiplier}")
        if self.ffn_hidden_dim is None:
            self.ffn_hidden_dim = ffn_hidden_size(self.dim, self.multiple_of, self.ffn_dim_multiplier)
        elif self.ffn_hidden_dim <= 0:
            raise ValueError(f"ffn_hidden_dim must be positive, got {self.ffn_hidden_dim}")

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
        args = dataclasses.replace(PRESETS[name].args, **overrides)
        return args

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        return out


def ffn_hidden_size(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """SwiGLU hidden size, Meta's rule (LLaMA §2.2: "2/3·4d instead of 4d"), then multiplier and rounding up."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


def count_parameters(args: ModelArgs) -> int:
    """Closed-form parameter count of a dense model (research notes §3.1), independent of the module code."""
    D, L, H, KV, hd, F, V = (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.head_dim,
                             args.ffn_hidden_dim, args.vocab_size)
    embed = V * D * (1 if args.tie_word_embeddings else 2)
    per_layer = D * H * hd + 2 * D * KV * hd + H * hd * D + 3 * D * F + 2 * D
    return embed + D + L * per_layer


# ---------------------------------------------------------------------------------------------------------------
# Presets. `published` is the exact count the notes reproduce from Meta/HF releases (see `llama.zoo`).


@dataclass(frozen=True)
class Preset:
    args: ModelArgs
    published: Optional[int]  # exact published parameter count (None for tiny test presets)
    source: str = ""
    family: str = ""


PRESETS: dict[str, Preset] = {}


def _add(name: str, published: Optional[int], source: str, family: str, **kw) -> None:
    PRESETS[name] = Preset(ModelArgs(name=name, **kw), published, source, family)


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
         dim=_d, n_layers=_l, n_heads=_h, norm_eps=1e-6, max_seq_len=2048)

# Llama 2 (arXiv 2307.09288, Tab. 1): eps 1e-5, context 4096; GQA (8 KV heads) only for 70B.
_add("llama-2-7b", 6_738_415_616, "HF safetensors total 6,738,417,664 minus 2,048 inv_freq buffer elements",
     "Llama 2", dim=4096, n_layers=32, n_heads=32, max_seq_len=4096)
_add("llama-2-13b", 13_015_864_320, "HF total minus 2,560 inv_freq elements", "Llama 2",
     dim=5120, n_layers=40, n_heads=40, max_seq_len=4096)
_add("llama-2-70b", 68_976_648_192, "HF total minus 5,120 inv_freq elements", "Llama 2",
     dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3, max_seq_len=4096)

# Code Llama (arXiv 2308.12950): theta 1e6 for 16k context; 7B/13B/70B have 32,016 rows (4 infilling tokens).
_add("code-llama-7b", 6_738_546_688, "computed from HF config (no exact published count)", "Code Llama",
     dim=4096, n_layers=32, n_heads=32, vocab_size=32016, rope_theta=1e6, max_seq_len=16384)
_add("code-llama-13b", 13_016_028_160, "computed from HF config", "Code Llama",
     dim=5120, n_layers=40, n_heads=40, vocab_size=32016, rope_theta=1e6, max_seq_len=16384)
_add("code-llama-34b", 33_743_970_304, "computed from HF config", "Code Llama",
     dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.0, rope_theta=1e6, max_seq_len=16384)
_add("code-llama-70b", 68_976_910_336, "computed from HF config", "Code Llama",
     dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32016, multiple_of=4096, ffn_dim_multiplier=1.3,
     rope_theta=1e6, max_seq_len=16384)
# 70B Instruct / Python: theta 1e4 and 4096 context (Meta, codellama#188).
_add("code-llama-70b-instruct", 68_976_910_336, "computed from HF config", "Code Llama",
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

# Tiny presets for tests and CPU ablations: the same architecture at toy width, one per generation's features.
_TINY = dict(dim=64, n_layers=2, n_heads=4, vocab_size=256, multiple_of=32, max_seq_len=256)
_add("tiny-llama-1", None, "test preset", "tiny", norm_eps=1e-6, **_TINY)
_add("tiny-llama-2-gqa", None, "test preset", "tiny", n_kv_heads=2, **_TINY)
_add("tiny-llama-3", None, "test preset", "tiny", n_kv_heads=2, rope_theta=500000.0,
     rope_scaling=RopeScaling("llama3", factor=8.0, original_max_position_embeddings=64), **_TINY)
_add("tiny-llama-3.2", None, "test preset", "tiny", n_kv_heads=1, rope_theta=500000.0, tie_word_embeddings=True,
     rope_scaling=RopeScaling("llama3", factor=32.0, original_max_position_embeddings=64), **_TINY)


def list_models() -> list[str]:
    """Names of every preset, released sizes first."""
    return list(PRESETS)
