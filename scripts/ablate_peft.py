"""The main job: pre-train (or reuse) a tiny LLaMA, then fine-tune it on one task with the same budget by full
fine-tuning, LoRA, QLoRA, LLaMA-Adapter V1, V2 and Excitor, and compare them in one table.

    python scripts/ablate_peft.py                      # the default run (≤ 10 min on 2 CPU cores)
    python scripts/ablate_peft.py --max-steps 3        # smoke test
    python scripts/ablate_peft.py --task recall --methods lora qlora --seed 1 --out runs/recall

Writes results.json, results.md, loss_curves.png and one run folder per method into --out. Each run goes through
`peft.training.recipe.run` and the one training loop.

1. Base: a tiny LLaMA pre-trained on the standard library's docstrings with the built-in BPE tokenizer (both made
   on the machine, no download). It is cached under the cache directory, keyed by everything that determines it, and
   reused by later runs.
2. Fine-tuning: the same synthetic task (default "sort"), the same examples in the same order, the same number of
   steps, batch and sequence length for full fine-tuning, LoRA, QLoRA, LLaMA-Adapter V1, V2 and Excitor. Only the
   learning rate differs per method (each method's own scale; see METHODS), as in every paper compared here.
3. Measured per method: trainable parameters (count and % of the base model), peak memory of one training step
   (every live tensor: weights, gradients, optimizer state, activations; `peft.training.memory.measure_peak`), step time,
   tokens/s, final held-out loss, and exact-match accuracy of greedy answers on held-out prompts.

Outputs in `out`: results.json (everything, including every loss curve), results.md (the table), loss_curves.png,
and one run directory per method (metrics.jsonl/csv, final adapter or model).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python scripts/...` from anywhere

from peft.targets import BLOCK_LINEARS  # noqa: E402
from peft.training import data as D  # noqa: E402
from peft.training.checkpointing import check_writable  # noqa: E402
from peft.training.loop import TrainConfig, evaluate_loss, set_seed, train  # noqa: E402
from peft.training.memory import measure_peak  # noqa: E402
from peft.training.recipe import (DataSection, EvalSection, ModelSection, RunConfig, apply_method,  # noqa: E402
                                  build_data, build_model, exact_match_accuracy, run)

# Each method's options and peak learning rate. LoRA and QLoRA share one config (the QLoRA recipe's "all block
# linears"), so the pair isolates the effect of the NF4 base. Adapters/Excitor use every layer of the tiny base.
# Learning rates: the best held-out loss of a small sweep on the default task and budget (1e-3 … 1e-1; full
# fine-tuning was already at 100% exact match with 1e-3). Prompt-based methods want much larger rates, as in their
# papers (LLaMA-Adapter: 9e-3 at batch 64 with far larger models).
METHODS: dict[str, tuple[dict, float]] = {
    "full": ({}, 1e-3),
    "lora": ({"r": 8, "alpha": 16.0, "target_modules": list(BLOCK_LINEARS)}, 1e-2),
    "qlora": ({"r": 8, "alpha": 16.0, "target_modules": list(BLOCK_LINEARS)}, 1e-2),
    "adapter_v1": ({"adapter_len": 10}, 1e-1),
    "adapter_v2": ({"adapter_len": 10}, 3e-2),
    "excitor": ({"adapter_len": 10, "rank": 8}, 3e-2),
}


@dataclass
class AblationConfig:
    task: str = "sort"
    methods: tuple = tuple(METHODS)
    seed: int = 0
    out: str = "runs/ablation"
    cache_dir: Optional[str] = None
    device: str = "cpu"
    # the base model and its pre-training
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    vocab_size: int = 1024
    base_steps: int = 300
    base_seq_len: int = 128
    base_batch_size: int = 16
    base_lr: float = 3e-3
    # the fine-tuning budget, identical for every method
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 64
    n_train: int = 4000
    n_eval: int = 200
    max_new_tokens: int = 12
    max_steps: Optional[int] = None  # caps base_steps and steps (smoke tests)
    memory_steps: int = 2  # optimizer steps under the memory tracker (a separate, untimed run); from the second
    # step on, AdamW's moments exist during the forward/backward pass, so the peak is the steady-state one
    progress: bool = True

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"--max-steps must be positive, got {self.max_steps}")
        if self.task not in list(D.TASKS) + ["mix"]:
            raise ValueError(f"unknown task {self.task!r}; use one of {sorted(D.TASKS) + ['mix']}")

    @property
    def effective_steps(self) -> tuple[int, int]:
        cap = self.max_steps or 10 ** 9
        return min(self.base_steps, cap), min(self.steps, cap)


def _say(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


# =====================================================================================================================
# 1. The base model (cached)
# =====================================================================================================================

def base_config(cfg: AblationConfig, tokenizer_path: str, out_dir: Path) -> RunConfig:
    base_steps, _ = cfg.effective_steps
    return RunConfig(
        model=ModelSection(preset="tiny-llama-2-gqa", dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                           n_kv_heads=cfg.n_kv_heads, max_seq_len=max(cfg.base_seq_len, cfg.seq_len),
                           device=cfg.device),
        data=DataSection(source="corpus", seq_len=cfg.base_seq_len, tokenizer=tokenizer_path,
                         cache_dir=cfg.cache_dir, n_eval=64),
        method={"name": "full"},
        train=TrainConfig(steps=base_steps, batch_size=cfg.base_batch_size, micro_batch_size=cfg.base_batch_size,
                          lr=cfg.base_lr, warmup_steps=max(1, base_steps // 20), weight_decay=0.1, seed=cfg.seed,
                          out_dir=str(out_dir), progress=cfg.progress, log_every=10),
        eval=EvalSection(n_generate=0))


def pretrained_base(cfg: AblationConfig, tokenizer) -> tuple[Path, dict]:
    """The base checkpoint folder, pre-training it first unless an identical one is cached."""
    probe = base_config(cfg, str(tokenizer.path), Path("."))
    recipe = {"config": probe.to_dict(), "tokenizer": hashlib.sha256(tokenizer.path.read_bytes()).hexdigest(),
              "torch": torch.__version__}
    for section, key in (("train", "out_dir"), ("train", "progress"), ("data", "tokenizer"), ("data", "cache_dir")):
        recipe["config"][section].pop(key)  # where things live does not change the model (the tokenizer's bytes do)
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    root = D.cache_dir(cfg.cache_dir) / "bases"
    final = root / f"base-{key}"
    if (final / "final" / "model" / "config.json").exists():
        info = json.loads((final / "base.json").read_text())
        _say(f"base: reusing the cached pre-trained model {final}")
        return final / "final" / "model", {**info, "cached": True}
    tmp = root / f".base-{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    _say(f"base: pre-training a {cfg.dim}-dim {cfg.n_layers}-layer LLaMA on stdlib docstrings "
         f"({probe.train.steps} steps); cached for later runs")
    t0 = time.perf_counter()
    out = run(base_config(cfg, str(tokenizer.path), tmp))
    info = {"pretrain_steps": probe.train.steps, "pretrain_time_s": time.perf_counter() - t0,
            "pretrain_final_loss": out.result.history[-1]["loss"],
            "pretrain_eval_loss": out.result.history[-1].get("eval_loss"), "parameters": out.total,
            "tokens_seen": out.result.tokens, "key": key}
    (tmp / "base.json").write_text(json.dumps(info, indent=1))
    root.mkdir(parents=True, exist_ok=True)
    if final.exists():  # a concurrent run finished the same base first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final / "final" / "model", {**info, "cached": False}


# =====================================================================================================================
# 2. One method
# =====================================================================================================================

def method_config(cfg: AblationConfig, method: str, base: Path, tokenizer_path: str, out_dir: Path) -> RunConfig:
    options, lr = METHODS[method]
    options = dict(options)
    if method in ("adapter_v1", "adapter_v2", "excitor"):
        options["adapter_layers"] = cfg.n_layers
    _, steps = cfg.effective_steps
    return RunConfig(
        model=ModelSection(checkpoint=str(base), device=cfg.device),
        data=DataSection(source="task", task=cfg.task, seq_len=cfg.seq_len, pack=True, n_train=cfg.n_train,
                         n_eval=cfg.n_eval, tokenizer=tokenizer_path, cache_dir=cfg.cache_dir),
        method={"name": method, **options},  # "qlora" = these LoRA options + quantize_base (peft.training.recipe)
        train=TrainConfig(steps=steps, batch_size=cfg.batch_size, micro_batch_size=cfg.batch_size, lr=lr,
                          warmup_steps=max(1, steps // 10), seed=cfg.seed, out_dir=str(out_dir),
                          progress=cfg.progress, log_every=1),
        eval=EvalSection(n_generate=cfg.n_eval, max_new_tokens=cfg.max_new_tokens))


def peak_memory(run_cfg: RunConfig, tokenizer, steps: int) -> int:
    """Peak tensor bytes of `steps` optimizer steps of a fresh copy of the run (untimed, no files)."""
    data = build_data(run_cfg.data, tokenizer)
    set_seed(run_cfg.train.seed)
    model = apply_method(build_model(run_cfg.model, tokenizer.n_words, run_cfg.data.seq_len), run_cfg.method)
    cfg = dataclasses.replace(run_cfg.train, steps=steps, out_dir=None, progress=False)
    return measure_peak(lambda: train(model, data.rows, cfg, pad_id=tokenizer.pad_id, length=data.length),
                        model=model, device=run_cfg.model.device)


def evaluate_base(cfg: AblationConfig, base: Path, tokenizer) -> dict:
    """Held-out loss and exact match of the untouched base (the floor every method starts from)."""
    run_cfg = method_config(cfg, "full", base, str(tokenizer.path), Path("."))
    data = build_data(run_cfg.data, tokenizer)
    model = build_model(run_cfg.model, tokenizer.n_words, cfg.seq_len)
    loss = evaluate_loss(model, data.eval_rows, cfg.batch_size, tokenizer.pad_id)
    acc, _ = exact_match_accuracy(model, tokenizer, data.eval_examples, cfg.max_new_tokens)
    return {"eval_loss": loss, "exact_match": acc}


# =====================================================================================================================
# 3. The whole ablation
# =====================================================================================================================

def run_ablation(cfg: AblationConfig) -> dict:
    t_start = time.perf_counter()
    out = Path(cfg.out)
    check_writable(out)
    tokenizer = D.builtin_tokenizer(cfg.cache_dir, cfg.vocab_size, D.builtin_corpus(cfg.cache_dir))
    base, base_info = pretrained_base(cfg, tokenizer)
    base_eval = evaluate_base(cfg, base, tokenizer)
    rows, curves = [], {}
    for method in cfg.methods:
        run_dir = out / method
        if run_dir.exists():  # a previous ablation's run of this method: replaced, never resumed
            shutil.rmtree(run_dir)
        run_cfg = method_config(cfg, method, base, str(tokenizer.path), run_dir)
        _say(f"--- {method}: {run_cfg.train.steps} steps, lr {run_cfg.train.lr:g}")
        result = run(run_cfg)
        hist = result.result.history
        peak = peak_memory(run_cfg, tokenizer, cfg.memory_steps)
        step_times = [h["step_time_s"] for h in hist[1:]] or [hist[0]["step_time_s"]]  # step 1 includes warm-up
        rows.append({
            "method": method, "trainable": result.trainable,
            "trainable_pct": 100 * result.trainable / base_info["parameters"],
            "peak_memory_mb": peak / 2 ** 20, "step_time_ms": 1000 * statistics.median(step_times),
            "tokens_per_s": result.result.tokens / result.result.train_time_s,
            "train_loss": hist[-1]["loss"], "eval_loss": hist[-1]["eval_loss"],
            "exact_match": hist[-1]["exact_match"], "lr": run_cfg.train.lr,
            "options": {k: v for k, v in run_cfg.method.items() if k != "name"}})
        curves[method] = [[h["step"], h["loss"]] for h in hist]
    wall = time.perf_counter() - t_start
    report = {
        "config": dataclasses.asdict(cfg), "base": {**base_info, **base_eval, "path": str(base)}, "rows": rows,
        "curves": curves, "wall_time_s": wall,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "device": cfg.device}}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "results.md").write_text(format_table(report) + "\n")
    plot_curves(curves, out / "loss_curves.png", cfg.task)
    return report


def format_table(report: dict) -> str:
    head = ("| method | trainable params | % of model | peak memory (MB) | step (ms) | tokens/s | eval loss | "
            "exact match |")
    lines = [head, "|" + " --- |" * 8]
    b = report["base"]
    lines.append(f"| base (no fine-tuning) | 0 | 0 | – | – | – | {b['eval_loss']:.3f} | "
                 f"{100 * b['exact_match']:.1f}% |")
    for r in report["rows"]:
        lines.append(f"| {r['method']} | {r['trainable']:,} | {r['trainable_pct']:.2f} | {r['peak_memory_mb']:.1f} | "
                     f"{r['step_time_ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['eval_loss']:.3f} | "
                     f"{100 * r['exact_match']:.1f}% |")
    return "\n".join(lines)


def plot_curves(curves: dict, path: Path, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, points in curves.items():
        steps, losses = zip(*points)
        ax.plot(steps, losses, label=method, linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (response tokens)")
    ax.set_yscale("log")
    ax.set_title(f"Fine-tuning the tiny base on '{task}': same data, same budget")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# =====================================================================================================================
# Command line
# =====================================================================================================================

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
