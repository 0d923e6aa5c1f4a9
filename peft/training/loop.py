"""The one training loop: pre-training, full fine-tuning and every PEFT method go through `train()`.

Shapes: B rows per micro-batch, T sequence length, V vocabulary.

One optimizer step, as implemented below:

    rows of the step  = the next `batch_size` rows of a seeded order         (data.RowOrder; all ranks together)
    rows of this rank = a contiguous 1/world_size share, cut into micro-batches of `micro_batch_size`
    N                 = number of target tokens in the whole step, summed over micro-batches and ranks
    for each micro-batch:  backward( Σ_t CE(logits_t, target_t) / N  (+ MoE auxiliary losses, token-weighted) )
    clip the global gradient norm, AdamW update, warmup + cosine learning rate

Dividing every micro-batch's *sum* by the step's global token count N makes k micro-batches of b rows produce
exactly the gradient of one batch of k·b rows, even when micro-batches hold different numbers of target tokens
(the mean-of-means bug: torchtune PR #1875, transformers PR #34191).

Other objectives plug in through `Objective` (how to batch rows, what to count, what to sum): the reward model's
pairwise loss and DPO (`peft.training.reward_model`, `peft.training.dpo`) count preference pairs, and DPO's NLL
term counts chosen tokens. Each kind of count k gets its own step-global N_k, and the step minimises
Σ_k (Σ over the step of the k-terms) / N_k, so the accumulation identity above holds for every objective.

Multi-process runs (`torchrun --nproc_per_node N`) shard every transformer block and then the root with FSDP2
(`torch.distributed.fsdp.fully_shard`). FSDP averages gradients over ranks, so each rank's loss is multiplied by the
world size to keep the "sum / global N" normalisation. Only rank 0 writes files, logs and shows the progress bar.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from llama.formats.io import atomic_write_bytes

from . import checkpointing
from .data import IGNORE_INDEX, Batch, Row, RowOrder, collate

PRECISIONS = ("fp32", "bf16-mixed")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings of one run (model, data and method live in `peft.training.recipe`)."""

    steps: int = 100
    batch_size: int = 16  # rows per optimizer step, all micro-batches and ranks together
    micro_batch_size: Optional[int] = None  # rows per forward pass on one rank (the knob that sets activation
    #                                         memory); None: batch_size / world_size, one micro-batch per rank
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # the cosine decays from lr to lr·min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.0  # applied to matrices only, never to norms, biases or gates
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global L2 norm of the gradient; 0 disables clipping
    precision: str = "fp32"  # "fp32" or "bf16-mixed" (autocast; weights, grads and optimizer state stay fp32)
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0  # 0: evaluate once, at the end
    save_every: int = 0  # 0: one checkpoint, at the end
    keep_checkpoints: int = 2
    out_dir: Optional[str] = None  # None: no files at all
    resume: bool = False  # continue from the newest checkpoint in out_dir
    progress: bool = True  # tqdm bar on rank 0

    def __post_init__(self):
        for key in ("steps", "batch_size", "micro_batch_size", "log_every", "keep_checkpoints"):
            value = getattr(self, key)
            if key == "micro_batch_size" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"train.{key} must be a positive integer, got {value!r}")
        for key in ("warmup_steps", "eval_every", "save_every"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                raise ValueError(f"train.{key} must be a non-negative integer, got {getattr(self, key)!r}")
        if not self.lr > 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0:
            raise ValueError(f"train.grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")


# =====================================================================================================================
# Learning-rate schedule
# =====================================================================================================================

class WarmupCosine:
    """Multiplier of the peak learning rate at step s (0-based), as in Llama 2 §2.2: linear warmup over the first
    `warmup` steps, then cosine decay to `min_ratio` at the last step.

        s < warmup:  (s + 1) / warmup
        otherwise:   min_ratio + (1 - min_ratio) · ½ (1 + cos(π · (s - warmup) / max(1, total - 1 - warmup)))
    """

    def __init__(self, warmup: int, total: int, min_ratio: float):
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - 1 - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """AdamW (arXiv 1711.05101) over the trainable parameters; weight decay on matrices only."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameter (all requires_grad=False); apply a PEFT method or "
                         "train with method=full")
    decay = [p for n, p in named if p.ndim >= 2]
    no_decay = [p for n, p in named if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    schedule = LambdaLR(optimizer, WarmupCosine(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
    return optimizer, schedule


# =====================================================================================================================
# Distributed context (torchrun + FSDP2)
# =====================================================================================================================

@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, value: float) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item())

    def all_gather(self, obj):
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def init_distributed() -> Dist:
    """Join the process group that torchrun describes in the environment (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


def shard_model(model: nn.Module) -> nn.Module:
    """FSDP2: one shard group per transformer block, then the root (embeddings, final norm, head)."""
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


# =====================================================================================================================
# Loss
# =====================================================================================================================

def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ_t −log p(target_t) over positions whose target is not IGNORE_INDEX; logits [B, T, V], targets [B, T].

    Computed in at least float32 (bf16 logits under autocast are upcast; float64 stays float64)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def forward(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, T, V] and the model's weighted auxiliary loss (0 for dense models).

    The rows' extra inputs (`Row.inputs`, e.g. a multimodal model's pixel_values) go in as keyword arguments.

    Llama 4 mixture-of-experts models report their Switch load-balancing and ST-MoE router z-losses of the last
    forward through `Transformer.aux_loss()`, already multiplied by the coefficients in `args.moe_args`.
    """
    kwargs = dict(batch.inputs) if batch.segment_ids is None else {"segment_ids": batch.segment_ids, **batch.inputs}
    logits = model(batch.tokens, **kwargs)
    aux_loss = getattr(model, "aux_loss", None)
    aux = aux_loss() if aux_loss is not None else logits.new_zeros(())
    return logits, aux


@dataclass
class Terms:
    """One micro-batch's contribution to a step, as sums over its items, keyed by the kind of item they are counted
    in ("tokens", "pairs"): the loop divides each sum by the step's global count of that kind."""

    objective: dict[str, torch.Tensor]  # differentiated: the step minimises Σ_k Σ_step objective[k] / N_k
    loss: dict[str, float]  # what is logged as "loss" (for next-token training: the CE without auxiliary terms)
    metrics: dict[str, tuple[float, str]] = field(default_factory=dict)  # name -> (sum, kind): logged as Σ / N_kind
    logits_finite: bool = True


class Objective:
    """What one optimizer step minimises. `collate` turns rows into a micro-batch (with `.to(device)` and
    `.n_tokens`), `counts` says how many items of each kind it holds, `__call__` runs the model on it."""

    def collate(self, rows: Sequence) -> Batch:
        raise NotImplementedError

    def counts(self, batch) -> dict[str, int]:
        raise NotImplementedError

    def __call__(self, model: nn.Module, batch) -> Terms:
        raise NotImplementedError


class NextTokenLoss(Objective):
    """Cross-entropy of the targets (pre-training, SFT): Σ_t CE_t / N_tokens, plus the MoE auxiliary losses
    weighted by each micro-batch's share of the targets (they are per-token averages)."""

    def __init__(self, pad_id: int, length: Optional[int] = None):
        self.pad_id, self.length = pad_id, length

    def collate(self, rows: Sequence[Row]) -> Batch:
        return collate(rows, self.pad_id, self.length)

    def counts(self, batch: Batch) -> dict[str, int]:
        return {"tokens": batch.n_targets}

    def __call__(self, model: nn.Module, batch: Batch) -> Terms:
        logits, aux = forward(model, batch)
        ce = token_loss_sum(logits, batch.targets)
        return Terms({"tokens": ce + aux * batch.n_targets}, {"tokens": float(ce.detach())},
                     logits_finite=bool(torch.isfinite(logits.detach()).all()))


def accumulate_gradients(model: nn.Module, micro: Sequence, n_global: dict[str, float] | float, world_size: int = 1,
                         autocast=None, objective: Optional[Objective] = None) -> tuple[float, dict, bool]:
    """Forward/backward every micro-batch of one optimizer step; returns (loss, metrics, logits finite), this
    rank's shares (sum them over ranks for the step's values).

    n_global: the step's global count of each kind of item (a number: target tokens). Each micro-batch contributes
    Σ terms_k / N_k, so after the last backward the gradient is that of the per-item mean over the whole step,
    however the rows were split (× world_size: FSDP averages over ranks). The default objective is next-token
    cross-entropy on batches from `data.collate`.
    """
    objective = objective or NextTokenLoss(pad_id=0)
    counts = n_global if isinstance(n_global, dict) else {"tokens": n_global}
    loss, metrics, logits_finite = 0.0, {}, True
    for batch in micro:
        with autocast or nullcontext():
            terms = objective(model, batch)
        value = sum(total / counts[kind] for kind, total in terms.objective.items())
        (value * world_size).backward()
        loss += sum(total / counts[kind] for kind, total in terms.loss.items())
        for name, (total, kind) in terms.metrics.items():
            metrics[name] = metrics.get(name, 0.0) + total / counts[kind]
        logits_finite = logits_finite and terms.logits_finite
    return loss, metrics, logits_finite


@contextmanager
def evaluating(model: nn.Module):
    """No gradients and eval mode (LoRA dropout off) inside the block; the model's mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def evaluate_loss(model: nn.Module, rows: Sequence[Row], micro_batch_size: int, pad_id: int,
                  length: Optional[int] = None, device=None) -> float:
    """Token-weighted mean cross-entropy over `rows`.

    Under FSDP every rank evaluates all rows: each forward pass is a collective (parameter all-gather), so all ranks
    must run the same number of them, and held-out sets are small.
    """
    total, count = 0.0, 0
    with evaluating(model):
        for i in range(0, len(rows), micro_batch_size):
            batch = collate(rows[i:i + micro_batch_size], pad_id, length).to(device or _device(model))
            logits, _ = forward(model, batch)
            total += float(token_loss_sum(logits, batch.targets))
            count += batch.n_targets
    return total / max(count, 1)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# =====================================================================================================================
# Metrics: JSONL (everything) and CSV (one row per logged step), rank 0 only
# =====================================================================================================================

CSV_FIELDS = ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "step_time_s", "elapsed_s", "eval_loss")


class MetricsLog:
    def __init__(self, out_dir: Optional[Path], keep_up_to_step: int = 0):
        self.records: list[dict] = []
        self.jsonl = self.csv = None
        if out_dir is None:
            return
        self.jsonl, self.csv = out_dir / "metrics.jsonl", out_dir / "metrics.csv"
        if keep_up_to_step > 0 and self.jsonl.exists():
            # resuming: drop whatever a killed run logged after its last checkpoint, so every step appears once
            lines = self.jsonl.read_text().splitlines()
            self.records = [r for r in map(json.loads, lines) if r["step"] <= keep_up_to_step]
        self._rewrite()

    def _rewrite(self) -> None:
        if self.jsonl is None:
            return
        atomic_write_bytes(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.records).encode())
        lines = [",".join(CSV_FIELDS)] + [self._csv_line(r) for r in self.records]
        atomic_write_bytes(self.csv, ("\n".join(lines) + "\n").encode())

    @staticmethod
    def _csv_line(r: dict) -> str:
        return ",".join("" if r.get(k) is None else str(r[k]) for k in CSV_FIELDS)

    def append(self, record: dict) -> None:
        self.records.append(record)
        if self.jsonl is None:
            return
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        with open(self.csv, "a") as f:
            f.write(self._csv_line(record) + "\n")


# =====================================================================================================================
# The loop
# =====================================================================================================================

@dataclass
class TrainResult:
    history: list[dict]  # one record per logged step (loss, lr, grad_norm, tokens, tokens_per_s, …, eval_*)
    final_step: int
    train_time_s: float  # wall time of the optimizer steps only (no evaluation, no checkpointing)
    tokens: int  # real input tokens processed, all ranks
    resumed_from: Optional[int] = None


class NonFiniteLoss(FloatingPointError):
    """Training stopped because the loss or the gradient became NaN or infinite (message: step and cause)."""


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor, also for an FSDP2 shard (a DTensor)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _diagnose(model: nn.Module, logits_finite: bool, loss_finite: bool, grad_norm: float) -> str:
    """Name the first cause of a non-finite loss or gradient, with the fix."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(_full(p.detach()).float()).all()]
    if bad:
        return (f"parameters are non-finite ({', '.join(bad[:3])}{' …' if len(bad) > 3 else ''}): a previous update "
                f"diverged or the checkpoint is corrupt; lower train.lr or keep train.grad_clip > 0")
    if not logits_finite:
        return ("the forward pass produced non-finite logits (an overflow in the activations); lower train.lr, use "
                "train.precision=fp32, or check the inputs")
    if not loss_finite:
        return "the loss is non-finite although the logits are finite; check the targets (ids outside the vocabulary?)"
    return (f"the gradient norm is {grad_norm} (the backward pass overflowed); lower train.lr or use "
            f"train.precision=fp32")


# TrainConfig fields a resumed run must keep: everything that changes the numbers (the others only change memory,
# logging and checkpointing: micro_batch_size, log_every, eval_every, save_every, keep_checkpoints, progress)
RESUME_FIXED = ("steps", "batch_size", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "beta1", "beta2", "eps",
                "grad_clip", "precision", "seed")


def split_batch(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """(rows per rank, rows per micro-batch) of one optimizer step; a batch that does not split is an error."""
    per_rank, rem = divmod(cfg.batch_size, world_size)
    if rem or per_rank == 0:
        raise ValueError(f"train.batch_size={cfg.batch_size} does not split over {world_size} processes; make it a "
                         f"multiple of {world_size} (or run {_divisors(cfg.batch_size)} processes)")
    micro = cfg.micro_batch_size or per_rank
    if per_rank % micro:
        raise ValueError(f"train.batch_size={cfg.batch_size} over {world_size} process(es) gives {per_rank} rows per "
                         f"rank, not a whole number of micro_batch_size={micro}; make batch_size a multiple of "
                         f"{world_size * micro}, or leave micro_batch_size unset (one micro-batch per rank)")
    return per_rank, micro


def _divisors(n: int) -> str:
    return " or ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def train(model: nn.Module, rows: Sequence, cfg: TrainConfig, *, pad_id: Optional[int] = None,
          length: Optional[int] = None, objective: Optional[Objective] = None,
          eval_rows: Optional[Sequence[Row]] = None, evaluators: Sequence[Callable[[nn.Module], dict]] = (),
          callbacks: Sequence[Callable[[int, dict], None]] = (), meta: Optional[dict] = None,
          ctx: Optional[Dist] = None, desc: str = "train") -> TrainResult:
    """Train `model` (its requires_grad parameters) on `rows` for `cfg.steps` optimizer steps.

    objective: what a step minimises (default: next-token cross-entropy of `data.Row`s padded with `pad_id`);
        rows are whatever it collates (preference pairs for the reward model and DPO).
    length: pad every micro-batch to this many positions (packed rows); None pads to the longest row.
    eval_rows: held-out rows for the eval loss; evaluators: extra metrics (e.g. exact match), called at eval steps.
    callbacks(step, record): called on every rank after each logged step (tests use one to kill the process).
    meta: what a checkpoint must match on resume (model shape, method, data); stored in every checkpoint.
    """
    if objective is None:
        if pad_id is None:
            raise ValueError("train() needs pad_id for next-token training (or an objective that collates its rows)")
        objective = NextTokenLoss(pad_id, length)
    ctx = ctx or init_distributed()
    per_rank, micro_size = split_batch(cfg, ctx.world_size)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else None
    if out_dir is not None and ctx.is_main:
        checkpointing.check_writable(out_dir)
    ckpt_dir = out_dir / "checkpoints" if out_dir else None
    meta = dict(meta or {})
    # what a resumed run must share with the checkpoint: the data, and every setting of the optimisation (steps too:
    # the LR schedule's length is part of its state); micro_batch_size and the bookkeeping keys may change
    meta.update(n_rows=len(rows), **{key: getattr(cfg, key) for key in RESUME_FIXED})

    if ctx.world_size > 1:
        shard_model(model)
    device = _device(model)
    optimizer, schedule = build_optimizer(model, cfg)
    start_step, totals = 0, {}
    if ckpt_dir is not None:
        found = checkpointing.latest(ckpt_dir)
        if cfg.resume:
            if found is None:
                raise ValueError(f"train.resume=true but {ckpt_dir} holds no checkpoint; start without resume or point "
                                 f"train.out_dir at the run to continue")
            start_step, totals = checkpointing.load(found, model, optimizer, schedule, meta, ctx)
        elif found is not None:
            raise ValueError(f"{out_dir} already holds checkpoints of a run (newest: {found.name}); pass "
                             f"train.resume=true to continue it, or choose a fresh train.out_dir")
    log = MetricsLog(out_dir if ctx.is_main else None, keep_up_to_step=start_step)
    order = RowOrder(len(rows), cfg.seed)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision == "bf16-mixed"
                else nullcontext())
    bar = None
    if cfg.progress and ctx.is_main:
        bar = tqdm(total=cfg.steps, initial=start_step, desc=desc, dynamic_ncols=True, file=sys.stderr)

    model.train()
    # totals over the whole run, including the steps before a resume (stored in every checkpoint)
    train_time, tokens_seen = totals.get("train_time_s", 0.0), totals.get("tokens", 0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for step in range(start_step, cfg.steps):
        t0 = time.perf_counter()
        # -- the rows of this step, this rank's share, and the global number of target tokens N ------------------
        step_rows = order.take(step * cfg.batch_size, cfg.batch_size)
        mine = step_rows[ctx.rank * per_rank:(ctx.rank + 1) * per_rank]
        micro = [objective.collate([rows[i] for i in mine[j:j + micro_size]]).to(device)
                 for j in range(0, per_rank, micro_size)]
        n_global = {kind: ctx.all_sum(sum(objective.counts(b)[kind] for b in micro))
                    for kind in objective.counts(micro[0])}
        empty = [kind for kind, n in n_global.items() if n == 0]
        if empty:
            raise ValueError(f"step {step}: no target token (count '{empty[0]}') in the whole batch; every row is "
                             f"masked (check the data)")
        loss, metrics, logits_finite = accumulate_gradients(model, micro, n_global, ctx.world_size, autocast,
                                                            objective)
        loss = ctx.all_sum(loss)
        metrics = {name: ctx.all_sum(value) for name, value in metrics.items()}
        # -- clip, guard against NaN/inf, update -------------------------------------------------------------------
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        grad_norm = float(_full(grad_norm))
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            cause = _diagnose(model, logits_finite, math.isfinite(loss), grad_norm)
            if bar is not None:
                bar.close()
            raise NonFiniteLoss(f"training stopped at step {step + 1}: loss={loss}, grad_norm={grad_norm}; {cause}")
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        dt = time.perf_counter() - t0
        n_tokens = int(ctx.all_sum(sum(b.n_tokens for b in micro)))
        train_time += dt
        tokens_seen += n_tokens
        done = step + 1
        # -- log, evaluate, checkpoint -----------------------------------------------------------------------------
        record = dict(step=done, loss=loss, lr=lr, grad_norm=grad_norm, tokens=n_tokens,
                      tokens_per_s=n_tokens / dt, step_time_s=dt, elapsed_s=train_time, **metrics)
        is_eval = (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps
        if is_eval and (eval_rows or evaluators):
            if eval_rows:
                record["eval_loss"] = evaluate_loss(model, list(eval_rows), micro_size, pad_id, length, device)
            for fn in evaluators:
                record.update(fn(model))
            model.train()
        if done % cfg.log_every == 0 or done == cfg.steps or "eval_loss" in record:
            log.append(record)
            for cb in callbacks:
                cb(done, record)
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{n_tokens / dt:,.0f}", refresh=False)
            bar.update(1)
        if ckpt_dir is not None and ((cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps):
            checkpointing.save(ckpt_dir, done, model, optimizer, schedule, meta, ctx, keep=cfg.keep_checkpoints,
                               data_position=done * cfg.batch_size,
                               totals={"tokens": tokens_seen, "train_time_s": train_time})
    if bar is not None:
        bar.close()
    return TrainResult(log.records, cfg.steps, train_time, tokens_seen, start_step or None)


def set_seed(seed: int) -> None:
    """Seed every generator a run touches (call before building the model and its adapters, so their init is seeded)."""
    random.seed(seed)
    torch.manual_seed(seed)


def train_examples(model: nn.Module, examples, *, steps: int, lr: float, batch_size: int, seed: int,
                   on_step: Optional[Callable[[int], None]] = None) -> list[float]:
    """The loop above on plain (input ids, target ids) pairs of equal length (targets IGNORE_INDEX where no loss is
    taken), `batch_size` of them per optimizer step with warmup over the first tenth: what the model ablations in
    `scripts/` train with. `on_step(step)` runs after each optimizer step. Returns the loss of every step."""
    rows = [Row(list(x), list(y)) for x, y in examples]
    cfg = TrainConfig(steps=steps, batch_size=batch_size, micro_batch_size=batch_size, lr=lr,
                      warmup_steps=max(1, steps // 10), seed=seed, progress=False)
    callbacks = [lambda step, record: on_step(step)] if on_step else []
    return [r["loss"] for r in train(model, rows, cfg, pad_id=0, callbacks=callbacks).history]
