"""Llama 4 vision encoder: a ViT with 2D RoPE, then pixel shuffle and an MLP adapter (Meta `VisionEmbeddings`).

Shapes: N tiles (every tile of every image of a batch, stacked), P = g² patches per tile (g = image / patch size),
        C encoder width, H heads, D head dim (C/H), F encoder MLP hidden size, s = 1/pixel_shuffle_ratio,
        K = (g/s)² image tokens per tile, O adapter width.

Architecture (Meta llama-models `models/llama4/vision/encoder.py` + `embedding.py`; HF `modeling_llama4.py`):
    x = W_patch · unfold_p(tile)                       each p×p×3 patch flattened (c, row, col), one matmul, no bias
    x = [x_1 … x_P ; cls] + E_pos                      the class token is APPENDED (index P); positions [P+1, C]
    x = LN_pre(x)
    x = x + Attn(LN_1(x));  x = x + MLP(LN_2(x))       × n_layers: pre-norm, non-causal, biases everywhere,
                                                       GELU MLP, 2D RoPE on q and k
    x = LN_post(x)[:, :P]                              the class token is dropped
    x = PixelShuffle(x)                                s×s neighbouring patches stacked: [g², C] -> [(g/s)², s²C]
    y = GELU(W_2 · GELU(W_1 x))                        adapter MLP, no biases, GELU after BOTH layers
The text model then maps y to its width (`vision_projection`, in `llama4_model.py`).

Module and parameter names are Meta's (`conv1._linear`, `transformer.resblocks.j.attn.wq`, `vision_adapter.mlp.c_fc`),
so a Meta state dict loads by name (HF's names are mapped in `llama/formats/llama4_vision.py`).
"""

from __future__ import annotations

import math

import einops
import torch
import torch.nn.functional as F
from torch import nn

from ..attention import attend
from ..config import Llama4VisionArgs
from ..rope import apply_rotary, base_frequencies

LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, used by Meta's and HF's encoders (neither reads a config value)


class PatchEmbedding(nn.Module):
    """A stride-p convolution written as unfold + linear (Meta `ColumnParallelConv2dPatch`): [N, 3, S, S] -> [N, P, C]."""

    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self._linear = nn.Linear(3 * patch_size * patch_size, dim, bias=False)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        # patch (gy, gx) in row-major order; its vector is ordered (channel, row in patch, column in patch) like
        # torch.nn.Unfold, which is the layout of the released weight [C, 3·p·p]
        patches = einops.rearrange(tiles, "n c (gy py) (gx px) -> n (gy gx) (c py px)",
                                   py=self.patch_size, px=self.patch_size)  # [N, P, 3·p·p]
        return self._linear(patches)  # [N, P, C]


def rope_2d(v: Llama4VisionArgs, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [P+1, D/2] of the encoder's 2D RoPE (Meta `VisionEncoder.__init__`; HF `Llama4VisionRotaryEmbedding`).

    Patch n sits at column x = n mod g, row y = n div g. Of each head's D/2 complex pairs, pair k < D/4 rotates by
    (x+1)·ω_k and pair D/4 + k by (y+1)·ω_k, with ω_k = θ^(−2k/(D/2)) (so 1-D RoPE frequencies for a head of size
    D/2); the class token (last) is not rotated. Angles, cos and sin in float32, as in both references (computed
    per forward: a [P+1, D/2] table is nothing next to the encoder, and is never cast or left on the meta device).
    """
    g, D = v.grid_size, v.dim // v.n_heads
    omega = base_frequencies(D // 2, v.rope_theta).to(device)  # [D/4] float32
    n = torch.arange(g * g, device=device)
    x, y = n % g, n // g  # [P] column and row of each patch
    angles = torch.cat([(x + 1).float()[:, None] * omega, (y + 1).float()[:, None] * omega], dim=-1)  # [P, D/2]
    angles = torch.cat([angles, angles.new_zeros(1, D // 2)])  # [P+1, D/2]: class token, angle 0
    return angles.cos(), angles.sin()


class VisionAttention(nn.Module):
    """Multi-head self-attention over the P+1 tokens of a tile: biased projections, 2D RoPE, no mask."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.wq = nn.Linear(dim, dim, bias=True)
        self.wk = nn.Linear(dim, dim, bias=True)
        self.wv = nn.Linear(dim, dim, bias=True)
        self.wo = nn.Linear(dim, dim, bias=True)
        self.implementation = "sdpa"

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        N, T, _ = x.shape
        q = self.wq(x).view(N, T, self.n_heads, self.head_dim)  # [N, T, H, D]
        k = self.wk(x).view(N, T, self.n_heads, self.head_dim)  # [N, T, H, D]
        v = self.wv(x).view(N, T, self.n_heads, self.head_dim)  # [N, T, H, D]
        # rotated as complex64 numbers, as both references do (q, k pass through float32 even in a float64 model)
        q, k = apply_rotary(q, cos, sin, complex64=True), apply_rotary(k, cos, sin, complex64=True)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [N, H, T, D]
        y = attend(q, k, v, None, False, self.implementation)  # every token sees every token of its tile
        return self.wo(y.transpose(1, 2).reshape(N, T, self.n_heads * self.head_dim))  # [N, T, C]


class VisionMLP(nn.Module):
    """c_proj(GELU(c_fc x)) with biases (Meta `_FeedForward`); exact (erf) GELU."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden_dim, bias=True)
        self.c_proj = nn.Linear(hidden_dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class VisionBlock(nn.Module):
    """Pre-norm ViT block (Meta `_TransformerBlock`, ungated): x + Attn(LN_1 x), then + MLP(LN_2 x)."""

    def __init__(self, v: Llama4VisionArgs):
        super().__init__()
        self.attn = VisionAttention(v.dim, v.n_heads)
        self.ln_1 = nn.LayerNorm(v.dim, eps=LAYER_NORM_EPS)
        self.mlp = VisionMLP(v.dim, int(v.mlp_ratio * v.dim))
        self.ln_2 = nn.LayerNorm(v.dim, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cos, sin)
        return x + self.mlp(self.ln_2(x))


class VisionTransformer(nn.Module):
    """The stack of blocks (Meta `_Transformer`, whose list is called `resblocks`)."""

    def __init__(self, v: Llama4VisionArgs):
        super().__init__()
        self.resblocks = nn.ModuleList(VisionBlock(v) for _ in range(v.n_layers))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, cos, sin)
        return x


class VisionEncoder(nn.Module):
    """Tiles [N, 3, S, S] -> patch features [N, P, C] (class token dropped)."""

    def __init__(self, v: Llama4VisionArgs):
        super().__init__()
        self.args = v
        P = v.grid_size ** 2
        self.conv1 = PatchEmbedding(v.patch_size, v.dim)
        self.class_embedding = nn.Parameter(torch.empty(v.dim))
        self.positional_embedding_vlm = nn.Parameter(torch.empty(P + 1, v.dim))
        self.ln_pre = nn.LayerNorm(v.dim, eps=LAYER_NORM_EPS)
        self.ln_post = nn.LayerNorm(v.dim, eps=LAYER_NORM_EPS)
        self.transformer = VisionTransformer(v)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        x = self.conv1(tiles)  # [N, P, C]
        cls = self.class_embedding.expand(x.shape[0], 1, -1)  # [N, 1, C]
        x = torch.cat([x, cls], dim=1) + self.positional_embedding_vlm  # [N, P+1, C]
        cos, sin = rope_2d(self.args, tiles.device)  # [P+1, D/2] each
        x = self.transformer(self.ln_pre(x), cos, sin)
        return self.ln_post(x)[:, :-1]  # [N, P, C]


def pixel_shuffle(x: torch.Tensor, s: int) -> torch.Tensor:
    """[N, g², C] -> [N, (g/s)², s²·C]: the s×s patches (s·h + i, s·w + j) become token (h, w), channels (i, j, c).

    Meta `pixel_shuffle_op` / HF `pixel_shuffle` with ratio 1/s, written as one rearrangement (same order).
    """
    g = math.isqrt(x.shape[1])
    return einops.rearrange(x, "n (h i w j) c -> n (h w) (i j c)", h=g // s, i=s, w=g // s, j=s)


class AdapterMLP(nn.Module):
    """GELU(c_proj GELU(c_fc x)), no biases (Meta `SimpleMLP` as used by `PixelShuffleMLP`)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.c_fc = nn.Linear(dim, out_dim, bias=False)
        self.c_proj = nn.Linear(out_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.c_proj(F.gelu(self.c_fc(x))))


class PixelShuffleAdapter(nn.Module):
    """Patch features [N, P, C] -> image tokens [N, K, O] (Meta `PixelShuffleMLP`)."""

    def __init__(self, v: Llama4VisionArgs):
        super().__init__()
        self.shuffle_factor = v.shuffle_factor
        self.mlp = AdapterMLP(v.dim * v.shuffle_factor ** 2, v.output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(pixel_shuffle(x, self.shuffle_factor))


class VisionEmbeddings(nn.Module):
    """Encoder + adapter: tiles [N, 3, S, S] -> image tokens [N, K, O] (Meta `VisionEmbeddings`)."""

    def __init__(self, v: Llama4VisionArgs):
        super().__init__()
        self.vision_encoder = VisionEncoder(v)
        self.vision_adapter = PixelShuffleAdapter(v)

    def reset_parameters(self, std: float = 0.02) -> None:
        """Linear weights N(0, std), biases 0, LayerNorms (1, 0); class and position embeddings N(0, C^-1/2) like
        Meta's constructor. Under `torch.device("meta")` this allocates nothing."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        encoder = self.vision_encoder
        nn.init.normal_(encoder.class_embedding, std=encoder.args.dim ** -0.5)
        nn.init.normal_(encoder.positional_embedding_vlm, std=encoder.args.dim ** -0.5)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.vision_adapter(self.vision_encoder(tiles))
