"""What the kernel test files share: devices and modes, dtypes, the tolerance rule, output poisoning.

Kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set by tests/conftest.py on a machine
without a GPU) or compiled on CUDA tensors (TRITON_INTERPRET=0, the default on a GPU machine); one mode per process.
Cases that need the other mode are skipped with the reason.
"""

import pytest
import torch

from kernels._triton import INTERPRETED

INTERPRETER = pytest.mark.skipif(not INTERPRETED, reason="kernels are compiled in this process (TRITON_INTERPRET=0); "
                                 "CPU cases run in Triton's interpreter: run with TRITON_INTERPRET=1")
GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
       pytest.mark.skipif(INTERPRETED, reason="kernels are interpreted in this process (TRITON_INTERPRET=1); "
                          "compiled CUDA cases need TRITON_INTERPRET=0")]
DEVICES = [pytest.param("cpu", marks=INTERPRETER), pytest.param("cuda", marks=GPU)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Every dtype in the interpreter; on a GPU bfloat16 (the training dtype) and float32 (the IEEE-dot path): each
# (dtype, shape) is a separate compilation there, and the GPU check has a few minutes.
DEVICE_DTYPES = ([pytest.param("cpu", d, marks=INTERPRETER) for d in DTYPES]
                 + [pytest.param("cuda", d, marks=GPU) for d in (torch.bfloat16, torch.float32)])


def tolerance(dtype: torch.dtype, k: int) -> float:
    """Allowed max |kernel - reference| / max |reference| for an output computed in `dtype` from k-term sums.

    The reference is float64 on the same (already rounded) inputs. The kernel result is rounded to `dtype` once,
    and one intermediate is rounded to it on the way (S = x Aᵀ before the LoRA term, dS before dA = dSᵀ x): two
    roundings of at most eps/2 relative each, counted with a factor 2 of headroom: 2·eps. Products are summed in
    float32: the worst-case rounding error of a k-term sum is about k·u32 = k·eps32/2, counted as k·eps32. k counts
    every sum on the way to the output, e.g. dA = dSᵀ x with dS = s·dY B sums N then M terms: k = N + M.
    """
    return 2 * torch.finfo(dtype).eps + k * torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every kernel output is NaN-filled before its launch (KERNELS_POISON), so unwritten elements show."""
    monkeypatch.setenv("KERNELS_POISON", "1")
    monkeypatch.delenv("KERNELS_BACKEND", raising=False)


def assert_close(actual, expected, dtype, k: int, what=""):
    """max |actual - expected| <= tolerance(dtype, k) * max |expected|, and no NaN left from the poisoning."""
    assert actual.shape == expected.shape, what
    assert not torch.isnan(actual).any(), f"{what}: NaN left in the output (an element was never written)"
    err = (actual.double() - expected.double()).abs().max().item()
    scale = max(expected.double().abs().max().item(), 1e-30)
    tol = tolerance(dtype, k)
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.3g} * {scale:.3g} ({dtype}, {k} terms)"


def dequantize_with_kernel(q, dtype=None):
    """`nf4_dequantize_triton` for a CPU NF4Weight: in the interpreter, or compiled on a CUDA copy (result back on
    the CPU) when this process compiles."""
    from kernels.nf4_dequant import nf4_dequantize_triton

    if INTERPRETED:
        return nf4_dequantize_triton(q, dtype)
    if not torch.cuda.is_available():
        pytest.skip("kernels are compiled in this process and there is no CUDA device")
    return nf4_dequantize_triton(q.to("cuda"), dtype).cpu()
