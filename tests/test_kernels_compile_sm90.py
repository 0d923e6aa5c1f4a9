"""Every kernel launch compiles for an H100/H200 (sm_90) on a machine without a GPU.

The interpreter runs kernels as numpy code, so it cannot catch what only the GPU compiler rejects (a `tl.dot`
dimension below 16, a type the backend cannot lower, a tile that needs more shared memory than an SM has). Here
the launchers run with `launch` replaced by a recorder; each recorded launch is then specialised exactly as
Triton would specialise it on a device (same argument binder: int specialisation, 16-byte alignment) and compiled
to a cubin for sm_90 with Triton's bundled ptxas. The default test compiles the config each launch would use
with autotuning off (KERNELS_AUTOTUNE=0, what scripts/gpu_check_kernels.sh tests with); the slow one compiles
every autotuning candidate (every schedule of kernels/schedules.py included) and lists those that would not fit.

Compiling needs compiled-mode jit functions, i.e. a process without TRITON_INTERPRET=1 (one mode per process,
kernels/_triton.py). When this process interprets (the CPU test run), each test runs itself again in a child
pytest with TRITON_INTERPRET=0 and passes when the child passes.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels.lora as lora
import kernels.nf4_dequant as nf4_dequant
import kernels.qlora as qlora
from kernels import nf4_quantize
from kernels._triton import INTERPRETED
from kernels.schedules import TMA_SCHEDULES

triton = pytest.importorskip("triton")
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

SM90_SHARED_BYTES = 232448  # 227 KB: the most shared memory one thread block may use on sm_90


def in_compiling_process(request) -> bool:
    """True when this process compiles kernels. Otherwise run this same test in a child process with
    TRITON_INTERPRET=0 (markers and addopts cleared, so a slow test runs too), require that it passed, and return
    False."""
    if not INTERPRETED:
        return True
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-o", "addopts=",
                          request.node.nodeid], cwd=Path(__file__).resolve().parents[1],
                         env=dict(os.environ, TRITON_INTERPRET="0"), capture_output=True, text=True)
    print(run.stdout[-6000:])
    assert run.returncode == 0, f"child pytest (TRITON_INTERPRET=0) failed:\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}"
    return False


def record_launches(monkeypatch, dtype, tokens):
    """Run the bf16/fp16/fp32 launchers on CPU tensors with a recording `launch`; returns (tuned, args, meta)."""
    recorded = []

    def recorder(tuned, grid, *args, interpreter_meta, **meta):
        recorded.append((tuned, args, meta))

    for module in (lora, qlora, nf4_dequant):
        monkeypatch.setattr(module, "launch", recorder)
    monkeypatch.setattr(lora, "tma_ok", lambda *args: True)  # CPU tensors here; the sm_90 target has TMA
    N, K, r = 256, 512, 16
    x, W = torch.randn(tokens, K).to(dtype), torch.randn(N, K).to(dtype)
    A, B = torch.randn(r, K).to(dtype), torch.randn(N, r).to(dtype)
    y, S = lora.lora_forward_triton(x, W, A, B, 0.5)                      # fused GEMM, forward orientation
    lora.lora_backward_triton(y, x, W, A, B, S, 0.5)                     # dS/dB pass + dX GEMM
    # row-aligned and straddling blocks; block size 32 (aligned rows, per-element decode: tiles span 2 blocks)
    for shape, blocksize in (((N, K), 64), ((N, K - 24), 64), ((N, K), 32)):
        q = nf4_quantize(torch.randn(shape), blocksize=blocksize)
        nf4_dequant.nf4_dequantize_triton(q, dtype)
        qlora.qlora_gemm(x[:, :shape[1]], q, False, S, B.t(), 0.5, torch.empty(tokens, N, dtype=dtype))
        qlora.qlora_gemm(y, q, True, S.float(), A[:, :shape[1]], 1.0, torch.empty(tokens, shape[1], dtype=dtype))
    nf4_dequant.nf4_dequantize_triton(nf4_quantize(torch.randn(3, 5000), blocksize=4096), dtype)
    return recorded


def compile_sm90(tuned, args, meta, config):
    """Compile one launch for sm_90 the way JITFunction.run would; returns the CompiledKernel."""
    fn = tuned.fn
    backend = make_backend(GPUTarget("cuda", 90, 32))
    # The compilation knobs JITFunction.run adds to the kwargs (which ones depends on the Triton version).
    run_knobs = {name: getattr(knobs.compilation, name) for name in ("instrumentation_mode", "fpsan_homomorphic_casts")
                 if hasattr(knobs.compilation, name)}
    kwargs = dict(meta, **config.all_kwargs(), debug=False, **run_knobs)
    bound, specialization, options = create_function_from_signature(fn.signature, fn.params, backend)(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=backend.target,
                          options=options.__dict__)


def candidate_configs(tuned, args, meta, quick=None):
    named = dict(zip(tuned.fn.arg_names, args))
    meta = {k: v for k, v in meta.items() if k != "enable_fp_fusion"}
    if quick is False:  # every candidate even under KERNELS_AUTOTUNE=0
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("KERNELS_AUTOTUNE", "1")
            return tuned.early_config_prune(tuned.configs, named, **meta)
    return tuned.early_config_prune(tuned.configs, named, **meta)


@pytest.mark.parametrize("dtype, tokens", [(torch.bfloat16, 4096), (torch.bfloat16, 8), (torch.float32, 40)])
def test_default_configs_compile_for_sm90(dtype, tokens, monkeypatch, request):
    if not in_compiling_process(request):
        return
    monkeypatch.setenv("KERNELS_AUTOTUNE", "0")     # read at call time by the prune hook: first surviving config
    for tuned, args, meta in record_launches(monkeypatch, dtype, tokens):
        (config,) = candidate_configs(tuned, args, meta)
        kernel = compile_sm90(tuned, args, meta, config)
        assert kernel.metadata.shared <= SM90_SHARED_BYTES, f"{tuned.fn.__name__} {config}: too much shared memory"
        if tuned.fn.__name__ == "_lora_gemm_kernel" and dtype != torch.float32 and config.kwargs["BLOCK_M"] >= 64:
            assert "wgmma" in kernel.asm["ptx"], "the dense GEMM should use Hopper's warpgroup MMA"
            candidates = candidate_configs(tuned, args, meta, quick=False)
            for schedule in ("tma", "persistent_tma", "persistent"):             # kernels/schedules.py
                variant = next(c for c in candidates if c.kwargs["SCHEDULE"] == schedule)
                ptx = compile_sm90(tuned, args, meta, variant).asm["ptx"]
                tma = schedule in TMA_SCHEDULES
                assert "wgmma" in ptx, f"{variant}: no warpgroup MMA"
                assert ("cp.async.bulk.tensor" in ptx) == tma, f"{variant}: TMA loads {'missing' if tma else 'used'}"


@pytest.mark.slow
@pytest.mark.parametrize("dtype, tokens", [(torch.bfloat16, 4096), (torch.bfloat16, 8), (torch.float16, 130)])
def test_every_autotuning_candidate_compiles(dtype, tokens, monkeypatch, request):
    if not in_compiling_process(request):
        return
    too_big = []
    for tuned, args, meta in record_launches(monkeypatch, dtype, tokens):
        for config in candidate_configs(tuned, args, meta):
            kernel = compile_sm90(tuned, args, meta, config)
            if kernel.metadata.shared > SM90_SHARED_BYTES:
                too_big.append(f"{tuned.fn.__name__} {config.kwargs} ({kernel.metadata.shared} B)")
    print("\n".join(["autotuning will skip (shared memory):"] + too_big))
