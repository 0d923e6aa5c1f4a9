"""Context-extension ablation: train a tiny LLaMA at L bytes, read it at 2L, 4L, 8L with no scaling, linear PI,
dynamic NTK, YaRN, llama3 scaling, and a Llama 4-style NoPE-interleaved (iRoPE) variant, each without and with a
short fine-tune at 8L. Perplexity per length plus passkey retrieval.

    python scripts/ablate_context.py                          # the default run (≤ 10 min on 2 idle CPU cores)
    python scripts/ablate_context.py --max-steps 20 --eval-tokens 1024 --n-passkey 4   # smoke test
    python scripts/ablate_context.py --variants none linear irope --seed 1 --out runs/context1

Writes results.json (everything, including every loss curve), results.md (the table) and context_ablation.png into
--out (default runs/ablate_context/<timestamp>). Training goes through the project's one loop
(`peft.training.train_examples`); the text is the standard library's docstrings (read from the running Python's
sources, no download).

Protocol (Position Interpolation, arXiv 2306.15595 §3, scaled down to a CPU budget):
  1. Data: the bytes (vocabulary 256) of the given documents, split into train / held-out by document. A fraction
     of the training windows are passkey documents (below), so that retrieval can be learnt at length L; they carry
     loss on the answer digits only (with loss on the fixed filler text as well, the copying signal drowns: a
     4-layer model stayed at chance after 2000 steps, and learnt the copy in a few hundred with answer-only loss).
  2. Two base models pre-trained at L with the same budget:
       rope  - RoPE in every layer;
       irope - Llama 4's recipe scaled down: every 4th layer NoPE with global attention and attention-temperature
               tuning (floor_scale = L), the others RoPE with chunked attention (chunk = L), so that no RoPE layer
               ever sees a distance it was not trained on.
  3. Variants: the rope base read with no scaling ("none": extrapolation), linear PI, dynamic NTK, YaRN and llama3 —
     the static ones with factor s = the longest ratio, L0 = L — and the irope base.
  4. Each variant without and with a short fine-tune at s·L (same data mix, its scaling switched on).
  5. Metrics per length ℓ ∈ {L, 2L, 4L, 8L}: held-out perplexity per byte over windows of ℓ (the same text cut
     differently), and passkey accuracy: a 5-digit key stated at a random depth of filler text and asked for at the
     end ("... The key is #48213. ... What is the key? #48213"); a hit needs all 5 digits right (arg-max of
     the teacher-forced predictions). Retrieval is learnable at L (the training mix holds such documents of length
     L); at 8L the key sits up to 8 times farther back than training ever showed.
"""

from __future__ import annotations

import copy
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python scripts/...` from anywhere

from llama.config import ModelArgs, RopeScaling  # noqa: E402
from llama.model import Transformer  # noqa: E402
from peft.training.data import IGNORE_INDEX  # noqa: E402
from peft.training.loop import train_examples  # noqa: E402
from scripts._ablation import (BYTE_VOCAB, ablation_main, byte_stream, next_token_example, perplexity,  # noqa: E402
                               readable_log_axis, split_documents, variant_colors)
from scripts._cli import run_cli  # noqa: E402

VARIANTS = ("none", "linear", "dynamic", "yarn", "llama3", "irope")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@dataclass
class ContextAblationConfig:
    seq_len: int = 64  # L, the training length in bytes
    max_ratio: int = 8  # evaluate at L, 2L, ... max_ratio·L; the static scalings use factor = max_ratio
    dim: int = 64
    n_layers: int = 4
    n_heads: int = 2  # head dim 32: 16 rotary frequencies
    rope_theta: float = 10000.0
    batch_tokens: int = 2048  # tokens per optimizer step, at every length
    base_steps: int = 1500
    base_lr: float = 3e-3
    ft_steps: int = 100
    ft_lr: float = 3e-4  # the base run ends its cosine at 3e-4: no jump up for the fine-tune
    passkey_fraction: float = 0.25  # share of training windows that are passkey documents
    eval_tokens: int = 8192  # held-out bytes per evaluation length
    n_passkey: int = 64  # passkey prompts per length
    seed: int = 0
    variants: tuple = VARIANTS

    def __post_init__(self):
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown context variants {unknown}; choose from {VARIANTS}")
        if self.seq_len < 56:
            raise ValueError(f"seq_len must be >= 56 bytes so a passkey prompt fits, got {self.seq_len}")
        if self.max_ratio < 2 or self.max_ratio & (self.max_ratio - 1):
            raise ValueError(f"max_ratio must be a power of two >= 2, got {self.max_ratio}")
        for key in ("base_steps", "ft_steps", "batch_tokens", "eval_tokens", "n_passkey"):
            if getattr(self, key) < 0 or (key != "ft_steps" and getattr(self, key) == 0):
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")

    @property
    def lengths(self) -> list[int]:
        return [self.seq_len * 2 ** k for k in range(int(math.log2(self.max_ratio)) + 1)]


# -- data ------------------------------------------------------------------------------------------------------


def passkey_document(rng: random.Random, length: int) -> tuple[list[int], str]:
    """length+1 bytes: filler, "The key is #K. " at a random depth, filler, "What is the key? #K".

    '#' occurs nowhere else, so retrieval is the one-token copy ("induction head": attend to what followed the
    earlier '#') a small byte-level model can learn. Returns (ids, K)."""
    key = f"{rng.randrange(10 ** 5):05d}"
    statement, question = f"The key is #{key}. ", f"What is the key? #{key}"
    budget = length + 1 - len(statement) - len(question)
    if budget < 0:
        raise ValueError(f"a passkey document needs at least {len(statement) + len(question) - 1} positions")
    before = rng.randint(0, budget)
    filler = (FILLER * (budget // len(FILLER) + 2))
    start = rng.randrange(len(FILLER))
    text = filler[start:start + before] + statement + filler[start + before:start + budget] + question
    return list(text.encode("ascii")), key


def passkey_example(rng: random.Random, length: int) -> tuple[list[int], list[int]]:
    """A passkey document as a training example with loss on the 5 answer digits only."""
    ids, _ = passkey_document(rng, length)
    return ids[:-1], [IGNORE_INDEX] * (length - 5) + ids[-5:]


def training_examples(stream: list[int], length: int, n: int, passkey_fraction: float,
                      rng: random.Random) -> list[tuple[list[int], list[int]]]:
    """n examples of `length` positions: random text slices, a `passkey_fraction` of them passkey documents."""
    out = []
    for _ in range(n):
        if rng.random() < passkey_fraction:
            out.append(passkey_example(rng, length))
        else:
            i = rng.randrange(len(stream) - length - 1)
            out.append(next_token_example(stream[i:i + length + 1]))
    return out


# -- models ------------------------------------------------------------------------------------------------------


def base_args(cfg: ContextAblationConfig, irope: bool) -> ModelArgs:
    """The tiny model; irope adds Llama 4's NoPE / chunked-attention / temperature layout at scale L."""
    extra = dict(nope_layer_interval=4, attention_chunk_size=cfg.seq_len, attn_temperature_tuning=True,
                 floor_scale=float(cfg.seq_len), attn_scale=0.1) if irope else {}
    return ModelArgs(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, vocab_size=BYTE_VOCAB, multiple_of=32,
                     rope_theta=cfg.rope_theta, max_seq_len=cfg.seq_len * cfg.max_ratio, **extra)


def scaling_for(variant: str, cfg: ContextAblationConfig) -> Optional[RopeScaling]:
    s, L0 = float(cfg.max_ratio), cfg.seq_len
    return {"none": None, "irope": None,
            "linear": RopeScaling("linear", factor=s),
            "dynamic": RopeScaling("dynamic", factor=s, original_max_position_embeddings=L0),
            "yarn": RopeScaling("yarn", factor=s, original_max_position_embeddings=L0),
            "llama3": RopeScaling("llama3", factor=s, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=L0)}[variant]


# -- metrics -------------------------------------------------------------------------------------------------------


@torch.no_grad()
def passkey_accuracy(model: Transformer, length: int, n: int, seed: int, batch_size: int = 8) -> float:
    """Share of prompts whose 5 key digits are all the arg-max next-byte prediction (teacher-forced)."""
    model.eval()
    rng = random.Random(seed)
    docs = torch.tensor([passkey_document(rng, length)[0] for _ in range(n)])  # [n, length+1]
    hits = 0
    for i in range(0, n, batch_size):
        d = docs[i:i + batch_size]
        predicted = model(d[:, :-1])[:, -5:].argmax(-1)  # predictions of the last 5 bytes (the key)
        hits += int((predicted == d[:, -5:]).all(-1).sum())
    return hits / n


def evaluate(model: Transformer, cfg: ContextAblationConfig, stream: list[int]) -> dict:
    return {"ppl": {ell: perplexity(model, stream, ell, cfg.eval_tokens) for ell in cfg.lengths},
            "passkey": {ell: passkey_accuracy(model, ell, cfg.n_passkey, cfg.seed + 1) for ell in cfg.lengths}}


# -- the experiment ----------------------------------------------------------------------------------------------


def run(cfg: ContextAblationConfig, documents: list[str], log=print, on_progress=None) -> dict:
    """The whole protocol; on_progress(report) after each base model and variant (e.g. to save partial results)."""
    t_start = time.perf_counter()
    train_docs, heldout_docs = split_documents(documents)
    train_stream, heldout = byte_stream(train_docs), byte_stream(heldout_docs)
    if len(heldout) < cfg.eval_tokens + cfg.seq_len * cfg.max_ratio:
        raise ValueError(f"held-out text has {len(heldout)} bytes; need eval_tokens + longest window; give more "
                         f"documents or lower eval_tokens")
    L, long = cfg.seq_len, cfg.seq_len * cfg.max_ratio
    rng = random.Random(cfg.seed)
    base_rows = cfg.batch_tokens // L * cfg.base_steps
    base_examples = training_examples(train_stream, L, base_rows, cfg.passkey_fraction, rng)
    ft_examples = training_examples(train_stream, long, max(1, cfg.batch_tokens // long) * max(cfg.ft_steps, 1),
                                    cfg.passkey_fraction, rng)
    report = {"config": asdict(cfg), "lengths": cfg.lengths, "results": {}, "curves": {}, "wall_s": {}}

    bases = {}
    for kind in sorted({"irope" if v == "irope" else "rope" for v in cfg.variants}):
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed)
        model = Transformer(base_args(cfg, irope=kind == "irope"))
        report["curves"][f"base-{kind}"] = train_examples(model, base_examples, steps=cfg.base_steps, lr=cfg.base_lr,
                                                          batch_size=cfg.batch_tokens // L, seed=cfg.seed)
        bases[kind] = model
        report["wall_s"][f"base-{kind}"] = time.perf_counter() - t0
        last = report["curves"][f"base-{kind}"][-50:]
        log(f"pre-trained {kind} base at L={L}: loss {sum(last) / len(last):.3f} (mean of the last {len(last)} "
            f"steps; {report['wall_s'][f'base-{kind}']:.0f} s)")
        if on_progress:
            on_progress(report)

    for variant in cfg.variants:
        t0 = time.perf_counter()
        model = copy.deepcopy(bases["irope" if variant == "irope" else "rope"])
        model.set_rope_scaling(scaling_for(variant, cfg))
        results = {"no_ft": evaluate(model, cfg, heldout)}
        if cfg.ft_steps:
            report["curves"][f"ft-{variant}"] = train_examples(model, ft_examples, steps=cfg.ft_steps, lr=cfg.ft_lr,
                                                               batch_size=max(1, cfg.batch_tokens // long),
                                                               seed=cfg.seed + 1)
            results["ft"] = evaluate(model, cfg, heldout)
        report["results"][variant] = results
        report["wall_s"][variant] = time.perf_counter() - t0
        log(f"{variant:8s} no ft: " + format_row(results["no_ft"], cfg.lengths) +
            (" | ft: " + format_row(results["ft"], cfg.lengths) if "ft" in results else "") +
            f" ({report['wall_s'][variant]:.0f} s)")
        if on_progress:
            on_progress(report)
    report["wall_s"]["total"] = time.perf_counter() - t_start
    return report


# -- presentation --------------------------------------------------------------------------------------------------


def format_row(r: dict, lengths: list[int]) -> str:
    return "  ".join(f"{r['ppl'][ell]:7.2f}" for ell in lengths) + "   " + \
        "  ".join(f"{r['passkey'][ell]:6.2f}" for ell in lengths)


def format_table(report: dict) -> str:
    lengths = report["lengths"]
    L = lengths[0]
    head = f"{'variant':10s} {'fine-tune':9s}  " + "  ".join(f"{f'ppl@{ell // L}L':>7s}" for ell in lengths)
    head += "   " + "  ".join(f"{f'key@{ell // L}L':>6s}" for ell in lengths)
    lines = [head, "-" * len(head)]
    for variant, res in report["results"].items():
        for stage in ("no_ft", "ft"):
            if stage in res:
                lines.append(f"{variant:10s} {'yes' if stage == 'ft' else 'no':9s}  " + format_row(res[stage], lengths))
    return "\n".join(lines)


def plot(report: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, L = report["lengths"], report["lengths"][0]
    colors = variant_colors(VARIANTS)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    for col, stage in enumerate(("no_ft", "ft")):
        for variant, res in report["results"].items():
            if stage not in res:
                continue
            ratio = [ell / L for ell in lengths]
            for row, metric in enumerate(("ppl", "passkey")):
                axes[row, col].plot(ratio, [res[stage][metric][ell] for ell in lengths], marker="o", label=variant,
                                    color=colors[variant])
        title = "no fine-tune" if stage == "no_ft" else f"after {report['config']['ft_steps']} steps at " \
                                                          f"{lengths[-1] // L}L"
        axes[0, col].set(title=f"held-out perplexity, {title}", yscale="log", ylabel="perplexity per byte")
        axes[1, col].set(title=f"passkey accuracy, {title}", xlabel="evaluation length / training length L",
                         ylabel="accuracy", ylim=(-0.05, 1.05))
        axes[1, col].set_xscale("log", base=2)
        axes[1, col].set_xticks([ell / L for ell in lengths], [f"{ell // L}" for ell in lengths])
        axes[1, col].minorticks_off()
        readable_log_axis(axes[0, col])
        axes[0, col].legend(fontsize=8)
    fig.suptitle(f"Context extension of a model trained at L = {L} bytes")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# =====================================================================================================================
# Command line
# =====================================================================================================================

def main(argv=None) -> dict:
    return ablation_main(argv, doc=__doc__, config_cls=ContextAblationConfig, variants=VARIANTS, run=run,
                         format_table=format_table, plot=plot, name="context")


if __name__ == "__main__":
    run_cli(main)
