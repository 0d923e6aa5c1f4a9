"""Training-memory calculator: weights, gradients, optimizer state and activations for any preset × method × dtype
× batch × sequence length, and the QLoRA paper's two headline figures reproduced from it.

    python scripts/memory.py                                   # LLaMA-7B and 65B, every method, bf16, batch 1, 512
    python scripts/memory.py --models llama-3.1-8b --methods full qlora --batch-size 1 4 --seq-len 512 2048
    python scripts/memory.py --no-grad-checkpointing --out runs/memory/no_ckpt

Sizes are GB = 1e9 bytes (the QLoRA paper's unit). The formulas are in peft/training/memory.py. Writes
OUT/results.json (the rows and the QLoRA checks) and OUT/results.md (the table); OUT defaults to
runs/memory/<timestamp>. The calculator is deterministic: --seed changes nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama.config import ModelArgs  # noqa: E402
from peft.training.memory import DTYPE_BYTES, ESTIMATE_METHODS, estimate, table  # noqa: E402
from scripts._cli import experiment_parser, positive, run_cli, start, write_results  # noqa: E402


def qlora_claims() -> list[dict]:
    """The QLoRA abstract / §1: 65B fine-tuning goes from > 780 GB (16-bit full) to < 48 GB (QLoRA)."""
    args = ModelArgs.from_name("llama-65b")
    full = estimate(args, "full", "bf16", batch=1, seq_len=512, grad_checkpointing=True)
    qlora = estimate(args, "qlora", "bf16", batch=1, seq_len=512, grad_checkpointing=True)
    states = full.weights + full.gradients + full.optimizer
    return [{"claim": "16-bit full fine-tuning of LLaMA-65B needs more than 780 GB",
             "computed_gb": states / 1e9, "what": "bf16 weights + bf16 gradients + fp32 Adam m, v",
             "holds": states > 780e9},
            {"claim": "QLoRA fine-tunes LLaMA-65B on one 48 GB GPU", "computed_gb": qlora.total / 1e9,
             "what": "NF4+DQ base, LoRA r=64 on all block linears, bf16, batch 1 × 512, gradient checkpointing",
             "holds": qlora.total < 48e9}]


parser = experiment_parser(__doc__, "memory")
parser.add_argument("--models", nargs="+", default=["llama-7b", "llama-65b"], help="presets (llama.list_models())")
parser.add_argument("--methods", nargs="+", default=list(ESTIMATE_METHODS), choices=ESTIMATE_METHODS,
                    help="fine-tuning methods")
parser.add_argument("--dtypes", nargs="+", default=["bf16"], choices=list(DTYPE_BYTES), help="weight dtypes")
parser.add_argument("--batch-size", nargs="+", type=positive(int), default=[1], help="batch sizes")
parser.add_argument("--seq-len", nargs="+", type=positive(int), default=[512], help="sequence lengths")
parser.add_argument("--no-grad-checkpointing", action="store_true", help="keep every layer's activations")


def main(argv=None) -> dict:
    a = parser.parse_args(argv)
    rows = table(a.models, a.methods, a.dtypes, a.batch_size, a.seq_len, not a.no_grad_checkpointing)
    out = start(a)
    cols = ["model", "method", "dtype", "batch", "seq_len", "trainable", "trainable_pct", "weights_gb",
            "gradients_gb", "optimizer_gb", "activations_gb", "total_gb"]
    lines = ["| " + " | ".join(c.replace("_gb", " (GB)").replace("_pct", " %") for c in cols) + " |",
             "|" + " --- |" * len(cols)]
    for r in rows:
        cells = [f"{r[c]:,}" if c == "trainable" else f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c])
                 for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))
    claims = qlora_claims()
    print(f"\nactivations: {'every layer kept' if a.no_grad_checkpointing else 'gradient checkpointing'}; "
          f"AdamW moments in fp32 (8 bytes per trainable parameter)")
    for c in claims:
        print(f"QLoRA paper: {c['claim']}: computed {c['computed_gb']:.1f} GB ({c['what']}) -> "
              f"{'reproduced' if c['holds'] else 'NOT reproduced'}")
    results = {"rows": rows, "qlora_claims": claims}
    print(f"wrote {write_results(out, results, chr(10).join(lines))}", file=sys.stderr)
    return results


if __name__ == "__main__":
    run_cli(main)
