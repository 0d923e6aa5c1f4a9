"""One-launch NF4 dequantisation kernel (kernels.nf4_dequant) against the plain-PyTorch reference, bit for bit.

The reference is itself checked bit for bit against bitsandbytes in test_nf4_bnb_parity.py. Interpreter on CPU
(bfloat16 output rounded to nearest even by the kernel's hand-written rounding, so it is exact there too), compiled
on CUDA (skipped without a GPU). Outputs are NaN-poisoned before each launch; weights are drawn fresh. The
persistent schedule lives in kernels/schedules.py; argument checks in the public op (kernels/ops.py).
"""

import pytest
import torch

import kernels
import kernels.nf4_dequant as nf4_dequant
from kernels import nf4_quantize
from kernels.nf4_dequant import nf4_dequantize_reference, nf4_dequantize_triton
from tests.kernel_testing import DEVICES, INTERPRETER, _poison_outputs  # noqa: F401


# Odd element counts, blocks across rows, a partial last block, > 256 blocks (partial second-level block), one value.
SHAPES = [(100, 70), (33, 65), (7,), (301, 64), (1, 1), (3, 4097)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no_dq"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_is_bit_identical_to_reference(shape, out_dtype, double_quant, device):
    q = nf4_quantize(torch.randn(shape, device=device) * torch.rand(()).item() * 3, double_quant=double_quant)
    out = nf4_dequantize_triton(q, out_dtype)
    assert out.shape == torch.Size(shape) and out.dtype == out_dtype
    assert torch.equal(out, nf4_dequantize_reference(q, out_dtype))  # also: no NaN left from the poisoning


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("blocksize", [32, 128, 4096])
def test_other_blocksizes(blocksize, device):
    q = nf4_quantize(torch.randn(9, 1000, device=device), blocksize=blocksize)
    assert torch.equal(nf4_dequantize_triton(q, torch.bfloat16), nf4_dequantize_reference(q, torch.bfloat16))


@pytest.mark.parametrize("meta", [dict(BLOCKS=16, TREE=True, PER_SM=0), dict(BLOCKS=4, TREE=False, PER_SM=2)],
                         ids=["select-tree", "persistent"])
@INTERPRETER
def test_other_kernel_variants(meta, monkeypatch):
    """The autotuner may pick either lookup and either schedule on a GPU; the interpreter normally runs the gather
    lookup, one program per chunk. Persistent here: 2 programs per interpreter "SM" (6) over 26 chunks."""
    monkeypatch.setattr(nf4_dequant, "INTERPRETER_META", meta)
    q = nf4_quantize(torch.randn(50, 130))
    assert torch.equal(nf4_dequantize_triton(q, torch.float32), nf4_dequantize_reference(q, torch.float32))


@pytest.mark.parametrize("device", DEVICES)
def test_public_op_on_both_backends(device, monkeypatch):
    q = nf4_quantize(torch.randn(40, 24, device=device, dtype=torch.bfloat16))
    expected = nf4_dequantize_reference(q)
    assert expected.dtype == torch.bfloat16                       # default: the original weight's dtype
    for backend in ("triton", "reference"):
        monkeypatch.setenv("KERNELS_BACKEND", backend)
        assert torch.equal(kernels.nf4_dequantize(q), expected)
        assert torch.equal(kernels.nf4_dequantize(q, torch.float16), nf4_dequantize_reference(q, torch.float16))


@pytest.mark.parametrize("device", DEVICES)
def test_all_zero_blocks_are_exact_zeros(device):
    w = torch.randn(12, 64, device=device)
    w[3:6] = 0.0
    out = nf4_dequantize_triton(nf4_quantize(w), torch.float16)
    assert torch.equal(out[3:6], torch.zeros(3, 64, dtype=torch.float16, device=device))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_bad_output_dtype(backend, monkeypatch):
    """Checked by the public op before anything runs, on both backends; float64 only from the reference."""
    monkeypatch.setenv("KERNELS_BACKEND", backend)
    q = nf4_quantize(torch.randn(4, 64))
    with pytest.raises(TypeError, match="use one of"):
        kernels.nf4_dequantize(q, torch.int8 if backend == "triton" else torch.int32)
    if backend == "triton":
        with pytest.raises(TypeError, match="KERNELS_BACKEND=reference"):
            kernels.nf4_dequantize(q, torch.float64)
    else:
        assert torch.equal(kernels.nf4_dequantize(q, torch.float64), nf4_dequantize_reference(q).double())
