"""The LLaMA decoder: one `Transformer` for every generation (LLaMA 1, Llama 2, Code Llama, Llama 3.x, Llama 4 text).

Shapes: B batch, T new tokens, S attended positions (cache + new), V vocab, C model dim (`dim`),
        H query heads, Hkv key/value heads, D head dim, F SwiGLU hidden size.

Architecture (LLaMA arXiv 2302.13971 §2.2; Llama 2 arXiv 2307.09288 §2.2; Llama 3 arXiv 2407.21783 §3.2):
    h   = x + Attention(RMSNorm(x))          pre-normalisation, no biases anywhere
    out = h + SwiGLU(RMSNorm(h))
    logits = output(RMSNorm(h_L))            no absolute positions: RoPE inside attention

Llama 4 (Meta llama-models `models/llama4/model.py`) changes single layers through per-layer flags
(`ModelArgs.layer_spec`, all off for LLaMA 1-3): every 4th layer has no RoPE and attends globally, with a query
temperature τ(m) for long contexts; the other layers attend causally inside chunks of 8192 positions and may
RMS-normalise q and k; SwiGLU is replaced by a mixture of experts (`llama.moe`) in every (Scout) or every other
(Maverick) layer.

Adapters attach from outside through two narrow override points, never by editing this file:
  * any `nn.Linear` (wq wk wv wo w1 w2 w3 output) may be replaced by a module with the same call signature;
  * `Attention.extension` (None by default) may add a bias to the attention logits and/or an extra term to the
    per-head attention output (see `AttentionExtension`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import einops
import torch
from torch import nn

from . import moe
from .attention import attend, causal_attention, causal_mask, chunked_causal_mask  # noqa: F401 (re-exported)
from .config import LayerSpec, ModelArgs, RopeScaling
from .ffn import FeedForward
from .moe import MoE
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
        return self.weight * rms_normalise(x, self.eps)


def rms_normalise(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) over the last axis, in float32 and cast back (no gain: Llama 4's QK norm)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


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
    # (g r): KV head g is copied to the n_rep consecutive query heads g·n_rep … g·n_rep + n_rep − 1
    return einops.repeat(x, "b g s d -> b (g r) s d", r=n_rep)


class Attention(nn.Module):
    """Causal self-attention with RoPE on q and k, grouped-query KV heads and an optional KV cache.

    `spec` carries the Llama 4 flags of this layer (defaults: dense LLaMA 1-3 attention).
    """

    def __init__(self, args: ModelArgs, spec: LayerSpec = LayerSpec()):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.n_rep = args.n_rep
        self.spec, self.norm_eps, self.rope_complex64 = spec, args.norm_eps, args.rope_complex64
        self.floor_scale, self.attn_scale = args.floor_scale, args.attn_scale
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
        pos = 0 if start_pos is None else start_pos
        if self.spec.use_rope:
            q, k = apply_rotary(q, cos, sin, self.rope_complex64), apply_rotary(k, cos, sin, self.rope_complex64)
        if self.spec.qk_norm:  # Llama 4 Scout: parameter-free RMS norm of each head vector, after RoPE
            q, k = rms_normalise(q, self.norm_eps), rms_normalise(k, self.norm_eps)
        if self.spec.temperature_tuning:  # Llama 4 NoPE layers: sharper attention far into long contexts
            q = (q * self.temperature(pos, T, x.device)).to(q.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H|Hkv, T, D]

        if start_pos is not None:
            if self.cache is None:
                raise RuntimeError("start_pos given but no KV cache: call model.setup_cache(batch_size, max_seq_len)")
            k, v = self.cache.update(start_pos, k, v)  # [B, Hkv, S, D]
        k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)  # [B, H, S, D]

        chunk = self.spec.attention_chunk_size
        if mask is not None and chunk is not None:  # packed rows on a chunked layer: both patterns apply
            mask = mask & chunked_causal_mask(T, pos, chunk, x.device)
        if self.extension is not None:
            bias = self.extension.score_bias(self, x, q, pos)
            if bias is not None:
                if mask is None:
                    mask = chunked_causal_mask(T, pos, chunk, x.device)  # plain causal when chunk is None
                mask = bias.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else bias + mask
        if mask is None:  # the usual path: (chunked) causal attention that never builds a T×S mask
            y = causal_attention(q, k, v, pos, chunk, self.implementation)  # [B, H, T, D]
        else:
            y = attend(q, k, v, mask, False, self.implementation)  # [B, H, T, D]

        if self.extension is not None:
            extra = self.extension.extra_output(self, x, q, pos)
            if extra is not None:
                y = y + extra
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # [B, T, H·D]
        return self.wo(y)

    def temperature(self, start_pos: int, T: int, device) -> torch.Tensor:
        """τ(m) = 1 + attn_scale·ln(1 + ⌊(m+1)/floor_scale⌋) for m = start_pos … start_pos+T-1, shape [T, 1, 1].

        Meta Llama 4 `Attention.forward` (citing arXiv 2501.19399); 1 for every m < floor_scale - 1, so short
        contexts are unchanged. Computed in float32 like both references.
        """
        m = torch.arange(start_pos, start_pos + T, device=device, dtype=torch.float32)
        return (torch.log1p(torch.floor((m + 1.0) / self.floor_scale)) * self.attn_scale + 1.0)[:, None, None]


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        spec = args.layer_spec(layer_id)
        self.attention = Attention(args, spec)
        if spec.moe:  # Llama 4: shared expert + routed experts (llama/moe.py)
            self.feed_forward = MoE(args.dim, args.moe_hidden_dim, args.moe_args)
        else:
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
        self.rope = RotaryEmbedding(args.head_dim, args.rope_theta, args.rope_scaling, complex64=args.rope_complex64)
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
            elif isinstance(module, moe.Router):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, moe.Experts):
                module.reset_parameters(std)

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

    def set_rope_scaling(self, scaling: Optional[RopeScaling], max_seq_len: Optional[int] = None) -> None:
        """Change the RoPE frequency rule of a built (e.g. trained) model: context extension by PI, dynamic NTK,
        YaRN or llama3 scaling. max_seq_len: the new longest accepted input (default: unchanged)."""
        context = max_seq_len or self.args.max_seq_len
        self.args = dataclasses.replace(self.args, rope_scaling=scaling, max_seq_len=context)
        with torch.device(self.rope.inv_freq.device):
            self.rope = RotaryEmbedding(self.args.head_dim, self.args.rope_theta, scaling,
                                        complex64=self.args.rope_complex64)

    def set_attention_implementation(self, implementation: str) -> None:
        """'sdpa' (fused kernel, default) or 'math' (the formula written out, for study)."""
        if implementation not in ("sdpa", "math"):
            raise ValueError(f"unknown attention implementation {implementation!r}; use 'sdpa' or 'math'")
        for layer in self.layers:
            layer.attention.implementation = implementation

    # -- Llama 4 MoE training signals (formulas in llama/moe.py) ----------------------------------------------------
    def aux_losses(self) -> dict[str, torch.Tensor]:
        """Unweighted {"load_balance", "router_z"} of the last forward, averaged over MoE layers ({} if dense)."""
        return moe.aux_losses(self)

    def aux_loss(self) -> torch.Tensor:
        """α·load_balance + c_z·router_z with the coefficients of `args.moe_args`: add it to the training loss."""
        losses, m = self.aux_losses(), self.args.moe_args
        if not losses:
            return self.norm.weight.new_zeros(())
        return m.load_balance_coef * losses["load_balance"] + m.router_z_loss_coef * losses["router_z"]

    def expert_load(self) -> torch.Tensor:
        """[n_moe_layers, E]: tokens routed to each expert in the last forward."""
        return moe.expert_load(self)

    # -- forward --------------------------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, start_pos: Optional[int] = None,
                segment_ids: Optional[torch.Tensor] = None, embeddings: Optional[torch.Tensor] = None,
                pixel_values: Optional[torch.Tensor] = None, **image_inputs) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V].

        start_pos: position of tokens[:, 0] when decoding with a KV cache (None: no cache, positions 0 … T-1).
        segment_ids [B, T]: for packed sequences; tokens attend only within their segment and positions restart
        at 0 at each segment start.
        embeddings [B, T, C]: input vectors to use instead of tok_embeddings(tokens) (a multimodal model passes the
        token embeddings with image features written in: `llama.vision`).
        pixel_values (and the other image inputs of an HF processor, e.g. aspect_ratio_ids): refused here with a
        clear error; images go to a multimodal model (`llama.vision`).
        """
        self._check_inputs(tokens, start_pos, segment_ids, embeddings, pixel_values, image_inputs)
        B, T = tokens.shape
        pos = 0 if start_pos is None else start_pos
        mask = None
        if segment_ids is not None:
            positions, mask = packed_positions_and_mask(segment_ids)  # [B, T], [B, 1, T, T]
        else:
            positions = torch.arange(pos, pos + T, device=tokens.device)  # [T]
        cos, sin = self.rope(positions)
        h = self.tok_embeddings(tokens) if embeddings is None else embeddings  # [B, T, C]
        for layer in self.layers:
            h = layer(h, cos, sin, start_pos, mask)
        logits = self.output(self.norm(h))  # [B, T, V]
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def _check_inputs(self, tokens: torch.Tensor, start_pos: Optional[int], segment_ids: Optional[torch.Tensor],
                      embeddings: Optional[torch.Tensor], pixel_values: Optional[torch.Tensor],
                      image_inputs: Optional[dict] = None) -> None:
        """Every check of forward's arguments, before any computation (forward itself then reads as the model)."""
        images = sorted((image_inputs or {}) | ({} if pixel_values is None else {"pixel_values": pixel_values}))
        if images:
            raise ValueError(f"{self.args.name or 'this model'} is a text-only Transformer and cannot take image "
                             f"inputs ({', '.join(images)}); build a multimodal preset (e.g. llama-4-scout-vision, "
                             f"llama-3.2-11b-vision) or load a multimodal checkpoint (Llama4ForConditionalGeneration, "
                             f"MllamaForConditionalGeneration) to pass images")
        check_tokens(tokens, start_pos, self.args.max_seq_len, self.args.vocab_size)
        B, T = tokens.shape
        if segment_ids is not None:
            if start_pos is not None:
                raise ValueError("segment_ids (packing) cannot be combined with KV-cache decoding (start_pos)")
            if segment_ids.shape != tokens.shape:
                raise ValueError(f"segment_ids shape {tuple(segment_ids.shape)} must equal tokens shape {(B, T)}")
        if embeddings is not None and embeddings.shape != (B, T, self.args.dim):
            raise ValueError(f"embeddings must have shape [batch, seq_len, dim] = {[B, T, self.args.dim]} to match "
                             f"tokens, got {list(embeddings.shape)}")

def check_tokens(tokens: torch.Tensor, start_pos: Optional[int], max_seq_len: int, vocab_size: int) -> None:
    """Refuse what a forward pass cannot take: non-integer or non-2D tokens, too long a context, ids out of range."""
    if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
        got = tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise TypeError(f"tokens must be an integer tensor (torch.long) of token ids, got {got}")
    if tokens.dim() != 2:
        raise ValueError(f"tokens must have shape [batch, seq_len], got {tuple(tokens.shape)}; "
                         f"use tokens[None] for a single sequence")
    end = (start_pos or 0) + tokens.shape[1]
    if end > max_seq_len:
        raise ValueError(f"sequence of {end} positions exceeds the model context max_seq_len={max_seq_len}; "
                         f"shorten the input or raise max_seq_len (with RoPE scaling)")
    # the id range needs the values (two host syncs): skipped while torch.compile traces, where it would split
    # the graph; eager calls (and llama.generate's prompt checks) still catch bad ids
    if tokens.numel() and tokens.device.type != "meta" and not torch.compiler.is_compiling():
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"token id {lo if lo < 0 else hi} is out of range [0, {vocab_size}); "
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
