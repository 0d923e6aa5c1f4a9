"""Command line shared by the two model ablations (`ablate_context.py`, `ablate_moe.py`): one flag per field of
the experiment's config dataclass, then run, save after every model, plot, print the table."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from peft.data import stdlib_docstrings
from peft.train import train_examples


def ablation_main(argv, *, doc: str, config_cls, variants, run, format_table, plot, name: str,
                  special_args: dict | None = None) -> dict:
    """`special_args`: field name -> extra `add_argument` keywords for fields whose type the default can't tell."""
    defaults = config_cls()
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(defaults):
        flag, default = "--" + f.name.replace("_", "-"), getattr(defaults, f.name)
        if f.name == "variants":
            p.add_argument(flag, nargs="+", default=list(variants), choices=variants)
        elif special_args and f.name in special_args:
            p.add_argument(flag, **special_args[f.name])
        else:
            p.add_argument(flag, type=type(default), default=default, help=f"(default {default})")
    p.add_argument("--out", default=f"runs/ablate_{name}", help="output folder (default %(default)s)")
    p.add_argument("--corpus-chars", type=int, default=3_000_000, help="docstring characters to read")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default %(default)s)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = config_cls(**{f.name: (tuple(getattr(a, f.name)) if f.name == "variants" else getattr(a, f.name))
                        for f in dataclasses.fields(defaults)})
    print("config:", json.dumps(dataclasses.asdict(cfg)))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    def save(report):  # after every model: a run cut short keeps what it finished
        (out / "results.json").write_text(json.dumps(report))

    t0 = time.perf_counter()
    report = run(cfg, list(stdlib_docstrings(a.corpus_chars)), train_examples, on_progress=save)
    save(report)
    png = out / f"{name}_ablation.png"
    plot(report, png)
    print()
    print(format_table(report))
    print(f"\nwall time {time.perf_counter() - t0:.0f} s; results in {out / 'results.json'}, {png}")
    return report
