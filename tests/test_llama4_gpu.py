"""Llama 4 on a CUDA device (marked gpu: deselected in CI, run by hand on a GPU machine).

The CPU float64 model is the reference; the CUDA runs check that the device paths (sdpa kernels with and without a
piece mask, complex64 RoPE, the sorted MoE dispatch, the KV cache) agree with it and that long inputs stay small.
"""

import copy

import pytest
import torch

from llama import ModelArgs, Transformer
from llama.moe import MoE

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

NAMES = ["tiny-llama-4-scout", "tiny-llama-4-maverick"]


def rel_err(a, b):
    return ((a.double().cpu() - b.double().cpu()).abs().max() / b.double().cpu().abs().max()).item()


def pair(name, **kw):
    torch.manual_seed(0)
    cpu = Transformer(ModelArgs.from_name(name, attention_chunk_size=8, floor_scale=8.0, attn_scale=0.5, **kw))
    cpu.reset_parameters(std=0.2)
    gpu = copy.deepcopy(cpu).cuda().eval()
    return cpu.double().eval(), gpu


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("implementation", ["sdpa", "math"])
@pytest.mark.parametrize("name", NAMES)
def test_cuda_float32_matches_cpu_float64(name, implementation):
    cpu, gpu = pair(name)
    gpu.set_attention_implementation(implementation)
    x = torch.randint(0, 256, (2, 45))
    with torch.no_grad():
        assert rel_err(gpu(x.cuda()), cpu(x)) < 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_cuda_bfloat16_is_close(name):
    """Mean error: bf16 rounding can flip the top-1 expert of a near-tied token, which moves that token's logits
    by O(1) (seen on H200: max error 0.41 of the largest logit on tiny Maverick), so the max is no criterion."""
    cpu, gpu = pair(name)
    x = torch.randint(0, 256, (2, 45))
    with torch.no_grad():
        out, ref = gpu.bfloat16()(x.cuda()).double().cpu(), cpu(x)
    assert torch.isfinite(out).all() and ((out - ref).abs().mean() / ref.abs().mean()).item() < 5e-2


def test_cuda_dispatch_equals_dense_reference_and_trains():
    _, gpu = pair("tiny-llama-4-scout")
    gpu.train()
    x = torch.randint(0, 256, (2, 45), device="cuda")
    outs = []
    for dispatch in ("sorted", "dense"):
        for m in gpu.modules():
            if isinstance(m, MoE):
                m.dispatch = dispatch
        outs.append(gpu(x))
    assert rel_err(outs[0], outs[1]) < 1e-5
    (outs[0].logsumexp(-1).mean() + gpu.aux_loss()).backward()
    assert all(torch.isfinite(p.grad).all() for p in gpu.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", NAMES)
def test_cuda_kv_cache_equals_full_forward(name):
    _, gpu = pair(name)
    x = torch.randint(0, 256, (2, 45), device="cuda")
    with torch.no_grad():
        full = gpu(x)
        gpu.setup_cache(2, 64)
        pieces, pos = [], 0
        for n in [5, 1, 1, 1, 7, 9, 1, 12, 8]:
            pieces.append(gpu(x[:, pos:pos + n], start_pos=pos))
            pos += n
        gpu.clear_cache()
    assert rel_err(torch.cat(pieces, 1), full) < 1e-4


def test_cuda_32k_forward_memory():
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny-llama-4-scout", max_seq_len=32768, attention_chunk_size=8192))
    model = model.cuda().eval()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        logits = model(torch.randint(0, 256, (1, 32768), device="cuda"))
    peak = torch.cuda.max_memory_allocated() - base
    print(f"32k-token forward on CUDA: peak {peak / 2**20:.0f} MiB above the weights")
    assert torch.isfinite(logits).all() and peak < 1 * 2**30  # a dense float32 mask alone would be 4 GiB
