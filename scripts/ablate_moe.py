"""MoE ablation: dense SwiGLU vs Llama 4's top-1 MoE at equal active parameters, with and without the Switch
load-balancing (+ router z) loss, with and without the shared expert. Loss curves and per-expert load.

    python scripts/ablate_moe.py                               # the default run (≤ 10 min on 2 idle CPU cores)
    python scripts/ablate_moe.py --steps 10 --eval-tokens 2048  # smoke test
    python scripts/ablate_moe.py --n-experts 4 --capacity-factor 1.25 --seed 1 --out runs/moe1

Writes results.json (loss curves, per-step expert shares) and moe_ablation.png into --out. The experiment is
`llama.moe_ablation`; training goes through the project's one loop, `peft.train.train` (which adds
`model.aux_loss()` to the loss); the text is the standard library's docstrings, read at run time.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama.moe_ablation import VARIANTS, MoEAblationConfig, format_table, plot, run  # noqa: E402
from scripts._ablation_cli import ablation_main  # noqa: E402


def main(argv=None) -> dict:
    return ablation_main(argv, doc=__doc__, config_cls=MoEAblationConfig, variants=VARIANTS, run=run,
                         format_table=format_table, plot=plot, name="moe",
                         special_args={"capacity_factor": dict(type=float, default=None,
                                                               help="Switch expert capacity (default: no dropping)")})


if __name__ == "__main__":
    main()
