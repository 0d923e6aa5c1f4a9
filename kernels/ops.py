"""The public ops: every argument check, then the path (backend and dispatch rule), then a kernel or a reference.

    nf4_dequantize(qweight, dtype=None)                        NF4Weight -> dense tensor
    lora_matmul(x, W, A, B, scale)                             y = x Wᵀ + s (x Aᵀ) Bᵀ
    qlora_matmul(x, qweight, A, B, scale, *, fused=None)       the same with W in NF4

Shapes: x [..., K] (any leading dims, flattened to M tokens), W [N, K], A [r, K], B [N, r] -> y [..., N].
Arguments are checked here, before anything is launched, and each error names the problem and the fix; the
kernels, launchers and references behind these entry points assume valid arguments. (`nf4_quantize` and
`NF4Weight` check their own arguments in kernels/nf4.py.)

Backend (`kernels._triton.backend`): Triton when every tensor argument is on a CUDA device, the reference otherwise;
KERNELS_BACKEND=triton|reference forces one. Forced Triton on CPU tensors needs Triton's interpreter.

Dispatch rules, measured on an H200 (docs/kernels.md, "Dispatch rules"; module constants, to re-measure elsewhere):
  * lora_matmul: the fused kernel from FUSED_MIN_TOKENS tokens on; below that, cuBLAS's GEMM plus two skinny LoRA
    GEMMs (the eager reference) is faster. KERNELS_BACKEND=triton forces the fused kernel at any token count.
  * qlora_matmul: the fused decode-in-GEMM kernel up to FUSED_MAX_TOKENS tokens on weights of at most
    FUSED_MAX_PARAMS values, dequantise-then-GEMM otherwise.
"""

from __future__ import annotations

import torch

from ._triton import INTERPRETED, MAX_RANK, SUPPORTED_DTYPES, backend, backend_forced
from .lora import LoRAMatmul, lora_forward_triton, lora_matmul_reference
from .nf4 import NF4Weight
from .nf4_dequant import nf4_dequantize_reference, nf4_dequantize_triton
from .qlora import QLoRAMatmul, qlora_forward_triton, qlora_matmul_reference

FUSED_MIN_TOKENS = 1024              # lora_matmul: fused kernel from this many tokens on
FUSED_MAX_TOKENS = 64                # qlora_matmul: fused decode-in-GEMM up to this many tokens...
FUSED_MAX_PARAMS = 4096 * 4096       # ...and only for weights of at most this many values
INT32_LIMIT = 2**31                  # the GEMM kernels index elements with int32


def use_fused_lora(tokens: int) -> bool:
    """lora_matmul's rule: the fused kernel from FUSED_MIN_TOKENS tokens on, or always under KERNELS_BACKEND=triton."""
    return tokens >= FUSED_MIN_TOKENS or backend_forced() == "triton"


def use_fused_qlora(tokens: int, n: int, k: int) -> bool:
    """qlora_matmul's rule for M tokens and an [N, K] NF4 weight: fused decode-in-GEMM, else dequantise-then-GEMM."""
    return n * k <= FUSED_MAX_PARAMS and tokens <= FUSED_MAX_TOKENS


def nf4_dequantize(qweight: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode an `NF4Weight` to a dense tensor of its shape, in `dtype` (default: the original weight's dtype)."""
    _check_nf4_weight(qweight)
    dtype = qweight.dtype if dtype is None else dtype
    if backend(qweight.packed) == "reference":
        _check_dtype(dtype, SUPPORTED_DTYPES + (torch.float64,), "cannot dequantise to")
        return nf4_dequantize_reference(qweight, dtype)
    _check_dtype(dtype, SUPPORTED_DTYPES, "the Triton kernel cannot dequantise to",
                 " (float64: use KERNELS_BACKEND=reference)")
    _check_launchable(qweight.packed)
    if qweight.numel >= INT32_LIMIT:
        raise ValueError(f"the weight has {qweight.numel} values; the kernel counts absmax blocks in int32 up to "
                         f"2^31 values: split the weight, or use KERNELS_BACKEND=reference")
    return nf4_dequantize_triton(qweight, dtype)


def lora_matmul(x: torch.Tensor, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """y = x Wᵀ + scale · (x Aᵀ) Bᵀ (LoRA, arXiv 2106.09685 Eq. 3) with W frozen; differentiable in x, A, B."""
    _check_lora_args(x, W, A, B, scale)
    if W.requires_grad and torch.is_grad_enabled():
        raise ValueError("W requires grad, but lora_matmul treats the base weight as frozen and never computes dW; "
                         "freeze it with W.requires_grad_(False) (or compute x @ W.T + ... yourself)")
    if backend(x, W, A, B) == "reference":
        return lora_matmul_reference(x, W, A, B, scale)
    _check_launchable(x, W, A, B)
    _check_rank(A.shape[0])
    x2d = x.reshape(-1, x.shape[-1])                                              # [M, K]
    _check_int32(x2d, W, out_shape=(x2d.shape[0], W.shape[0]))
    if not use_fused_lora(x2d.shape[0]):
        return lora_matmul_reference(x, W, A, B, scale)                           # cuBLAS wins at few tokens
    if _needs_grad(x, A, B):
        y = LoRAMatmul.apply(x2d, W, A, B, float(scale))                          # [M, N]
    else:                                   # inference: no autograd node, no saved S (less host time)
        y = lora_forward_triton(x2d, W, A, B, float(scale))[0]
    return y.reshape(*x.shape[:-1], W.shape[0])


def qlora_matmul(x: torch.Tensor, qweight: NF4Weight, A: torch.Tensor, B: torch.Tensor, scale: float,
                 *, fused: bool | None = None) -> torch.Tensor:
    """y = x W_NF4ᵀ + scale · (x Aᵀ) Bᵀ (QLoRA, arXiv 2305.14314 Eq. 5); differentiable in x, A, B.

    `fused` picks the Triton path: None applies the dispatch rule (`use_fused_qlora`, by token count), True forces
    the decode-in-GEMM kernel, False dequantise-then-GEMM. The reference ignores it.
    """
    _check_nf4_weight(qweight)
    _check_lora_args(x, qweight, A, B, scale, w_name="qweight", w_shape=qweight.shape, w_dtype=x.dtype,
                     w_device=qweight.device)
    if backend(x, qweight.packed, A, B) == "reference":
        return qlora_matmul_reference(x, qweight, A, B, scale)
    _check_launchable(x, qweight.packed, A, B)
    _check_rank(A.shape[0])
    x2d = x.reshape(-1, x.shape[-1])                                              # [M, K]
    _check_int32(x2d, qweight, out_shape=(x2d.shape[0], qweight.shape[0]))
    fused = use_fused_qlora(x2d.shape[0], *qweight.shape) if fused is None else bool(fused)
    if _needs_grad(x, A, B):
        y = QLoRAMatmul.apply(x2d, qweight, A, B, float(scale), fused)             # [M, N]
    else:                                   # inference: no autograd node
        y = qlora_forward_triton(x2d, qweight, A, B, float(scale), fused)[0]
    return y.reshape(*x.shape[:-1], qweight.shape[0])


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# ---- argument checks -----------------------------------------------------------------------------------------------

def _check_nf4_weight(qweight) -> None:
    if not isinstance(qweight, NF4Weight):
        raise TypeError(f"qweight must be an NF4Weight (from kernels.nf4_quantize or NF4Weight.from_bnb), "
                        f"got {type(qweight).__name__}")


def _check_dtype(dtype, allowed: tuple, what: str, hint: str = "") -> None:
    if dtype not in allowed:
        raise TypeError(f"{what} {dtype}; use one of {allowed}{hint}")


def _check_launchable(*tensors: torch.Tensor) -> None:
    """Compiled Triton kernels run on CUDA tensors only; the interpreter (TRITON_INTERPRET=1) runs on any."""
    off_gpu = [t.device for t in tensors if not t.is_cuda]
    if off_gpu and not INTERPRETED:
        raise RuntimeError(f"KERNELS_BACKEND=triton chose the Triton kernels for tensors on {off_gpu[0]}, but "
                           f"compiled Triton kernels run on CUDA tensors only; set TRITON_INTERPRET=1 before triton "
                           f"is first imported (Triton's interpreter), move the tensors to a GPU, or use "
                           f"KERNELS_BACKEND=reference")


def _check_rank(rank: int) -> None:
    if rank > MAX_RANK:
        raise ValueError(f"LoRA rank {rank} exceeds the Triton kernels' limit of {MAX_RANK} (the rank tile lives "
                         f"in registers); use KERNELS_BACKEND=reference for larger ranks")


def _check_int32(x2d: torch.Tensor, W, out_shape: tuple) -> None:
    sizes = {"x": x2d.numel(), "the weight": W.numel() if isinstance(W, torch.Tensor) else W.numel,
             "the output": out_shape[0] * out_shape[1]}
    for name, size in sizes.items():
        if size >= INT32_LIMIT:
            raise ValueError(f"{name} has {size} elements; the GEMM kernels index with int32 (< 2^31 elements): "
                             f"split the call over fewer tokens, or use KERNELS_BACKEND=reference")


def _check_lora_args(x, W, A, B, scale, w_name: str = "W", w_shape=None, w_dtype=None, w_device=None) -> None:
    """The checks shared by lora_matmul and qlora_matmul (both backends); W may be an NF4Weight (w_* given)."""
    for name, t in (("x", x), (w_name, W), ("A", A), ("B", B)):
        if name != w_name and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a Python number (alpha / r), got {type(scale).__name__}")
    if scale != scale or abs(scale) == float("inf"):
        raise ValueError(f"scale is {scale}; pass a finite alpha / r")
    w_shape = tuple(W.shape) if w_shape is None else tuple(w_shape)
    w_dtype = W.dtype if w_dtype is None else w_dtype
    w_device = W.device if w_device is None else w_device
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; use one of {SUPPORTED_DTYPES}")
    for name, dtype in ((w_name, w_dtype), ("A", A.dtype), ("B", B.dtype)):
        if dtype != x.dtype:
            raise TypeError(f"{name} is {dtype} but x is {x.dtype}; cast them to one compute dtype "
                            f"(e.g. {name}.to(x.dtype))")
    for name, device in ((w_name, w_device), ("A", A.device), ("B", B.device)):
        if device != x.device:
            raise ValueError(f"{name} is on {device} but x is on {x.device}; move them to one device")
    if len(w_shape) != 2:
        raise ValueError(f"{w_name} must be 2-D [N, K], got shape {w_shape}")
    N, K = w_shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x has shape {tuple(x.shape)} but {w_name} expects {K} input features in the last "
                         f"dimension")
    if A.dim() != 2 or B.dim() != 2:
        raise ValueError(f"A and B must be 2-D (A [r, K], B [N, r]), got {tuple(A.shape)} and {tuple(B.shape)}")
    if A.shape[0] != B.shape[1]:
        raise ValueError(f"A has rank {A.shape[0]} (shape {tuple(A.shape)}) but B has rank {B.shape[1]} "
                         f"(shape {tuple(B.shape)}); pass A [r, K] and B [N, r] of one adapter")
    if A.shape[0] < 1:
        raise ValueError("the LoRA rank is 0; pass A [r, K] and B [N, r] with r >= 1")
    if A.shape[1] != K:
        raise ValueError(f"A has shape {tuple(A.shape)} but must be [r, {K}] ([rank, in_features])")
    if B.shape[0] != N:
        raise ValueError(f"B has shape {tuple(B.shape)} but must be [{N}, r] ([out_features, rank])")
