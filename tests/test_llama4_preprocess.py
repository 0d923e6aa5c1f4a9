"""Llama 4 image preprocessing against HF's `Llama4ImageProcessor` on synthetic images, bit for bit.

HF's processor runs on torchvision, which cannot live in the project's environment: PyPI's Linux torchvision wheels
are CUDA builds whose compiled ops do not load next to the CPU torch wheel, and transformers then fails to import
even its Llama 4 model classes. So torchvision is installed into a folder of its own (`pip install --target <dir>
--no-deps torchvision==0.28.0`, or the folder named by $HF_TORCHVISION_DIR) and HF's processor runs in a reference
process (tests/reference/isolation.py) whose import path puts that folder first; the reference side is
tests/reference/outside/hf_image_processor.py. The test is skipped when pip cannot install the wheel (offline).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from llama.vision.llama4_preprocess import (SPECIAL_TOKENS, as_rgb_tensor, image_prompt_tokens, preprocess,
                                            supported_canvases)
from tests.reference.isolated_install import install_target
from tests.reference.isolation import reference

TORCHVISION_PIN = "torchvision==0.28.0"  # the release that pairs with torch 2.13


@pytest.fixture(scope="module")
def torchvision_dir() -> Path:
    return install_target((TORCHVISION_PIN,), env_var="HF_TORCHVISION_DIR", default_name="llama-peft-zoo-torchvision",
                          check="torchvision/transforms")


def synthetic(h: int, w: int, seed: int) -> torch.Tensor:
    """uint8 [3, h, w]: a colour gradient, a filled rectangle, a disc and a little noise, drawn in code."""
    gen = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    img = torch.stack([x, y, 1 - x * y]) * 200  # [3, h, w]
    top, left = int(h * 0.2), int(w * 0.3)
    img[:, top:top + max(1, h // 3), left:left + max(1, w // 4)] = torch.tensor([250.0, 30.0, 60.0])[:, None, None]
    disc = (x - 0.7) ** 2 * w ** 2 + (y - 0.6) ** 2 * h ** 2 < (min(h, w) / 5) ** 2
    img[1][disc] = 255
    img = img + torch.randint(0, 20, (3, h, w), generator=gen)
    return img.clamp(0, 255).to(torch.uint8)


SIZES = [(500, 700), (336, 336), (100, 150), (200, 1000), (1500, 1400), (20, 900), (337, 335), (700, 500)]
CASES = {  # name: (sizes, max tiles, resize_to_max_canvas, through PIL)
    "released": (SIZES, 16, False, False),
    "max-canvas": (SIZES[:4], 16, True, False),
    "four-tiles": (SIZES[:4], 4, False, False),
    "pil": (SIZES[:3], 16, False, True),
}


@pytest.fixture(scope="module")
def hf_outputs(torchvision_dir):
    cases = {name: {"images": [synthetic(h, w, seed=i) for i, (h, w) in enumerate(sizes)],
                    "max_tiles": m, "to_max": to_max, "pil": pil}
             for name, (sizes, m, to_max, pil) in CASES.items()}
    return cases, reference(path=[torchvision_dir]).call("hf_image_processor.process", cases, str(torchvision_dir))


@pytest.mark.parametrize("name", CASES)
def test_equal_to_hf_llama4_image_processor(hf_outputs, name):
    cases, hf = hf_outputs
    images = cases[name]["images"]
    if CASES[name][3]:  # the same pixels through PIL on our side too
        from PIL import Image  # test-only: Pillow comes with matplotlib
        images = [Image.fromarray(np.ascontiguousarray(i.permute(1, 2, 0).numpy())) for i in images]
    pixel_values, grids = preprocess(images, max_tiles=CASES[name][1], resize_to_max_canvas=CASES[name][2])
    assert pixel_values.dtype == hf[name]["pixel_values"].dtype == torch.bfloat16
    assert grids == [tuple(r) for r in hf[name]["aspect_ratios"].tolist()]
    assert torch.equal(pixel_values, hf[name]["pixel_values"])


def test_image_prompt_matches_hf_processor_layout():
    """Token layout of HF `Llama4Processor._prompt_split_image` (strings), mapped through the released ids."""
    for grid in [(1, 1), (2, 3), (4, 1)]:
        text = reference().call("hf_llama.llama4_prompt_split_image", grid, 144)
        names = text.replace("|>", "|>\n").split()  # one marker per line
        assert image_prompt_tokens(grid) == [SPECIAL_TOKENS[n] for n in names]
    assert image_prompt_tokens((1, 1)).count(SPECIAL_TOKENS["<|patch|>"]) == 144
    assert image_prompt_tokens((2, 3)).count(SPECIAL_TOKENS["<|patch|>"]) == 7 * 144  # 6 tiles + global view


def test_canvases_are_metas_list():
    """For 4 tiles of 224 px: Meta's docstring example order (grouped by aspect ratio, 4-tile grids first)."""
    assert supported_canvases(4, 224) == [(224, 896), (448, 448), (224, 224), (896, 224), (224, 672),
                                          (672, 224), (224, 448), (448, 224)]


def test_inputs_in_every_layout_agree():
    img = synthetic(60, 90, seed=3)
    hwc = img.permute(1, 2, 0).numpy()
    assert torch.equal(as_rgb_tensor(hwc), img)
    gray = img[0]
    assert torch.equal(as_rgb_tensor(gray), gray.expand(3, -1, -1))
    pv, grids = preprocess(img)
    assert pv.shape == (1, 3, 336, 336) and grids == [(1, 1)]


@pytest.mark.parametrize("image, error, words", [
    (torch.zeros(4, 20, 20, dtype=torch.uint8), ValueError, r"shape \(4, 20, 20\).*\[3, H, W\]"),
    (torch.zeros(3, 20, 20), TypeError, r"uint8 pixels"),
    (np.zeros((20, 20, 2), dtype=np.uint8), ValueError, r"shape \(2, 20, 20\)"),
    (torch.zeros(3, 0, 20, dtype=torch.uint8), ValueError, r"is empty"),
])
def test_bad_images(image, error, words):
    with pytest.raises(error, match=words):
        preprocess([image])
