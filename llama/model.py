"""The LLaMA decoder: one `Transformer` for every dense generation (LLaMA 1, Llama 2, Code Llama, Llama 3.x).

Shapes: B batch, T new tokens, S attended positions (cache + new), V vocab, C model dim (`dim`),
        H query heads, Hkv key/value heads, D head dim, F SwiGLU hidden size.

Architecture (LLaMA arXiv 2302.13971 §2.2; Llama 2 arXiv 2307.09288 §2.2; Llama 3 arXiv 2407.21783 §3.2):
    h   = x + Attention(RMSNorm(x))          pre-normalisation, no biases anywhere
    out = h + SwiGLU(RMSNorm(h))
    logits = output(RMSNorm(h_L))            no absolute positions: RoPE inside attention

Adapters attach from outside through two narrow override points, never by editing this file:
  * any `nn.Linear` (wq wk wv wo w1 w2 w3 output) may be replaced by a module with the same call signature;
  * `Attention.extension` (None by default) may add a bias to the attention logits and/or an extra term to the
    per-head attention output (see `AttentionExtension`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelArgs
from .rope import RotaryEmbedding, apply_rotary


class RMSNorm(nn.Module):
    """RMSNorm (arXiv 1910.07467): y = g ⊙ x / sqrt(mean(x²) + eps), no mean-centering, no bias.

    Computed in float32 and cast back before the gain, exactly as Meta's and Hugging Face's references do (also for
    float64 inputs, which keeps float64 parity with them exact).
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class AttentionExtension(nn.Module):
    """Override point for methods that change attention internals (LLaMA-Adapter, LLaMA-Excitor).

    Both hooks receive the attention module itself (for its frozen projections), the normed layer input
    x [B, T, C], the RoPE-rotated queries q [B, H, T, D], and the position of the first new token.
    Return None to leave the layer unchanged.
    """

    def score_bias(self, attn: "Attention", x: torch.Tensor, q: torch.Tensor, start_pos: int) -> Optional[torch.Tensor]:
        """Additive term for the pre-softmax logits, [B, H, T, S] (S = start_pos + T), already scaled."""
        return None

    def extra_output(self, attn: "Attention", x: torch.Tensor, q: torch.Tensor, start_pos: int) -> Optional[torch.Tensor]:
        """Extra per-head attention output [B, H, T, D], added before the heads are merged and projected by wo."""
        return None


class KVCache(nn.Module):
    """Keys and values of past positions for incremental decoding, stored per KV head: [B, Hkv, S_max, D]."""

    def __init__(self, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, Hkv, T, D] at positions start_pos … start_pos+T-1; return all S = start_pos+T positions."""
        B, _, T, _ = k.shape
        end = start_pos + T
        self.k[:B, :, start_pos:end] = k
        self.v[:B, :, start_pos:end] = v
        return self.k[:B, :, :end], self.v[:B, :, :end]


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """GQA (arXiv 2305.13245): query head h reads KV head h // n_rep.  [B, Hkv, S, D] -> [B, Hkv·n_rep, S, D]."""
    if n_rep == 1:
        return x
    return x.repeat_interleave(n_rep, dim=1)


def attend(q, k, v, mask: Optional[torch.Tensor], is_causal: bool, implementation: str) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(D) + mask) v for q [B, H, T, D], k/v [B, H, S, D]; mask is bool (True = keep) or additive.

    "sdpa" calls PyTorch's fused kernel; "math" spells the same formula out, with the softmax in at least float32
    as Meta's reference computes it. Tests check the two agree.
    """
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


class Attention(nn.Module):
    """Causal self-attention with RoPE on q and k, grouped-query KV heads and an optional KV cache."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.n_rep = args.n_rep
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.implementation = "sdpa"
        self.extension: Optional[AttentionExtension] = None
        self.cache: Optional[KVCache] = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: Optional[int] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # [B, T, H, D]
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # [B, T, Hkv, D]
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # [B, T, Hkv, D]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H|Hkv, T, D]

        pos = 0 if start_pos is None else start_pos
        if start_pos is not None:
            if self.cache is None:
                raise RuntimeError("start_pos given but no KV cache: call model.setup_cache(batch_size, max_seq_len)")
            k, v = self.cache.update(start_pos, k, v)  # [B, Hkv, S, D]
        k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)  # [B, H, S, D]

        is_causal = mask is None
        if self.extension is not None:
            bias = self.extension.score_bias(self, x, q, pos)
            if bias is not None:
                if mask is None:
                    mask = causal_mask(T, pos, x.device)
                mask = bias.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else bias + mask
        if mask is None and T > 1 and pos > 0:  # a chunk appended to a cache: rows are offset by pos
            mask = causal_mask(T, pos, x.device)
        y = attend(q, k, v, mask, is_causal and T > 1, self.implementation)  # [B, H, T, D]

        if self.extension is not None:
            extra = self.extension.extra_output(self, x, q, pos)
            if extra is not None:
                y = y + extra
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # [B, T, H·D]
        return self.wo(y)


def causal_mask(T: int, start_pos: int, device) -> torch.Tensor:
    """Bool [T, start_pos+T]: query i (absolute position start_pos+i) may read keys 0 … start_pos+i."""
    return torch.ones(T, start_pos + T, dtype=torch.bool, device=device).tril(start_pos)


class FeedForward(nn.Module):
    """SwiGLU (arXiv 2002.05202): FFN(u) = w2( SiLU(w1 u) ⊙ w3 u ); Meta: w1 = gate, w3 = up, w2 = down."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, start_pos=None, mask=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, start_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:  # Llama 3.2 1B/3B: one [V, C] matrix for input and output
            self.output.weight = self.tok_embeddings.weight
        self.rope = RotaryEmbedding(args.head_dim, args.rope_theta, args.rope_scaling, args.max_seq_len)
        self.reset_parameters()

    # -- initialisation -------------------------------------------------------------------------------------------
    def reset_parameters(self, std: float = 0.02) -> None:
        """N(0, std) for embeddings and projections, ones for norm gains (HF `initializer_range` 0.02).

        Under `torch.device("meta")` this allocates nothing; real checkpoints overwrite it anyway.
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    # -- KV cache -------------------------------------------------------------------------------------------------
    def setup_cache(self, batch_size: int, max_seq_len: Optional[int] = None, dtype=None, device=None) -> None:
        """Allocate a KV cache in every layer for `batch_size` rows of up to `max_seq_len` positions."""
        max_seq_len = max_seq_len or self.args.max_seq_len
        if max_seq_len > self.args.max_seq_len:
            raise ValueError(f"cache length {max_seq_len} exceeds the model context {self.args.max_seq_len}")
        ref = self.norm.weight
        for layer in self.layers:
            layer.attention.cache = KVCache(batch_size, max_seq_len, self.args.n_kv_heads, self.args.head_dim,
                                            dtype or ref.dtype, device or ref.device)

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.cache = None

    def set_attention_implementation(self, implementation: str) -> None:
        """'sdpa' (fused kernel, default) or 'math' (the formula written out, for study)."""
        if implementation not in ("sdpa", "math"):
            raise ValueError(f"unknown attention implementation {implementation!r}; use 'sdpa' or 'math'")
        for layer in self.layers:
            layer.attention.implementation = implementation

    # -- forward --------------------------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, start_pos: Optional[int] = None,
                segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V].

        start_pos: position of tokens[:, 0] when decoding with a KV cache (None: no cache, positions 0 … T-1).
        segment_ids [B, T]: for packed sequences; tokens attend only within their segment and positions restart
        at 0 at each segment start.
        """
        self._check_tokens(tokens, start_pos)
        B, T = tokens.shape
        pos = 0 if start_pos is None else start_pos
        mask = None
        if segment_ids is not None:
            if start_pos is not None:
                raise ValueError("segment_ids (packing) cannot be combined with KV-cache decoding (start_pos)")
            if segment_ids.shape != tokens.shape:
                raise ValueError(f"segment_ids shape {tuple(segment_ids.shape)} must equal tokens shape {(B, T)}")
            positions, mask = packed_positions_and_mask(segment_ids)  # [B, T], [B, 1, T, T]
        else:
            positions = torch.arange(pos, pos + T, device=tokens.device)  # [T]
        cos, sin = self.rope(positions)
        h = self.tok_embeddings(tokens)  # [B, T, C]
        for layer in self.layers:
            h = layer(h, cos, sin, start_pos, mask)
        logits = self.output(self.norm(h))  # [B, T, V]
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def _check_tokens(self, tokens: torch.Tensor, start_pos: Optional[int]) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
            got = tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise TypeError(f"tokens must be an integer tensor (torch.long) of token ids, got {got}")
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape [batch, seq_len], got {tuple(tokens.shape)}; "
                             f"use tokens[None] for a single sequence")
        end = (start_pos or 0) + tokens.shape[1]
        if end > self.args.max_seq_len:
            raise ValueError(f"sequence of {end} positions exceeds the model context max_seq_len="
                             f"{self.args.max_seq_len}; shorten the input or raise max_seq_len (with RoPE scaling)")
        if tokens.numel() and tokens.device.type != "meta":
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= self.args.vocab_size:
                raise ValueError(f"token id {lo if lo < 0 else hi} is out of range [0, {self.args.vocab_size}); "
                                 f"check that the tokenizer matches the model's vocab_size")


def packed_positions_and_mask(segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For packed rows: positions restarting at each segment [B, T] and a block-causal mask [B, 1, T, T]."""
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start_index = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # [B, T]
    positions = idx - start_index
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, T]
    mask = same & torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    return positions, mask[:, None]
