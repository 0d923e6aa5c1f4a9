"""Fused LoRA linear (kernels.lora): Triton forward and backward against a float64 autograd reference.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py on a machine without
a GPU); the "cuda" cases run compiled (TRITON_INTERPRET=0) and are skipped without a GPU.
Coverage in the interpreter: float32 and float16 natively; bfloat16 through the kernels' UPCAST path (tiles
converted to float32 after loading, float32 -> bfloat16 rounded to nearest even by hand), i.e. the bf16
load/store/rounding logic is tested on CPU and the native bf16 `tl.dot` only on a GPU.
Inputs are drawn fresh (no fixed seed) and every kernel output is NaN-poisoned before the launch (KERNELS_POISON).
"""

import pytest
import torch

import kernels
import kernels._triton as triton_plumbing
import kernels.lora as lora_mod
from kernels.lora import (LoRAMatmul, lora_backward_triton, lora_forward_triton, lora_gemm, lora_grad_dS_dB,
                          lora_matmul_reference)
from tests.kernel_testing import (DEVICE_DTYPES, DEVICES, GPU, INTERPRETER, _poison_outputs,  # noqa: F401
                                  assert_close)


def make(M, N, K, r, dtype, device, requires_grad=True):
    x = torch.randn(M, K, device=device).to(dtype)
    W = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    A = (torch.randn(r, K, device=device) / K**0.5).to(dtype)
    B = torch.randn(N, r, device=device).to(dtype)
    if requires_grad:
        for t in (x, A, B):
            t.requires_grad_()
    return x, W, A, B


def reference64(x, W, A, B, scale, dy):
    """Forward and gradients of the eager formula in float64 (W frozen)."""
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    y = lora_matmul_reference(x64, W.double(), A64, B64, scale)
    y.backward(dy.double())
    return y.detach(), x64.grad, A64.grad, B64.grad


# (M, N, K, r): odd sizes that are multiples of no tile size, one row, ranks below / at / above 16.
SHAPES = [(37, 70, 100, 8), (1, 45, 33, 16), (65, 33, 130, 20), (3, 129, 64, 1)]


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_match_float64_autograd(shape, dtype, device):
    M, N, K, r = shape
    x, W, A, B = make(M, N, K, r, dtype, device)
    scale = 0.5 + torch.rand(()).item()
    y = LoRAMatmul.apply(x, W, A, B, scale)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, dx_ref, dA_ref, dB_ref = reference64(x, W, A, B, scale, dy)
    assert_close(y, y_ref, dtype, K + r, "y")
    assert_close(x.grad, dx_ref, dtype, N + r, "dx")
    assert_close(A.grad, dA_ref, dtype, N + M, "dA")      # dA = dSᵀ x, dS = s·dY B: N + M terms in a chain
    assert_close(B.grad, dB_ref, dtype, K + M, "dB")      # dB = s·dYᵀ S, S = x Aᵀ
    assert y.dtype == x.grad.dtype == A.grad.dtype == B.grad.dtype == dtype


@pytest.mark.parametrize("device", DEVICES)
def test_public_op_leading_dims_and_backend_switch(device, monkeypatch):
    monkeypatch.setenv("KERNELS_BACKEND", "triton")
    x, W, A, B = make(2 * 3 * 5, 24, 40, 4, torch.float32, device)
    x3 = x.detach().reshape(2, 3, 5, 40).requires_grad_()
    y = kernels.lora_matmul(x3, W, A, B, 2.0)
    assert y.shape == (2, 3, 5, 24)
    y.sum().backward()
    y_ref, dx_ref, dA_ref, dB_ref = reference64(x, W, A, B, 2.0, torch.ones(30, 24, dtype=torch.float64, device=device))
    assert_close(y.reshape(30, 24), y_ref, torch.float32, 44, "y")
    assert_close(x3.grad.reshape(30, 40), dx_ref, torch.float32, 28, "dx")  # dy has stride 0 (sum's backward)
    assert_close(A.grad, dA_ref, torch.float32, 24 + 30, "dA")
    monkeypatch.setenv("KERNELS_BACKEND", "reference")
    assert_close(kernels.lora_matmul(x3, W, A, B, 2.0).reshape(30, 24), y_ref, torch.float32, 44, "reference backend")


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(device):
    """W transposed in memory, x a column slice, B non-contiguous: the kernels take strides."""
    M, N, K, r = 20, 36, 50, 8
    x_big = torch.randn(M, K + 7, device=device)
    x = x_big[:, 3:3 + K]
    W = torch.randn(K, N, device=device).t()
    A = torch.randn(r, K, device=device)
    B = torch.randn(r, N, device=device).t()
    y, S = lora_forward_triton(x, W, A, B, 0.75)
    assert not W.is_contiguous() and not x.is_contiguous() and not B.is_contiguous()
    assert_close(y, lora_matmul_reference(x.double(), W.double(), A.double(), B.double(), 0.75), torch.float32,
                 K + r, "y")


@pytest.mark.parametrize("device", DEVICES)
def test_empty_and_zero_inputs(device):
    x, W, A, B = make(0, 24, 40, 4, torch.float32, device)
    y = LoRAMatmul.apply(x, W, A, B, 1.0)
    assert y.shape == (0, 24)
    y.sum().backward()
    assert x.grad.shape == (0, 40)
    assert torch.equal(A.grad, torch.zeros_like(A)) and torch.equal(B.grad, torch.zeros_like(B))
    # K = 0: nothing to reduce over, y must be exactly zero (and written: outputs start as NaN).
    y0, _ = lora_forward_triton(torch.randn(5, 0, device=device), torch.randn(6, 0, device=device),
                                torch.randn(2, 0, device=device), torch.randn(6, 2, device=device), 1.0)
    assert torch.equal(y0, torch.zeros(5, 6, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_gemm_kernel_writes_every_element_and_plain_gemm(device):
    """Poisoned output buffer, odd sizes: every element must be overwritten; p=None gives the plain GEMM."""
    x, W, A, B = make(33, 47, 71, 8, torch.float16, device, requires_grad=False)
    out = torch.full((33, 47), float("nan"), dtype=torch.float16, device=device)
    lora_gemm(x, W, W.stride(0), W.stride(1), None, None, 1.0, out)
    assert_close(out, x.double() @ W.double().t(), torch.float16, 71, "plain GEMM")


# The GEMM's schedules besides the default one program per tile with pointer loads (kernels/schedules.py).
SCHEDULES = ["tma", "persistent", "persistent_tma"]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("device, dtype", [pytest.param("cpu", torch.float32, marks=INTERPRETER),
                                           pytest.param("cuda", torch.bfloat16, marks=GPU)])
def test_gemm_schedules_forward_and_backward(device, dtype, schedule, monkeypatch):
    """Tensor-descriptor (TMA) loads and the persistent schedule: forced in the interpreter (3 programs, so each
    walks several tiles), and on a GPU as the only autotuning candidate."""
    if device == "cpu":
        monkeypatch.setattr(lora_mod, "tma_ok", lambda *args: True)
        monkeypatch.setattr(lora_mod, "INTERPRETER_GEMM_META", dict(lora_mod.INTERPRETER_GEMM_META, SCHEDULE=schedule))
    else:
        chosen = [c for c in lora_mod._tuned_gemm.configs if c.kwargs["SCHEDULE"] == schedule
                  and c.kwargs["BLOCK_M"] == 128]             # the tile the pruning keeps for 70 tokens
        monkeypatch.setattr(lora_mod._tuned_gemm, "configs", chosen[-1:])
        monkeypatch.setattr(lora_mod._tuned_gemm, "cache", {})
        monkeypatch.setattr(triton_plumbing, "_CHOSEN", {})
    x, W, A, B = make(70, 48, 96, 8, dtype, device)         # rows 16-byte aligned; 70 and 48 leave partial tiles
    y = LoRAMatmul.apply(x, W, A, B, 0.5)
    dy = torch.randn_like(y)
    y.backward(dy.contiguous())
    y_ref, dx_ref, dA_ref, dB_ref = reference64(x, W, A, B, 0.5, dy)
    assert_close(y, y_ref, dtype, 96 + 8, "y")
    assert_close(x.grad, dx_ref, dtype, 48 + 8, "dx")


@pytest.mark.parametrize("device", DEVICES)
def test_grad_kernel_dS_dB(device):
    M, N, r = 45, 70, 12
    dy = torch.randn(M, N, device=device)
    S = torch.randn(M, r, device=device)
    B = torch.randn(N, r, device=device)
    dS, dB = lora_grad_dS_dB(dy, S, B, 0.3)
    assert dS.dtype == dB.dtype == torch.float32
    assert_close(dS, 0.3 * dy.double() @ B.double(), torch.float32, N, "dS")
    assert_close(dB, 0.3 * dy.double().t() @ S.double(), torch.float32, M, "dB")


@pytest.mark.parametrize("device", DEVICES)
def test_input_gradient_skipped_when_not_needed(device):
    x, W, A, B = make(9, 20, 30, 4, torch.float32, device)
    x.requires_grad_(False)
    y, S = lora_forward_triton(x, W, A.detach(), B.detach(), 1.0)
    dx, dA, dB = lora_backward_triton(torch.ones_like(y), x, W, A.detach(), B.detach(), S, 1.0, need_dx=False)
    assert dx is None and dA.shape == A.shape and dB.shape == B.shape


def test_reference_gradcheck_float64():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    W = torch.randn(5, 6, dtype=torch.float64)
    A = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    B = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, A, B: lora_matmul_reference(x, W, A, B, 0.7), (x, A, B))


# ---- bad input: every error names the problem and the fix --------------------------------------------------

def _args(**overrides):
    x, W, A, B = make(4, 6, 8, 2, torch.float32, "cpu", requires_grad=False)
    args = dict(x=x, W=W, A=A, B=B, scale=1.0)
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides, error, match", [
    (dict(W=torch.randn(6, 8, dtype=torch.float64)), TypeError, "cast them to one compute dtype"),
    (dict(x=torch.randn(4, 8).half()), TypeError, "cast them to one compute dtype"),
    (dict(x=torch.randint(0, 3, (4, 8))), TypeError, "use one of"),
    (dict(A=torch.randn(3, 8)), ValueError, "rank 3 .* rank 2"),
    (dict(A=torch.randn(2, 9)), ValueError, r"must be \[r, 8\]"),
    (dict(B=torch.randn(7, 2)), ValueError, r"must be \[6, r\]"),
    (dict(x=torch.randn(4, 9)), ValueError, "expects 8 input features"),
    (dict(W=torch.randn(6, 8, 1)), ValueError, "2-D"),
    (dict(A=torch.randn(0, 8), B=torch.randn(6, 0)), ValueError, "r >= 1"),
    (dict(scale=torch.tensor(1.0)), TypeError, "Python number"),
    (dict(scale=float("nan")), ValueError, "finite"),
    (dict(A=torch.randn(2, 8, device="meta")), ValueError, "move them to one device"),
    (dict(W=torch.randn(6, 8, requires_grad=True)), ValueError, "requires_grad_"),
    (dict(A=torch.randn(200, 8), B=torch.randn(6, 200)), ValueError, "KERNELS_BACKEND=reference"),
])
@INTERPRETER
def test_bad_inputs_raise_with_the_fix(overrides, error, match, monkeypatch):
    monkeypatch.setenv("KERNELS_BACKEND", "triton")
    with pytest.raises(error, match=match):
        kernels.lora_matmul(**_args(**overrides))


def test_unknown_backend_value(monkeypatch):
    monkeypatch.setenv("KERNELS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="'triton', 'reference' or 'auto'"):
        kernels.lora_matmul(**_args())


def test_default_backend_on_cpu_is_the_reference(monkeypatch):
    calls = []
    monkeypatch.setattr(LoRAMatmul, "apply", lambda *a: calls.append(a))
    kernels.lora_matmul(**_args())
    assert calls == []  # CPU tensors without KERNELS_BACKEND: plain PyTorch, the kernels are not launched


def test_one_triton_mode_per_process():
    """Our kernels and Triton's own library functions were made by the same `@triton.jit` mode, the one
    TRITON_INTERPRET asked for (an interpreted kernel calling a compiled `tl.cdiv` fails)."""
    import os

    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    assert triton_plumbing.INTERPRETED == (os.environ.get("TRITON_INTERPRET") == "1")
    for fn in (lora_mod._lora_gemm_kernel, lora_mod._tuned_gemm.fn, triton_plumbing.mma, tl.cdiv):
        assert isinstance(fn, InterpretedFunction) == triton_plumbing.INTERPRETED, fn


_CHILD = """
import os, sys
import triton
os.environ["TRITON_INTERPRET"] = sys.argv[1]
try:
    import kernels
except ImportError as e:
    print("ImportError:", e)
"""


def test_triton_interpret_changed_after_import_is_refused():
    """Setting TRITON_INTERPRET after triton was imported would mix modes: `import kernels` says how to fix it."""
    import os
    import subprocess
    import sys

    flipped = "0" if triton_plumbing.INTERPRETED else "1"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_INTERPRET"] = "1" if flipped == "0" else "0"     # what triton sees at import
    run = subprocess.run([sys.executable, "-c", _CHILD, flipped], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert "ImportError:" in run.stdout and "before the first `import triton`" in run.stdout, run.stdout + run.stderr


_FORCED_ON_CPU = """
import os, torch
os.environ["KERNELS_BACKEND"] = "triton"
import kernels
try:
    kernels.lora_matmul(torch.randn(4, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2), 1.0)
except RuntimeError as e:
    print("RuntimeError:", e)
"""


def test_forced_triton_on_cpu_without_the_interpreter_names_the_fix():
    """Compiled kernels cannot take CPU tensors: the op refuses before launching and names TRITON_INTERPRET=1."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0")
    run = subprocess.run([sys.executable, "-c", _FORCED_ON_CPU], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert "RuntimeError:" in run.stdout and "TRITON_INTERPRET=1" in run.stdout, run.stdout + run.stderr


def test_triton_allocator_is_set_in_every_launching_thread(monkeypatch):
    """Triton's allocator lives in a ContextVar (per thread); autograd launches CUDA backwards from its own thread.
    `ensure_allocator` must set it once in each thread that launches, and in a new thread again."""
    import threading

    import triton

    calls = []
    monkeypatch.setattr(triton, "set_allocator", lambda alloc: calls.append(threading.get_ident()), raising=False)
    monkeypatch.setattr(triton_plumbing, "_THREAD", threading.local())
    triton_plumbing.ensure_allocator()
    triton_plumbing.ensure_allocator()
    assert len(calls) == 1
    worker = threading.Thread(target=lambda: (triton_plumbing.ensure_allocator(), triton_plumbing.ensure_allocator()))
    worker.start()
    worker.join()
    assert len(calls) == 2 and calls[1] != calls[0]


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_mode_replaces_the_atomic_gradient_kernel(device, monkeypatch):
    """Under torch.use_deterministic_algorithms(True), dS and dB come from float32 matrix products (no atomics):
    the gradients are right and, on a GPU, bit-identical from run to run."""
    monkeypatch.setattr(lora_mod, "_tuned_grad", None)      # the atomic kernel must not be launched
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what PyTorch asks for before deterministic cuBLAS
    x, W, A, B = make(37, 70, 100, 8, torch.float32, device)
    dy = torch.randn(37, 70, device=device)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(2):
            x.grad = A.grad = B.grad = None
            LoRAMatmul.apply(x, W, A, B, 0.5).backward(dy)
            grads.append([t.grad.clone() for t in (x, A, B)])
    finally:
        torch.use_deterministic_algorithms(previous)
    _, dx_ref, dA_ref, dB_ref = reference64(x, W, A, B, 0.5, dy)
    for got, ref, k, what in zip(grads[0], (dx_ref, dA_ref, dB_ref), (70 + 8, 70 + 37, 100 + 37), ("dx", "dA", "dB")):
        assert_close(got, ref, torch.float32, k, what)
    assert all(torch.equal(a, b) for a, b in zip(*grads))
