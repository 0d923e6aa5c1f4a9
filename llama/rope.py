"""Rotary position embedding (RoPE, arXiv 2104.09864) in Meta's interleaved convention, and its scaling rules.

Shapes: B batch, T sequence, H heads, D head dim.

Meta's convention rotates *adjacent* pairs (x_{2j}, x_{2j+1}) of each head vector by the angle m·θ_j at position m
(Hugging Face's Llama instead rotates (x_j, x_{j+D/2}); `llama.checkpoint` permutes wq/wk rows between the two).
Angles are computed in float32 as in both references, then applied in at least float32 precision.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .config import RopeScaling


def base_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """θ_j = theta^(-2j/D), j = 0 … D/2-1 (RoPE §3.2.2), in float32 as Meta and HF compute them."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def scaled_frequencies(head_dim: int, theta: float, scaling: Optional[RopeScaling],
                       seq_len: Optional[int] = None, max_seq_len: Optional[int] = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies after context-extension scaling, and the attention factor that multiplies cos and sin.

    `seq_len` (current length) and `max_seq_len` (the model's configured context) matter only for dynamic NTK.
    """
    inv_freq = base_frequencies(head_dim, theta)
    if scaling is None:
        return inv_freq, 1.0
    s, L0 = scaling.factor, scaling.original_max_position_embeddings

    if scaling.rope_type == "linear":
        # Position Interpolation (arXiv 2306.15595, eq. 4): f'(x, m) = f(x, m/s)  <=>  θ'_j = θ_j / s.
        return inv_freq / s, 1.0

    if scaling.rope_type == "llama3":
        # Llama 3.1 (Meta `apply_scaling`): keep wavelengths < L0/β, divide those > L0/α by s, blend in between.
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = L0 / scaling.low_freq_factor, L0 / scaling.high_freq_factor
        scaled = torch.where(wavelen > low_wavelen, inv_freq / s, inv_freq)
        if scaling.high_freq_factor != scaling.low_freq_factor:
            # γ_j = (L0/λ_j − α)/(β − α);  θ'_j = (1 − γ_j)·θ_j/s + γ_j·θ_j  for λ_high ≤ λ_j ≤ λ_low
            gamma = (L0 / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
            blended = (1 - gamma) * scaled / s + gamma * scaled
            in_band = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            scaled = torch.where(in_band, blended, scaled)
        return scaled, 1.0

    if scaling.rope_type == "dynamic":
        # Dynamic NTK: base' = base·(s·ℓ/Lmax − (s−1))^(D/(D−2)) with ℓ = max(seq_len, Lmax); unscaled up to Lmax.
        Lmax = max_seq_len if max_seq_len is not None else L0
        ell = max(seq_len or 0, Lmax)
        base = theta * ((s * ell / Lmax) - (s - 1)) ** (head_dim / (head_dim - 2))
        return base_frequencies(head_dim, base), 1.0

    if scaling.rope_type == "yarn":
        # YaRN (arXiv 2309.00071 §3.2, "NTK-by-parts"): interpolate dimensions that rotate fewer than β_slow times
        # over L0, extrapolate those rotating more than β_fast times, ramp linearly in between.
        def correction_dim(rotations: float) -> float:  # dimension index whose wavelength fits `rotations` in L0
            return head_dim * math.log(L0 / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(correction_dim(scaling.beta_fast)), 0)
        high = min(math.ceil(correction_dim(scaling.beta_slow)), head_dim - 1)
        if low == high:
            high += 0.001  # avoid a zero-width ramp
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolation = 1 - ramp
        scaled = (inv_freq / s) * (1 - extrapolation) + inv_freq * extrapolation
        # §3.4 temperature: sqrt(1/t) = 0.1·ln(s) + 1, applied to both cos and sin (so logits scale by its square).
        factor = scaling.attention_factor
        if factor is None:
            factor = 0.1 * math.log(s) + 1.0 if s > 1 else 1.0
        return scaled, factor

    raise ValueError(f"unknown rope scaling type {scaling.rope_type!r}")


class RotaryEmbedding(nn.Module):
    """Produces (cos, sin) tables for given positions; the tables are shared by every layer in one forward."""

    def __init__(self, head_dim: int, theta: float, scaling: Optional[RopeScaling] = None,
                 max_seq_len: Optional[int] = None):
        super().__init__()
        self.head_dim, self.theta, self.scaling, self.max_seq_len = head_dim, theta, scaling, max_seq_len
        inv_freq, self.attention_factor = scaled_frequencies(head_dim, theta, scaling, max_seq_len=max_seq_len)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] or [B, T] integer positions -> cos, sin of shape [..., T, D/2] in float32."""
        inv_freq = self.inv_freq
        if self.scaling is not None and self.scaling.rope_type == "dynamic":
            seq_len = int(positions.max()) + 1 if positions.numel() else 0
            inv_freq, _ = scaled_frequencies(self.head_dim, self.theta, self.scaling, seq_len, self.max_seq_len)
            inv_freq = inv_freq.to(positions.device)
        # angle m·θ_j, in float32 (both references do this product in float32, whatever the model dtype)
        angles = positions.float()[..., None] * inv_freq.float()  # [..., T, D/2]
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x [B, T, H, D] by the angles behind cos/sin [T, D/2] or [B, T, D/2].

    (x'_{2j}, x'_{2j+1}) = (x_{2j} cos mθ_j − x_{2j+1} sin mθ_j,  x_{2j} sin mθ_j + x_{2j+1} cos mθ_j)
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    pairs = x.to(compute).unflatten(-1, (-1, 2))  # [B, T, H, D/2, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]  # [B, T, H, D/2]
    cos = cos.to(compute).unsqueeze(-2)  # [(B,) T, 1, D/2]: broadcast over heads
    sin = sin.to(compute).unsqueeze(-2)
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # [B, T, H, D/2, 2]
    return out.flatten(-2).to(x.dtype)  # [B, T, H, D]
