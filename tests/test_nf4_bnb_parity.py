"""Bit-for-bit parity with bitsandbytes on CPU (the test-only oracle, run in the reference process of
tests/reference/isolation.py; skipped when it is not installed).

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

from types import SimpleNamespace

import pytest
import torch

from kernels import NF4Weight, nf4_quantize
from kernels.nf4 import dynamic_code, nf4_code
from kernels.nf4_dequant import nf4_dequantize_reference
from tests.kernel_testing import dequantize_with_kernel
from tests.reference.isolation import ReferenceError, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# 100x71: odd count, blocks cross rows; 33x65; [7]: one partial block; 301x64: 301 blocks -> partial 2nd-level
# block; 2x4097; 64x96: even rows that are not a multiple of 64 (the native CPU quirk above).
SHAPES = [(100, 71), (33, 65), (7,), (301, 64), (2, 4097), (64, 96)]


@pytest.fixture(scope="module", autouse=True)
def _bitsandbytes_present():
    try:
        reference().call("bnb.version")
    except ReferenceError as e:
        pytest.skip(f"bitsandbytes is not importable in the reference process: {str(e).splitlines()[-1]}")


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    monkeypatch.setenv("KERNELS_POISON", "1")


def bnb_quantize(w, blocksize, double_quant, **kw) -> dict:
    """bitsandbytes' quantisation state (as a dict: tests/reference/outside/bnb.py)."""
    return reference().call("bnb.quantize", w, blocksize, double_quant, **kw)


def from_bnb(state: dict) -> NF4Weight:
    """NF4Weight.from_bnb on an object with the attributes of bitsandbytes' QuantState."""
    state2 = SimpleNamespace(absmax=state["absmax2"], code=state["code2"], blocksize=state["blocksize2"])
    quant_state = SimpleNamespace(**{**state, "shape": torch.Size(state["shape"]), "state2": state2})
    return NF4Weight.from_bnb(state["packed"], quant_state)


def as_bnb_state(q: NF4Weight) -> dict:
    """Our state in bitsandbytes' terms (what NF4Weight.to_bnb builds), as a dict."""
    return {"packed": q.packed, "absmax": q.absmax, "code": q.code, "shape": list(q.shape), "dtype": q.dtype,
            "blocksize": q.blocksize, "quant_type": "nf4", "nested": q.double_quant, "offset": q.offset,
            "absmax2": q.absmax2, "code2": q.code2, "blocksize2": q.blocksize2 if q.double_quant else None}


def native_cpu_quirk(shape, blocksize) -> bool:
    """Shapes on which bitsandbytes' native CPU dequantiser restarts blocks per row (module docstring)."""
    n = 1
    for d in shape:
        n *= d
    return len(shape) > 1 and shape[-1] % blocksize != 0 and shape[-1] % 2 == 0 and n % blocksize == 0 and n % 8 == 0


def bnb_dequantize(state: dict) -> torch.Tensor:
    """bitsandbytes' `dequantize_4bit`, or its pure-PyTorch backend on shapes hit by the native CPU quirk."""
    backend = "default" if native_cpu_quirk(tuple(state["shape"]), state["blocksize"]) else "public"
    return reference().call("bnb.dequantize", state, backend=backend)


def test_code_tables_are_identical():
    tables = reference().call("bnb.code_tables")
    assert torch.equal(dynamic_code(), tables["dynamic"]) and torch.equal(nf4_code(), tables["nf4"])


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no_dq"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_bnb_quantised_weight_dequantises_identically_in_ours(shape, dtype, double_quant):
    w = (torch.randn(shape) * torch.rand(()) * 2).to(dtype)
    state = bnb_quantize(w, 64, double_quant)
    expected = bnb_dequantize(state)
    q = from_bnb(state)
    assert torch.equal(nf4_dequantize_reference(q), expected)
    assert torch.equal(dequantize_with_kernel(q), expected)      # Triton kernel, NaN-poisoned output


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no_dq"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_our_quantiser_reproduces_bnb_state_exactly(shape, dtype, double_quant):
    w = (torch.randn(shape) * torch.rand(()) * 2).to(dtype)
    state = bnb_quantize(w, 64, double_quant)
    q = nf4_quantize(w, 64, double_quant)
    assert torch.equal(q.packed, state["packed"]) and torch.equal(q.absmax, state["absmax"])
    assert torch.equal(q.code, state["code"]) and list(q.shape) == state["shape"] and q.dtype == state["dtype"]
    if double_quant:
        assert torch.equal(q.absmax2, state["absmax2"]) and torch.equal(q.offset, state["offset"])
        assert torch.equal(q.code2, state["code2"]) and q.blocksize2 == state["blocksize2"]
    # ... so bitsandbytes decodes our state to what we decode it to.
    assert torch.equal(bnb_dequantize(as_bnb_state(q)), nf4_dequantize_reference(q))


@pytest.mark.parametrize("blocksize", [32, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_other_blocksizes(blocksize, dtype):
    w = torch.randn(37, 90).to(dtype)
    state = bnb_quantize(w, blocksize, True)
    q = nf4_quantize(w, blocksize, True)
    assert torch.equal(q.packed, state["packed"]) and torch.equal(q.absmax, state["absmax"])
    assert torch.equal(dequantize_with_kernel(q), bnb_dequantize(state))


def test_degenerate_weights_match():
    """Constant weight (every absmax equal: all centred absmax 0), all-zero weight, a zero tail block."""
    for w in (torch.full((300, 64), 3.0), torch.zeros(5, 67), torch.cat([torch.randn(10, 64), torch.zeros(1, 64)])):
        for double_quant in (True, False):
            state = bnb_quantize(w, 64, double_quant)
            q = nf4_quantize(w, 64, double_quant)
            assert torch.equal(q.packed, state["packed"]) and torch.equal(q.absmax, state["absmax"])
            assert torch.equal(dequantize_with_kernel(q), reference().call("bnb.dequantize", state))


def test_quant_storage_other_than_uint8():
    w = torch.randn(16, 64, dtype=torch.bfloat16)
    state = bnb_quantize(w, 64, True, quant_storage=torch.bfloat16)
    assert state["packed"].dtype == torch.bfloat16
    q = from_bnb(state)
    assert torch.equal(nf4_dequantize_reference(q), reference().call("bnb.dequantize", state))


def test_fp4_state_is_refused():
    state = bnb_quantize(torch.randn(8, 64), 64, True, quant_type="fp4")
    with pytest.raises(ValueError, match="quant_type='nf4'"):
        from_bnb(state)


def test_bnb_native_cpu_row_blocking_quirk():
    """On [64, 96] bitsandbytes' native CPU path either agrees with the format (fixed) or is off by whole values."""
    w = torch.randn(64, 96)
    state = bnb_quantize(w, 64, False)
    ours = nf4_dequantize_reference(from_bnb(state))
    native = reference().call("bnb.dequantize", state)
    if not torch.equal(native, ours):
        assert (native - w).abs().max() > 2 * (ours - w).abs().max()   # native decodes with the wrong absmax
    assert (ours - w).abs().max() <= w.abs().max() * 0.16             # ours: within half the widest NF4 gap
