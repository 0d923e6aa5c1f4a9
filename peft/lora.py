"""LoRA on frozen linear layers (Hu et al., arXiv 2106.09685), with rsLoRA and DoRA.

Shapes: B batch, T sequence, M tokens (= B·T), K in features, N out features, r rank.

    h = W0 x + s · B A drop(x),  s = alpha/r            LoRA §4.1, eq. (3); dropout on the LoRA input as in loralib
    A ∈ R^{r×K} Kaiming-uniform(a=√5), B ∈ R^{N×r} zero   so ΔW = BA = 0 and the model starts at the pretrained one
    rsLoRA (arXiv 2312.03732): s = alpha / √r
    DoRA (arXiv 2402.09353, eq. 5):  W' = m · (W0 + sBA) / ‖W0 + sBA‖_row, m initialised to ‖W0‖_row

This file is the layer (`LoRALinear`) and the attach step. The hyper-parameters (`LoraConfig`), the scale rule,
A/B initialisation, master dtype, ΔW, DoRA's rescale and the merge arithmetic live in `peft.lora_core`, shared with
LoRA on NF4 weights (`peft.qlora`) and on Llama 4's routed experts; the choices made where the papers are silent
are listed there. Here:
  * A weight tied to the embeddings (Llama 3.2 1B/3B `output`) is untied on merge rather than modifying the
    embedding, and re-tied on unmerge.
  * Llama 4 MoE layers: the names w1 w2 w3 match the shared expert's linears (`feed_forward.shared_expert.w1`);
    the routed experts are batched [E, K, N] parameters (`llama.moe.Experts`), not `nn.Linear` children. The extra
    target name `experts` gives each routed expert its own update of w1, w2 and w3 (`peft.lora_experts`), DoRA
    included; without it they stay frozen.
  * `LoraConfig(quantize_base=True)` is QLoRA: `peft.apply` hands it to `peft.qlora`, which uses this layer for
    the high-precision `output` head only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels

from .lora_core import (LoraConfig, delta_weight, dora_norm, dora_output, dropout_active, lora_dropout, lora_factors,
                        master_dtype, merge_weight, unmerge_weight)
from .lora_experts import LoRAExperts
from .targets import (EXPERT_TARGET, LINEAR_NAMES, check_layer_indices, check_plain_linears, iter_experts,
                      iter_linears, shared_parameter_ids)


def lora_matmul(x: torch.Tensor, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """y = x Wᵀ + s·(x Aᵀ) Bᵀ for x [..., K], W [N, K], A [r, K], B [N, r] -> y [..., N].

    The one call site of the fused kernel: `kernels.lora_matmul` when it takes these
    inputs (dtype in kernels.SUPPORTED_DTYPES, r <= kernels.MAX_RANK), else the same formula in eager PyTorch.
    """
    if x.dtype in kernels.SUPPORTED_DTYPES and A.shape[0] <= kernels.MAX_RANK:
        return kernels.lora_matmul(x, W, A, B, scale)  # Triton on CUDA, its plain-PyTorch reference elsewhere
    return F.linear(x, W) + scale * F.linear(F.linear(x, A), B)


class LoRALinear(nn.Module):
    """A frozen linear layer W0 plus a trainable low-rank update s·BA (and, for DoRA, a magnitude m).

    Keeps the wrapped layer's `weight` Parameter under the same name, so the base model's state-dict keys are
    unchanged (`layers.0.attention.wq.weight`); the adapter adds `lora_A`, `lora_B` (and `lora_magnitude`).
    `peft.apply` has checked the layer (a bias-free nn.Linear) and the rank (r <= min(N, K)).
    """

    def __init__(self, base: nn.Linear, config: LoraConfig, shares_weight: bool = False):
        super().__init__()
        N, K = base.weight.shape
        self.in_features, self.out_features, self.r = K, N, config.r
        self.weight = base.weight  # W0, frozen (same Parameter object: ties survive)
        self.scaling = config.scaling
        self.use_dora, self.shares_weight = config.use_dora, shares_weight
        self.lora_dropout = lora_dropout(config.dropout)
        dtype = master_dtype(base.weight.dtype)
        self.lora_A, self.lora_B = lora_factors((config.r, K), (N, config.r), K, config, dtype,
                                                base.weight.device)  # [r, K], [N, r]
        if self.use_dora:
            # DoRA §4.1: m starts as ‖W0‖ per output feature, computed exactly as the forward computes n.
            with torch.no_grad():
                m = dora_norm(self.weight, delta_weight(self.lora_A, self.lora_B, self.scaling, self.weight.dtype))
            self.lora_magnitude = nn.Parameter(m.to(dtype))  # [N]
        self.merged = False
        self._merge_cache: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight)
        A, B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        if self.use_dora:
            return self._dora_forward(x, A, B)
        if dropout_active(self.lora_dropout):  # the unfused formula
            # LoRA eq. (3) with dropout on the adapter input: h = W0 x + s·B A drop(x)
            return F.linear(x, self.weight) + self.scaling * F.linear(F.linear(self.lora_dropout(x), A), B)
        # LoRA eq. (3): h = W0 x + ΔW x = W0 x + s·B A x
        return lora_matmul(x, self.weight, A, B, self.scaling)

    def _dora_forward(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        # DoRA eq. (5): W'x = (m/n)·(W0 + sBA) x, n = ‖W0 + sBA‖_row detached
        W = self.weight.to(x.dtype)
        m_over_n = self.lora_magnitude.to(x.dtype) / dora_norm(W, delta_weight(A, B, self.scaling, x.dtype))  # [N]
        base = F.linear(x, W)  # [..., N]
        if dropout_active(self.lora_dropout):
            dropped = self.lora_dropout(x)
            base_dropped = F.linear(dropped, W)
        else:
            dropped, base_dropped = x, base
        update = self.scaling * F.linear(F.linear(dropped, A), B)  # s·B A drop(x)  [..., N]
        return dora_output(base, base_dropped, update, m_over_n)

    # -- merge / unmerge -------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """W ← W0 + sBA (DoRA: W ← (m/n)(W0 + sBA)), computed in at least float32 and cast to W's dtype."""
        if self.merged:
            raise RuntimeError("this LoRA layer is already merged; merging twice would add ΔW twice (unmerge first)")
        W = self.weight
        merged, self._merge_cache["dora_norm"] = merge_weight(W, self.lora_A, self.lora_B, self.scaling,
                                                              self.lora_magnitude if self.use_dora else None)
        if self.shares_weight:  # do not write into the embedding matrix this weight is tied to
            self._merge_cache["tied_weight"] = W
            self.weight = nn.Parameter(merged.to(W.dtype), requires_grad=False)
        else:
            W.copy_(merged.to(W.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge`: restore the tied weight, or W0 = W − sBA (DoRA: W0 = W·n/m − sBA)."""
        if not self.merged:
            raise RuntimeError("this LoRA layer is not merged; nothing to unmerge")
        if self.shares_weight:
            self.weight = self._merge_cache["tied_weight"]
        else:
            W = self.weight
            W.copy_(unmerge_weight(W, self.lora_A, self.lora_B, self.scaling,
                                   self.lora_magnitude if self.use_dora else None,
                                   self._merge_cache["dora_norm"]).to(W.dtype))
        self._merge_cache.clear()
        self.merged = False

    def adapter_parameter_names(self) -> list[str]:
        return ["lora_A", "lora_B"] + (["lora_magnitude"] if self.use_dora else [])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}, dora={self.use_dora}, merged={self.merged}")


# -- attaching to a model -------------------------------------------------------------------------------------------
def validate(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """Every targeted linear and routed-experts module, checked (exists, still the model's own, rank fits)."""
    layers = check_layer_indices(model, config.layers)
    linear_names = [n for n in config.target_modules if n != EXPERT_TARGET]
    found = list(iter_linears(model, linear_names, layers))
    if EXPERT_TARGET in config.target_modules:
        found += [(name, parent, EXPERT_TARGET, child) for name, parent, child in iter_experts(model, layers)]
    present = {name.rsplit(".", 1)[-1] for name, *_ in found}
    missing = [n for n in config.target_modules if n not in present]
    if missing:
        available = sorted({n.rsplit(".", 1)[-1] for n, *_ in iter_linears(model, LINEAR_NAMES, layers)}
                           | ({EXPERT_TARGET} if any(True for _ in iter_experts(model, layers)) else set()))
        raise ValueError(f"target module(s) {missing} not found in the selected layers of this model; "
                         f"the adaptable modules there are {', '.join(available) or 'none'}"
                         + (" (`experts` exists only in Llama 4 MoE layers)" if EXPERT_TARGET in missing else ""))
    check_plain_linears([entry for entry in found if entry[2] != EXPERT_TARGET])
    for name, _, attr, child in found:
        if attr == EXPERT_TARGET:
            if isinstance(child, LoRAExperts):
                raise ValueError(f"{name} already carries LoRA experts; build a fresh model to apply LoRA")
            K, N = child.w1.shape[1:]  # w1 [E, C, F]: C -> F
        else:
            N, K = child.weight.shape
        if config.r > min(N, K):
            raise ValueError(f"LoRA rank r={config.r} exceeds {name}'s size {K}->{N}; use r <= {min(N, K)}")
    return found


def attach(model: nn.Module, config: LoraConfig, found: list[tuple[str, nn.Module, str, nn.Module]]) -> list[str]:
    """Replace every module `validate` found by its LoRA version; return the new parameters' qualified names."""
    shared = shared_parameter_ids(model)
    names = []
    for name, parent, attr, child in found:
        if attr == EXPERT_TARGET:  # routed experts of a Llama 4 MoE layer (peft.lora_experts)
            layer = LoRAExperts(child, config)
        else:
            layer = LoRALinear(child, config, shares_weight=id(child.weight) in shared)
        setattr(parent, attr, layer)
        names += [f"{name}.{p}" for p in layer.adapter_parameter_names()]
    return names


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """Every LoRA-family layer: LoRALinear, QLoRALinear, LoRAExperts, QLoRAExperts (all merge themselves)."""
    return [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "merge")]


def merge(model: nn.Module) -> None:
    for layer in lora_layers(model):
        layer.merge()


def unmerge(model: nn.Module) -> None:
    for layer in lora_layers(model):
        layer.unmerge()
