"""LLaMA-Excitor (Zou et al., arXiv 2404.00913, CVPR 2024): prompts that re-weight attention, values untouched.

Shapes: B batch, T new tokens, S attended positions, H heads, D head dim, C model dim, K prompts, r rank.

No code for this paper is public and its text was not readable when this was written. The mechanism below is our
own reconstruction, from the authors' architecture figure (`zoubo9034/zoubo9034.github.io`, `Excitor/`) and
secondary summaries. In each of the topmost L layers, with the layer's normed input x:

    Q^e = x W_down W_up                                           trainable low-rank "Wq_Excitor" (C -> r -> C)
    A   = softmax_over_K( Q^e P_lᵀ / τ )                          the tokens attend over K learnable prompts P_l
    Key^extra = A P_l                                             the prompts are keys and values, unprojected
    S^extra   = Q (Key^extra)ᵀ / √D                               per head, with the frozen (RoPE-rotated) query
    S^g       = softmax( g_l · S^extra + S + mask ),  out = W_o (S^g V)     one softmax; W_v, W_o, V untouched

Differences and assumptions (every element the paper does not state, with the option that controls it):
  * `rank` r = 16 and `adapter_layers` L = 30 (top 30 of 32 at 7B) are from a secondary summary; `adapter_len`
    K = 30 is derived: it is the only round value that reproduces the reported ≈7.6M parameters (7,618,590).
  * The rank-16 factorisation sits on the query side (W_down [r, C], W_up [C, r], no biases) — inferred.
  * The inner prompt attention is single-head and C-wide; its temperature `prompt_temperature` τ defaults to √C.
  * Multi-head form: Key^extra is split into H heads like the queries (one per *query* head, also under GQA) and
    scaled by 1/√D, as LLaMA scales its own logits (the paper's single-head notation writes √C).
  * Gate `gate_init` = 1.0, one scalar per layer (`gate_per_head=False`), no tanh (`gate_activation="identity"`),
    kept in float32; `up_init="zeros"`, W_down Kaiming-uniform like LoRA's A, prompts ~ N(0, `prompt_init_std`² = 1)
    like LLaMA-Adapter's. This is our default ("Option B"): the model starts exactly at the frozen one because
    W_up = 0 makes every extra key the mean prompt p̄, whose logits are a per-row constant that the softmax ignores,
    and W_up gets a full-size gradient at step 0 (not one scaled by a near-zero gate; the other parameters follow
    from step 1, as LoRA's A follows B). "Option A" (gate_init=0, up_init="kaiming") is the LLaMA-Adapter-style
    ablation, where only the gate moves at step 0. gate = 0 together with W_up = 0 is refused: every gradient is 0.
  * RoPE: `extra_key_rope="none"` (default) dots the rotated query with an un-rotated Key^extra, as LLaMA-Adapter
    treats its position-free prompt keys. "absolute" rotates Key^extra_j by its token's absolute position j; it is
    an ablation, it breaks the identity at W_up = 0 (use Option A with it), and it assumes positions 0 … T-1 (or
    start_pos …), so it is wrong for packed sequences (segment_ids), whose positions restart per segment.
  * Exact identity in floating point: with the un-rotated key we compute Key^extra − p̄ = (A − 1/K) P instead of A P.
    The difference q_i·p̄/√D is constant along each row of S^extra, so the softmax — the whole forward pass and every
    gradient — is unchanged in exact arithmetic, and at W_up = 0 the extra logits are exactly 0 (A = 1/K bit for bit).
  * KV-cache decoding: Key^extra_j depends only on token j, so it is cached beside the layer's K/V (this module keeps
    its own cache, allocated like the layer's KV cache) and the new queries read all S positions.
  * The multimodal variant (visual features stacked with the prompts through trainable Wk/Wv_Excitor) is
    `peft.excitor_visual`; it overrides `prompt_keys_values`.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from llama.model import AttentionExtension
from llama.rope import apply_rotary

from .lora_core import master_dtype
from .targets import check_free_extensions, top_layers


@dataclass
class ExcitorConfig:
    """LLaMA-Excitor hyper-parameters; see the module docstring for which are the paper's and which are assumed."""

    adapter_len: int = 30  # K prompts per adapted layer (derived from the 7.6M count)
    adapter_layers: int = 30  # L, topmost layers with an Excitor block
    rank: int = 16  # r of the low-rank query map W_down W_up
    prompt_temperature: Optional[float] = None  # τ of the inner prompt softmax; None -> √(prompt width) = √C
    gate_init: float = 1.0  # cold-start gating factor g_l at step 0 ("Option B"; 0.0 for "Option A")
    gate_per_head: bool = False  # one g per layer (scalar) or one per head
    gate_activation: str = "identity"  # "identity" or "tanh" applied to g
    up_init: str = "zeros"  # W_up init: "zeros" (Option B) or "kaiming" (Option A)
    prompt_init_std: float = 1.0  # prompts ~ N(0, std²)
    extra_key_rope: str = "none"  # "none": un-rotated Key^extra (default); "absolute": rotated by token position

    method = "excitor"

    def __post_init__(self):
        for key in ("adapter_len", "rank"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ExcitorConfig.{key} must be a positive integer, got {value!r}")
        if self.prompt_temperature is not None and not self.prompt_temperature > 0:
            raise ValueError(f"prompt_temperature must be > 0 or None (√C), got {self.prompt_temperature!r}")
        if self.gate_activation not in ("identity", "tanh"):
            raise ValueError(f"unknown gate_activation {self.gate_activation!r}; use 'identity' or 'tanh'")
        if self.up_init not in ("zeros", "kaiming"):
            raise ValueError(f"unknown up_init {self.up_init!r}; use 'zeros' or 'kaiming'")
        if self.extra_key_rope not in ("none", "absolute"):
            raise ValueError(f"unknown extra_key_rope {self.extra_key_rope!r}; use 'none' or 'absolute'")
        if not self.prompt_init_std > 0:
            raise ValueError(f"prompt_init_std must be > 0, got {self.prompt_init_std!r}")
        if self.gate_init == 0 and self.up_init == "zeros":
            raise ValueError("gate_init=0 with up_init='zeros' is the zero-gradient trap: every Excitor gradient "
                             "is exactly 0 and training never starts; use gate_init=1.0 with up_init='zeros' "
                             "(default) or gate_init=0.0 with up_init='kaiming'")


class ExcitorBlock(AttentionExtension):
    """The Excitor block of one attention layer: adds g · S^extra to the logits through `score_bias`."""

    def __init__(self, config: ExcitorConfig, dim: int, n_heads: int, head_dim: int, rope=None,
                 dtype=torch.float32, device=None):
        super().__init__()
        width = n_heads * head_dim  # = C for every LLaMA; the extra keys must be as wide as the queries
        self.n_heads, self.head_dim, self.adapter_len = n_heads, head_dim, config.adapter_len
        self.tau = config.prompt_temperature or math.sqrt(width)
        self.gate_activation, self.extra_key_rope = config.gate_activation, config.extra_key_rope
        self.prompt = nn.Parameter(torch.empty(config.adapter_len, width, dtype=dtype, device=device))  # P_l [K, HD]
        nn.init.normal_(self.prompt, std=config.prompt_init_std)
        self.w_down = nn.Parameter(torch.empty(config.rank, dim, dtype=dtype, device=device))  # [r, C]
        nn.init.kaiming_uniform_(self.w_down, a=math.sqrt(5))
        self.w_up = nn.Parameter(torch.empty(width, config.rank, dtype=dtype, device=device))  # [HD, r]
        if config.up_init == "zeros":
            nn.init.zeros_(self.w_up)
        else:
            nn.init.kaiming_uniform_(self.w_up, a=math.sqrt(5))
        gate_shape = (n_heads,) if config.gate_per_head else (1,)
        # the gate stays in float32 (at least) whatever the model's dtype
        self.gate = nn.Parameter(torch.full(gate_shape, float(config.gate_init), dtype=master_dtype(dtype),
                                            device=device))
        self._rope = (rope,)  # the model's RotaryEmbedding, only for extra_key_rope="absolute" (not a submodule)
        self._cache: Optional[torch.Tensor] = None  # extra keys of past positions [B_max, S_max, HD]
        self._cache_owner = None  # weak reference to the KVCache the cache above mirrors

    def gate_value(self) -> torch.Tensor:
        return torch.tanh(self.gate) if self.gate_activation == "tanh" else self.gate

    def prompt_keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Keys and values of the inner prompt attention, [b, K', HD] each, and which of the K' are valid ([B, K']
        or None: all). Here both are the raw prompts P_l; the visual variant stacks projected image features below."""
        P = self.prompt.to(x.dtype)[None]  # [1, K, HD]
        return P, P, None

    def extra_keys(self, attn, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Key^extra (minus its uniform mixture when un-rotated) for the new tokens: x [B, T, C] -> [B, T, HD]."""
        keys, values, valid = self.prompt_keys_values(x)  # [b, K', HD] ×2
        # Q^e = x W_down W_up  (the low-rank Wq_Excitor)
        q_e = F.linear(F.linear(x, self.w_down.to(x.dtype)), self.w_up.to(x.dtype))  # [B, T, HD]
        # A = softmax over the K' prompts of Q^e Pᵀ / τ  (row j uses token j only: causal by construction)
        logits = (q_e @ keys.transpose(-1, -2)) / self.tau  # [B, T, K']
        if valid is not None:
            logits = logits.masked_fill(~valid[:, None], float("-inf"))
        A = F.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))  # [B, T, K']
        if self.extra_key_rope == "none":
            # Key^extra − v̄ = (A − u) Ṽ with u uniform over the valid entries: the subtracted q·v̄ is a per-row
            # constant of S^extra (see module notes); for plain prompts u = 1/K, v̄ = p̄
            if valid is None:
                return (A - 1.0 / self.adapter_len).to(x.dtype) @ values  # [B, T, HD]
            u = valid.to(A.dtype)
            return (A - (u / u.sum(-1, keepdim=True))[:, None]).to(x.dtype) @ values  # [B, T, HD]
        key = A.to(x.dtype) @ values  # Key^extra = A Ṽ  [B, T, HD]
        spec = getattr(attn, "spec", None)
        if spec is not None and not spec.use_rope:  # a Llama 4 NoPE layer rotates nothing
            return key
        B, T, _ = key.shape
        positions = torch.arange(start_pos, start_pos + T, device=x.device)
        cos, sin = self._rope[0](positions)  # [T, D/2]
        key = key.view(B, T, self.n_heads, self.head_dim)  # [B, T, H, D]
        return apply_rotary(key, cos, sin, getattr(attn, "rope_complex64", False)).flatten(2)  # [B, T, HD]

    def _with_cache(self, attn, key: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Keys of all S = start_pos + T positions, keeping past ones in a cache mirroring the layer's KV cache."""
        if attn.cache is None:
            if start_pos:  # unreachable through Attention.forward, which needs its cache for start_pos > 0
                raise RuntimeError("start_pos > 0 without a KV cache: call model.setup_cache first")
            self._cache, self._cache_owner = None, None
            return key
        owner = self._cache_owner() if self._cache_owner is not None else None
        if owner is not attn.cache:  # a new KV cache was set up: allocate ours to match it
            B_max, _, S_max, _ = attn.cache.k.shape
            self._cache = torch.zeros(B_max, S_max, key.shape[-1], dtype=key.dtype, device=key.device)
            self._cache_owner = weakref.ref(attn.cache)
            if start_pos:
                raise RuntimeError("the Excitor key cache was set up after decoding started; "
                                   "call model.setup_cache before the first forward with start_pos")
        if self._cache.device != key.device or self._cache.dtype != key.dtype:  # the model was moved or cast
            self._cache = self._cache.to(key.device, key.dtype)
        B, T, _ = key.shape
        self._cache[:B, start_pos:start_pos + T] = key
        return self._cache[:B, :start_pos + T]  # [B, S, HD]

    def score_bias(self, attn, x: torch.Tensor, q: torch.Tensor, start_pos: int) -> torch.Tensor:
        B, H, T, D = q.shape
        keys = self._with_cache(attn, self.extra_keys(attn, x, start_pos), start_pos)  # [B, S, HD]
        keys = keys.view(B, -1, H, D).transpose(1, 2)  # [B, H, S, D]
        # S^extra = Q (Key^extra)ᵀ / √D per head, with the frozen RoPE-rotated query
        s_extra = (q @ keys.transpose(-2, -1)) / math.sqrt(D)  # [B, H, T, S]
        gate = self.gate_value().to(q.dtype).view(1, -1, 1, 1)  # [1, 1|H, 1, 1]
        # S^g = softmax(g · S^extra + S + mask): the attention adds this bias to its logits before its one softmax
        return gate * s_extra

    def extra_repr(self) -> str:
        return (f"adapter_len={self.adapter_len}, rank={self.w_down.shape[0]}, tau={self.tau:g}, "
                f"gate={tuple(self.gate.shape)} {self.gate_activation}, extra_key_rope={self.extra_key_rope}")


def validate(model: nn.Module, config: ExcitorConfig) -> list[int]:
    """The topmost `adapter_layers` layers, each without an attention extension yet."""
    layers = top_layers(model, config.adapter_layers, "adapter_layers")
    check_free_extensions(model, layers)
    return layers


def attach(model: nn.Module, config: ExcitorConfig, layers: list[int]) -> list[str]:
    ref = model.tok_embeddings.weight
    names = []
    for i in layers:
        attn = model.layers[i].attention
        attn.extension = ExcitorBlock(config, model.args.dim, attn.n_heads, attn.head_dim, model.rope,
                                      master_dtype(ref.dtype), ref.device)
        names += [f"layers.{i}.attention.extension.{p}" for p in ("prompt", "w_down", "w_up", "gate")]
    return names
