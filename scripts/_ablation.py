"""What the two model ablations (`ablate_context.py`, `ablate_moe.py`) share: byte-level text and the command line.

Text is tokenised as raw UTF-8 bytes (vocabulary 256): no tokenizer to train or download, and perplexities are per
byte. An example is (input ids, target ids) of equal length, the targets being the next ids (IGNORE_INDEX where no
loss is taken), as `peft.training.train_examples` takes them.

The command line (docs/cli.md) has the common flags and one flag per field of the experiment's config dataclass; it
runs the experiment, saves after every model, plots and prints the table.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time

import torch
import torch.nn.functional as F

from llama.model import Transformer
from peft.training.data import stdlib_docstrings
from scripts._cli import experiment_parser, positive, start, write_results

BYTE_VOCAB = 256


def next_token_example(ids: list[int]) -> tuple[list[int], list[int]]:
    """Plain language modelling on length+1 ids: every position predicts the next one."""
    return ids[:-1], ids[1:]


def byte_stream(documents: list[str]) -> list[int]:
    """UTF-8 bytes of the documents, separated by a blank line."""
    return list("\n\n".join(documents).encode("utf-8"))


def split_documents(documents: list[str], every: int = 20) -> tuple[list[str], list[str]]:
    """(train, held-out): every `every`-th document is held out."""
    return ([d for i, d in enumerate(documents) if i % every],
            [d for i, d in enumerate(documents) if i % every == 0])


def random_windows(stream: list[int], length: int, n: int, rng: random.Random) -> list[tuple[list[int], list[int]]]:
    """n next-token examples on random slices of length+1 bytes."""
    starts = [rng.randrange(len(stream) - length - 1) for _ in range(n)]
    return [next_token_example(stream[i:i + length + 1]) for i in starts]


@torch.no_grad()
def mean_nll(model: Transformer, stream: list[int], length: int, n_tokens: int, batch_size: int = 8) -> float:
    """Mean next-byte negative log-likelihood (nats) over consecutive windows covering the first n_tokens bytes."""
    model.eval()
    n = max(1, n_tokens // length)
    windows = torch.tensor([stream[i * length:(i + 1) * length + 1] for i in range(n)])  # [n, length+1]
    total = 0.0
    for i in range(0, n, batch_size):
        w = windows[i:i + batch_size]
        logits = model(w[:, :-1])  # [b, length, V]
        total += float(F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum"))
    return total / (n * length)


def perplexity(model: Transformer, stream: list[int], length: int, n_tokens: int, batch_size: int = 8) -> float:
    return math.exp(mean_nll(model, stream, length, n_tokens, batch_size))


# =====================================================================================================================
# Plots
# =====================================================================================================================

def variant_colors(variants) -> dict:
    """One colour per variant, the same in every panel (matplotlib's cycle restarts per axes and skips nothing, so a
    panel that leaves a variant out would shift every colour after it)."""
    return {v: f"C{i}" for i, v in enumerate(variants)}


def readable_log_axis(ax, axis: str = "y") -> None:
    """Label a log axis with plain numbers: 1-2-5 × 10^k over a wide range; over less than a decade (short runs),
    about five evenly spaced ticks instead of matplotlib's overlapping minor labels (3×10^0, 4×10^0, …)."""
    from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter, ScalarFormatter

    target = ax.yaxis if axis == "y" else ax.xaxis
    lo, hi = ax.get_ylim() if axis == "y" else ax.get_xlim()
    target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)) if hi / lo >= 10 else MaxNLocator(nbins=5))
    plain = ScalarFormatter(useOffset=False)  # as many decimals as the tick spacing needs, no 10^k notation
    plain.set_scientific(False)
    target.set_major_formatter(plain)
    target.set_minor_formatter(NullFormatter())


# =====================================================================================================================
# Command line
# =====================================================================================================================

def ablation_main(argv, *, doc: str, config_cls, variants, run, format_table, plot, name: str,
                  special_args: dict | None = None) -> dict:
    """The command line of a model ablation (docs/cli.md): the common flags, one flag per field of `config_cls`
    (--seed is the field `seed`), and --max-steps where the config has several step counts.

    `special_args`: field name -> extra `add_argument` keywords for fields whose type the default can't tell.
    Writes OUT/results.json after every model (a run cut short keeps what it finished), OUT/results.md (the table)
    and OUT/<name>_ablation.png.
    """
    defaults = config_cls()
    fields = [f for f in dataclasses.fields(defaults) if f.name != "seed"]
    p = experiment_parser(doc, f"ablate_{name}", seed=defaults.seed)
    for f in fields:
        flag, default = "--" + f.name.replace("_", "-"), getattr(defaults, f.name)
        if f.name == "variants":
            p.add_argument(flag, nargs="+", default=list(variants), choices=variants, help="variants to run")
        elif special_args and f.name in special_args:
            p.add_argument(flag, **special_args[f.name])
        else:
            p.add_argument(flag, type=type(default), default=default, help=f.name.replace("_", " "))
    step_fields = [f.name for f in fields if f.name.endswith("steps")]
    if len(step_fields) > 1:
        p.add_argument("--max-steps", type=positive(int), default=None,
                       help=f"cap {', '.join(step_fields)} (smoke tests)")
    p.add_argument("--corpus-chars", type=int, default=3_000_000, help="docstring characters to read")
    a = p.parse_args(argv)
    values = {f.name: (tuple(getattr(a, f.name)) if f.name == "variants" else getattr(a, f.name)) for f in fields}
    if getattr(a, "max_steps", None):
        values.update({key: min(values[key], a.max_steps) for key in step_fields})
    cfg = config_cls(**values, seed=a.seed)  # checked before the output folder is made
    out = start(a)
    print("config:", json.dumps(dataclasses.asdict(cfg)))

    def save(report):  # after every model: a run cut short keeps what it finished
        write_results(out, report)

    t0 = time.perf_counter()
    report = run(cfg, list(stdlib_docstrings(a.corpus_chars)), on_progress=save)
    png = out / f"{name}_ablation.png"
    plot(report, png)
    table = format_table(report)
    write_results(out, report, table)
    print()
    print(table)
    print(f"\nwall time {time.perf_counter() - t0:.0f} s; wrote {out / 'results.json'}, {out / 'results.md'}, {png}",
          file=sys.stderr)
    return report
