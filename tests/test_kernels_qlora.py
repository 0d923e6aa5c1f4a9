"""QLoRA linear (kernels.qlora): both Triton paths against LoRA on the dequantised weight, float64 autograd.

Interpreter on CPU, compiled on CUDA (skipped without a GPU); bfloat16 on CPU goes through the UPCAST path
(see tests/test_kernels_lora.py). Outputs NaN-poisoned before each launch, inputs drawn fresh.
"""

import pytest
import torch

import kernels
import kernels.ops as ops_mod
import kernels.qlora as qlora_mod
import kernels.schedules as schedules_mod
from kernels import nf4_quantize
from kernels.lora import lora_matmul_reference
from kernels.nf4_dequant import nf4_dequantize_reference
from kernels.ops import FUSED_MAX_TOKENS, use_fused_qlora
from kernels.qlora import QLoRAMatmul, qlora_gemm, qlora_matmul_reference
from tests.kernel_testing import (DEVICE_DTYPES, DEVICES, GPU, INTERPRETER, _poison_outputs,  # noqa: F401
                                  assert_close)


def make(M, N, K, r, dtype, device, double_quant=True, blocksize=64):
    q = nf4_quantize(torch.randn(N, K, device=device) / K**0.5, blocksize=blocksize, double_quant=double_quant)
    x = torch.randn(M, K, device=device).to(dtype).requires_grad_()
    A = (torch.randn(r, K, device=device) / K**0.5).to(dtype).requires_grad_()
    B = torch.randn(N, r, device=device).to(dtype).requires_grad_()
    return x, q, A, B


def reference64(x, q, A, B, scale, dy):
    W = nf4_dequantize_reference(q, x.dtype).double()       # the weight the kernels see, in the compute dtype
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    y = lora_matmul_reference(x64, W, A64, B64, scale)
    y.backward(dy.double())
    return y.detach(), x64.grad, A64.grad, B64.grad


# (M, N, K, r, double_quant): K = 100 and 33 make absmax blocks straddle rows of W (per-element absmax); K = 128
# is row-aligned (one absmax per W row and tile). M = 1 and 5 are decode sizes, 40 runs the fused kernel anyway.
CASES = [(5, 70, 100, 8, True), (1, 33, 128, 16, True), (40, 64, 33, 4, False), (3, 50, 192, 24, True)]


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "dequant_then_gemm"])
@pytest.mark.parametrize("case", CASES)
def test_forward_and_backward_match_lora_on_dequantised_weight(case, fused, dtype, device):
    M, N, K, r, dq = case
    x, q, A, B = make(M, N, K, r, dtype, device, dq)
    scale = 0.25 + torch.rand(()).item()
    y = QLoRAMatmul.apply(x, q, A, B, scale, fused)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, dx_ref, dA_ref, dB_ref = reference64(x, q, A, B, scale, dy)
    assert_close(y, y_ref, dtype, K + r, "y")
    assert_close(x.grad, dx_ref, dtype, N + r, "dx")
    assert_close(A.grad, dA_ref, dtype, N + M, "dA")      # dA = dSᵀ x, dS = s·dY B: N + M terms in a chain
    assert_close(B.grad, dB_ref, dtype, K + M, "dB")      # dB = s·dYᵀ S, S = x Aᵀ


@pytest.mark.parametrize("device, dtype", [pytest.param("cpu", torch.float32, marks=INTERPRETER),
                                           pytest.param("cpu", torch.bfloat16, marks=INTERPRETER),
                                           pytest.param("cuda", torch.bfloat16, marks=GPU)])
@pytest.mark.parametrize("case", CASES)
def test_fused_split_k_forward_and_backward(case, dtype, device, monkeypatch):
    """Split-K at test sizes (splits of >= 16 values): partial sums, the LoRA term in the first split only, and
    empty trailing splits (a reduction of 70 in 4 splits of 32 in the interpreter) must give the same results."""
    monkeypatch.setattr(schedules_mod, "MIN_K_PER_SPLIT", 16)
    M, N, K, r, dq = case
    x, q, A, B = make(M, N, K, r, dtype, device, dq)
    assert schedules_mod.split_k(M, N, K, x.device) > 1
    y = QLoRAMatmul.apply(x, q, A, B, 0.75, True)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, dx_ref, _, _ = reference64(x, q, A, B, 0.75, dy)
    assert_close(y, y_ref, dtype, K + r, "y")
    assert_close(x.grad, dx_ref, dtype, N + r, "dx")


def test_split_k_rule_on_an_h200(monkeypatch):
    """132 SMs: splits double until 4 programs per SM, each split >= 256 values of K, at most 16."""
    monkeypatch.setattr(schedules_mod, "sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    assert schedules_mod.split_k(1, 4096, 4096, cuda) == 16       # 64 tiles of 64 columns
    assert schedules_mod.split_k(16, 14336, 4096, cuda) == 4      # 224 tiles
    assert schedules_mod.split_k(64, 4096, 4096, cuda) == 4       # 4 x 64 tiles
    assert schedules_mod.split_k(1, 4096, 384, cuda) == 1         # too short to split
    assert schedules_mod.split_k(4096, 4096, 4096, cuda) == 1     # enough tiles


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("blocksize", [32, 128])
def test_fused_kernel_other_blocksizes(blocksize, device):
    x, q, A, B = make(4, 40, 96, 8, torch.float16, device, blocksize=blocksize)
    for transposed in (False, True):
        if transposed:  # dX = dY W + dS A
            inp, p, p_times = torch.randn(4, 40, device=device).half(), torch.randn(4, 8, device=device), A.detach()
            W = nf4_dequantize_reference(q, torch.float16).double()
            expected = inp.double() @ W + p.double() @ p_times.double()
            out = torch.full((4, 96), float("nan"), dtype=torch.float16, device=device)
            qlora_gemm(inp, q, True, p, p_times, 1.0, out)
        else:
            inp, p, p_times = x.detach(), torch.randn(4, 8, device=device).half(), B.detach().t()
            expected = (inp.double() @ nf4_dequantize_reference(q, torch.float16).double().t()
                        + 0.5 * p.double() @ p_times.double())
            out = torch.full((4, 40), float("nan"), dtype=torch.float16, device=device)
            qlora_gemm(inp, q, False, p, p_times, 0.5, out)
        assert_close(out, expected, torch.float16, (40 if transposed else 96) + 8, f"transposed={transposed}")


def test_dispatch_rule_thresholds():
    """The measured rule (docs/kernels.md, H200 run 2): fused up to 64 tokens, for weights up to 4096x4096 only."""
    assert use_fused_qlora(1, 4096, 4096) and use_fused_qlora(64, 4096, 4096) and not use_fused_qlora(65, 4096, 4096)
    assert not use_fused_qlora(256, 4096, 4096)
    assert not use_fused_qlora(1, 14336, 4096) and not use_fused_qlora(16, 14336, 4096)
    assert not use_fused_qlora(1, 28672, 8192) and not use_fused_qlora(16, 28672, 8192)


@pytest.mark.parametrize("device", DEVICES)
def test_public_op_dispatches_on_token_count(device, monkeypatch):
    monkeypatch.setenv("KERNELS_BACKEND", "triton")
    seen = []
    original = qlora_mod.qlora_forward_triton
    monkeypatch.setattr(qlora_mod, "qlora_forward_triton", lambda *a: seen.append(a[-1]) or original(*a))
    monkeypatch.setattr(ops_mod, "qlora_forward_triton", qlora_mod.qlora_forward_triton)
    limit = FUSED_MAX_TOKENS                                          # a small weight: fused up to 64 tokens
    x, q, A, B = make(limit + 1, 24, 64, 4, torch.float32, device)
    small = x.detach()[:limit].reshape(2, limit // 2, 64)
    y_small = kernels.qlora_matmul(small, q, A, B, 1.0)
    y_large = kernels.qlora_matmul(x, q, A, B, 1.0)                   # grads on: through the autograd Function
    assert seen == [True, False]
    assert y_small.shape == (2, limit // 2, 24)
    expected = qlora_matmul_reference(x.detach().double(), q, A.detach().double(), B.detach().double(), 1.0)
    assert_close(y_large, expected, torch.float32, 64 + 4, "dequantise-then-GEMM path")
    assert_close(y_small.reshape(-1, 24), expected[:limit], torch.float32, 64 + 4, "fused path")


@pytest.mark.parametrize("device", DEVICES)
def test_empty_input(device):
    x, q, A, B = make(0, 24, 64, 4, torch.float16, device)
    for fused in (True, False):
        y = QLoRAMatmul.apply(x, q, A, B, 1.0, fused)
        y.sum().backward()
        assert y.shape == (0, 24) and x.grad.shape == (0, 64)
        assert torch.equal(A.grad, torch.zeros_like(A))


def test_qlora_forward_equals_lora_on_dequantised_weight_reference():
    """The issue's fidelity check at the public API (reference backend): QLoRA == LoRA on W_dq."""
    x, q, A, B = make(6, 20, 70, 4, torch.float32, "cpu")
    W = kernels.nf4_dequantize(q, torch.float32)
    assert torch.equal(kernels.qlora_matmul(x, q, A, B, 0.5), kernels.lora_matmul(x, W, A, B, 0.5))


# ---- bad input ----------------------------------------------------------------------------------------------

@INTERPRETER
def test_bad_inputs_raise_with_the_fix(monkeypatch):
    monkeypatch.setenv("KERNELS_BACKEND", "triton")
    x, q, A, B = make(3, 20, 64, 4, torch.float32, "cpu")
    with pytest.raises(TypeError, match="NF4Weight"):
        kernels.qlora_matmul(x, torch.randn(20, 64), A, B, 1.0)
    with pytest.raises(ValueError, match="expects 64 input features"):
        kernels.qlora_matmul(torch.randn(3, 65), q, A, B, 1.0)
    with pytest.raises(ValueError, match="rank 4 .* rank 5"):
        kernels.qlora_matmul(x, q, A, torch.randn(20, 5), 1.0)
    with pytest.raises(TypeError, match="cast them to one compute dtype"):
        kernels.qlora_matmul(x, q, A.half(), B, 1.0)
    with pytest.raises(ValueError, match="move them to one device"):
        kernels.qlora_matmul(x, q.to("meta"), A, B, 1.0)
    with pytest.raises(TypeError, match="NF4Weight"):
        kernels.nf4_dequantize(torch.zeros(10, dtype=torch.uint8))
