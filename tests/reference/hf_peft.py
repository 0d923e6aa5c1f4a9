"""Hugging Face PEFT, kept out of this project's environment and driven from a subprocess.

Our top-level `peft` package shadows Hugging Face's, so HF PEFT is installed outside the project's site-packages
(`pip install --target <dir> --no-deps peft accelerate`, or the folder named by $HF_PEFT_DIR) and run in a
subprocess whose import path puts that folder first and whose working directory is not the repository, so neither
our `peft` nor our `kernels` can be imported there.

    folder = hf_peft_folder()                                  # pytest.skip when pip cannot install it (offline)
    done = run_isolated(script_text, [arg, ...], folder, work) # the script sees HF peft + transformers, not this repo
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

HF_PEFT_PINS = ("peft==0.21.2", "accelerate==1.15.0")  # the versions the tests were written against


def hf_peft_folder() -> Path:
    """A folder holding HF `peft` (and `accelerate`), never the project's own environment."""
    folder = Path(os.environ.get("HF_PEFT_DIR") or Path(tempfile.gettempdir()) / "llama-peft-zoo-hf-peft")
    if not (folder / "peft" / "tuners").is_dir():
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(folder), "--no-deps",
               *HF_PEFT_PINS]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as err:
            pytest.skip(f"could not run pip to install Hugging Face peft into {folder}: {err}")
        if done.returncode != 0:
            pytest.skip(f"pip could not install Hugging Face peft into {folder} (offline?): "
                        f"{done.stderr.strip().splitlines()[-1:]}")
    return folder


def run_isolated(script: str, args: list[str], hf_peft_dir: Path, work: Path,
                 timeout: int = 900) -> subprocess.CompletedProcess:
    """Write `script` into `work` and run it there with HF peft first on the path and this repository off it."""
    path = Path(work) / "run_hf.py"
    path.write_text(script)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(hf_peft_dir)
    return subprocess.run([sys.executable, str(path), *map(str, args)], cwd=work, env=env, capture_output=True,
                          text=True, timeout=timeout)
