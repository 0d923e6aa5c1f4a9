"""Training memory: what a model × method × dtype × batch × sequence length needs (estimated), and what one run used
(measured).

Shapes: B batch, T sequence, C model dim, H / Hkv query / key-value heads, D head dim, F SwiGLU hidden, V vocab,
L layers, P parameters.

The estimate adds four terms (bytes):

    weights      = base parameters at the weight dtype; QLoRA stores the block linears (and a Llama 4 model's routed
                   experts) in NF4 with double quantisation at 4 + 8/64 + 32/(64·256) = 4.127 bits each (QLoRA arXiv
                   2305.14314 §3) and keeps embeddings, head, norms and routers at the weight dtype; plus the
                   adapter's parameters
    gradients    = trainable parameters at the weight dtype (frozen weights get none)
    optimizer    = AdamW's two moments m, v in float32 for each trainable parameter: 8 bytes (Loshchilov & Hutter);
                   + 4 bytes of float32 master weights when `master_weights` (mixed precision)
    activations  = tensors saved for the backward pass, per token and layer (listed at `activation_bytes`), × B·T
                   × L; with gradient checkpointing only each layer's input is kept, plus one layer being recomputed;
                   plus the float32 logits and their softmax gradient at the head

The QLoRA paper's two headline figures follow from it (tests/test_memory.py): 16-bit full fine-tuning of LLaMA-65B
needs 65.3e9 × (2 + 2 + 8) bytes ≈ 783 GB of weights, gradients and Adam state ("more than 780 GB", QLoRA §1), while
QLoRA (NF4+DQ base, LoRA r=64 on every block linear, bf16, gradient checkpointing, batch 1) fits in 48 GB.

Parameter counts come from the real modules built on the meta device (no memory), so every method's count is exact;
the byte accounting above is independent of the module code. The measured side, `measure_peak`, records every tensor
storage PyTorch allocates (through a dispatch mode, so it works on CPU where there is no allocator counter) and
reports the peak of live bytes; on CUDA it reads `torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from llama.config import ModelArgs
from llama.model import Transformer

from ..adapter_v1 import AdapterV1Config
from ..adapter_v2 import AdapterV2Config
from ..api import apply
from ..excitor import ExcitorConfig
from ..lora_core import LoraConfig
from ..targets import BLOCK_LINEARS, EXPERT_MATRICES, iter_experts

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
NF4_DQ_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # QLoRA §3: 4-bit codes, 8-bit block constants (64), fp32 (256 × 64)
ESTIMATE_METHODS = ("full", "lora", "qlora", "adapter_v1", "adapter_v2", "excitor")


@dataclass
class MemoryEstimate:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    trainable: int
    total_params: int

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


def default_method_config(method: str, args):
    """The config a method gets in the memory table: each paper's main setting, adapted layers capped at L."""
    L = args.n_layers
    if method in ("lora", "qlora"):  # the QLoRA recipe: r = 64 on every block linear (artidoro/qlora Guanaco scripts)
        return LoraConfig(r=64, alpha=16, target_modules=BLOCK_LINEARS, quantize_base=method == "qlora")
    if method == "adapter_v1":
        return AdapterV1Config(adapter_layers=min(30, L))
    if method == "adapter_v2":
        return AdapterV2Config(adapter_layers=min(31, L))
    if method == "excitor":
        return ExcitorConfig(adapter_layers=min(30, L))
    raise ValueError(f"unknown method {method!r}; use one of {ESTIMATE_METHODS}")


def parameter_counts(args, method: str, config=None) -> tuple[int, int, int]:
    """(trainable, frozen base parameters stored in NF4, total base parameters), counted on the meta device."""
    with torch.device("meta"):
        model = Transformer(args)
        base = sum(p.numel() for p in model.parameters())
        if method == "full":
            return base, 0, base
        config = config or default_method_config(method, args)
        quantized = 0
        if getattr(config, "quantize_base", False):  # block linears, and Llama 4's routed experts (peft.qlora_experts)
            quantized = sum(m.weight.numel() for layer in model.layers for n, m in layer.named_modules()
                            if n.split(".")[-1] in BLOCK_LINEARS)
            quantized += sum(getattr(experts, w).numel() for _, _, experts in iter_experts(model)
                             for w in EXPERT_MATRICES)
            config = dataclasses.replace(config, quantize_base=False)  # the NF4 packing itself needs real data
        apply(model, config)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, quantized, base


def activation_bytes(args, seq_len: int, dtype_bytes: int, attention: str = "sdpa") -> float:
    """Bytes that one transformer layer saves for backward, per token (eager PyTorch, this project's modules):

        2 RMSNorm inputs and 2 normed outputs             4·C
        q, and k, v after GQA repetition                  3·H·D
        k, v before repetition (RoPE'd k, v)              2·Hkv·D
        attention output (input of wo)                    H·D
        w1 out, w3 out, SiLU(w1 out), product (w2 input)   4·F
        "math" attention also keeps the softmax           H·T (fused "sdpa" keeps a log-sum-exp: H·4 bytes)
    """
    C, H, Hkv, D, F = args.dim, args.n_heads, args.n_kv_heads, args.head_dim, args.ffn_hidden_dim
    per = dtype_bytes * (4 * C + 3 * H * D + 2 * Hkv * D + H * D + 4 * F)
    per += dtype_bytes * H * seq_len if attention == "math" else 4 * H
    return per


def estimate(args, method: str = "full", dtype: str = "bf16", batch: int = 1, seq_len: int = 512,
             grad_checkpointing: bool = False, master_weights: bool = False, config=None,
             attention: str = "sdpa") -> MemoryEstimate:
    """Memory of one training step of `args` (a ModelArgs) with `method`, in bytes (see the module docstring)."""
    if method not in ESTIMATE_METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {ESTIMATE_METHODS}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {tuple(DTYPE_BYTES)}")
    if batch <= 0 or seq_len <= 0:
        raise ValueError(f"batch and seq_len must be positive, got batch={batch}, seq_len={seq_len}")
    b = DTYPE_BYTES[dtype]
    trainable, quantized, base = parameter_counts(args, method, config)
    adapter = 0 if method == "full" else trainable
    weights = (base - quantized) * b + quantized * NF4_DQ_BITS / 8 + adapter * b
    gradients = trainable * b
    optimizer = trainable * (8 + (4 if master_weights and b < 4 else 0))
    tokens = batch * seq_len
    per_layer = activation_bytes(args, seq_len, b, attention) * tokens
    if grad_checkpointing:
        acts = args.n_layers * tokens * args.dim * b + per_layer  # layer inputs + one layer recomputed
    else:
        acts = args.n_layers * per_layer
    acts += tokens * (args.dim * b + args.vocab_size * (b + 4 + 4))  # final norm, logits, fp32 logits + their grad
    return MemoryEstimate(weights, gradients, optimizer, acts, trainable, base)


# =====================================================================================================================
# Measured: peak of live tensor bytes
# =====================================================================================================================

class TensorMemoryTracker:
    """Peak bytes of live tensor storages while active (CPU or CUDA), counting the tensors registered up front.

    Every op's outputs are recorded through a TorchDispatchMode (forward, autograd's backward and the optimizer all
    dispatch); a storage counts once however many views share it, and stops counting when it is freed.
    """

    def __init__(self):
        tracker = self
        self._ref, self._flatten = StorageWeakRef, tree_flatten
        self.live: dict[int, tuple] = {}
        self.current = self.peak = 0

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._sweep()
                for t in tree_flatten(out)[0]:
                    tracker.add(t)
                tracker.peak = max(tracker.peak, tracker.current)
                return out

        self._mode = _Mode()

    def add(self, t) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        if hasattr(t, "to_local"):  # an FSDP2 shard: count the local storage
            t = t.to_local()
        storage = t.untyped_storage()
        ref = self._ref(storage)
        if ref.cdata not in self.live:
            self.live[ref.cdata] = (ref, storage.nbytes())
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)

    def add_module(self, module: nn.Module) -> None:
        for t in list(module.parameters()) + list(module.buffers()):
            self.add(t)
            if t.grad is not None:
                self.add(t.grad)

    def _sweep(self) -> None:
        dead = [k for k, (ref, _) in self.live.items() if ref.expired()]
        for k in dead:
            self.current -= self.live.pop(k)[1]

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        self._sweep()


def measure_peak(fn: Callable[[], object], model: Optional[nn.Module] = None, device: str = "cpu") -> int:
    """Peak bytes of tensor memory while `fn()` runs (model tensors counted from the start)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    tracker = TensorMemoryTracker()
    if model is not None:
        tracker.add_module(model)
    with tracker:
        fn()
    return tracker.peak


# =====================================================================================================================
# The table
# =====================================================================================================================

def table(presets, methods=ESTIMATE_METHODS, dtypes=("bf16",), batches=(1,), seq_lens=(512,),
          grad_checkpointing: bool = True) -> list[dict]:
    """One row per preset × method × dtype × batch × seq_len, sizes in GB (1e9 bytes, as the QLoRA paper)."""
    rows = []
    for name in presets:
        args = ModelArgs.from_name(name)
        for method in methods:
            for dtype in dtypes:
                for batch in batches:
                    for seq_len in seq_lens:
                        e = estimate(args, method, dtype, batch, seq_len, grad_checkpointing)
                        rows.append({"model": name, "method": method, "dtype": "nf4+" + dtype if method == "qlora"
                                     else dtype, "batch": batch, "seq_len": seq_len,
                                     "trainable": e.trainable, "trainable_pct": 100 * e.trainable / e.total_params,
                                     "weights_gb": e.weights / 1e9, "gradients_gb": e.gradients / 1e9,
                                     "optimizer_gb": e.optimizer / 1e9, "activations_gb": e.activations / 1e9,
                                     "total_gb": e.total / 1e9})
    return rows
