"""A tiny Llama 4 MoE model with O(1) weights, and one MoE layer re-derived from its equations with LoRA experts.

The reference re-derives one MoE layer from the equations (llama.moe docstring, LoRA eq. 3) with plain tensor ops
and no code from llama.moe or peft: per token, top-1 router logit, its sigmoid scales the token, the chosen
expert's SwiGLU uses W + s·A B for each of w1 w2 w3, plus the always-on shared expert.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import llama
import peft

PRESETS = ("tiny-llama-4-scout", "tiny-llama-4-maverick")  # MoE in every layer / every other layer


def make_model(name: str, seed: int = 0) -> llama.Transformer:
    """Float64 tiny Llama 4 with O(1)-scale random weights, so routing and every term matter."""
    torch.manual_seed(seed)
    model = llama.Transformer(llama.ModelArgs.from_name(name))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]))
    return model.double()


def tokens(model, B: int = 2, T: int = 11, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.args.vocab_size, (B, T), generator=g)


def randomize(model, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft.adapter_parameters(model).values():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def moe_modules(model):
    return [layer.feed_forward for layer in model.layers if hasattr(layer.feed_forward, "router")]


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def reference_moe(moe, x: torch.Tensor) -> torch.Tensor:
    """y_t = Shared(x_t) + Expert_e(σ(z_t,e)·x_t), e = argmax_e z_t,e, each expert matrix W + s·A B (x @ W form).

    x [M, C] -> [M, C], one token at a time.
    """
    ex = moe.experts
    s = ex.scaling
    Wr = moe.router.weight.detach()  # [E, C]
    sh = moe.shared_expert
    out = torch.empty_like(x)  # [M, C]
    for t in range(x.shape[0]):
        xt = x[t]  # [C]
        z = Wr @ xt  # [E]
        e = int(torch.argmax(z))
        # Meta/HF take the router sigmoid in float32 (llama.moe); its last bit can differ between the scalar
        # evaluation here and the vectorised one over [M, E], hence the 1e-6 tolerance on this reference
        xin = torch.sigmoid(z[e].float()).to(x.dtype) * xt
        W = {n: getattr(ex, n)[e].detach() + s * (ex.lora_A[n][e].detach() @ ex.lora_B[n][e].detach())
             for n in ("w1", "w2", "w3")}
        if ex.use_dora:  # DoRA eq. (5): each output feature (column of W [K, N]) rescaled to length m
            W = {n: ex.lora_magnitude[n][e].detach() * w / w.norm(dim=0) for n, w in W.items()}
        routed = (F.silu(xin @ W["w1"]) * (xin @ W["w3"])) @ W["w2"]
        shared = (F.silu(sh.w1.weight @ xt) * (sh.w3.weight @ xt)) @ sh.w2.weight.t()
        out[t] = routed + shared
    return out


# -- initialisation ---------------------------------------------------------------------------------------------------
