"""DPO as an objective of the training loop, with Llama 3's two changes.

Shapes: B pairs, N sequences, T positions, V vocabulary.

One micro-batch of B pairs, stacked [chosen; rejected] by `pairs.collate_pairs`:

    logits     = π_θ(tokens)                                      [2B, T, V]: one concatenated forward
    log π      = sequence_logps(logits, labels)                   [2B]
    log π_ref  = the same with every adapter off                  (peft.disable_adapters: no second model)
                 or precomputed once before training              (full fine-tuning)
    L          = Σ_pairs dpo_loss(…) / N_pairs  +  α · Σ_{chosen tokens} −log π / N_tokens

Llama 3 (arXiv 2407.21783 §4.1.4) changed two things, both off by default here:
  * formatting tokens (its header and termination tokens) are masked out of the DPO log-probabilities of both
    responses, policy and reference alike (`mask_token_ids`): they occur in both responses, so the contrastive loss
    would push their likelihood up and down at once, which Meta saw cause tail repetition and early termination;
  * an NLL term on the chosen responses with coefficient 0.2 (after Pang et al., arXiv 2404.19733; `nll_alpha`), here
    a per-token mean over the step's chosen tokens (TRL's "sft" term), so α does not depend on response length. The
    paper does not say whether this term drops the formatting tokens; it keeps them unless `nll_masks_formatting`
    (keeping the termination token serves the term's stated aim of preserving the output format).

Logged per step, with TRL's and torchtune's names: rewards/chosen, rewards/rejected, rewards/margins,
rewards/accuracies (r̂_w > r̂_l; ties count as wrong, so 0 at step 0), logps/chosen, logps/rejected, nll.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..disable import disable_adapters
from .data import IGNORE_INDEX
from .loop import Objective, Terms, evaluating
from .pairs import EncodedPair, PairBatch, collate_pairs, padded_batches, response_labels
from .preference import check_dpo_options, dpo_loss, sequence_logps

REFERENCES = ("adapters_off", "precomputed")


@dataclass
class DPOConfig:
    beta: float = 0.1  # DPO paper and Llama 3
    loss_type: str = "sigmoid"  # "sigmoid" (DPO), "ipo", "hinge" (preference.dpo_loss)
    label_smoothing: float = 0.0  # cDPO's ε, sigmoid only
    nll_alpha: float = 0.0  # Llama 3: 0.2
    mask_token_ids: tuple[int, ...] = ()  # Llama 3: its header and termination tokens
    nll_masks_formatting: bool = False
    reference: str = "adapters_off"  # or "precomputed": EncodedPair.ref_logps filled by precompute_reference

    def __post_init__(self):
        check_dpo_options(self.beta, self.loss_type, self.label_smoothing)
        if not self.nll_alpha >= 0:
            raise ValueError(f"nll_alpha must be >= 0 (Llama 3 uses 0.2), got {self.nll_alpha}")
        if self.reference not in REFERENCES:
            raise ValueError(f"unknown reference {self.reference!r}; use one of {REFERENCES}")
        self.mask_token_ids = tuple(int(t) for t in self.mask_token_ids)


def mask_tokens(labels: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """labels with every occurrence of `token_ids` set to IGNORE_INDEX."""
    if not token_ids:
        return labels
    ids = torch.tensor(token_ids, device=labels.device)
    return labels.masked_fill(torch.isin(labels, ids), IGNORE_INDEX)


@torch.no_grad()
def reference_logps(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log π_ref of each row [N]: the same model with every adapter switched off."""
    with disable_adapters(model):
        return sequence_logps(model(tokens), labels)


class DPOLoss(Objective):
    """DPO (+ Llama 3's NLL term) on batches of pairs for the training loop; counts pairs, and chosen tokens when
    nll_alpha > 0. The reference pass runs before the policy's, without gradients."""

    def __init__(self, cfg: DPOConfig, pad_id: int):
        self.cfg, self.pad_id = cfg, pad_id

    def collate(self, rows: Sequence[EncodedPair]) -> PairBatch:
        batch = collate_pairs(rows, self.pad_id)
        if self.cfg.reference == "precomputed" and batch.ref_logps is None:
            raise ValueError("reference='precomputed' but the pairs carry no reference log-probabilities; call "
                             "dpo.precompute_reference(reference_model, pairs, …) before training")
        return batch

    def _nll_labels(self, batch: PairBatch) -> torch.Tensor:
        chosen = batch.labels[:batch.n_pairs]
        return mask_tokens(chosen, self.cfg.mask_token_ids) if self.cfg.nll_masks_formatting else chosen

    def counts(self, batch: PairBatch) -> dict[str, int]:
        counts = {"pairs": batch.n_pairs}
        if self.cfg.nll_alpha:
            counts["tokens"] = int((self._nll_labels(batch)[:, 1:] != IGNORE_INDEX).sum())
        return counts

    def __call__(self, model: nn.Module, batch: PairBatch) -> Terms:
        cfg, B = self.cfg, batch.n_pairs
        labels = mask_tokens(batch.labels, cfg.mask_token_ids)
        ref = batch.ref_logps if cfg.reference == "precomputed" else reference_logps(model, batch.tokens, labels)
        logits = model(batch.tokens)  # [2B, T, V]
        logps = sequence_logps(logits, labels)  # [2B]
        ref = ref.to(logps.dtype)
        losses, r_chosen, r_rejected = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], cfg.beta, cfg.loss_type,
                                                cfg.label_smoothing)
        objective, loss = {"pairs": losses.sum()}, {"pairs": float(losses.detach().sum())}
        metrics = {"rewards/chosen": (float(r_chosen.sum()), "pairs"),
                   "rewards/rejected": (float(r_rejected.sum()), "pairs"),
                   "rewards/margins": (float((r_chosen - r_rejected).sum()), "pairs"),
                   "rewards/accuracies": (float((r_chosen > r_rejected).sum()), "pairs"),
                   "logps/chosen": (float(logps[:B].detach().sum()), "pairs"),
                   "logps/rejected": (float(logps[B:].detach().sum()), "pairs")}
        if cfg.nll_alpha:
            nll = -sequence_logps(logits[:B], self._nll_labels(batch)).sum()  # Σ over the chosen tokens
            objective["tokens"] = cfg.nll_alpha * nll
            loss["tokens"] = float(objective["tokens"].detach())
            metrics["nll"] = (float(nll.detach()), "tokens")
        return Terms(objective, loss, metrics, logits_finite=bool(torch.isfinite(logits.detach()).all()))


def response_logps(model: nn.Module, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int], pad_id: int,
                   mask_token_ids: Sequence[int] = (), batch_size: int = 128) -> torch.Tensor:
    """log π(response | prompt) of whole sequences (<bos> prompt response [<eos>]) -> [N] float64, the first
    prompt_lens[i] tokens being the prompt."""
    out = []
    with evaluating(model):
        for chunk, tokens, lengths in padded_batches(sequences, pad_id, batch_size, model.norm.weight.device):
            labels = mask_tokens(response_labels(tokens, lengths, prompt_lens[chunk]), mask_token_ids)
            out.append(sequence_logps(model(tokens), labels).double().cpu())
    return torch.cat(out)


def precompute_reference(reference: nn.Module, pairs: Sequence[EncodedPair], pad_id: int,
                         mask_token_ids: Sequence[int] = (), batch_size: int = 128) -> list[EncodedPair]:
    """The pairs with log π_ref of both responses filled in, computed once with `reference` (e.g. the policy
    before its first DPO step). Use the same `mask_token_ids` as the DPOConfig."""
    sequences = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    logps = response_logps(reference, sequences, [p.prompt_len for p in pairs] * 2, pad_id, mask_token_ids,
                           batch_size).tolist()
    n = len(pairs)
    return [dataclasses.replace(p, ref_logps=(logps[i], logps[n + i])) for i, p in enumerate(pairs)]
