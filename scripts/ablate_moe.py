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

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from llama.moe_ablation import VARIANTS, MoEAblationConfig, format_table, plot, run  # noqa: E402
from llama.toy_data import TrainSpec  # noqa: E402
from peft.data import Row, stdlib_docstrings  # noqa: E402
from peft.train import TrainConfig, train  # noqa: E402


def train_fn(model, examples, spec: TrainSpec, on_step=None) -> list:
    """The project's training loop on (inputs, targets) examples; returns the loss of every step."""
    rows = [Row(list(x), list(y)) for x, y in examples]
    cfg = TrainConfig(steps=spec.steps, batch_size=spec.batch_size, micro_batch_size=spec.batch_size, lr=spec.lr,
                      warmup_steps=max(1, spec.steps // 10), seed=spec.seed, progress=False)
    callbacks = [lambda step, record: on_step(step)] if on_step else []
    return [r["loss"] for r in train(model, rows, cfg, pad_id=0, callbacks=callbacks).history]


def main(argv=None) -> dict:
    d = MoEAblationConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(d):
        name, default = "--" + f.name.replace("_", "-"), getattr(d, f.name)
        if f.name == "variants":
            p.add_argument(name, nargs="+", default=list(VARIANTS), choices=VARIANTS)
        elif f.name == "capacity_factor":
            p.add_argument(name, type=float, default=None, help="Switch expert capacity (default: no dropping)")
        else:
            p.add_argument(name, type=type(default), default=default, help=f"(default {default})")
    p.add_argument("--out", default="runs/ablate_moe", help="output folder (default %(default)s)")
    p.add_argument("--corpus-chars", type=int, default=3_000_000, help="docstring characters to read")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default %(default)s)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = MoEAblationConfig(**{f.name: (tuple(getattr(a, f.name)) if f.name == "variants" else getattr(a, f.name))
                               for f in dataclasses.fields(d)})
    print("config:", json.dumps(dataclasses.asdict(cfg)))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    def save(report):  # after every model: a run cut short keeps what it finished
        (out / "results.json").write_text(json.dumps(report))

    t0 = time.perf_counter()
    report = run(cfg, list(stdlib_docstrings(a.corpus_chars)), train_fn, on_progress=save)
    save(report)
    plot(report, out / "moe_ablation.png")
    print()
    print(format_table(report))
    print(f"\nwall time {time.perf_counter() - t0:.0f} s; results in {out / 'results.json'}, "
          f"{out / 'moe_ablation.png'}")
    return report


if __name__ == "__main__":
    main()
