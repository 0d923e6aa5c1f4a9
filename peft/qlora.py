"""QLoRA: LoRA on a frozen 4-bit NormalFloat base (Dettmers et al., arXiv 2305.14314).

Switched on by `peft.LoraConfig(quantize_base=True)`: `peft.apply` dispatches such a config to `validate` and
`attach` here.

Shapes: M tokens, K in features, N out features, r rank.

    Y = X · doubleDequant(c1, c2, W^NF4)ᵀ + s · X Aᵀ Bᵀ          QLoRA §3, eq. (5) (written here in x Wᵀ form)

The NF4 format, double quantisation and the kernels live in `kernels` (`nf4_quantize`, `nf4_dequantize`,
`qlora_matmul`); NF4 storage of a frozen weight, the LoRA scale, initialisation and the merge sum are
`peft.lora_core`'s; this file decides what gets quantised and keeps the adapter bookkeeping.

Choices (QLoRA arXiv 2305.14314, artidoro/qlora):
  * "All linear layers" (QLoRA §4, and the Guanaco recipe): with `quantize_base=True` every block linear
    (wq wk wv wo w1 w2 w3 in every layer) is stored in NF4 with double quantisation and block size 64, whether or not
    it carries LoRA; layers without LoRA become a frozen `NF4Linear`. A Llama 4 MoE layer's routed experts are
    quantised too, one NF4 matrix per expert (`peft.qlora_experts`; LoRA on them with target "experts"). The
    output head (lm_head) and the embeddings stay in high precision, as in the QLoRA code; `output` may still carry
    a plain LoRA. Use target_modules=(all seven) for the paper's recipe.
  * Compute dtype: `LoraConfig.compute_dtype` (None: the model's dtype; the paper uses bfloat16). Inputs are cast to
    it and outputs cast back, like bitsandbytes' Linear4bit. LoRA factors are stored in at least float32 and cast to
    the compute dtype for the matmul. float64 (for exact tests) runs the same formula in eager PyTorch on the
    weight dequantised to float32; the kernels take float32/float16/bfloat16.
  * Gradients: none for the NF4 weight (it is a buffer, not a parameter); the input gets dX = dY·W_dq + s·dY·B·A
    through the kernel's backward, A and B get theirs.
  * Merging dequantises W to the compute dtype, adds sBA (in at least float32) and keeps that dense weight: it never
    re-quantises (which would add a second rounding error, as HF PEFT's does). The NF4 codes are kept so that unmerge
    is exact (it drops the dense weight again).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from llama.moe import Experts

from . import lora
from .lora_core import (NF4_FIELDS, LoraConfig, dequantize, dropout_active, lora_dropout, lora_factors, master_dtype,
                        merge_weight, nf4_weight, quantize_frozen)
from .qlora_experts import NF4Experts, QLoRAExperts
from .targets import (BLOCK_LINEARS, EXPERT_MATRICES, EXPERT_TARGET, check_plain_linears, iter_experts, iter_linears,
                      shared_parameter_ids)


class NF4Linear(nn.Module):
    """A frozen bias-free linear layer whose weight is stored in NF4 (+ double quantisation): y = x W_dqᵀ."""

    def __init__(self, qweight: "kernels.NF4Weight", compute_dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.compute_dtype, self.blocksize, self.blocksize2 = compute_dtype, qweight.blocksize, qweight.blocksize2
        self.weight_dtype = qweight.dtype
        for field in NF4_FIELDS:  # buffers: they follow .to(device) and appear in the state dict
            self.register_buffer(f"weight_{field}", getattr(qweight, field))

    @property
    def qweight(self) -> "kernels.NF4Weight":
        fields = {field: getattr(self, f"weight_{field}") for field in NF4_FIELDS}
        return nf4_weight(fields, (self.out_features, self.in_features), self.weight_dtype, self.blocksize,
                          self.blocksize2)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W_dq [N, K] in `dtype`."""
        return dequantize(self.qweight, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = x.to(self.compute_dtype)
        return F.linear(xc, self.dequantized_weight(xc.dtype)).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nf4 blocksize={self.blocksize}, "
                f"double_quant={self.weight_absmax2 is not None}, compute_dtype={self.compute_dtype}")


class QLoRALinear(NF4Linear):
    """NF4 base weight (frozen) plus a LoRA update s·BA in the compute dtype: QLoRA eq. (5)."""

    def __init__(self, qweight: "kernels.NF4Weight", compute_dtype: torch.dtype, config: LoraConfig):
        super().__init__(qweight, compute_dtype)
        N, K = self.out_features, self.in_features
        self.r, self.scaling = config.r, config.scaling
        self.use_dora = False
        self.lora_dropout = lora_dropout(config.dropout)
        self.lora_A, self.lora_B = lora_factors((config.r, K), (N, config.r), K, config, master_dtype(compute_dtype),
                                                qweight.device)  # [r, K], [N, r]
        self.merged = False
        self.register_buffer("weight", None, persistent=False)  # the dense merged weight, only while merged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = x.to(self.compute_dtype)
        if self.merged:
            return F.linear(xc, self.weight).to(x.dtype)
        A, B = self.lora_A.to(xc.dtype), self.lora_B.to(xc.dtype)
        dropout = dropout_active(self.lora_dropout)
        if dropout or xc.dtype not in kernels.SUPPORTED_DTYPES:  # active dropout or float64: the formula, eagerly
            # eq. (5): Y = X W_dqᵀ + s · drop(X) Aᵀ Bᵀ
            dropped = self.lora_dropout(xc)
            y = F.linear(xc, self.dequantized_weight(xc.dtype)) + self.scaling * F.linear(F.linear(dropped, A), B)
        else:
            # eq. (5) in one op: NF4 decoded inside the GEMM (Triton on CUDA, dequantise-then-matmul elsewhere)
            y = kernels.qlora_matmul(xc, self.qweight, A, B, self.scaling)
        return y.to(x.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W ← dequant(W^NF4) + sBA, dense in the compute dtype (computed in at least float32); never re-quantised."""
        if self.merged:
            raise RuntimeError("this QLoRA layer is already merged (unmerge first)")
        W_dq = self.dequantized_weight(master_dtype(self.compute_dtype))
        self.weight = merge_weight(W_dq, self.lora_A, self.lora_B, self.scaling)[0].to(self.compute_dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("this QLoRA layer is not merged; nothing to unmerge")
        self.weight = None  # the NF4 codes were kept: back to exactly the trained base
        self.merged = False

    def adapter_parameter_names(self) -> list[str]:
        return ["lora_A", "lora_B"]


# -- attaching to a model -------------------------------------------------------------------------------------------
def validate(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """LoRA's checks of the targets (`peft.lora.validate`), and every block linear (all get quantised) still the
    model's own nn.Linear."""
    found = lora.validate(model, config)
    check_plain_linears(list(iter_linears(model, BLOCK_LINEARS)))
    return found


def attach(model: nn.Module, config: LoraConfig, found: list[tuple[str, nn.Module, str, nn.Module]]) -> list[str]:
    """Quantise every block linear and routed expert to NF4 (LoRA on the targeted ones); `output` keeps a plain
    LoRA if targeted. Return the new parameters' qualified names."""
    compute = getattr(torch, config.compute_dtype) if config.compute_dtype else model.tok_embeddings.weight.dtype
    targets = {name for name, *_ in found}
    block = list(iter_linears(model, BLOCK_LINEARS))
    # quantise everything first, so a bad weight (NaN/inf, reported by nf4_quantize) leaves the model untouched
    quantized = [quantize_frozen(child.weight, name) for name, _, _, child in block]
    # the routed experts of Llama 4 MoE layers too: NF4, with a per-expert LoRA where targeted (peft.qlora_experts)
    experts = [(name, parent, QLoRAExperts(child, compute, config) if name in targets else NF4Experts(child, compute))
               for name, parent, child in iter_experts(model)]
    names = []
    for name, parent, layer in experts:
        setattr(parent, EXPERT_TARGET, layer)
        if isinstance(layer, QLoRAExperts):
            names += [f"{name}.{p}" for p in layer.adapter_parameter_names()]
    for (name, parent, attr, _), q in zip(block, quantized):
        if name in targets:
            layer = QLoRALinear(q, compute, config)
            names += [f"{name}.{p}" for p in layer.adapter_parameter_names()]
        else:
            layer = NF4Linear(q, compute)
        setattr(parent, attr, layer)
    shared = shared_parameter_ids(model)
    for name, parent, attr, child in found:
        if name == "output":  # the head stays in high precision (QLoRA keeps lm_head unquantised)
            layer = lora.LoRALinear(child, config, shares_weight=id(child.weight) in shared)
            setattr(parent, attr, layer)
            names += [f"output.{p}" for p in layer.adapter_parameter_names()]
    return names


def dequantize_model(model: nn.Module, dtype: Optional[torch.dtype] = None) -> None:
    """Replace every frozen `NF4Linear` (no adapter) by a dense nn.Linear holding its dequantised weight, and every
    frozen `NF4Experts` by dense `llama.moe.Experts`."""
    for layer in model.layers:
        child = getattr(layer.feed_forward, EXPERT_TARGET, None)
        if type(child) is NF4Experts:
            dense = Experts(child.n_experts, child.dim, child.hidden_dim).to(device=child.w1_packed.device,
                                                                             dtype=dtype or child.compute_dtype)
            with torch.no_grad():
                for name in EXPERT_MATRICES:
                    getattr(dense, name).copy_(child.dequantized_weight(name, None, getattr(dense, name).dtype))
            dense.requires_grad_(False)
            setattr(layer.feed_forward, EXPERT_TARGET, dense)
    for _, parent, attr, child in list(iter_linears(model, BLOCK_LINEARS)):
        if type(child) is NF4Linear:
            dense = nn.Linear(child.in_features, child.out_features, bias=False, device=child.weight_packed.device,
                              dtype=dtype or child.compute_dtype)
            with torch.no_grad():
                dense.weight.copy_(child.dequantized_weight(dense.weight.dtype))
            dense.weight.requires_grad_(False)
            setattr(parent, attr, dense)
