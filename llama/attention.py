"""Scaled dot-product attention under a causal (optionally chunked-local) pattern, without a T×S mask in memory.

Shapes: B batch, H heads, T queries (new tokens), S keys (cache + new), D head dim, C chunk size.

Query i sits at absolute position p_i = start_pos + i, key j at position j. Two patterns:
    causal          key j visible to query i  iff  j ≤ p_i
    chunked local   key j visible to query i  iff  j ≤ p_i  and  ⌊j/C⌋ = ⌊p_i/C⌋   (Llama 4 RoPE layers, C = 8192)

`causal_attention` cuts the queries into pieces that never straddle a chunk boundary (and, for the "math"
implementation, hold at most `query_block` queries). Each piece reads one contiguous key range that ends at its last
query, which makes it a bottom-right-aligned causal problem: a square piece needs no mask at all (PyTorch's fused
causal kernel, O(T) memory on CPU as well), any other piece a bool mask of the piece's size only. So a 32k-token
forward never holds a 32k × 32k mask or score matrix. `chunked_causal_mask` builds the dense pattern for the paths
that need one (an adapter's score bias, packed sequences) and for tests.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def attend(q, k, v, mask: Optional[torch.Tensor], is_causal: bool, implementation: str) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(D) + mask) v for q [B, H, T, D], k/v [B, H, S, D]; mask is bool (True = keep) or additive.

    "sdpa" calls PyTorch's fused kernel; "math" spells the same formula out, with the softmax in at least float32
    as Meta's reference computes it. Tests check the two agree. is_causal without a mask is bottom-right aligned
    (query T-1 sees key S-1) in "math"; callers only pass it with T == S, where both conventions coincide.
    """
    if implementation == "sdpa" and mask is not None and mask.requires_grad and q.is_cuda:
        # A trainable additive bias (LLaMA-Excitor's gated logits): PyTorch's memory-efficient CUDA backward
        # rejects bias gradients with "LSE is not correctly aligned" (torch 2.11, H200); the formula below is exact.
        implementation = "math"
    if implementation == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)
    if implementation != "math":
        raise ValueError(f"unknown attention implementation {implementation!r}; use 'sdpa' or 'math'")
    T, S = q.shape[-2], k.shape[-2]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # [B, H, T, S]
    if is_causal and mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = F.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(q.dtype)
    return probs @ v  # [B, H, T, D]


def causal_mask(T: int, start_pos: int, device) -> torch.Tensor:
    """Bool [T, start_pos+T]: query i (absolute position start_pos+i) may read keys 0 … start_pos+i."""
    return torch.ones(T, start_pos + T, dtype=torch.bool, device=device).tril(start_pos)


def chunked_causal_mask(T: int, start_pos: int, chunk_size: Optional[int], device) -> torch.Tensor:
    """Bool [T, start_pos+T] of the chunked local pattern (plain causal when chunk_size is None)."""
    mask = causal_mask(T, start_pos, device)
    if chunk_size is None:
        return mask
    query_chunk = torch.arange(start_pos, start_pos + T, device=device) // chunk_size  # [T]
    key_chunk = torch.arange(start_pos + T, device=device) // chunk_size  # [S]
    return mask & (query_chunk[:, None] == key_chunk[None, :])


def causal_attention(q, k, v, start_pos: int, chunk_size: Optional[int], implementation: str,
                     query_block: int = 1024) -> torch.Tensor:
    """Attention of q [B, H, T, D] over k, v [B, H, S, D] (S = start_pos + T) under the (chunked) causal pattern."""
    T, S = q.shape[-2], k.shape[-2]
    if S != start_pos + T:
        raise ValueError(f"keys cover {S} positions but queries end at position {start_pos + T}")
    pieces, i = [], 0
    while i < T:
        first_key = (start_pos + i) // chunk_size * chunk_size if chunk_size else 0  # start of the query's chunk
        end = T if not chunk_size else min(T, first_key + chunk_size - start_pos)  # stay inside that chunk
        if implementation == "math":
            end = min(end, i + query_block)  # bound the [piece, keys] score matrix
        last_key = start_pos + end  # exclusive: the piece's last query position + 1
        pieces.append(_bottom_right_causal(q[..., i:end, :], k[..., first_key:last_key, :],
                                           v[..., first_key:last_key, :], implementation))
        i = end
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-2)  # [B, H, T, D]


def _bottom_right_causal(q, k, v, implementation: str) -> torch.Tensor:
    """q [.., T, D] are the last T of the S key positions: query i sees keys 0 … S-T+i."""
    T, S = q.shape[-2], k.shape[-2]
    if T == S:
        return attend(q, k, v, None, T > 1, implementation)  # square: the fused causal kernel, no mask
    if T == 1:
        return attend(q, k, v, None, False, implementation)  # one query at the end sees every key
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)  # [T, S], piece-sized only
    return attend(q, k, v, mask, False, implementation)
