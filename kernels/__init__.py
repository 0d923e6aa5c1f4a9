"""Hand-written Triton kernels for LoRA / QLoRA, each beside its plain-PyTorch reference.

    nf4_quantize(weight, blocksize=64, double_quant=True) -> NF4Weight   NF4 + double quantisation (bitsandbytes layout)
    nf4_dequantize(qweight, dtype)                                     one-launch NF4 decode
    lora_matmul(x, W, A, B, scale)                                     x Wᵀ + s (x Aᵀ) Bᵀ, fused fwd + bwd
    qlora_matmul(x, qweight, A, B, scale)                              the same with W in NF4

Modules, each read top to bottom: `nf4` (format), `nf4_dequant`, `lora`, `qlora` (kernels and
references), `ops` (checks + backend dispatch), `_triton` (launch plumbing, interpreter support).
Triton runs on CUDA tensors, the references elsewhere; KERNELS_BACKEND=triton|reference forces one.
This package imports neither `llama` nor `peft`.
"""

from .nf4 import NF4Weight, nf4_quantize, storage_bits_per_param
from .ops import lora_matmul, nf4_dequantize, qlora_matmul

__all__ = ["NF4Weight", "nf4_quantize", "nf4_dequantize", "lora_matmul", "qlora_matmul", "storage_bits_per_param"]
