"""Hugging Face's `Llama4ForConditionalGeneration` as the reference for the Llama 4 multimodal model.

Runs in the reference process (tests/reference/isolation.py). The config shapes come from the test side
(`tests/reference/llama4_multimodal.py`: every mechanism acts at that size); models stay here, folders, logits and
features cross the process boundary.
"""

from __future__ import annotations

import torch
from hf_llama import random_weights_
from transformers import Llama4Config, Llama4ForConditionalGeneration, Llama4TextConfig, Llama4VisionConfig
from transformers.models.llama4.modeling_llama4 import Llama4VisionRotaryEmbedding
from transformers.models.llama4.modeling_llama4 import pixel_shuffle as hf_pixel_shuffle


def save_random(text: dict, vision: dict, image_token: int, folder: str, *, seed: int = 0) -> None:
    """A float64 `Llama4ForConditionalGeneration` with every parameter random, written by save_pretrained."""
    config = Llama4Config(text_config=Llama4TextConfig(**text), vision_config=Llama4VisionConfig(**vision),
                          image_token_index=image_token)
    model = Llama4ForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=torch.float64)
    random_weights_(model.eval(), seed).save_pretrained(folder)


def _load(folder: str) -> Llama4ForConditionalGeneration:
    return Llama4ForConditionalGeneration.from_pretrained(folder, dtype=torch.float64,
                                                          attn_implementation="sdpa").eval()


@torch.no_grad()
def _logits(model, input_ids: torch.Tensor, pixel_values=None) -> torch.Tensor:
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


def logits(folder: str, input_ids: torch.Tensor, pixel_values=None, *, hidden: bool = False):
    """Logits of `from_pretrained(folder)`; with hidden=True also the input of the final RMSNorm (which rounds to
    float32 in every LLaMA implementation, so logits alone would hide differences below ~1e-8)."""
    model = _load(folder)
    seen = []
    handle = model.language_model.model.norm.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0]))
    try:
        out = _logits(model, input_ids, pixel_values)
    finally:
        handle.remove()
    return (out, seen[-1]) if hidden else out


@torch.no_grad()
def image_features(folder: str, pixel_values: torch.Tensor) -> torch.Tensor:
    """The projected image features: encoder, pixel shuffle, adapter, projector. [tiles·tokens, C]"""
    model = _load(folder)
    features = model.get_image_features(pixel_values=pixel_values, return_dict=True).last_hidden_state
    return model.multi_modal_projector(features.flatten(0, 1))


@torch.no_grad()
def greedy(folder: str, prompt: list, pixel_values: torch.Tensor, n: int) -> list:
    """Greedy continuation, recomputing the whole sequence at every step (no cache)."""
    model = _load(folder)
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(_logits(model, torch.tensor([seq]), pixel_values)[0, -1].argmax()))
    return seq[len(prompt):]


def encoder_pieces(vision: dict, x: torch.Tensor) -> tuple:
    """HF's 2D RoPE table (complex64 [positions, D/2], as real and imaginary parts) and pixel_shuffle(x, 0.5)."""
    freqs = Llama4VisionRotaryEmbedding._compute_freqs_ci(Llama4VisionConfig(**vision))[:, 0]
    return freqs.real.contiguous(), freqs.imag.contiguous(), hf_pixel_shuffle(x, 0.5)
