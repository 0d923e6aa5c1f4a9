"""Llama 3.2 Vision image preprocessing in PyTorch: best-fit tiling, resize, pad, normalise, cut into tiles.

Shapes: B batch rows, I image slots per row, C channels (3, RGB), H×W image, P tile side, (h, w) tile grid (rows,
        cols), Tt max tiles per image.

The outputs equal those of Hugging Face's `MllamaImageProcessor` (transformers 5.24, Pillow backend), which is what
the released model was used with (Meta llama-models `models/llama3/multimodal/image_transform.py` follows the same
steps with torchvision). For each RGB image:

  1. grid: among all (h, w) with h·w ≤ Tt, take the canvas (h·P, w·P) that needs the least upscaling of the image
     (the smallest scale ≥ 1); if every canvas needs downscaling, the least downscaling (the largest scale < 1),
     where an image's scale to a canvas is min(canvas height / H, canvas width / W); ties go to the smaller canvas.
  2. size: fit the image into the canvas keeping its aspect ratio, never below one tile per side
     (HF `get_image_size_fit_to_canvas`).
  3. resize with Pillow's bilinear filter (`resize_bilinear_uint8`: Pillow's antialiased kernel, its 8-bit
     fixed-point arithmetic and its order of the two passes, reproduced exactly).
  4. pad with black at the bottom and right up to the canvas.
  5. normalise: x/255 (in float64, then float32), then (x − mean)/std in float32, with CLIP's mean and std.
  6. cut into h·w tiles, rows first: tile k is grid cell (k // w, k % w). Tiles beyond h·w and empty image slots are
     zeros; aspect_ratio_mask marks the real tiles, and tile 0 of every slot (HF's convention).

Images must be uint8 tensors [3, H, W]; other channel counts are refused (HF would convert them with Pillow).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .mllama_config import MllamaVisionArgs, tile_grids

# OpenAI CLIP's normalisation, used by Llama 3.2 Vision (its preprocessor_config.json)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point fraction bits for 8-bit images (Resample.c)


def best_grid(height: int, width: int, max_num_tiles: int, tile: int) -> tuple[int, int]:
    """Step 1: the (rows, cols) tile grid for an image of height × width (HF `get_optimal_tiled_canvas`)."""
    grids = tile_grids(max_num_tiles)
    scales = [min(h * tile / height, w * tile / width) for h, w in grids]
    up = [s for s in scales if s >= 1]
    chosen = min(up) if up else max(scales)
    candidates = [g for g, s in zip(grids, scales) if s == chosen]
    return min(candidates, key=lambda g: g[0] * g[1])  # first of the smallest canvases


def fit_size(height: int, width: int, canvas_h: int, canvas_w: int, tile: int) -> tuple[int, int]:
    """Step 2: (new height, new width) inside the canvas, aspect ratio kept, each side at least one tile if it can."""
    target_w, target_h = min(max(width, tile), canvas_w), min(max(height, tile), canvas_h)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


def _pillow_weights(in_size: int, out_size: int) -> torch.Tensor:
    """[out, in] fixed-point weights of Pillow's antialiased bilinear resampling along one axis.

    Pillow `precompute_coeffs` + `normalize_coeffs_8bpc`: output pixel x has centre c = (x + ½)·in/out in input
    coordinates; when shrinking, the triangle filter is stretched by the scale s = max(in/out, 1) (that is the
    antialiasing); the taps j ∈ [c − s + ½, c + s + ½) get k(j) = max(0, 1 − |j − c + ½|/s), normalised to sum 1,
    then rounded to multiples of 2^-22. Computed in Python floats in Pillow's operation order (bit-exact weights).
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support, inv = filterscale, 1.0 / filterscale  # bilinear support 1, stretched
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    for x in range(out_size):
        center = (x + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = [max(0.0, 1.0 - abs((j - center + 0.5) * inv)) for j in range(lo, hi)]
        total = 0.0
        for t in taps:
            total += t
        for j, t in zip(range(lo, hi), taps):
            weights[x, j] = math.floor(0.5 + (t / total if total != 0.0 else t) * (1 << PRECISION_BITS))
    return weights


def _resample(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One Pillow pass along the last axis of uint8 x: Σ pixel·weight + ½, shifted down 22 bits, clipped to 0…255.

    Every product and partial sum is an integer below 2^53, so the float64 matmul is exact in any order.
    """
    acc = x.double() @ weights.T + (1 << (PRECISION_BITS - 1))
    return torch.floor(acc / (1 << PRECISION_BITS)).clamp(0, 255).to(torch.uint8)


def resize_bilinear_uint8(image: torch.Tensor, height: int, width: int, *, pillow_13: bool = True) -> torch.Tensor:
    """[C, H, W] uint8 -> [C, height, width] uint8, equal to Pillow's `Image.resize((width, height), BILINEAR)`.

    Two passes, each rounded to uint8 (and skipped when its side keeps its size). Pillow runs the horizontal one
    first, except (from Pillow 13, python-pillow/Pillow#9549) when the height shrinks by more than twice as many
    pixels as the width; `pillow_13=False` gives the older, always-horizontal-first order. The two orders round
    differently: a pixel here and there differs by one level.
    """
    H, W = image.shape[-2:]
    vertical_first = pillow_13 and height < H and H - height > 2 * (W - width)

    def horizontal(x):
        return _resample(x, _pillow_weights(W, width)) if width != W else x

    def vertical(x):
        return _resample(x.transpose(-1, -2), _pillow_weights(H, height)).transpose(-1, -2) if height != H else x

    out = horizontal(vertical(image)) if vertical_first else vertical(horizontal(image))
    return out.contiguous()


def image_to_tiles(image: torch.Tensor, tile: int, max_num_tiles: int, mean=CLIP_MEAN, std=CLIP_STD,
                   pillow_13: bool = True) -> tuple[torch.Tensor, tuple[int, int]]:
    """Steps 1–6 for one uint8 image [3, H, W] -> (tiles [h·w, 3, P, P] float32, grid (h, w))."""
    _, H, W = image.shape
    h, w = best_grid(H, W, max_num_tiles, tile)
    new_h, new_w = fit_size(H, W, h * tile, w * tile, tile)
    x = resize_bilinear_uint8(image, new_h, new_w, pillow_13=pillow_13)
    x = F.pad(x, (0, w * tile - new_w, 0, h * tile - new_h))  # black at the bottom and right
    x = (x.double() * (1 / 255)).float()  # HF `rescale`: float64 product, stored as float32
    x = (x - torch.tensor(mean, dtype=torch.float32)[:, None, None]) / torch.tensor(std, dtype=torch.float32)[:, None,
                                                                                                             None]
    tiles = x.view(3, h, tile, w, tile).permute(1, 3, 0, 2, 4)  # [h, w, 3, P, P]: tile (row, col)
    return tiles.reshape(h * w, 3, tile, tile), (h, w)


def preprocess(images: Sequence[Sequence[torch.Tensor]], args: MllamaVisionArgs, *, mean=CLIP_MEAN,
               std=CLIP_STD, pillow_13: bool = True) -> dict:
    """images[b]: the uint8 RGB images [3, H, W] of batch row b, in the order of its <|image|> tokens (may be empty).

    Returns the model's image inputs: pixel_values [B, I, Tt, 3, P, P] float32, aspect_ratio_ids [B, I] (grid k of
    `args.tile_grids` has id k + 1; 0 = empty slot), aspect_ratio_mask [B, I, Tt], and num_tiles (list of lists).
    pillow_13: resize with Pillow 13's order of passes (False: earlier Pillow's; see `resize_bilinear_uint8`).
    """
    if isinstance(images, torch.Tensor) or not all(isinstance(row, (list, tuple)) for row in images):
        raise TypeError("images must be a list with one list of images per batch row, e.g. [[img]] for one image")
    P, Tt = args.image_size, args.max_num_tiles
    for b, row in enumerate(images):
        for i, img in enumerate(row):
            if not isinstance(img, torch.Tensor) or img.dtype != torch.uint8 or img.dim() != 3 or img.shape[0] != 3:
                got = f"{img.dtype} {tuple(img.shape)}" if isinstance(img, torch.Tensor) else type(img).__name__
                raise ValueError(f"image {i} of row {b} must be a uint8 RGB tensor [3, height, width], got {got}; "
                                 f"convert grey images with img.expand(3, -1, -1), drop alpha with img[:3], and "
                                 f"channels-last arrays with img.permute(2, 0, 1)")
            if min(img.shape[1:]) == 0:
                raise ValueError(f"image {i} of row {b} is empty ({tuple(img.shape)})")
    B, I = len(images), max((len(row) for row in images), default=0)
    if I == 0:
        raise ValueError("no images in the batch: call the model without image inputs")
    pixel_values = torch.zeros(B, I, Tt, 3, P, P)
    ids = torch.zeros(B, I, dtype=torch.long)
    mask = torch.zeros(B, I, Tt, dtype=torch.long)
    mask[:, :, 0] = 1
    num_tiles = []
    for b, row in enumerate(images):
        num_tiles.append([])
        for i, img in enumerate(row):
            tiles, grid = image_to_tiles(img, P, Tt, mean, std, pillow_13)
            pixel_values[b, i, : len(tiles)] = tiles
            ids[b, i] = args.tile_grids.index(grid) + 1
            mask[b, i, : len(tiles)] = 1
            num_tiles[-1].append(len(tiles))
    return dict(pixel_values=pixel_values, aspect_ratio_ids=ids, aspect_ratio_mask=mask, num_tiles=num_tiles)
