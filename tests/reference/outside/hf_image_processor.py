"""Hugging Face's `Llama4ImageProcessor` as the reference for our Llama 4 image preprocessing.

Runs in a reference process whose path starts with the folder torchvision was installed into
(tests/test_llama4_preprocess.py): PyPI's Linux torchvision is a CUDA build whose compiled ops do not load next to
the CPU torch wheel. They are needed only by the meta-kernel registrations torchvision makes at import time, which
are stubbed out below; the transforms the processor calls (resize, pad, normalize) are Python over torch ops.
"""

import sys
import types
from pathlib import Path

sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")

import numpy as np  # noqa: E402  (after the stub)
import PIL.Image  # noqa: E402
import torchvision  # noqa: E402
from transformers import Llama4ImageProcessor  # noqa: E402


def process(cases: dict, torchvision_dir: str) -> dict:
    """name -> {pixel_values, aspect_ratios} of the processor on each case's images (uint8 [3, H, W] tensors, or
    the same pixels as PIL images when case["pil"])."""
    assert Path(torchvision.__file__).resolve().is_relative_to(Path(torchvision_dir).resolve()), torchvision.__file__
    out = {}
    for name, case in cases.items():
        images = list(case["images"])
        if case["pil"]:  # HF's PIL path: uint8 [3, H, W] -> PIL RGB image
            images = [PIL.Image.fromarray(np.ascontiguousarray(i.permute(1, 2, 0).numpy())) for i in images]
        result = Llama4ImageProcessor()(images=images, return_tensors="pt", max_patches=case["max_tiles"],
                                        resize_to_max_canvas=case["to_max"])
        out[name] = {"pixel_values": result["pixel_values"], "aspect_ratios": result["aspect_ratios"]}
    return out
