"""LoRA: low-rank adaptation of frozen linear layers (Hu et al., arXiv 2106.09685), with rsLoRA and DoRA.

Shapes: B batch, T sequence, M tokens (= B·T), K in features, N out features, r rank.

    h = W0 x + (alpha / r) · B A dropout(x)              LoRA §4.1, eq. (3); dropout on the LoRA input as in loralib
    A ∈ R^{r×K} Kaiming-uniform(a=√5), B ∈ R^{N×r} zero   so ΔW = BA = 0 and the model starts at the pretrained one
    rsLoRA (arXiv 2312.03732): scale alpha / √r instead of alpha / r
    DoRA (arXiv 2402.09353, eq. 5):  W' = m · (W0 + sBA) / ‖W0 + sBA‖_row, m initialised to ‖W0‖_row

Differences from the papers, and the choices made where they are silent:
  * Initialisation follows loralib / HF PEFT (Kaiming-uniform A), not the paper's Gaussian A; `init="gaussian"`
    gives PEFT's N(0, 1/r²) alternative. Either way one factor is zero, which is what matters (LoRA §4.1).
  * Defaults r=8, alpha=8 (the paper fixes alpha to the first r tried, so s = 1; also HF PEFT's default),
    targets wq, wv (the paper's main setting). Alpaca-LoRA uses alpha=16, dropout 0.05; QLoRA all block linears.
  * DoRA detaches the norm ‖W0 + sBA‖ from the graph (DoRA §4.3, as HF PEFT does), so the magnitude m and the
    direction get gradients through the forward below and not through the norm.
  * Adapter parameters are stored in at least float32 (HF PEFT's `autocast_adapter_dtype`) and cast to the input
    dtype for the matmuls, so a bf16 model computes its LoRA branch in bf16, like the fused kernel.
  * Merging adds sBA into the weight (computed in at least float32, then cast); unmerging subtracts it. In float64
    the round trip is exact to ~1e-16; in bf16 it is not (each cast rounds). A weight tied to the embeddings
    (Llama 3.2 1B/3B `output`) is untied on merge rather than modifying the embedding, and re-tied on unmerge.
  * Llama 4 MoE layers: the names w1 w2 w3 match the shared expert's linears (`feed_forward.shared_expert.w1`);
    the routed experts are batched [E, K, N] parameters (`llama.moe.Experts`), not `nn.Linear` children. The extra
    target name `experts` gives each routed expert its own update of w1, w2 and w3 (`peft.lora_experts`, on an NF4
    base with quantize_base: `peft.qlora_experts`), DoRA included; without it they stay frozen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kernels import lora_matmul as fused_lora_matmul  # Triton on CUDA, its plain-PyTorch reference elsewhere

from .lora_experts import EXPERT_TARGET, LoRAExperts, iter_experts
from .targets import LINEAR_NAMES, check_layer_indices, check_target_names, iter_linears, shared_parameter_ids

# Everything LoRA can target: the linear layers by Meta name, plus a Llama 4 MoE layer's routed experts.
TARGET_NAMES = LINEAR_NAMES + (EXPERT_TARGET,)

# What the fused op accepts: float32/16/bf16 (float64 study runs use the formula) and ranks up to its register tile.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KERNEL_MAX_RANK = 128


@dataclass
class LoraConfig:
    """LoRA hyper-parameters. The defaults are the paper's main setting (r=8 on wq and wv, s = alpha/r = 1)."""

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0  # on the LoRA branch's input only; 0 keeps the fused kernel path
    target_modules: Sequence[str] = ("wq", "wv")  # any of wq wk wv wo w1 w2 w3 output experts (Llama 4 MoE)
    layers: Optional[Sequence[int]] = None  # decoder layers to adapt (None: all); `output` is outside any layer
    use_rslora: bool = False  # scale alpha/√r (rsLoRA) instead of alpha/r
    use_dora: bool = False  # weight-decomposed LoRA: a trainable magnitude per output feature
    init: str = "kaiming"  # A's init: "kaiming" (loralib/PEFT default) or "gaussian" (N(0, 1/r²), PEFT option)
    quantize_base: bool = False  # QLoRA: store the adapted layers' frozen weights in NF4 (see peft.qlora)
    compute_dtype: Optional[str] = None  # QLoRA compute dtype (None: the model's dtype), e.g. "bfloat16"

    method = "lora"

    def __post_init__(self):
        self.target_modules = check_target_names(self.target_modules, TARGET_NAMES)
        if self.layers is not None:
            self.layers = tuple(self.layers)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r} (the update scale is alpha/r)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in ("kaiming", "gaussian"):
            raise ValueError(f"unknown LoRA init {self.init!r}; use 'kaiming' or 'gaussian'")
        if self.quantize_base and self.use_dora:
            raise ValueError("DoRA on an NF4 base (quantize_base=True) is not supported; set use_dora=False")
        if self.compute_dtype is not None and not isinstance(getattr(torch, str(self.compute_dtype), None),
                                                             torch.dtype):
            raise ValueError(f"compute_dtype {self.compute_dtype!r} is not a torch dtype name; "
                             f"use e.g. 'bfloat16', 'float16' or 'float32'")

    @property
    def scaling(self) -> float:
        # LoRA §4.1: "We then scale ΔWx by α/r"; rsLoRA §3: α/√r keeps the update's scale stable in r.
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


def master_dtype(dtype: torch.dtype) -> torch.dtype:
    """Trainable adapter parameters are kept in at least float32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def lora_matmul(x: torch.Tensor, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """y = x Wᵀ + s·(x Aᵀ) Bᵀ for x [..., K], W [N, K], A [r, K], B [N, r] -> y [..., N].

    The one call site of the fused kernel: `kernels.lora_matmul` when it takes these
    inputs (dtype in KERNEL_DTYPES, r <= KERNEL_MAX_RANK), else the same formula in eager PyTorch.
    """
    if x.dtype in KERNEL_DTYPES and A.shape[0] <= KERNEL_MAX_RANK:
        return fused_lora_matmul(x, W, A, B, scale)
    return F.linear(x, W) + scale * F.linear(F.linear(x, A), B)


class LoRALinear(nn.Module):
    """A frozen linear layer W0 plus a trainable low-rank update s·BA (and, for DoRA, a magnitude m).

    Keeps the wrapped layer's `weight` Parameter under the same name, so the base model's state-dict keys are
    unchanged (`layers.0.attention.wq.weight`); the adapter adds `lora_A`, `lora_B` (and `lora_magnitude`).
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 use_dora: bool = False, init: str = "kaiming", shares_weight: bool = False):
        super().__init__()
        N, K = base.weight.shape
        if not 0 < r <= min(N, K):
            raise ValueError(f"LoRA rank r={r} must be in 1 … {min(N, K)} for a {K}->{N} linear layer")
        if base.bias is not None:
            raise ValueError("LoRALinear expects a bias-free linear layer, as every LLaMA linear layer is")
        self.in_features, self.out_features, self.r = K, N, r
        self.weight = base.weight  # W0, frozen (same Parameter object: ties survive)
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.use_dora, self.shares_weight = use_dora, shares_weight
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dtype, device = master_dtype(base.weight.dtype), base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, K, dtype=dtype, device=device))  # [r, K]
        self.lora_B = nn.Parameter(torch.zeros(N, r, dtype=dtype, device=device))  # [N, r]
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / r)  # PEFT init_lora_weights="gaussian"
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # U(-1/√K, 1/√K), the nn.Linear default
        if use_dora:
            # DoRA §4.1: m starts as ‖W0‖ per output feature, computed exactly as the forward computes n.
            with torch.no_grad():
                m = self._weight_norm(self.weight, self.lora_A.to(self.weight.dtype), self.lora_B.to(self.weight.dtype))
            self.lora_magnitude = nn.Parameter(m.to(dtype))  # [N]
        self.merged = False
        self._merge_cache: dict = {}

    def _weight_norm(self, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """‖W0 + sBA‖ per output row [N], detached (DoRA §4.3: treat ‖V + ΔV‖_c in eq. 5 as a constant)."""
        return torch.linalg.vector_norm(W + self.scaling * (B @ A), dim=1).detach()

    def delta_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """ΔW = s·BA [N, K] in `dtype`."""
        return self.scaling * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight)
        A, B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        if self.use_dora:
            return self._dora_forward(x, A, B)
        if isinstance(self.lora_dropout, nn.Dropout) and self.training:  # active dropout: the unfused formula
            # LoRA eq. (3) with dropout on the adapter input: h = W0 x + s·B A drop(x)
            return F.linear(x, self.weight) + self.scaling * F.linear(F.linear(self.lora_dropout(x), A), B)
        # LoRA eq. (3): h = W0 x + ΔW x = W0 x + s·B A x
        return lora_matmul(x, self.weight, A, B, self.scaling)

    def _dora_forward(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        # DoRA eq. (5) rearranged (HF PEFT's form): W'x = W0 x + (m/n − 1)·W0 x + (m/n)·s·B A x, n detached.
        W = self.weight.to(x.dtype)
        mag = self.lora_magnitude.to(x.dtype) / self._weight_norm(W, A, B)  # m / n  [N]
        base = F.linear(x, W)  # [..., N]
        dropout = isinstance(self.lora_dropout, nn.Dropout) and self.training
        dropped = self.lora_dropout(x) if dropout else x
        base_dropped = F.linear(dropped, W) if dropout else base  # PEFT: with dropout the rescale uses drop(x)
        return base + (mag - 1) * base_dropped + mag * (self.scaling * F.linear(F.linear(dropped, A), B))

    # -- merge / unmerge -------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """W ← W0 + sBA (DoRA: W ← (m/n)(W0 + sBA)), computed in at least float32 and cast to W's dtype."""
        if self.merged:
            raise RuntimeError("this LoRA layer is already merged; merging twice would add ΔW twice (unmerge first)")
        W = self.weight
        compute = master_dtype(W.dtype)
        merged = W.to(compute) + self.delta_weight(compute)  # [N, K]
        if self.use_dora:
            norm = torch.linalg.vector_norm(merged, dim=1)  # n, cached: unmerge needs it
            self._merge_cache["dora_norm"] = norm
            merged = (self.lora_magnitude.to(compute) / norm)[:, None] * merged
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
            self.weight = self._merge_cache.pop("tied_weight")
        else:
            W = self.weight
            compute = master_dtype(W.dtype)
            unmerged = W.to(compute)
            if self.use_dora:
                unmerged = (self._merge_cache.pop("dora_norm") / self.lora_magnitude.to(compute))[:, None] * unmerged
            W.copy_((unmerged - self.delta_weight(compute)).to(W.dtype))
        self._merge_cache.clear()
        self.merged = False

    def adapter_parameter_names(self) -> list[str]:
        return ["lora_A", "lora_B"] + (["lora_magnitude"] if self.use_dora else [])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}, dora={self.use_dora}, merged={self.merged}")


# -- attaching to a model -------------------------------------------------------------------------------------------
def validate(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """All targeted linears and routed experts, checked (exist, not yet adapted, rank fits) before any change."""
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
    for name, _, attr, child in found:
        if attr == EXPERT_TARGET:
            if isinstance(child, LoRAExperts):
                raise ValueError(f"{name} already carries LoRA experts; build a fresh model to apply LoRA")
            C, Fh = child.w1.shape[1:]
            if config.r > min(C, Fh):
                raise ValueError(f"LoRA rank r={config.r} exceeds {name}'s size {C}->{Fh}; use r <= {min(C, Fh)}")
            continue
        if type(child) is not nn.Linear:
            raise ValueError(f"{name} is a {type(child).__name__}, not a plain nn.Linear: an adapter is already "
                             f"attached there; build a fresh model to apply LoRA")
        N, K = child.weight.shape
        if config.r > min(N, K):
            raise ValueError(f"LoRA rank r={config.r} exceeds {name}'s size {K}->{N}; use r <= {min(N, K)}")
    return found


def attach(model: nn.Module, config: LoraConfig) -> list[str]:
    """Replace every targeted linear layer by a `LoRALinear`; return the new parameters' qualified names."""
    found = validate(model, config)
    if config.quantize_base:
        from .qlora import attach_qlora  # NF4 base weights (QLoRA)

        return attach_qlora(model, config, found)
    shared = shared_parameter_ids(model)
    names = []
    for name, parent, attr, child in found:
        if attr == EXPERT_TARGET:  # routed experts of a Llama 4 MoE layer (peft.lora_experts)
            layer = LoRAExperts(child, config.r, config.alpha, config.dropout, config.use_rslora, config.init,
                                config.use_dora)
        else:
            layer = LoRALinear(child, config.r, config.alpha, config.dropout, config.use_rslora, config.use_dora,
                               config.init, shares_weight=id(child.weight) in shared)
        setattr(parent, attr, layer)
        names += [f"{name}.{p}" for p in layer.adapter_parameter_names()]
    return names


def lora_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "merge")]


def merge(model: nn.Module) -> None:
    for layer in lora_layers(model):
        layer.merge()


def unmerge(model: nn.Module) -> None:
    for layer in lora_layers(model):
        layer.unmerge()
