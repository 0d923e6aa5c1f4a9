"""Build small tokenizer files for the tests; nothing is downloaded.

* `train_sentencepiece`: a SentencePiece BPE model trained (in ~0.1 s) with LLaMA's settings on text made here.
* `train_bpe_ranks` + `write_ranks`: a Llama 3-style byte-level BPE ranks file (`<base64> <rank>` lines) from a tiny
  BPE trainer written below: every byte is a token, then the most frequent adjacent pair inside a pre-tokenised
  piece is merged, again and again; the merge order is the rank order, which is what tiktoken assumes.
* `hand_written_ranks`: a ranks file small enough to reason about by hand, for exact expected token sequences.
* `write_llama3_sized_ranks`: a ranks file with exactly 128,000 (or 200,000) entries, to check the real special-token
  ids of Llama 3 (Llama 4).
"""

from __future__ import annotations

import base64
import collections
import io
import random
from pathlib import Path

import regex
import sentencepiece

# Meta's Llama 3 `pat_str`, written out as one literal (the tests compare llama.tokenizer's version against it).
META_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                       r"\s*[\r\n]+|\s+(?!\S)|\s+")

# Meta's Llama 4 `O200K_PATTERN` (llama-models models/llama4/tokenizer.py), written out as one literal.
META_LLAMA4_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                       r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"
                       r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|"
                       r"\s*[\r\n]+|\s+(?!\S)|\s+")

_WORDS = ("the a of and to in is was it llama model token attention head layer rotary norm weight bias train data "
          "code python def return value hello world user assistant system you are helpful I am fine how what why "
          "don't it's we're they've I'll she'd HELLO Llama café naïve über straße 東京 日本語 🦙").split()
_PUNCT = (".", "!", "?", ",", ";", ":", "", "", "")


def sample_text(n_lines: int = 2000, seed: int = 0) -> list[str]:
    """Deterministic pseudo-text: words, contractions, numbers, punctuation, runs of spaces, tabs, non-ASCII."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = []
        for _ in range(rng.randint(2, 14)):
            r = rng.random()
            if r < 0.08:
                words.append(str(rng.randint(0, 99999)))
            elif r < 0.10:
                words.append("  " + rng.choice(_WORDS))
            elif r < 0.12:
                words.append("\t" + rng.choice(_WORDS))
            else:
                words.append(rng.choice(_WORDS))
        lines.append(" ".join(words) + rng.choice(_PUNCT))
    return lines


def train_sentencepiece(path: Path, vocab_size: int = 512, control_symbols: tuple[str, ...] = ()) -> Path:
    """Train a SentencePiece BPE model configured like LLaMA's tokenizer.model and write it to `path`.

    LLaMA's settings (visible in its model proto): BPE, byte fallback, digits split, no normalisation, no whitespace
    collapsing, a dummy "▁" prefix, unk 0 / bos 1 / eos 2, no pad piece.
    """
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sample_text()), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, allow_whitespace_only_pieces=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, control_symbols=list(control_symbols),
        num_threads=1, minloglevel=2)
    path = Path(path)
    path.write_bytes(model.getvalue())
    return path


def single_byte_ranks() -> dict[bytes, int]:
    """All 256 bytes, printable ASCII first (as in GPT-style files), so rank != byte value."""
    order = sorted(range(256), key=lambda b: (not 33 <= b <= 126, b))
    return {bytes([b]): rank for rank, b in enumerate(order)}


def train_bpe_ranks(lines: list[str], n_merges: int) -> dict[bytes, int]:
    """Byte-level BPE training (Sennrich et al. 2016 on bytes, as GPT-2/cl100k/Llama 3): returns {token: rank}."""
    ranks = single_byte_ranks()
    # Pre-tokenise with Meta's regex: merges never cross piece boundaries.
    pieces = collections.Counter(p for line in lines for p in regex.findall(META_LLAMA3_PATTERN, line + "\n"))
    words = {tuple(bytes([b]) for b in piece.encode("utf-8")): count for piece, count in pieces.items()}
    for _ in range(n_merges):
        pairs: collections.Counter = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        # Most frequent pair; ties broken by the bytes themselves, so the result is deterministic.
        best = max(pairs, key=lambda pair: (pairs[pair], pair))
        merged = best[0] + best[1]
        if merged in ranks:  # same bytes reachable by two different pairs: already a token
            words = {_merge(w, best, merged): c for w, c in words.items()}
            continue
        ranks[merged] = len(ranks)
        words = {_merge(w, best, merged): c for w, c in words.items()}
    return ranks


def _merge(word: tuple[bytes, ...], pair: tuple[bytes, bytes], merged: bytes) -> tuple[bytes, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def write_ranks(path: Path, ranks: dict[bytes, int]) -> Path:
    """Write {token: rank} in the tiktoken / Llama 3 `tokenizer.model` format: `<base64 token> <rank>` per line."""
    path = Path(path)
    lines = [f"{base64.b64encode(token).decode('ascii')} {rank}" for token, rank in sorted(ranks.items(),
                                                                                             key=lambda kv: kv[1])]
    path.write_text("\n".join(lines) + "\n", encoding="ascii")
    return path


def write_trained_ranks(path: Path, n_merges: int = 300) -> Path:
    return write_ranks(path, train_bpe_ranks(sample_text(), n_merges))


# Words that become single tokens in the hand-written file: each word W contributes the merges W[:2], W[:3], ..., W,
# so BPE rebuilds it left to right. The test suite checks that each of them indeed encodes to one id.
HAND_WORDS = ("user", "assistant", "system", "ipython", "\n\n", "Hello", " world", " How", " are", " you", "You",
              " a", " helpful", " llama", " am", " fine", "Hi", " there")


def hand_written_ranks() -> dict[bytes, int]:
    ranks = single_byte_ranks()
    for word in HAND_WORDS:
        data = word.encode("utf-8")
        for end in range(2, len(data) + 1):
            ranks.setdefault(data[:end], len(ranks))
    return ranks


def write_llama3_sized_ranks(path: Path, n_base: int = 128_000) -> Path:
    """A ranks file with exactly `n_base` tokens (256 bytes + fillers), to check Meta's absolute special ids
    (128,000: Llama 3's size; 200,000: Llama 4's)."""
    ranks = single_byte_ranks()
    i = 0
    while len(ranks) < n_base:
        ranks[b"filler%d" % i] = len(ranks)
        i += 1
    return write_ranks(path, ranks)
