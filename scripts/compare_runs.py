"""Compare two training runs step by step: where their losses first differ and how far apart they drift.

    python scripts/train.py --config configs/sft_lora.toml --out runs/one
    torchrun --nproc_per_node 2 scripts/train.py --config configs/sft_lora.toml --out runs/two
    python scripts/compare_runs.py --runs runs/one runs/two

Reads each run's metrics.jsonl (and results.json where the run finished) and prints, at steps 1, 2, 5, 10, 20, 50, …
and the last, both losses, their relative difference and the largest relative difference so far; then the final
held-out loss and exact match of both. This is how docs/training.md measures what agreement one and two processes
reach (FSDP2 sums in another order, so the runs drift apart in float32 rounding).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts._cli import UsageError, experiment_parser, run_cli, start, write_results  # noqa: E402

parser = experiment_parser(__doc__, "compare_runs")
parser.add_argument("--runs", nargs=2, type=Path, required=True, metavar="DIR", help="two scripts/train.py run folders")


def records(run: Path) -> dict[int, dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise UsageError(f"{path} not found; pass the --out folder of a scripts/train.py run")
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}


def report_steps(last: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, … up to `last`, and `last`."""
    steps, k = [], 1
    while k < last:
        steps += [s for s in (k, 2 * k, 5 * k) if s < last]
        k *= 10
    return steps + [last]


def main(argv=None) -> dict:
    args = parser.parse_args(argv)
    a, b = (records(run) for run in args.runs)
    common = sorted(set(a) & set(b))
    if not common:
        raise UsageError(f"{args.runs[0]} and {args.runs[1]} log no step in common")
    out = start(args)
    rel = {s: abs(a[s]["loss"] - b[s]["loss"]) / abs(a[s]["loss"]) for s in common}
    first = next((s for s in common if a[s]["loss"] != b[s]["loss"]), None)
    rows, worst = [], 0.0
    shown = set(report_steps(common[-1]))
    for s in common:
        worst = max(worst, rel[s])
        if s in shown:
            rows.append({"step": s, "loss_a": a[s]["loss"], "loss_b": b[s]["loss"], "rel_diff": rel[s],
                         "max_rel_diff_so_far": worst})
    finals = [json.loads((run / "results.json").read_text()) if (run / "results.json").is_file() else {}
              for run in args.runs]
    lines = ["| step | loss A | loss B | relative difference | largest so far |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['step']} | {r['loss_a']:.6f} | {r['loss_b']:.6f} | {r['rel_diff']:.1e} | "
              f"{r['max_rel_diff_so_far']:.1e} |" for r in rows]
    for key in ("eval_loss", "exact_match"):
        if all(f.get(key) is not None for f in finals):
            lines.append(f"final {key}: A {finals[0][key]:.6f}, B {finals[1][key]:.6f}")
    lines.append(f"A = {args.runs[0]}, B = {args.runs[1]}; {len(common)} steps in common; the losses first differ "
                 f"at step {first}" if first else f"identical losses over {len(common)} steps")
    table = "\n".join(lines)
    print(table)
    results = {"runs": [str(r) for r in args.runs], "steps": len(common), "first_differing_step": first,
               "rows": rows, "final": {str(r): f for r, f in zip(args.runs, finals)}}
    print(f"wrote {write_results(out, results, table)}", file=sys.stderr)
    return results


if __name__ == "__main__":
    run_cli(main)
