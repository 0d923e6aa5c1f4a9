"""scripts/vision_miniature.py: the drawn data, a seeded rerun giving the same numbers, the files it writes."""

import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts import vision_miniature as vm  # noqa: E402


def test_drawn_scenes_show_their_colour_and_quadrant():
    img = vm.draw("blue", "square", "lower-right", random.Random(0))
    lit = img.sum(0) > 0
    ys, xs = lit.nonzero(as_tuple=True)
    assert ys.float().mean() > 14 and xs.float().mean() > 14  # lower-right quadrant
    assert torch.equal(img[:, ys[0], xs[0]], torch.tensor(vm.COLOURS["blue"], dtype=torch.uint8))

    def bbox_fill_and_rows(shape):
        lit = vm.draw("red", shape, "upper-left", random.Random(1)).sum(0) > 0
        ys, xs = lit.nonzero(as_tuple=True)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        return float(lit.sum() / box), int(lit[ys.min()].sum()), int(lit[ys.max()].sum())

    assert bbox_fill_and_rows("square")[0] == 1.0  # fills its bounding box
    assert bbox_fill_and_rows("circle")[0] < 0.9  # the corners stay dark
    _, top, bottom = bbox_fill_and_rows("triangle")
    assert top < bottom  # apex up


def test_seeded_rerun_reproduces_every_number(tmp_path):
    argv = ["--steps", "3", "--n-train", "8", "--n-eval", "4", "--batch-size", "6", "--methods", "lora+gates",
            "excitor", "--no-progress"]
    first = vm.main(argv + ["--out", str(tmp_path / "a")])
    second = vm.main(argv + ["--out", str(tmp_path / "b")])
    for method in ("lora+gates", "excitor"):
        assert first["results"][method]["loss_curve"] == second["results"][method]["loss_curve"]
        assert first["results"][method]["accuracy"] == second["results"][method]["accuracy"]
    # LoRA r=8 on wq [64 -> 64] and wv [64 -> 32] in 4 layers, plus the two gates of each of the 2 blocks
    assert first["results"]["lora+gates"]["trainable"] == 4 * (8 * 64 + 64 * 8 + 8 * 64 + 32 * 8) + 4
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert set(saved["results"]) == {"lora+gates", "excitor"}
    assert (tmp_path / "a" / "accuracy_vs_params.png").stat().st_size > 0
    assert "| excitor |" in (tmp_path / "a" / "results.md").read_text()
