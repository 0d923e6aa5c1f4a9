"""Tiny random Hugging Face `Llama4ForConditionalGeneration` models and image prompts: the Llama 4 multimodal reference.

Built from HF's own config classes (transformers 5.24) in the reference process (tests/reference/isolation.py,
code in `outside/hf_llama4_multimodal.py`), so a test that saves one with `save_pretrained` and reads it with
`llama.load` checks our config translation, weight mapping and model against HF's reading of the same folder.
Every mechanism acts at this size: 32-pixel tiles of 8×8 patches (2D RoPE over 4 columns × 4 rows of frequencies is
not degenerate; pixel shuffle makes 16 tokens per tile), chunked attention with chunks of 32 positions that image
spans cross, a NoPE layer with temperature tuning from position 31 on, MoE in every or every other layer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.reference.isolation import reference
from tests.reference.tolerance import relative_error  # noqa: F401  (re-exported for the multimodal tests)

IMAGE_TOKEN = 200  # `<|patch|>` of the tiny vocabulary (the released id, 200092, is outside it)
VOCAB = 256
TILE = 32
TOKENS_PER_TILE = 16  # (32/4 / 2)²


def hf_config(step: int = 1, qk_norm: bool = True, scaled_rope: bool = True) -> tuple[dict, dict]:
    """(Llama4TextConfig fields, Llama4VisionConfig fields) for (moe step, QK norm, llama3 RoPE scaling):
    (1, True, True) is Scout's shape, (2, False, False) Maverick's."""
    rope = {"rope_type": "default", "rope_theta": 500000.0}
    if scaled_rope:  # Scout's rule (low == high) with a tiny L0 so that it changes the frequencies
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0, "low_freq_factor": 1.0,
                "high_freq_factor": 1.0, "original_max_position_embeddings": 32}
    text = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=32, intermediate_size_mlp=48, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-5,
        num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=step, use_qk_norm=qk_norm,
        no_rope_layer_interval=4, attention_chunk_size=32, attn_temperature_tuning=True, floor_scale=32,
        attn_scale=0.5, rope_parameters=rope)
    vision = dict(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=192, image_size=TILE,
        patch_size=4, pixel_shuffle_ratio=0.5, projector_input_dim=40, projector_output_dim=40, vision_output_dim=40,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return text, vision


def save_hf(folder: Path, step: int = 1, qk_norm: bool = True, scaled_rope: bool = True, seed: int = 0) -> Path:
    """A float64 HF multimodal model with every parameter random, written by save_pretrained into `folder`."""
    text, vision = hf_config(step, qk_norm, scaled_rope)
    reference().call("hf_llama4_multimodal.save_random", text, vision, IMAGE_TOKEN, str(folder), seed=seed)
    return Path(folder)


def hf_logits(folder: Path, input_ids: torch.Tensor, pixel_values: torch.Tensor = None, *, hidden: bool = False):
    """HF's logits for `from_pretrained(folder)` (with hidden=True also the input of the final RMSNorm)."""
    return reference().call("hf_llama4_multimodal.logits", str(folder), input_ids, pixel_values, hidden=hidden)


def image_prompt(tiles: list[int], gen: torch.Generator, text: int = 5) -> list[int]:
    """Text, then for each image `tiles[i]` × 16 image tokens, then text; text tokens never equal IMAGE_TOKEN."""
    def words(n):
        t = torch.randint(0, VOCAB - 1, (n,), generator=gen)
        return (t + (t >= IMAGE_TOKEN).long()).tolist()  # skip IMAGE_TOKEN

    out = words(text)
    for n in tiles:
        out += [IMAGE_TOKEN] * (n * TOKENS_PER_TILE) + words(3)
    return out


def pixels(n_tiles: int, seed: int = 0) -> torch.Tensor:
    """[n_tiles, 3, 32, 32] float64 normalised-looking pixels."""
    return torch.randn(n_tiles, 3, TILE, TILE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
