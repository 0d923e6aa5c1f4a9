"""The main job: pre-train (or reuse) a tiny LLaMA, then fine-tune it on one task with the same budget by full
fine-tuning, LoRA, QLoRA, LLaMA-Adapter V1, V2 and Excitor, and compare them in one table.

    python scripts/ablate_peft.py                      # the default run (≤ 10 min on 2 CPU cores)
    python scripts/ablate_peft.py --max-steps 3        # smoke test
    python scripts/ablate_peft.py --task recall --methods lora qlora --seed 1 --out runs/recall

Writes results.json, results.md, loss_curves.png and one run folder per method into --out. The work is done by
peft.ablation (and, through it, peft.recipe and peft.train).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from peft.ablation import METHODS, AblationConfig, format_table, run_ablation  # noqa: E402


def main(argv=None) -> dict:
    d = AblationConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default=d.task, help="reverse | sort | add | recall | mix (default %(default)s)")
    p.add_argument("--methods", nargs="+", default=list(d.methods), choices=list(METHODS))
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=d.out, help="output folder (default %(default)s)")
    p.add_argument("--cache-dir", default=None, help="where the corpus, tokenizer and base model are cached "
                   "(default $LLAMA_PEFT_CACHE or ~/.cache/llama-peft-zoo)")
    p.add_argument("--device", default=d.device, help="cpu or cuda")
    p.add_argument("--steps", type=int, default=d.steps, help="fine-tuning steps per method (default %(default)s)")
    p.add_argument("--base-steps", type=int, default=d.base_steps, help="pre-training steps (default %(default)s)")
    p.add_argument("--max-steps", type=int, default=None, help="cap every step count (smoke tests)")
    p.add_argument("--n-eval", type=int, default=d.n_eval, help="held-out examples (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the tiny matrices gain little "
                   "from more, a busy machine loses a lot, and one thread gives the same bits on every machine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = AblationConfig(task=a.task, methods=tuple(a.methods), seed=a.seed, out=a.out, cache_dir=a.cache_dir,
                         device=a.device, steps=a.steps, base_steps=a.base_steps, max_steps=a.max_steps,
                         n_eval=a.n_eval, progress=not a.no_progress)
    t0 = time.perf_counter()
    report = run_ablation(cfg)
    print(format_table(report))
    base = report["base"]
    print(f"\ntask {cfg.task}; base: {base['parameters']:,} parameters, pre-trained {base['pretrain_steps']} steps"
          f"{' (cached)' if base['cached'] else ''}; fine-tuning: {cfg.effective_steps[1]} steps × {cfg.batch_size} "
          f"rows × {cfg.seq_len} tokens per method")
    print(f"wall time {time.perf_counter() - t0:.1f} s; results in {cfg.out}/results.json, results.md, "
          f"loss_curves.png")
    return report


if __name__ == "__main__":
    main()
