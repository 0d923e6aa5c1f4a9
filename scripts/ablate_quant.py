"""QLoRA §3's data-type claim, measured: 4-bit NormalFloat (NF4) loses less than 4-bit floats (FP4) or 4-bit integers
(Int4) at the same number of bits, on normally distributed weights and on a trained model.

    python scripts/ablate_quant.py                      # N(0, 1) weights + the main job's cached "skill" base
    python scripts/ablate_quant.py --n 16777216 --seed 1

Every format here quantises blocks of B = 64 consecutive weights (the weight flattened row-major, as bitsandbytes
does) by absmax: c_b = max_{j in b} |w_j|, each w_j / c_b in [-1, 1] goes to the nearest of the format's levels q,
and the weight is restored as q · c_b. Storage: 4 bits per weight + one float32 c_b per block = 4 + 32/64 = 4.5 bits
(4.127 with NF4's double quantisation). Only the levels differ (each normalised so the largest is 1):

    Int4 (absmax)    q = round(7 · w / c_b) / 7, an integer in [-7, 7]     QLoRA §2 eq. 1 with 2^(4-1) - 1 = 7
    FP4 E2M1         ±2^(e-1) · (1 + m/2) for e in 1..3, ±m/2 for e = 0 (subnormal); m in {0, 1}: {0, .5, 1, 1.5, 2,
                     3, 4, 6} / 6                                              (OCP MX FP4; exponent bias 2^(2-1) - 1)
    FP4 E3M0         ±2^(e-3) for e in 1..7, 0 for e = 0: {0, 1/64, 1/32, …, 1/2, 1}       (bias 2^(3-1) - 1 = 3)
    FP4 (bnb)        bitsandbytes' quant_type="fp4" table (`functional.get_4bit_type`): {0, 0.0625, 2, 3, 4, 6, 8, 12}
                     / 12, an E2M1 variant with exponent bias 2 and 0.0625 as its only subnormal
    NF4              QLoRA §3: 16 quantiles of N(0, 1) with an exact zero (kernels.nf4_quantize, bit-exact with
                     bitsandbytes), without and with double quantisation of the absmax constants

Measured, each as relative squared error ||W - Q(W)||² / ||W||²:
  1. on --n weights drawn from N(0, 1) (§3's premise: trained weights are roughly normal per block);
  2. on the trained base's block linears (wq wk wv wo w1 w2 w3, pooled): the main job's base pre-trained on docstrings
     and raw sort text (scripts/_bases.py; cached, pre-trained first if missing);
  3. then the base itself with every block linear replaced by its quantised copy (embeddings, norms and the output
     head stay float32, as QLoRA keeps them in 16 bits): held-out loss on docstrings and on raw sort text (QLoRA's
     Table 2 is this measurement as perplexity on the Pile), and the raw-form sort probe (its skill, in %).

Outputs in --out: results.json, results.md (the table), quantisation.png (errors, held-out losses, and each format's
levels against the N(0, 1) block distribution).
"""

from __future__ import annotations

import copy
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python scripts/...` from anywhere

import llama  # noqa: E402
from kernels import nf4_dequantize, nf4_quantize  # noqa: E402
from kernels.nf4 import NF4_VALUES  # noqa: E402
from peft.targets import BLOCK_LINEARS  # noqa: E402
from peft.training.loop import evaluate_loss  # noqa: E402
from scripts._bases import BaseConfig, heldout_rows, pretrained_base, raw_probe_accuracy, tokenizer  # noqa: E402
from scripts._cli import (UsageError, experiment_parser, flush_denormals, positive, run_cli, start,  # noqa: E402
                          write_results)

BLOCK = 64  # QLoRA's block size for the first-level absmax constants


# =====================================================================================================================
# The formats
# =====================================================================================================================

def minifloat_levels(exponent_bits: int, mantissa_bits: int) -> tuple[float, ...]:
    """Every value of a sign + `exponent_bits` + `mantissa_bits` float with IEEE-style bias 2^(E-1) - 1 and no
    inf/NaN codes (OCP MX FP4 convention), normalised to a largest magnitude of 1, sorted:

        e >= 1:  ±2^(e - bias) · (1 + m / 2^M)        e = 0 (subnormal):  ±2^(1 - bias) · (m / 2^M)
    """
    bias = 2 ** (exponent_bits - 1) - 1
    magnitudes = set()
    for e in range(2 ** exponent_bits):
        for m in range(2 ** mantissa_bits):
            fraction = m / 2 ** mantissa_bits
            magnitudes.add(2.0 ** (e - bias) * (1 + fraction) if e else 2.0 ** (1 - bias) * fraction)
    top = max(magnitudes)
    return tuple(sorted({sign * v / top for v in magnitudes for sign in (1.0, -1.0)}))


# bitsandbytes `get_4bit_type("fp4")`, by value (its list is in bit-pattern order), before its division by 12
BNB_FP4 = (0.0, 0.0625, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)
LEVELS: dict[str, tuple[float, ...]] = {
    "int4": tuple(k / 7 for k in range(-7, 8)),
    "fp4_e2m1": minifloat_levels(2, 1),
    "fp4_e3m0": minifloat_levels(3, 0),
    "fp4_bnb": tuple(sorted({s * v / 12 for v in BNB_FP4 for s in (1.0, -1.0)})),
    "nf4": tuple(NF4_VALUES),
}


def _blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks [nb, B] of the row-major flattened weight, zero-padded; absmax [nb, 1]). Zero padding leaves the last
    block's absmax unchanged."""
    flat = w.detach().reshape(-1).float()
    blocks = torch.nn.functional.pad(flat, (0, -flat.numel() % BLOCK)).view(-1, BLOCK)  # [nb, B]
    return blocks, blocks.abs().amax(dim=1, keepdim=True)  # [nb, 1]


def _unblock(blocks: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return blocks.reshape(-1)[:like.numel()].view(like.shape).to(like.dtype)


def int4_absmax(w: torch.Tensor) -> torch.Tensor:
    """Int4 by absmax (QLoRA §2 eq. 1 at 4 bits): Q = round(7 · w / c_b), restored as Q · c_b / 7."""
    blocks, c = _blocks(w)
    scale = torch.where(c > 0, 7.0 / c, torch.zeros_like(c))
    return _unblock(torch.round(blocks * scale).clamp(-7, 7) * (c / 7.0), w)


def nearest_level(levels: tuple[float, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The absmax quantiser of a level table: each w / c_b to the nearest level (ties to the lower one)."""
    table = torch.tensor(levels, dtype=torch.float32)
    midpoints = (table[1:] + table[:-1]) / 2

    def quantize(w: torch.Tensor) -> torch.Tensor:
        blocks, c = _blocks(w)
        normed = torch.where(c > 0, blocks / c.clamp(min=1e-38), torch.zeros_like(blocks))  # in [-1, 1]
        return _unblock(table[torch.bucketize(normed, midpoints)] * c, w)
    return quantize


def nf4(double_quant: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """The project's NF4 (kernels/nf4.py), quantised and dequantised back to float32."""
    return lambda w: nf4_dequantize(nf4_quantize(w.detach().float(), BLOCK, double_quant), torch.float32).to(w.dtype)


# name -> (quantiser, bits per weight, how it is defined)
FORMATS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], float, str]] = {
    "int4": (int4_absmax, 4.5, "round(7 w / c) / 7"),
    "fp4_e2m1": (nearest_level(LEVELS["fp4_e2m1"]), 4.5, "E2M1, bias 1 (OCP MX)"),
    "fp4_e3m0": (nearest_level(LEVELS["fp4_e3m0"]), 4.5, "E3M0, bias 3"),
    "fp4_bnb": (nearest_level(LEVELS["fp4_bnb"]), 4.5, "bitsandbytes fp4 table"),
    "nf4": (nf4(False), 4.5, "QLoRA NF4"),
    "nf4_dq": (nf4(True), 4 + 8 / 64 + 32 / (64 * 256), "NF4 + double quantisation"),
}


def relative_error(weights: list[torch.Tensor], quantize: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """Σ ||W - Q(W)||² / Σ ||W||² over the tensors (float64 sums)."""
    err = sum(float((w.double() - quantize(w).double()).pow(2).sum()) for w in weights)
    return err / sum(float(w.double().pow(2).sum()) for w in weights)


def quantized_copy(model: llama.Transformer, quantize: Callable[[torch.Tensor], torch.Tensor]) -> llama.Transformer:
    """A copy of the model whose block linears hold Q(W) (dequantised); everything else untouched."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in out.named_modules():
            if name.rsplit(".", 1)[-1] in BLOCK_LINEARS:
                module.weight.copy_(quantize(module.weight))
    return out


def excess_kurtosis(weights: list[torch.Tensor]) -> float:
    """E[z^4] - 3 of the weights' z-scores, per tensor, pooled (0 for a normal distribution)."""
    z = torch.cat([((w - w.mean()) / w.std()).reshape(-1).double() for w in weights])
    return float(z.pow(4).mean()) - 3.0


# =====================================================================================================================
# The experiment
# =====================================================================================================================

def run(base_cfg: BaseConfig, n: int, seed: int, cache, n_probe: int = 200, progress: bool = False) -> dict:
    """Every format on `n` N(0, 1) weights (seeded by `seed`) and on the base `base_cfg` (pre-trained if missing)."""
    t0, c0 = time.perf_counter(), time.process_time()
    gen = torch.Generator().manual_seed(seed)
    gaussian = [torch.randn(n // 1024, 1024, generator=gen)]  # [n/1024, 1024]
    path, info = pretrained_base(base_cfg, cache, base_cfg.skill, progress=progress,
                                 say=lambda *a: print(*a, file=sys.stderr, flush=True))
    model = llama.load(path)
    tok = tokenizer(cache)
    trained = [m.weight.detach() for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in BLOCK_LINEARS]
    skill = base_cfg.skill
    held = heldout_rows(base_cfg, tok, cache, skill)

    def evaluate(m) -> dict:
        out = {f"heldout_loss_{k}": evaluate_loss(m, rows, 16, tok.pad_id) for k, rows in held.items()}
        return {**out, "raw_probe_exact_match": raw_probe_accuracy(m, tok, skill, n_probe, 12)}

    rows = [{"format": "float32", "bits": 32.0, "definition": "no quantisation", "levels": None,
             "rel_error_gaussian": 0.0, "rel_error_trained": 0.0, **evaluate(model)}]
    for name, (quantize, bits, definition) in FORMATS.items():
        rows.append({"format": name, "bits": bits, "definition": definition,
                     "levels": list(LEVELS[name.removesuffix("_dq")]),
                     "rel_error_gaussian": relative_error(gaussian, quantize),
                     "rel_error_trained": relative_error(trained, quantize),
                     **evaluate(quantized_copy(model, quantize))})
    return {"n_gaussian": n, "seed": seed, "block": BLOCK, "skill": skill, "base": {**info, "path": str(path)},
            "trained_weights": {"count": sum(w.numel() for w in trained),
                                "excess_kurtosis": excess_kurtosis(trained)},
            "rows": rows, "wall_time_s": time.perf_counter() - t0, "cpu_time_s": time.process_time() - c0,
            "environment": {"python": platform.python_version(), "torch": torch.__version__,
                            "threads": torch.get_num_threads()}}


def format_table(report: dict) -> str:
    tw = report["trained_weights"]
    lines = [f"Blocks of {report['block']} weights, absmax scaling. Relative error = ||W - Q(W)||² / ||W||² on "
             f"{report['n_gaussian']:,} N(0, 1) weights and on the {tw['count']:,} block-linear weights of the trained "
             f"base `{report['base']['name']}` (excess kurtosis {tw['excess_kurtosis']:.2f}; 0 for a normal "
             f"distribution). Held-out loss and the raw-form probe: the base with every block linear quantised.",
             "", "| format | definition | bits / weight | rel. error N(0,1) | rel. error trained | "
             f"held-out loss docs | held-out loss {report['skill']} text | raw-form {report['skill']} probe (%) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["rows"]:
        skill_loss = r[f"heldout_loss_{report['skill']}"]
        lines.append(f"| {r['format']} | {r['definition']} | {r['bits']:.3f} | {r['rel_error_gaussian']:.5f} | "
                     f"{r['rel_error_trained']:.5f} | {r['heldout_loss_docs']:.4f} | {skill_loss:.4f} | "
                     f"{100 * r['raw_probe_exact_match']:.1f} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["levels"] is not None]
    names = [r["format"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    x = range(len(rows))
    axes[0].bar([i - 0.2 for i in x], [r["rel_error_gaussian"] for r in rows], 0.4, label="N(0, 1) weights")
    axes[0].bar([i + 0.2 for i in x], [r["rel_error_trained"] for r in rows], 0.4, label="trained base's weights")
    axes[0].set_ylabel("||W - Q(W)||² / ||W||²")
    axes[0].set_title(f"quantisation error (blocks of {report['block']}, absmax)")
    ref = report["rows"][0]
    for key, offset, label in (("heldout_loss_docs", -0.2, "docstrings"),
                               (f"heldout_loss_{report['skill']}", 0.2, f"raw {report['skill']} text")):
        axes[1].bar([i + offset for i in x], [r[key] - ref[key] for r in rows], 0.4, label=label)
    axes[1].set_ylabel("held-out loss − float32 base's (nats)")
    axes[1].set_title("the base with quantised block linears")
    for ax in axes[:2]:
        ax.set_xticks(list(x), names, rotation=20)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    # levels against the distribution of w / c_b for N(0, 1) blocks of 64
    z = torch.randn(4096, report["block"], generator=torch.Generator().manual_seed(0))
    axes[2].hist((z / z.abs().amax(1, keepdim=True)).reshape(-1).numpy(), bins=120, density=True, color="0.85")
    for i, r in enumerate(r for r in rows if r["format"] != "nf4_dq"):
        axes[2].scatter(r["levels"], [-0.25 - 0.2 * i] * len(r["levels"]), s=10, label=r["format"])
    axes[2].set_xlabel("w / absmax of its block")
    axes[2].set_yticks([])
    axes[2].set_title("levels vs N(0, 1) blocks of 64")
    axes[2].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    p = experiment_parser(__doc__, "ablate_quant")
    p.add_argument("--n", type=positive(), default=1 << 22, help="normally distributed weights (a multiple of 1024)")
    p.add_argument("--base-steps", type=positive(), default=BaseConfig.steps,
                   help="pre-training steps of the base (the main job's --base-steps; its cached base is reused)")
    p.add_argument("--n-probe", type=positive(), default=200, help="held-out inputs of the raw-form sort probe")
    p.add_argument("--cache-dir", default=None, help="where the main job's bases are cached "
                   "(default $LLAMA_PEFT_CACHE or ~/.cache/llama-peft-zoo)")
    a = p.parse_args(argv)
    if a.n % 1024:
        raise UsageError(f"--n must be a multiple of 1024, got {a.n}")
    out = start(a)
    base = BaseConfig(skill="sort", steps=a.base_steps)  # the main job's "skill" base at its default shape
    with flush_denormals():
        report = run(base, a.n, a.seed, a.cache_dir, a.n_probe, not a.no_progress)
    table = format_table(report)
    write_results(out, report, table)
    plot(report, out / "quantisation.png")
    print(table)
    print(f"\nwall time {report['wall_time_s']:.0f} s, CPU time {report['cpu_time_s']:.0f} s; results in {out}/")
    return report


if __name__ == "__main__":
    run_cli(main)
