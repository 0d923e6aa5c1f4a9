"""Tiny random Hugging Face `Llama4ForConditionalGeneration` models and image prompts: the Llama 4 multimodal reference.

Built from HF's own config classes (transformers 5.24), so a test that saves one with `save_pretrained` and reads it
with `llama.load` checks our config translation, weight mapping and model against HF's reading of the same folder.
Every mechanism acts at this size: 32-pixel tiles of 8×8 patches (2D RoPE over 4 columns × 4 rows of frequencies is
not degenerate; pixel shuffle makes 16 tokens per tile), chunked attention with chunks of 32 positions that image
spans cross, a NoPE layer with temperature tuning from position 31 on, MoE in every or every other layer.
"""

from __future__ import annotations

import math

import torch
from transformers import Llama4Config, Llama4ForConditionalGeneration, Llama4TextConfig, Llama4VisionConfig

IMAGE_TOKEN = 200  # `<|patch|>` of the tiny vocabulary (the released id, 200092, is outside it)
VOCAB = 256
TILE = 32
TOKENS_PER_TILE = 16  # (32/4 / 2)²


def hf_config(step: int = 1, qk_norm: bool = True, scaled_rope: bool = True) -> Llama4Config:
    """(moe step, QK norm, llama3 RoPE scaling): (1, True, True) is Scout's shape, (2, False, False) Maverick's."""
    rope = {"rope_type": "default", "rope_theta": 500000.0}
    if scaled_rope:  # Scout's rule (low == high) with a tiny L0 so that it changes the frequencies
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0, "low_freq_factor": 1.0,
                "high_freq_factor": 1.0, "original_max_position_embeddings": 32}
    text = Llama4TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=32, intermediate_size_mlp=48, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-5,
        num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=step, use_qk_norm=qk_norm,
        no_rope_layer_interval=4, attention_chunk_size=32, attn_temperature_tuning=True, floor_scale=32,
        attn_scale=0.5, rope_parameters=rope)
    vision = Llama4VisionConfig(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=192, image_size=TILE,
        patch_size=4, pixel_shuffle_ratio=0.5, projector_input_dim=40, projector_output_dim=40, vision_output_dim=40,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return Llama4Config(text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN)


@torch.no_grad()
def random_weights_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter of a float64 HF Llama 4 model random, in place: matrices std 1/sqrt(fan_in) (HF's experts
    are stored [E, in, out]), vectors (LayerNorm and RMSNorm gains, biases, the class token) 1 + 0.1·N(0, 1), so no
    zero-initialised bias or unit gain hides a mistake, and every term reaches the logits."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 1:
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
        else:
            fan_in = p.shape[-2] if name.endswith(("gate_up_proj", "experts.down_proj")) else p.shape[-1]
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) / math.sqrt(fan_in))
    return model


def random_hf(config: Llama4Config, seed: int = 0, attn: str = "sdpa") -> Llama4ForConditionalGeneration:
    """float64 `Llama4ForConditionalGeneration` with `random_weights_`."""
    model = Llama4ForConditionalGeneration._from_config(config, attn_implementation=attn, dtype=torch.float64)
    return random_weights_(model.eval(), seed)


@torch.no_grad()
def hf_logits(model: Llama4ForConditionalGeneration, input_ids: torch.Tensor,
              pixel_values: torch.Tensor = None) -> torch.Tensor:
    """Logits of HF's Llama 4 multimodal forward, [B, T, V].

    transformers 5.24's `Llama4ForConditionalGeneration.forward` cannot return (it reads `image_outputs` from the
    language model's output, which has no such field), so this runs the body of that forward up to there, with HF's
    own modules and methods in its order: embed, encode the images, project, `masked_scatter` at the image tokens
    (after HF's own count check), then the language model.
    """
    embeds = model.get_input_embeddings()(input_ids)  # [B, T, C]
    if pixel_values is not None:
        features = model.get_image_features(pixel_values=pixel_values, return_dict=True).last_hidden_state
        projected = model.multi_modal_projector(features.view(-1, features.size(-1))).to(embeds.dtype)
        mask = model.get_placeholder_mask(input_ids, inputs_embeds=embeds, image_features=projected)
        embeds = embeds.masked_scatter(mask, projected)
    return model.language_model(inputs_embeds=embeds).logits


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


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|, in float64."""
    ours, ref = ours.double(), ref.double()
    return ((ours - ref).abs().max() / ref.abs().max()).item()
