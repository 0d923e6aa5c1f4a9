"""Hugging Face's `MllamaForConditionalGeneration`, processor functions and image processor: the Llama 3.2 Vision
reference.

Runs in the reference process (tests/reference/isolation.py). The config shapes come from the test side
(`tests/reference/mllama.py`); models stay here, folders, logits, tokens and tensors cross the process boundary.

Two places where transformers 5.24 departs from Meta's reference (which our model follows) are bridged here, so the
comparison covers every path (docs/vision.md):
  * intermediate encoder features: 5.24 records the state *leaving* layer i, Meta the state *entering* it. Folders
    hold Meta's meaning; `_load` gives HF the indices i − 1 so that it computes that meaning (when the installed
    transformers records leaving states: `_shift`, measured on a two-layer encoder).
  * rows that see no image: 5.24 zeroes only their FFN output, Meta also their cross-attention output
    (transformers#39379); `_meta_row_mask` adds the second zeroing with two hooks (off with meta_row_mask=False;
    harmless where transformers already zeroes them).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from hf_llama import random_weights_
from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaVisionConfig
from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil
from transformers.models.mllama.modeling_mllama import MllamaVisionEncoder
from transformers.models.mllama.processing_mllama import (convert_sparse_cross_attention_mask_to_dense,
                                                          get_cross_attention_token_mask)


@torch.no_grad()
def save_random(text: dict, vision: dict, image_token: int, folder: str, *, seed: int = 0) -> None:
    """A float64 model with every parameter random (`random_weights_`), the position and tile tables at 0.5·N(0, 1)
    and every gate a random angle of ±[0.3, 1.2], written by save_pretrained; config.json then gets Meta's
    meaning of the feature indices (those given here)."""
    config = MllamaConfig(text_config=text, vision_config=_hf_indices(vision), image_token_index=image_token)
    model = random_weights_(MllamaForConditionalGeneration._from_config(config, attn_implementation="sdpa",
                                                                        dtype=torch.float64).eval(), seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if name.endswith(("gate", "gate_attn", "gate_ffn")):
            sign = torch.where(torch.rand(p.shape, generator=gen, dtype=torch.float64) < 0.5, -1.0, 1.0)
            p.copy_(sign * (0.3 + 0.9 * torch.rand(p.shape, generator=gen, dtype=torch.float64)))
        elif "positional_embedding" in name and name.endswith(("embedding", "weight")):
            p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    model.save_pretrained(folder)
    path = Path(folder) / "config.json"
    saved = json.loads(path.read_text())
    saved["vision_config"]["intermediate_layers_indices"] = list(vision["intermediate_layers_indices"])
    path.write_text(json.dumps(saved, indent=2))


@torch.no_grad()
def _shift() -> int:
    """1 if this transformers' encoder records the state leaving each layer (5.24), 0 if entering it (Meta)."""
    config = MllamaVisionConfig(hidden_size=8, attention_heads=2, intermediate_size=16, num_hidden_layers=2)
    x = torch.randn(1, 3, 8)
    return 0 if torch.equal(MllamaVisionEncoder(config, 2)(x).hidden_states[0], x) else 1


def _hf_indices(vision: dict) -> dict:
    """Index i − 1 for Meta's "the state entering layer i" where transformers reads i as the state leaving it."""
    return {**vision, "intermediate_layers_indices": [i - _shift() for i in vision["intermediate_layers_indices"]]}


def _load(folder: str, meta_row_mask: bool = True) -> MllamaForConditionalGeneration:
    config = MllamaConfig.from_pretrained(folder)
    config.vision_config.intermediate_layers_indices = [
        i - _shift() for i in config.vision_config.intermediate_layers_indices]
    model = MllamaForConditionalGeneration.from_pretrained(folder, config=config, dtype=torch.float64,
                                                           attn_implementation="sdpa").eval()
    if meta_row_mask:
        _meta_row_mask(model)
    return model


def _meta_row_mask(model) -> None:
    """Zero the cross-attention output of rows that see no image, as Meta's `CrossAttention` does: a pre-hook keeps
    the layer's row mask, a hook on `cross_attn` applies it."""
    def keep_row_mask(layer, args, kwargs):
        layer.cross_attn.row_mask = kwargs.get("full_text_row_masked_out_mask")

    def mask_rows(attn, args, output):
        out, weights = output
        return (out if attn.row_mask is None else out * attn.row_mask[:, 0], weights)

    for layer in model.model.language_model.layers:
        if hasattr(layer, "cross_attn"):
            layer.register_forward_pre_hook(keep_row_mask, with_kwargs=True)
            layer.cross_attn.register_forward_hook(mask_rows)


@torch.no_grad()
def logits(folder: str, input_ids: torch.Tensor, images: dict, *, meta_row_mask: bool = True):
    """(logits [B, T, V], the input of the final RMSNorm [B, T, C]) of `from_pretrained(folder)`; the final norm
    rounds to float32 in every LLaMA implementation, so logits alone would hide differences below ~1e-8."""
    model = _load(folder, meta_row_mask)
    seen = []
    model.model.language_model.norm.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0]))
    out = model(input_ids=input_ids, **images).logits
    return out, seen[-1]


@torch.no_grad()
def generate(folder: str, input_ids: torch.Tensor, images: dict, n: int) -> torch.Tensor:
    """HF's greedy `generate` with its KV cache: the new tokens [B, n]."""
    model = _load(folder)
    out = model.generate(input_ids=input_ids, **images, max_new_tokens=n, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    return out[:, input_ids.shape[1]:]


def state_dict(folder: str) -> dict:
    """Every tensor of `from_pretrained(folder)`, by HF's in-memory names."""
    return {k: v.clone() for k, v in _load(folder, meta_row_mask=False).state_dict().items()}


def cross_attention_mask(input_ids: list, image_token: int, num_tiles: list, max_num_tiles: int) -> torch.Tensor:
    """The processor's [B, T, images, tiles] mask for these token rows (HF `get_cross_attention_token_mask`)."""
    sparse = [get_cross_attention_token_mask(row, image_token) for row in input_ids]
    dense = convert_sparse_cross_attention_mask_to_dense(sparse, num_tiles, max_num_tiles, len(input_ids[0]))
    return torch.from_numpy(dense)


def process_images(rows: list, tile: int, max_tiles: int, mean: list, std: list) -> list:
    """`MllamaImageProcessor` (Pillow backend) on each batch row of uint8 [3, H, W] images separately (HF's processor
    cannot take a row without images): per row, its pixel_values, aspect_ratio_ids, aspect_ratio_mask, num_tiles."""
    processor = MllamaImageProcessorPil(size={"height": tile, "width": tile}, max_image_tiles=max_tiles,
                                        image_mean=mean, image_std=std)
    out = []
    for row in rows:
        result = processor([[np.ascontiguousarray(img.numpy()) for img in row]], return_tensors="pt")
        out.append({"pixel_values": result["pixel_values"][0], "aspect_ratio_ids": result["aspect_ratio_ids"][0],
                    "aspect_ratio_mask": result["aspect_ratio_mask"][0], "num_tiles": result["num_tiles"][0]})
    return out
