"""The ground truth of the post-training miniature: a reward known in code, an imperfect teacher, and simulated
annotators who label preference pairs from that reward with some noise.

With a known reward every stage can be measured exactly, as the DPO paper's controlled sentiment experiment did
(arXiv 2305.18290 §6.1: a fixed classifier as the true reward, achieved reward plotted against KL to the reference).
The tasks are the synthetic ones of `data.TASKS` (sort, reverse, ...), whose correct answer a is known:

    r*(x, y)   = #{i : y_i = a_i} / max(|a|, |y|)          the fraction of items in the right place, in [0, 1];
                 0 when y never ended (no EOS within the   1 exactly when y = a
                 generation budget)
    teacher    a with k ~ U{0, …, max_swaps} random adjacent transpositions: SFT data whose imitation plateaus below
               r* = 1, so preference learning has headroom (pipeline.md §8.2)
    annotator  P(y_a ≻ y_b) = σ((r*_a − r*_b) / τ)         Bradley–Terry on the true reward; τ sets the label noise
               (τ → 0: always the better one)
    rating     from |r*_a − r*_b|: ≥ 0.5 significantly better, ≥ 0.3 better, ≥ 0.15 slightly better, else negligibly
               better (Llama 2 §3.2.1's four strengths, here read off the gap)

Because the labels are drawn from a known model, the best accuracy any reward model can reach on them is known too:
the Bayes ceiling E[max(p, 1 − p)] with p = σ(Δr*/τ) (`bayes_accuracy`).
"""

from __future__ import annotations

import math
import random
from typing import Optional

from .pairs import Pair
from .preference import RATINGS

# the smallest |Δr*| of each rating, strongest first (RATINGS order)
RATING_THRESHOLDS = (0.5, 0.3, 0.15, 0.0)


def true_reward(response: str, answer: str, stopped: bool = True) -> float:
    """r*(x, y): the fraction of the answer's items in the right place (see the module docstring)."""
    y, a = response.strip(), answer.strip()
    if not stopped or not y:
        return 0.0
    return sum(p == q for p, q in zip(y, a)) / max(len(a), len(y))


def teacher_response(answer: str, rng: random.Random, max_swaps: int = 3) -> str:
    """The imperfect teacher: the correct answer with 0 … max_swaps random adjacent transpositions."""
    items = list(answer)
    for _ in range(rng.randint(0, max_swaps) if len(items) > 1 else 0):
        i = rng.randrange(len(items) - 1)
        items[i], items[i + 1] = items[i + 1], items[i]
    return "".join(items)


def rating_for(gap: float) -> str:
    """Llama 2's strength of preference for a true-reward gap |Δr*|."""
    for rating, threshold in zip(RATINGS, RATING_THRESHOLDS):
        if abs(gap) >= threshold:
            return rating
    raise AssertionError("unreachable: the last threshold is 0")


def preference_probability(gap: float, tau: float) -> float:
    """P(first ≻ second) = σ(Δr*/τ) for Δr* = r*_first − r*_second; τ = 0 is the deterministic annotator."""
    if tau == 0:
        return 1.0 if gap > 0 else 0.0 if gap < 0 else 0.5
    return 1 / (1 + math.exp(-gap / tau))


def bayes_accuracy(gap: float, tau: float) -> float:
    """The best expected accuracy of any reward model on a pair with this gap: max(p, 1 − p)."""
    p = preference_probability(gap, tau)
    return max(p, 1 - p)


def annotate(prompt: str, a: str, b: str, reward_a: float, reward_b: float, rng: random.Random, tau: float,
             provenance: Optional[dict] = None) -> Optional[Pair]:
    """One simulated annotation: which of two responses is preferred (Bradley–Terry on r*), and how strongly.
    None when the responses are identical (no preference to state)."""
    if not tau >= 0:
        raise ValueError(f"the label-noise temperature tau must be >= 0, got {tau}")
    if a == b:
        return None
    gap = reward_a - reward_b
    first_wins = rng.random() < preference_probability(gap, tau)
    chosen, rejected = (a, b) if first_wins else (b, a)
    return Pair(prompt, chosen, rejected, rating_for(gap), dict(provenance or {}))
