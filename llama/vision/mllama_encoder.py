"""The Llama 3.2 Vision image encoder: a ViT-H/14 over up to 4 tiles, with local and gated global layers.

Shapes: B images (batch × image slots), T tiles per image (max_num_tiles), N tokens per tile (patches + class token),
        Np tokens per tile padded to a multiple of 8, W width, Hv heads, Dv head dim, Fv MLP hidden size,
        C channels, P tile side in pixels, p patch side, g = P/p patches per side, R supported tile grids.

Architecture (Llama 3 paper arXiv 2407.21783 §7.2.1; Meta llama-models `models/llama3/multimodal/model.py`,
`VisionEncoder.forward`), for one image cut into T tiles of P×P pixels:

    x = Linear(patches(tile))                                   g² tokens per tile, bias-free (the 14×14 "conv")
    x = x + tanh(γ_pre)·E_pre[grid, t]                          one vector per tile position t of the tile grid
    x = [cls; x]                                                N = g² + 1 tokens per tile
    x = x + (1 − tanh(γ_pos))·E_pos[n] + tanh(γ_pos)·E_tile[grid, t, n]
    x = LN_pre(x), padded to Np tokens per tile
    x = 32 local layers over all T·Np tokens jointly          the states entering layers 3, 7, 15, 23, 30 are kept
    x = LN_post(x) + tanh(γ_post)·E_post[grid, t]
    x = 8 gated global layers:  x += tanh(γ_a)·Attn(LN(x));  x += tanh(γ_f)·MLP(LN(x))
    out = [x ; kept states] per token                           W·(1 + 5) = 7680 features

Every layer is pre-LayerNorm (with bias), bias-free q/k/v/o, a GELU MLP with biases, non-causal attention.

Departures from Meta's reference, all following Hugging Face's layout (transformers 5.24 `MllamaVisionModel`), which is
the one published checkpoints use:
  * The tile tables E_pre, E_post, E_tile are indexed by aspect-ratio id and tile slot ([R+1, T, …], HF's
    "precomputed" form) instead of Meta's (row, col) grid ([4, 4, …]). HF's form holds Meta's (its converter gathers
    Meta's grid into it) and more: its rows for different grids are independent, and it has entries for padding
    tiles, which real tokens can attend to (next item).
  * Padding mask (Meta `build_encoder_attention_mask`, HF `_prepare_aspect_ratio_attention_mask`, identical): with
    pad = padding token or tile beyond the image's grid, only pad↔pad pairs are blocked. Real tokens still attend
    to padding tokens; this quirk is reproduced, since the released weights were trained with it.
  * When N is already a multiple of 8, no token is added (Meta adds 8, HF adds 0 but then treats every token as
    padding); neither case arises in the released models (N = 1601).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import attend
from .mllama_config import MllamaVisionArgs


class VisionAttention(nn.Module):
    """Non-causal multi-head self-attention, q/k/v/o without biases."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        q, k, v = (w(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # [B, Hv, S, Dv]
                   for w in (self.wq, self.wk, self.wv))
        y = attend(q, k, v, mask, False, "sdpa")  # softmax(q kᵀ/√Dv + mask) v, [B, Hv, S, Dv]
        return self.wo(y.transpose(1, 2).reshape(B, S, -1))  # [B, S, W]


class VisionMLP(nn.Module):
    """MLP(u) = c_proj(GELU(c_fc u)), GELU with erf (Meta `ImageFeedForward`), both linears with biases."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden_dim)
        self.c_proj = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class ImageTransformerBlock(nn.Module):
    """x += γ_a·Attn(LN_1(x)); x += γ_f·MLP(LN_2(x)) with γ = tanh(gate) in gated (global) layers, else 1."""

    def __init__(self, args: MllamaVisionArgs, gated: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.attn = VisionAttention(args.dim, args.n_heads)
        self.ln_2 = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.mlp = VisionMLP(args.dim, args.ffn_hidden_dim)
        self.gated = gated
        if gated:  # zero-initialised (Meta): a fresh global layer starts as the identity
            self.gate_attn = nn.Parameter(torch.zeros(1))
            self.gate_ffn = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        a = self.attn(self.ln_1(x), mask)
        x = x + (self.gate_attn.tanh() * a if self.gated else a)
        f = self.mlp(self.ln_2(x))
        return x + (self.gate_ffn.tanh() * f if self.gated else f)


class ImageTransformer(nn.Module):
    def __init__(self, args: MllamaVisionArgs, n_layers: int, gated: bool):
        super().__init__()
        self.resblocks = nn.ModuleList(ImageTransformerBlock(args, gated) for _ in range(n_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, record: Sequence[int] = ()
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x [B, S, W] through every layer; also returns the states entering the layers listed in `record`."""
        kept = []
        for i, block in enumerate(self.resblocks):
            if i in record:
                kept.append(x)
            x = block(x, mask)
        return x, kept


class TileEmbedding(nn.Module):
    """A gated vector per (tile grid, tile slot): x[b, t] += tanh(γ)·E[grid_b, t]  (pre- and post-tile embeddings)."""

    def __init__(self, n_grids: int, max_num_tiles: int, dim: int):
        super().__init__()
        self.max_num_tiles, self.dim = max_num_tiles, dim
        self.embedding = nn.Embedding(n_grids + 1, max_num_tiles * dim)  # row 0: image slot without an image
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        e = self.embedding(aspect_ratio_ids).view(-1, self.max_num_tiles, 1, self.dim)  # [B, T, 1, W]
        return x + self.gate.tanh() * e  # x [B, T, tokens, W]


class VisionEncoder(nn.Module):
    """pixel_values [B, T, C, P, P] (+ grid ids [B], real-tile mask [B, T]) -> features [B, T, N, W·(1+k)]."""

    def __init__(self, args: MllamaVisionArgs):
        super().__init__()
        self.args = args
        W, N, T, R = args.dim, args.n_tokens, args.max_num_tiles, len(args.tile_grids)
        self.patch_embed = nn.Linear(args.in_channels * args.patch_size ** 2, W, bias=False)  # the p×p stride-p conv
        self.class_embedding = nn.Parameter(torch.empty(W))
        self.positional_embedding = nn.Parameter(torch.empty(N, W))  # E_pos, shared by every tile
        self.tile_positional_embedding = nn.Embedding(R + 1, T * N * W)  # E_tile[grid, t, n]
        self.positional_embedding_gate = nn.Parameter(torch.zeros(1))  # γ_pos
        self.pre_tile_pos_embed = TileEmbedding(R, T, W)
        self.post_tile_pos_embed = TileEmbedding(R, T, W)
        self.ln_pre = nn.LayerNorm(W, eps=args.norm_eps)
        self.ln_post = nn.LayerNorm(W, eps=args.norm_eps)
        self.transformer = ImageTransformer(args, args.n_layers, gated=False)
        self.global_transformer = ImageTransformer(args, args.n_global_layers, gated=True)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Meta's scales: class and position embeddings ~ W^-½·N(0, 1); linears N(0, std); LayerNorms (1, 0)."""
        scale = self.args.dim ** -0.5
        nn.init.normal_(self.class_embedding, std=scale)
        nn.init.normal_(self.positional_embedding, std=scale)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std if isinstance(module, nn.Linear) else scale)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def patchify(self, tiles: torch.Tensor) -> torch.Tensor:
        """[b, C, P, P] -> [b, g², C·p·p]: non-overlapping p×p patches, rows first, each flattened as (C, y, x)."""
        b, C, P, _ = tiles.shape
        p = self.args.patch_size
        g = P // p
        x = tiles.reshape(b, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5)  # [b, g, g, C, p, p]
        return x.reshape(b, g * g, C * p * p)

    def forward(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                aspect_ratio_mask: torch.Tensor) -> torch.Tensor:
        a = self.args
        B, T = pixel_values.shape[:2]
        W, N = a.dim, a.n_tokens
        x = self.patch_embed(self.patchify(pixel_values.flatten(0, 1).to(self.patch_embed.weight.dtype)))
        x = self.pre_tile_pos_embed(x.view(B, T, N - 1, W), aspect_ratio_ids)  # [B, T, g², W]
        cls = self.class_embedding.expand(B, T, 1, W)
        x = torch.cat([cls, x], dim=2)  # [B, T, N, W]
        # x + (1 − tanh γ)·E_pos + tanh γ·E_tile[grid]: the shared table fades into the per-tile one as γ opens
        gate = self.positional_embedding_gate.tanh()
        x = x + (1 - gate) * self.positional_embedding
        x = x + gate * self.tile_positional_embedding(aspect_ratio_ids).view(B, T, N, W)
        x = self.ln_pre(x)

        Np = N + (-N) % 8
        x = F.pad(x, (0, 0, 0, Np - N))  # [B, T, Np, W]: zero tokens up to a multiple of 8 per tile
        mask = encoder_mask(aspect_ratio_mask, N, Np)  # [B, 1, T·Np, T·Np]
        x, kept = self.transformer(x.view(B, T * Np, W), mask, record=a.intermediate_layers)

        x = self.post_tile_pos_embed(self.ln_post(x).view(B, T, Np, W), aspect_ratio_ids)
        x, _ = self.global_transformer(x.view(B, T * Np, W), mask)

        # Meta stacks the kept states on a new last axis and flattens it: feature w·k + j is layer j's feature w
        kept = torch.stack(kept, dim=-1).flatten(-2)  # [B, T·Np, W·k]
        out = torch.cat([x, kept], dim=-1).view(B, T, Np, -1)
        return out[:, :, :N]  # [B, T, N, W·(1+k)]: the padding tokens dropped


def encoder_mask(aspect_ratio_mask: torch.Tensor, n_tokens: int, n_padded: int) -> torch.Tensor:
    """Bool keep-mask [B, 1, T·Np, T·Np]: blocks exactly the pairs of two padding positions (see module notes).

    A position is padding if it is one of the Np − N tokens added to its tile, or in a tile the image does not
    have (aspect_ratio_mask 0).
    """
    B, T = aspect_ratio_mask.shape
    real = (aspect_ratio_mask != 0)[:, :, None].expand(B, T, n_padded).clone()  # [B, T, Np]
    real[:, :, n_tokens:] = False
    pad = ~real.reshape(B, T * n_padded)  # [B, T·Np]
    return ~(pad[:, :, None] & pad[:, None, :])[:, None]
