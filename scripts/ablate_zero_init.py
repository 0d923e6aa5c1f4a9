"""LLaMA-Adapter's zero-init attention, measured: the gate g_l starts at 0 (the paper) or at random.

    python scripts/ablate_zero_init.py                   # 3 seeds per initialisation on the main job's "skill" base
    python scripts/ablate_zero_init.py --seeds 5 --random-std 0.5

LLaMA-Adapter (arXiv 2303.16199 §3.2) adds, in each adapted layer, a softmax over K learnable prompts whose output is
scaled by a per-head gate before it joins the frozen attention (peft/adapter_v1.py, eq. 7-8):

    O = softmax(Q K_tokᵀ / √D + mask) V_tok + tanh(g_l) · softmax(Q K_Pᵀ / √D) V_P

With g_l = 0 the adapted model *is* the base at step 0, and the prompts are blended in as the gate grows ("progressively
injects"); the paper's ablation (Table 5 of v1, ScienceQA validation) reports 84.04% accuracy with zero-init against
40.77% with a randomly initialised gate. Here, on the main job's base that already has the skill in raw form
(scripts/_bases.py) and its instruction-tuning set (scripts/ablate_peft.py), for each initialisation and seed:

  * step 0: the held-out test loss of the adapted, untrained model, next to the base's: equal, bit for bit, only with
    the zero gate (the test checks it);
  * the training loss of every step (the early curve), and at the end the test loss and exact match.

"Random" draws every gate from N(0, --random-std²) (the paper does not give its distribution; N(0, 1) is what the
prompts themselves get, the nn.Embedding default of the official code). Everything else (prompts, data order, learning
rate, steps) is shared by the two initialisations at a given seed.

Outputs in --out: results.json, results.md, zero_init.png (training loss per step: mean over seeds and min-max band).
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python scripts/...` from anywhere

import llama  # noqa: E402
from peft.adapter_v1 import AdaptionPrompt  # noqa: E402
from peft.training.loop import set_seed, train  # noqa: E402
from peft.training.recipe import apply_method  # noqa: E402
from scripts._bases import BaseConfig, pretrained_base, tokenizer  # noqa: E402
from scripts._cli import experiment_parser, flush_denormals, positive, run_cli, start, write_results  # noqa: E402
from scripts.ablate_peft import MainJobConfig, scores, task_data, train_config  # noqa: E402

INITS = ("zero", "random")


def adapted_model(base: Path, init: str, seed: int, random_std: float) -> torch.nn.Module:
    """The base with LLaMA-Adapter V1 in every layer (K = 10 prompts, tanh gate); `random` redraws every gate."""
    set_seed(seed)  # the prompts' draw: the same for both initialisations at this seed
    model = llama.load(base)
    model = apply_method(model, {"name": "adapter_v1", "adapter_len": 10, "adapter_layers": model.args.n_layers})
    if init == "random":
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, AdaptionPrompt):
                    module.gate.copy_(torch.randn(module.gate.shape, generator=gen) * random_std)
    return model


def run(cfg: MainJobConfig, seeds: list[int], lr: float, random_std: float, progress: bool = False) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    base, info = pretrained_base(cfg.base("skill"), cfg.cache_dir, cfg.task, progress=progress,
                                 say=lambda *a: print(*a, file=sys.stderr, flush=True))
    tok = tokenizer(cfg.cache_dir)
    data = task_data(cfg, tok)
    base_loss, base_em = scores(llama.load(base), tok, cfg, data.test_rows, data.test_examples)
    runs = []
    for init in INITS:
        for seed in seeds:
            model = adapted_model(base, init, seed, random_std)
            step0_loss, step0_em = scores(model, tok, cfg, data.test_rows, data.test_examples)
            result = train(model, data.rows, train_config(cfg, lr, seed), pad_id=tok.pad_id, length=cfg.seq_len)
            loss, em = scores(model, tok, cfg, data.test_rows, data.test_examples)
            runs.append({"init": init, "seed": seed, "step0_test_loss": step0_loss, "step0_exact_match": step0_em,
                         "curve": [h["loss"] for h in result.history], "test_loss": loss, "test_exact_match": em})
            print(f"{init} gate, seed {seed}: step-0 test loss {step0_loss:.4f} (base {base_loss:.4f}), final "
                  f"{loss:.4f}, exact match {100 * em:.1f}%", file=sys.stderr, flush=True)
    return {"task": cfg.task, "lr": lr, "steps": cfg.finetune_steps, "seeds": seeds, "random_std": random_std,
            "base": {**info, "path": str(base), "test_loss": base_loss, "test_exact_match": base_em},
            "summary": summarise(runs, base_loss), "runs": runs,
            "wall_time_s": time.perf_counter() - t0, "cpu_time_s": time.process_time() - c0,
            "environment": {"python": platform.python_version(), "torch": torch.__version__,
                            "threads": torch.get_num_threads()}}


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def summarise(runs: list[dict], base_loss: float) -> list[dict]:
    """Per initialisation: step-0 loss (and whether every seed equals the base exactly), the training loss at a few
    early steps, the final test loss and exact match: mean, std and per-seed values."""
    out = []
    for init in INITS:
        mine = [r for r in runs if r["init"] == init]
        steps = len(mine[0]["curve"])
        early = sorted({s for s in (1, 5, 10, 25, steps) if s <= steps})
        out.append({"init": init, "step0_test_loss": _stats([r["step0_test_loss"] for r in mine]),
                    "step0_equals_base": all(r["step0_test_loss"] == base_loss for r in mine),
                    "train_loss_at_step": {s: _stats([r["curve"][s - 1] for r in mine]) for s in early},
                    "test_loss": _stats([r["test_loss"] for r in mine]),
                    "test_exact_match": _stats([r["test_exact_match"] for r in mine])})
    return out


def format_table(report: dict) -> str:
    summary = report["summary"]
    early = list(summary[0]["train_loss_at_step"])
    ms = lambda s, scale=1, f=".3f": f"{scale * s['mean']:{f}} ± {scale * s['std']:{f}}"  # noqa: E731
    lines = [f"LLaMA-Adapter V1 on the base `{report['base']['name']}`, task {report['task']}, lr {report['lr']:g}, "
             f"{report['steps']} steps, seeds {report['seeds']}; mean ± std over seeds. The base's test loss: "
             f"{report['base']['test_loss']:.4f}.", "",
             "| gate init | step-0 test loss | = base's, every seed | " +
             " | ".join(f"train loss, step {s}" for s in early) + " | final test loss | exact match (%) |",
             "| --- | --- | --- | " + "--- | " * len(early) + "--- | --- |"]
    for s in summary:
        equal = "yes" if s["step0_equals_base"] else "no"
        lines.append(f"| {s['init']} | {ms(s['step0_test_loss'], f='.4f')} | {equal} | " +
                     " | ".join(ms(s["train_loss_at_step"][k]) for k in early) +
                     f" | {ms(s['test_loss'])} | {ms(s['test_exact_match'], 100, '.1f')} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for init in INITS:
        curves = torch.tensor([r["curve"] for r in report["runs"] if r["init"] == init])  # [seeds, steps]
        steps = range(1, curves.shape[1] + 1)
        (line,) = ax.plot(steps, curves.mean(0), label=f"gate init: {init} (mean of {curves.shape[0]} seeds)")
        ax.fill_between(steps, curves.min(0).values, curves.max(0).values, alpha=0.25, color=line.get_color())
    ax.axhline(report["base"]["test_loss"], ls="--", color="tab:red", lw=1, label="base, test loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (response tokens)")
    ax.set_yscale("log")
    ax.set_title("LLaMA-Adapter V1: zero-init vs random gate (band: min-max over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    d = MainJobConfig()
    p = experiment_parser(__doc__, "ablate_zero_init")
    p.add_argument("--seeds", type=positive(), default=3, help="seeds per initialisation: seed, seed+1, …")
    p.add_argument("--lr", type=positive(float), default=0.3,
                   help="peak learning rate (the main job's choice for adapter_v1 on this base)")
    p.add_argument("--steps", type=positive(), default=d.steps, help="fine-tuning steps (the main job's budget)")
    p.add_argument("--random-std", type=positive(float), default=1.0, help="std of the random gate")
    p.add_argument("--base-steps", type=positive(), default=BaseConfig.steps,
                   help="pre-training steps of the base (the main job's --base-steps; its cached base is reused)")
    p.add_argument("--n-test", type=positive(), default=d.n_test, help="held-out test examples")
    p.add_argument("--cache-dir", default=None, help="where the main job's bases are cached "
                   "(default $LLAMA_PEFT_CACHE or ~/.cache/llama-peft-zoo)")
    a = p.parse_args(argv)
    out = start(a)
    cfg = MainJobConfig(seed=0, cache_dir=a.cache_dir, steps=a.steps, base_steps=a.base_steps, n_test=a.n_test)
    with flush_denormals():
        report = run(cfg, [a.seed + i for i in range(a.seeds)], a.lr, a.random_std, not a.no_progress)
    table = format_table(report)
    write_results(out, report, table)
    plot(report, out / "zero_init.png")
    print(table)
    print(f"\nwall time {report['wall_time_s']:.0f} s, CPU time {report['cpu_time_s']:.0f} s; results in {out}/")
    return report


if __name__ == "__main__":
    run_cli(main)
