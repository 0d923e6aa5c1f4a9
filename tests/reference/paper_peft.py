"""An independent LLaMA forward pass with every PEFT method written from its paper's equations.

Nothing here calls `llama` or `peft` module code: the model is a dict of weight tensors with Meta's names, the
attention is written out head by head in the *paper's* form (LLaMA-Adapter's concatenated keys with two softmaxes,
DoRA's W' = m·V/‖V‖, Excitor's un-centred Key^extra = A·P), RoPE multiplies complex numbers like Meta's original
code. The method tests compare `peft` against these functions; `tests/test_peft_reference.py` first checks that
the reference reproduces the frozen `llama.Transformer`.

Numerics copied on purpose from the model under test (they are the LLaMA references' numerics, not PEFT choices):
RMSNorm in float32 then cast back, RoPE angles in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

import llama

Tensor = torch.Tensor

# Tiny configurations: dense multi-head, grouped-query, and tied embeddings (+ a single KV head), no RoPE scaling.
PRESETS = {
    "mha": dict(name="tiny-llama-1"),
    "gqa": dict(name="tiny-llama-2-gqa"),
    "tied": dict(name="tiny-llama-3.2", rope_scaling=None),
}


def make_args(kind: str) -> llama.ModelArgs:
    spec = dict(PRESETS[kind])
    return llama.ModelArgs.from_name(spec.pop("name"), **spec)


def make_model(kind: str, seed: int = 0, dtype=torch.float64) -> llama.Transformer:
    """A tiny model with O(1)-scale random weights (std 0.02 would make every layer nearly the identity)."""
    torch.manual_seed(seed)
    model = llama.Transformer(make_args(kind))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]))
    return model.to(dtype)


def tokens(args: llama.ModelArgs, B: int = 2, T: int = 11, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, args.vocab_size, (B, T), generator=g)


def base_weights(model) -> dict[str, Tensor]:
    """Meta-named base weights, read through the state dict (LoRA/bias-scale wrappers keep `<name>.weight`)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith("weight")}


# -- the equations --------------------------------------------------------------------------------------------------
@dataclass
class Adapters:
    """Adapter tensors for the reference, keyed by Meta module names (e.g. "layers.1.attention.wq")."""

    lora: dict = field(default_factory=dict)  # name -> (A [r,K], B [N,r], s)          h = W0x + s·BAx
    dora: dict = field(default_factory=dict)  # name -> (A, B, s, m [N])               W' = m·(W0+sBA)/‖W0+sBA‖
    bias_scale: dict = field(default_factory=dict)  # name -> (b, s, side)             y = s(Wx+b) | W(s x)+b
    prompts: dict = field(default_factory=dict)  # layer -> (P [K,C], g [H], γ)         LLaMA-Adapter V1/V2
    excitor: dict = field(default_factory=dict)  # layer -> (P [K,HD], Wd [r,C], Wu [HD,r], g [1|H], τ, γ, rotate)


def rms_norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
    x32 = x.float()  # Meta's expression, verbatim: float32 rounding here is part of the model's definition
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Meta's complex RoPE: (x_{2j} + i x_{2j+1}) · e^{i m θ_j}, angles in float32.  x [B, T, H, D]."""
    D = x.shape[-1]
    freqs = 1.0 / (theta ** (torch.arange(0, D, 2).float() / D))
    angles = torch.outer(positions.float(), freqs)  # [T, D/2] float32
    cis = torch.complex(torch.cos(angles), torch.sin(angles)).to(torch.complex128)[:, None, :]  # [T, 1, D/2]
    xc = torch.view_as_complex(x.to(torch.float64).reshape(*x.shape[:-1], D // 2, 2).contiguous())
    return torch.view_as_real(xc * cis).reshape(x.shape).to(x.dtype)


def softmax(s: Tensor) -> Tensor:
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True)


def reference_forward(args: llama.ModelArgs, W: dict[str, Tensor], toks: Tensor,
                      ad: Optional[Adapters] = None, return_hidden: bool = False):
    """logits [B, T, V] of the adapted model, written from the papers' equations (and the last hidden state
    [B, T, C] before the final norm if `return_hidden`: the norm rounds to float32, the hidden state does not)."""
    ad = ad or Adapters()
    B, T = toks.shape
    H, Hkv, D, C = args.n_heads, args.n_kv_heads, args.head_dim, args.dim
    pos = torch.arange(T)

    def linear(name: str, x: Tensor) -> Tensor:
        W0 = W[name + ".weight"]
        if name in ad.lora:  # LoRA eq. (3)
            A, Bm, s = ad.lora[name]
            return x @ W0.T + s * (x @ A.T) @ Bm.T
        if name in ad.dora:  # DoRA eq. (5): W' = m · V / ‖V‖_row, V = W0 + sBA
            A, Bm, s, m = ad.dora[name]
            V = W0 + s * Bm @ A
            return x @ (m[:, None] * V / V.norm(dim=1, keepdim=True)).T
        if name in ad.bias_scale:  # LLaMA-Adapter V2 §4.1: y = s·(Wx + b)  (or chat65b: W(s·x) + b)
            b, s, side = ad.bias_scale[name]
            return (x @ W0.T + b) * s if side == "output" else (x * s) @ W0.T + b
        return x @ W0.T

    h = W["tok_embeddings.weight"][toks]  # [B, T, C]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(args.n_layers):
        p = f"layers.{i}."
        x = rms_norm(h, W[p + "attention_norm.weight"], args.norm_eps)
        q = rope(linear(p + "attention.wq", x).view(B, T, H, D), pos, args.rope_theta)
        k = rope(linear(p + "attention.wk", x).view(B, T, Hkv, D), pos, args.rope_theta)
        v = linear(p + "attention.wv", x).view(B, T, Hkv, D)
        heads = []
        for hh in range(H):
            g = hh // (H // Hkv)  # GQA: query head hh reads KV head g
            qh, kh, vh = q[:, :, hh], k[:, :, g], v[:, :, g]  # [B, T, D]
            S = qh @ kh.transpose(1, 2) / math.sqrt(D)  # [B, T, T]
            if i in ad.excitor:  # Excitor: S^g = softmax(g·S^extra + S + mask), Key^extra = softmax(Q^e Pᵀ/τ) P
                P, Wd, Wu, gate, tau, act, rotate = ad.excitor[i]
                Qe = x @ Wd.T @ Wu.T  # [B, T, HD]
                key_extra = softmax(Qe @ P.T / tau) @ P  # [B, T, HD]
                if rotate:  # ablation: Key^extra_j rotated by its token's position j
                    key_extra = rope(key_extra.view(B, T, H, D), pos, args.rope_theta).reshape(B, T, H * D)
                S_extra = qh @ key_extra[..., hh * D:(hh + 1) * D].transpose(1, 2) / math.sqrt(D)
                S = act(gate[hh if gate.numel() > 1 else 0]) * S_extra + S
            S = S.masked_fill(~causal, float("-inf"))
            if i in ad.prompts:  # LLaMA-Adapter eqs. (5)-(8): keys [P; T], two softmaxes, gated prompt block
                P, gate, act = ad.prompts[i]
                kP = linear(p + "attention.wk", P).view(-1, Hkv, D)[:, g]  # [K, D], no RoPE
                vP = linear(p + "attention.wv", P).view(-1, Hkv, D)[:, g]
                S_K = qh @ kP.T / math.sqrt(D)  # [B, T, K]
                Sg = torch.cat([act(gate[hh]) * softmax(S_K), softmax(S)], dim=-1)  # [B, T, K + T]
                Vcat = torch.cat([vP.expand(B, -1, -1), vh], dim=1)  # [B, K + T, D]
                heads.append(Sg @ Vcat)
            else:
                heads.append(softmax(S) @ vh)
        attn = torch.stack(heads, dim=2).reshape(B, T, H * D)
        h = h + linear(p + "attention.wo", attn)
        x = rms_norm(h, W[p + "ffn_norm.weight"], args.norm_eps)
        gate_up = torch.nn.functional.silu(linear(p + "feed_forward.w1", x)) * linear(p + "feed_forward.w3", x)
        h = h + linear(p + "feed_forward.w2", gate_up)
    out_w = "output.weight" if "output.weight" in W else "tok_embeddings.weight"
    W.setdefault("output.weight", W[out_w])
    logits = linear("output", rms_norm(h, W["norm.weight"], args.norm_eps))
    return (logits, h) if return_hidden else logits


def forward_with_hidden(model, toks: Tensor) -> tuple[Tensor, Tensor]:
    """The model's logits and its last hidden state (the final norm's input), captured with a forward pre-hook."""
    seen = []
    handle = model.norm.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    try:
        logits = model(toks)
    finally:
        handle.remove()
    return logits, seen[-1]


def check_against_reference(model, toks: Tensor, ad: Adapters, tol: float = 1e-12) -> float:
    """Compare logits and the float64 last hidden state with the reference; return the larger relative error."""
    with torch.no_grad():
        logits, hidden = forward_with_hidden(model, toks)
        ref_logits, ref_hidden = reference_forward(model.args, base_weights(model), toks, ad, return_hidden=True)
    err = max(max_rel_error(logits, ref_logits), max_rel_error(hidden, ref_hidden))
    assert err < tol, err
    return err


def identity(g: Tensor) -> Tensor:
    return g


GATE_FNS: dict[str, Callable] = {"tanh": torch.tanh, "identity": identity}


def max_rel_error(a: Tensor, b: Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


# -- the reference reproduces the frozen model ------------------------------------------------------------------
