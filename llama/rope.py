"""Rotary position embedding (RoPE, arXiv 2104.09864) in Meta's interleaved convention, and its scaling rules.

Shapes: B batch, T sequence, H heads, D head dim.

Meta's convention rotates *adjacent* pairs (x_{2j}, x_{2j+1}) of each head vector by the angle m·θ_j at position m
(Hugging Face's Llama instead rotates (x_j, x_{j+D/2}); `llama.formats.checkpoint` permutes wq/wk rows between the two).
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
                       seq_len: Optional[int] = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies after context-extension scaling, and the attention factor that multiplies cos and sin.

    `seq_len` (current length: last position + 1) matters only for dynamic NTK. Every rule measures lengths
    against the pre-training context L0 = `scaling.original_max_position_embeddings`. The float32 operation order
    follows Hugging Face's rope-init functions (transformers 5.24 `modeling_rope_utils`), so the frequencies are
    bit-identical to theirs.
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
        # Dynamic NTK ("NTK-aware" base change, recomputed per length): with ℓ = max(seq_len, L0),
        #   base' = base·(s·ℓ/L0 − (s−1))^(D/(D−2)),  θ'_j = base'^(−2j/D);  ℓ = L0 gives the unscaled RoPE.
        # HF evaluates base' in float32 from an integer length tensor during the forward pass; so do we.
        if seq_len is None or seq_len <= L0:
            return inv_freq, 1.0
        ell = torch.tensor(seq_len)  # int64, as HF's max(position_ids) + 1
        base = theta * ((s * ell / L0) - (s - 1)) ** (head_dim / (head_dim - 2))  # float32 0-d tensor
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)), 1.0

    if scaling.rope_type == "yarn":
        return _yarn(head_dim, theta, scaling)

    raise ValueError(f"unknown rope scaling type {scaling.rope_type!r}")


def _yarn(head_dim: int, theta: float, scaling: RopeScaling) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071 §3.2 "NTK-by-parts" + §3.4 temperature).

    Dimension j rotates L0·θ_j/(2π) times over the pre-training context. Dimensions rotating more than β_fast times
    keep θ_j (extrapolate), those rotating fewer than β_slow times get θ_j/s (interpolate), a linear ramp between.
    """
    s, L0 = scaling.factor, scaling.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:  # dimension index whose wavelength fits `rotations` times in L0
        return head_dim * math.log(L0 / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # weight of the original θ_j
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)  # 1/θ_j
    interpolated, original = 1.0 / (s * pos_freqs), 1.0 / pos_freqs
    scaled = interpolated * (1 - extrapolation) + original * extrapolation

    # §3.4: sqrt(1/t) = 0.1·ln(s) + 1, multiplying both cos and sin (so the logits scale by its square).
    def mscale(scale: float, m: float = 1.0) -> float:
        return 0.1 * m * math.log(scale) + 1.0 if scale > 1 else 1.0

    factor = scaling.attention_factor
    if factor is None:
        if scaling.mscale and scaling.mscale_all_dim:
            factor = mscale(s, scaling.mscale) / mscale(s, scaling.mscale_all_dim)
        else:
            factor = mscale(s)
    return scaled, float(factor)


class RotaryEmbedding(nn.Module):
    """Produces (cos, sin) tables for given positions; the tables are shared by every layer in one forward.

    complex64=True builds them as torch.polar(1, angle) like Meta's `precompute_freqs_cis` and HF Llama 4 (polar's
    cos/sin differ from Tensor.cos/sin in the last float32 bit; `apply_rotary` then multiplies complex numbers).
    """

    def __init__(self, head_dim: int, theta: float, scaling: Optional[RopeScaling] = None, complex64: bool = False):
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self.complex64 = complex64
        inv_freq, self.attention_factor = scaled_frequencies(head_dim, theta, scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):
        """model.to(...) / to_empty(...) may move θ_j to another device but never round it (a bfloat16 θ_j, 8-bit
        mantissa, would drift the angle m·θ_j by up to m·θ_j/256 rad): recompute it in float32 where it lands."""
        super()._apply(fn, recurse)
        inv_freq, _ = scaled_frequencies(self.head_dim, self.theta, self.scaling)
        self.inv_freq = inv_freq.to(self.inv_freq.device)
        return self

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] or [B, T] integer positions -> cos, sin of shape [..., T, D/2] in float32."""
        inv_freq = self.inv_freq
        if self.scaling is not None and self.scaling.rope_type == "dynamic":
            seq_len = int(positions.max()) + 1 if positions.numel() else 0
            inv_freq, _ = scaled_frequencies(self.head_dim, self.theta, self.scaling, seq_len)
            inv_freq = inv_freq.to(positions.device)
        # angle m·θ_j, in float32 (both references do this product in float32, whatever the model dtype)
        angles = positions.float()[..., None] * inv_freq.float()  # [..., T, D/2]
        if self.complex64:
            freqs_cis = torch.polar(torch.ones_like(angles), angles) * self.attention_factor  # e^{i m θ_j}
            return freqs_cis.real, freqs_cis.imag
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, complex64: bool = False) -> torch.Tensor:
    """Rotate adjacent pairs of x [B, T, H, D] by the angles behind cos/sin [T, D/2] or [B, T, D/2].

    (x'_{2j}, x'_{2j+1}) = (x_{2j} cos mθ_j − x_{2j+1} sin mθ_j,  x_{2j} sin mθ_j + x_{2j+1} cos mθ_j)

    complex64=True computes the same product as (x_{2j} + i·x_{2j+1})·e^{i m θ_j} in complex64, as Meta's references
    and HF Llama 4 do (x is rounded to float32 first, even when it is float64).
    """
    if complex64:
        pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())  # [B, T, H, D/2] complex64
        freqs_cis = torch.complex(cos.float(), sin.float()).unsqueeze(-2)  # [(B,) T, 1, D/2]
        return torch.view_as_real(pairs * freqs_cis).flatten(-2).to(x.dtype)  # [B, T, H, D]
    compute = torch.promote_types(x.dtype, torch.float32)
    pairs = x.to(compute).unflatten(-1, (-1, 2))  # [B, T, H, D/2, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]  # [B, T, H, D/2]
    cos = cos.to(compute).unsqueeze(-2)  # [(B,) T, 1, D/2]: broadcast over heads
    sin = sin.to(compute).unsqueeze(-2)
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # [B, T, H, D/2, 2]
    return out.flatten(-2).to(x.dtype)  # [B, T, H, D]
