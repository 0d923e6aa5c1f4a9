"""Preference pairs: checked, tokenised, and batched for the reward model and DPO.

Shapes: B pairs, T positions (the longest sequence of a batch).

A pair is one prompt with two responses, the one the annotator preferred (`chosen`) and the other (`rejected`), and
Llama 2's strength of preference (`rating`, one of `preference.RATINGS`). Each response is tokenised exactly as SFT
tokenises it (`data.encode_sft`: prompt and response separately, the response ending in EOS), and each sequence is
stored whole, in Hugging Face's label convention, which `preference.sequence_logps` expects:

    ids    = <bos> prompt response <eos>
    labels = ids with every prompt position set to IGNORE_INDEX     (position t's logits predict labels[t+1])
    length = len(ids): the reward model reads its score at index length − 1, the EOS

A batch stacks the B chosen sequences and then the B rejected ones, right-padded to one length, so one forward pass
serves both halves (the "concatenated forward" of the DPO authors' trainer, TRL and torchtune).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch

from .data import IGNORE_INDEX, Example, encode_sft
from .preference import check_ratings


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str
    rating: str = "better"  # Llama 2's strength of preference (preference.RATINGS)
    provenance: dict = field(default_factory=dict, compare=False, hash=False)  # e.g. {"round": 1, "source": ...}


@dataclass
class EncodedPair:
    chosen: list[int]  # ids of <bos> prompt chosen <eos>
    rejected: list[int]
    prompt_len: int  # tokens of <bos> prompt, shared by both
    rating: str
    ref_logps: Optional[tuple[float, float]] = None  # precomputed log π_ref(chosen), log π_ref(rejected) (DPO)


def check_pair(pair: Pair, index: Optional[int] = None) -> None:
    """The bad inputs of a preference pair, each with its fix."""
    where = f"pair {index}" if index is not None else "pair"
    if not pair.chosen.strip() or not pair.rejected.strip():
        side = "chosen" if not pair.chosen.strip() else "rejected"
        raise ValueError(f"{where}: the {side} response is empty; a preference needs two real responses, drop the "
                         f"pair")
    if pair.chosen == pair.rejected:
        raise ValueError(f"{where}: chosen and rejected are the same response ({pair.chosen[:40]!r}), so the pair "
                         f"carries no preference; drop it (sample responses until two differ)")
    check_ratings([pair.rating])


def encode_pair(pair: Pair, tokenizer, max_len: int, index: Optional[int] = None) -> EncodedPair:
    """Check and tokenise one pair; sequences longer than `max_len` (the model context) are an error."""
    check_pair(pair, index)
    sides = []
    for response in (pair.chosen, pair.rejected):
        # encode_sft returns the shifted (tokens, targets) of the project's SFT rows; the whole sequence is
        # tokens + the last target (the EOS), so its limit is one less than the context
        seq = encode_sft(Example(pair.prompt, response), tokenizer, max_len - 1, index=index)
        sides.append((seq.tokens + [seq.targets[-1]], len(seq.targets) - seq.n_targets + 1))
    (chosen, prompt_len), (rejected, _) = sides
    if chosen == rejected:
        raise ValueError(f"pair {index}: chosen {pair.chosen!r} and rejected {pair.rejected!r} tokenise to the same "
                         f"ids, so the pair carries no preference; drop it")
    return EncodedPair(chosen, rejected, prompt_len, pair.rating)


def encode_pairs(pairs: Sequence[Pair], tokenizer, max_len: int) -> list[EncodedPair]:
    """Every pair checked before the first is used (so bad data fails before any training step)."""
    if not pairs:
        raise ValueError("no preference pairs; a reward model or DPO needs at least one")
    return [encode_pair(p, tokenizer, max_len, index=i) for i, p in enumerate(pairs)]


@dataclass
class PairBatch:
    tokens: torch.Tensor  # [2B, T]: the B chosen sequences, then the B rejected ones, right-padded
    labels: torch.Tensor  # [2B, T]: tokens with prompt and padding positions IGNORE_INDEX (HF convention)
    lengths: torch.Tensor  # [2B]: real tokens per row; the last one (index length − 1) is the EOS
    ratings: list[str]  # [B]
    ref_logps: Optional[torch.Tensor]  # [2B] precomputed log π_ref, or None
    n_tokens: int  # real tokens, for tokens/s

    @property
    def n_pairs(self) -> int:
        return len(self.ratings)

    def to(self, device) -> "PairBatch":
        ref = None if self.ref_logps is None else self.ref_logps.to(device)
        return PairBatch(self.tokens.to(device), self.labels.to(device), self.lengths.to(device), self.ratings, ref,
                         self.n_tokens)


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows right-padded to the longest: tokens [N, T] and lengths [N]."""
    T = max(len(r) for r in rows)
    tokens = torch.full((len(rows), T), max(pad_id, 0), dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = torch.tensor(row)
    return tokens, torch.tensor([len(r) for r in rows])


def padded_batches(sequences: Sequence[Sequence[int]], pad_id: int, batch_size: int, device=None
                   ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """Consecutive chunks of `sequences`, each right-padded: (which sequences, tokens [n, T], lengths [n])."""
    for start in range(0, len(sequences), batch_size):
        chunk = slice(start, start + batch_size)
        tokens, lengths = pad_right(sequences[chunk], pad_id)
        yield chunk, tokens.to(device), lengths.to(device)


def response_labels(tokens: torch.Tensor, lengths: torch.Tensor, prompt_lens: Sequence[int]) -> torch.Tensor:
    """HF-convention labels [N, T]: the token ids at response positions (prompt_len ≤ t < length), else ignored."""
    t = torch.arange(tokens.shape[1], device=tokens.device)[None, :]  # [1, T]
    starts = torch.tensor(list(prompt_lens), device=tokens.device)[:, None]  # [N, 1]
    response = (t >= starts) & (t < lengths[:, None])  # [N, T]
    return tokens.masked_fill(~response, IGNORE_INDEX)


def collate_pairs(pairs: Sequence[EncodedPair], pad_id: int) -> PairBatch:
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    tokens, lengths = pad_right(rows, pad_id)
    labels = response_labels(tokens, lengths, [p.prompt_len for p in pairs] * 2)
    ref = None
    if all(p.ref_logps is not None for p in pairs):
        ref = torch.tensor([p.ref_logps[0] for p in pairs] + [p.ref_logps[1] for p in pairs], dtype=torch.float64)
    return PairBatch(tokens, labels, lengths, [p.rating for p in pairs], ref, int(lengths.sum()))
