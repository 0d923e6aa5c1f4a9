"""QLoRA on the routed experts of a Llama 4 mixture-of-experts layer: the stacked expert matrices in NF4.

Shapes: E experts, C model dim, F expert hidden size, r rank; each matrix W [E, K, N] with (K, N) = (C, F) for w1
and w3, (F, C) for w2, applied as x @ W_e (Meta's layout, `llama.moe.Experts`).

The routed experts hold almost all of a Llama 4 model's weights (Scout: 16 experts x 48 layers), so the QLoRA
recipe of quantising "all linear layers" (QLoRA §4) must cover them: with `LoraConfig(quantize_base=True)` every
MoE layer's experts are stored in NF4 like the block linears (`peft.qlora`), each expert's matrix quantised on its
own (block size 64 over the flattened [K, N] matrix, double quantisation), the per-expert NF4 fields stacked along
a leading E axis. Each matmul decodes the one expert it needs:

    x @ (doubleDequant(c1_e, c2_e, W_e^NF4) + s · A_e B_e)        QLoRA eq. (5), per expert, in x @ W form

`NF4Experts` is the frozen module (experts not targeted); `QLoRAExperts` adds the per-expert LoRA factors of
`peft.lora_experts` (same names, lora_A.{w1,w2,w3} [E, K, r] and lora_B.{w1,w2,w3} [E, r, N], so an adapter file
fits either). As for the block linears, merging dequantises and keeps a dense weight, never re-quantising, and
unmerging drops it again. The computation is eager PyTorch (decode the expert, then matmul); the fused Triton
QLoRA kernel takes one 2-D weight and is not used here. NF4 storage, scale, initialisation and the merge sum are
`peft.lora_core`'s.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

import kernels

from .lora_core import (NF4_FIELDS, LoraConfig, dequantize, dropout_active, lora_dropout, master_dtype, merge_weight,
                        nf4_weight, quantize_frozen)
from .lora_experts import IN_DIM, SwiGLUExperts, expert_adapters, lora_update
from .targets import EXPERT_MATRICES


class NF4Experts(SwiGLUExperts):
    """Frozen routed experts stored in NF4 (+ double quantisation), one quantisation per expert and matrix."""

    def __init__(self, base: nn.Module, compute_dtype: torch.dtype):
        super().__init__()
        E, C, Fh = base.w1.shape  # [E, C, F]
        self.n_experts, self.dim, self.hidden_dim, self.compute_dtype = E, C, Fh, compute_dtype
        self.shapes = {name: tuple(getattr(base, name).shape) for name in EXPERT_MATRICES}  # {name: (E, K, N)}
        # everything first: a NaN/inf weight leaves `base` in use and this module unbuilt
        quantised = {name: [quantize_frozen(getattr(base, name)[e], f"expert matrix {name} (expert {e})")
                            for e in range(E)] for name in EXPERT_MATRICES}
        first = quantised["w1"][0]
        self.weight_dtype, self.blocksize, self.blocksize2 = first.dtype, first.blocksize, first.blocksize2
        for name, per_expert in quantised.items():  # buffers [E, ...]: they follow .to() and enter the state dict
            for field in NF4_FIELDS:
                self.register_buffer(f"{name}_{field}", torch.stack([getattr(q, field) for q in per_expert]))

    def qweight(self, name: str, e: int) -> "kernels.NF4Weight":
        """Expert e's matrix `name` as an NF4Weight of shape [K, N] (views into the stacked buffers)."""
        fields = {field: getattr(self, f"{name}_{field}")[e] for field in NF4_FIELDS}
        return nf4_weight(fields, self.shapes[name][1:], self.weight_dtype, self.blocksize, self.blocksize2)

    def dequantized_weight(self, name: str, e: Optional[int], dtype: torch.dtype) -> torch.Tensor:
        """W_e [K, N] (or all experts [E, K, N] when e is None) in `dtype`."""
        if e is not None:
            return dequantize(self.qweight(name, e), dtype)
        return torch.stack([dequantize(self.qweight(name, i), dtype) for i in range(self.n_experts)])

    def _matmul(self, name: str, x: torch.Tensor, e: Optional[int] = None) -> torch.Tensor:
        """x @ W_e in the compute dtype, cast back to x's dtype (as NF4Linear)."""
        xc = x.to(self.compute_dtype)
        return (xc @ self.dequantized_weight(name, e, xc.dtype)).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"experts={self.n_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, nf4 blocksize="
                f"{self.blocksize}, compute_dtype={self.compute_dtype}")


class QLoRAExperts(NF4Experts):
    """NF4 routed experts (frozen) plus a trainable per-expert LoRA update s·A_e B_e of w1, w2, w3.

    `peft.apply` has checked the rank (r <= min(C, F))."""

    def __init__(self, base: nn.Module, compute_dtype: torch.dtype, config: LoraConfig):
        super().__init__(base, compute_dtype)
        self.r, self.scaling = config.r, config.scaling
        self.lora_dropout = lora_dropout(config.dropout)
        self.lora_A, self.lora_B = expert_adapters(self.shapes, config, master_dtype(compute_dtype), base.w1.device)
        self.merged = False
        for name in EXPERT_MATRICES:  # the dense merged weights [E, K, N], only while merged
            self.register_buffer(f"merged_{name}", None, persistent=False)

    def _matmul(self, name: str, x: torch.Tensor, e: Optional[int] = None) -> torch.Tensor:
        """x @ (W_e + s·A_e B_e), QLoRA eq. (5): the decoded expert plus the LoRA update, in the compute dtype."""
        xc = x.to(self.compute_dtype)
        if self.merged:
            W = getattr(self, f"merged_{name}")
            return (xc @ (W if e is None else W[e])).to(x.dtype)
        A, B = self.lora_A[name], self.lora_B[name]
        if e is not None:
            A, B = A[e], B[e]  # [K, r], [r, N]
        dropped = self.lora_dropout(xc) if dropout_active(self.lora_dropout) else xc
        y = xc @ self.dequantized_weight(name, e, xc.dtype) + lora_update(dropped, A, B, self.scaling)
        return y.to(x.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W_e ← dequant(W_e^NF4) + s·A_e B_e, dense in the compute dtype (summed in >= float32); never
        re-quantised. The NF4 codes are kept, so `unmerge` returns exactly to the trained base."""
        if self.merged:
            raise RuntimeError("these QLoRA experts are already merged (unmerge first)")
        compute = master_dtype(self.compute_dtype)
        for name in EXPERT_MATRICES:
            merged, _ = merge_weight(self.dequantized_weight(name, None, compute), self.lora_A[name],
                                     self.lora_B[name], self.scaling, in_dim=IN_DIM)  # [E, K, N]
            setattr(self, f"merged_{name}", merged.to(self.compute_dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("these QLoRA experts are not merged; nothing to unmerge")
        for name in EXPERT_MATRICES:
            setattr(self, f"merged_{name}", None)
        self.merged = False

    def adapter_parameter_names(self) -> list[str]:
        return [f"lora_{side}.{name}" for side in ("A", "B") for name in EXPERT_MATRICES]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", r={self.r}, scaling={self.scaling:g}, merged={self.merged}"
