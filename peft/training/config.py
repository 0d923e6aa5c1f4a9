"""A run's configuration: five sections read from TOML, overridden from the command line, checked, written back.

    [model]   preset, optional checkpoint folder (llama.load) and shape overrides
    [data]    source = "task" | "jsonl" (SFT) or "corpus" | "text" (pre-training), sequence length, tokenizer
    [method]  name = "full" | "lora" | "qlora" | "adapter_v1" | "adapter_v2" | "excitor"; every other key is passed
              to that method's config class (peft.LoraConfig, …) and checked against its fields
    [train]   peft.training.TrainConfig
    [eval]    exact-match generation settings

`load_config(file, overrides)` reads a TOML file (or the JSON of an older run record), applies overrides written
`--section.key=value` or `--section.key value`, and checks every value before anything runs: unknown sections and
keys name the closest valid key, and a value of the wrong type names its field (`train.lr must be a number, got
the string '1e-3'`). `to_toml(cfg)` writes the resolved config back as TOML that `load_config` reads again, so a
run folder's `config.toml` reproduces the run.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..adapter_v1 import AdapterV1Config
from ..adapter_v2 import AdapterV2Config
from ..excitor import ExcitorConfig
from ..lora import LoraConfig
from .loop import TrainConfig

METHODS = ("full", "lora", "qlora", "adapter_v1", "adapter_v2", "excitor")
METHOD_CONFIGS = {"lora": LoraConfig, "qlora": LoraConfig, "adapter_v1": AdapterV1Config,
                  "adapter_v2": AdapterV2Config, "excitor": ExcitorConfig}
SFT_SOURCES, PRETRAIN_SOURCES = ("task", "jsonl"), ("corpus", "text")
BYTE_TOKENIZER = "bytes"  # data.tokenizer value that selects peft.training.data.ByteTokenizer


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
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"

    def __post_init__(self):
        for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_seq_len"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ValueError(f"model.{key} must be a positive integer, got {value}")
        self.device = check_device(self.device, "model.device")


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
    tokenizer: Optional[str] = None  # a tokenizer.model file, "bytes" (UTF-8 bytes, 256 ids: the tiny presets'
    #                                  vocabulary), or None: the built-in BPE trained on the stdlib corpus
    vocab_size: int = 1024  # size of the built-in BPE
    corpus_chars: int = 4_000_000  # source="corpus": characters of stdlib docstrings to use
    cache_dir: Optional[str] = None  # default $LLAMA_PEFT_CACHE or ~/.cache/llama-peft-zoo

    def __post_init__(self):
        if self.source not in SFT_SOURCES + PRETRAIN_SOURCES:
            raise _unknown("data.source", self.source, SFT_SOURCES + PRETRAIN_SOURCES)
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"data.eval_fraction must lie strictly between 0 and 1, got {self.eval_fraction}")
        for key in ("n_train", "n_eval", "seq_len", "vocab_size", "corpus_chars"):
            if getattr(self, key) <= 0:
                raise ValueError(f"data.{key} must be a positive integer, got {getattr(self, key)}")


@dataclass
class EvalSection:
    n_generate: int = 200  # SFT: held-out examples scored by exact match after greedy generation (0: skip)
    max_new_tokens: int = 16

    def __post_init__(self):
        if self.n_generate < 0:
            raise ValueError(f"eval.n_generate must be >= 0 (0 skips exact match), got {self.n_generate}")
        if self.max_new_tokens <= 0:
            raise ValueError(f"eval.max_new_tokens must be a positive integer, got {self.max_new_tokens}")


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


SECTIONS = {"model": ModelSection, "data": DataSection, "method": None, "train": TrainConfig, "eval": EvalSection}


# =====================================================================================================================
# Values: devices, TOML literals from the command line, and type checks that name the field
# =====================================================================================================================

def check_device(value: str, what: str) -> str:
    """A torch device string ("cpu", "cuda", "cuda:1"); the spellings users type for a GPU are named."""
    if isinstance(value, torch.device):
        return str(value)
    if value in ("gpu", "GPU", "nvidia"):
        raise ValueError(f"{what}={value!r} is not a torch device name; use 'cuda' (or 'cuda:0') for a GPU")
    try:
        torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"{what}={value!r} is not a torch device; use 'cpu', 'cuda' or 'cuda:N'") from None
    return value


class CommandLineText(str):
    """A value typed on the command line, not yet interpreted: a string field takes it as written, any other field
    reads it as a TOML literal (so `--data.path 2024` stays the path "2024" and `--train.lr 1e-3` is a float)."""


def parse_value(text: str) -> Any:
    """A TOML literal (1e-3, true, "x", [1, 2]) when it parses as one, else the raw string (paths, names)."""
    try:
        return _toml().loads(f"v = {text}")["v"]
    except Exception:
        return str(text)


def _toml():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib


def _scalar_type(annotation) -> Optional[type]:
    """int, float, bool or str for `x`, `Optional[x]`; None for anything else (lists, dicts: the class checks)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union and len(args) == 1:
        annotation = args[0]
    return annotation if annotation in (int, float, bool, str) else None


def _coerce(value: Any, kind: Optional[type], what: str) -> Any:
    """Check `value` against the field type `kind`, naming the field `what` when it does not fit."""
    if isinstance(value, CommandLineText):
        value = str(value) if kind is str else parse_value(value)
    if kind is None or value is None:
        return value
    quoted = f"the string {value!r}" if isinstance(value, str) else repr(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{what} must be true or false, got {quoted}")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            hint = "; write it without quotes" if isinstance(value, str) and _is_number(value) else ""
            raise ValueError(f"{what} must be an integer, got {quoted}{hint}")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint = "; write it without quotes" if isinstance(value, str) and _is_number(value) else ""
            raise ValueError(f"{what} must be a number, got {quoted}{hint}")
        if not math.isfinite(value):
            raise ValueError(f"{what} must be a finite number, got {value}")
        value = float(value)
    elif kind is str and not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {value!r}; put it in quotes")
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _unknown(kind: str, key: str, valid: Sequence[str]) -> ValueError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown {kind} {key!r}{hint} (valid: {', '.join(sorted(valid))})")


def _checked(cls, values: dict, section: str) -> dict:
    """`values` with every key known to dataclass `cls` and every scalar of the type its field declares."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    out = {}
    for key, value in values.items():
        if key not in names:
            raise _unknown(f"config key in [{section}]", key, names)
        out[key] = _coerce(value, _scalar_type(hints[key]), f"{section}.{key}")
    return out


def _section(cls, values: dict, name: str):
    try:
        return cls(**_checked(cls, values, name))
    except TypeError as err:
        raise ValueError(f"[{name}]: {err}") from None


def method_options(method: dict) -> dict:
    """`method` ({"name": ..., **options}) with its name known and every option a checked field of its config."""
    name = _coerce(method.get("name", "full"), str, "method.name")
    if name not in METHODS:
        raise _unknown("method", str(name), METHODS)
    options = {k: v for k, v in method.items() if k != "name"}
    if name == "full":
        if options:
            raise ValueError(f"method 'full' takes no options, got {sorted(options)}; remove them from [method]")
        return {"name": name}
    cls = METHOD_CONFIGS[name]
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in options:
        if key not in valid:
            raise _unknown(f"option of method {name!r}", key, valid)
    options = _checked(cls, options, "method")
    if name == "qlora" and options.get("quantize_base") is False:
        raise ValueError("method 'qlora' is LoRA on an NF4 base; drop quantize_base=false or use method 'lora'")
    return {"name": name, **options}


def method_config(method: dict):
    """The PEFT config object for `method` ({"name": ..., **options}); None for full fine-tuning."""
    options = method_options(method)
    name = options.pop("name")
    if name == "full":
        return None
    if name == "qlora":
        options["quantize_base"] = True
    return METHOD_CONFIGS[name](**options)


# =====================================================================================================================
# Reading: a TOML (or JSON) file plus command-line overrides
# =====================================================================================================================

def build_config(raw: dict) -> RunConfig:
    """RunConfig from a nested dict (a parsed TOML file with overrides applied), every value checked."""
    for key, value in raw.items():
        if key not in SECTIONS:
            raise _unknown("config section", key, list(SECTIONS))
        if not isinstance(value, dict):
            raise ValueError(f"config section [{key}] must be a table of key = value pairs, got {value!r}")
    method = method_options(dict(raw.get("method", {})))
    method_config(method)  # builds the method's config class now: its own checks run before any work
    return RunConfig(model=_section(ModelSection, raw.get("model", {}), "model"),
                     data=_section(DataSection, raw.get("data", {}), "data"), method=method,
                     train=_section(TrainConfig, raw.get("train", {}), "train"),
                     eval=_section(EvalSection, raw.get("eval", {}), "eval"))


def read_file(path: str | Path) -> dict:
    """The sections of a TOML config file, or of a JSON run record (`null` values dropped: the default)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} does not exist; see configs/ for examples")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"config file {p} is not valid JSON: {err}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"config file {p} must hold an object of sections, got {type(raw).__name__}")
        return {s: {k: v for k, v in values.items() if v is not None} if isinstance(values, dict) else values
                for s, values in raw.items()}
    try:
        return _toml().loads(text)
    except Exception as err:
        raise ValueError(f"config file {p} is not valid TOML: {err}") from None


def parse_overrides(items: Sequence[str]) -> list[tuple[str, str, CommandLineText]]:
    """`--section.key=value` and `--section.key value` as (section, key, text)."""
    out, i = [], 0
    while i < len(items):
        item = items[i]
        body = item[2:] if item.startswith("--") else item
        key, sep, value = body.partition("=")
        if not item.startswith("--") or "." not in key:
            raise ValueError(f"unexpected argument {item!r}: overrides look like --section.key=value or "
                             f"--section.key value (e.g. --train.lr 3e-4)")
        if not sep:
            if i + 1 == len(items) or (items[i + 1].startswith("--") and not _is_number(items[i + 1])):
                raise ValueError(f"{item} needs a value: --section.key=value or --section.key value")
            value, i = items[i + 1], i + 1
        section, name = key.split(".", 1)
        out.append((section, name, CommandLineText(value)))
        i += 1
    return out


def load_config(path: Optional[str | Path], overrides: Sequence[str] = ()) -> RunConfig:
    """Read a config file (or start from the defaults) and apply command-line overrides."""
    raw: dict = read_file(path) if path else {}
    for section, name, value in parse_overrides(overrides):
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ValueError(f"override --{section}.{name}: [{section}] is not a section")
        raw[section][name] = value
    return build_config(raw)


# =====================================================================================================================
# Writing: the resolved config as TOML, and what differs between two configs
# =====================================================================================================================

def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if value != value else ("inf" if value > 0 else "-inf"))
    if isinstance(value, (int, str)):
        return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} ({type(value).__name__}) as a TOML value")


def to_toml(cfg: RunConfig, drop: Sequence[str] = ()) -> str:
    """The resolved config as TOML (what `load_config` reads back to the same RunConfig).

    TOML has no null: a key whose value is None (unset, the default) is written as a comment. `drop` lists
    "section.key" names to leave out (a run folder's config.toml drops train.out_dir: the folder is the file's).
    """
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if f"{section}.{key}" in drop:
                continue
            lines.append(f"# {key} (unset)" if value is None else f"{key} = {_toml_value(value)}")
        lines.append("")
    text = "\n".join(lines)
    _toml().loads(text)  # never write what cannot be read back
    return text




def differences(before: dict, after: dict, ignore: Sequence[str] = ()) -> dict[str, tuple[Any, Any]]:
    """{"section.key": (before, after)} for every key whose value differs (None and absent are the same)."""
    out = {}
    for section in sorted(set(before) | set(after)):
        a, b = before.get(section) or {}, after.get(section) or {}
        for key in sorted(set(a) | set(b)):
            name = f"{section}.{key}"
            va, vb = a.get(key), b.get(key)
            va, vb = (list(v) if isinstance(v, tuple) else v for v in (va, vb))
            if name not in ignore and va != vb:
                out[name] = (va, vb)
    return out
