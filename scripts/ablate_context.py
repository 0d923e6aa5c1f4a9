"""Context-extension ablation: train a tiny LLaMA at L bytes, read it at 2L, 4L, 8L with no scaling, linear PI,
dynamic NTK, YaRN, llama3 scaling, and a Llama 4-style NoPE-interleaved (iRoPE) variant, each without and with a
short fine-tune at 8L. Perplexity per length plus passkey retrieval.

    python scripts/ablate_context.py                          # the default run (≤ 10 min on 2 idle CPU cores)
    python scripts/ablate_context.py --base-steps 20 --ft-steps 2 --eval-tokens 1024 --n-passkey 4   # smoke test
    python scripts/ablate_context.py --variants none linear irope --seed 1 --out runs/context1

Writes results.json (everything, including every loss curve) and context_ablation.png into --out. The experiment
is `llama.context_ablation`; training goes through the project's one loop, `peft.train.train`; the text is the
standard library's docstrings (read from the running Python's sources, no download).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama.context_ablation import VARIANTS, ContextAblationConfig, format_table, plot, run  # noqa: E402
from scripts._ablation_cli import ablation_main  # noqa: E402


def main(argv=None) -> dict:
    return ablation_main(argv, doc=__doc__, config_cls=ContextAblationConfig, variants=VARIANTS, run=run,
                         format_table=format_table, plot=plot, name="context")


if __name__ == "__main__":
    main()
