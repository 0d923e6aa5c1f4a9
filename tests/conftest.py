"""Test-session setup: compiled or interpreted Triton kernels, decided before anything imports triton.

Triton reads TRITON_INTERPRET when `@triton.jit` runs, and its own library functions are jit functions too, so the
variable must be set before the first `import triton` (kernels/_triton.py refuses a process where it changed
later). pytest imports this file before any test module, so it is set here: Triton's interpreter on CPU tensors
when the machine has no CUDA device (CI), compiled kernels when it has one. An explicit TRITON_INTERPRET wins:
`TRITON_INTERPRET=1 pytest` runs the interpreter cases on a GPU machine too, `TRITON_INTERPRET=0 pytest -m gpu`
the compiled ones. Cases that need the other mode are skipped with the reason (tests/kernel_testing.py), and
tests/test_kernels_compile_sm90.py compiles in a child process of its own when this one interprets.
"""

import os
import sys

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
