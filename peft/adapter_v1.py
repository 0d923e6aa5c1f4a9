"""LLaMA-Adapter V1: learnable adaption prompts with zero-initialised gated attention (Zhang et al., arXiv 2303.16199).

Shapes: B batch, T new tokens, H query heads, Hkv key/value heads, D head dim, C model dim, K prompt length.

In each of the topmost L layers, K learnable prompts P_l ∈ R^{K×C} are projected by the layer's frozen wk and wv
and attended by the token queries through their own softmax; the result is added to the attention output through
a zero-initialised gate, one per head (§3.2, eqs. 5–8; "multiple g_l for different heads"):

    S_l^g = [ g_l · softmax(S_l^K) ; softmax(S_l^{M+1}) ]          eq. (7): two separate softmaxes
    per head:  O = softmax(Q K_tokᵀ/√D + mask) V_tok  +  γ(g_l) · softmax(Q K_Pᵀ/√D) V_P,   K_P = P_l W_k, V_P = P_l W_v

Differences and choices (arXiv 2303.16199 vs. the OpenGVLab/LLaMA-Adapter code):
  * γ: the paper's eq. (7) multiplies by g_l directly, and so does the official *inference* code; the official
    *training* code (alpaca_finetuning_v1), which produced the paper's checkpoints, uses tanh(g_l), as does all V2 code.
    `gate_activation="tanh"` (default) follows the training code; "identity" follows eq. (7). The two agree at
    initialisation (tanh'(0) = 1) but not after training: evaluate a checkpoint with the γ it was trained with.
  * Scores are scaled by 1/√D per head as every implementation does (the paper writes √C).
  * Prompts enter wk/wv raw: no RMSNorm, no RoPE, no causal mask (every query sees all K prompts); only the token
    queries carry RoPE. Prompts are drawn from N(0, 1) (the official code's nn.Embedding default).
  * GQA: the prompt keys and values come out of wk/wv with Hkv heads and are shared by each group of H/Hkv query
    heads, exactly like the token keys.
  * KV-cache decoding needs nothing extra: the prompt branch depends only on the current queries, and K_P, V_P are
    recomputed from the frozen wk/wv at each step (cheap: K rows).
  * Adapter parameters are kept in at least float32 and cast to the activations' dtype for the matmuls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from llama.model import AttentionExtension, repeat_kv

from .lora_core import master_dtype
from .targets import check_free_extensions, top_layers

GATE_ACTIVATIONS = ("tanh", "identity")


@dataclass
class AdapterV1Config:
    """LLaMA-Adapter V1 hyper-parameters; defaults are the paper's 7B setting (§4.1: K=10 prompts, top 30 layers)."""

    adapter_len: int = 10  # K, prompts per adapted layer
    adapter_layers: int = 30  # L, the topmost L layers get prompts
    gate_activation: str = "tanh"  # "tanh" (official training code) or "identity" (paper eq. 7)
    prompt_init_std: float = 1.0  # prompts ~ N(0, std²)

    method = "adapter_v1"

    def __post_init__(self):
        check_prompt_options(self.adapter_len, self.gate_activation, self.prompt_init_std)


def check_prompt_options(adapter_len: int, gate_activation: str, prompt_init_std: float) -> None:
    if not isinstance(adapter_len, int) or isinstance(adapter_len, bool) or adapter_len <= 0:
        raise ValueError(f"adapter_len (prompts per layer) must be a positive integer, got {adapter_len!r}")
    if gate_activation not in GATE_ACTIVATIONS:
        raise ValueError(f"unknown gate_activation {gate_activation!r}; use 'tanh' (official training code) "
                         f"or 'identity' (paper eq. 7)")
    if not prompt_init_std > 0:
        raise ValueError(f"prompt_init_std must be > 0, got {prompt_init_std!r}")


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[b, K, n·D] -> [b, n, K, D]."""
    b, K, _ = x.shape
    return x.view(b, K, n_heads, -1).transpose(1, 2)


class AdaptionPrompt(AttentionExtension):
    """The zero-init gated prompt branch of one attention layer (plugs into `Attention.extension`)."""

    def __init__(self, adapter_len: int, dim: int, n_heads: int, gate_activation: str = "tanh",
                 prompt_init_std: float = 1.0, dtype=torch.float32, device=None):
        super().__init__()
        self.gate_activation = gate_activation
        self.prompt = nn.Parameter(torch.empty(adapter_len, dim, dtype=dtype, device=device))  # P_l [K, C]
        nn.init.normal_(self.prompt, std=prompt_init_std)
        # §3.2: "zero-init attention" — g_l starts at 0 so the layer starts as the frozen one; one gate per head.
        self.gate = nn.Parameter(torch.zeros(n_heads, dtype=dtype, device=device))  # g_l [H]
        # Extension point for multimodal variants (V1 §3.3: P^v_l = P_l + Repeat(I_p); V2 code adds visual queries to
        # the prompts): a tensor [B, K, C] or [B, 1, C] added to the prompts, set with `set_visual_prompts`.
        self.visual_prompt: Optional[torch.Tensor] = None

    def gate_value(self) -> torch.Tensor:
        """γ(g_l) [H]: tanh(g) (official training code) or g (paper eq. 7)."""
        return torch.tanh(self.gate) if self.gate_activation == "tanh" else self.gate

    def prompts(self, dtype: torch.dtype) -> torch.Tensor:
        """The prompts seen by this layer, [1, K, C] (or [B, K, C] with visual prompts added)."""
        prompt = self.prompt[None]  # [1, K, C]
        if self.visual_prompt is not None:
            prompt = prompt + self.visual_prompt  # [B, K, C]
        return prompt.to(dtype)

    def extra_output(self, attn, x: torch.Tensor, q: torch.Tensor, start_pos: int) -> torch.Tensor:
        B, H, T, D = q.shape
        prompt = self.prompts(x.dtype)  # [b, K, C], b ∈ {1, B}
        # eq. (5): keys and values of the prompts through the layer's own frozen projections
        k_p = repeat_kv(split_heads(attn.wk(prompt), attn.n_kv_heads), attn.n_rep)  # [b, H, K, D]
        v_p = repeat_kv(split_heads(attn.wv(prompt), attn.n_kv_heads), attn.n_rep)  # [b, H, K, D]
        # eq. (6), per head: S^K = Q K_Pᵀ / √D  (no mask: every position sees every prompt)
        scores = (q @ k_p.transpose(-2, -1)) / math.sqrt(D)  # [B, H, T, K]
        # eq. (7): a softmax of its own over the K prompt scores, gated per head, not renormalised with the tokens
        probs = F.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(q.dtype)
        gate = self.gate_value().to(q.dtype).view(1, H, 1, 1)  # [1, H, 1, 1]
        # eq. (8): the gated prompt values join the token values before wo
        return gate * (probs @ v_p)  # [B, H, T, D]

    def extra_repr(self) -> str:
        K, C = self.prompt.shape
        return f"adapter_len={K}, dim={C}, heads={self.gate.numel()}, gate_activation={self.gate_activation}"


def validate(model: nn.Module, config: AdapterV1Config) -> list[int]:
    """The topmost `adapter_layers` layers, each without an attention extension yet."""
    layers = top_layers(model, config.adapter_layers, "adapter_layers")
    check_free_extensions(model, layers)
    return layers


def attach_prompts(model: nn.Module, layers: list[int], adapter_len: int, gate_activation: str,
                   prompt_init_std: float, make=AdaptionPrompt) -> list[str]:
    """Give each layer in `layers` an `AdaptionPrompt` (or what `make` builds from the same arguments, e.g. one with
    visual tokens added); return the new parameters' names."""
    names = []
    ref = model.tok_embeddings.weight  # the model's dtype and device
    for i in layers:
        attn = model.layers[i].attention
        attn.extension = make(adapter_len, model.args.dim, attn.n_heads, gate_activation, prompt_init_std,
                              master_dtype(ref.dtype), ref.device)
        names += [f"layers.{i}.attention.extension.prompt", f"layers.{i}.attention.extension.gate"]
    return names


def attach(model: nn.Module, config: AdapterV1Config, layers: list[int]) -> list[str]:
    return attach_prompts(model, layers, config.adapter_len, config.gate_activation, config.prompt_init_std)


def set_visual_prompts(model: nn.Module, visual: Optional[torch.Tensor]) -> None:
    """Add `visual` [B, K, C] (or [B, 1, C]) to the prompts of every adapted layer; None removes it.

    This is the multimodal extension point (V1 §3.3, V2 code): a vision encoder and projection producing `visual`
    live outside this package.
    """
    for layer in model.layers:
        if isinstance(layer.attention.extension, AdaptionPrompt):
            layer.attention.extension.visual_prompt = visual
