"""Weight-only int8 quantisation for inference: every linear layer keeps its weight as int8 plus one scale per row.

Shapes: M tokens (batch × sequence), K in features, N out features, V vocab, C model dim.

Why it makes decoding fast (gpt-fast, "Accelerating Generative AI with PyTorch II", 2023: "int8 weight-only
quantization"): at batch 1 a decoding step multiplies one activation vector by every weight matrix. That is 2 FLOPs
per weight read, far below what the CPU could compute per byte, so the step takes as long as streaming the weights
from memory. Bytes per weight at batch 1:

    float32  4            bfloat16  2            int8 + a bfloat16 scale per row  1 + 2/K  (≈ 1.004 at K = 512)

so int8 weights cut the bytes of a float32 model ~4× (of a bfloat16 one ~2×). At large batch (training, prefill)
the same products are compute-bound and int8 storage gains nothing; this file is for decoding.

The quantiser is the "vector-wise" absmax scheme of LLM.int8() (Dettmers et al. 2022, arXiv 2208.07339, §3.1,
eq. 1 applied per row of W, as gpt-fast's `WeightOnlyInt8QuantHandler` does): for output row n,

    s_n  = max_k |W_nk| / 127                    symmetric: no zero point, 0 stays exactly 0
    Q_nk = round(W_nk / s_n)  ∈ [-127, 127]      so  |W_nk − s_n·Q_nk| ≤ s_n / 2
    y_n  = Σ_k x_k W_nk ≈ s_n · Σ_k x_k Q_nk      the scale leaves the sum: one multiply per output, not per weight

Only the weights are quantised; activations are not (unlike LLM.int8()'s int8 matmul), so no outlier handling is
needed: an outlier *feature* of x costs nothing, and an outlier *weight* only coarsens its own row.

Two implementations of y = (x Qᵀ) ⊙ s, chosen per call by `Int8Linear.implementation`:
  * "dequant": the formula in plain PyTorch, in x's dtype (float64 for exact tests). It materialises Q as floats,
    so it reads more bytes than the float layer it replaced: it is the reference, not the fast path. (gpt-fast
    relies on torch.compile to fuse the cast into the matmul; on this CPU Inductor does not, for a float32 x.)
  * "int8pack": `torch.ops.aten._weight_int8pack_mm`, PyTorch's fused CPU kernel that reads Q as int8, converts in
    registers and accumulates in float32. Its vectorised path takes bfloat16 activations (float32 and float16
    inputs fall to a scalar loop 10-30× slower), so x is rounded to bfloat16 and y comes back in bfloat16 before
    being cast to x's dtype: two extra roundings of relative size ≤ 2⁻⁹ on top of the weight error. On AVX-512
    CPUs it silently returns garbage (or crashes) unless K is a multiple of 16 (found by testing torch 2.13);
    such layers use "dequant".
  "auto" (default): "int8pack" for float32/bfloat16/float16 inputs on CPU when the kernel exists and K % 16 == 0,
  else "dequant".

Measured at batch 1 on one core of the development CPU (AMD EPYC with AVX-512 BF16, no AMX; torch 2.13), for the
32000×512 output matrix: float32 F.linear 4.1 ms, bfloat16 F.linear 1.7-1.9 ms, int8pack with bfloat16 x 0.44 ms,
int8pack with float32 x 10.7 ms, compiled float32 dequant F.linear 35 ms. Whole-model numbers: scripts/bench_model.py.

The scales are rounded to bfloat16 *before* the weights are divided by them, so both implementations use exactly
the same s (the kernel needs them in bfloat16) and Q is the best int8 code for that s.

Tied embeddings (Llama 3.2 1B/3B): `output` and `tok_embeddings` share one [V, C] matrix. Quantising `output`
quantises that matrix, so the embedding lookup is switched to the same int8 table (`Int8Embedding`: row v of the
table is s_v·Q_v, the same per-row scale) and the two modules keep sharing one copy of Q (`output.weight is
tok_embeddings.weight`); only the [V] scales exist twice (bfloat16 for the kernel, the model's dtype for the
lookup). An untied embedding stays in floating point: a lookup reads one row per token, so its size never limits
decoding speed.

Not quantised: the Llama 4 MoE experts (batched [E, ·, ·] weights, not `nn.Linear`), norms, RoPE tables. The model
becomes inference-only: Q and s are buffers without gradients. Quantise after moving the model to its device and
dtype: `.to()` copies each module's buffers separately (a tied table would get two equal copies), and a later
`.to(dtype)` turns the bfloat16 scales into that dtype (exactly), which costs a cast per call on the kernel path.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

IMPLEMENTATIONS = ("auto", "int8pack", "dequant")
KERNEL_DTYPE = torch.bfloat16  # activation dtype of _weight_int8pack_mm's vectorised CPU path
KERNEL_K_MULTIPLE = 16  # in-features the AVX-512 kernel handles correctly


def has_int8pack_kernel() -> bool:
    """Whether this PyTorch build has the fused int8-weight CPU kernel (added in PyTorch 2.3)."""
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric absmax int8 quantisation of weight [N, K] -> (Q int8 [N, K], s [N] bfloat16).

    s is rounded to bfloat16 first (then exactly representable in every float dtype), then Q = round(W / s).
    """
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        got = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise TypeError(f"quantize_weight needs a floating-point weight tensor, got {got}; "
                        f"pass the float weight of an nn.Linear (e.g. linear.weight)")
    if weight.dim() != 2:
        raise ValueError(f"quantize_weight needs a 2-D weight [out_features, in_features], got shape "
                         f"{tuple(weight.shape)}")
    if weight.device.type == "meta":
        raise ValueError("cannot quantise a weight on the meta device; load or initialise real weights first "
                         "(e.g. llama.load(path), or model.to_empty(device='cpu') + reset_parameters())")
    w = weight.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError("weight contains inf or nan; int8 absmax scales would be meaningless. Check the "
                         "checkpoint (or the training run that produced it) before quantising")
    # LLM.int8() eq. 1, per output row: s_n = absmax_n / 127, rounded to bfloat16 (see module docstring)
    scales = (w.abs().amax(dim=1) / 127.0).to(KERNEL_DTYPE).float()  # [N]
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero row: Q = 0 for any scale
    # Q_nk = round(W_nk / s_n); the clamp only matters when rounding s down to bfloat16 pushed |W/s| past 127
    q = torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8)  # [N, K]
    return q, scales.to(KERNEL_DTYPE)


def _check_qweight(qweight: torch.Tensor, scales: torch.Tensor) -> None:
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.int8 or qweight.dim() != 2:
        got = f"{qweight.dtype} {tuple(qweight.shape)}" if isinstance(qweight, torch.Tensor) else type(qweight)
        raise TypeError(f"qweight must be an int8 tensor [out_features, in_features], got {got}; "
                        f"build it with llama.quantize.quantize_weight(weight)")
    if not isinstance(scales, torch.Tensor) or not scales.is_floating_point() \
            or tuple(scales.shape) != (qweight.shape[0],):
        got = f"{scales.dtype} {tuple(scales.shape)}" if isinstance(scales, torch.Tensor) else type(scales)
        raise ValueError(f"scales must be a float tensor of shape ({qweight.shape[0]},) (one per output row), "
                         f"got {got}; build them with llama.quantize.quantize_weight(weight)")


class Int8Linear(nn.Module):
    """y = (x Qᵀ) ⊙ s (+ bias): a frozen linear layer with an int8 weight Q [N, K] and per-row scales s [N].

    Same call signature as nn.Linear: x [..., K] -> y [..., N] in x's dtype.
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 implementation: str = "auto"):
        super().__init__()
        _check_qweight(qweight, scales)
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("weight", qweight)  # int8 [N, K]; named `weight` so a tied embedding can share it
        # [N], bfloat16 as the kernel takes it: a cast inside a torch.compile graph trips an Inductor lowering bug
        # of _weight_int8pack_mm (torch 2.13), and a per-call cast costs ~2 µs per layer in eager mode
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.implementation = implementation

    @classmethod
    def from_linear(cls, linear: nn.Linear, implementation: str = "auto") -> "Int8Linear":
        """Quantise an nn.Linear (its float weight is not kept)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Int8Linear.from_linear needs an nn.Linear, got {type(linear).__name__}; "
                            f"only plain linear layers can be quantised (adapters: merge them first)")
        qweight, scales = quantize_weight(linear.weight)
        return cls(qweight, scales, linear.bias, implementation)

    @property
    def implementation(self) -> str:
        return self._implementation

    @implementation.setter
    def implementation(self, value: str) -> None:
        if value not in IMPLEMENTATIONS:
            raise ValueError(f"unknown Int8Linear implementation {value!r}; use one of {IMPLEMENTATIONS}")
        if value == "int8pack" and not has_int8pack_kernel():
            raise ValueError("implementation 'int8pack' needs torch.ops.aten._weight_int8pack_mm (PyTorch >= 2.3); "
                             "use 'auto' or 'dequant'")
        if value == "int8pack" and self.in_features % KERNEL_K_MULTIPLE:
            raise ValueError(f"implementation 'int8pack' needs in_features divisible by {KERNEL_K_MULTIPLE}, got "
                             f"{self.in_features}; use 'auto' (falls back to 'dequant' for this layer) or 'dequant'")
        self._implementation = value

    def uses_kernel(self, x: torch.Tensor) -> bool:
        if self._implementation != "auto":
            return self._implementation == "int8pack"
        return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
                and self.in_features % KERNEL_K_MULTIPLE == 0 and has_int8pack_kernel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            raise TypeError(f"Int8Linear input must be floating point, got {x.dtype}; it replaces an nn.Linear "
                            f"and takes the same activations")
        if self.uses_kernel(x):
            x2 = x.reshape(-1, self.in_features).to(KERNEL_DTYPE)  # [M, K]
            s = self.scales if self.scales.dtype == KERNEL_DTYPE else self.scales.to(KERNEL_DTYPE)  # after .to(dtype)
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, s)  # [M, N] bfloat16
            y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)  # [..., N]
        else:
            # the reference: y = (x Qᵀ) ⊙ s with Q cast to x's dtype (exact: |Q| ≤ 127)
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)  # [..., N]
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """diag(s) Q [N, K]: the float weight this layer computes with."""
        return self.weight.to(dtype) * self.scales.to(dtype)[:, None]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row scales, "
                f"bias={self.bias is not None}, implementation={self._implementation!r}")


class Int8Embedding(nn.Module):
    """Token lookup from an int8 table: E[v] = s_v · Q_v (the tied partner of an int8 `output` layer).

    tokens [B, T] -> [B, T, C] in the dtype of its scales (the model's dtype; they follow model.to(dtype)).
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        _check_qweight(qweight, scales)
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.register_buffer("weight", qweight)  # int8 [V, C]
        self.register_buffer("scales", scales)  # [V]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(tokens, self.weight)  # [B, T, C] int8
        return rows.to(self.scales.dtype) * self.scales[tokens].unsqueeze(-1)  # [B, T, C]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row scales"


def quantize_int8(model: nn.Module, include_output: bool = True, implementation: str = "auto") -> nn.Module:
    """Replace every nn.Linear of `model` (in place) by an `Int8Linear`; return the model.

    include_output: also the output layer `output` (for LLaMA at dim 512 and vocab 32000 it is ~40% of a decoding
        step's weight bytes; gpt-fast quantises it, LLM.int8()/QLoRA keep it in 16 bits). If it is tied to
        `tok_embeddings`, the embedding becomes an `Int8Embedding` on the same int8 table.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_int8 needs an nn.Module (e.g. a llama.Transformer), got {type(model).__name__}")
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)
               and (include_output or name != "output")]
    if not targets:
        raise ValueError("quantize_int8 found no nn.Linear to quantise; was the model quantised already, or are "
                         "the linears wrapped by adapters? Merge adapters first (peft: merge), then quantise")
    embedding = getattr(model, "tok_embeddings", None)
    output = getattr(model, "output", None)
    tied = (include_output and isinstance(output, nn.Linear) and isinstance(embedding, nn.Embedding)
            and output.weight is embedding.weight)
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Int8Linear.from_linear(linear, implementation))
    if tied:  # one int8 table for both ends of the model, like the float tie it replaces
        dtype = embedding.weight.dtype  # the embedding's output dtype: the model's, not the kernel's bfloat16
        model.tok_embeddings = Int8Embedding(model.output.weight, model.output.scales.to(dtype))
    return model


def int8_weight_bytes(model: nn.Module) -> int:
    """Bytes of the int8 weights and their scales (what a decoding step streams for the quantised layers)."""
    seen, total = set(), 0
    for m in model.modules():
        if isinstance(m, (Int8Linear, Int8Embedding)):
            for t in (m.weight, m.scales):
                if id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
    return total
