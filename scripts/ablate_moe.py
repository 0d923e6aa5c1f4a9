"""MoE ablation: dense SwiGLU vs Llama 4's top-1 MoE at equal active parameters, with and without the Switch
load-balancing (+ router z) loss, with and without the shared expert. Loss curves and per-expert load.

    python scripts/ablate_moe.py                               # the default run (≤ 10 min on 2 idle CPU cores)
    python scripts/ablate_moe.py --steps 10 --eval-tokens 2048  # smoke test
    python scripts/ablate_moe.py --n-experts 4 --capacity-factor 1.25 --seed 1 --out runs/moe1

Writes results.json (loss curves, per-step expert shares), results.md (the table) and moe_ablation.png into --out
(default runs/ablate_moe/<timestamp>). Training goes through the project's one loop (`peft.training.train_examples`,
which adds `model.aux_loss()` to the loss); the text is the standard library's docstrings, read at run time.

Variants (same trunk, data order, steps and learning rate; MoE in every layer, E experts, dense hidden size F):
    dense                 SwiGLU of hidden F
    moe                   Llama 4 layer: shared expert of F/2 + E routed experts of F/2, sigmoid top-1 router;
                          Switch load balancing (α = 0.01, arXiv 2101.03961 eq. 4) and router z-loss (1e-3,
                          arXiv 2202.08906 eq. 5)
    moe-no-aux            the same with both auxiliary coefficients 0
    moe-no-shared         no shared expert, E routed experts of F (a Switch layer with Llama 4's sigmoid router)
    moe-no-shared-no-aux
A token touches F hidden units in every variant (F/2 + F/2, or one expert of F) plus the router's C·E weights
(`count_active_parameters`), while the MoE variants hold about E/2 (shared) or E (no shared) times the FFN weights.

Recorded: the training-loss curve, held-out loss, per-expert load (share of the tokens each expert received) at
every step and on the held-out text, and wall time per variant.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python scripts/...` from anywhere

from llama.config import ModelArgs, MoEArgs, count_active_parameters, count_parameters  # noqa: E402
from llama.model import Transformer  # noqa: E402
from llama.moe import moe_layers  # noqa: E402
from peft.training.loop import train_examples  # noqa: E402
from scripts._ablation import (BYTE_VOCAB, ablation_main, byte_stream, mean_nll, random_windows,  # noqa: E402
                               split_documents, variant_colors)
from scripts._cli import run_cli  # noqa: E402

VARIANTS = ("dense", "moe", "moe-no-aux", "moe-no-shared", "moe-no-shared-no-aux")


@dataclass
class MoEAblationConfig:
    dim: int = 64
    n_layers: int = 4
    n_heads: int = 4
    ffn_hidden: int = 256  # F: the dense hidden size, and the active hidden size of every MoE variant
    n_experts: int = 8
    capacity_factor: Optional[float] = None  # Switch expert capacity during training (None: no dropping)
    seq_len: int = 64
    batch_size: int = 32
    steps: int = 600
    lr: float = 3e-3
    load_balance_coef: float = 0.01
    router_z_loss_coef: float = 1e-3
    eval_tokens: int = 16384
    seed: int = 0
    variants: tuple = VARIANTS

    def __post_init__(self):
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown MoE variants {unknown}; choose from {VARIANTS}")
        if self.ffn_hidden % 2:
            raise ValueError(f"ffn_hidden must be even (the shared-expert variants split it in two), got "
                             f"{self.ffn_hidden}")


def variant_args(cfg: MoEAblationConfig, variant: str) -> ModelArgs:
    trunk = dict(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, vocab_size=BYTE_VOCAB, max_seq_len=cfg.seq_len,
                 ffn_hidden_dim=cfg.ffn_hidden)
    if variant == "dense":
        return ModelArgs(**trunk)
    shared = "no-shared" not in variant
    aux = "no-aux" not in variant
    moe = MoEArgs(num_experts=cfg.n_experts, top_k=1, shared_expert=shared,
                  expert_capacity_factor=cfg.capacity_factor,
                  load_balance_coef=cfg.load_balance_coef if aux else 0.0,
                  router_z_loss_coef=cfg.router_z_loss_coef if aux else 0.0)
    return ModelArgs(**trunk, moe_args=moe, moe_hidden_dim=cfg.ffn_hidden // 2 if shared else cfg.ffn_hidden)


def load_shares(model: Transformer) -> list[list[float]]:
    """[layer][expert]: share of the last forward's token slots routed to each expert."""
    load = model.expert_load().float()  # [layers, E]
    return (load / load.sum(-1, keepdim=True)).tolist()


def imbalance(shares: list[list[float]]) -> float:
    """Mean over layers of (largest expert share) · E: 1 is perfectly balanced, E means one expert takes all."""
    return sum(max(s) * len(s) for s in shares) / len(shares)


def run(cfg: MoEAblationConfig, documents: list[str], log=print, on_progress=None) -> dict:
    """Every variant in turn; on_progress(report) after each (e.g. to save partial results)."""
    t_start = time.perf_counter()
    train_docs, heldout_docs = split_documents(documents)
    train_stream, heldout = byte_stream(train_docs), byte_stream(heldout_docs)
    examples = random_windows(train_stream, cfg.seq_len, cfg.batch_size * cfg.steps, random.Random(cfg.seed))
    report = {"config": asdict(cfg), "results": {}}
    for variant in cfg.variants:
        t0 = time.perf_counter()
        args = variant_args(cfg, variant)
        torch.manual_seed(cfg.seed)
        model = Transformer(args)
        is_moe = args.moe_args is not None
        history = {"shares": [], "load_balance": [], "router_z": []}

        def on_step(step: int) -> None:  # the last micro-batch's routing, after each optimizer step
            if is_moe:
                history["shares"].append(load_shares(model))
                aux = model.aux_losses()
                history["load_balance"].append(aux["load_balance"].item())
                history["router_z"].append(aux["router_z"].item())

        losses = train_examples(model, examples, steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed,
                                on_step=on_step)
        train_s = time.perf_counter() - t0
        eval_loss = mean_nll(model, heldout, cfg.seq_len, cfg.eval_tokens)
        res = {"parameters": count_parameters(args), "active_parameters": count_active_parameters(args),
               "loss_curve": losses, "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
               "eval_loss": eval_loss, "train_s": train_s, **history}
        if is_moe:
            model.eval()
            rows = min(32, len(heldout) // cfg.seq_len)
            with torch.no_grad():  # routing of the held-out text
                model(torch.tensor(heldout[:cfg.seq_len * rows]).view(rows, cfg.seq_len))
            res["eval_shares"] = load_shares(model)
            res["eval_imbalance"] = imbalance(res["eval_shares"])
            res["dropped_last_step"] = sum(m.stats.dropped for m in moe_layers(model))
        report["results"][variant] = res
        log(f"{variant:22s} train {res['final_train_loss']:.3f}  eval {eval_loss:.3f}  "
            f"imbalance {res.get('eval_imbalance', float('nan')):.2f}  ({train_s:.0f} s)")
        if on_progress:
            on_progress(report)
    report["wall_s"] = time.perf_counter() - t_start
    return report


# -- presentation --------------------------------------------------------------------------------------------------


def format_table(report: dict) -> str:
    head = (f"{'variant':22s} {'params':>8s} {'active':>8s} {'train loss':>10s} {'eval loss':>9s} "
            f"{'eval ppl':>8s} {'imbalance':>9s} {'time s':>7s}")
    lines = [head, "-" * len(head)]
    for variant, r in report["results"].items():
        imb = f"{r['eval_imbalance']:9.2f}" if "eval_imbalance" in r else f"{'-':>9s}"
        lines.append(f"{variant:22s} {r['parameters']:8,d} {r['active_parameters']:8,d} "
                     f"{r['final_train_loss']:10.3f} {r['eval_loss']:9.3f} {2.718281828 ** r['eval_loss']:8.3f} "
                     f"{imb} {r['train_s']:7.0f}")
    lines.append("imbalance = mean over layers of E · (largest expert's share of held-out tokens); 1 = balanced, "
                 f"{report['config']['n_experts']} = one expert takes all")
    return "\n".join(lines)


def plot(report: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    E = report["config"]["n_experts"]
    colors = variant_colors(VARIANTS)  # one colour per variant in all three panels (dense is absent from two)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for variant, r in report["results"].items():
        curve, smooth, ema = r["loss_curve"], [], None
        for x in curve:
            ema = x if ema is None else 0.95 * ema + 0.05 * x
            smooth.append(ema)
        axes[0].plot(range(1, len(curve) + 1), smooth, label=variant, color=colors[variant])
        if r["shares"]:
            imbalance = [sum(max(s) for s in step) / len(step) * E for step in r["shares"]]
            axes[1].plot(range(1, len(imbalance) + 1), imbalance, label=variant, color=colors[variant])
    tails = [v for line in axes[0].get_lines() for v in line.get_ydata()[len(line.get_ydata()) // 4:]]
    if tails:  # the curves differ by a few hundredths of a nat: zoom on the last three quarters
        axes[0].set_ylim(min(tails) - 0.02, max(tails) + 0.02)
    axes[0].set(title="training loss (EMA 0.95), last 3/4 of the run", xlabel="step", ylabel="nats / byte")
    axes[1].set(title="imbalance during training (E · largest share)", xlabel="step", ylim=(0.9, E + 0.1))
    moe = [v for v, r in report["results"].items() if "eval_shares" in r]
    width = 0.8 / max(1, len(moe))
    for k, variant in enumerate(moe):
        shares = report["results"][variant]["eval_shares"]
        mean = [sum(layer[e] for layer in shares) / len(shares) for e in range(E)]
        offset = (k - (len(moe) - 1) / 2) * width  # the variants' bars side by side, centred on their expert
        axes[2].bar([e + offset for e in range(E)], mean, width=width, label=variant, color=colors[variant])
    axes[2].axhline(1 / E, color="k", lw=0.8, ls="--")
    axes[2].set_xticks(range(E))
    for ax in axes[:2]:  # steps are whole numbers
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[2].set(title="held-out share per expert (mean over layers)", xlabel="expert", ylabel="share of tokens")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# =====================================================================================================================
# Command line
# =====================================================================================================================

def main(argv=None) -> dict:
    return ablation_main(argv, doc=__doc__, config_cls=MoEAblationConfig, variants=VARIANTS, run=run,
                         format_table=format_table, plot=plot, name="moe",
                         special_args={"capacity_factor": dict(type=float, default=None,
                                                               help="Switch expert capacity (default: no dropping)")})


if __name__ == "__main__":
    run_cli(main)
