"""What the kernel test files share: devices, dtypes, the per-dtype tolerance table, output poisoning.

Kernels run in Triton's interpreter on CPU tensors and compiled on CUDA (those cases skip without a GPU).
"""

import pytest
import torch

GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEVICES = ["cpu", pytest.param("cuda", marks=GPU)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Every dtype in the interpreter; on a GPU bfloat16 (the training dtype) and float32 (the IEEE-dot path): each
# (dtype, shape) is a separate compilation there, and the GPU check has a few minutes.
DEVICE_DTYPES = [("cpu", d) for d in DTYPES] + [pytest.param("cuda", d, marks=GPU)
                                                for d in (torch.bfloat16, torch.float32)]

# Tolerance table: max |kernel - reference| <= TOL[dtype] * max |reference|, where the reference is computed in
# float64 from the same (already rounded) inputs. Roughly 10x the rounding error of one output in that dtype at
# these sizes (K <= 300): float32 2^-24, float16 2^-11, bfloat16 2^-8 (+ accumulation over K).
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every kernel output is NaN-filled before its launch (KERNELS_POISON), so unwritten elements show."""
    monkeypatch.setenv("KERNELS_POISON", "1")
    monkeypatch.delenv("KERNELS_BACKEND", raising=False)


def assert_close(actual, expected, dtype, what=""):
    assert actual.shape == expected.shape, what
    assert not torch.isnan(actual).any(), f"{what}: NaN left in the output (an element was never written)"
    err = (actual.double() - expected.double()).abs().max().item()
    scale = max(expected.double().abs().max().item(), 1e-30)
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} > {TOL[dtype]} * {scale:.3g}"
