"""What the post-training test files share: a character tokenizer, a tiny model, and a few preference pairs."""

from __future__ import annotations

import torch

import llama
from peft.training.pairs import Pair

ALPHABET = "0123456789 :\nSortAnswer"


class CharTokenizer:
    """One id per character of ALPHABET (ids 4+), bos 1, eos 2, pad 3; decodes what it encodes."""

    bos_id, eos_id, pad_id = 1, 2, 3
    stop_tokens = (2,)
    n_words = 4 + len(ALPHABET)

    def encode(self, s, *, bos, eos):
        return [1] * bos + [4 + ALPHABET.index(c) for c in s] + [2] * eos

    def decode(self, ids):
        return "".join(ALPHABET[i - 4] for i in ids if i >= 4)


def tiny_model(seed: int = 0, dtype=torch.float64, **overrides) -> llama.Transformer:
    torch.manual_seed(seed)
    args = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=CharTokenizer.n_words, multiple_of=16,
                max_seq_len=48)
    args.update(overrides)
    return llama.Transformer(llama.ModelArgs(**args)).to(dtype)


PAIRS = [
    Pair("Sort: 312\nAnswer:", "123", "132", "better"),
    Pair("Sort: 9051\nAnswer:", "0159", "9510", "significantly better"),
    Pair("Sort: 77\nAnswer:", "77", "7", "slightly better"),
    Pair("Sort: 4321\nAnswer:", "1234", "1243", "negligibly better"),
    Pair("Sort: 52\nAnswer:", "25", "52", "better"),
    Pair("Sort: 880\nAnswer:", "088", "808", "significantly better"),
    Pair("Sort: 6\nAnswer:", "6", "66", "slightly better"),
    Pair("Sort: 31\nAnswer:", "13", "31", "negligibly better"),
]
