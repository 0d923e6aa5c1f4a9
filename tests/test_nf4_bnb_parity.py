"""Bit-for-bit parity with bitsandbytes on CPU (the test-only oracle; skipped when it is not installed).

Both directions: a weight quantised by bitsandbytes dequantises identically in ours (reference and Triton kernel,
the latter in the interpreter), and our quantiser produces bitsandbytes' bytes, absmax codes, absmax2, offset and
code tables exactly, so bitsandbytes dequantises our state identically too. float32 / float16 / bfloat16, double
quantisation on and off, odd sizes (partial absmax blocks, blocks across rows, odd element counts, a partial
second-level block), block sizes 32 / 64 / 128.

A bitsandbytes 0.50.2 CPU quirk, found here: its native CPU dequantiser (the AVX2 path, taken when the element
count is a multiple of the block size and of 8 and the row length is even) restarts the absmax blocks at every
row. Blocks run over the FLATTENED weight in the format (its quantiser, its CUDA kernels and its own
pure-PyTorch backend all agree), so for rows that are not a multiple of the block size (e.g. [64, 96]) that path
decodes garbage. We compare against bitsandbytes' pure-PyTorch backend always, and against its public
`dequantize_4bit` wherever that follows the format (test_bnb_native_cpu_row_blocking_quirk pins the rest).
"""

import pytest
import torch

from kernels import NF4Weight, nf4_quantize
from kernels.nf4 import dynamic_code, nf4_code
from kernels.nf4_dequant import nf4_dequantize_reference
from tests.kernel_testing import dequantize_with_kernel

bnb_functional = pytest.importorskip("bitsandbytes.functional")
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# 100x71: odd count, blocks cross rows; 33x65; [7]: one partial block; 301x64: 301 blocks -> partial 2nd-level
# block; 2x4097; 64x96: even rows that are not a multiple of 64 (the native CPU quirk above).
SHAPES = [(100, 71), (33, 65), (7,), (301, 64), (2, 4097), (64, 96)]


@pytest.fixture(autouse=True)
def _eager_bitsandbytes(monkeypatch):
    # bitsandbytes wraps its pure-PyTorch dequantiser in torch.compile; compiling per odd shape costs seconds in a
    # test run and changes no value (eager and compiled compute the same float32 products).
    import torch._dynamo

    monkeypatch.setenv("KERNELS_POISON", "1")
    with torch._dynamo.config.patch(disable=True):
        yield


def bnb_quantize(w, blocksize, double_quant):
    return bnb_functional.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")


def native_cpu_quirk(shape, blocksize) -> bool:
    """Shapes on which bitsandbytes' native CPU dequantiser restarts blocks per row (module docstring)."""
    n = 1
    for d in shape:
        n *= d
    return len(shape) > 1 and shape[-1] % blocksize != 0 and shape[-1] % 2 == 0 and n % blocksize == 0 and n % 8 == 0


def bnb_dequantize(packed, state):
    """bitsandbytes' `dequantize_4bit`, or its pure-PyTorch backend on shapes hit by the native CPU quirk."""
    if not native_cpu_quirk(tuple(state.shape), state.blocksize):
        return bnb_functional.dequantize_4bit(packed, state)
    absmax = state.absmax
    if state.nested:
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    code = bnb_functional.get_4bit_type("nf4", device="cpu")
    return _dequantize_4bit_compute(packed.view(torch.uint8).reshape(-1), absmax, code, state.blocksize,
                                    state.shape, state.dtype)


def test_code_tables_are_identical():
    assert torch.equal(dynamic_code(), bnb_functional.create_dynamic_map())
    assert torch.equal(nf4_code(), bnb_functional.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no_dq"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_bnb_quantised_weight_dequantises_identically_in_ours(shape, dtype, double_quant):
    w = (torch.randn(shape) * torch.rand(()) * 2).to(dtype)
    packed, state = bnb_quantize(w, 64, double_quant)
    expected = bnb_dequantize(packed, state)
    q = NF4Weight.from_bnb(packed, state)
    assert torch.equal(nf4_dequantize_reference(q), expected)
    assert torch.equal(dequantize_with_kernel(q), expected)      # Triton kernel, NaN-poisoned output


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no_dq"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_our_quantiser_reproduces_bnb_state_exactly(shape, dtype, double_quant):
    w = (torch.randn(shape) * torch.rand(()) * 2).to(dtype)
    packed, state = bnb_quantize(w, 64, double_quant)
    q = nf4_quantize(w, 64, double_quant)
    assert torch.equal(q.packed, packed) and torch.equal(q.absmax, state.absmax)
    assert torch.equal(q.code, state.code) and q.shape == state.shape and q.dtype == state.dtype
    if double_quant:
        assert torch.equal(q.absmax2, state.state2.absmax) and torch.equal(q.offset, state.offset)
        assert torch.equal(q.code2, state.state2.code) and q.blocksize2 == state.state2.blocksize
    # ... so bitsandbytes decodes our state to what we decode it to.
    ours_packed, ours_state = q.to_bnb()
    assert torch.equal(bnb_dequantize(ours_packed, ours_state), nf4_dequantize_reference(q))


@pytest.mark.parametrize("blocksize", [32, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_other_blocksizes(blocksize, dtype):
    w = torch.randn(37, 90).to(dtype)
    packed, state = bnb_quantize(w, blocksize, True)
    q = nf4_quantize(w, blocksize, True)
    assert torch.equal(q.packed, packed) and torch.equal(q.absmax, state.absmax)
    assert torch.equal(dequantize_with_kernel(q), bnb_dequantize(packed, state))


def test_degenerate_weights_match():
    """Constant weight (every absmax equal: all centred absmax 0), all-zero weight, a zero tail block."""
    for w in (torch.full((300, 64), 3.0), torch.zeros(5, 67), torch.cat([torch.randn(10, 64), torch.zeros(1, 64)])):
        for double_quant in (True, False):
            packed, state = bnb_quantize(w, 64, double_quant)
            q = nf4_quantize(w, 64, double_quant)
            assert torch.equal(q.packed, packed) and torch.equal(q.absmax, state.absmax)
            assert torch.equal(dequantize_with_kernel(q), bnb_functional.dequantize_4bit(packed, state))


def test_quant_storage_other_than_uint8():
    w = torch.randn(16, 64, dtype=torch.bfloat16)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4",
                                                 quant_storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    q = NF4Weight.from_bnb(packed, state)
    assert torch.equal(nf4_dequantize_reference(q), bnb_functional.dequantize_4bit(packed, state))


def test_fp4_state_is_refused():
    packed, state = bnb_functional.quantize_4bit(torch.randn(8, 64), quant_type="fp4")
    with pytest.raises(ValueError, match="quant_type='nf4'"):
        NF4Weight.from_bnb(packed, state)


def test_bnb_native_cpu_row_blocking_quirk():
    """On [64, 96] bitsandbytes' native CPU path either agrees with the format (fixed) or is off by whole values."""
    w = torch.randn(64, 96)
    packed, state = bnb_quantize(w, 64, False)
    ours = nf4_dequantize_reference(NF4Weight.from_bnb(packed, state))
    native = bnb_functional.dequantize_4bit(packed, state)
    if not torch.equal(native, ours):
        assert (native - w).abs().max() > 2 * (ours - w).abs().max()   # native decodes with the wrong absmax
    assert (ours - w).abs().max() <= w.abs().max() * 0.16             # ours: within half the widest NF4 gap
