"""LoRA on the routed experts of a Llama 4 mixture-of-experts layer: one low-rank update per expert and matrix.

Shapes: E experts, C model dim, F expert hidden size, M tokens, N tokens given to one expert, r rank.

The routed experts are not `nn.Linear` layers but three stacked parameters in Meta's layout, applied as x @ W
(`llama.moe.Experts`): w1, w3 [E, C, F] (gate, up) and w2 [E, F, C] (down). LoRA §4.1 eq. (3) carries over per
expert e and matrix W ∈ {w1, w2, w3}, written in the same x @ W orientation:

    x @ (W_e + s · A_e B_e) = x @ W_e + s · (drop(x) @ A_e) @ B_e
    A_e [K, r]: U(-1/√K, 1/√K) (the nn.Linear / Kaiming(a=√5) bound of LoRALinear) or N(0, 1/r²);  B_e [r, N]: zero
    K, N = C, F for w1 and w3;  F, C for w2;   s = alpha/r (LoRA) or alpha/√r (rsLoRA)
    DoRA (arXiv 2402.09353, eq. 5) per expert: W'_e = m_e ⊙ (W_e + s·A_e B_e) / ‖W_e + s·A_e B_e‖, the norm taken
    over the input dimension K for each output feature (a column of W_e here, a row of nn.Linear's weight), m_e [N]
    initialised to ‖W_e‖ and the norm detached as in `peft.lora` (DoRA §4.3)

so each expert starts exactly at its pretrained SwiGLU and learns its own update (E·r·(K+N) parameters per matrix,
3·E·r·(C+F) per MoE layer). The router is not adapted; routing changes only through the adapted layers before it.
`peft.export_hf` refuses these adapters (the dense LlamaForCausalLM layout has no place for them).

`LoRAExperts` replaces `MoE.experts` and keeps the two methods `llama.moe.MoE` calls: `one(e, x)` (sorted dispatch)
and `all(x)` (dense reference). It keeps the wrapped module's w1 w2 w3 Parameters under the same names, so the base
state-dict keys (`layers.0.feed_forward.experts.w1`) are unchanged; the adapter adds `lora_A.{w1,w2,w3}` and
`lora_B.{w1,w2,w3}` (DoRA: `lora_magnitude.{w1,w2,w3}` [E, N]). On an NF4 base (QLoRA) the LoRA adapters live in
`peft.qlora_experts.QLoRAExperts`; DoRA on an NF4 base is refused by `LoraConfig`, as for the linear layers.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

EXPERT_TARGET = "experts"  # the `LoraConfig.target_modules` name that selects every MoE layer's routed experts
MATRICES = ("w1", "w2", "w3")  # gate, down, up: all three are adapted


def _master_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # as peft.lora.master_dtype: adapters in >= float32


class SwiGLUExperts(nn.Module):
    """The two methods `llama.moe.MoE` calls on its experts, written once over `_matmul(name, x, e)`, which
    subclasses define (x @ W_e for one expert e, x [N, K]; for all experts at once when e is None, x [E, M, K])."""

    def _matmul(self, name: str, x: torch.Tensor, e: Optional[int]) -> torch.Tensor:
        raise NotImplementedError

    def _swiglu(self, x: torch.Tensor, e: Optional[int]) -> torch.Tensor:
        # Expert_e(x) = (silu(x W1_e) ⊙ (x W3_e)) W2_e, each W with its own update
        h = F.silu(self._matmul("w1", x, e)) * self._matmul("w3", x, e)  # [N, F] or [E, M, F]
        return self._matmul("w2", h, e)

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on its own tokens: x [N, C] -> [N, C] (`MoE` sorted dispatch)."""
        return self._swiglu(x, e)

    def all(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on its own copy of the tokens: x [E, M, C] -> [E, M, C] (`MoE` dense reference)."""
        return self._swiglu(x, None)


def expert_adapters(shapes: dict[str, tuple[int, int, int]], r: int, dtype: torch.dtype, device: torch.device,
                    init: str) -> tuple[nn.ParameterDict, nn.ParameterDict]:
    """lora_A [E, K, r] (Kaiming-uniform bound 1/√K, or N(0, 1/r²)) and lora_B [E, r, N] (zero) per matrix, for
    stacked experts whose matrices have the shapes {name: (E, K, N)}."""
    lora_A, lora_B = nn.ParameterDict(), nn.ParameterDict()
    for name, (E, K, N) in shapes.items():
        A = torch.empty(E, K, r, dtype=dtype, device=device)  # [E, K, r]
        if init == "gaussian":
            nn.init.normal_(A, std=1.0 / r)
        else:  # the bound Kaiming-uniform(a=√5) gives an nn.Linear with K inputs: 1/√K
            nn.init.uniform_(A, -1.0 / math.sqrt(K), 1.0 / math.sqrt(K))
        lora_A[name] = nn.Parameter(A)
        lora_B[name] = nn.Parameter(torch.zeros(E, r, N, dtype=dtype, device=device))  # [E, r, N]
    return lora_A, lora_B


def check_expert_rank(r: int, E: int, C: int, Fh: int) -> None:
    if not 0 < r <= min(C, Fh):
        raise ValueError(f"LoRA rank r={r} must be in 1 … {min(C, Fh)} for experts of size {C}->{Fh}->{C}")


def expert_delta(A: torch.Tensor, B: torch.Tensor, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """ΔW_e = s·A_e B_e for every expert: [E, K, N] in `dtype` (A [E, K, r], B [E, r, N])."""
    return scaling * torch.bmm(A.to(dtype), B.to(dtype))


def lora_update(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, dropout: nn.Module):
    """LoRA eq. (3) in x @ W form, the update only: s · (drop(x) A) B."""
    return scaling * ((dropout(x) @ A.to(x.dtype)) @ B.to(x.dtype))


class LoRAExperts(SwiGLUExperts):
    """Frozen stacked experts W (w1 w2 w3) plus a trainable per-expert low-rank update s·A_e B_e for each."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 init: str = "kaiming", use_dora: bool = False):
        super().__init__()
        E, C, Fh = base.w1.shape  # [E, C, F]
        check_expert_rank(r, E, C, Fh)
        self.n_experts, self.dim, self.hidden_dim, self.r = E, C, Fh, r
        self.w1, self.w2, self.w3 = base.w1, base.w2, base.w3  # frozen W0, the same Parameter objects
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        shapes = {name: tuple(getattr(self, name).shape) for name in MATRICES}
        dtype = _master_dtype(base.w1.dtype)
        self.lora_A, self.lora_B = expert_adapters(shapes, r, dtype, base.w1.device, init)
        self.use_dora = use_dora
        if use_dora:  # DoRA §4.1: m starts as ‖W0‖, computed exactly as the forward computes n
            self.lora_magnitude = nn.ParameterDict({name: nn.Parameter(self._weight_norm(name, None).to(dtype))
                                                    for name in MATRICES})  # each [E, N]
        self.merged = False
        self._dora_norms: dict[str, torch.Tensor] = {}  # n at merge time, for unmerge

    def _weights(self, name: str, e: Optional[int], dtype: torch.dtype):
        """(W, A, B) of expert e ([K, N], [K, r], [r, N]) or of all experts (e None: [E, ...]) in `dtype`."""
        W, A, B = getattr(self, name), self.lora_A[name], self.lora_B[name]
        if e is not None:
            W, A, B = W[e], A[e], B[e]
        return W.to(dtype), A.to(dtype), B.to(dtype)

    def _weight_norm(self, name: str, e: Optional[int], dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """‖W + s·A B‖ over the input dimension K: [N] for expert e, [E, N] for all; detached (DoRA §4.3)."""
        W, A, B = self._weights(name, e, dtype or getattr(self, name).dtype)
        return torch.linalg.vector_norm(W + self.scaling * (A @ B), dim=-2).detach()

    def _matmul(self, name: str, x: torch.Tensor, e: Optional[int] = None) -> torch.Tensor:
        """x @ (W + s·A B) for expert e (x [N, K]) or for all experts at once (e None, x [E, M, K]); DoRA rescales."""
        W, A, B = self._weights(name, e, x.dtype)
        y = x @ W
        if self.merged:
            return y
        if not self.use_dora:
            # LoRA eq. (3) in x @ W form: h = x W0 + s · (drop(x) A) B
            return y + lora_update(x, A, B, self.scaling, self.lora_dropout)
        # DoRA eq. (5) rearranged as in peft.lora: x W' = x W0 + (m/n − 1)·x W0 + (m/n)·s·(x A) B, n detached
        norm = self._weight_norm(name, e, x.dtype)                                   # n: [N], or [E, N]
        mag = self.lora_magnitude[name].to(x.dtype)
        mag = mag[e] / norm if e is not None else (mag / norm)[:, None, :]          # m/n: [N], or [E, 1, N]
        dropout = isinstance(self.lora_dropout, nn.Dropout) and self.training
        dropped = self.lora_dropout(x) if dropout else x
        base_dropped = dropped @ W if dropout else y  # with dropout the rescale uses drop(x), as peft.lora
        return y + (mag - 1) * base_dropped + mag * lora_update(dropped, A, B, self.scaling, nn.Identity())

    def delta_weight(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """ΔW = s·A_e B_e for every expert: [E, K, N] in `dtype`."""
        return expert_delta(self.lora_A[name], self.lora_B[name], self.scaling, dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W_e ← W_e + s·A_e B_e (DoRA: ← (m/n)(W_e + s·A_e B_e)) for every expert and matrix, computed in at least
        float32 and cast back."""
        if self.merged:
            raise RuntimeError("these LoRA experts are already merged; merging twice would add ΔW twice")
        for name in MATRICES:
            W = getattr(self, name)
            compute = _master_dtype(W.dtype)
            merged = W.to(compute) + self.delta_weight(name, compute)  # [E, K, N]
            if self.use_dora:
                self._dora_norms[name] = torch.linalg.vector_norm(merged, dim=1)  # n [E, N], kept for unmerge
                merged = (self.lora_magnitude[name].to(compute) / self._dora_norms[name])[:, None, :] * merged
            W.copy_(merged.to(W.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge`: W_e ← W_e − s·A_e B_e (DoRA: W_e·n/m − s·A_e B_e)."""
        if not self.merged:
            raise RuntimeError("these LoRA experts are not merged; nothing to unmerge")
        for name in MATRICES:
            W = getattr(self, name)
            compute = _master_dtype(W.dtype)
            unmerged = W.to(compute)
            if self.use_dora:
                unmerged = (self._dora_norms.pop(name) / self.lora_magnitude[name].to(compute))[:, None, :] * unmerged
            W.copy_((unmerged - self.delta_weight(name, compute)).to(W.dtype))
        self.merged = False

    def adapter_parameter_names(self) -> list[str]:
        sides = ("A", "B", "magnitude") if self.use_dora else ("A", "B")
        return [f"lora_{side}.{name}" for side in sides for name in MATRICES]

    def extra_repr(self) -> str:
        return (f"experts={self.n_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, r={self.r}, "
                f"scaling={self.scaling:g}, merged={self.merged}")


def iter_experts(model: nn.Module, layers: Optional[Sequence[int]] = None
                 ) -> Iterator[tuple[str, nn.Module, nn.Module]]:
    """Yield (qualified name, MoE parent, experts module) for every MoE layer's routed experts in `layers`."""
    keep = None if layers is None else set(layers)
    for index, layer in enumerate(model.layers):
        if keep is not None and index not in keep:
            continue
        parent = layer.feed_forward
        child = getattr(parent, EXPERT_TARGET, None)
        if child is not None and all(isinstance(getattr(child, w, None), torch.Tensor) for w in MATRICES):
            yield f"layers.{index}.feed_forward.{EXPERT_TARGET}", parent, child
