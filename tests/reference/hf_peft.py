"""Hugging Face PEFT, kept out of this project's environment and driven from a subprocess.

Our top-level `peft` package shadows Hugging Face's, so HF PEFT is installed outside the project's site-packages
(tests/reference/isolated_install.py) and run in a subprocess whose import path puts that folder first and whose
working directory is not the repository, so neither our `peft` nor our `kernels` can be imported there.

    folder = hf_peft_folder()                                  # pytest.skip when pip cannot install it (offline)
    done = run_isolated(script_text, [arg, ...], folder, work) # the script sees HF peft + transformers, not this repo
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.reference.isolated_install import install_target

HF_PEFT_PINS = ("peft==0.21.2", "accelerate==1.15.0")  # the versions the tests were written against


def hf_peft_folder() -> Path:
    """A folder holding HF `peft` (and `accelerate`), never the project's own environment ($HF_PEFT_DIR or a fixed
    temporary folder; installed once, the test skipped when pip cannot)."""
    return install_target(HF_PEFT_PINS, env_var="HF_PEFT_DIR", default_name="llama-peft-zoo-hf-peft",
                          check="peft/tuners")


def run_isolated(script: str, args: list[str], hf_peft_dir: Path, work: Path,
                 timeout: int = 900) -> subprocess.CompletedProcess:
    """Write `script` into `work` and run it there with HF peft first on the path and this repository off it."""
    path = Path(work) / "run_hf.py"
    path.write_text(script)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(hf_peft_dir)
    return subprocess.run([sys.executable, str(path), *map(str, args)], cwd=work, env=env, capture_output=True,
                          text=True, timeout=timeout)
