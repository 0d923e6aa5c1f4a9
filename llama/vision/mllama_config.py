"""Llama 3.2 Vision configuration: the vision encoder's and the whole model's hyper-parameters, and their presets.

Sources: Meta llama-models `models/llama3/multimodal/model.py` (the reference; `vision_chunk_size`,
`vision_max_num_chunks`, `vision_num_cross_attention_layers` in `params.json`), Llama 3 paper arXiv 2407.21783 §7,
Hugging Face `MllamaConfig` (transformers 5.24). Parameter counts are computed from those shapes and checked against
the published totals (11B: HF safetensors parameter count 10,670,220,835).

Shapes: W encoder width, F_v encoder MLP hidden size, N tokens per tile (patches + class token), T tiles per image,
        R supported tile grids, C text model dim.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from ..config import PRESETS, ModelArgs, count_parameters
from ..registry import preset_args, register_preset


def tile_grids(max_num_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every (rows, cols) grid of at most `max_num_tiles` tiles, rows-major: (1,1) (1,2) (1,3) (1,4) (2,1) (2,2) (3,1)
    (4,1) for 4 tiles. Grid k of this list has aspect-ratio id k + 1; id 0 marks an image slot without an image
    (HF `get_all_supported_aspect_ratios`; the processor and the model index their tables by these ids)."""
    return tuple((h, w) for h in range(1, max_num_tiles + 1) for w in range(1, max_num_tiles + 1)
                 if h * w <= max_num_tiles)


@dataclass(frozen=True)
class MllamaVisionArgs:
    """The ViT-H/14 image encoder of Llama 3.2 Vision (Llama 3 paper §7.2.1: 32 local + 8 gated global layers)."""

    image_size: int = 560  # tile side in pixels (Meta `vision_chunk_size`)
    patch_size: int = 14
    dim: int = 1280  # W
    n_layers: int = 32  # local transformer
    n_global_layers: int = 8  # gated global transformer
    n_heads: int = 16
    ffn_hidden_dim: int = 5120  # F_v = 4·W (GELU MLP)
    max_num_tiles: int = 4  # T (Meta `vision_max_num_chunks`)
    # hidden states *entering* these local layers are concatenated to the output (Meta `return_intermediate`)
    intermediate_layers: tuple[int, ...] = (3, 7, 15, 23, 30)
    norm_eps: float = 1e-5  # every LayerNorm
    in_channels: int = 3

    def __post_init__(self):
        for key in ("image_size", "patch_size", "dim", "n_layers", "n_global_layers", "n_heads", "ffn_hidden_dim",
                    "max_num_tiles", "in_channels"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"MllamaVisionArgs.{key} must be a positive integer, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size}) "
                             f"so that a tile splits into whole patches")
        if self.dim % self.n_heads:
            raise ValueError(f"vision dim ({self.dim}) is not divisible by n_heads ({self.n_heads})")
        object.__setattr__(self, "intermediate_layers", tuple(self.intermediate_layers))
        bad = [i for i in self.intermediate_layers if not 0 <= i < self.n_layers]
        if bad:
            raise ValueError(f"intermediate_layers {bad} are not layer indices of a {self.n_layers}-layer encoder "
                             f"(the hidden state entering layer i is recorded: use 0 … {self.n_layers - 1})")

    @property
    def n_patches(self) -> int:
        """(image_size / patch_size)² patches per tile (1600 at 560/14)."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def n_tokens(self) -> int:
        """N = patches + class token per tile (1601)."""
        return self.n_patches + 1

    @property
    def output_dim(self) -> int:
        """Width of the encoder output: the final state and each recorded intermediate one, concatenated (7680)."""
        return self.dim * (1 + len(self.intermediate_layers))

    @property
    def tile_grids(self) -> tuple[tuple[int, int], ...]:
        return tile_grids(self.max_num_tiles)


def fusion_schedule(n_layers: int, n_cross_attention_layers: int) -> tuple[int, ...]:
    """Self-attention layers preceded by a cross-attention block (Meta `_init_fusion_schedule`): every k-th layer
    counted from the top, k = ceil(L / n). 32 layers, 8 blocks: (3, 7, 11, …, 31); 80 layers, 20 blocks:
    (3, 7, …, 79)."""
    k = math.ceil(n_layers / n_cross_attention_layers)
    return tuple(list(range(n_layers))[::-1][::k][:n_cross_attention_layers][::-1])


@dataclass
class MllamaArgs:
    """Llama 3.2 Vision: a Llama 3.1 text model, an image encoder, and tanh-gated cross-attention blocks.

    `fusion_schedule` lists, for each cross-attention block in order, the self-attention layer it runs *before*
    (Meta's placement; `n_layers` means after the last layer). None: Meta's rule for `n_cross_attention_layers`.
    """

    text: ModelArgs
    vision: MllamaVisionArgs = field(default_factory=MllamaVisionArgs)
    n_cross_attention_layers: int = 8  # Meta `vision_num_cross_attention_layers`: 8 (11B), 20 (90B)
    fusion_schedule: Optional[tuple[int, ...]] = None
    image_token_id: int = 128256  # <|image|> in the model input (HF `image_token_index`)
    n_learnable_embeddings: int = 8  # rows for ids >= text vocab (Meta `learnable_embedding`, max(MP, 8))
    name: str = ""

    def __post_init__(self):
        if isinstance(self.text, dict):
            self.text = ModelArgs(**self.text)
        if isinstance(self.vision, dict):
            self.vision = MllamaVisionArgs(**self.vision)
        n = self.n_cross_attention_layers
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ValueError(f"n_cross_attention_layers must be a positive integer, got {n!r}")
        if self.fusion_schedule is None:
            if n > self.text.n_layers:
                raise ValueError(f"{n} cross-attention blocks cannot be spread over {self.text.n_layers} layers")
            self.fusion_schedule = fusion_schedule(self.text.n_layers, n)
        self.fusion_schedule = tuple(self.fusion_schedule)
        if len(self.fusion_schedule) != n:
            raise ValueError(f"fusion_schedule {self.fusion_schedule} has {len(self.fusion_schedule)} entries but "
                             f"n_cross_attention_layers is {n}")
        if list(self.fusion_schedule) != sorted(self.fusion_schedule) or \
                not all(0 <= i <= self.text.n_layers for i in self.fusion_schedule):
            raise ValueError(f"fusion_schedule {self.fusion_schedule} must be non-decreasing layer indices in "
                             f"[0, {self.text.n_layers}]")
        if self.n_learnable_embeddings < 1:
            raise ValueError("n_learnable_embeddings must be >= 1 (the <|image|> token's row)")
        if not self.text.vocab_size <= self.image_token_id < self.vocab_size:
            raise ValueError(f"image_token_id {self.image_token_id} must be one of the learnable ids "
                             f"[{self.text.vocab_size}, {self.vocab_size}) (Llama 3.2 Vision: 128256)")

    @property
    def max_seq_len(self) -> int:
        """Longest text input (the text model's context)."""
        return self.text.max_seq_len

    @property
    def vocab_size(self) -> int:
        """Input ids accepted: the text vocabulary plus the learnable rows (HF `embed_tokens` has V + 8 rows)."""
        return self.text.vocab_size + self.n_learnable_embeddings

    @classmethod
    def from_name(cls, name: str, **overrides) -> "MllamaArgs":
        """The preset called `name` (see `llama.registry.all_presets()`), with optional field overrides."""
        return dataclasses.replace(preset_args(name), **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# Closed-form parameter count (independent of the module code; `python -m llama.zoo` compares the two)


def count_vision_parameters(v: MllamaVisionArgs) -> int:
    W, Fv, N, T, R = v.dim, v.ffn_hidden_dim, v.n_tokens, v.max_num_tiles, len(v.tile_grids)
    embeddings = (v.in_channels * v.patch_size ** 2 * W  # patch embedding, no bias
                  + W  # class embedding
                  + N * W + (R + 1) * T * N * W + 1  # shared and per-tile position embeddings, gate
                  + 2 * ((R + 1) * T * W + 1))  # pre- and post-tile embeddings with their gates
    layer = 4 * W * W + (W * Fv + Fv) + (Fv * W + W) + 2 * 2 * W  # q k v o; MLP with biases; two LayerNorms
    return embeddings + 2 * 2 * W + (v.n_layers + v.n_global_layers) * layer + 2 * v.n_global_layers


def count_mllama_parameters(a: MllamaArgs) -> int:
    t = a.text
    D, hd = t.dim, t.head_dim
    cross = (D * t.n_heads * hd + 2 * D * t.n_kv_heads * hd + t.n_heads * hd * D + 2 * hd  # q k v o, q/k norms
             + 3 * D * t.ffn_hidden_dim + 2 * D + 2)  # SwiGLU, two RMSNorms, two gates
    return (count_vision_parameters(a.vision) + (a.vision.output_dim * D + D)  # encoder, projector (with bias)
            + count_parameters(t) + a.n_learnable_embeddings * D + a.n_cross_attention_layers * cross)


# ---------------------------------------------------------------------------------------------------------------
# Presets: the text trunks are the Llama 3.1 presets (Meta: "a separately trained vision adapter that integrates
# with the pre-trained Llama 3.1 language model"); the vision encoder is identical for both sizes.

register_preset("llama-3.2-11b-vision",
                MllamaArgs(text=dataclasses.replace(PRESETS["llama-3.1-8b"].args, name="llama-3.2-11b-vision"),
                           n_cross_attention_layers=8, name="llama-3.2-11b-vision"),
                published=10_670_220_835, family="Llama 3.2 Vision",
                source="HF safetensors parameter count of Llama-3.2-11B-Vision; model card 11B (10.6)")
register_preset("llama-3.2-90b-vision",
                MllamaArgs(text=dataclasses.replace(PRESETS["llama-3.1-70b"].args, name="llama-3.2-90b-vision"),
                           n_cross_attention_layers=20, name="llama-3.2-90b-vision"),
                published=88_593_355_323, family="Llama 3.2 Vision", exact=False,
                source="computed from the released HF shapes (no exact published total found; model card: 88.8B)")
# A tiny preset for tests and the CPU miniature: 2x2 tiles of 28 px in 7 px patches (17 tokens per tile, padded
# to 24), two tile grids per side, two cross-attention blocks in a 4-layer text model.
register_preset("tiny-llama-3.2-vision",
                MllamaArgs(text=ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32,
                                          max_seq_len=256, rope_theta=500000.0, name="tiny-llama-3.2-vision"),
                           vision=MllamaVisionArgs(image_size=28, patch_size=7, dim=32, n_layers=3, n_global_layers=2,
                                                   n_heads=2, ffn_hidden_dim=64, max_num_tiles=2,
                                                   intermediate_layers=(1, 2)),
                           n_cross_attention_layers=2, image_token_id=256, name="tiny-llama-3.2-vision"),
                published=None, family="tiny", source="test preset")
