"""The reward model of Llama 2 and Llama 3: the LLaMA trunk with a scalar head, read at the last real token.

Shapes: B pairs, N sequences, T positions, C model dim.

Llama 2 §3.2.2: the reward model is initialised from a chat-model checkpoint, "the model architecture and
hyper-parameters are identical to those of the pretrained language models, except that the classification head for
next-token prediction is replaced with a regression head for outputting a scalar reward". Here that head is the
`output` override point of `llama.Transformer`: Linear(C, 1), so the model returns one score per position [N, T, 1],
and the reward of (prompt, response) is the score at the sequence's last real token, the EOS that ends every
response (TRL appends it; torchtune gathers there):

    r(x, y) = head(h_L[i, length_i − 1])

The index comes from explicit lengths, never from searching for a pad id (pad == EOS makes that search wrong:
transformers #35352; left padding breaks "last position" logic: trl #2778). Right padding needs no mask (causality
keeps the padding after the last real token unseen); left padding gives the padding a segment of its own, so the real
tokens neither attend to it nor count it in their positions, and the score is read at index T − 1.

The trunk trains with full fine-tuning or any PEFT method (`recipe.apply_method`: LoRA, QLoRA, Adapter V1/V2,
Excitor); the head always trains. The loss is Bradley–Terry with Llama 2's optional margin (`preference.reward_loss`),
one epoch over the pairs (Llama 2: longer over-fits).
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import nn

from .loop import Objective, Terms, evaluating
from .pairs import EncodedPair, PairBatch, collate_pairs, padded_batches
from .preference import margins, reward_accuracy, reward_loss
from .recipe import apply_method

PADDING_SIDES = ("right", "left")


def reward_model(checkpoint: nn.Module, method: Optional[dict] = None) -> nn.Module:
    """A reward model initialised from `checkpoint` (a `llama.Transformer`, copied, not changed): its LM head is
    replaced by a zero-initialised Linear(C, 1), so every reward starts at 0 and the loss at log 2; the trunk is
    then prepared for `method` ({"name": "full" | "lora" | "qlora" | ..., **options}, default full fine-tuning)."""
    model = copy.deepcopy(checkpoint)
    ref = model.norm.weight
    model.output = nn.Linear(model.args.dim, 1, bias=False, device=ref.device, dtype=ref.dtype)  # [1, C]
    nn.init.zeros_(model.output.weight)
    model = apply_method(model, method or {"name": "full"})
    model.output.weight.requires_grad_(True)  # the regression head is new: it trains under every method
    return model


def score(model: nn.Module, tokens: torch.Tensor, lengths: torch.Tensor, padding_side: str = "right") -> torch.Tensor:
    """The reward of each row of tokens [N, T], read at its last real token (from `lengths` [N]) -> [N].

    right padding: row i is tokens[i, :length_i]; left padding: tokens[i, T − length_i:]."""
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    N, T = tokens.shape
    lengths = torch.as_tensor(lengths, device=tokens.device)
    if lengths.shape != (N,) or bool((lengths < 1).any()) or bool((lengths > T).any()):
        raise ValueError(f"lengths must be [N] = [{N}] with 1 <= length <= T = {T}, got {lengths.tolist()}")
    if padding_side == "right":
        out = model(tokens)  # [N, T, 1]; causal attention: index length − 1 never sees the padding after it
        last = lengths - 1
    else:
        real = torch.arange(T, device=tokens.device)[None, :] >= (T - lengths)[:, None]  # [N, T]
        out = model(tokens, segment_ids=real.long())  # padding = segment 0: not attended, positions restart after it
        last = torch.full_like(lengths, T - 1)
    return out[torch.arange(N, device=tokens.device), last, 0]


class RewardLoss(Objective):
    """Bradley–Terry on batches of pairs for the training loop: Σ_pairs (−log σ(r_c − r_r − m) + η(r_c + r_r)²),
    normalised by the step's number of pairs. margin_table: None (Llama 3), "small" or "large" (Llama 2)."""

    def __init__(self, pad_id: int, margin_table: Optional[str] = None, center_coef: float = 0.0):
        if margin_table is not None:
            margins([], margin_table)  # an unknown table fails here, before training
        self.pad_id, self.margin_table, self.center_coef = pad_id, margin_table, center_coef

    def collate(self, rows: Sequence[EncodedPair]) -> PairBatch:
        return collate_pairs(rows, self.pad_id)

    def counts(self, batch: PairBatch) -> dict[str, int]:
        return {"pairs": batch.n_pairs}

    def __call__(self, model: nn.Module, batch: PairBatch) -> Terms:
        B = batch.n_pairs
        rewards = score(model, batch.tokens, batch.lengths)  # [2B]: chosen, then rejected
        chosen, rejected = rewards[:B], rewards[B:]
        m = None if self.margin_table is None else margins(batch.ratings, self.margin_table, chosen.device)
        losses = reward_loss(chosen, rejected, m, self.center_coef, reduction="none")  # [B]
        total = losses.sum()
        return Terms({"pairs": total}, {"pairs": float(total.detach())},
                     {"accuracy": (float((chosen > rejected).sum()), "pairs"),
                      "margin": (float((chosen - rejected).detach().sum()), "pairs")},
                     logits_finite=bool(torch.isfinite(rewards.detach()).all()))


def evaluate_pairs(model: nn.Module, pairs: Sequence[EncodedPair], pad_id: int,
                   batch_size: int = 64) -> tuple[float, dict[str, float]]:
    """Held-out accuracy of the reward model, overall and per rating (`preference.reward_accuracy`)."""
    chosen, rejected, ratings = [], [], []
    with evaluating(model):
        for i in range(0, len(pairs), batch_size):
            batch = collate_pairs(pairs[i:i + batch_size], pad_id).to(model.norm.weight.device)
            rewards = score(model, batch.tokens, batch.lengths)
            chosen.append(rewards[:batch.n_pairs])
            rejected.append(rewards[batch.n_pairs:])
            ratings += batch.ratings
    return reward_accuracy(torch.cat(chosen), torch.cat(rejected), ratings)


def score_sequences(model: nn.Module, sequences: Sequence[Sequence[int]], pad_id: int,
                    batch_size: int = 256) -> torch.Tensor:
    """Rewards of whole token sequences (<bos> prompt response <eos>) -> [N], right-padded in batches."""
    with evaluating(model):
        return torch.cat([score(model, tokens, lengths).float().cpu() for _, tokens, lengths
                          in padded_batches(sequences, pad_id, batch_size, model.norm.weight.device)])
