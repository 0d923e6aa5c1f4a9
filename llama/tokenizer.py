"""Tokenizers of the LLaMA family: one entry point, three file formats.

`Tokenizer(path)` reads the file, recognises its format and returns the matching subclass:

* `SentencePieceTokenizer`: a SentencePiece BPE `.model` file (protobuf). LLaMA 1, Llama 2 and Code Llama use one
  with 32,000 pieces (Code Llama 7B/13B/70B: 32,016 incl. infilling pieces), unk 0, bos 1, eos 2 and no pad
  piece (pad -1). Byte fallback covers any text. (LLaMA paper §2; Meta `llama/tokenizer.py`, codellama.)
  `infilling_prompt(prefix, suffix)` builds Code Llama's fill-in-the-middle prompt (Code Llama paper §2.3).
* `TiktokenTokenizer`: Llama 3's and Llama 4's byte-level BPE files, one line `<base64 token bytes> <rank>` per
  token, plus special tokens appended after the last rank. Text is first split by a regex (the pre-tokeniser)
  and each piece is BPE-merged by rank. Two families share the file format:
  - Llama 3 (3.0-3.3): 128,000 ranks + 256 specials, V = 128,256; the cl100k pre-tokeniser (Llama 3 herd paper
    §3.1.2 / Table 3; Meta `llama-models/models/llama3/tokenizer.py`);
  - Llama 4: 200,000 ranks + 2,048 specials, V = 202,048; the o200k pre-tokeniser, which also splits words at
    case changes ("HelloWorld" -> "Hello", "World") and keeps contractions on their word (Meta
    `llama-models/models/llama4/tokenizer.py`).
  The family is recognised from the number of ranks (200,000: Llama 4, otherwise Llama 3) or given explicitly:
  `Tokenizer(path, family="llama4")`.
* `HFTokenizer`: a Hugging Face hub folder's `tokenizer.json`, read by the `tokenizers` library (the ecosystem's
  standard, the same code `transformers` runs), so a user who loads a hub folder gets its tokenizer from the same
  place. bos / eos / pad come from `tokenizer_config.json` beside it, or from the family's names.

Meta ships its files as `tokenizer.model`, so the format is recognised from the content, never from the name. A
folder resolves to its `tokenizer.model` (Meta's reference tokenizer) if it has one, else to its `tokenizer.json`.

No tensors here, so no shape legend: token ids are plain `list[int]`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import json
import operator
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import sentencepiece
import tiktoken
import tokenizers

__all__ = [
    "Tokenizer",
    "SentencePieceTokenizer",
    "TiktokenTokenizer",
    "HFTokenizer",
    "LLAMA3_PATTERN",
    "LLAMA4_PATTERN",
    "llama3_special_tokens",
    "llama4_special_tokens",
    "load_tiktoken_ranks",
]

AllowedSpecial = Literal["all"] | Iterable[str]


class Tokenizer:
    """Load a LLaMA tokenizer file (or a checkpoint folder holding `tokenizer.model`) and pick its format.

    `Tokenizer(path)` returns a `SentencePieceTokenizer` or a `TiktokenTokenizer` (`family="llama3"|"llama4"` picks
    the tiktoken family where the rank count does not tell); both are `Tokenizer`s and share this interface:

        n_words / vocab_size     rows of the embedding table this tokenizer needs
        bos_id, eos_id, pad_id   pad_id is -1 where the format has no pad token
        stop_tokens              ids at which chat generation ends
        encode(s, *, bos, eos, allowed_special=(), disallowed_special=()) -> list[int]
        decode(ids) -> str
    """

    kind: str  # "sentencepiece" | "tiktoken" | "tokenizers"
    family: str | None  # "llama2" | "llama3" | "llama4": the chat format it serves (None: not recognised)
    path: Path
    n_words: int
    bos_id: int
    eos_id: int
    pad_id: int
    stop_tokens: tuple[int, ...]

    def __new__(cls, path: str | os.PathLike | None = None, **kwargs):
        # Like pathlib.Path: calling the base class dispatches to the subclass that fits the file; Python then
        # runs that subclass's __init__ with the same arguments.
        if cls is Tokenizer:
            if path is None:
                raise TypeError("Tokenizer(path) needs the path of a tokenizer.model file or of a checkpoint folder")
            cls = _subclass_for(_resolve_path(path))
        return super().__new__(cls)

    @property
    def vocab_size(self) -> int:
        return self.n_words

    def encode(self, s: str, *, bos: bool, eos: bool, allowed_special: AllowedSpecial = (),
               disallowed_special: AllowedSpecial = ()) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.path)!r}, n_words={self.n_words}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id})")

    # -- checks shared by both formats -----------------------------------------------------------------------------

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos and self.bos_id < 0:
            raise ValueError(f"{self.path} defines no bos token; call encode(..., bos=False)")
        if eos and self.eos_id < 0:
            raise ValueError(f"{self.path} defines no eos token; call encode(..., eos=False)")
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def _allowed_specials(self, s: str, allowed_special: AllowedSpecial,
                          disallowed_special: AllowedSpecial) -> Literal["all"] | set[str]:
        """The special tokens to encode as single ids in `s` (tiktoken's convention: none by default); raises if
        `s` contains one listed in `disallowed_special`."""
        if not isinstance(s, str):
            raise TypeError(f"encode expects a str, got {type(s).__name__}; decode bytes first (b.decode('utf-8'))")
        allowed = self._special_set(allowed_special, "allowed_special")
        disallowed = self._special_set(disallowed_special, "disallowed_special")
        if disallowed == "all":
            disallowed = set(self.special_tokens) - (set(self.special_tokens) if allowed == "all" else allowed)
        for name in sorted(disallowed):
            if name in s:
                raise ValueError(f"the text contains {name!r}, a special token listed in disallowed_special; remove "
                                 "it from the text, or pass it in allowed_special to encode it as one token")
        return allowed

    def _special_set(self, names: AllowedSpecial, argument: str) -> Literal["all"] | set[str]:
        if names == "all":
            return "all"
        if isinstance(names, str):
            raise TypeError(f"{argument} must be 'all' or a collection of token strings, got the string {names!r}; "
                            f"write {argument}={{{names!r}}}")
        names = set(names)
        unknown = sorted(names - self.special_tokens.keys())
        if unknown:
            spec = TIKTOKEN_FAMILIES.get(self.family)
            title, example = (spec.title, spec.eot) if spec else (self.path.name, next(iter(self.special_tokens), ""))
            raise ValueError(f"{argument} names {unknown[:3]}, which are not {title} special tokens; use names such "
                             f"as {example!r} (see tokenizer.special_tokens) or 'all'")
        return names

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        if isinstance(ids, (str, bytes)):
            raise TypeError(f"decode expects a sequence of token ids, got {type(ids).__name__}; "
                            "pass a list of ints (tensor.tolist())")
        try:
            ids = [operator.index(t) for t in ids]
        except TypeError as err:
            raise TypeError(f"decode expects integer token ids ({err}); pass a list of ints, e.g. tensor.tolist()") \
                from None
        for position, t in enumerate(ids):
            if not 0 <= t < self.n_words:
                raise ValueError(f"token id {t} at position {position} is outside this tokenizer's vocabulary "
                                 f"[0, {self.n_words}); remove padding (-1) and ids the model cannot produce "
                                 "before decoding")
        return ids


def _resolve_path(path: str | os.PathLike) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"Tokenizer needs a file or folder path (str or pathlib.Path), got {type(path).__name__}")
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.model", "tokenizer.json"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"no tokenizer.model or tokenizer.json in folder {path}; pass the tokenizer file "
                                "itself (Hugging Face Llama 3 repos keep Meta's in original/tokenizer.model)")
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist; pass the path of a tokenizer.model or "
                                "tokenizer.json file, or of the folder holding it")
    return path


# A Llama 3 ranks file is ASCII lines "<base64> <decimal rank>"; a SentencePiece model is a protobuf whose first byte
# is 0x0a (field 1, the piece list), so its first "line" is empty and never matches.
_RANK_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+")


def _subclass_for(path: Path) -> type[Tokenizer]:
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        raise ValueError(f"tokenizer file {path} is empty; re-download or re-copy it")
    if head.lstrip().startswith(b"{"):  # JSON: a Hugging Face tokenizer.json
        return HFTokenizer
    if _RANK_LINE.fullmatch(head.split(b"\n", 1)[0].rstrip(b"\r")):
        return TiktokenTokenizer
    return SentencePieceTokenizer


# =====================================================================================================================
# SentencePiece (LLaMA 1, Llama 2, Code Llama)
# =====================================================================================================================


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece BPE model: LLaMA 1 / Llama 2 / Code Llama (unk 0, bos 1, eos 2, pad -1)."""

    kind = "sentencepiece"
    family = "llama2"

    # Code Llama's infilling pieces (Code Llama paper §2.3) and the <step> marker of Code Llama 70B Instruct; each
    # id attribute is None when the model lacks the piece (LLaMA 1, Llama 2, Code Llama 34B).
    INFILL_PIECES = {"prefix_id": "▁<PRE>", "middle_id": "▁<MID>", "suffix_id": "▁<SUF>", "eot_id": "▁<EOT>",
                     "step_id": "<step>"}

    def __init__(self, path: str | os.PathLike, family: str | None = None):
        self.path = _resolve_path(path)
        if family not in (None, "llama2"):
            raise ValueError(f"{self.path} is a SentencePiece model (LLaMA 1, Llama 2, Code Llama), not a "
                             f"{family!r} tokenizer; drop family= or pass the right file")
        self.sp_model = sentencepiece.SentencePieceProcessor()
        try:
            self.sp_model.Load(str(self.path))
        except (RuntimeError, OSError) as err:
            raise ValueError(
                f"{self.path} is neither a SentencePiece model nor a Llama 3 BPE ranks file ({err}); it may be "
                "truncated or corrupt: re-download it (LLaMA 1/2 and Code Llama: tokenizer.model in the checkpoint "
                "folder; Llama 3: original/tokenizer.model)") from None
        self.n_words = self.sp_model.vocab_size()
        self.bos_id = self.sp_model.bos_id()
        self.eos_id = self.sp_model.eos_id()
        self.pad_id = self.sp_model.pad_id()
        self.stop_tokens = (self.eos_id,)
        for attribute, piece in self.INFILL_PIECES.items():
            piece_id = self.sp_model.piece_to_id(piece)
            setattr(self, attribute, None if piece_id == self.sp_model.unk_id() else piece_id)

    def encode(self, s: str, *, bos: bool, eos: bool, allowed_special: AllowedSpecial = (),
               disallowed_special: AllowedSpecial = ()) -> list[int]:
        """Text -> ids. SentencePiece prepends "▁" (a space) to the text and falls back to byte pieces <0xNN>."""
        if not isinstance(s, str):
            raise TypeError(f"encode expects a str, got {type(s).__name__}; decode bytes first (b.decode('utf-8'))")
        if allowed_special == "all" or tuple(allowed_special) or disallowed_special == "all" or \
                tuple(disallowed_special):
            raise ValueError("a SentencePiece tokenizer has no special tokens inside text (\"<s>\" is encoded as "
                             "plain text); drop allowed_special/disallowed_special and use bos=/eos=")
        return self._wrap(self.sp_model.encode(s), bos, eos)

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text. Control ids (bos, eos, unk) decode to nothing; the leading "▁" is dropped."""
        return self.sp_model.decode(self._check_ids(ids))

    # Meta (codellama `encode_infilling`) removes SentencePiece's implicit leading space by encoding a sentinel
    # character in front of the text and dropping the sentinel's pieces.
    _SENTINEL = "☺"

    @functools.cached_property
    def _sentinel_ids(self) -> list[int]:
        return self.sp_model.encode(self._SENTINEL)           # "▁" + the sentinel (2 pieces in Code Llama's file)

    def encode_infilling(self, s: str) -> list[int]:
        """Text -> ids without the implicit leading space (the suffix of a Code Llama infilling prompt)."""
        if not isinstance(s, str):
            raise TypeError(f"encode_infilling expects a str, got {type(s).__name__}")
        head = self._sentinel_ids
        ids = self.sp_model.encode(self._SENTINEL + s)
        if ids[:len(head)] != head:
            raise ValueError(f"the text after {self._SENTINEL!r} merged with it into one piece; this tokenizer "
                             "cannot encode it without a leading space")
        return ids[len(head):]

    def decode_infilling(self, ids: Sequence[int]) -> str:
        """Ids -> text keeping a leading space (the generated middle of an infilling prompt; Meta's
        `decode_infilling`): decoded behind the sentinel, which is then cut off."""
        return self.sp_model.decode(self._sentinel_ids + self._check_ids(ids))[len(self._SENTINEL):]

    def infilling_prompt(self, prefix: str, suffix: str, *, suffix_first: bool = False) -> list[int]:
        """Code Llama's fill-in-the-middle prompt (Code Llama paper §2.3; Meta `infilling_prompt_tokens`).

        Prefix-suffix-middle: `<s> <PRE> {prefix} <SUF>{suffix} <MID>`; the model then writes the middle and ends
        it with `<EOT>` (`eot_id`). suffix_first=True gives the suffix-prefix-middle order,
        `<s> <PRE> <SUF>{suffix} <MID> {prefix}`. The prefix keeps SentencePiece's leading space, the suffix not.
        """
        if None in (self.prefix_id, self.middle_id, self.suffix_id):
            raise ValueError(f"{self.path} has no infilling pieces (▁<PRE>, ▁<SUF>, ▁<MID>); only Code Llama 7B, "
                             "13B and 70B (base, Python, Instruct) were trained to fill in the middle")
        pre = self.encode(prefix, bos=False, eos=False)
        suf = self.encode_infilling(suffix)
        if suffix_first:
            return [self.bos_id, self.prefix_id, self.suffix_id] + suf + [self.middle_id] + pre
        return [self.bos_id, self.prefix_id] + pre + [self.suffix_id] + suf + [self.middle_id]


# =====================================================================================================================
# tiktoken-format byte-level BPE (Llama 3, 3.1, 3.2, 3.3; Llama 4)
# =====================================================================================================================

# The Llama 3 pre-tokeniser (Meta `pat_str`, the cl100k pattern): text is cut into pieces and BPE never merges across
# two pieces. Alternatives, tried left to right at each position:
LLAMA3_PATTERN = "|".join([
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)",  # English contractions, any case
    r"[^\r\n\p{L}\p{N}]?\p{L}+",      # a word, with at most one leading non-letter (usually the space)
    r"\p{N}{1,3}",                    # numbers in groups of at most three digits
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",     # punctuation runs, optional leading space, trailing newlines
    r"\s*[\r\n]+",                    # newlines with the whitespace before them
    r"\s+(?!\S)",                     # whitespace, leaving the last space to the following word
    r"\s+",                           # any other whitespace
])

LLAMA3_NUM_SPECIAL_TOKENS = 256


def llama3_special_tokens(n_base: int) -> dict[str, int]:
    """Llama 3's 256 special tokens, numbered from `n_base` (= 128,000 for the released file).

    Names as in Meta's llama-models (Llama 3.1 onwards). The ids are those of Llama 3.0 too; 3.0 (meta-llama/llama3)
    called five of them reserved: ids +4, +5, +8, +10, +11 were <|reserved_special_token_2/3/4/5/6|>, and its
    remaining reserved tokens count up from 5 instead of 2.
    """
    named = [
        "<|begin_of_text|>",          # +0  bos
        "<|end_of_text|>",            # +1  eos (end of a document)
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",  # +4  pad
        "<|step_id|>",
        "<|start_header_id|>",        # +6  chat: opens a role header
        "<|end_header_id|>",          # +7  chat: closes it
        "<|eom_id|>",                 # +8  end of message (the model waits for a tool result)
        "<|eot_id|>",                 # +9  end of turn
        "<|python_tag|>",             # +10 tool call follows
        "<|image|>",                  # +11 Llama 3.2 Vision image placeholder
    ]
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + LLAMA3_NUM_SPECIAL_TOKENS - len(named))]
    return {name: n_base + offset for offset, name in enumerate(named + reserved)}


# The Llama 4 pre-tokeniser (Meta `O200K_PATTERN`, the o200k pattern). Words may start with upper-case letters
# and end with lower-case ones, so a case change inside a word starts a new piece; contractions stay attached.
_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"    # upper/title case, modifiers, letters without case, marks
_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"           # lower case, modifiers, letters without case, marks
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
LLAMA4_PATTERN = "|".join([
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTION}",  # "Hello", " don't", " LLa"(MA): lower tail
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTION}",  # "DON'T", (" LLa")"MA": upper-case run
    r"\p{N}{1,3}",                     # numbers in groups of at most three digits
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",      # punctuation runs, optional leading space, trailing newlines or slashes
    r"\s*[\r\n]+",                     # newlines with the whitespace before them
    r"\s+(?!\S)",                       # whitespace, leaving the last space to the following word
    r"\s+",                             # any other whitespace
])

LLAMA4_NUM_SPECIAL_TOKENS = 2048


def llama4_special_tokens(n_base: int) -> dict[str, int]:
    """Llama 4's 2,048 special tokens, numbered from `n_base` (= 200,000 for the released file).

    Order as in Meta's llama-models `models/llama4/tokenizer.py`: five basic tokens (+0 .. +4), the text
    post-training block (+5 .. +79: chat headers, eom, eot, tool-call brackets, pad, reserved), the vision block
    (+80 .. +1133: image and tile markers, `<|patch|>`, reserved), the reasoning block (+1134 .. +1143), and
    `<|reserved_special_token_{i}|>` filling the rest.
    """
    def reserved(block: str, first: int, count: int) -> list[str]:
        return [f"<|{block}_reserved_special_token_{i}|>" for i in range(first, first + count)]

    basic = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    text = (["<|header_start|>",     # +5   chat: opens a role header
             "<|header_end|>",       # +6   chat: closes it
             "<|eom|>",              # +7   end of message (the model waits for a tool result)
             "<|eot|>",              # +8   end of turn
             "<|step|>"]
            + reserved("text_post_train", 0, 6)
            + ["<|python_start|>", "<|python_end|>",  # +16, +17  around a tool call
               "<|finetune_right_pad|>"]              # +18  pad
            + reserved("text_post_train", 8, 61))
    vision = (["<|image_start|>", "<|image_end|>"] + reserved("vision", 0, 2)
              + ["<|tile_x_separator|>", "<|tile_y_separator|>"] + reserved("vision", 2, 4)
              + ["<|image|>"] + reserved("vision", 6, 1) + ["<|patch|>"] + reserved("vision", 7, 1041))
    reasoning = reserved("reasoning", 0, 8) + ["<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"]
    named = basic + text + vision + reasoning
    rest = [f"<|reserved_special_token_{i}|>" for i in range(LLAMA4_NUM_SPECIAL_TOKENS - len(named))]
    return {name: n_base + offset for offset, name in enumerate(named + rest)}


@dataclasses.dataclass(frozen=True)
class TiktokenFamily:
    """What distinguishes the tiktoken-format tokenizers: pre-tokeniser, special tokens, and the named roles."""

    name: str
    title: str                   # for messages: "Llama 3"
    pattern: str
    special_tokens: Callable[[int], dict[str, int]]
    released_ranks: int          # ranks in Meta's file (used to recognise it)
    pad: str
    eot: str
    eom: str


TIKTOKEN_FAMILIES = {
    "llama3": TiktokenFamily("llama3", "Llama 3", LLAMA3_PATTERN, llama3_special_tokens, 128_000,
                             pad="<|finetune_right_pad_id|>", eot="<|eot_id|>", eom="<|eom_id|>"),
    "llama4": TiktokenFamily("llama4", "Llama 4", LLAMA4_PATTERN, llama4_special_tokens, 200_000,
                             pad="<|finetune_right_pad|>", eot="<|eot|>", eom="<|eom|>"),
}


def load_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a `<base64 token> <rank>` file into {token bytes: rank}, checking what tiktoken silently assumes."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a BPE ranks file (non-ASCII bytes); it may be corrupt: re-download it") \
            from None
    ranks: dict[bytes, int] = {}
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or not fields[1].isdigit():
            raise ValueError(f"{path}, line {line_no}: expected '<base64 token> <rank>', got {line[:60]!r}; the "
                             "file is truncated or corrupt: re-download it")
        try:
            token = base64.b64decode(fields[0], validate=True)
        except binascii.Error:
            raise ValueError(f"{path}, line {line_no}: {fields[0][:40]!r} is not valid base64; the file is corrupt: "
                             "re-download it") from None
        if token in ranks:
            raise ValueError(f"{path}, line {line_no}: token {token!r} appears twice (ranks {ranks[token]} and "
                             f"{fields[1]}); the file is corrupt: re-download it")
        ranks[token] = int(fields[1])
    # Special tokens are numbered from len(ranks), so the ranks must be exactly 0 .. n-1.
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not the consecutive integers 0..{len(ranks) - 1} (duplicates or gaps); "
                         "the file is corrupt or not a Llama 3 tokenizer: re-download it")
    # Byte-level BPE: every byte must be a token, otherwise some text cannot be encoded at all.
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{path}: {len(missing)} of the 256 single bytes have no rank (first: {missing[0]:#04x}); "
                         "a byte-level BPE file must contain every byte: use a complete Llama 3 tokenizer.model")
    return ranks


# tiktoken's Rust core can overflow its stack on very long runs of one character class (openai/tiktoken#195); Meta
# encodes text in windows of 400,000 characters and cuts any run of more than 25,000 whitespace or non-whitespace
# characters. We do the same, so ids equal Meta's even for such inputs.
_MAX_ENCODE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000


def _split_long_runs(s: str, max_run: int) -> Iterator[str]:
    """Cut `s` so that no piece holds more than `max_run` consecutive whitespace or non-whitespace characters."""
    start, run, run_is_space = 0, 0, None
    for i, ch in enumerate(s):
        if ch.isspace() is run_is_space:
            run += 1
            if run > max_run:
                yield s[start:i]
                start, run = i, 1
        else:
            run, run_is_space = 1, ch.isspace()
    yield s[start:]


class TiktokenTokenizer(Tokenizer):
    """Byte-level BPE of Llama 3 (bos 128000, eos 128001, eot 128009) and Llama 4 (bos 200000, eos 200001,
    eot 200008): a tiktoken ranks file + the family's special tokens (`family`: "llama3" | "llama4")."""

    kind = "tiktoken"

    def __init__(self, path: str | os.PathLike, family: str | None = None):
        self.path = _resolve_path(path)
        ranks = load_tiktoken_ranks(self.path)
        n_base = len(ranks)
        if family is None:  # Meta's files differ in size; other (test, custom) files default to Llama 3
            family = "llama4" if n_base == TIKTOKEN_FAMILIES["llama4"].released_ranks else "llama3"
        if family not in TIKTOKEN_FAMILIES:
            raise ValueError(f"unknown tokenizer family {family!r} for {self.path}; use one of "
                             f"{sorted(TIKTOKEN_FAMILIES)} (or leave family=None to recognise it)")
        spec = TIKTOKEN_FAMILIES[family]
        self.family = family
        self.special_tokens = spec.special_tokens(n_base)
        self.model = tiktoken.Encoding(name=self.path.name, pat_str=spec.pattern, mergeable_ranks=ranks,
                                       special_tokens=self.special_tokens)
        self.n_words = n_base + len(self.special_tokens)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens[spec.eot]
        self.eom_id = self.special_tokens[spec.eom]
        self.pad_id = self.special_tokens[spec.pad]
        # Llama 3 marks a tool call with one token, Llama 4 brackets it (<|python_start|> ... <|python_end|>).
        self.python_tag_id = self.special_tokens.get("<|python_tag|>")
        # Generation stops at the end of a document, of a message (tool call) or of a turn.
        self.stop_tokens = (self.eos_id, self.eom_id, self.eot_id)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", family={self.family!r})"

    def encode(self, s: str, *, bos: bool, eos: bool, allowed_special: AllowedSpecial = (),
               disallowed_special: AllowedSpecial = ()) -> list[int]:
        """Text -> ids.

        By default (Meta's default) the text of a special token, e.g. "<|eot_id|>" typed by a user, is encoded as
        ordinary text. Name tokens in `allowed_special` (or "all") to encode them as their single special id, and in
        `disallowed_special` to raise when they occur.
        """
        allowed = self._allowed_specials(s, allowed_special, disallowed_special)
        ids: list[int] = []
        for window_start in range(0, len(s), _MAX_ENCODE_CHARS):
            for piece in _split_long_runs(s[window_start:window_start + _MAX_ENCODE_CHARS], _MAX_RUN_CHARS):
                ids += self.model.encode(piece, allowed_special=allowed, disallowed_special=())
        return self._wrap(ids, bos, eos)

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text; a byte sequence that is not valid UTF-8 (e.g. half a character) decodes to U+FFFD."""
        return self.model.decode(self._check_ids(ids))


# =====================================================================================================================
# Hugging Face tokenizer.json (any hub folder), through the `tokenizers` library
# =====================================================================================================================

# Per family: the special-token names that mark it, then bos, eos, pad and the end-of-turn / end-of-message names.
_HF_FAMILIES = {
    "llama3": ("<|eot_id|>", "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>",
               ("<|eom_id|>", "<|eot_id|>")),
    "llama4": ("<|eot|>", "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad|>", ("<|eom|>", "<|eot|>")),
    "llama2": ("</s>", "<s>", "</s>", None, ()),
}


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`, encoded and decoded by the `tokenizers` library itself.

    encode/decode follow this class's interface: special-token text is ordinary text unless named in
    `allowed_special` (tiktoken's and Meta's convention; `tokenizers` alone would always read it as the token), and
    bos / eos are added by the flags, not by the file's post-processor. Ids are `tokenizers`' own.
    """

    kind = "tokenizers"

    def __init__(self, path: str | os.PathLike, family: str | None = None):
        self.path = _resolve_path(path)
        try:
            self.model = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as err:  # noqa: BLE001  tokenizers raises plain Exception for a malformed file
            raise ValueError(f"{self.path} is not a valid Hugging Face tokenizer.json ({str(err)[:200]}); it may be "
                             "truncated or corrupt: re-download it") from None
        added = self.model.get_added_tokens_decoder()
        self.special_tokens = {t.content: i for i, t in sorted(added.items()) if t.special}
        vocab = self.model.get_vocab(with_added_tokens=True)
        self.n_words = max(vocab.values()) + 1
        known = [name for name, (mark, *_) in _HF_FAMILIES.items() if mark in vocab]
        if family is not None and family not in _HF_FAMILIES:
            raise ValueError(f"unknown tokenizer family {family!r} for {self.path}; use one of {sorted(_HF_FAMILIES)} "
                             "(or leave family=None to recognise it)")
        self.family = family or (known[0] if known else None)
        _, bos, eos, pad, ends = _HF_FAMILIES.get(self.family, (None, None, None, None, ()))
        config = self._read_config()
        ids = {role: vocab.get(config.get(role, default), -1)
               for role, default in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad))}
        self.bos_id, self.eos_id, self.pad_id = ids["bos_token"], ids["eos_token"], ids["pad_token"]
        self.stop_tokens = tuple(dict.fromkeys(i for i in [self.eos_id] + [vocab.get(n, -1) for n in ends] if i >= 0))

    def _read_config(self) -> dict[str, str]:
        """bos / eos / pad token names from the tokenizer_config.json beside the file ({} if there is none)."""
        path = self.path.parent / "tokenizer_config.json"
        if not path.is_file():
            return {}
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON ({err}); restore it or delete it (bos/eos then follow the "
                             "tokenizer's family)") from None
        names = {}
        for role in ("bos_token", "eos_token", "pad_token"):
            value = config.get(role) if isinstance(config, dict) else None
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                names[role] = value
        return names

    def encode(self, s: str, *, bos: bool, eos: bool, allowed_special: AllowedSpecial = (),
               disallowed_special: AllowedSpecial = ()) -> list[int]:
        """Text -> ids with `tokenizers`; text between allowed special tokens is encoded piece by piece."""
        allowed = self._allowed_specials(s, allowed_special, disallowed_special)
        self.model.encode_special_tokens = allowed != "all"  # True: special-token text is ordinary text
        if allowed == "all" or not allowed:
            return self._wrap(self.model.encode(s, add_special_tokens=False).ids, bos, eos)
        ids: list[int] = []
        for piece in re.split("(" + "|".join(map(re.escape, sorted(allowed, key=len, reverse=True))) + ")", s):
            if piece in allowed:
                ids.append(self.special_tokens[piece])
            elif piece:
                ids += self.model.encode(piece, add_special_tokens=False).ids
        return self._wrap(ids, bos, eos)

    def decode(self, ids: Sequence[int]) -> str:
        return self.model.decode(self._check_ids(ids), skip_special_tokens=False)
