"""Hand-written Triton kernels for LoRA / QLoRA, each beside its plain-PyTorch reference.

    nf4_quantize(weight, blocksize=64, double_quant=True) -> NF4Weight   NF4 + double quantisation (bitsandbytes layout)
    nf4_dequantize(qweight, dtype)                                     one-launch NF4 decode
    lora_matmul(x, W, A, B, scale)                                     x Wᵀ + s (x Aᵀ) Bᵀ, fused fwd + bwd
    qlora_matmul(x, qweight, A, B, scale)                              the same with W in NF4
    SUPPORTED_DTYPES, MAX_RANK                                         what the kernels take: dtypes, largest LoRA rank

Modules, each read top to bottom (what it computes, the kernel, the launcher, the autograd wrapper, the reference):
    nf4.py          the NF4 format: quantiser (PyTorch) and the device functions that decode it
    nf4_dequant.py  NF4 dequantisation kernel
    lora.py         fused LoRA GEMM and its backward
    qlora.py        fused NF4 + LoRA GEMM
    schedules.py    other schedules of those tiles: TMA loads, persistent programs, split-K
    ops.py          the public ops: argument checks, backend and dispatch rules
    _triton.py      shared plumbing: the limits above, interpreter or compiled, autotune + launch, device helpers
Triton runs on CUDA tensors, the references elsewhere; KERNELS_BACKEND=triton|reference forces one. Kernels run in
Triton's interpreter when TRITON_INTERPRET=1 is set before triton is imported (docs/kernels.md).
This package imports neither `llama` nor `peft`.
"""

from ._triton import MAX_RANK, SUPPORTED_DTYPES
from .nf4 import NF4Weight, nf4_quantize, storage_bits_per_param
from .ops import lora_matmul, nf4_dequantize, qlora_matmul

__all__ = ["NF4Weight", "nf4_quantize", "nf4_dequantize", "lora_matmul", "qlora_matmul", "storage_bits_per_param",
           "SUPPORTED_DTYPES", "MAX_RANK"]
