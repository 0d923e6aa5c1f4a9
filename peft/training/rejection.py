"""Rejection sampling (best-of-K): sample K responses per prompt, keep the one the reward model scores highest.

Shapes: P prompts, K samples per prompt.

Llama 2 §3.2.3 ("Rejection Sampling fine-tuning"): "we sample K outputs from the model and select the best candidate
with our reward", then fine-tune on the selected samples with the SFT loss; Llama 3 §4.2 does the same with K = 10-30
each round, from the best checkpoint so far. Here:

    y_1 … y_K ~ π(·|x) at temperature T     one batched KV-cache `llama.generate` call over the prompts repeated K times
    y* = argmax_k r_φ(x, y_k)                responses that never emitted EOS within the budget are never selected
                                             (the reward model was not trained on them; torchtune's penalise_no_eos)

Two quantities that describe what best-of-K can harvest:
  * E[max of k samples] as k grows: the gap between the best and the typical sample is the headroom rejection
    sampling uses (Llama 2 Fig. 7 plots max and median reward against N). From K ≥ k samples per prompt the
    expectation over all k-subsets is computed exactly: sorting the K samples by the selector, sample i (1-based,
    ascending) is the best of a uniformly drawn k-subset with probability C(i−1, k−1) / C(K, k).
  * KL(π_best-of-K ‖ π) ≤ log K − (K − 1)/K   (Stiennon et al. arXiv 2009.01325 App. G.3 give it as the KL of
    best-of-N; Beirami et al. arXiv 2401.01879 show it is an upper bound). This puts best-of-K on the same reward-vs-KL
    axes as DPO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

import llama

from .loop import evaluating


@dataclass
class Sample:
    prompt_ids: list[int]  # <bos> prompt
    response_ids: list[int]  # the generated tokens, ending with the stop token when `stopped`
    text: str  # the response decoded, without the stop token
    stopped: bool  # emitted a stop token within the budget

    @property
    def sequence(self) -> list[int]:
        return self.prompt_ids + self.response_ids


def check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"K (samples per prompt) must be an integer >= 1, got {k!r}")


def check_prompt_lengths(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int) -> list[list[int]]:
    """Encode the prompts and fail, naming the first offender, if any cannot fit prompt + budget in the context."""
    context = model.args.max_seq_len
    encoded = [tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    for i, ids in enumerate(encoded):
        if len(ids) + max_new_tokens > context:
            raise ValueError(f"prompt {i} ({prompts[i][:40]!r}…) has {len(ids)} tokens; with {max_new_tokens} new "
                             f"tokens that exceeds the model context of {context}; shorten the prompts, lower the "
                             f"generation budget, or use a model with a longer context")
    return encoded


def sample_responses(model: nn.Module, tokenizer, prompts: Sequence[str], k: int, max_new_tokens: int,
                     temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                     batch_size: int = 512) -> list[list[Sample]]:
    """K samples for each prompt -> [P][K]. Deterministic for a given seed, batch_size and model."""
    check_k(k)
    if not prompts:
        raise ValueError("no prompts to sample from")
    encoded = check_prompt_lengths(model, tokenizer, prompts, max_new_tokens)
    rows = [ids for ids in encoded for _ in range(k)]  # [P·K]: prompt p's K copies are adjacent
    outputs = []
    with evaluating(model):
        for start in range(0, len(rows), batch_size):
            outputs += llama.generate(model, rows[start:start + batch_size], max_new_tokens, temperature, top_p,
                                      stop_tokens=tokenizer.stop_tokens, seed=seed * 100_003 + start)
    stops = set(tokenizer.stop_tokens)
    samples = [Sample(prompt, out, tokenizer.decode([t for t in out if t not in stops]), bool(out) and out[-1] in stops)
               for prompt, out in zip(rows, outputs)]
    return [samples[p * k:(p + 1) * k] for p in range(len(prompts))]


def best_of_k(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Index of the best sample per prompt: argmax of scores [P, K] among the allowed samples [P, K] (at least
    those that stopped) -> [P]. A prompt with no allowed sample gets index 0 (the caller drops it)."""
    return scores.masked_fill(~allowed, float("-inf")).argmax(dim=-1)


def expected_best_of_k(selector: torch.Tensor, value: torch.Tensor, k: int) -> float:
    """Mean over prompts of E[value of the sample with the highest selector among k of the K samples], the k-subset
    drawn uniformly without replacement; selector, value [P, K] (value = selector gives E[max of k])."""
    P, K = selector.shape
    check_k(k)
    if k > K:
        raise ValueError(f"k={k} exceeds the {K} samples per prompt")
    order = selector.double().argsort(dim=-1, stable=True)  # ascending
    ranked = value.double().gather(-1, order)  # [P, K]
    # sample i (1-based, ascending) is the best of a random k-subset with probability C(i−1, k−1) / C(K, k)
    weights = torch.tensor([math.comb(i - 1, k - 1) / math.comb(K, k) for i in range(1, K + 1)], dtype=torch.float64)
    return float((ranked * weights).sum(-1).mean())


def kl_bound(k: int) -> float:
    """KL(π_best-of-k ‖ π) ≤ log k − (k − 1)/k (0 for k = 1)."""
    check_k(k)
    return math.log(k) - (k - 1) / k
