"""Tiny random Hugging Face `MllamaForConditionalGeneration` models and inputs: the reference for Llama 3.2 Vision.

The translation MllamaArgs -> MllamaConfig here is written separately from `llama.formats.mllama`, and the
cross-attention masks come from HF's own processor functions, so a parity test checks our model, converter and
mask rule against Hugging Face's code.

Two documented differences between transformers 5.24 and Meta's reference, which our model follows, are bridged
here so the comparison covers every path:
  * intermediate encoder features: transformers 5.24 records the state *leaving* layer i, Meta the state *entering*
    it; the HF model is built with indices i − 1 for our i (`hf_config`).
  * rows without an image: transformers 5.24 zeroes only their FFN output, Meta also their cross-attention output
    (transformers#39379); `apply_meta_row_mask` adds the second zeroing to the HF model with two hooks.

    args = MllamaArgs.from_name("tiny-llama-3.2-vision")
    hf = random_hf_mllama(args)                      # float64, every gate open, every table random
    inputs = mixed_batch(args)                       # aspect ratios, tile counts, rows without an image
"""

from __future__ import annotations

import math

import torch
from transformers import MllamaConfig, MllamaForConditionalGeneration
from transformers.models.mllama.processing_mllama import (convert_sparse_cross_attention_mask_to_dense,
                                                          get_cross_attention_token_mask)

from llama.vision import MllamaArgs
from tests.reference.hf import rope_parameters


def hf_config(args: MllamaArgs) -> MllamaConfig:
    t, v = args.text, args.vision
    cross = [s + k for k, s in enumerate(args.fusion_schedule)]  # positions in HF's merged layer list
    grids = [[h, w] for h in range(1, v.max_num_tiles + 1) for w in range(1, v.max_num_tiles + 1)
             if h * w <= v.max_num_tiles]
    assert min(v.intermediate_layers) >= 1, "transformers 5.24 cannot record the state entering layer 0"
    vision = dict(hidden_size=v.dim, hidden_act="gelu", num_hidden_layers=v.n_layers,
                  num_global_layers=v.n_global_layers, attention_heads=v.n_heads, num_channels=v.in_channels,
                  intermediate_size=v.ffn_hidden_dim, vision_output_dim=v.dim * (1 + len(v.intermediate_layers)),
                  image_size=v.image_size, patch_size=v.patch_size, norm_eps=v.norm_eps, max_num_tiles=v.max_num_tiles,
                  intermediate_layers_indices=[i - 1 for i in v.intermediate_layers], supported_aspect_ratios=grids)
    text = dict(vocab_size=t.vocab_size, hidden_size=t.dim, hidden_act="silu",
                num_hidden_layers=t.n_layers + len(cross), num_attention_heads=t.n_heads,
                num_key_value_heads=t.n_kv_heads, intermediate_size=t.ffn_hidden_dim,
                rope_parameters=rope_parameters(t),
                rms_norm_eps=t.norm_eps, max_position_embeddings=t.max_seq_len, tie_word_embeddings=False,
                cross_attention_layers=cross, pad_token_id=None)  # HF's pad id 128004 is not a tiny-vocab row
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=args.image_token_id)


@torch.no_grad()
def random_hf_mllama(args: MllamaArgs, *, dtype: torch.dtype = torch.float64, seed: int = 0,
                     meta_row_mask: bool = True) -> MllamaForConditionalGeneration:
    """An HF model with weights that make every term matter: matrices std 1/√fan-in, norm gains and LayerNorm
    weights 1 + 0.1·N(0,1), biases and position tables 0.1·N(0,1), every gate a random angle of ±[0.3, 1.2]."""
    model = MllamaForConditionalGeneration._from_config(hf_config(args), attn_implementation="sdpa", dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if name.endswith("gate") or "_gate" in name or name.endswith(("gate_attn", "gate_ffn")):
            sign = torch.where(torch.rand(p.shape, generator=gen, dtype=torch.float64) < 0.5, -1.0, 1.0)
            p.copy_(sign * (0.3 + 0.9 * torch.rand(p.shape, generator=gen, dtype=torch.float64)))
        elif name.endswith("bias") and "norm" not in name:
            p.copy_(0.1 * noise)
        elif p.ndim == 1 and "norm" in name:
            p.copy_((1 + 0.1 * noise) if name.endswith("weight") else 0.1 * noise)
        elif p.ndim == 1 or "embedding" in name and "patch" not in name:
            p.copy_(0.5 * noise)  # class / position / tile tables
        else:
            p.copy_(noise / math.sqrt(p[0].numel()))
    if meta_row_mask:
        apply_meta_row_mask(model)
    return model.eval()


def apply_meta_row_mask(model: MllamaForConditionalGeneration) -> None:
    """Zero the cross-attention output of rows that see no image, as Meta's `CrossAttention` does (transformers
    5.24 zeroes only their FFN): a pre-hook keeps the layer's row mask, a hook on `cross_attn` applies it."""
    def keep_row_mask(layer, args, kwargs):
        layer.cross_attn.row_mask = kwargs.get("full_text_row_masked_out_mask")

    def mask_rows(attn, args, output):
        out, weights = output
        return (out if attn.row_mask is None else out * attn.row_mask[:, 0], weights)

    for layer in model.model.language_model.layers:
        if hasattr(layer, "cross_attn"):
            layer.register_forward_pre_hook(keep_row_mask, with_kwargs=True)
            layer.cross_attn.register_forward_hook(mask_rows)


def grid_id(args: MllamaArgs, grid: tuple[int, int]) -> int:
    return list(args.vision.tile_grids).index(grid) + 1


def image_inputs(args: MllamaArgs, tokens: torch.Tensor, grids: list[list[tuple[int, int]]], *, seed: int = 0,
                 dtype=torch.float64) -> dict[str, torch.Tensor]:
    """pixel_values (random, also in padding tiles), aspect_ratio_ids/mask as the HF processor lays them out
    (an empty slot has id 0 and tile 0 marked), and HF's cross-attention mask for `tokens`."""
    v = args.vision
    B, I, T = len(grids), max(1, max(len(g) for g in grids)), v.max_num_tiles
    gen = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(B, I, T, v.in_channels, v.image_size, v.image_size, generator=gen, dtype=dtype)
    ids = torch.zeros(B, I, dtype=torch.long)
    mask = torch.zeros(B, I, T, dtype=torch.long)
    mask[:, :, 0] = 1
    num_tiles = []
    for b, row in enumerate(grids):
        for i, (h, w) in enumerate(row):
            ids[b, i] = grid_id(args, (h, w))
            mask[b, i, : h * w] = 1
        num_tiles.append([h * w for h, w in row])
    sparse = [get_cross_attention_token_mask(row.tolist(), args.image_token_id) for row in tokens]
    cross = convert_sparse_cross_attention_mask_to_dense(sparse, num_tiles, T, tokens.shape[1])
    cross = torch.from_numpy(cross)
    if cross.shape[2] < I:  # no row has an image in the last slot's place: pad the images axis
        cross = torch.nn.functional.pad(cross, (0, 0, 0, I - cross.shape[2]))
    return dict(pixel_values=pixel_values, aspect_ratio_ids=ids, aspect_ratio_mask=mask, cross_attention_mask=cross)


def mixed_batch(args: MllamaArgs, *, seed: int = 0, dtype=torch.float64) -> tuple[torch.Tensor, dict]:
    """Four rows: one image after BOS; two consecutive images; no image at all; two images apart (the first at
    position 0). Grids mix every tile count of the tiny preset (1×1, 1×2, 2×1)."""
    img = args.image_token_id
    tokens = torch.tensor([[5, img, 7, 8, 9, 10, 11, 12],
                           [3, 4, img, img, 20, 21, 22, 23],
                           [1, 2, 3, 4, 5, 6, 7, 8],
                           [img, 9, 9, img, 11, 12, 13, 14]])
    grids = [[(1, 2)], [(2, 1), (1, 1)], [], [(1, 1), (1, 2)]]
    return tokens, image_inputs(args, tokens, grids, seed=seed, dtype=dtype)


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref.double()).norm() / ref.double().norm())
