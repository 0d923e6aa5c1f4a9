"""SwiGLU feed-forward (arXiv 2002.05202), shared by the dense layers and by Llama 4's shared expert.

Shapes: C model dim, F hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FeedForward(nn.Module):
    """SwiGLU: FFN(u) = w2( SiLU(w1 u) ⊙ w3 u ); Meta: w1 = gate, w3 = up, w2 = down (all bias-free)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # [F, C]
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # [C, F]
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # [F, C]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
