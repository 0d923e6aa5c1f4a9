"""The main job's tables and plots (scripts/ablate_peft.py), from its results.json report alone."""

from __future__ import annotations

from pathlib import Path


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _mean_std(mean: float, std: float, pct: bool = False) -> str:
    return f"{_pct(mean)} ± {_pct(std)}" if pct else f"{mean:.3f} ± {std:.3f}"


def regime_table(report: dict, regime: str) -> str:
    base = report["bases"][regime]
    rows = [r for r in report["rows"] if r["regime"] == regime]
    n = len(rows[0]["seeds"]) if rows else 0
    lines = [f"### {regime}: {report['regimes'][regime]}", "",
             f"Base `{base['name']}`: {base['config']['steps']} pre-training steps; asked in raw form, it completes "
             f"{_pct(base['raw_probe_exact_match'])}% of the held-out inputs correctly. Test split: "
             f"{report['config']['n_test']} held-out prompts; {n} seed(s) per method; mean ± sample std over seeds.",
             "",
             "| method | trainable (% of base) | lr | test loss | exact match (%) | per seed (%) | "
             "Δ exact match vs full (points) |",
             "| --- | --- | --- | --- | --- | --- | --- |",
             f"| base (no fine-tuning) | 0 | – | {base['test_loss']:.3f} | {_pct(base['test_exact_match'])} | – "
             f"| – |"]
    for r in rows:
        lr = f"{r['lr']:g}" + (" (grid edge)" if r["lr_at_grid_edge"] else "")
        delta = "–" if r["method"] == "full" or "delta_exact_match_vs_full_mean" not in r else \
            _mean_std(r["delta_exact_match_vs_full_mean"], r["delta_exact_match_vs_full_std"], pct=True)
        lines.append(f"| {r['method']} | {r['trainable']:,} ({r['trainable_pct']:.2f}%) | {lr} | "
                     f"{_mean_std(r['eval_loss_mean'], r['eval_loss_std'])} | "
                     f"{_mean_std(r['exact_match_mean'], r['exact_match_std'], pct=True)} | "
                     f"{' / '.join(_pct(x) for x in r['exact_match'])} | {delta} |")
    return "\n".join(lines)


def sweep_table(report: dict) -> str:
    width = max(len(s["grid"]) for s in report["sweep"])
    lines = [f"### Learning-rate sweep: validation loss / validation exact match (%) at seed {report['config']['seed']}"
             f"; * = chosen ({report['selection']})", "",
             "| regime | method | " + " | ".join(f"lr {i + 1}" for i in range(width)) + " | cached |",
             "| --- | --- | " + "--- | " * width + "--- |"]
    for s in report["sweep"]:
        cells = [f"{g['lr']:g}{'*' if g['lr'] == s['chosen_lr'] else ''}: {g['val_loss']:.3f} / "
                 f"{_pct(g['val_exact_match'])}" for g in s["grid"]] + ["–"] * (width - len(s["grid"]))
        cached = "yes" if s["cached"] else "no"
        lines.append(f"| {s['regime']} | {s['method']} | " + " | ".join(cells) + f" | {cached} |")
    return "\n".join(lines)


def cost_table(report: dict) -> str:
    lines = ["### Cost per method (same in both regimes)", "",
             "| method | trainable params | % of base | peak memory (MB) | step (ms, median) |",
             "| --- | --- | --- | --- | --- |"]
    for r in report["rows"]:
        if r["regime"] == report["rows"][0]["regime"]:
            lines.append(f"| {r['method']} | {r['trainable']:,} | {r['trainable_pct']:.2f} | "
                         f"{r['peak_memory_mb']:.1f} | {r['step_time_ms']:.1f} |")
    return "\n".join(lines)


def format_tables(report: dict) -> str:
    return "\n\n".join([regime_table(report, r) for r in report["regimes"]] + [sweep_table(report), cost_table(report)])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_results(report: dict, path: Path) -> None:
    """Exact match and test loss per method and regime: every seed as a dot, the mean ± std as a bar."""
    plt = _pyplot()
    regimes = list(report["regimes"])
    fig, axes = plt.subplots(2, len(regimes), figsize=(6 * len(regimes), 7), squeeze=False)
    for col, regime in enumerate(regimes):
        rows = [r for r in report["rows"] if r["regime"] == regime]
        base = report["bases"][regime]
        for ax, key, scale, label in ((axes[0][col], "exact_match", 100, "exact match (%)"),
                                      (axes[1][col], "eval_loss", 1, "test loss")):
            for i, r in enumerate(rows):
                values = [scale * v for v in r[key]]
                offsets = [(j - (len(values) - 1) / 2) * 0.08 for j in range(len(values))]
                ax.scatter([i + o for o in offsets], values, s=14, color="tab:gray", zorder=3)
                ax.errorbar(i, scale * r[f"{key}_mean"], yerr=scale * r[f"{key}_std"], fmt="_", markersize=18,
                            capsize=5, color="tab:blue", zorder=4)
            ax.axhline(scale * base["test_" + ("exact_match" if key == "exact_match" else "loss")], ls="--",
                       color="tab:red", lw=1, label="base, no fine-tuning")
            if key == "exact_match" and base["raw_probe_exact_match"] > 0:
                ax.axhline(scale * base["raw_probe_exact_match"], ls=":", color="tab:green", lw=1,
                           label="base, the same inputs asked in raw form")
            ax.set_xticks(range(len(rows)), [r["method"] for r in rows], rotation=20)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3, axis="y")
        axes[0][col].set_title(f"{regime}: base {base['name']}")
        axes[0][col].legend(loc="best", fontsize=8)
    fig.suptitle("Each method at its chosen learning rate: dots = seeds, bars = mean ± std", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(report: dict, path: Path) -> None:
    """Validation loss over each method's learning-rate grid, per regime; the chosen point circled."""
    plt = _pyplot()
    regimes = list(report["regimes"])
    fig, axes = plt.subplots(1, len(regimes), figsize=(6 * len(regimes), 4), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        for s in (s for s in report["sweep"] if s["regime"] == regime):
            lrs, losses = [g["lr"] for g in s["grid"]], [g["val_loss"] for g in s["grid"]]
            (line,) = ax.plot(lrs, losses, marker="o", ms=3, label=s["method"])
            best = lrs.index(s["chosen_lr"])
            ax.scatter([lrs[best]], [losses[best]], s=80, facecolors="none", edgecolors=line.get_color())
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel("validation loss")
        ax.set_title(f"{regime}: learning-rate sweep (seed {report['config']['seed']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
