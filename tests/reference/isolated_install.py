"""Packages that must not enter the project's environment, installed into a folder of their own for one test.

Hugging Face `peft` would be shadowed by (and shadow) our top-level `peft`; PyPI's Linux `torchvision` is a CUDA
build that breaks transformers' imports next to the CPU torch wheel. Tests that need them run them in a subprocess
whose import path puts the folder first.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest


def install_target(pins: tuple[str, ...], *, env_var: str, default_name: str, check: str) -> Path:
    """The folder named by $`env_var` (else a fixed temp folder) holding `pins` (`pip install --target --no-deps`);
    installs them once, when `check` (a path inside the folder) is missing. Skips the test if pip cannot."""
    folder = Path(os.environ.get(env_var) or Path(tempfile.gettempdir()) / default_name)
    if not (folder / check).exists():
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(folder), "--no-deps", *pins]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as err:
            pytest.skip(f"could not run pip to install {', '.join(pins)} into {folder}: {err}")
        if done.returncode != 0:
            pytest.skip(f"pip could not install {', '.join(pins)} into {folder} (offline?): "
                        f"{done.stderr.strip().splitlines()[-1:]}")
    return folder


HF_PEFT_PINS = ("peft==0.21.2", "accelerate==1.15.0")  # the versions the HF PEFT tests were written against


def hf_peft_folder() -> Path:
    """The folder holding HF `peft` (and `accelerate`) for the reference process ($HF_PEFT_DIR, else a temp folder)."""
    return install_target(HF_PEFT_PINS, env_var="HF_PEFT_DIR", default_name="llama-peft-zoo-hf-peft",
                          check="peft/tuners")
