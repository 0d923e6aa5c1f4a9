"""QLoRA (peft.qlora, `LoraConfig(quantize_base=True)`): LoRA on the NF4-dequantised weights, frozen 4-bit base."""

from __future__ import annotations

import pytest
import torch

import kernels
import peft
from peft.qlora import NF4Linear, QLoRALinear, dequantize_model
from tests.reference.paper_peft import make_model, max_rel_error, tokens
from tests.reference.tolerance import forward_tolerance, relative_error, tolerance

ALL_BLOCK = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def randomize(model, seed: int = 8) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft.adapter_parameters(model).values():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64))


def dequantized_twin(kind: str, dtype) -> torch.nn.Module:
    """The same base model with every block linear's weight replaced by dequant(quant(W)), computed here."""
    model = make_model(kind, dtype=dtype)
    with torch.no_grad():
        for layer in model.layers:
            for parent, names in ((layer.attention, ALL_BLOCK[:4]), (layer.feed_forward, ALL_BLOCK[4:])):
                for n in names:
                    W = getattr(parent, n).weight
                    q = kernels.nf4_quantize(W.float(), blocksize=64, double_quant=True)
                    W.copy_(kernels.nf4_dequantize(q, torch.float32).to(dtype))
    return model


def copy_adapter(src, dst) -> None:
    with torch.no_grad():
        for (n, p), (m, d) in zip(peft.adapter_parameters(src).items(), peft.adapter_parameters(dst).items()):
            assert n == m
            d.copy_(p)


@pytest.mark.parametrize("kind", ["mha", "gqa", "tied"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_qlora_equals_lora_on_the_dequantised_weight(kind, dtype):
    targets = ("wq", "wv", "w2")  # the other block linears are quantised without an adapter
    qmodel = peft.apply(make_model(kind, dtype=dtype), peft.LoraConfig(r=4, target_modules=targets,
                                                                      quantize_base=True))
    randomize(qmodel)
    lmodel = peft.apply(dequantized_twin(kind, dtype), peft.LoraConfig(r=4, target_modules=targets))
    copy_adapter(qmodel, lmodel)
    toks = tokens(qmodel.args)
    with torch.no_grad():
        q_out, l_out = qmodel(toks), lmodel(toks)
    if dtype == torch.float64:
        assert torch.equal(q_out, l_out)
    else:
        assert max_rel_error(q_out, l_out) <= forward_tolerance(qmodel.args, toks.shape[1], dtype)
    assert isinstance(qmodel.layers[0].attention.wk, NF4Linear)
    assert isinstance(qmodel.layers[0].attention.wq, QLoRALinear)
    assert type(qmodel.output) is torch.nn.Linear  # the head stays in high precision


def test_identity_at_init_is_the_quantised_model():
    qmodel = peft.apply(make_model("gqa"), peft.LoraConfig(r=4, target_modules=ALL_BLOCK, quantize_base=True))
    toks = tokens(qmodel.args)
    with torch.no_grad():
        assert torch.equal(qmodel(toks), dequantized_twin("gqa", torch.float64)(toks))


def test_gradients_reach_the_input_and_the_factors_only():
    qmodel = peft.apply(make_model("mha", dtype=torch.float32),
                        peft.LoraConfig(r=4, target_modules=("w1",), quantize_base=True))
    randomize(qmodel)
    layer = qmodel.layers[0].feed_forward.w1
    x = torch.randn(2, 3, layer.in_features, requires_grad=True)
    dy = torch.randn(2, 3, layer.out_features)
    layer(x).backward(dy)
    W = kernels.nf4_dequantize(layer.qweight, torch.float32)
    A, B, s = layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling
    n_out, n_in, r, rows = layer.out_features, layer.in_features, A.shape[0], 6
    # dX = dY W + s dY B A: reductions over the F outputs, then r
    assert relative_error(x.grad, dy @ W + s * (dy @ B) @ A) <= tolerance(torch.float32, n_out + r + 2)
    # dB = s dYᵀ (X Aᵀ): reductions over the C inputs, then the 6 rows
    assert relative_error(layer.lora_B.grad, s * (dy.reshape(-1, dy.shape[-1]).T @ (x.detach() @ A.T).reshape(
        -1, A.shape[0]))) <= tolerance(torch.float32, n_in + rows + 1)
    assert [n for n, p in layer.named_parameters()] == ["lora_A", "lora_B"]  # the NF4 weight is not a parameter
    qmodel(tokens(qmodel.args)).square().mean().backward()
    assert {n for n, p in qmodel.named_parameters() if p.grad is not None} == set(peft.adapter_parameters(qmodel))


@pytest.mark.parametrize("compute", ["bfloat16", "float32"])
def test_compute_dtype(compute):
    qmodel = peft.apply(make_model("mha", dtype=torch.float32),
                        peft.LoraConfig(r=4, target_modules=("wq",), quantize_base=True, compute_dtype=compute))
    layer = qmodel.layers[0].attention.wq
    assert layer.lora_A.dtype == torch.float32 and layer.compute_dtype == getattr(torch, compute)
    x = torch.randn(2, 3, layer.in_features)
    y = layer(x)
    assert y.dtype == torch.float32  # cast back to the input's dtype, like bitsandbytes' Linear4bit
    W = kernels.nf4_dequantize(layer.qweight, getattr(torch, compute))
    # one reduction over the C inputs, and in bfloat16 one rounding of the result
    bound = tolerance(W.dtype, layer.in_features, roundings=1 if compute == "bfloat16" else 0)
    assert relative_error(y, (x.to(W.dtype) @ W.T).float()) <= bound


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_merge_dequantises_and_never_requantises(dtype):
    config = peft.LoraConfig(r=4, target_modules=ALL_BLOCK, quantize_base=True)
    qmodel = peft.apply(make_model("gqa", dtype=dtype), config)
    randomize(qmodel)
    toks = tokens(qmodel.args)
    layer = qmodel.layers[1].attention.wv
    packed = layer.weight_packed.clone()
    with torch.no_grad():
        unmerged = qmodel(toks)
        peft.merge(qmodel)
        merged = qmodel(toks)
    compute = torch.promote_types(dtype, torch.float32)
    expected = (kernels.nf4_dequantize(layer.qweight, torch.float32).to(compute)
                + layer.scaling * layer.lora_B.to(compute) @ layer.lora_A.to(compute)).to(dtype)
    assert layer.weight.dtype == dtype and torch.equal(layer.weight, expected)  # dense, high precision
    assert torch.equal(layer.weight_packed, packed)  # the NF4 codes are untouched (kept for unmerge)
    if dtype == torch.float64:
        assert max_rel_error(merged, unmerged) <= 1e-10
    else:
        # float32: merged and unmerged, each against the same model in float64 (same NF4 codes, same adapter values:
        # exact to ~1e-16), are each one float32 evaluation within the forward bound of tests/reference/tolerance.py
        # (the merged weight's one extra rounding included); re-quantising (NF4 error ~10%) or a wrong ΔW would be
        # orders of magnitude above it.
        twin = peft.apply(make_model("gqa"), config)
        copy_adapter(qmodel, twin)
        with torch.no_grad():
            exact = twin(toks)
        bound = forward_tolerance(qmodel.args, toks.shape[1], dtype)
        assert max_rel_error(merged.double(), exact) <= bound and max_rel_error(unmerged.double(), exact) <= bound
    with torch.no_grad():
        peft.unmerge(qmodel)
        assert torch.equal(qmodel(toks), unmerged)


def test_kv_cache_decoding_equals_full_forward():
    qmodel = peft.apply(make_model("gqa"), peft.LoraConfig(r=4, target_modules=ALL_BLOCK, quantize_base=True))
    randomize(qmodel)
    toks = tokens(qmodel.args, T=8)
    with torch.no_grad():
        full = qmodel(toks)
        qmodel.setup_cache(toks.shape[0], 16)
        steps = [qmodel(toks[:, :5], start_pos=0)] + [qmodel(toks[:, t:t + 1], start_pos=t) for t in range(5, 8)]
    assert max_rel_error(torch.cat(steps, dim=1), full) < 1e-12


def test_storage_is_four_bit(tmp_path):
    qmodel = peft.apply(make_model("mha", dtype=torch.float32),
                        peft.LoraConfig(r=4, target_modules=ALL_BLOCK, quantize_base=True))
    layer = qmodel.layers[0].feed_forward.w1  # 64 x 192 = 12288 values
    n = layer.in_features * layer.out_features
    stored = sum(getattr(layer, f"weight_{f}").numel() * getattr(layer, f"weight_{f}").element_size()
                 for f in ("packed", "absmax", "absmax2", "offset"))
    assert layer.weight_packed.dtype == torch.uint8 and stored * 8 / n < 4.2  # 4 + 8/64 + 32/(64·256) + tiny
    peft.save_adapter(qmodel, tmp_path)  # the adapter file holds only the LoRA factors
    assert all(".lora_" in k for k in peft.adapter_state_dict(qmodel))


def test_save_load_round_trip(tmp_path):
    config = peft.LoraConfig(r=2, target_modules=("wq", "w3"), quantize_base=True)
    qmodel = peft.apply(make_model("tied"), config)
    randomize(qmodel)
    peft.save_adapter(qmodel, tmp_path)
    fresh = peft.load_adapter(make_model("tied"), tmp_path)  # quantises its own copy of the same base
    toks = tokens(qmodel.args)
    with torch.no_grad():
        assert torch.equal(fresh(toks), qmodel(toks))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_float32_through_the_kernels(monkeypatch, backend):
    """The same model through kernels.qlora_matmul's reference and its Triton kernel (interpreted on CPU)."""
    monkeypatch.setenv("KERNELS_BACKEND", backend)
    qmodel = peft.apply(make_model("gqa", dtype=torch.float32),
                        peft.LoraConfig(r=4, target_modules=("wq", "w2"), quantize_base=True))
    randomize(qmodel)
    lmodel = peft.apply(dequantized_twin("gqa", torch.float64), peft.LoraConfig(r=4, target_modules=("wq", "w2")))
    copy_adapter(qmodel, lmodel)
    toks = tokens(qmodel.args, T=5)
    out = qmodel(toks)
    out.square().mean().backward()
    with torch.no_grad():
        assert max_rel_error(out.double(), lmodel(toks)) <= forward_tolerance(qmodel.args, 5, torch.float32)
    assert all(p.grad is not None for p in peft.adapter_parameters(qmodel).values())


# -- bad input ----------------------------------------------------------------------------------------------------
def test_nan_weight_is_refused_before_anything_changes():
    model = make_model("mha")
    with torch.no_grad():
        model.layers[1].feed_forward.w3.weight[5, 7] = float("nan")
    with pytest.raises(ValueError, match=r"cannot quantise layers\.1\.feed_forward\.w3: .*\[5, 7\] is nan"):
        peft.apply(model, peft.LoraConfig(quantize_base=True))
    assert type(model.layers[0].attention.wq) is torch.nn.Linear and not hasattr(model, "peft_state")


@pytest.mark.parametrize("bad, message", [(dict(use_dora=True), "DoRA on an NF4 base"),
                                          (dict(compute_dtype="float128"), "not a torch dtype name"),
                                          (dict(compute_dtype="int8"), "of a floating-point type")])
def test_config_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        peft.LoraConfig(quantize_base=True, **bad)


@pytest.mark.gpu
@pytest.mark.parametrize("quantize", [False, True])
def test_cuda_bf16_triton_matches_reference(monkeypatch, quantize):
    """On a GPU: LoRA / QLoRA through the Triton kernels vs. the same model through the references (bf16)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    config = peft.LoraConfig(r=8, target_modules=ALL_BLOCK, quantize_base=quantize, compute_dtype="bfloat16")
    model = peft.apply(make_model("gqa", dtype=torch.bfloat16).cuda(), config)
    randomize(model)
    toks = tokens(model.args, B=4, T=64).cuda()
    outs, grads = {}, {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("KERNELS_BACKEND", backend)
        model.zero_grad()
        out = model(toks).float()
        out.square().mean().backward()
        outs[backend] = out.detach()
        grads[backend] = {n: p.grad.float().clone() for n, p in peft.adapter_parameters(model).items()}
    bound = forward_tolerance(model.args, toks.shape[1], torch.bfloat16, roundings_per_layer=10)
    assert max_rel_error(outs["triton"], outs["reference"]) <= bound
    for name, g in grads["triton"].items():  # the backward pass retraces every reduction and rounding once more
        assert max_rel_error(g, grads["reference"][name]) <= 2 * bound, name


def test_dequantize_model_replaces_frozen_nf4_layers():
    """For deployment after merge: the NF4 layers without an adapter become dense nn.Linear, same function."""
    qmodel = peft.apply(make_model("gqa"), peft.LoraConfig(r=4, target_modules=("wq",), quantize_base=True))
    randomize(qmodel)
    toks = tokens(qmodel.args)
    with torch.no_grad():
        before = qmodel(toks)
        dequantize_model(qmodel)
        assert type(qmodel.layers[0].attention.wk) is torch.nn.Linear
        assert isinstance(qmodel.layers[0].attention.wq, QLoRALinear)  # adapted layers are left to merge/unmerge
        assert torch.equal(qmodel(toks), before)
    assert not qmodel.layers[0].attention.wk.weight.requires_grad
