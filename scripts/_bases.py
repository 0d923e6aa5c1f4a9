"""The main job's two tiny pre-trained bases, cached on disk (ablate_peft.py; ablate_zero_init.py and ablate_quant.py
use the "skill" one).

Shapes: B rows per step, T tokens per row.

Both bases are the same LLaMA (tiny-llama-2-gqa shape, the built-in 1,024-piece BPE), pre-trained from the same seed
for the same number of steps on rows of T tokens. They differ only in their text:

    "docs"   the docstrings of the running Python's standard library (no task anywhere in it);
    "skill"  the same docstrings, with `skill_fraction` of the rows replaced by free text in which a digit task's skill
             appears in raw form ("The digits of 4912 in ascending order are 1249.", peft.training.data.RAW_SENTENCES),
             never in the task's instruction format and never on a held-out input.

Each base is cached under <cache>/bases/<name>-<key>, the key being a hash of everything that determines it (this
config, the corpus, the tokenizer's bytes, the torch and Python versions), written to a temporary folder and renamed
into place, so a killed run leaves no half-written base and a changed setting never reuses a stale one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

import llama
from peft.training import data as D
from peft.training.loop import TrainConfig, evaluate_loss, set_seed, train
from peft.training.recipe import exact_match_accuracy

from scripts._ablation import split_documents

VOCAB_SIZE = 1024  # the built-in BPE's size
HELD_OUT_ROWS = 256  # held-out rows (of T tokens) per text for the bases' eval loss


@dataclass(frozen=True)
class BaseConfig:
    """Everything that determines a pre-trained base (all of it goes into the cache key)."""

    skill: Optional[str] = None  # None: docstrings only; a task of D.RAW_SENTENCES: docstrings + that skill in raw form
    skill_fraction: float = 0.5  # share of the training rows that are raw skill text
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    steps: int = 400
    batch_size: int = 16  # B
    seq_len: int = 128  # T
    lr: float = 3e-3
    seed: int = 0

    def __post_init__(self):
        if self.skill is not None and self.skill not in D.RAW_SENTENCES:
            raise ValueError(f"no raw form for task {self.skill!r}; use one of {sorted(D.RAW_SENTENCES)}")
        if not 0 < self.skill_fraction < 1:
            raise ValueError(f"skill_fraction must lie in (0, 1), got {self.skill_fraction}")

    @property
    def name(self) -> str:
        return "docs" if self.skill is None else f"docs+{self.skill}"


def tokenizer(cache: Optional[str]) -> llama.Tokenizer:
    """The built-in BPE on the stdlib docstrings (trained at first use and cached)."""
    return D.builtin_tokenizer(cache, VOCAB_SIZE, D.builtin_corpus(cache))


def training_rows(cfg: BaseConfig, tok, cache: Optional[str]) -> list[D.Row]:
    """The pre-training rows: every docstring but each 20th, plus (skill base) raw skill text for `skill_fraction` of
    all rows."""
    train_docs, _ = split_documents(D.builtin_corpus(cache))
    rows = D.single_rows(D.encode_documents(train_docs, tok, cfg.seq_len))
    if cfg.skill is None:
        return rows
    n_skill = round(len(rows) * cfg.skill_fraction / (1 - cfg.skill_fraction))
    # a document is 2-5 sentences of ~15 tokens: 3 documents per 128 tokens are more than enough
    docs = D.raw_skill_documents(cfg.skill, max(1, 3 * cfg.seq_len // 128) * n_skill, seed=cfg.seed)
    skill = D.encode_documents(docs, tok, cfg.seq_len)
    if len(skill) < n_skill:
        raise RuntimeError(f"generated {len(skill)} rows of raw skill text, fewer than the {n_skill} needed")
    return rows + D.single_rows(skill[:n_skill])


def heldout_rows(cfg: BaseConfig, tok, cache: Optional[str], skill: Optional[str]) -> dict[str, list[D.Row]]:
    """Held-out rows per text: the 20th docstrings, and raw text of `skill` drawn from another seed (on
    training-split digits like all raw text: the task's held-out split stays unseen)."""
    _, held_docs = split_documents(D.builtin_corpus(cache))
    held = {"docs": D.single_rows(D.encode_documents(held_docs, tok, cfg.seq_len))[:HELD_OUT_ROWS]}
    if skill is not None:
        docs = D.raw_skill_documents(skill, 4 * HELD_OUT_ROWS, seed=cfg.seed + 1_000_003)
        held[skill] = D.single_rows(D.encode_documents(docs, tok, cfg.seq_len))[:HELD_OUT_ROWS]
    return held


def base_key(cfg: BaseConfig, tok, cache: Optional[str]) -> str:
    corpus = D.builtin_corpus(cache)
    recipe = {"config": dataclasses.asdict(cfg), "tokenizer": hashlib.sha256(Path(tok.path).read_bytes()).hexdigest(),
              "corpus": hashlib.sha256("\x00".join(corpus).encode()).hexdigest(), "torch": torch.__version__,
              "python": platform.python_version()}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def raw_probe_accuracy(model, tok, task: str, n: int, max_new_tokens: int) -> float:
    """Share of held-out inputs the model completes correctly when asked in raw form (its skill before tuning)."""
    probes = D.raw_probe_examples(task, n)
    _, predictions = exact_match_accuracy(model, tok, probes, max_new_tokens)
    return sum(D.raw_probe_correct(p, e.response) for p, e in zip(predictions, probes)) / len(probes)


def pretrained_base(cfg: BaseConfig, cache: Optional[str], probe_task: str, progress: bool = False,
                    say=print) -> tuple[Path, dict]:
    """(checkpoint folder, info) of the base `cfg`, pre-training it first unless an identical one is cached.

    info: steps, time, final training loss, held-out loss per text, and the raw-form probe accuracy on `probe_task`
    (the skill as the base has it, before any instruction tuning).
    """
    tok = tokenizer(cache)
    key = base_key(cfg, tok, cache)
    root = D.cache_dir(cache) / "bases"
    final = root / f"{cfg.name}-{key}"
    if (final / "model" / "config.json").exists():
        say(f"base {cfg.name}: reusing the cached pre-trained model {final}")
        return final / "model", {**json.loads((final / "base.json").read_text()), "cached": True}
    say(f"base {cfg.name}: pre-training a {cfg.dim}-dim {cfg.n_layers}-layer LLaMA for {cfg.steps} steps of "
        f"{cfg.batch_size} x {cfg.seq_len} tokens (cached afterwards)")
    t0, c0 = time.perf_counter(), time.process_time()
    rows, held = training_rows(cfg, tok, cache), heldout_rows(cfg, tok, cache, probe_task)
    set_seed(cfg.seed)
    args = llama.ModelArgs.from_name("tiny-llama-2-gqa", vocab_size=tok.n_words, dim=cfg.dim, n_layers=cfg.n_layers,
                                     n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, max_seq_len=cfg.seq_len)
    model = llama.Transformer(args)
    result = train(model, rows, TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size,
                                            micro_batch_size=cfg.batch_size, lr=cfg.lr,
                                            warmup_steps=max(1, cfg.steps // 20), weight_decay=0.1, seed=cfg.seed,
                                            progress=progress, log_every=10), pad_id=tok.pad_id)
    info = {"name": cfg.name, "config": dataclasses.asdict(cfg), "key": key,
            "parameters": sum(p.numel() for p in model.parameters()), "rows": len(rows),
            "tokens_seen": result.tokens, "final_train_loss": result.history[-1]["loss"],
            "heldout_loss": {name: evaluate_loss(model, r, cfg.batch_size, tok.pad_id) for name, r in held.items()},
            "raw_probe_task": probe_task, "raw_probe_exact_match": raw_probe_accuracy(model, tok, probe_task, 200, 12),
            "pretrain_wall_s": time.perf_counter() - t0, "pretrain_cpu_s": time.process_time() - c0}
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    llama.save(model, tmp / "model", format="hf")
    (tmp / "base.json").write_text(json.dumps(info, indent=1))
    if final.exists():  # a concurrent run finished the same base first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final / "model", {**info, "cached": False}
