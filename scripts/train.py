"""Pre-train or fine-tune any preset with any method, from a config file plus --section.key=value overrides.

    python scripts/train.py --config configs/sft_lora.toml --train.lr=3e-4 --seed 1
    torchrun --nproc_per_node 2 scripts/train.py --config configs/sft_lora.toml     # FSDP2, one shard per rank

The resolved config is printed first; unknown sections or keys are errors. With train.out_dir set, the run writes
metrics.jsonl / metrics.csv, crash-safe checkpoints (resume with --train.resume=true) and final/ (see
peft.training.recipe.export), and a summary JSON. All the work happens in peft.training.recipe and peft.training.loop.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peft.training.recipe import format_config, load_config, run  # noqa: E402
from peft.training.loop import init_distributed  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML config file (see configs/); default: built-in defaults")
    parser.add_argument("--seed", type=int, help="shorthand for --train.seed")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and stop")
    args, overrides = parser.parse_known_args(argv)
    if args.seed is not None:
        overrides.append(f"--train.seed={args.seed}")
    cfg = load_config(args.config, overrides)
    ctx = init_distributed()
    if ctx.is_main:
        print(format_config(cfg), flush=True)
    if args.dry_run:
        return {}
    out = run(cfg, ctx=ctx)
    last = out.result.history[-1] if out.result.history else {}
    summary = {"method": cfg.method["name"], "trainable_params": out.trainable, "total_params": out.total,
               "steps": out.result.final_step, "train_time_s": out.result.train_time_s, "tokens": out.result.tokens,
               "final_loss": last.get("loss"), "eval_loss": last.get("eval_loss"),
               "exact_match": last.get("exact_match"), "world_size": ctx.world_size}
    if ctx.is_main:
        width = max(map(len, summary))
        print("\n".join(f"{k:<{width}}  {v}" for k, v in summary.items()))
        if cfg.train.out_dir:
            Path(cfg.train.out_dir, "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
