"""What the ablations (`llama.context_ablation`, `llama.moe_ablation`) share: byte-level text and the training hook.

Text is tokenised as raw UTF-8 bytes (vocabulary 256): no tokenizer to train or download, and perplexities are per
byte. Training is not done here: the calling script passes the project's one training loop in as a `TrainFn`
(`peft.train.train` wrapped; llama/ never imports peft/).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .model import Transformer

BYTE_VOCAB = 256
IGNORE = -100  # target id that carries no loss (PyTorch's cross-entropy default, peft.data.IGNORE_INDEX)


@dataclass
class TrainSpec:
    """One call of the training loop."""

    steps: int
    lr: float
    batch_size: int  # windows per optimizer step
    seed: int


# An example is (input ids, target ids) of equal length; targets are the next ids, IGNORE where no loss is taken.
# train_fn(model, examples, spec, on_step) -> loss of every step; on_step(step) runs after each optimizer step.
TrainFn = Callable[[Transformer, list, TrainSpec, Optional[Callable[[int], None]]], list]


def next_token_example(ids: list[int]) -> tuple[list[int], list[int]]:
    """Plain language modelling on length+1 ids: every position predicts the next one."""
    return ids[:-1], ids[1:]


def byte_stream(documents: list[str]) -> list[int]:
    """UTF-8 bytes of the documents, separated by a blank line."""
    return list("\n\n".join(documents).encode("utf-8"))


def split_documents(documents: list[str], every: int = 20) -> tuple[list[str], list[str]]:
    """(train, held-out): every `every`-th document is held out."""
    return ([d for i, d in enumerate(documents) if i % every],
            [d for i, d in enumerate(documents) if i % every == 0])


def random_windows(stream: list[int], length: int, n: int, rng: random.Random) -> list[tuple[list[int], list[int]]]:
    """n next-token examples on random slices of length+1 bytes."""
    starts = [rng.randrange(len(stream) - length - 1) for _ in range(n)]
    return [next_token_example(stream[i:i + length + 1]) for i in starts]


@torch.no_grad()
def mean_nll(model: Transformer, stream: list[int], length: int, n_tokens: int, batch_size: int = 8) -> float:
    """Mean next-byte negative log-likelihood (nats) over consecutive windows covering the first n_tokens bytes."""
    model.eval()
    n = max(1, n_tokens // length)
    windows = torch.tensor([stream[i * length:(i + 1) * length + 1] for i in range(n)])  # [n, length+1]
    total = 0.0
    for i in range(0, n, batch_size):
        w = windows[i:i + batch_size]
        logits = model(w[:, :-1])  # [b, length, V]
        total += float(F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum"))
    return total / (n * length)


def perplexity(model: Transformer, stream: list[int], length: int, n_tokens: int, batch_size: int = 8) -> float:
    return math.exp(mean_nll(model, stream, length, n_tokens, batch_size))
