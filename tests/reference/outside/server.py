"""The reference process: runs functions of the reference-side modules on request, far from this repository.

Started by `tests/reference/isolation.py` as `python -I server.py <config.json>` (-I: no PYTHONPATH, no user site,
not even the script's own folder on sys.path). Before anything else it drops the meta-path finder that an editable
install of this project (`pip install -e .`) adds, which maps `llama`, `peft` and `kernels` to the checkout; so
`import kernels` and `import peft` find Hugging Face's packages (or nothing). After every call it checks that no
module was imported from the checkout.

Protocol: one JSON line per request on stdin, {"call": "module.function", "work": folder}; arguments in
work/args.{json,safetensors}, the result written to work/result.*; one JSON line per answer on the original stdout
(everything the libraries print goes to stderr, which the test side sends to a log file).
"""

import importlib
import json
import os
import sys
import traceback
from pathlib import Path

config = json.loads(Path(sys.argv[1]).read_text())
repo = Path(config["repo"]).resolve()
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
sys.path_importer_cache.clear()
sys.path[:0] = config["path"]  # the reference-side modules (a copy outside the checkout), then extra folders

answers = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)  # print() of the reference libraries must not corrupt the protocol

import wire  # noqa: E402  (after the path set-up above)


# This repository's code: its packages and test folders (a virtual environment inside the checkout, as `.venv/` is,
# holds the reference libraries themselves and does not count).
PROJECT = [repo / folder for folder in ("llama", "peft", "kernels", "scripts", "tests")]


def from_checkout() -> list[str]:
    """Modules imported from this repository's code (must stay empty)."""
    found = []
    for name, module in list(sys.modules.items()):
        origin = getattr(module, "__file__", None)
        if origin and any(Path(origin).resolve().is_relative_to(folder) for folder in PROJECT):
            found.append(f"{name} ({origin})")
    return found


for line in sys.stdin:
    request = json.loads(line)
    work = Path(request["work"])
    try:
        module_name, function_name = request["call"].rsplit(".", 1)
        function = getattr(importlib.import_module(module_name), function_name)
        args, kwargs = wire.load(work, "args")
        result = function(*args, **kwargs)
        shadowed = from_checkout()
        if shadowed:
            raise ImportError(f"the reference imported this repository's code: {shadowed[:3]}")
        wire.dump(result, work, "result")
        answers.write(json.dumps({"ok": True}) + "\n")
    except BaseException:  # noqa: BLE001  reported to the test side, which raises it there
        answers.write(json.dumps({"ok": False, "error": traceback.format_exc()}) + "\n")
