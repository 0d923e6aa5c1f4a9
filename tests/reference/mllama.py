"""Tiny random Hugging Face `MllamaForConditionalGeneration` models and image inputs: the Llama 3.2 Vision reference.

The translation MllamaArgs -> HF config fields here is written separately from `llama.formats.mllama`; the models,
HF's cross-attention mask functions and its image processor run in the reference process
(tests/reference/isolation.py, code in `outside/hf_mllama.py`), so a parity test checks our converter, mask rule and
model against Hugging Face's code. `outside/hf_mllama.py` also bridges the two documented differences between
transformers 5.24 and Meta's reference (intermediate feature indices, rows without an image).

    args = MllamaArgs.from_name("tiny-llama-3.2-vision")
    folder = save_hf(tmp / "hf", args)              # float64, every gate open, every table random
    tokens, images = mixed_batch(args)              # aspect ratios, tile counts, rows without an image
    logits, hidden = hf_logits(folder, tokens, images)
"""

from __future__ import annotations

from pathlib import Path

import torch

from llama import MllamaArgs, cross_attention_mask_from_tokens
from tests.reference.hf import rope_parameters
from tests.reference.isolation import reference
from tests.reference.tolerance import relative_error  # noqa: F401  (re-exported for the Llama 3.2 Vision tests)


def hf_config(args: MllamaArgs) -> tuple[dict, dict]:
    """(MllamaTextConfig fields, MllamaVisionConfig fields); feature indices in Meta's meaning (see outside/)."""
    t, v = args.text, args.vision
    cross = [s + k for k, s in enumerate(args.fusion_schedule)]  # positions in HF's merged layer list
    grids = [[h, w] for h in range(1, v.max_num_tiles + 1) for w in range(1, v.max_num_tiles + 1)
             if h * w <= v.max_num_tiles]
    text = dict(vocab_size=t.vocab_size, hidden_size=t.dim, hidden_act="silu",
                num_hidden_layers=t.n_layers + len(cross), num_attention_heads=t.n_heads,
                num_key_value_heads=t.n_kv_heads, intermediate_size=t.ffn_hidden_dim,
                rope_parameters=rope_parameters(t), rms_norm_eps=t.norm_eps, max_position_embeddings=t.max_seq_len,
                tie_word_embeddings=False, cross_attention_layers=cross,
                pad_token_id=None)  # HF's pad id 128004 is not a tiny-vocabulary row
    vision = dict(hidden_size=v.dim, hidden_act="gelu", num_hidden_layers=v.n_layers,
                  num_global_layers=v.n_global_layers, attention_heads=v.n_heads, num_channels=v.in_channels,
                  intermediate_size=v.ffn_hidden_dim, vision_output_dim=v.dim * (1 + len(v.intermediate_layers)),
                  image_size=v.image_size, patch_size=v.patch_size, norm_eps=v.norm_eps, max_num_tiles=v.max_num_tiles,
                  intermediate_layers_indices=list(v.intermediate_layers), supported_aspect_ratios=grids)
    return text, vision


def save_hf(folder: Path, args: MllamaArgs, seed: int = 0) -> Path:
    text, vision = hf_config(args)
    reference().call("hf_mllama.save_random", text, vision, args.image_token_id, str(folder), seed=seed)
    return Path(folder)


def hf_logits(folder: Path, tokens: torch.Tensor, images: dict, *, meta_row_mask: bool = True):
    """(logits, input of the final RMSNorm) of HF's model in `folder`."""
    return reference().call("hf_mllama.logits", str(folder), tokens, images, meta_row_mask=meta_row_mask)


def hf_generate(folder: Path, tokens: torch.Tensor, images: dict, n: int) -> torch.Tensor:
    return reference().call("hf_mllama.generate", str(folder), tokens, images, n)


def hf_state_dict(folder: Path) -> dict:
    return reference().call("hf_mllama.state_dict", str(folder))


def hf_cross_attention_mask(tokens: torch.Tensor, image_token: int, num_tiles: list, max_num_tiles: int):
    return reference().call("hf_mllama.cross_attention_mask", tokens.tolist(), image_token, num_tiles, max_num_tiles)


def hf_process_images(rows: list, tile: int, max_tiles: int, mean, std) -> list:
    return reference().call("hf_mllama.process_images", rows, tile, max_tiles, list(mean), list(std))


def grid_id(args: MllamaArgs, grid: tuple[int, int]) -> int:
    return list(args.vision.tile_grids).index(grid) + 1


def image_inputs(args: MllamaArgs, tokens: torch.Tensor, grids: list[list[tuple[int, int]]], *, seed: int = 0,
                 dtype=torch.float64) -> dict[str, torch.Tensor]:
    """pixel_values (random, also in padding tiles), aspect_ratio_ids/mask laid out as HF's processor does (an empty
    slot has id 0 and tile 0 marked), and the cross-attention mask of `tokens` (Meta's rule; the parity test checks
    it against HF's processor functions)."""
    v = args.vision
    B, I, T = len(grids), max(1, max(len(g) for g in grids)), v.max_num_tiles
    gen = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(B, I, T, v.in_channels, v.image_size, v.image_size, generator=gen, dtype=dtype)
    ids = torch.zeros(B, I, dtype=torch.long)
    mask = torch.zeros(B, I, T, dtype=torch.long)
    mask[:, :, 0] = 1
    for b, row in enumerate(grids):
        for i, (h, w) in enumerate(row):
            ids[b, i] = grid_id(args, (h, w))
            mask[b, i, : h * w] = 1
    num_tiles = torch.tensor([[h * w for h, w in row] + [0] * (I - len(row)) for row in grids])
    cross = cross_attention_mask_from_tokens(tokens, args.image_token_id, num_tiles, T)
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


MIXED_NUM_TILES = [[2], [2, 1], [], [1, 2]]  # real tiles per image of `mixed_batch`'s rows
