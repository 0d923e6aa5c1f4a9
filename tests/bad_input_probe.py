"""The machinery of the bad-input probe: the workspace a case runs in, and the classification of what it did.

A case (`Case`, catalogued in `tests/bad_inputs.py`) makes one bad call to a public entry point and names the error
it must raise and the words its message must contain (the field or file at fault, and the fix). Outcomes:
"clear" (that exception type, every word in the message, nothing changed), "cryptic" (another exception, or a
message without the words), "accepted" (no exception at all), "changed" (refused, but a watched file, folder or model
was modified first).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import tokenizers
import torch
from safetensors.torch import load_file, save_file

import llama
import peft
from llama.formats.convert import cli as convert_cli
from tests.reference.hf import GENERATIONS, save_hf_model
from tests.tokenizer_files import hand_written_ranks, train_sentencepiece, write_ranks

ARGS = GENERATIONS["llama-2-gqa"]  # dim 64, 2 layers, 4 heads, 2 KV heads, vocab 256
TINY = dict(dim=64, n_layers=2, n_heads=4, vocab_size=256, multiple_of=32, max_seq_len=128)


@dataclass(frozen=True)
class Case:
    area: str
    name: str
    run: Callable[["Workspace"], object]  # makes the bad call
    error: type  # the exception type it must raise (a subclass passes)
    words: tuple[str, ...]  # substrings the message must contain


# Helpers the catalogues use to damage files

NAN, INF = float("nan"), float("inf")
REMOVE = object()  # edit_json: delete the key


def adder(cases: list[Case]) -> Callable[..., None]:
    """add(area, name, run, error, *words): one more case in `cases`."""
    def add(area: str, name: str, run: Callable[[Workspace], object], error: type, *words: str) -> None:
        cases.append(Case(area, name, run, error, words))
    return add


def edit_json(path: Path, changes: dict) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is REMOVE:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))  # NaN and Infinity are written as Python's json writes them


def edit_tensors(path: Path, edit) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(os.urandom(1000) if how == "garbage" else data[: len(data) // 2])



class CommandLineError(Exception):
    """A command line that exited with a non-zero status; the message is 'exit N: <stderr>'."""


class Pristine:
    """Checkpoint, adapter and tokenizer files built once per process, copied into each case's workspace."""

    def __init__(self, root: Path):
        self.root = root

    def get(self, kind: str) -> Path:
        path = self.root / kind
        if not path.exists():  # built beside, then renamed: a failed build leaves nothing half-made
            building = self.root / f".{kind}.building"
            shutil.rmtree(building, ignore_errors=True)
            getattr(self, "_" + kind.replace("-", "_"))(building)
            building.rename(path)
        return path

    def _hf(self, path):  # written by transformers' save_pretrained (in the reference process)
        save_hf_model(ARGS, path)

    def _hf_sharded(self, path):
        save_hf_model(ARGS, path, max_shard_size="100KB")

    def _meta(self, path):
        llama.save(model(), path, format="meta", num_shards=2)

    def _meta_single(self, path):
        llama.save(model(), path, format="meta")

    def _adapter(self, path):
        peft.save_adapter(lora_model(), path)

    def _sp(self, path):
        path.mkdir()
        train_sentencepiece(path / "tokenizer.model")

    def _bpe(self, path):
        path.mkdir()
        write_ranks(path / "tokenizer.model", hand_written_ranks())

    def _hub(self, path):  # a small tokenizer.json written by the tokenizers library itself
        path.mkdir()
        vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4}
        tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
        tok.add_special_tokens(["<s>", "</s>"])
        tok.save(str(path / "tokenizer.json"))


def model(seed: int = 0) -> llama.Transformer:
    torch.manual_seed(seed)
    return llama.Transformer(ARGS)


def lora_model() -> llama.Transformer:
    m = peft.apply(model(), peft.LoraConfig(r=2, target_modules=("wq", "wv")))
    with torch.no_grad():
        for p in peft.adapter_parameters(m).values():
            p.normal_()
    return m


class Workspace:
    """What one case may touch: a fresh folder, copies of pristine files, and watches on what must not change."""

    def __init__(self, pristine: Pristine, tmp: Path):
        self.pristine, self.tmp = pristine, tmp
        self._watched: list[tuple[str, object, Callable[[], object]]] = []

    def copy(self, kind: str, name: Optional[str] = None) -> Path:
        dst = self.tmp / (name or kind)
        shutil.copytree(self.pristine.get(kind), dst)
        return dst

    def watch_folder(self, folder: Path) -> Path:
        """Record a folder (or its absence); `changes()` reports if the call modified it."""
        self._watched.append((str(folder), _folder_digest(folder), lambda: _folder_digest(folder)))
        return folder

    def watch_model(self, m: torch.nn.Module) -> torch.nn.Module:
        self._watched.append(("the model", _model_digest(m), lambda: _model_digest(m)))
        return m

    def changes(self) -> list[str]:
        return [what for what, before, now in self._watched if now() != before]


def _folder_digest(folder: Path):
    if not folder.exists():
        return None
    return sorted((str(p.relative_to(folder.parent)), hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "")
                  for p in [folder, *folder.rglob("*")] if p != folder)


def _model_digest(m: torch.nn.Module):
    return ([(name, type(module).__name__) for name, module in m.named_modules()],
            [(name, p.requires_grad, hashlib.sha1(p.detach().cpu().contiguous().view(torch.uint8).numpy()).hexdigest())
             for name, p in m.named_parameters()],
            repr(getattr(m, "peft_state", None)))


def run_cli(main: Callable, argv: list[str]) -> None:
    """Run a command line in-process; raise CommandLineError('exit N: stderr') if it exits non-zero."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit as e:
            if e.code not in (0, None):
                raise CommandLineError(f"exit {e.code}: {err.getvalue().strip().splitlines()[-1]}") from None


def convert(*argv: str) -> None:
    run_cli(convert_cli, list(argv))


def classify(case: Case, workspace: Workspace) -> tuple[str, str]:
    """(outcome, detail): outcome is clear, cryptic, accepted or changed (see the module docstring)."""
    try:
        case.run(workspace)
    except Exception as e:  # noqa: BLE001  classifying what the entry point raised is the point
        message = str(e)
        changed = workspace.changes()
        if changed:
            return "changed", f"{type(e).__name__}: {message} — but modified {changed}"
        if isinstance(e, case.error) and all(word in message for word in case.words):
            return "clear", message
        missing = [w for w in case.words if w not in message]
        return "cryptic", f"{type(e).__name__}: {message} (expected {case.error.__name__} with {missing})"
    return "accepted", "no exception"


def probe(cases: list[Case], json_path: Optional[str] = None) -> dict:
    """Run every case; print a table of outcomes per area and the cases that are not clear."""
    with tempfile.TemporaryDirectory() as root:
        pristine = Pristine(Path(root) / "pristine")
        pristine.root.mkdir()
        results = []
        for i, case in enumerate(cases):
            tmp = Path(root) / f"case-{i}"
            tmp.mkdir()
            outcome, detail = classify(case, Workspace(pristine, tmp))
            results.append({"area": case.area, "case": case.name, "outcome": outcome, "detail": detail})
    outcomes = ("clear", "cryptic", "accepted", "changed")
    areas = list(dict.fromkeys(r["area"] for r in results))
    counts = {area: Counter(r["outcome"] for r in results if r["area"] == area) for area in areas}
    print(f"{'area':<28}{'cases':>7}" + "".join(f"{o:>10}" for o in outcomes))
    for area in areas + ["total"]:
        c = counts[area] if area != "total" else Counter(r["outcome"] for r in results)
        print(f"{area:<28}{sum(c.values()):>7}" + "".join(f"{c[o]:>10}" for o in outcomes))
    for r in results:
        if r["outcome"] != "clear":
            print(f"  {r['outcome']:<9} {r['area']}: {r['case']}: {r['detail'][:300]}")
    summary = {"counts": {a: dict(counts[a]) for a in areas}, "cases": results}
    if json_path:
        Path(json_path).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
