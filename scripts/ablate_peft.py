"""The main job: does a parameter-efficient method match full fine-tuning? Each method at its own tuned learning rate,
over seeds, in two regimes: the one the papers measured in, and a new skill.

    python scripts/ablate_peft.py                           # the default run (<= 10 min on 2 cores from an empty cache)
    python scripts/ablate_peft.py --resweep                 # rerun the learning-rate sweep instead of reusing it
    python scripts/ablate_peft.py --max-steps 2 --seeds 2   # smoke test
    python scripts/ablate_peft.py --methods full lora adapter_v1 --seeds 5 --jobs 1 --out runs/five_seeds

One task, `sort` ("Sort: 4912\\nAnswer:" -> "1249"), one fine-tuning budget, two pre-trained bases (scripts/_bases.py):

  skill  the papers' regime. LLaMA-Adapter tuned LLaMA on Alpaca, QLoRA tuned it on OASST1: a base that already
         had the knowledge learned to answer in an instruction format. Here the base was pre-trained on docstrings
         mixed with the skill written in raw form ("The digits of 4912 in ascending order are 1249."), and a small
         instruction-formatted set asks for it.
  new    the skill is new: the base saw docstrings only, so fine-tuning has to teach the computation itself.

Everything else is identical: the tokenizer, the model shape, the pre-training seed and length, the fine-tuning data,
its order per seed, the number of steps, the batch and the sequence length. Per regime and method (full fine-tuning,
LoRA, QLoRA, LLaMA-Adapter V1 and V2, Excitor):

  1. Learning rate. One run per point of the method's grid (LR_GRID: three or four rates half a decade apart around
     the method's usual scale) at the first seed; the rate with the lowest loss on a validation split (training-side
     examples that are never trained on) is chosen. A choice on the edge of the grid is flagged. The sweep is cached
     under <cache>/sweeps/ and reused by later runs with identical settings, which say so; `--resweep` reruns it.
  2. Seeds. The chosen rate at `--seeds` seeds (the first is the sweep's own run): seed s fixes the adapter's
     initialisation and the order of the training rows. Reported on the held-out test split (prompts that appear
     neither in pre-training nor in tuning): mean and sample standard deviation over seeds of the test loss
     (response tokens) and of exact match (the greedy answer equals the reference), and, seed by seed, the
     difference to full fine-tuning at the same seed.

Runs are independent, so `--jobs` worker processes run them side by side (results do not depend on --jobs; each run
seeds itself and uses --threads torch threads). Denormal floats are flushed to zero in every process: they carry no
signal at these magnitudes and make single-threaded float32 kernels several times slower on x86.

Outputs in --out: results.json (every run: config, curve, validation and test metrics; one row per regime and method
with seeds, exact_match_mean/std, eval_loss_mean/std, lr and the differences to full fine-tuning), results.md (the
tables), results.png (every seed's exact match and loss, mean and spread), lr_sweep.png (validation loss over the
grid), and <regime>/<method>/lr<lr>-seed<s>/metrics.jsonl per run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python scripts/...` from anywhere

import llama  # noqa: E402
from llama.formats.io import atomic_write_bytes  # noqa: E402
from peft.targets import BLOCK_LINEARS  # noqa: E402
from peft.training import data as D  # noqa: E402
from peft.training.loop import TrainConfig, evaluate_loss, set_seed, train  # noqa: E402
from peft.training.memory import measure_peak  # noqa: E402
from peft.training.recipe import apply_method, exact_match_accuracy  # noqa: E402
from scripts._bases import BaseConfig, pretrained_base, tokenizer  # noqa: E402
from scripts._cli import UsageError, experiment_parser, positive, run_cli, start, write_results  # noqa: E402
from scripts._peft_report import format_tables, plot_results, plot_sweep  # noqa: E402

# Each method's options. LoRA and QLoRA share one config (the QLoRA recipe's "all block linears"), so the pair
# isolates the NF4 base. The prompt methods adapt every layer of the tiny base.
METHODS: dict[str, dict] = {
    "full": {},
    "lora": {"r": 8, "alpha": 16.0, "target_modules": list(BLOCK_LINEARS)},
    "qlora": {"r": 8, "alpha": 16.0, "target_modules": list(BLOCK_LINEARS)},
    "adapter_v1": {"adapter_len": 10},
    "adapter_v2": {"adapter_len": 10},
    "excitor": {"adapter_len": 10, "rank": 8},
}
# The learning-rate grid: points half a decade apart around each method's usual scale (full fine-tuning ~1e-3; LoRA and
# QLoRA ~1e-2 at this size; the prompt methods far higher, as in their papers: LLaMA-Adapter used 9e-3 at batch 64 on
# 7B). Four points where the best rate differs between the two regimes, so that both choices are interior on the
# default run; a choice on an edge is flagged in the results (widen the grid then).
LR_GRID: dict[str, tuple[float, ...]] = {
    "full": (3e-4, 1e-3, 3e-3, 1e-2),
    "lora": (1e-3, 3e-3, 1e-2, 3e-2),
    "qlora": (1e-3, 3e-3, 1e-2, 3e-2),
    "adapter_v1": (1e-1, 3e-1, 1.0),
    "adapter_v2": (1e-2, 3e-2, 1e-1, 3e-1),
    "excitor": (3e-2, 1e-1, 3e-1),
}
REGIMES = ("skill", "new")  # the papers' regime, then the new skill
REGIME_TITLES = {"skill": "papers' regime: the base has the skill in raw form, tuning teaches the instruction format",
                 "new": "new skill: the base never saw the task, tuning has to teach the computation"}


@dataclass
class MainJobConfig:
    task: str = "sort"
    methods: tuple = tuple(METHODS)
    seeds: int = 3  # seeds per method: seed, seed+1, …
    seed: int = 0  # the bases' pre-training seed and the first fine-tuning seed (also the sweep's)
    jobs: int = min(2, os.cpu_count() or 1)  # worker processes
    threads: int = 1  # torch threads per process
    cache_dir: Optional[str] = None
    resweep: bool = False
    progress: bool = True
    # the bases (scripts/_bases.py)
    dim: int = BaseConfig.dim
    n_layers: int = BaseConfig.n_layers
    base_steps: int = BaseConfig.steps
    skill_fraction: float = BaseConfig.skill_fraction
    # fine-tuning: identical for every method, seed and regime
    steps: int = 100
    batch_size: int = 8
    seq_len: int = 64
    n_train: int = 1000
    n_val: int = 100
    n_test: int = 200
    max_new_tokens: int = 10
    max_steps: Optional[int] = None  # caps base_steps and steps (smoke tests)
    memory_steps: int = 2  # optimizer steps under the memory tracker (from the 2nd on, AdamW's moments are live)

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise UsageError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
        if self.task not in D.RAW_SENTENCES:
            raise UsageError(f"task {self.task!r} has no raw form for the papers' regime; use one of "
                             f"{sorted(D.RAW_SENTENCES)}")
        for name in ("seeds", "jobs", "threads", "steps", "base_steps", "n_train", "n_val", "n_test"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UsageError(f"--max-steps must be >= 1, got {self.max_steps}")

    @property
    def finetune_steps(self) -> int:
        return min(self.steps, self.max_steps or self.steps)

    def base(self, regime: str) -> BaseConfig:
        return BaseConfig(skill=self.task if regime == "skill" else None, skill_fraction=self.skill_fraction,
                          dim=self.dim, n_layers=self.n_layers, seed=self.seed,
                          steps=min(self.base_steps, self.max_steps or self.base_steps))


@dataclass(frozen=True)
class Job:
    """One fine-tuning run (method None: evaluate the base untouched)."""

    regime: str
    method: Optional[str]
    lr: float
    seed: int
    base: str  # checkpoint folder
    tokenizer: str  # tokenizer.model
    cfg: MainJobConfig
    out: Optional[str] = None  # folder for metrics.jsonl


def _say(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


# =====================================================================================================================
# One run
# =====================================================================================================================

@dataclass
class TaskData:
    rows: list  # packed training rows
    val_rows: list
    val_examples: list
    test_rows: list
    test_examples: list


def task_data(cfg: MainJobConfig, tok) -> TaskData:
    """Training and validation from the task's training split (disjoint), test from its held-out split."""
    pool = D.task_examples(cfg.task, cfg.n_train + cfg.n_val, "train")
    val, train_ex = pool[:cfg.n_val], pool[cfg.n_val:]
    test = D.task_examples(cfg.task, cfg.n_test, "eval")
    encode = lambda examples: [D.encode_sft(e, tok, cfg.seq_len, index=i) for i, e in enumerate(examples)]  # noqa
    return TaskData(D.pack(encode(train_ex), cfg.seq_len), D.single_rows(encode(val)), val,
                    D.single_rows(encode(test)), test)


def train_config(cfg: MainJobConfig, lr: float, seed: int, steps: Optional[int] = None) -> TrainConfig:
    steps = steps or cfg.finetune_steps
    return TrainConfig(steps=steps, batch_size=cfg.batch_size, micro_batch_size=cfg.batch_size, lr=lr,
                       warmup_steps=max(1, steps // 10), seed=seed, progress=False, log_every=1)


def build(job: Job) -> torch.nn.Module:
    set_seed(job.seed)  # before the adapter is initialised
    model = llama.load(job.base)
    if job.method is None:
        return model
    options = dict(METHODS[job.method])
    if job.method in ("adapter_v1", "adapter_v2", "excitor"):
        options["adapter_layers"] = model.args.n_layers  # every layer of the tiny base
    return apply_method(model, {"name": job.method, **options})


def scores(model, tok, cfg: MainJobConfig, rows, examples) -> tuple[float, float]:
    """(loss over response tokens, exact match) on a split."""
    loss = evaluate_loss(model, rows, cfg.batch_size, tok.pad_id)
    return loss, exact_match_accuracy(model, tok, examples, cfg.max_new_tokens)[0]


def fine_tune(job: Job) -> dict:
    """Train one method at one learning rate and seed; score it on the validation and test splits."""
    t0, c0 = time.perf_counter(), time.process_time()
    cfg = job.cfg
    tok = llama.Tokenizer(job.tokenizer)
    data = task_data(cfg, tok)
    model = build(job)
    record = {"regime": job.regime, "method": job.method or "base", "lr": job.lr, "seed": job.seed}
    if job.method is not None:
        result = train(model, data.rows, train_config(cfg, job.lr, job.seed), pad_id=tok.pad_id,
                       length=cfg.seq_len)
        if job.out:
            Path(job.out).mkdir(parents=True, exist_ok=True)
            (Path(job.out) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in result.history))
        step_ms = [1000 * h["step_time_s"] for h in result.history[1:]] or [1000 * result.history[0]["step_time_s"]]
        record.update(curve=[h["loss"] for h in result.history], step_time_ms=statistics.median(step_ms),
                      trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))
    record["val_loss"], record["val_exact_match"] = scores(model, tok, cfg, data.val_rows, data.val_examples)
    record["test_loss"], record["test_exact_match"] = scores(model, tok, cfg, data.test_rows, data.test_examples)
    record.update(wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0)
    return record


def pretrain(args: tuple) -> tuple[str, dict]:
    base_cfg, cache, task, progress = args
    path, info = pretrained_base(base_cfg, cache, task, progress=progress, say=_say)
    return str(path), info


def peak_memory(job: Job) -> float:
    """Peak tensor MB of `memory_steps` optimizer steps of a fresh copy of the run (untimed, no files)."""
    tok = llama.Tokenizer(job.tokenizer)
    data = task_data(job.cfg, tok)
    model = build(job)
    cfg = train_config(job.cfg, job.lr, job.seed, steps=job.cfg.memory_steps)
    return measure_peak(lambda: train(model, data.rows, cfg, pad_id=tok.pad_id, length=job.cfg.seq_len),
                        model=model) / 2 ** 20


# =====================================================================================================================
# Worker processes
# =====================================================================================================================

def _init_process(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


class Workers:
    """`jobs` spawned processes (or this one, for jobs=1) that map a function over independent runs, in order."""

    def __init__(self, jobs: int, threads: int, progress: bool):
        self.threads_before = torch.get_num_threads()
        _init_process(threads)  # this process too: it runs the jobs itself for jobs=1, and must round like a worker
        self.progress = progress
        self.pool = None
        if jobs > 1:  # spawn, not fork: a forked child of a process that used OpenMP threads can hang
            self.pool = multiprocessing.get_context("spawn").Pool(jobs, _init_process, (threads,))

    def map(self, fn, items: list, desc: str) -> list:
        it = map(fn, items) if self.pool is None else self.pool.imap(fn, items)
        return list(tqdm(it, total=len(items), desc=desc, disable=not self.progress, file=sys.stderr))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
        torch.set_num_threads(self.threads_before)
        torch.set_flush_denormal(False)  # IEEE behaviour again (the process default) for whoever called run_main_job


# =====================================================================================================================
# The learning-rate sweep (cached) and the seeds
# =====================================================================================================================

def sweep_key(cfg: MainJobConfig, regime: str, method: str, base_key: str) -> str:
    """Everything a sweep's runs depend on: the base, the task data, the budget, the method, its grid, the seed."""
    fields = ("task", "seed", "steps", "batch_size", "seq_len", "n_train", "n_val", "n_test", "max_new_tokens",
              "max_steps")
    recipe = {"base": base_key, "regime": regime, "method": method, "options": METHODS[method],
              "grid": LR_GRID[method], "torch": torch.__version__, **{f: getattr(cfg, f) for f in fields}}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def choose(runs: list[dict]) -> dict:
    """The sweep's choice: the lowest validation loss (smoother than exact match on 100 examples)."""
    return min(runs, key=lambda r: r["val_loss"])


def summarise(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for a single seed)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def method_rows(cfg: MainJobConfig, regime: str, chosen: dict, runs: dict, sweeps: dict) -> list[dict]:
    """One row per method: the chosen rate, every seed's test metrics, mean/std, and the paired differences to full
    fine-tuning (method at seed s minus full at seed s)."""
    rows = []
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    for method in cfg.methods:
        per_seed = [runs[(regime, method, s)] for s in seeds]
        em, loss = [r["test_exact_match"] for r in per_seed], [r["test_loss"] for r in per_seed]
        grid = LR_GRID[method]
        row = {"regime": regime, "method": method, "lr": chosen[method]["lr"], "seeds": seeds,
               "lr_at_grid_edge": chosen[method]["lr"] in (grid[0], grid[-1]), "exact_match": em, "eval_loss": loss,
               "trainable": per_seed[0]["trainable"], "step_time_ms": statistics.median(r["step_time_ms"]
                                                                                         for r in per_seed),
               "sweep_cached": sweeps[method]["cached"]}
        row["exact_match_mean"], row["exact_match_std"] = summarise(em)
        row["eval_loss_mean"], row["eval_loss_std"] = summarise(loss)
        if "full" in cfg.methods:
            full = [runs[(regime, "full", s)] for s in seeds]
            d_em = [a - b["test_exact_match"] for a, b in zip(em, full)]
            d_loss = [a - b["test_loss"] for a, b in zip(loss, full)]
            row["delta_exact_match_vs_full"], row["delta_eval_loss_vs_full"] = d_em, d_loss
            row["delta_exact_match_vs_full_mean"], row["delta_exact_match_vs_full_std"] = summarise(d_em)
            row["delta_eval_loss_vs_full_mean"], row["delta_eval_loss_vs_full_std"] = summarise(d_loss)
        rows.append(row)
    return rows


def children_cpu_s() -> float:
    """CPU seconds (user + system) of the worker processes that have finished (the pool joins them)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_main_job(cfg: MainJobConfig, out: Path) -> dict:
    t0, c0 = time.perf_counter(), time.process_time() + children_cpu_s()
    tok = tokenizer(cfg.cache_dir)  # trained once here (cached), before any worker needs it
    workers = Workers(cfg.jobs, cfg.threads, cfg.progress)
    try:
        # -- 1. the two bases, side by side ---------------------------------------------------------------------------
        bases = dict(zip(REGIMES, workers.map(
            pretrain, [(cfg.base(r), cfg.cache_dir, cfg.task, False) for r in REGIMES], "bases")))
        phases = {"tokenizer_and_bases_s": time.perf_counter() - t0}
        for regime, (path, info) in bases.items():
            _say(f"base {info['name']} ({regime}): raw-form probe {100 * info['raw_probe_exact_match']:.1f}% exact, "
                 f"held-out loss {info['heldout_loss']}" + (" (cached)" if info["cached"] else ""))
        job = lambda regime, method, lr, seed: Job(  # noqa: E731
            regime, method, lr, seed, bases[regime][0], str(tok.path), cfg,
            None if method is None else str(out / regime / method / f"lr{lr:g}-seed{seed}"))

        # -- 2. the sweep: cached results, or one run per grid point at the first seed (plus the untouched bases) ---
        sweeps, todo = {}, [job(r, None, 0.0, cfg.seed) for r in REGIMES]
        root = D.cache_dir(cfg.cache_dir) / "sweeps"
        for regime in REGIMES:
            for method in cfg.methods:
                path = root / f"{regime}-{method}-{sweep_key(cfg, regime, method, bases[regime][1]['key'])}.json"
                if path.exists() and not cfg.resweep:
                    sweeps[regime, method] = {"path": str(path), "cached": True,
                                              "runs": json.loads(path.read_text())["runs"]}
                else:
                    sweeps[regime, method] = {"path": str(path), "cached": False, "runs": None}
                    todo += [job(regime, method, lr, cfg.seed) for lr in LR_GRID[method]]
        n_cached = sum(s["cached"] for s in sweeps.values())
        if n_cached:
            _say(f"learning rates: reusing {n_cached} cached sweep(s) of {len(sweeps)} from {root} "
                 f"(pass --resweep to rerun them)")
        t1 = time.perf_counter()
        done = workers.map(fine_tune, todo, "sweep")
        phases["sweep_s"] = time.perf_counter() - t1
        base_evals = {r["regime"]: r for r in done[:len(REGIMES)]}
        for key, sweep in sweeps.items():
            if sweep["runs"] is None:
                sweep["runs"] = [r for r in done[len(REGIMES):] if (r["regime"], r["method"]) == key]
                root.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(Path(sweep["path"]), json.dumps({"runs": sweep["runs"]}).encode())

        # -- 3. the other seeds at each chosen rate ----------------------------------------------------------------
        chosen = {key: choose(s["runs"]) for key, s in sweeps.items()}
        runs = {(r, m, cfg.seed): c for (r, m), c in chosen.items()}
        extra = [job(r, m, c["lr"], cfg.seed + i) for (r, m), c in chosen.items() for i in range(1, cfg.seeds)]
        t1 = time.perf_counter()
        for record in workers.map(fine_tune, extra, "seeds"):
            runs[record["regime"], record["method"], record["seed"]] = record
        phases["seeds_s"] = time.perf_counter() - t1
        # -- 4. peak memory of one training step per method (regime-independent) -----------------------------------
        memory = dict(zip(cfg.methods, workers.map(
            peak_memory, [job("skill", m, chosen["skill", m]["lr"], cfg.seed) for m in cfg.methods], "memory")))
    finally:
        workers.close()

    rows = []
    for regime in REGIMES:
        rows += method_rows(cfg, regime, {m: chosen[regime, m] for m in cfg.methods}, runs,
                            {m: sweeps[regime, m] for m in cfg.methods})
    total = bases["skill"][1]["parameters"]
    for row in rows:
        row["trainable_pct"] = 100 * row["trainable"] / total
        row["peak_memory_mb"] = memory[row["method"]]
    report = {
        "config": dataclasses.asdict(cfg), "regimes": {r: REGIME_TITLES[r] for r in REGIMES},
        "bases": {r: {**info, "path": path, "test_loss": base_evals[r]["test_loss"],
                      "test_exact_match": base_evals[r]["test_exact_match"]} for r, (path, info) in bases.items()},
        "lr_grid": LR_GRID, "selection": "lowest validation loss at the first seed",
        "sweep": [{"regime": r, "method": m, "cached": s["cached"], "path": s["path"], "chosen_lr": chosen[r, m]["lr"],
                   "grid": [{k: run[k] for k in ("lr", "val_loss", "val_exact_match")} for run in s["runs"]]}
                  for (r, m), s in sweeps.items()],
        "rows": rows,
        "runs": list(runs.values()),
        "wall_time_s": time.perf_counter() - t0, "cpu_time_s": time.process_time() - c0 + children_cpu_s(),
        "phase_wall_s": phases,
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "jobs": cfg.jobs,
                        "threads": cfg.threads, "cpu_count": os.cpu_count(), "processor": platform.processor()}}
    write_results(out, report, format_tables(report))
    plot_results(report, out / "results.png")
    plot_sweep(report, out / "lr_sweep.png")
    return report


# =====================================================================================================================
# Command line
# =====================================================================================================================

def parse(argv=None):
    d = MainJobConfig()
    p = experiment_parser(__doc__, "ablate_peft", seed=d.seed, threads=d.threads)
    p.add_argument("--task", default=d.task, choices=sorted(D.RAW_SENTENCES), help="the skill")
    p.add_argument("--methods", nargs="+", default=list(d.methods), choices=list(METHODS))
    p.add_argument("--seeds", type=positive(), default=d.seeds, help="fine-tuning seeds per method")
    p.add_argument("--jobs", type=positive(), default=d.jobs, help="worker processes running runs side by side")
    p.add_argument("--cache-dir", default=None, help="where the corpus, tokenizer, bases and sweeps are cached "
                   "(default $LLAMA_PEFT_CACHE or ~/.cache/llama-peft-zoo)")
    p.add_argument("--resweep", action="store_true", help="rerun the learning-rate sweep even if it is cached")
    p.add_argument("--steps", type=positive(), default=d.steps, help="fine-tuning steps per run")
    p.add_argument("--base-steps", type=positive(), default=d.base_steps, help="pre-training steps per base")
    p.add_argument("--n-test", type=positive(), default=d.n_test, help="held-out test examples")
    p.add_argument("--max-steps", type=positive(), default=None, help="cap every step count (smoke tests)")
    return p, p.parse_args(argv)


def main(argv=None) -> dict:
    p, a = parse(argv)
    cfg = MainJobConfig(task=a.task, methods=tuple(a.methods), seeds=a.seeds, seed=a.seed, jobs=a.jobs,
                        threads=a.threads, cache_dir=a.cache_dir, resweep=a.resweep, progress=not a.no_progress,
                        steps=a.steps, base_steps=a.base_steps, n_test=a.n_test, max_steps=a.max_steps)
    out = start(a)
    report = run_main_job(cfg, out)
    print(format_tables(report))
    print(f"\nwall time {report['wall_time_s']:.0f} s, CPU time {report['cpu_time_s']:.0f} s ({cfg.jobs} worker "
          f"process(es) x {cfg.threads} thread(s)); "
          f"results in {out}/results.json, results.md, results.png, lr_sweep.png")
    return report


if __name__ == "__main__":
    run_cli(main)
