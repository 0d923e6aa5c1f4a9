"""LoRA on the routed experts of a Llama 4 mixture-of-experts layer: one low-rank update per expert and matrix.

Shapes: E experts, C model dim, F expert hidden size, M tokens, N tokens given to one expert, r rank.

The routed experts are not `nn.Linear` layers but three stacked parameters in Meta's layout, applied as x @ W
(`llama.moe.Experts`): w1, w3 [E, C, F] (gate, up) and w2 [E, F, C] (down). LoRA §4.1 eq. (3) carries over per
expert e and matrix W ∈ {w1, w2, w3}, written in the same x @ W orientation:

    x @ (W_e + s · A_e B_e) = x @ W_e + s · (drop(x) @ A_e) @ B_e
    A_e [K, r]: Kaiming-uniform(a=√5) = U(-1/√K, 1/√K), as for LoRALinear, or N(0, 1/r²);  B_e [r, N]: zero
    K, N = C, F for w1 and w3;  F, C for w2;   s = alpha/r (LoRA) or alpha/√r (rsLoRA)
    DoRA (arXiv 2402.09353, eq. 5) per expert: W'_e = m_e ⊙ (W_e + s·A_e B_e) / ‖W_e + s·A_e B_e‖, the norm taken
    over the input dimension K for each output feature (a column of W_e here, a row of nn.Linear's weight), m_e [N]
    initialised to ‖W_e‖ and the norm detached as in `peft.lora` (DoRA §4.3)

so each expert starts exactly at its pretrained SwiGLU and learns its own update (E·r·(K+N) parameters per matrix,
3·E·r·(C+F) per MoE layer). The router is not adapted; routing changes only through the adapted layers before it.
`peft.export_hf` refuses these adapters (the dense LlamaForCausalLM layout has no place for them).

The scale, initialisation, master dtype, ΔW, DoRA's rescale and the merge arithmetic are `peft.lora_core`'s, in
its stacked-experts layout (in_dim = -2: W [E, K, N], ΔW = s·A B).

`LoRAExperts` replaces `MoE.experts` and keeps the two methods `llama.moe.MoE` calls: `one(e, x)` (sorted dispatch)
and `all(x)` (dense reference). It keeps the wrapped module's w1 w2 w3 Parameters under the same names, so the base
state-dict keys (`layers.0.feed_forward.experts.w1`) are unchanged; the adapter adds `lora_A.{w1,w2,w3}` and
`lora_B.{w1,w2,w3}` (DoRA: `lora_magnitude.{w1,w2,w3}` [E, N]). On an NF4 base (QLoRA) the LoRA adapters live in
`peft.qlora_experts.QLoRAExperts`; DoRA on an NF4 base is refused by `LoraConfig`, as for the linear layers.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .lora_core import (LoraConfig, delta_weight, dora_norm, dora_output, dropout_active, lora_dropout, lora_factors,
                        master_dtype, merge_weight, unmerge_weight)
from .targets import EXPERT_MATRICES

IN_DIM = -2  # W [E, K, N] (x @ W): the input features are the second-to-last axis (peft.lora_core's layouts)


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


def expert_adapters(shapes: dict[str, tuple[int, int, int]], config: LoraConfig, dtype: torch.dtype, device
                    ) -> tuple[nn.ParameterDict, nn.ParameterDict]:
    """lora_A [E, K, r] (random) and lora_B [E, r, N] (zero) per matrix, for stacked experts whose matrices have
    the shapes {name: (E, K, N)}."""
    lora_A, lora_B = nn.ParameterDict(), nn.ParameterDict()
    for name, (E, K, N) in shapes.items():
        lora_A[name], lora_B[name] = lora_factors((E, K, config.r), (E, config.r, N), K, config, dtype, device)
    return lora_A, lora_B


def lora_update(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """LoRA eq. (3) in x @ W form, the update only: s · (x A) B (x already dropped out where dropout applies)."""
    return scaling * ((x @ A.to(x.dtype)) @ B.to(x.dtype))


class LoRAExperts(SwiGLUExperts):
    """Frozen stacked experts W (w1 w2 w3) plus a trainable per-expert low-rank update s·A_e B_e for each.

    `peft.apply` has checked the rank (r <= min(C, F))."""

    def __init__(self, base: nn.Module, config: LoraConfig):
        super().__init__()
        E, C, Fh = base.w1.shape  # [E, C, F]
        self.n_experts, self.dim, self.hidden_dim, self.r = E, C, Fh, config.r
        self.w1, self.w2, self.w3 = base.w1, base.w2, base.w3  # frozen W0, the same Parameter objects
        self.scaling = config.scaling
        self.lora_dropout = lora_dropout(config.dropout)
        shapes = {name: tuple(getattr(self, name).shape) for name in EXPERT_MATRICES}
        dtype = master_dtype(base.w1.dtype)
        self.lora_A, self.lora_B = expert_adapters(shapes, config, dtype, base.w1.device)
        self.use_dora = config.use_dora
        if self.use_dora:  # DoRA §4.1: m starts as ‖W0‖, computed exactly as the forward computes n
            self.lora_magnitude = nn.ParameterDict({name: nn.Parameter(self._weight_norm(name, None).to(dtype))
                                                    for name in EXPERT_MATRICES})  # each [E, N]
        self.merged = False
        self._dora_norms: dict[str, torch.Tensor] = {}  # n at merge time, for unmerge

    def _weights(self, name: str, e: Optional[int], dtype: torch.dtype):
        """(W, A, B) of expert e ([K, N], [K, r], [r, N]) or of all experts (e None: [E, ...]) in `dtype`."""
        W, A, B = getattr(self, name), self.lora_A[name], self.lora_B[name]
        if e is not None:
            W, A, B = W[e], A[e], B[e]
        return W.to(dtype), A.to(dtype), B.to(dtype)

    def _weight_norm(self, name: str, e: Optional[int], dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """n = ‖W + s·A B‖ over the input dimension K: [N] for expert e, [E, N] for all; detached (DoRA §4.3)."""
        W, A, B = self._weights(name, e, dtype or getattr(self, name).dtype)
        return dora_norm(W, delta_weight(A, B, self.scaling, W.dtype, IN_DIM), IN_DIM)

    def _matmul(self, name: str, x: torch.Tensor, e: Optional[int] = None) -> torch.Tensor:
        """x @ (W + s·A B) for expert e (x [N, K]) or for all experts at once (e None, x [E, M, K]); DoRA rescales."""
        W, A, B = self._weights(name, e, x.dtype)
        y = x @ W
        if self.merged:
            return y
        active = dropout_active(self.lora_dropout)
        dropped = self.lora_dropout(x) if active else x
        if not self.use_dora:
            # LoRA eq. (3) in x @ W form: h = x W0 + s · (drop(x) A) B
            return y + lora_update(dropped, A, B, self.scaling)
        # DoRA eq. (5): x W' = (m/n)·x (W0 + s·A B), n detached (peft.lora_core.dora_output)
        mag = self.lora_magnitude[name].to(x.dtype)
        norm = self._weight_norm(name, e, x.dtype)                                   # n: [N], or [E, N]
        m_over_n = mag[e] / norm if e is not None else (mag / norm)[:, None, :]      # [N], or [E, 1, N]
        base_dropped = dropped @ W if active else y  # with dropout the rescale uses drop(x), as peft.lora
        return dora_output(y, base_dropped, lora_update(dropped, A, B, self.scaling), m_over_n)

    @torch.no_grad()
    def merge(self) -> None:
        """W_e ← W_e + s·A_e B_e (DoRA: ← (m/n)(W_e + s·A_e B_e)) for every expert and matrix, computed in at least
        float32 and cast back."""
        if self.merged:
            raise RuntimeError("these LoRA experts are already merged; merging twice would add ΔW twice")
        for name in EXPERT_MATRICES:
            W = getattr(self, name)
            magnitude = self.lora_magnitude[name] if self.use_dora else None
            merged, self._dora_norms[name] = merge_weight(W, self.lora_A[name], self.lora_B[name], self.scaling,
                                                          magnitude, IN_DIM)  # [E, K, N]
            W.copy_(merged.to(W.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge`: W_e ← W_e − s·A_e B_e (DoRA: W_e·n/m − s·A_e B_e)."""
        if not self.merged:
            raise RuntimeError("these LoRA experts are not merged; nothing to unmerge")
        for name in EXPERT_MATRICES:
            W = getattr(self, name)
            magnitude = self.lora_magnitude[name] if self.use_dora else None
            W.copy_(unmerge_weight(W, self.lora_A[name], self.lora_B[name], self.scaling, magnitude,
                                   self._dora_norms.pop(name), IN_DIM).to(W.dtype))
        self.merged = False

    def adapter_parameter_names(self) -> list[str]:
        sides = ("A", "B", "magnitude") if self.use_dora else ("A", "B")
        return [f"lora_{side}.{name}" for side in sides for name in EXPERT_MATRICES]

    def extra_repr(self) -> str:
        return (f"experts={self.n_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, r={self.r}, "
                f"scaling={self.scaling:g}, merged={self.merged}")
