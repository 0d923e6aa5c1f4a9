"""The Llama 4 MoE layer (`llama.moe`): dispatch vs reference, the router equations, capacity, auxiliary losses.

References are written here from the equations (Switch Transformer arXiv 2101.03961 eqs. 3-6, ST-MoE arXiv
2202.08906 eq. 5, llama-models `models/llama4/moe.py`), token by token, independent of the module's vectorised code.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from llama import ModelArgs, Transformer
from llama.config import MoEArgs
from llama.moe import MoE

from tests.reference.tolerance import relative_error, tolerance

C, FE = 16, 24


def make_moe(E=4, K=1, capacity=None, seed=0, dtype=torch.float64, shared=True) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(C, FE, MoEArgs(num_experts=E, top_k=K, expert_capacity_factor=capacity, shared_expert=shared)).to(dtype)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 1 / math.sqrt(p.shape[-1] if p.ndim == 2 else p.shape[-2]))
    return moe


def inputs(B=2, T=13, seed=1, dtype=torch.float64):
    return torch.randn(B, T, C, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def swiglu(x, w1, w3, w2):  # x [C], w1/w3 [C, F], w2 [F, C]
    return (F.silu(x @ w1) * (x @ w3)) @ w2


def reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: y = Shared(x) + Σ_{e in top-K} Expert_e(σ(z_e)·x), then the capacity rule in token order."""
    E, K = moe.n_experts, moe.top_k
    xs = x.reshape(-1, C)
    capacity = None if moe.args.expert_capacity_factor is None else \
        max(1, math.ceil(moe.args.expert_capacity_factor * xs.shape[0] * K / E))
    taken = [0] * E
    out = []
    for x_t in xs:
        z = moe.router.weight @ x_t  # [E]
        y = moe.shared_expert(x_t) if moe.shared_expert is not None else torch.zeros_like(x_t)
        for e in z.topk(K).indices.tolist():
            taken[e] += 1
            if capacity is not None and taken[e] > capacity:
                continue  # over capacity: this slot skips its expert
            s = torch.sigmoid(z[e].float()).to(x.dtype)  # σ in float32, as HF and Meta compute it
            ex = moe.experts
            y = y + swiglu(s * x_t, ex.w1[e], ex.w3[e], ex.w2[e])  # the score scales the INPUT
        out.append(y)
    return torch.stack(out).reshape(x.shape)


@pytest.mark.parametrize("E, K, capacity, shared", [(4, 1, None, True), (8, 2, None, True), (4, 1, 1.0, True),
                                                   (4, 1, 0.5, True), (8, 2, 0.75, True), (4, 1, None, False)])
def test_both_dispatch_paths_equal_the_token_by_token_reference(E, K, capacity, shared):
    """The reference takes σ of one scalar at a time; PyTorch's vectorised float32 sigmoid may differ from its scalar
    one in the last bit, so against the reference the bound is that of the float32 router: the logit's rounding
    and the sigmoid's exp, add and divide (tests/reference/tolerance.py); between the two paths 1e-12."""
    moe, x = make_moe(E, K, capacity, shared=shared), inputs()
    ref = reference(moe, x)
    out = {}
    for dispatch in ("sorted", "dense"):
        moe.dispatch = dispatch
        out[dispatch] = moe(x)
        assert relative_error(out[dispatch], ref) <= tolerance(torch.float32, 4), dispatch
    assert torch.allclose(out["sorted"], out["dense"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("E, K, capacity", [(4, 1, None), (8, 2, 0.5)])
def test_dispatch_gradients_equal_dense_reference_gradients(E, K, capacity):
    grads = {}
    for dispatch in ("sorted", "dense"):
        moe, x = make_moe(E, K, capacity), inputs().requires_grad_()
        moe.dispatch = dispatch
        (moe(x) * torch.linspace(-1, 1, C, dtype=x.dtype)).sum().backward()
        grads[dispatch] = [x.grad] + [p.grad for p in moe.parameters()]
    for a, b in zip(grads["sorted"], grads["dense"]):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_router_learns_from_the_task_loss_through_the_score():
    moe, x = make_moe(), inputs()
    moe(x).sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0


def test_score_scales_input_not_output():
    """SwiGLU is not homogeneous: Expert(s·x) != s·Expert(x), so the two placements are distinguishable."""
    moe, x = make_moe(E=1), inputs()
    with torch.no_grad():
        xs = x.reshape(-1, C)
        s = torch.sigmoid(xs @ moe.router.weight[0])[:, None]
        output_scaled = moe.shared_expert(xs) + s * moe.experts.one(0, xs)
        assert not torch.allclose(moe(x).reshape(-1, C), output_scaled, rtol=1e-6)


def test_capacity_drops_the_later_tokens_of_an_overloaded_expert():
    moe, x = make_moe(E=4, capacity=1.0), inputs(B=1, T=12)
    x[..., 0] = 5.0
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2, 0] = 10.0  # logit 50 for expert 2, 0 for the others: every token picks expert 2
        y = moe(x)
    capacity = math.ceil(1.0 * 12 / 4)  # 3
    assert moe.capacity(12) == capacity
    assert moe.stats.tokens_per_expert.tolist()[2] == 12 and moe.stats.dropped == 12 - capacity
    with torch.no_grad():
        shared_only = moe.shared_expert(x)
    assert not torch.allclose(y[0, :capacity], shared_only[0, :capacity])  # first 3 tokens reach expert 2
    assert torch.equal(y[0, capacity:], shared_only[0, capacity:])  # the rest only see the shared expert


# -- auxiliary losses -----------------------------------------------------------------------------------------------


def test_aux_loss_values_by_hand():
    moe, x = make_moe(E=4, K=2), inputs()
    moe(x)
    z = x.reshape(-1, C) @ moe.router.weight.t()  # [M, E]
    M, E, K = z.shape[0], 4, 2
    chosen = z.topk(K).indices
    f = torch.stack([(chosen == i).sum() for i in range(E)]).double() / (M * K)
    P = torch.softmax(z, -1).mean(0)
    assert moe.stats.load_balance.item() == pytest.approx(E * (f * P).sum().item(), rel=1e-12)
    lse = torch.log(torch.exp(z).sum(-1))
    assert moe.stats.router_z.item() == pytest.approx((lse ** 2).mean().item(), rel=1e-12)
    assert moe.stats.tokens_per_expert.sum() == M * K


def test_uniform_router_gives_balance_loss_one():
    """Switch §2.2: the loss is minimised (= 1) under uniform routing: zero logits give P_i = 1/E, Σ f_i = 1."""
    moe, x = make_moe(E=8), inputs()
    with torch.no_grad():
        moe.router.weight.zero_()
    moe(x)
    assert moe.stats.load_balance.item() == pytest.approx(1.0, abs=1e-15)
    assert moe.stats.router_z.item() == pytest.approx(math.log(8) ** 2, rel=1e-14)


def test_aux_loss_gradients_equal_the_direct_formula():
    """∂L_balance/∂z_tj = (E/M)·p_tj·(f_j − Σ_i f_i p_ti)   (f is a count: no gradient)
       ∂L_z/∂z_tj       = (2/M)·lse_t·p_tj
       ∂/∂W_r = (∂L/∂z)ᵀ x   (z = x W_rᵀ)."""
    moe, x = make_moe(E=4, K=1), inputs()
    moe(x)
    z = (x.reshape(-1, C) @ moe.router.weight.t()).detach()
    M, E = z.shape
    p = torch.softmax(z, -1)
    f = torch.bincount(z.argmax(-1), minlength=E).double() / M
    grad_z_balance = (E / M) * p * (f - (p * f).sum(-1, keepdim=True))
    grad_z_z = (2 / M) * torch.logsumexp(z, -1, keepdim=True) * p
    for loss, grad_z in ((moe.stats.load_balance, grad_z_balance), (moe.stats.router_z, grad_z_z)):
        (g,) = torch.autograd.grad(loss, moe.router.weight, retain_graph=True)
        assert torch.allclose(g, grad_z.t() @ x.reshape(-1, C), rtol=1e-12, atol=1e-14)


def test_aux_losses_only_touch_the_router():
    moe, x = make_moe(), inputs()
    moe(x)
    moe.stats.load_balance.backward()
    assert moe.router.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in moe.named_parameters() if not n.startswith("router"))


# -- model level --------------------------------------------------------------------------------------------------


def test_model_aux_losses_mean_over_moe_layers_and_expert_load():
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny-llama-4-maverick"))  # MoE in layers 1 and 3
    with pytest.raises(RuntimeError, match="run a forward pass"):
        model.aux_losses()
    x = torch.randint(0, 256, (2, 20))
    model(x)
    layers = [model.layers[1].feed_forward, model.layers[3].feed_forward]
    losses = model.aux_losses()
    assert losses["load_balance"].item() == pytest.approx(sum(m.stats.load_balance.item() for m in layers) / 2)
    assert losses["router_z"].item() == pytest.approx(sum(m.stats.router_z.item() for m in layers) / 2)
    coef = model.args.moe_args
    assert model.aux_loss().item() == pytest.approx(coef.load_balance_coef * losses["load_balance"].item()
                                                    + coef.router_z_loss_coef * losses["router_z"].item())
    load = model.expert_load()
    assert load.shape == (2, 8) and load.sum(1).tolist() == [40, 40]


def test_parameter_counts_without_shared_expert():
    args = ModelArgs.from_name("tiny-llama-4-scout", moe_args=MoEArgs(num_experts=4, shared_expert=False))
    model = Transformer(args)
    assert all(layer.feed_forward.shared_expert is None for layer in model.layers)
    from llama.config import count_active_parameters, count_parameters
    assert count_parameters(args) == sum(p.numel() for p in model.parameters())
    assert count_parameters(args) - count_active_parameters(args) == 4 * 3 * (3 * args.dim * args.moe_hidden_dim)


def test_dense_model_has_no_aux_losses():
    model = Transformer(ModelArgs.from_name("tiny-llama-3"))
    model(torch.randint(0, 256, (1, 5)))
    assert model.aux_losses() == {} and model.aux_loss().item() == 0.0


def test_router_math_is_float32_under_bfloat16():
    moe, x = make_moe(dtype=torch.bfloat16), inputs(dtype=torch.bfloat16)
    y = moe(x)
    assert y.dtype == torch.bfloat16
    assert moe.router(x.reshape(-1, C)).dtype == torch.float32
    assert moe.stats.load_balance.dtype == torch.float32


def test_unknown_dispatch_is_refused():
    moe = make_moe()
    moe.dispatch = "gshard"
    with pytest.raises(ValueError, match="unknown MoE dispatch 'gshard'"):
        moe(inputs())
