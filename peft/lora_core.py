"""The LoRA family's one core: hyper-parameters, scale, initialisation, master dtype, ΔW, DoRA, merge, NF4 base.

Every LoRA module of this package is built from these pieces and from nothing else of each other: LoRA on an
`nn.Linear` (`peft.lora`), on an NF4 base weight (`peft.qlora`), on a Llama 4 MoE layer's routed experts
(`peft.lora_experts`, `peft.qlora_experts`). This module imports none of them.

Shapes: K in features, N out features, r rank, E experts.

    h = W0 x + ΔW x = W0 x + s · B A x                   LoRA (arXiv 2106.09685) §4.1, eq. (3)
    s = alpha / r                                        LoRA §4.1 ("we then scale ΔWx by α/r")
    s = alpha / √r                                       rsLoRA (arXiv 2312.03732) §3: stable in r
    A random, B = 0, so ΔW = 0 at the start              LoRA §4.1
    W' = m · (W0 + sBA) / ‖W0 + sBA‖_c                   DoRA (arXiv 2402.09353) eq. (5), m initialised to ‖W0‖_c
    Y = X · doubleDequant(c1, c2, W^NF4)ᵀ + s · X Aᵀ Bᵀ  QLoRA (arXiv 2305.14314) §3, eq. (5) (x Wᵀ form)

One update, two layouts. `nn.Linear` stores W [N, K] and computes x Wᵀ: A [r, K], B [N, r], ΔW = s·B A [N, K]
(the paper's notation). Llama 4's routed experts store W [E, K, N] and compute x @ W: A [E, K, r], B [E, r, N],
ΔW = s·A B [E, K, N], the same update per expert, transposed. The helpers below take the axis of W that holds the
input features, `in_dim` (-1 for nn.Linear, -2 for stacked experts), and get the product's order and the DoRA norm's
axis from it.

Differences from the papers, and the choices made where they are silent:
  * A is Kaiming-uniform(a=√5), i.e. U(-1/√K, 1/√K) (loralib, HF PEFT), not the paper's Gaussian; `init="gaussian"`
    gives PEFT's N(0, 1/r²). Either way B = 0, which is what matters (LoRA §4.1).
  * Defaults r=8, alpha=8 (the paper fixes alpha to the first r tried, so s = 1; also HF PEFT's default), targets
    wq, wv (the paper's main setting). Alpaca-LoRA uses alpha=16, dropout 0.05; QLoRA all block linears.
  * Dropout acts on the LoRA branch's input only (loralib, HF PEFT): h = W0 x + s·B A drop(x).
  * DoRA detaches the norm ‖W0 + sBA‖ from the graph (DoRA §4.3, as HF PEFT does), so m and the direction get
    gradients through the forward and not through the norm.
  * Adapter parameters are stored in at least float32 (HF PEFT's `autocast_adapter_dtype`) and cast to the input
    dtype for the matmuls, so a bf16 model computes its LoRA branch in bf16, like the fused kernel.
  * Merging adds ΔW in at least float32, then casts; unmerging subtracts it. In float64 the round trip is exact to
    ~1e-16; in bf16 it is not (each cast rounds).
  * NF4 base (QLoRA): block size 64 with double quantisation, the paper's setting. float64 study weights are
    quantised and decoded through float32, where NF4 values times a float32 absmax are exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

import kernels

from .targets import EXPERT_TARGET, LINEAR_NAMES, check_target_names

# Everything LoRA can target: the linear layers by Meta name, plus a Llama 4 MoE layer's routed experts.
TARGET_NAMES = LINEAR_NAMES + (EXPERT_TARGET,)
NF4_FIELDS = ("packed", "absmax", "absmax2", "code2", "offset")  # tensors of kernels.NF4Weight kept as buffers


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
    quantize_base: bool = False  # QLoRA: store the frozen block weights in NF4 (see peft.qlora)
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
        dtype = getattr(torch, str(self.compute_dtype), None)
        if self.compute_dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"compute_dtype {self.compute_dtype!r} is not a torch dtype name of a floating-point "
                             f"type; use e.g. 'bfloat16', 'float16' or 'float32'")

    @property
    def scaling(self) -> float:
        # LoRA §4.1: "We then scale ΔWx by α/r"; rsLoRA §3: α/√r keeps the update's scale stable in r.
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


def master_dtype(dtype: torch.dtype) -> torch.dtype:
    """Trainable adapter parameters are kept in at least float32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def lora_dropout(p: float) -> nn.Module:
    """The dropout on the LoRA branch's input (an identity when p = 0, so the fused kernel path stays open)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def dropout_active(dropout: nn.Module) -> bool:
    return isinstance(dropout, nn.Dropout) and dropout.training


def lora_factors(A_shape: tuple[int, ...], B_shape: tuple[int, ...], fan_in: int, config: LoraConfig,
                 dtype: torch.dtype, device) -> tuple[nn.Parameter, nn.Parameter]:
    """A random and B = 0, so ΔW = BA = 0 and the model starts at the pretrained one (LoRA §4.1)."""
    A = torch.empty(A_shape, dtype=dtype, device=device)
    if config.init == "gaussian":
        nn.init.normal_(A, std=1.0 / config.r)  # PEFT init_lora_weights="gaussian": N(0, 1/r²)
    else:
        # Kaiming-uniform(a=√5), the nn.Linear default of loralib and PEFT: U(-1/√K, 1/√K) for K = fan_in inputs.
        # kaiming_uniform_ reads fan_in from dim 1, so it gets a view with K columns (same memory, same order).
        nn.init.kaiming_uniform_(A.view(-1, fan_in), a=math.sqrt(5))
    return nn.Parameter(A), nn.Parameter(torch.zeros(B_shape, dtype=dtype, device=device))


def delta_weight(A: torch.Tensor, B: torch.Tensor, scaling: float, dtype: torch.dtype,
                 in_dim: int = -1) -> torch.Tensor:
    """ΔW = s·B A in W's layout and `dtype`: [N, K] for nn.Linear (in_dim -1), A B [E, K, N] for experts (-2)."""
    A, B = A.to(dtype), B.to(dtype)
    return scaling * (B @ A if in_dim == -1 else A @ B)


# -- DoRA (arXiv 2402.09353) ---------------------------------------------------------------------------------------
def dora_norm(W: torch.Tensor, delta: torch.Tensor, in_dim: int = -1) -> torch.Tensor:
    """n = ‖W0 + ΔW‖ over the input features, one per output feature, detached (DoRA §4.3: a constant in eq. 5)."""
    return torch.linalg.vector_norm(W + delta, dim=in_dim).detach()


def dora_output(base: torch.Tensor, base_dropped: torch.Tensor, update: torch.Tensor,
                m_over_n: torch.Tensor) -> torch.Tensor:
    """DoRA eq. (5) rearranged (HF PEFT's form): W'x = W0 x + (m/n − 1)·W0 x + (m/n)·s·B A x, n detached.

    `base` is W0 x, `update` is s·B A drop(x), `base_dropped` is W0 drop(x) (= base without dropout: with dropout
    the rescale term uses the dropped input, as in PEFT).
    """
    return base + (m_over_n - 1) * base_dropped + m_over_n * update


# -- merge / unmerge ----------------------------------------------------------------------------------------------
def merge_weight(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                 magnitude: Optional[torch.Tensor] = None, in_dim: int = -1
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """W0 + ΔW (LoRA §4.1: "no additional inference latency"), or DoRA's m·(W0 + ΔW)/n (eq. 5), computed in at
    least float32; returns it and n (None without DoRA), which unmerge needs."""
    compute = master_dtype(W.dtype)
    merged = W.to(compute) + delta_weight(A, B, scaling, compute, in_dim)
    if magnitude is None:
        return merged, None
    norm = torch.linalg.vector_norm(merged, dim=in_dim, keepdim=True)  # n: [N, 1], or [E, 1, N]
    return (magnitude.to(compute).unsqueeze(in_dim) / norm) * merged, norm


def unmerge_weight(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                   magnitude: Optional[torch.Tensor] = None, norm: Optional[torch.Tensor] = None,
                   in_dim: int = -1) -> torch.Tensor:
    """Undo `merge_weight`: W0 = W − ΔW (DoRA: W·n/m − ΔW, n as merge returned it), in at least float32."""
    compute = master_dtype(W.dtype)
    W0 = W.to(compute)
    if magnitude is not None:
        W0 = (norm / magnitude.to(compute).unsqueeze(in_dim)) * W0
    return W0 - delta_weight(A, B, scaling, compute, in_dim)


# -- QLoRA's frozen base: NF4 + double quantisation (arXiv 2305.14314 §3) -------------------------------------------
def quantize_frozen(weight: torch.Tensor, what: str) -> "kernels.NF4Weight":
    """NF4, block size 64, double quantisation. A NaN/inf weight raises with `what` and the position."""
    weight = weight.detach()
    weight = weight if weight.dtype in kernels.SUPPORTED_DTYPES else weight.float()
    try:
        return kernels.nf4_quantize(weight, blocksize=64, double_quant=True)
    except ValueError as err:
        raise ValueError(f"cannot quantise {what}: {err}") from err


def nf4_weight(fields: dict[str, Optional[torch.Tensor]], shape: Sequence[int], dtype: torch.dtype, blocksize: int,
               blocksize2: int) -> "kernels.NF4Weight":
    """An NF4Weight from the tensors named in NF4_FIELDS (a module's buffers, or views into them)."""
    return kernels.NF4Weight(fields["packed"], fields["absmax"], torch.Size(shape), dtype, blocksize, None,
                             fields["absmax2"], fields["code2"], fields["offset"], blocksize2)


def dequantize(qweight: "kernels.NF4Weight", dtype: torch.dtype) -> torch.Tensor:
    """doubleDequant(c1, c2, W^NF4) in `dtype` (float64 via float32, where the decoded values are exact)."""
    return kernels.nf4_dequantize(qweight, dtype if dtype in kernels.SUPPORTED_DTYPES else torch.float32).to(dtype)
