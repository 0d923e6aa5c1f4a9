"""A run from a config: which model, which data, which method, how to train — resolved, validated, executed.

Scripts stay thin: `scripts/train.py` parses `--config FILE --section.key=value …` into a `RunConfig` and calls
`run()`; the ablation builds `RunConfig`s in code and calls the same `run()`.

Config file format: TOML, one table per section (see `configs/`):

    [model]   preset, optional checkpoint folder (llama.load) and shape overrides
    [data]    source = "task" | "jsonl" (SFT) or "corpus" | "text" (pre-training), sequence length, packing
    [method]  name = "full" | "lora" | "qlora" | "adapter_v1" | "adapter_v2" | "excitor"; every other key is passed
              to that method's config class (peft.LoraConfig, …) and checked against its fields
    [train]   peft.training.TrainConfig
    [eval]    exact-match generation settings

Unknown sections and keys are errors that name the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

import llama
from llama.formats.io import atomic_write_bytes, write_safetensors

from ..adapter_v1 import AdapterV1Config
from ..adapter_v2 import AdapterV2Config
from ..api import apply
from ..api import merge as merge_adapter
from ..excitor import ExcitorConfig
from ..lora_core import LoraConfig
from . import data as D
from .checkpointing import check_writable, trainable_names
from .loop import Dist, TrainConfig, TrainResult, init_distributed, set_seed, train

METHODS = ("full", "lora", "qlora", "adapter_v1", "adapter_v2", "excitor")
SFT_SOURCES, PRETRAIN_SOURCES = ("task", "jsonl"), ("corpus", "text")


@dataclass
class ModelSection:
    preset: str = "tiny-llama-2-gqa"  # any name of llama.list_models(); ignored when `checkpoint` is given
    checkpoint: Optional[str] = None  # a Meta or HF folder (llama.load): the pre-trained base
    dim: Optional[int] = None  # shape overrides of the preset (None: keep the preset's value)
    n_layers: Optional[int] = None
    n_heads: Optional[int] = None
    n_kv_heads: Optional[int] = None
    multiple_of: Optional[int] = None
    max_seq_len: Optional[int] = None
    device: str = "cpu"  # "cpu" or "cuda"


@dataclass
class DataSection:
    source: str = "task"  # "task" | "jsonl" (instruction tuning) or "corpus" | "text" (next-token pre-training)
    task: str = "sort"  # source="task": reverse | sort | add | recall | mix
    path: Optional[str] = None  # source="jsonl": {"prompt","response"} per line; source="text": plain text
    eval_path: Optional[str] = None  # held-out file of the same kind (default: hold out eval_fraction of `path`)
    eval_fraction: float = 0.05
    n_train: int = 4000  # source="task": training examples
    n_eval: int = 200  # held-out examples (tasks) or at most this many held-out rows (pre-training)
    seq_len: int = 64  # positions per row
    pack: bool = True  # SFT: pack several examples per row (attention blocked across them)
    truncate: bool = False  # SFT: cut examples longer than seq_len instead of failing
    tokenizer: Optional[str] = None  # a tokenizer.model file; None: the built-in BPE trained on the stdlib corpus
    vocab_size: int = 1024  # size of the built-in tokenizer
    corpus_chars: int = 4_000_000  # source="corpus": characters of stdlib docstrings to use
    cache_dir: Optional[str] = None  # default $LLAMA_PEFT_CACHE or ~/.cache/llama-peft-zoo


@dataclass
class EvalSection:
    n_generate: int = 200  # SFT: held-out examples scored by exact match after greedy generation (0: skip)
    max_new_tokens: int = 16


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    method: dict = field(default_factory=lambda: {"name": "full"})
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalSection = field(default_factory=EvalSection)

    def to_dict(self) -> dict:
        return {"model": dataclasses.asdict(self.model), "data": dataclasses.asdict(self.data),
                "method": dict(self.method), "train": dataclasses.asdict(self.train),
                "eval": dataclasses.asdict(self.eval)}


# =====================================================================================================================
# Parsing: TOML file + --section.key=value overrides, strictly checked
# =====================================================================================================================

def _toml():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib


def parse_value(text: str) -> Any:
    """A TOML literal (1e-3, true, "x", [1, 2]) when it parses as one, else the raw string (paths, names)."""
    try:
        return _toml().loads(f"v = {text}")["v"]
    except Exception:
        return text


def _unknown(kind: str, key: str, valid: Sequence[str]) -> ValueError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown {kind} {key!r}{hint} (valid: {', '.join(sorted(valid))})")


def _section(cls, values: dict, name: str):
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            raise _unknown(f"config key in [{name}]", f"{key}", names)
    try:
        return cls(**values)
    except TypeError as err:
        raise ValueError(f"[{name}]: {err}") from None


def build_config(raw: dict) -> RunConfig:
    """RunConfig from a nested dict (a parsed TOML file with overrides applied)."""
    sections = {"model": ModelSection, "data": DataSection, "method": None, "train": TrainConfig,
                "eval": EvalSection}
    for key, value in raw.items():
        if key not in sections:
            raise _unknown("config section", key, list(sections))
        if not isinstance(value, dict):
            raise ValueError(f"config section [{key}] must be a table of key = value pairs, got {value!r}")
    method = dict(raw.get("method", {}))
    method.setdefault("name", "full")
    if method["name"] not in METHODS:
        raise _unknown("method", str(method["name"]), METHODS)
    method_config(method)  # validates the method's options now, before any work
    return RunConfig(model=_section(ModelSection, raw.get("model", {}), "model"),
                     data=_section(DataSection, raw.get("data", {}), "data"), method=method,
                     train=_section(TrainConfig, raw.get("train", {}), "train"),
                     eval=_section(EvalSection, raw.get("eval", {}), "eval"))


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> RunConfig:
    """Read a TOML config (or start from the defaults) and apply `--section.key=value` overrides."""
    raw: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist; see configs/ for examples")
        try:
            raw = _toml().loads(p.read_text())
        except Exception as err:
            raise ValueError(f"config file {p} is not valid TOML: {err}") from None
    for item in overrides:
        body = item[2:] if item.startswith("--") else item
        if "=" not in body or "." not in body.split("=", 1)[0]:
            raise ValueError(f"override {item!r} must look like --section.key=value (e.g. --train.lr=3e-4)")
        key, value = body.split("=", 1)
        section, name = key.split(".", 1)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ValueError(f"override {item!r}: [{section}] is not a section")
        raw[section][name] = parse_value(value)
    return build_config(raw)


def format_config(cfg: RunConfig) -> str:
    """The resolved config as TOML-like text (printed at the start of every run)."""
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    return "\n".join(lines)


# =====================================================================================================================
# Building: tokenizer, model, method, data
# =====================================================================================================================

def method_config(method: dict):
    """The PEFT config object for `method` ({"name": ..., **options}); None for full fine-tuning."""
    name, options = method["name"], {k: v for k, v in method.items() if k != "name"}
    if name == "full":
        if options:
            raise ValueError(f"method 'full' takes no options, got {sorted(options)}; remove them from [method]")
        return None
    cls = {"lora": LoraConfig, "qlora": LoraConfig, "adapter_v1": AdapterV1Config,
           "adapter_v2": AdapterV2Config, "excitor": ExcitorConfig}[name]
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in options:
        if key not in valid:
            raise _unknown(f"option of method {name!r}", key, valid)
    if name == "qlora":
        if options.get("quantize_base") is False:
            raise ValueError("method 'qlora' is LoRA on an NF4 base; drop quantize_base=false or use method 'lora'")
        options["quantize_base"] = True
    return cls(**options)


def apply_method(model: nn.Module, method: dict) -> nn.Module:
    """Freeze the base and attach the method's trainable parameters (full fine-tuning: everything trains)."""
    config = method_config(method)
    if config is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    return apply(model, config)


def build_tokenizer(cfg: DataSection):
    if cfg.tokenizer:
        return llama.Tokenizer(cfg.tokenizer)
    docs = D.builtin_corpus(cfg.cache_dir, cfg.corpus_chars)
    return D.builtin_tokenizer(cfg.cache_dir, cfg.vocab_size, docs)


def build_model(cfg: ModelSection, vocab_size: int, seq_len: int) -> nn.Module:
    """The base model: loaded from `checkpoint`, or the preset (with overrides) freshly initialised."""
    if cfg.checkpoint:
        model = llama.load(cfg.checkpoint, device=cfg.device)
        if model.args.vocab_size < vocab_size:
            raise ValueError(f"the tokenizer has {vocab_size} ids but the checkpoint's vocab_size is "
                             f"{model.args.vocab_size}; use the tokenizer the checkpoint was trained with "
                             f"(data.tokenizer=...)")
    else:
        overrides = {k: getattr(cfg, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of",
                                                  "max_seq_len") if getattr(cfg, k) is not None}
        args = llama.ModelArgs.from_name(cfg.preset, vocab_size=vocab_size, **overrides)
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


def run(cfg: RunConfig, callbacks: Sequence[Callable[[int, dict], None]] = (), quiet: bool = False,
        ctx: Optional[Dist] = None) -> RunOutput:
    """Build everything `cfg` describes, train, evaluate, and (with train.out_dir) export the result."""
    ctx = ctx or init_distributed()
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if ctx.is_main and not quiet else (lambda *a: None)
    if cfg.train.out_dir and ctx.is_main:
        check_writable(Path(cfg.train.out_dir))
    tokenizer = build_tokenizer(cfg.data)
    data = build_data(cfg.data, tokenizer)
    set_seed(cfg.train.seed)  # before the model and its adapters are initialised, so their init is seeded
    model = build_model(cfg.model, tokenizer.n_words, cfg.data.seq_len)
    total = count_parameters(model)  # the base model's size: the denominator of "% trainable" for every method
    model = apply_method(model, cfg.method)
    trainable = sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
    say(f"model: {total:,} base parameters, {trainable:,} trainable ({100 * trainable / total:.3f}% of the base), "
        f"method {cfg.method['name']}; data: {len(data.rows)} rows of ≤ {cfg.data.seq_len} tokens")

    evaluators = []
    if data.sft and cfg.eval.n_generate > 0:
        examples = data.eval_examples[:cfg.eval.n_generate]

        def exact_match(m):
            acc, _ = exact_match_accuracy(m, tokenizer, examples, cfg.eval.max_new_tokens)
            return {"exact_match": acc}
        evaluators.append(exact_match)
    meta = {"model": model.args.to_dict(), "method": cfg.method, "data": dataclasses.asdict(cfg.data),
            "world_size": ctx.world_size}
    result = train(model, data.rows, cfg.train, pad_id=tokenizer.pad_id, length=data.length,
                   eval_rows=data.eval_rows, evaluators=evaluators, callbacks=callbacks, meta=meta, ctx=ctx)
    if cfg.train.out_dir:
        export(model, cfg, tokenizer, ctx)
    return RunOutput(cfg, result, model, tokenizer, data, trainable, total)


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
    atomic_write_bytes(final / "run.json", json.dumps(cfg.to_dict(), indent=1).encode())
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
    ctx.barrier()
    return final


def load_run(run_dir: str | os.PathLike, merge: bool = False, device: str = "cpu"):
    """(model, tokenizer, config) of a finished run: base + adapter attached (or merged, where the method can)."""
    final = Path(run_dir) / "final"
    if not (final / "run.json").is_file():
        raise FileNotFoundError(f"{final / 'run.json'} not found; pass the train.out_dir of a finished run")
    raw = json.loads((final / "run.json").read_text())
    cfg = build_config(raw)
    tokenizer = llama.Tokenizer(final / "tokenizer.model")
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
