"""Llama 3.2 Vision preprocessing in PyTorch against Pillow and HF's MllamaImageProcessor (Pillow backend, in the
reference process: tests/reference/mllama.py).

Equality is exact (torch.equal): the resize reproduces Pillow's fixed-point arithmetic, and normalisation runs the
same float32 operations as HF's numpy code.
"""

import numpy as np
import PIL
import pytest
import torch
from PIL import Image

from llama import MllamaVisionArgs
from llama.vision.mllama_preprocess import CLIP_MEAN, CLIP_STD, best_grid, preprocess, resize_bilinear_uint8
from tests.reference.mllama import hf_process_images


def drawn_image(height: int, width: int, seed: int) -> torch.Tensor:
    """Sharp-edged shapes on a gradient with noise: hard edges, smooth ramps and texture for the resampler."""
    gen = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    img = torch.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256]).float()
    cy, cx, r = height * 0.4, width * 0.6, min(height, width) * 0.3
    disc = (y - cy) ** 2 + (x - cx) ** 2 < r ** 2
    img[:, disc] = torch.tensor([220.0, 30.0, 60.0])[:, None]
    box = (y > height // 5) & (y < height // 2) & (x > width // 8) & (x < width // 3)
    img[:, box] = torch.tensor([20.0, 200.0, 40.0])[:, None]
    img += 25 * torch.randn(img.shape, generator=gen)
    return img.round().clamp(0, 255).to(torch.uint8)


PILLOW_13 = int(PIL.__version__.split(".")[0]) >= 13


# up and down on each side, both pass orders of Pillow 13 (vertical first: (37, 53) -> (20, 91), (99, 100) -> (2, 91))
@pytest.mark.parametrize("src,dst", [((37, 53), (20, 91)), ((120, 80), (31, 17)), ((9, 7), (64, 45)),
                                     ((56, 56), (56, 112)), ((301, 199), (150, 100)), ((5, 300), (5, 41)),
                                     ((99, 100), (2, 91)), ((118, 87), (26, 40)), ((142, 33), (65, 5))])
def test_resize_equals_pillow(src, dst):
    img = drawn_image(*src, seed=sum(src))
    ref = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((dst[1], dst[0]), Image.BILINEAR)
    ours = resize_bilinear_uint8(img, *dst, pillow_13=PILLOW_13)
    assert torch.equal(ours, torch.from_numpy(np.array(ref)).permute(2, 0, 1))


def test_best_grid_by_hand():
    assert best_grid(560, 560, 4, 560) == (1, 1)
    # 300 x 1200: canvases 1x3 (scale 1.4) and 1x4 (1.87) need no downscaling; the least upscaling wins
    assert best_grid(300, 1200, 4, 560) == (1, 3)
    # 2000 x 2000: every canvas shrinks it; 2x2 shrinks least (0.56)
    assert best_grid(2000, 2000, 4, 560) == (2, 2)
    # 100 x 100: every canvas upscales by 5.6 at least; ties go to the smallest canvas
    assert best_grid(100, 100, 4, 560) == (1, 1)


@pytest.mark.parametrize("tile,max_tiles", [(28, 2), (56, 4)])
def test_preprocess_equals_hf_processor(tile, max_tiles):
    args = MllamaVisionArgs(image_size=tile, patch_size=7, dim=32, n_layers=2, n_heads=2, ffn_hidden_dim=64,
                            max_num_tiles=max_tiles, intermediate_layers=(1,))
    sizes = [[(70, 130)], [(40, 20), (13, 250), (56, 56)], [], [(230, 90), (9, 11)]]
    images = [[drawn_image(h, w, seed=10 * b + i) for i, (h, w) in enumerate(row)] for b, row in enumerate(sizes)]
    ours = preprocess(images, args, pillow_13=PILLOW_13)
    # HF's processor cannot take a row without images: it processes the others row by row
    refs = iter(hf_process_images([row for row in images if row], tile, max_tiles, CLIP_MEAN, CLIP_STD))
    for b, row in enumerate(images):
        if not row:
            assert torch.equal(ours["pixel_values"][b], torch.zeros_like(ours["pixel_values"][b]))
            assert ours["aspect_ratio_ids"][b].tolist() == [0] * 3
            continue
        ref, n = next(refs), len(row)
        assert torch.equal(ours["pixel_values"][b, :n], ref["pixel_values"])
        assert torch.equal(ours["aspect_ratio_ids"][b, :n], ref["aspect_ratio_ids"])
        assert torch.equal(ours["aspect_ratio_mask"][b, :n], ref["aspect_ratio_mask"])
        assert ours["num_tiles"][b] == ref["num_tiles"]
    assert ours["pixel_values"].shape == (4, 3, max_tiles, 3, tile, tile)


@pytest.mark.parametrize("bad,words", [
    (torch.zeros(1, 20, 20, dtype=torch.uint8), ["image 0 of row 0", "[3, height, width]", "expand(3, -1, -1)"]),
    (torch.zeros(4, 20, 20, dtype=torch.uint8), ["uint8 RGB", "img[:3]"]),
    (torch.zeros(20, 20, 3, dtype=torch.uint8), ["(20, 20, 3)", "permute(2, 0, 1)"]),
    (torch.zeros(3, 20, 20), ["torch.float32"]),
])
def test_bad_images_are_refused(bad, words):
    args = MllamaVisionArgs(image_size=28, patch_size=7, dim=32, n_layers=2, n_heads=2, ffn_hidden_dim=64,
                            max_num_tiles=2, intermediate_layers=(1,))
    with pytest.raises(ValueError) as err:
        preprocess([[bad]], args)
    assert all(w in str(err.value) for w in words), str(err.value)
    with pytest.raises(TypeError, match="one list of images per batch row"):
        preprocess([torch.zeros(3, 4, 4, dtype=torch.uint8)], args)
