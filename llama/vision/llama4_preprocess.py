"""Llama 4 image preprocessing: best-fit canvas of tiles, aspect-preserving resize, padding, normalisation, global view.

Shapes: S tile side (336), (th, tw) tiles per column and row of the canvas (th·tw <= max_tiles = 16), N tiles.

Per image (Meta llama-models `models/llama4/preprocess.py`; HF `Llama4ImageProcessor`, whose arithmetic this follows
step for step so that the outputs are equal):
  1. canvas: among the (th·S, tw·S) grids with th·tw <= max_tiles, the one that needs the least upscaling of the
     image without distortion (scale = min(canvas_h/h, canvas_w/w) >= 1, smallest), or if none fits, the least
     downscaling (largest scale < 1); ties go to the smallest area, i.e. the least padding;
  2. resize (bilinear, antialiased, on the uint8 pixels) to the largest size with the image's aspect ratio inside
     the canvas, but never upscaled beyond S on a side that is smaller than S (unless resize_to_max_canvas);
  3. pad with zeros on the right and bottom to the canvas, then x -> (x/255 - 0.5)/0.5 in bfloat16 (as Meta's
     reference computes it);
  4. cut into th·tw tiles, row by row; when th·tw > 1, append a global view: the whole image resized to S×S.
The image's prompt then holds one block of `tokens_per_tile` image tokens per tile (`image_prompt_tokens`).
"""

from __future__ import annotations

import math
import platform
from collections.abc import Mapping, Sequence
from typing import Union

import einops
import numpy as np
import torch
import torch.nn.functional as F

from ..tokenizer import llama4_special_tokens

MEAN = STD = (0.5, 0.5, 0.5)  # per channel, on pixels scaled to [0, 1]
SPECIAL_TOKENS = llama4_special_tokens(200_000)  # the released tokenizer's ids (`<|patch|>` = 200092, ...)


def supported_canvases(max_tiles: int, tile: int) -> list[tuple[int, int]]:
    """Every (height, width) of th × tw tiles with th·tw <= max_tiles, in Meta's order (grouped by aspect ratio,
    larger tile counts first), which decides ties in `best_canvas`."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for n in range(max_tiles, 0, -1):
        for th in sorted(d for d in range(1, n + 1) if n % d == 0):
            by_ratio.setdefault(th / (n // th), []).append((th * tile, n // th * tile))
    return [canvas for group in by_ratio.values() for canvas in group]


def best_canvas(h: int, w: int, canvases: list[tuple[int, int]], resize_to_max_canvas: bool = False) -> tuple[int, int]:
    """Step 1. Scales are float32 ratios, as HF computes them, so exact ties are the same ties."""
    sizes = torch.tensor(canvases)  # [M, 2] (height, width)
    scale_h, scale_w = sizes[:, 0] / h, sizes[:, 1] / w  # float32
    scales = torch.where(scale_h > scale_w, scale_w, scale_h)  # the limiting side: no distortion
    up = scales[scales >= 1]
    if len(up):
        chosen = up.max() if resize_to_max_canvas else up.min()
    else:
        chosen = scales[scales < 1].max()
    candidates = sizes[scales == chosen]
    best = candidates[torch.argmin(candidates[:, 0] * candidates[:, 1])]  # least padding, first on ties
    return int(best[0]), int(best[1])


def fitted_size(h: int, w: int, canvas: tuple[int, int], tile: int, resize_to_max_canvas: bool) -> tuple[int, int]:
    """Step 2: the resized (height, width) inside the canvas, aspect ratio kept (floored)."""
    target_h, target_w = canvas
    if not resize_to_max_canvas:  # do not blow a small image up to the whole canvas
        target_h, target_w = min(max(h, tile), target_h), min(max(w, tile), target_w)
    if target_w / w < target_h / h:
        new_h, new_w = min(math.floor(h * (target_w / w)), target_h), target_w
    else:
        new_h, new_w = target_h, min(math.floor(w * (target_h / h)), target_w)
    return max(new_h, 1), max(new_w, 1)


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, antialiased resize of uint8 pixels [3, H, W] -> [3, h, w], rounding like torchvision.

    PyTorch's CPU kernel for uint8 (used by torchvision where it is vectorised: AVX2, AVX-512, ARM) computes in
    fixed point; elsewhere the pixels go through float32 and are rounded back, as torchvision does.
    """
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    native = image.device.type == "cpu" and (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
                                             or platform.machine() in ("aarch64", "arm64"))
    x = image[None] if native else image[None].float()  # [1, 3, H, W]
    x = F.interpolate(x, size=list(size), mode="bilinear", align_corners=False, antialias=True)
    return (x if native else x.round()).to(torch.uint8)[0]


def normalise(image: torch.Tensor) -> torch.Tensor:
    """Step 3: uint8 [3, H, W] -> (x/255 - mean)/std in bfloat16."""
    x = image.to(torch.bfloat16) * (1 / 255)
    mean = torch.tensor(MEAN, dtype=torch.bfloat16, device=image.device)[:, None, None]  # [3, 1, 1]
    std = torch.tensor(STD, dtype=torch.bfloat16, device=image.device)[:, None, None]
    return (x - mean) / std


def preprocess_image(image: torch.Tensor, tile: int = 336, max_tiles: int = 16,
                     resize_to_max_canvas: bool = False) -> tuple[torch.Tensor, tuple[int, int]]:
    """uint8 [3, H, W] -> (tiles [th·tw (+1), 3, S, S] bfloat16, (th, tw))."""
    h, w = image.shape[-2:]
    canvas = best_canvas(h, w, supported_canvases(max_tiles, tile), resize_to_max_canvas)
    x = resize(image, fitted_size(h, w, canvas, tile, resize_to_max_canvas))  # [3, h', w']
    x = F.pad(x, (0, canvas[1] - x.shape[-1], 0, canvas[0] - x.shape[-2]))  # [3, th·S, tw·S], zeros right/bottom
    th, tw = canvas[0] // tile, canvas[1] // tile
    tiles = einops.rearrange(normalise(x), "c (th h) (tw w) -> (th tw) c h w", th=th, tw=tw)  # row by row
    if th * tw > 1:  # the global view: the whole image squeezed into one tile
        tiles = torch.cat([tiles, normalise(resize(image, (tile, tile)))[None]])
    return tiles, (th, tw)


ImageLike = Union[torch.Tensor, np.ndarray, "PIL.Image.Image"]  # noqa: F821  (PIL is read through numpy, not imported)


def as_rgb_tensor(image: ImageLike, index: int = 0) -> torch.Tensor:
    """uint8 [3, H, W] from a tensor [C, H, W] (or [H, W]), a numpy array [H, W, C] (or [H, W]) or a PIL image."""
    if hasattr(image, "convert") and hasattr(image, "mode"):  # a PIL image
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            raise ValueError(f"image {index} has an alpha channel; composite it onto a background and convert it "
                             f"to RGB first (e.g. PIL's Image.alpha_composite, then .convert('RGB'))")
        image = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)  # [H, W, 3] -> [3, H, W]
    elif not isinstance(image, torch.Tensor):  # numpy: channels last, as images are stored
        image = torch.as_tensor(image)
        image = image.permute(2, 0, 1) if image.dim() == 3 else image
    if image.dtype != torch.uint8:
        raise TypeError(f"image {index} must hold uint8 pixels (0-255), got {image.dtype}; convert it with "
                        f"(x * 255).round().to(torch.uint8) if it is scaled to [0, 1]")
    if image.dim() == 2:
        image = image[None]
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image {index} has shape {tuple(image.shape)}; pass tensors as [3, H, W] (RGB, channels "
                         f"first; grayscale [H, W] or [1, H, W] is expanded to RGB) and numpy arrays as [H, W, 3]; "
                         f"an alpha channel must be composited away first")
    if min(image.shape[-2:]) == 0:
        raise ValueError(f"image {index} is empty: {tuple(image.shape)}")
    return image.expand(3, -1, -1).contiguous()  # grayscale -> RGB by repeating the channel


def preprocess(images: Union[ImageLike, Sequence[ImageLike]], tile: int = 336, max_tiles: int = 16,
               resize_to_max_canvas: bool = False) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Images -> (pixel_values [N, 3, S, S] bfloat16, the (th, tw) tile grid of each image).

    pixel_values stacks every tile of every image in order (the model's `pixel_values`, what HF's processor
    returns); image i contributes th·tw tiles, plus a global view when th·tw > 1.
    """
    if isinstance(images, torch.Tensor) or hasattr(images, "convert") or not isinstance(images, Sequence):
        images = [images]
    if len(images) == 0:
        raise ValueError("no images given; pass an image or a list of images")
    if not isinstance(max_tiles, int) or max_tiles < 1:
        raise ValueError(f"max_tiles must be a positive integer (Llama 4: 16), got {max_tiles!r}")
    out, grids = [], []
    for i, image in enumerate(images):
        tiles, grid = preprocess_image(as_rgb_tensor(image, i), tile, max_tiles, resize_to_max_canvas)
        out.append(tiles)
        grids.append(grid)
    return torch.cat(out), grids


def image_prompt_tokens(grid: tuple[int, int], tokens_per_tile: int = 144,
                        special: Mapping[str, int] = SPECIAL_TOKENS) -> list[int]:
    """The prompt block of one image with tile grid (th, tw) (Meta `chat_format.py`, HF `Llama4Processor`):

        <|image_start|> [rows of tiles: K × <|patch|> per tile, <|tile_x_separator|> between the tiles of a row,
        <|tile_y_separator|> after each row; only when th·tw > 1] <|image|> K × <|patch|> <|image_end|>

    where the last K patches are the global view (or the only tile). `special` maps the marker names to ids (default:
    the released tokenizer's).
    """
    th, tw = grid
    patch = [special["<|patch|>"]] * tokens_per_tile
    out = [special["<|image_start|>"]]
    if th * tw > 1:
        for _ in range(th):
            for x in range(tw):
                out += patch + ([special["<|tile_x_separator|>"]] if x < tw - 1 else [])
            out.append(special["<|tile_y_separator|>"])
    return out + [special["<|image|>"]] + patch + [special["<|image_end|>"]]
