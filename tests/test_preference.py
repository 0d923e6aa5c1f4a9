"""The preference formulas (peft.training.preference) against their papers, in float64: sequence log-probabilities,
the reward model's Bradley–Terry loss with Llama 2's margins, and DPO with its variants and gradients."""

import math

import pytest
import torch

import peft
from peft.training.preference import MARGINS, RATINGS, margins, reward_accuracy

D64 = torch.float64


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ---------------------------------------------------------------------------------------------------------------------
# sequence log-probabilities


def test_sequence_logps_equals_a_loop_over_positions():
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 7, 11
    logits = torch.randn(B, T, V, generator=g, dtype=D64)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100  # a prompt
    labels[1, 5:] = -100  # padding
    labels[2, :] = -100  # nothing to score
    labels[2, 4] = 3
    expected = []
    for b in range(B):
        total = 0.0
        for t in range(T - 1):  # Hugging Face's shift: logits at t predict the label at t + 1
            if labels[b, t + 1] != -100:
                total += float(torch.log_softmax(logits[b, t], -1)[labels[b, t + 1]])
        expected.append(total)
    got = peft.sequence_logps(logits, labels)
    assert got.dtype == D64
    torch.testing.assert_close(got, torch.tensor(expected, dtype=D64), rtol=1e-13, atol=1e-13)
    # the label at position 0 is never scored (nothing predicts it)
    shifted = labels.clone()
    shifted[:, 0] = 5
    torch.testing.assert_close(peft.sequence_logps(logits, shifted), got, rtol=0, atol=0)


def test_sequence_logps_upcasts_bf16():
    logits = torch.randn(2, 5, 9, dtype=torch.bfloat16)
    labels = torch.randint(0, 9, (2, 5))
    got = peft.sequence_logps(logits, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, peft.sequence_logps(logits.double(), labels).float(), rtol=1e-6, atol=1e-5)


def test_sequence_logps_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"logits must be \[B, T, V\]"):
        peft.sequence_logps(torch.zeros(2, 5, 3), torch.zeros(2, 4, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------------------------
# reward model loss (Llama 2 §3.2.2 eq. 2) and accuracy


def test_llama2_margin_tables():
    assert MARGINS["small"] == dict(zip(RATINGS, (1.0, 2 / 3, 1 / 3, 0.0)))
    assert MARGINS["large"] == dict(zip(RATINGS, (3.0, 2.0, 1.0, 0.0)))
    assert margins(["better", "negligibly better"], "large").tolist() == [2.0, 0.0]


@pytest.mark.parametrize("table", [None, "small", "large"])
@pytest.mark.parametrize("eta", [0.0, 0.01])
def test_reward_loss_is_the_papers_formula(table, eta):
    g = torch.Generator().manual_seed(1)
    chosen, rejected = torch.randn(8, generator=g, dtype=D64), torch.randn(8, generator=g, dtype=D64)
    ratings = [RATINGS[i % 4] for i in range(8)]
    m = None if table is None else margins(ratings, table)
    expected = [-math.log(sigmoid(c - r - (0.0 if table is None else MARGINS[table][x]))) + eta * (c + r) ** 2
                for c, r, x in zip(chosen.tolist(), rejected.tolist(), ratings)]
    got = peft.reward_loss(chosen, rejected, m, center_coef=eta)
    assert abs(float(got) - sum(expected) / 8) < 1e-14
    per_pair = peft.reward_loss(chosen, rejected, m, center_coef=eta, reduction="none")
    torch.testing.assert_close(per_pair, torch.tensor(expected, dtype=D64), rtol=1e-14, atol=1e-14)


def test_reward_loss_margin_at_a_tie_is_log_one_plus_e_to_m():
    zero = torch.zeros(1, dtype=D64)
    for m in (0.0, 1 / 3, 1.0, 3.0):
        assert float(peft.reward_loss(zero, zero, m)) == pytest.approx(math.log1p(math.exp(m)), rel=1e-14)


def test_reward_accuracy_overall_and_by_rating():
    chosen = torch.tensor([1.0, 2.0, 0.0, 5.0, 1.0])
    rejected = torch.tensor([0.0, 3.0, 0.0, 1.0, 2.0])
    ratings = ["better", "better", "negligibly better", "significantly better", "negligibly better"]
    overall, by = reward_accuracy(chosen, rejected, ratings)
    assert overall == pytest.approx(2 / 5)  # the tie counts as wrong
    assert by == {"significantly better": 1.0, "better": 0.5, "negligibly better": 0.0}


def test_ratings_outside_the_table_are_an_error():
    with pytest.raises(ValueError, match=r"not in Llama 2's table"):
        margins(["much better"], "small")
    with pytest.raises(ValueError, match="unknown margin table"):
        margins(["better"], "medium")
    with pytest.raises(ValueError, match=r"not in Llama 2's table"):
        reward_accuracy(torch.ones(1), torch.zeros(1), ["meh"])


# ---------------------------------------------------------------------------------------------------------------------
# DPO (arXiv 2305.18290 eq. 7), cDPO, IPO, hinge


def logps(seed=2, B=6):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, generator=g, dtype=D64) * 3 for _ in range(4)]


def h_of(pc, pr, rc, rr):
    return [(a - c) - (b - d) for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())]


@pytest.mark.parametrize("beta", [0.03, 0.1, 1.0])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_sigmoid_and_cdpo_formula(beta, eps):
    pc, pr, rc, rr = logps()
    losses, r_c, r_r = peft.dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    expected = [-(1 - eps) * math.log(sigmoid(beta * h)) - eps * math.log(sigmoid(-beta * h))
                for h in h_of(pc, pr, rc, rr)]
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=D64), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(r_c, beta * (pc - rc), rtol=0, atol=0)
    torch.testing.assert_close(r_r, beta * (pr - rr), rtol=0, atol=0)
    assert not r_c.requires_grad


def test_dpo_ipo_and_hinge_formulas():
    pc, pr, rc, rr = logps(3)
    beta = 0.25
    hs = h_of(pc, pr, rc, rr)
    ipo, _, _ = peft.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")
    torch.testing.assert_close(ipo, torch.tensor([(h - 1 / (2 * beta)) ** 2 for h in hs], dtype=D64),
                               rtol=1e-13, atol=1e-13)
    hinge, _, _ = peft.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="hinge")
    torch.testing.assert_close(hinge, torch.tensor([max(0.0, 1 - beta * h) for h in hs], dtype=D64),
                               rtol=1e-13, atol=1e-13)
    assert (hinge == 0).any() and (hinge > 0).any()  # both sides of the hinge are exercised


def test_identical_policy_and_reference_give_log_2():
    pc, pr, _, _ = logps(4)
    losses, r_c, r_r = peft.dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1)
    torch.testing.assert_close(losses, torch.full_like(losses, math.log(2)), rtol=1e-15, atol=0)
    assert (r_c == 0).all() and (r_r == 0).all()


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0), ("hinge", 0.0)])
def test_dpo_gradients_match_finite_differences(loss_type, eps):
    """Through sequence_logps of a tiny policy's logits: autograd vs central differences (gradcheck), float64."""
    g = torch.Generator().manual_seed(5)
    B, T, V = 2, 5, 4
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :2] = -100  # the prompt
    ref = torch.randn(2 * B, generator=g, dtype=D64)

    def loss(logits):
        lp = peft.sequence_logps(logits, labels)
        return peft.dpo_loss(lp[:B], lp[B:], ref[:B], ref[B:], beta=0.5, loss_type=loss_type,
                             label_smoothing=eps)[0].mean()

    logits = torch.randn(2 * B, T, V, generator=g, dtype=D64, requires_grad=True)
    assert torch.autograd.gradcheck(loss, (logits,), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_dpo_gradient_is_the_papers_weighting():
    """DPO §4: ∇L = −β σ(r̂_l − r̂_w) [∇log π(y_w) − ∇log π(y_l)]."""
    pc, pr, rc, rr = logps(6)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    beta = 0.3
    losses, r_c, r_r = peft.dpo_loss(pc, pr, rc, rr, beta=beta)
    losses.sum().backward()
    weight = -beta * torch.sigmoid(r_r - r_c)
    torch.testing.assert_close(pc.grad, weight, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(pr.grad, -weight, rtol=1e-13, atol=1e-15)


def test_dpo_bad_input():
    pc, pr, rc, rr = logps()
    for beta in (0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="beta must be a finite number > 0"):
            peft.dpo_loss(pc, pr, rc, rr, beta=beta)
    with pytest.raises(ValueError, match="unknown DPO loss_type"):
        peft.dpo_loss(pc, pr, rc, rr, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        peft.dpo_loss(pc, pr, rc, rr, label_smoothing=0.5)
    with pytest.raises(ValueError, match="applies to loss_type='sigmoid' only"):
        peft.dpo_loss(pc, pr, rc, rr, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"must all be \[B\]"):
        peft.dpo_loss(pc, pr[:-1], rc, rr)
