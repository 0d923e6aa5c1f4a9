"""Test-session setup: compiled or interpreted Triton kernels, decided before anything imports triton.

Triton reads TRITON_INTERPRET when `@triton.jit` runs, and its own library functions are jit functions too, so the
variable must be set before the first `import triton` (kernels/_triton.py refuses a process where it changed
later). pytest imports this file before any test module, so it is set here: Triton's interpreter on CPU tensors
when the machine has no CUDA device (CI), compiled kernels when it has one. An explicit TRITON_INTERPRET wins:
`TRITON_INTERPRET=1 pytest` runs the interpreter cases on a GPU machine too, `TRITON_INTERPRET=0 pytest -m gpu`
the compiled ones. Cases that need the other mode are skipped with the reason (tests/kernel_testing.py), and
tests/test_kernels_compile_sm90.py compiles in a child process of its own when this one interprets.

Also: scripts write only under their --out folder (docs/cli.md), so a test that runs one without --out would leave
runs/ in the checkout; the session fails if it appeared. And a script that flushes denormal floats to zero (the
ablations do, for speed) must switch IEEE behaviour back on when it returns: a test that leaves it off fails, since
every later test would run on another arithmetic.
"""

import os
import sys
from pathlib import Path

import pytest

if "TRITON_INTERPRET" not in os.environ:
    if "triton" in sys.modules:
        raise RuntimeError("triton was imported before tests/conftest.py could choose TRITON_INTERPRET; set it in "
                           "the environment (1: interpreter, 0: compiled kernels)")
    import torch

    os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"


def pytest_report_header(config):
    from kernels._triton import INTERPRETED

    mode = "interpreted" if INTERPRETED else "compiled"
    return f"Triton kernels: {mode} (TRITON_INTERPRET={os.environ['TRITON_INTERPRET']})"


@pytest.fixture(autouse=True, scope="session")
def nothing_written_into_the_checkout():
    runs = Path(__file__).resolve().parents[1] / "runs"
    existed = runs.exists()
    yield
    assert existed or not runs.exists(), f"a test wrote {runs} into the checkout: give every script an --out"


@pytest.fixture(autouse=True)
def denormals_not_left_flushed():
    yield
    import torch

    assert torch.tensor(1e-40, dtype=torch.float32).item() != 0, (
        "this test left torch.set_flush_denormal(True) on: wrap the flushing code in scripts._cli.flush_denormals()")
