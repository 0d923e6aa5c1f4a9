"""Llama 4 mixture-of-experts feed-forward, trainable Switch-style.

Shapes: B batch, T sequence, M = B·T tokens, C model dim, F expert hidden size, E routed experts, K experts per
token (top-k; 1 in Llama 4), N tokens given to one expert.

Forward (Meta llama-models `models/llama4/moe.py`, HF `Llama4TextMoe`):
    z_t   = W_r x_t                                   router logits [E], no bias
    S_t   = top-K(z_t)                                the K selected experts
    s_t,e = σ(z_t,e)                                  sigmoid of each selected logit: no softmax, no renormalising
    y_t   = Shared(x_t) + Σ_{e∈S_t} Expert_e(s_t,e · x_t)      the score scales the expert's INPUT, not its output

Training signals (returned through `MoE.stats`, collected by `aux_losses`):
    Switch Transformer (arXiv 2101.03961) §2.2, eqs. (4)-(6), load balancing with α·N·Σ f_i·P_i:
        f_i = (1/(M·K)) Σ_t 1[i ∈ S_t]                fraction of token slots dispatched to expert i
        P_i = (1/M) Σ_t softmax(z_t)_i                fraction of router probability given to expert i
        L_balance = E · Σ_i f_i · P_i                 = 1 under uniform routing; only P carries a gradient
    ST-MoE (arXiv 2202.08906) §3.1 eq. (5), router z-loss:
        L_z = (1/M) Σ_t (log Σ_j exp z_t,j)²
    Switch §2.2 eq. (3), expert capacity: expert i processes at most ceil(capacity_factor · M·K / E) token slots;
        overflowing slots (the later tokens, in token order) skip the routed expert — the shared expert and the
        residual still carry them.

Differences from the references: Llama 4's router is a sigmoid, so "router probability" in the balance loss is the
softmax of the same logits (the distribution whose arg-max picks the expert, as in Switch and HF's
`load_balancing_loss_func`). Meta's inference code `.detach()`es the routed input; here gradients reach the router
through the score s (the only path the router learns from besides the auxiliary losses). Router math runs in at least
float32 (Switch §2.4 "selective precision"); the router is a plain parameter, not an `nn.Linear`, so adapters that
replace linear layers leave it alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEArgs
from .ffn import FeedForward


@dataclass
class MoEStats:
    """What one MoE layer saw in its most recent forward pass."""

    load_balance: torch.Tensor  # scalar L_balance (differentiable)
    router_z: torch.Tensor  # scalar L_z (differentiable)
    tokens_per_expert: torch.Tensor  # [E] token slots routed to each expert (before capacity dropping)
    dropped: int  # token slots that overflowed an expert's capacity


class Router(nn.Module):
    """Router logits z = W_r x with W_r [E, C] (HF `router.weight`; Meta stores the transpose as `router_DE`)."""

    def __init__(self, dim: int, n_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # at least float32, whatever the activation dtype: routing decisions must not flip on bf16 rounding
        compute = torch.promote_types(x.dtype, torch.float32)
        return F.linear(x.to(compute), self.weight.to(compute))  # [M, E]


class Experts(nn.Module):
    """E independent SwiGLU experts stored as stacked matrices, Meta's layout: w1, w3 [E, C, F], w2 [E, F, C]."""

    def __init__(self, n_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))  # gate
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))  # down
        self.w3 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))  # up

    def reset_parameters(self, std: float = 0.02) -> None:
        for w in (self.w1, self.w2, self.w3):
            nn.init.normal_(w, mean=0.0, std=std)

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on its own tokens: x [N, C] -> [N, C]."""
        return (F.silu(x @ self.w1[e]) * (x @ self.w3[e])) @ self.w2[e]

    def all(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on its own copy of the tokens: x [E, M, C] -> [E, M, C] (batched matmul)."""
        return torch.bmm(F.silu(torch.bmm(x, self.w1)) * torch.bmm(x, self.w3), self.w2)


class MoE(nn.Module):
    """Routed experts + always-on shared expert. `dispatch` = "sorted" (default) or "dense" (reference).

    "sorted" groups the token slots by expert and runs each expert once on exactly its tokens (E small matmuls,
    compute ∝ K·M). "dense" runs every expert on every token with score 0 for the unselected ones, as HF and Meta
    write it (compute ∝ E·M); bias-free SwiGLU(0) = 0 makes the two equal.
    """

    def __init__(self, dim: int, hidden_dim: int, moe_args: MoEArgs):
        super().__init__()
        self.args = moe_args
        self.n_experts, self.top_k = moe_args.num_experts, moe_args.top_k
        self.router = Router(dim, moe_args.num_experts)
        self.experts = Experts(moe_args.num_experts, dim, hidden_dim)
        self.shared_expert = FeedForward(dim, hidden_dim) if moe_args.shared_expert else None
        self.dispatch = "sorted"
        self.stats: Optional[MoEStats] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [M, C]
        M, E, K = x.shape[0], self.n_experts, self.top_k
        logits = self.router(x)  # [M, E], >= float32
        top_logits, chosen = logits.topk(K, dim=-1)  # [M, K]
        # Meta's and HF's form: −∞ for the unselected experts, sigmoid of the whole [M, E] matrix in float32
        # (σ(−∞) = 0), back to the activation dtype. σ of the same [M, E] tensor keeps float64 parity bit-exact.
        gate = torch.full_like(logits, float("-inf")).scatter(1, chosen, top_logits)  # [M, E]
        scores = torch.sigmoid(gate.float()).to(x.dtype).gather(1, chosen)  # [M, K]
        keep = self._within_capacity(chosen)  # [M, K] bool
        if self.dispatch == "sorted":
            routed = self._sorted(x, chosen, scores, keep)
        elif self.dispatch == "dense":
            routed = self._dense(x, chosen, scores, keep)
        else:
            raise ValueError(f"unknown MoE dispatch {self.dispatch!r}; use 'sorted' or 'dense'")
        self.stats = self._statistics(logits, chosen, keep)
        if self.shared_expert is not None:  # always on in Llama 4
            routed = self.shared_expert(x) + routed
        return routed.reshape(shape)

    # -- capacity (Switch eq. 3) ------------------------------------------------------------------------------------
    def capacity(self, n_tokens: int) -> Optional[int]:
        """Token slots each expert may take: ceil(capacity_factor · M·K / E), or None without a limit."""
        cf = self.args.expert_capacity_factor
        return None if cf is None else max(1, math.ceil(cf * n_tokens * self.top_k / self.n_experts))

    def _within_capacity(self, chosen: torch.Tensor) -> torch.Tensor:
        """keep[t, k]: slot (t, k) is among the first `capacity` slots of its expert, counted in token order."""
        capacity = self.capacity(chosen.shape[0])
        if capacity is None:
            return torch.ones_like(chosen, dtype=torch.bool)
        one_hot = F.one_hot(chosen.reshape(-1), self.n_experts)  # [M·K, E], slots in token order
        position = (one_hot.cumsum(0) * one_hot).sum(-1) - 1  # [M·K]: how many earlier slots chose the same expert
        return (position < capacity).reshape(chosen.shape)

    # -- the two dispatch paths -------------------------------------------------------------------------------------
    def _sorted(self, x, chosen, scores, keep) -> torch.Tensor:
        """Group slots by expert (stable sort keeps token order), run each expert once, scatter-add back."""
        K = self.top_k
        expert_of_slot = chosen.reshape(-1)  # [M·K]
        token_of_slot = torch.arange(x.shape[0], device=x.device).repeat_interleave(K)  # [M·K]
        order = torch.argsort(expert_of_slot, stable=True)  # [M·K], slots of expert 0 first, then 1, ...
        order = order[keep.reshape(-1)[order]]  # drop overflowing slots
        counts = torch.bincount(expert_of_slot[order], minlength=self.n_experts).tolist()  # [E]
        out = torch.zeros_like(x)  # [M, C]
        for e, slots in enumerate(order.split(counts)):
            if slots.numel() == 0:
                continue
            tokens = token_of_slot[slots]  # [N]
            expert_in = x[tokens] * scores.reshape(-1)[slots, None]  # [N, C]: score scales the input
            out = out.index_add(0, tokens, self.experts.one(e, expert_in))
        return out

    def _dense(self, x, chosen, scores, keep) -> torch.Tensor:
        """Reference: every expert sees every token, scaled by its score (0 if not chosen or dropped)."""
        gate = torch.zeros(x.shape[0], self.n_experts, dtype=x.dtype, device=x.device)  # [M, E]
        gate = gate.scatter(1, chosen, scores * keep)
        expert_in = gate.t()[:, :, None] * x[None]  # [E, M, C]
        return self.experts.all(expert_in).sum(0)  # [M, C]

    # -- training signals -------------------------------------------------------------------------------------------
    def _statistics(self, logits, chosen, keep) -> MoEStats:
        M, E, K = logits.shape[0], self.n_experts, self.top_k  # logits are already >= float32 (Router)
        tokens_per_expert = torch.bincount(chosen.reshape(-1), minlength=E)  # [E]
        f = tokens_per_expert.to(logits.dtype) / (M * K)  # eq. (5): fraction dispatched, no gradient
        P = logits.softmax(-1).mean(0)  # eq. (6): mean router probability
        load_balance = E * (f * P).sum()  # eq. (4) without α
        router_z = logits.logsumexp(-1).pow(2).mean()  # ST-MoE eq. (5)
        return MoEStats(load_balance, router_z, tokens_per_expert.detach(), int((~keep).sum()))


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def aux_losses(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"load_balance", "router_z"}: each the mean over MoE layers of the last forward's value (unweighted).

    A training loop adds α·load_balance + c_z·router_z (coefficients in `MoEArgs`) to its loss after each forward;
    `Transformer.aux_loss()` does the weighting. The mean (not Switch's sum) keeps the scale independent of depth.
    """
    layers = moe_layers(model)
    if not layers:
        return {}
    if any(m.stats is None for m in layers):
        raise RuntimeError("no MoE statistics yet: run a forward pass before asking for the auxiliary losses")
    return {"load_balance": torch.stack([m.stats.load_balance for m in layers]).mean(),
            "router_z": torch.stack([m.stats.router_z for m in layers]).mean()}


def expert_load(model: nn.Module) -> torch.Tensor:
    """[n_moe_layers, E]: token slots routed to each expert in the last forward (before capacity dropping)."""
    layers = moe_layers(model)
    if any(m.stats is None for m in layers):
        raise RuntimeError("no MoE statistics yet: run a forward pass first")
    return torch.stack([m.stats.tokens_per_expert for m in layers]) if layers else torch.zeros(0, 0)
