"""The one tolerance rule of the test suite: floating-point bounds from the dtype's epsilon and the problem size.

Every float32, float16 and bfloat16 comparison in the tests takes its bound from `tolerance` below; none is a number
tuned to what one machine printed. float64 parity keeps the project's fixed bar (relative error <= 1e-10), which is
the same rule with a margin of about 10^3.

The rule (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., §2.2 and Thm 3.1 / Eq. 3.5):
each floating-point operation returns the exact result times (1 + δ) with |δ| <= u = eps / 2. A sum or dot product
of n terms accumulated in a format with unit roundoff u is off by at most γ_n = n·u / (1 - n·u) ≈ n·u times the sum
of the terms' magnitudes, whatever the order of the additions. Two implementations that compute the same quantity
(ours and the reference, a merged and an unmerged weight, one Intel and one AMD BLAS) are each inside that bound, so
they differ by at most 2·γ_n ≈ n·eps. Through a chain of such steps relative errors add to first order, so

    bound = eps(accumulation dtype) · Σ n_i   +   eps(storage dtype) · (number of roundings to a narrower storage dtype)

with the sum over the reductions on the longest path from input to output. This is a worst-case bound, not a
statistical estimate: no safety factor, nothing machine-specific. Measured errors sit 10-100x below it (they grow
like sqrt(n)·u when rounding errors behave randomly; Higham & Mary, SIAM J. Sci. Comput. 41(5), 2019), while
the mistakes the tests exist to catch (a transposed factor, a re-quantised weight, a missing scale) move results by
1e-3 or more. bfloat16 and float16 products are accumulated in float32 by PyTorch's CPU and CUDA kernels, so their
reductions count with float32's epsilon and every stored bfloat16 result adds one bfloat16 rounding.

    relative_error(ours, ref) <= tolerance(torch.float32, forward_reduction_length(args, T))
"""

from __future__ import annotations

from typing import Optional

import torch

import llama

# Formats narrower than float32 are accumulated in float32 (PyTorch CPU and CUDA matmul, sum and softmax kernels).
_ACCUMULATE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def eps(dtype: torch.dtype) -> float:
    """Machine epsilon 2^(1-p): float64 2.2e-16, float32 1.2e-7, float16 9.8e-4, bfloat16 7.8e-3."""
    return torch.finfo(dtype).eps


def tolerance(dtype: torch.dtype, reduction_length: int, *, roundings: int = 0,
              accumulate: Optional[torch.dtype] = None) -> float:
    """Bound on the relative difference of two evaluations of one quantity computed in `dtype`.

    reduction_length: Σ n_i, the terms summed along the longest path (a dot product of length n counts n; an
    elementwise operation counts 1). roundings: results stored in `dtype` when that is narrower than the
    accumulation dtype (each adds eps(dtype)). accumulate: the accumulation dtype (default: float32 for
    float16/bfloat16, else `dtype` itself).
    """
    if reduction_length < 1 or roundings < 0:
        raise ValueError(f"reduction_length must be >= 1 and roundings >= 0, got {reduction_length}, {roundings}")
    acc = accumulate or _ACCUMULATE.get(dtype, dtype)
    return reduction_length * eps(acc) + roundings * eps(dtype)


def layer_reduction_length(args: llama.ModelArgs, T: int) -> int:
    """Σ n_i through one decoder layer for a sequence of T tokens (the longest path, residuals included).

    RMSNorm: mean of C squares, rsqrt, scale (C + 3); q/k/v: C; RoPE: 2; q·k: D; softmax: T (max, exp-sum, divide);
    attention-weighted sum of values: T; wo: H·D; residual: 1; second RMSNorm: C + 3; w1/w3: C; SiLU and gate: 3;
    w2: F (for an MoE layer: the router's C, the sigmoid and the expert's F); residual: 1.
    """
    C, D, H = args.dim, args.head_dim, args.n_heads
    F = max(args.ffn_hidden_dim, args.moe_hidden_dim or 0)
    router = C + 1 if args.moe_args is not None else 0
    return (C + 3) + C + 2 + D + 2 * T + H * D + 1 + (C + 3) + router + C + 3 + F + 1


def forward_reduction_length(args: llama.ModelArgs, T: int) -> int:
    """Σ n_i from token ids to logits of a `Transformer(args)` on T tokens: every layer, the final norm, the head."""
    return args.n_layers * layer_reduction_length(args, T) + (args.dim + 3) + args.dim


def forward_tolerance(args: llama.ModelArgs, T: int, dtype: torch.dtype, *, roundings_per_layer: int = 0) -> float:
    """`tolerance` for a whole forward pass: logits (or the last hidden state) of two evaluations in `dtype`.

    roundings_per_layer: results each layer stores in a dtype narrower than its accumulation (bfloat16: the
    q/k/v, scores, attention output, wo, norm, w1/w3, gate and w2 results, about 10).
    """
    roundings = roundings_per_layer * args.n_layers
    return tolerance(dtype, forward_reduction_length(args, T), roundings=roundings)


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|, computed in float64 (the measure every bound above applies to)."""
    ours, ref = ours.detach().double(), ref.detach().double()
    return ((ours - ref).abs().max() / ref.abs().max()).item()
