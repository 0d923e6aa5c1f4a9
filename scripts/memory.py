"""Training-memory calculator: weights, gradients, optimizer state and activations for any preset × method × dtype
× batch × sequence length, and the QLoRA paper's two headline figures reproduced from it.

    python scripts/memory.py                                   # LLaMA-7B and 65B, every method, bf16, batch 1, 512
    python scripts/memory.py --models llama-3.1-8b --methods full qlora --batch 1 4 --seq-len 512 2048
    python scripts/memory.py --no-grad-checkpointing --json mem.json

Sizes are GB = 1e9 bytes (the QLoRA paper's unit). The formulas are in peft/memory.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama.config import ModelArgs  # noqa: E402
from peft.training.memory import DTYPE_BYTES, ESTIMATE_METHODS, estimate, table  # noqa: E402


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


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["llama-7b", "llama-65b"], help="presets (llama.list_models())")
    p.add_argument("--methods", nargs="+", default=list(ESTIMATE_METHODS), choices=ESTIMATE_METHODS)
    p.add_argument("--dtypes", nargs="+", default=["bf16"], choices=list(DTYPE_BYTES))
    p.add_argument("--batch", nargs="+", type=int, default=[1])
    p.add_argument("--seq-len", nargs="+", type=int, default=[512])
    p.add_argument("--no-grad-checkpointing", action="store_true", help="keep every layer's activations")
    p.add_argument("--json", help="also write the rows and the QLoRA checks to this file")
    p.add_argument("--seed", type=int, default=0, help="accepted for uniformity; the calculator is deterministic")
    a = p.parse_args(argv)
    rows = table(a.models, a.methods, a.dtypes, a.batch, a.seq_len, not a.no_grad_checkpointing)
    cols = ["model", "method", "dtype", "batch", "seq_len", "trainable", "trainable_pct", "weights_gb",
            "gradients_gb", "optimizer_gb", "activations_gb", "total_gb"]
    print("| " + " | ".join(c.replace("_gb", " (GB)").replace("_pct", " %") for c in cols) + " |")
    print("|" + " --- |" * len(cols))
    for r in rows:
        cells = [f"{r[c]:,}" if c == "trainable" else f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c])
                 for c in cols]
        print("| " + " | ".join(cells) + " |")
    claims = qlora_claims()
    print(f"\nactivations: {'every layer kept' if a.no_grad_checkpointing else 'gradient checkpointing'}; "
          f"AdamW moments in fp32 (8 bytes per trainable parameter)")
    for c in claims:
        print(f"QLoRA paper: {c['claim']}: computed {c['computed_gb']:.1f} GB ({c['what']}) -> "
              f"{'reproduced' if c['holds'] else 'NOT reproduced'}")
    out = {"rows": rows, "qlora_claims": claims}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
