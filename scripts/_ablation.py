"""What the two model ablations (`ablate_context.py`, `ablate_moe.py`) share: byte-level text and the command line.

Text is tokenised as raw UTF-8 bytes (vocabulary 256): no tokenizer to train or download, and perplexities are per
byte. An example is (input ids, target ids) of equal length, the targets being the next ids (IGNORE_INDEX where no
loss is taken), as `peft.training.train_examples` takes them.

The command line has one flag per field of the experiment's config dataclass; it runs the experiment, saves after
every model, plots and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llama.model import Transformer
from peft.training.data import stdlib_docstrings

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
# Command line
# =====================================================================================================================

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
    report = run(cfg, list(stdlib_docstrings(a.corpus_chars)), on_progress=save)
    save(report)
    png = out / f"{name}_ablation.png"
    plot(report, png)
    print()
    print(format_table(report))
    print(f"\nwall time {time.perf_counter() - t0:.0f} s; results in {out / 'results.json'}, {png}")
    return report
