"""Run reference code (transformers, bitsandbytes, Hugging Face peft) where this repository cannot shadow it.

Our top-level packages `kernels` and `peft` have the names of Hugging Face packages: transformers >= 5.25 imports
HF's `kernels`, and HF's `peft` is the LoRA reference. In the test process our packages come first on the path, so
no reference library may be imported there. Instead every reference runs in one long-lived subprocess per set of
extra folders: `python -I` (no PYTHONPATH, no script folder) with the editable-install finder of this project
removed, the reference-side modules of `tests/reference/outside/` copied to a temporary folder, and a check after
each call that nothing was imported from this checkout. Arguments and results travel through files
(tensors as safetensors, the rest as JSON: `outside/wire.py`).

    ref = reference()                                          # started once per test session
    logits = ref.call("hf_llama.logits", folder, tokens, dtype=torch.float64)
    ref = reference(path=[hf_peft_dir])                        # a second process, HF peft first on its path

The modules in `outside/` are the only code that imports transformers, bitsandbytes or HF peft.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from tests.reference.outside import wire

OUTSIDE = Path(__file__).with_name("outside")
REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 900  # one call: building and running a tiny model takes seconds; pip-free, download-free


class ReferenceError(RuntimeError):
    """The reference process failed; the message holds its traceback and the end of its log."""


class ReferenceProcess:
    """One reference subprocess; `call("module.function", *args, **kwargs)` runs a function of outside/."""

    def __init__(self, path: Sequence[Path] = ()):
        self.root = Path(tempfile.mkdtemp(prefix="llama-peft-zoo-reference-"))
        lib = self.root / "lib"
        shutil.copytree(OUTSIDE, lib, ignore=shutil.ignore_patterns("__pycache__", "__init__.py"))
        config = {"repo": str(REPO), "path": [str(lib), *map(str, path)]}
        (self.root / "config.json").write_text(json.dumps(config))
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   TRANSFORMERS_VERBOSITY="error")
        self.log = open(self.root / "reference.log", "w")  # noqa: SIM115  closed in close()
        self.process = subprocess.Popen([sys.executable, "-I", str(lib / "server.py"), str(self.root / "config.json")],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                        cwd=self.root, env=env, text=True)
        self.calls = 0

    def call(self, function: str, *args, **kwargs):
        self.calls += 1
        work = self.root / f"call-{self.calls}"
        work.mkdir()
        wire.dump([list(args), kwargs], work, "args")
        self.process.stdin.write(json.dumps({"call": function, "work": str(work)}) + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], TIMEOUT_S)
        answer = self.process.stdout.readline() if ready else ""
        if not answer:
            raise ReferenceError(f"the reference process gave no answer to {function} (exit status "
                                 f"{self.process.poll()}); its log ends with:\n{self._log_tail()}")
        answer = json.loads(answer)
        if not answer["ok"]:
            raise ReferenceError(f"{function} failed in the reference process:\n{answer['error']}")
        result = wire.load(work, "result")
        shutil.rmtree(work, ignore_errors=True)
        return result

    def _log_tail(self, n: int = 4000) -> str:
        self.log.flush()
        return (self.root / "reference.log").read_text(errors="replace")[-n:]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()
        shutil.rmtree(self.root, ignore_errors=True)


_PROCESSES: dict[tuple[str, ...], ReferenceProcess] = {}


def reference(path: Sequence[Path] = ()) -> ReferenceProcess:
    """The reference process for these extra folders, started on first use and stopped when the tests end."""
    key = tuple(str(p) for p in path)
    process = _PROCESSES.get(key)
    if process is None or process.process.poll() is not None:
        process = _PROCESSES[key] = ReferenceProcess(path)
    return process


@atexit.register
def _stop_all() -> None:
    for process in _PROCESSES.values():
        process.close()
