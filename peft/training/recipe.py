"""A run from a config: which model, which data, which method, how to train — resolved, validated, executed.

Scripts stay thin: `scripts/train.py` parses `--config FILE --section.key=value …` into a `RunConfig`
(`peft.training.config`) and calls `run()`; the ablation builds `RunConfig`s in code and calls the same `run()`.

A run with train.out_dir set writes one folder with a fixed layout:

    config.toml     the resolved config (written first; `--config` reads it back and reproduces the run)
    metrics.jsonl   one record per logged step (metrics.csv: the same as a table)
    checkpoints/    crash-safe training checkpoints (peft.training.checkpointing); `latest` names the newest
    resumes.jsonl   one line per resume: the step it continued from and the bookkeeping keys it changed
    final/          config.toml, tokenizer.model (unless the byte tokenizer), and model/ (full fine-tuning or
                    pre-training: an HF folder) or adapter.safetensors (PEFT: the trainable tensors only)
    results.json    written last: the run's summary. Its presence marks a finished run, which is never rewritten.

Everything that can be checked is checked before step 1: the folder (writable; no checkpoints of another run; not a
finished run; on resume, the same settings as its config.toml), the tokenizer against the model's vocabulary, and
the exact-match settings against the model's context.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

import llama
from llama.formats.io import atomic_write_bytes, write_safetensors

from ..api import apply
from ..api import merge as merge_adapter
from . import checkpointing
from . import data as D
from .checkpointing import check_writable, trainable_names
from .config import (PRETRAIN_SOURCES, SFT_SOURCES, DataSection, ModelSection,
                     RunConfig, build_config, differences, method_config, read_file, to_toml)
from .loop import Dist, TrainResult, init_distributed, set_seed, split_batch, train

CONFIG_FILE, RESULTS_FILE, RESUMES_FILE = "config.toml", "results.json", "resumes.jsonl"
# keys a resumed run may change: where and how often it logs, evaluates and saves, and the micro-batch size (memory;
# the gradient is the same up to float rounding); every other key must equal the run's config.toml
RESUME_FREE = ("train.out_dir", "train.resume", "train.progress", "train.log_every", "train.eval_every",
               "train.save_every", "train.keep_checkpoints", "train.micro_batch_size")


# =====================================================================================================================
# Building: tokenizer, model, method, data
# =====================================================================================================================

def apply_method(model: nn.Module, method: dict) -> nn.Module:
    """Freeze the base and attach the method's trainable parameters (full fine-tuning: everything trains)."""
    config = method_config(method)
    if config is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    return apply(model, config)


def build_tokenizer(cfg: DataSection):
    """data.tokenizer: a tokenizer file, "bytes" (256 ids), or unset (the built-in BPE on the stdlib corpus)."""
    return D.load_tokenizer(cfg.tokenizer, cfg.cache_dir, cfg.vocab_size, cfg.corpus_chars)


def build_model(cfg: ModelSection, vocab_size: int, seq_len: int) -> nn.Module:
    """The base model: loaded from `checkpoint`, or the preset (with overrides) freshly initialised with the
    tokenizer's vocabulary (`vocab_size`)."""
    if cfg.checkpoint:
        model = llama.load(cfg.checkpoint, device=cfg.device)
        if model.args.vocab_size != vocab_size:
            raise ValueError(f"the tokenizer has {vocab_size} ids but the checkpoint {cfg.checkpoint} has "
                             f"vocab_size={model.args.vocab_size}; use the tokenizer the checkpoint was trained with "
                             f"(data.tokenizer=...; a run's is in its final/ folder, or 'bytes')")
    else:
        overrides = {k: getattr(cfg, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of",
                                                  "max_seq_len") if getattr(cfg, k) is not None}
        args = llama.ModelArgs.from_name(cfg.preset, vocab_size=vocab_size, **overrides)
        if args.vision_args is not None:
            raise ValueError(f"model.preset {cfg.preset!r} is multimodal and training runs are text-only; use its text "
                             f"preset ({cfg.preset.removesuffix('-vision')!r})")
        with torch.device(cfg.device):
            model = llama.Transformer(args)
    if model.args.max_seq_len < seq_len:
        raise ValueError(f"data.seq_len={seq_len} exceeds the model context max_seq_len={model.args.max_seq_len}; "
                         f"lower data.seq_len or raise model.max_seq_len")
    return model


@dataclass
class Data:
    rows: list[D.Row]
    eval_rows: list[D.Row]
    eval_examples: list[D.Example]  # SFT only: held-out examples for exact match
    length: Optional[int]  # pad every batch to this length (packed rows), or None
    sft: bool


def build_data(cfg: DataSection, tokenizer) -> Data:
    if cfg.source in PRETRAIN_SOURCES:
        docs = (D.builtin_corpus(cfg.cache_dir, cfg.corpus_chars) if cfg.source == "corpus"
                else D.read_text_documents(_require(cfg.path, "text")))
        train_docs, eval_docs = (docs, D.read_text_documents(cfg.eval_path)) if cfg.eval_path else \
            _hold_out(docs, cfg.eval_fraction, "the corpus", "documents", "give more text or a data.eval_path")
        rows = D.single_rows(D.encode_documents(train_docs, tokenizer, cfg.seq_len))
        eval_rows = D.single_rows(D.encode_documents(eval_docs, tokenizer, cfg.seq_len))[:cfg.n_eval]
        return Data(rows, eval_rows, [], None, sft=False)
    if cfg.source == "task":
        train_ex = D.task_examples(cfg.task, cfg.n_train, "train")
        eval_ex = D.task_examples(cfg.task, cfg.n_eval, "eval")
    elif cfg.source == "jsonl":
        examples = D.read_jsonl_examples(_require(cfg.path, "jsonl"))
        train_ex, eval_ex = (examples, D.read_jsonl_examples(cfg.eval_path)) if cfg.eval_path else \
            _hold_out(examples, cfg.eval_fraction, str(cfg.path), "examples", "add examples or give data.eval_path")
    else:
        raise ValueError(f"unknown data.source {cfg.source!r}; use one of {SFT_SOURCES + PRETRAIN_SOURCES}")
    seqs = [D.encode_sft(e, tokenizer, cfg.seq_len, cfg.truncate, index=i) for i, e in enumerate(train_ex)]
    eval_seqs = [D.encode_sft(e, tokenizer, cfg.seq_len, cfg.truncate, index=i) for i, e in enumerate(eval_ex)]
    rows = D.pack(seqs, cfg.seq_len) if cfg.pack else D.single_rows(seqs)
    return Data(rows, D.single_rows(eval_seqs), eval_ex, cfg.seq_len if cfg.pack else None, sft=True)

def _hold_out(items: list, fraction: float, source: str, kind: str, fix: str) -> tuple[list, list]:
    """The last `fraction` of items (at least one) held out for evaluation, the rest for training."""
    n_eval = max(1, int(len(items) * fraction))
    if n_eval >= len(items):
        raise ValueError(f"{source} has only {len(items)} {kind}, too few to hold some out; {fix}")
    return items[:-n_eval], items[-n_eval:]



def _require(path: Optional[str], source: str) -> str:
    if not path:
        raise ValueError(f"data.source={source!r} needs data.path (the file to read)")
    return path


# =====================================================================================================================
# Exact-match evaluation by greedy generation
# =====================================================================================================================

@torch.no_grad()
def exact_match_accuracy(model: nn.Module, tokenizer, examples: Sequence[D.Example], max_new_tokens: int,
                         batch_size: int = 64) -> tuple[float, list[str]]:
    """Greedy-decode each prompt (KV cache, stops at EOS) and compare with the reference answer."""
    was_training = model.training
    model.eval()
    predictions = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        prompts = [tokenizer.encode(e.prompt, bos=True, eos=False) for e in chunk]
        outs = llama.generate(model, prompts, max_new_tokens, temperature=0.0, stop_tokens=tokenizer.stop_tokens)
        predictions += [tokenizer.decode([t for t in o if t not in tokenizer.stop_tokens]) for o in outs]
    model.clear_cache()
    model.train(was_training)
    correct = sum(D.exact_match(p, e.response) for p, e in zip(predictions, examples))
    return correct / max(len(examples), 1), predictions


# =====================================================================================================================
# Running
# =====================================================================================================================

@dataclass
class RunOutput:
    config: RunConfig
    result: TrainResult
    model: nn.Module
    tokenizer: Any
    data: Data
    trainable: int  # trainable parameters
    total: int  # parameters of the base model (before the method was attached)


def count_parameters(model: nn.Module) -> int:
    """Parameters of `model`, each tensor counted once (tied embeddings share one)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def check_run_folder(cfg: RunConfig) -> Optional[dict]:
    """Check train.out_dir before anything is built; on resume, return the bookkeeping keys that changed.

    A fresh run needs a folder without checkpoints; a finished run (results.json) is never continued or rewritten;
    a resumed run must have the settings of the run's config.toml, except the keys in RESUME_FREE.
    """
    out = Path(cfg.train.out_dir)
    if (out / RESULTS_FILE).exists():
        raise ValueError(f"{out} holds a finished run ({RESULTS_FILE} is written when a run ends) and a run's record "
                         f"is never rewritten; choose a fresh train.out_dir (--out), or start from its final/ folder")
    has_checkpoint = checkpointing.latest(out / "checkpoints") is not None
    if not cfg.train.resume:
        if has_checkpoint:
            raise ValueError(f"{out} already holds checkpoints of an unfinished run; continue it with --resume {out} "
                             f"(train.resume=true), or choose a fresh train.out_dir (--out)")
        return None
    if not has_checkpoint:
        raise ValueError(f"train.resume=true but {out / 'checkpoints'} holds no checkpoint; start without resume or "
                         f"point train.out_dir at the run to continue")
    if not (out / CONFIG_FILE).is_file():
        return {}  # a run written by code that keeps no config.toml: the checkpoint's own check still applies
    recorded = build_config(read_file(out / CONFIG_FILE)).to_dict()
    now = cfg.to_dict()
    changed = differences(recorded, now, ignore=RESUME_FREE)
    if changed:
        listing = "; ".join(f"{key} {a!r} -> {b!r}" for key, (a, b) in changed.items())
        raise ValueError(f"resuming {out} with settings that differ from its {CONFIG_FILE}: {listing}. A resumed run "
                         f"continues the recorded one: drop these overrides (scripts/train.py --resume {out} uses "
                         f"the recorded settings), or start a fresh run in another out_dir")
    free = [key for key in RESUME_FREE if key not in ("train.out_dir", "train.resume")]
    return {key: list(pair) for key, pair in differences(recorded, now).items() if key in free}


def run(cfg: RunConfig, callbacks: Sequence[Callable[[int, dict], None]] = (), quiet: bool = False,
        ctx: Optional[Dist] = None) -> RunOutput:
    """Build everything `cfg` describes, check it, train, evaluate, and (with train.out_dir) write the run folder."""
    ctx = ctx or init_distributed()
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if ctx.is_main and not quiet else (lambda *a: None)
    out_dir = Path(cfg.train.out_dir) if cfg.train.out_dir else None
    split_batch(cfg.train, ctx.world_size)  # the batch must split over the processes: checked before anything
    if cfg.model.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"model.device={cfg.model.device!r} but this machine has no CUDA device (torch "
                         f"{torch.__version__}); use model.device='cpu'")
    resume_changes = None
    created = out_dir is not None and not out_dir.exists()
    if out_dir is not None:
        if ctx.is_main:
            check_writable(out_dir)
        resume_changes = check_run_folder(cfg)
    try:
        tokenizer = build_tokenizer(cfg.data)
        data = build_data(cfg.data, tokenizer)
        set_seed(cfg.train.seed)  # before the model and its adapters are initialised, so their init is seeded
        model = build_model(cfg.model, tokenizer.n_words, cfg.data.seq_len)
        eval_examples = data.eval_examples[:cfg.eval.n_generate] if data.sft else []
        check_generation(eval_examples, tokenizer, cfg.eval.max_new_tokens, model.args.max_seq_len)
        total = count_parameters(model)  # the base model's size: the denominator of "% trainable" for every method
        model = apply_method(model, cfg.method)
    except Exception:
        if created and ctx.is_main and not any(out_dir.iterdir()):
            out_dir.rmdir()  # a run refused before it began leaves no empty folder behind
        raise
    trainable = sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
    say(f"model: {total:,} base parameters, {trainable:,} trainable ({100 * trainable / total:.3f}% of the base), "
        f"method {cfg.method['name']}; data: {len(data.rows)} rows of ≤ {cfg.data.seq_len} tokens")
    if out_dir is not None and ctx.is_main:
        if resume_changes is None:  # a fresh run: its config, first
            atomic_write_bytes(out_dir / CONFIG_FILE, run_record(cfg).encode())
        else:
            step = json.loads((checkpointing.latest(out_dir / "checkpoints") / "meta.json").read_text())["step"]
            with open(out_dir / RESUMES_FILE, "a") as f:
                f.write(json.dumps({"from_step": step, "changed": resume_changes}) + "\n")

    evaluators = []
    if eval_examples:
        def exact_match(m):
            acc, _ = exact_match_accuracy(m, tokenizer, eval_examples, cfg.eval.max_new_tokens)
            return {"exact_match": acc}
        evaluators.append(exact_match)
    meta = {"model": model.args.to_dict(), "method": cfg.method, "data": dataclasses.asdict(cfg.data),
            "world_size": ctx.world_size}
    result = train(model, data.rows, cfg.train, pad_id=tokenizer.pad_id, length=data.length,
                   eval_rows=data.eval_rows, evaluators=evaluators, callbacks=callbacks, meta=meta, ctx=ctx)
    output = RunOutput(cfg, result, model, tokenizer, data, trainable, total)
    if out_dir is not None:
        export(model, cfg, tokenizer, ctx)
        if ctx.is_main:  # last: the mark of a finished run
            atomic_write_bytes(out_dir / RESULTS_FILE, json.dumps(summary(output, ctx), indent=1).encode())
    return output


def run_record(cfg: RunConfig) -> str:
    """The config.toml of a run folder: the resolved config without out_dir and resume (the folder is the file's)."""
    return ("# the resolved config of this run (scripts/train.py --config FILE reproduces it; --resume DIR continues "
            "it)\n" + to_toml(cfg, drop=("train.out_dir", "train.resume")))


def summary(out: RunOutput, ctx: Dist) -> dict:
    """What results.json records: the run's totals (over every resume) and its last logged metrics."""
    last = out.result.history[-1] if out.result.history else {}
    resumes = []
    out_dir = out.config.train.out_dir
    if out_dir and (Path(out_dir) / RESUMES_FILE).exists():
        resumes = [json.loads(line) for line in (Path(out_dir) / RESUMES_FILE).read_text().splitlines() if line]
    return {"method": out.config.method["name"], "trainable_params": out.trainable, "total_params": out.total,
            "steps": out.result.final_step, "train_time_s": out.result.train_time_s, "tokens": out.result.tokens,
            "final_loss": last.get("loss"), "eval_loss": last.get("eval_loss"),
            "exact_match": last.get("exact_match"), "world_size": ctx.world_size, "threads": torch.get_num_threads(),
            "resumes": resumes}


def check_generation(examples: Sequence[D.Example], tokenizer, max_new_tokens: int, max_seq_len: int) -> None:
    """Exact match generates after the last step: check now that every prompt plus its answer fits the context."""
    if not examples:
        return
    longest = max(len(tokenizer.encode(e.prompt, bos=True, eos=False)) for e in examples)
    if longest + max_new_tokens > max_seq_len:
        raise ValueError(f"exact match would generate eval.max_new_tokens={max_new_tokens} tokens after held-out "
                         f"prompts of up to {longest} tokens, past the model context max_seq_len={max_seq_len}; "
                         f"lower eval.max_new_tokens, raise model.max_seq_len, or set eval.n_generate=0")


def export(model: nn.Module, cfg: RunConfig, tokenizer, ctx: Dist) -> Optional[Path]:
    """out_dir/final: the resolved config, the tokenizer, and the trained tensors.

    Full fine-tuning / pre-training: a complete HF-format checkpoint (`final/model`, loadable by llama.load and by
    model.checkpoint=...). PEFT: only the trainable tensors (`final/adapter.safetensors`), gathered from every rank
    and checked to be non-empty, plus the method config; the base is the run's model.checkpoint.
    """
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not ctx.is_main:
        ctx.barrier()
        return None
    final = Path(cfg.train.out_dir) / "final"
    final.mkdir(parents=True, exist_ok=True)
    if tokenizer.path is not None:
        shutil.copyfile(tokenizer.path, final / "tokenizer.model")
    if cfg.method["name"] == "full":
        base = llama.Transformer(model.args)
        base.load_state_dict(sd)  # strict: every weight of the model must have been gathered
        llama.save(base, final / "model", format="hf")
    else:
        names = trainable_names(model)
        tensors = {n: sd[n].contiguous() for n in names}
        empty = [n for n, t in tensors.items() if t.numel() == 0]
        if not tensors or empty:
            raise RuntimeError(f"the adapter to export is empty ({len(tensors)} tensors, empty: {empty[:3]}); the "
                               f"sharded parameters were not gathered")
        write_safetensors(final / "adapter.safetensors", tensors)
    atomic_write_bytes(final / CONFIG_FILE, run_record(cfg).encode())  # last: final/ is complete
    ctx.barrier()
    return final


def final_folder(run_dir: str | os.PathLike) -> Path:
    """run_dir/final of a finished run, or an error that says what `run_dir` is instead."""
    final = Path(run_dir) / "final"
    if not (final / CONFIG_FILE).is_file():
        hint = (" (the run has not finished: resume it with scripts/train.py --resume DIR)"
                if (Path(run_dir) / "checkpoints").is_dir() else "")
        raise FileNotFoundError(f"{final / CONFIG_FILE} not found; pass the output folder of a finished "
                                f"scripts/train.py run{hint}")
    return final


def load_run(run_dir: str | os.PathLike, merge: bool = False, device: str = "cpu"):
    """(model, tokenizer, config) of a finished run: base + adapter attached (or merged, where the method can)."""
    final = final_folder(run_dir)
    cfg = build_config(read_file(final / CONFIG_FILE))
    tokenizer = (D.ByteTokenizer() if cfg.data.tokenizer == "bytes"
                 else llama.Tokenizer(final / "tokenizer.model"))
    if cfg.method["name"] == "full":
        return llama.load(final / "model", device=device), tokenizer, cfg
    set_seed(cfg.train.seed)
    model = build_model(dataclasses.replace(cfg.model, device=device), tokenizer.n_words, cfg.data.seq_len)
    model = apply_method(model, cfg.method)
    tensors = load_file(str(final / "adapter.safetensors"))
    expected = set(n for n, p in model.named_parameters() if p.requires_grad)
    if set(tensors) != expected:
        raise ValueError(f"{final / 'adapter.safetensors'} does not match method {cfg.method['name']!r}: missing "
                         f"{sorted(expected - set(tensors))[:3]}, unexpected {sorted(set(tensors) - expected)[:3]}")
    model.load_state_dict(tensors, strict=False)
    if merge:
        merge_adapter(model)
    return model, tokenizer, cfg
