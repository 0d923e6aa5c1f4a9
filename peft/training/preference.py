"""The preference objectives of Llama 2 and Llama 3 post-training, as plain functions of tensors.

Shapes: B sequences or pairs, T positions, V vocabulary.

    log π(y|x) = Σ_{t ∈ response} log softmax(logits_t)[y_{t+1}]          summed, never averaged (DPO §4)
    L_RM       = −log σ(r_c − r_r − m(rating)) + η·(r_c + r_r)²            Llama 2 §3.2.2 eq. (2); centring: TRL
    h          = [log π(y_w) − log π_ref(y_w)] − [log π(y_l) − log π_ref(y_l)]
    L_DPO      = −log σ(β h)                                                DPO (arXiv 2305.18290) eq. (7)
    r̂(x, y)    = β (log π(y|x) − log π_ref(y|x))                            DPO §5, the implicit reward

The reward model and DPO objectives that run a model on batches of pairs live in `reward_model.py` and `dpo.py`;
this file holds only the formulas, so each can be checked against its paper in float64.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX

# Llama 2 §3.2.1: annotators label "the degree to which they prefer their chosen response over the alternative:
# either their choice is significantly better, better, slightly better, or negligibly better/unsure".
RATINGS = ("significantly better", "better", "slightly better", "negligibly better")
# Llama 2 §3.2.2 (margin ablation, Table 28 in the appendix): the margin m(r) per rating, two sizes.
MARGINS = {
    "small": dict(zip(RATINGS, (1.0, 2 / 3, 1 / 3, 0.0))),
    "large": dict(zip(RATINGS, (3.0, 2.0, 1.0, 0.0))),
}
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


# =====================================================================================================================
# Sequence log-probabilities
# =====================================================================================================================

def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Σ_t log p(labels[:, t+1] | logits[:, t]) over positions whose label is not `ignore_index`: [B, T, V], [B, T]
    -> [B].

    Hugging Face's shift convention: `labels` are the input ids with the prompt (and padding) set to ignore_index,
    and position t's logits predict token t+1. Computed in at least float32 (bf16 logits are upcast) as
    logit[label] − logsumexp(logits), which never materialises a [B, T, V] log-softmax.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits must be [B, T, V] and labels [B, T], got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))  # [B, T-1, V]
    labels = labels[:, 1:]  # [B, T-1]: the token each position predicts
    mask = labels != ignore_index
    picked = logits.gather(-1, labels.masked_fill(~mask, 0)[..., None])[..., 0]  # [B, T-1]
    return ((picked - logits.logsumexp(-1)) * mask).sum(-1)


# =====================================================================================================================
# Reward model: Bradley–Terry with Llama 2's margin
# =====================================================================================================================

def check_ratings(ratings: Sequence[str]) -> None:
    bad = sorted({r for r in ratings if r not in RATINGS})
    if bad:
        raise ValueError(f"rating(s) {bad} are not in Llama 2's table; use one of {list(RATINGS)}")


def margins(ratings: Sequence[str], table: str = "small", device=None) -> torch.Tensor:
    """m(rating) for each pair [B] from Llama 2's "small" or "large" margin table."""
    if table not in MARGINS:
        raise ValueError(f"unknown margin table {table!r}; use one of {sorted(MARGINS)} (or no margin)")
    check_ratings(ratings)
    return torch.tensor([MARGINS[table][r] for r in ratings], dtype=torch.float64, device=device)


def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: Union[torch.Tensor, float, None] = None,
                center_coef: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """Binary ranking loss of a reward model on pairs: rewards of the chosen and the rejected response, each [B].

        per pair: −log σ(r_c − r_r − m) + η·(r_c + r_r)²

    m: Llama 2's rating-dependent margin (`margins(ratings, table)`; None: 0, as in InstructGPT and Llama 3). η
    (`center_coef`): TRL's `center_rewards_coefficient` (arXiv 2312.09244, suggested 0.01), which pins the otherwise
    shift-invariant reward near zero. reduction "mean" is the loss of the issue and of TRL; "sum" and "none" serve
    the training loop, which normalises by the step's pair count.
    """
    if chosen.shape != rejected.shape or chosen.dim() != 1:
        raise ValueError(f"chosen and rejected rewards must both be [B], got {tuple(chosen.shape)} and "
                         f"{tuple(rejected.shape)}")
    if not center_coef >= 0:
        raise ValueError(f"center_coef must be >= 0, got {center_coef}")
    diff = chosen - rejected
    if margin is not None:
        diff = diff - torch.as_tensor(margin, dtype=diff.dtype, device=diff.device)
    losses = -F.logsigmoid(diff)  # −log σ(r_c − r_r − m), computed stably as softplus(−x)
    if center_coef:
        losses = losses + center_coef * (chosen + rejected) ** 2
    return _reduce(losses, reduction)


def reward_accuracy(chosen: torch.Tensor, rejected: torch.Tensor,
                    ratings: Optional[Sequence[str]] = None) -> tuple[float, dict[str, float]]:
    """Fraction of pairs with r_c > r_r (ties count as wrong), overall and per rating present.

    Llama 2 §3.2.2 (Table 8) reports it per rating: far higher on "significantly better" pairs than on "negligibly
    better" ones, which are hard for annotators too."""
    correct = (chosen > rejected).detach().cpu()
    by_rating = {}
    if ratings is not None:
        check_ratings(ratings)
        for r in RATINGS:
            picked = [i for i, x in enumerate(ratings) if x == r]
            if picked:
                by_rating[r] = float(correct[picked].double().mean())
    return float(correct.double().mean()), by_rating


# =====================================================================================================================
# DPO and its variants
# =====================================================================================================================

def check_dpo_options(beta: float, loss_type: str, label_smoothing: float) -> None:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a finite number > 0 (the inverse strength of the KL constraint; DPO and "
                         f"Llama 3 use 0.1), got {beta!r}")
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; use one of {list(DPO_LOSS_TYPES)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) (the assumed probability of a flipped label), "
                         f"got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to loss_type='sigmoid' only (cDPO), not {loss_type!r}")


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the implicit rewards of the chosen and rejected responses, each [B].

    With h the difference of log-ratios (module docstring):
        "sigmoid": −(1−ε) log σ(βh) − ε log σ(−βh)   DPO eq. (7); ε > 0 is conservative DPO (labels flipped with
                                                      probability ε; torchtune's DPOLoss(label_smoothing))
        "ipo":     (h − 1/(2β))²                       IPO (arXiv 2310.12036): a squared loss that keeps the margin
                                                      finite under deterministic preferences. On summed log-probs as
                                                      written here; TRL passes per-token averages instead
        "hinge":   max(0, 1 − βh)                      SLiC (arXiv 2305.10425) / RSO (arXiv 2309.06657)
    Rewards β(log π − log π_ref) are detached: they are metrics, not part of the graph.
    """
    check_dpo_options(beta, loss_type, label_smoothing)
    shapes = {tuple(t.shape) for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                       ref_rejected_logps)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"the four log-probability tensors must all be [B], got shapes {sorted(shapes)}")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps  # log π(y_w)/π_ref(y_w)
    rejected_ratio = policy_rejected_logps - ref_rejected_logps  # log π(y_l)/π_ref(y_l)
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * h)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def _reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    if reduction == "none":
        return losses
    raise ValueError(f"unknown reduction {reduction!r}; use 'mean', 'sum' or 'none'")
