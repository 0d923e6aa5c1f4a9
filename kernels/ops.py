"""The public ops: argument checks, then Triton (CUDA tensors) or the plain-PyTorch reference (everything else).

Shapes: x [..., K] (any leading dims, flattened to M tokens), W [N, K], A [r, K], B [N, r] -> y [..., N].
Backend choice: `kernels._triton.backend` (env KERNELS_BACKEND=triton|reference forces one; forced Triton on CPU
tensors runs the kernels in Triton's interpreter).
"""

from __future__ import annotations

import torch

from ._triton import backend
from .lora import MAX_RANK, LoRAMatmul, check_lora_args, lora_forward_triton, lora_matmul_reference, use_fused_lora
from .nf4 import NF4Weight
from .nf4_dequant import nf4_dequantize_reference, nf4_dequantize_triton
from .qlora import QLoRAMatmul, qlora_forward_triton, qlora_matmul_reference, use_fused


def nf4_dequantize(qweight: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode an `NF4Weight` to a dense tensor of its shape, in `dtype` (default: the original weight's dtype)."""
    if not isinstance(qweight, NF4Weight):
        raise TypeError(f"qweight must be an NF4Weight (from kernels.nf4_quantize or NF4Weight.from_bnb), "
                        f"got {type(qweight).__name__}")
    if backend(qweight.packed) == "triton":
        return nf4_dequantize_triton(qweight, dtype)
    return nf4_dequantize_reference(qweight, dtype)


def lora_matmul(x: torch.Tensor, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """y = x Wᵀ + scale · (x Aᵀ) Bᵀ (LoRA, arXiv 2106.09685 Eq. 3) with W frozen; differentiable in x, A, B."""
    check_lora_args(x, W, A, B, scale)
    if W.requires_grad and torch.is_grad_enabled():
        raise ValueError("W requires grad, but lora_matmul treats the base weight as frozen and never computes dW; "
                         "freeze it with W.requires_grad_(False) (or compute x @ W.T + ... yourself)")
    if backend(x, W, A, B) == "reference":
        return lora_matmul_reference(x, W, A, B, scale)
    _check_rank(A.shape[0])
    x2d = x.reshape(-1, x.shape[-1])                                              # [M, K]
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

    `fused` picks the Triton path: None applies the dispatch rule (`kernels.qlora.use_fused`, by token
    count), True forces the decode-in-GEMM kernel, False dequantise-then-GEMM. The reference ignores it.
    """
    if not isinstance(qweight, NF4Weight):
        raise TypeError(f"qweight must be an NF4Weight (from kernels.nf4_quantize or NF4Weight.from_bnb), "
                        f"got {type(qweight).__name__}")
    check_lora_args(x, qweight, A, B, scale, w_name="qweight", w_shape=qweight.shape, w_dtype=x.dtype,
                    w_device=qweight.device)
    if backend(x, qweight.packed, A, B) == "reference":
        return qlora_matmul_reference(x, qweight, A, B, scale)
    _check_rank(A.shape[0])
    x2d = x.reshape(-1, x.shape[-1])                                              # [M, K]
    fused = use_fused(x2d.shape[0], *qweight.shape) if fused is None else bool(fused)
    if _needs_grad(x, A, B):
        y = QLoRAMatmul.apply(x2d, qweight, A, B, float(scale), fused)             # [M, N]
    else:                                   # inference: no autograd node
        y = qlora_forward_triton(x2d, qweight, A, B, float(scale), fused)[0]
    return y.reshape(*x.shape[:-1], qweight.shape[0])


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _check_rank(rank: int) -> None:
    if rank > MAX_RANK:
        raise ValueError(f"LoRA rank {rank} exceeds the Triton kernels' limit of {MAX_RANK} (the rank tile lives "
                         f"in registers); use KERNELS_BACKEND=reference for larger ranks")
