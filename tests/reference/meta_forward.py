"""An independent LLaMA forward pass in float64, written from the papers with Meta's conventions.

RoPE is complex multiplication on adjacent pairs (Meta's form), attention runs one query head at a time reading KV
head h // (H/Hkv), SwiGLU, pre-norm, and the llama3 frequency rule is computed one frequency at a time in Python
floats. Nothing here calls `llama.model` code: only the weights (by Meta's names) and `ModelArgs` are read.
"""

import math

import torch

from llama import ModelArgs, Transformer


def llama3_frequencies_by_hand(head_dim, theta, s, alpha, beta, L0) -> list[float]:
    """Llama 3.1 RoPE scaling (llama-models `apply_scaling`), one frequency at a time in Python floats."""
    out = []
    for j in range(head_dim // 2):
        f = theta ** (-2 * j / head_dim)
        wavelength = 2 * math.pi / f
        if wavelength < L0 / beta:  # high frequency: unchanged
            out.append(f)
        elif wavelength > L0 / alpha:  # low frequency: interpolated by s
            out.append(f / s)
        else:  # smooth blend
            gamma = (L0 / wavelength - alpha) / (beta - alpha)
            out.append((1 - gamma) * f / s + gamma * f)
    return out


def reference_frequencies(args: ModelArgs) -> torch.Tensor:
    if args.rope_scaling is None:
        return torch.tensor([args.rope_theta ** (-2 * j / args.head_dim) for j in range(args.head_dim // 2)],
                            dtype=torch.float64)
    r = args.rope_scaling
    return torch.tensor(llama3_frequencies_by_hand(args.head_dim, args.rope_theta, r.factor, r.low_freq_factor,
                                                   r.high_freq_factor, r.original_max_position_embeddings),
                        dtype=torch.float64)


def reference_forward(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """LLaMA written out from the papers in float64: RoPE as complex multiplication (Meta's form), attention one
    query head at a time reading KV head h // (H/Hkv), SwiGLU, pre-norm. Only the RMS normalisation itself runs in
    float32, as Meta's and HF's references specify."""
    a = model.args
    W = {k: v.double() for k, v in model.state_dict().items()}
    H, Hkv, D = a.n_heads, a.n_kv_heads, a.head_dim
    B, T = tokens.shape

    def rmsnorm(x, w):
        x32 = x.float()
        return w * (x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + a.norm_eps)).double()

    # e^{i m θ_j} for m < T; angles rounded to float32 as both references compute them
    theta = reference_frequencies(a).float()
    angles = (torch.arange(T).float()[:, None] * theta[None, :]).double()  # [T, D/2]
    rot = torch.polar(torch.ones_like(angles), angles)  # [T, D/2] complex128

    def rope(x):  # [T, D] -> [T, D]: pairs (x_2j, x_2j+1) as complex numbers
        z = torch.view_as_complex(x.reshape(T, D // 2, 2).contiguous())
        return torch.view_as_real(z * rot).reshape(T, D)

    h = W["tok_embeddings.weight"][tokens]  # [B, T, C]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(a.n_layers):
        p = f"layers.{i}."
        u = rmsnorm(h, W[p + "attention_norm.weight"])
        q = u @ W[p + "attention.wq.weight"].T  # [B, T, H·D]
        k = u @ W[p + "attention.wk.weight"].T  # [B, T, Hkv·D]
        v = u @ W[p + "attention.wv.weight"].T
        out = torch.zeros(B, T, H * D, dtype=torch.float64)
        for b in range(B):
            for head in range(H):
                g = head // (H // Hkv)  # consecutive query heads share one KV head
                qh = rope(q[b, :, head * D:(head + 1) * D])
                kh = rope(k[b, :, g * D:(g + 1) * D])
                vh = v[b, :, g * D:(g + 1) * D]
                scores = (qh @ kh.T / math.sqrt(D)).masked_fill(~causal, float("-inf"))
                out[b, :, head * D:(head + 1) * D] = torch.softmax(scores, dim=-1) @ vh
        h = h + out @ W[p + "attention.wo.weight"].T
        u = rmsnorm(h, W[p + "ffn_norm.weight"])
        gate, up = u @ W[p + "feed_forward.w1.weight"].T, u @ W[p + "feed_forward.w3.weight"].T
        h = h + (gate * torch.sigmoid(gate) * up) @ W[p + "feed_forward.w2.weight"].T
    out_w = W["tok_embeddings.weight"] if a.tie_word_embeddings else W["output.weight"]
    return rmsnorm(h, W["norm.weight"]) @ out_w.T
