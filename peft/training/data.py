"""Training data that ships with the project, SFT examples with response masking, and packing.

Shapes: B batch (rows), T sequence length (positions per row).

Sections, in the order a run uses them:
  1. a pre-training corpus that needs no download: the docstrings of the Python standard library, read at run time;
  2. tokenizers: a SentencePiece BPE trained on that corpus at first use and cached, or plain UTF-8 bytes;
  3. synthetic instruction tasks defined in code (reverse, sort, add, recall), scored by exact match, with a
     held-out evaluation split;
  4. user data: a plain-text file (pre-training) or a JSONL file of {"prompt", "response"} objects (SFT);
  5. tokenisation: pre-training windows, and SFT examples whose loss covers only the response and the EOS token;
  6. packing several SFT examples into one row, with a segment id per example;
  7. batches, and the deterministic order in which rows are visited (so a run can resume mid-epoch exactly).

Token/label convention (one for the whole project): a row stores `tokens` and `targets` already
shifted, `targets[t]` is the token that position t must predict, and positions that carry no loss hold IGNORE_INDEX.
Because the shift happens inside each example before packing, no example is ever asked to predict a token of the next
example in its row.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import random
import re
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import sentencepiece
import torch

import llama
from llama.formats.io import atomic_write_bytes


IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index: positions with this target add nothing to the loss


# =====================================================================================================================
# 0. Cache directory
# =====================================================================================================================

def cache_dir(path: Optional[str | os.PathLike] = None) -> Path:
    """Where the corpus, the tokenizer and the pre-trained base are cached: `path`, $LLAMA_PEFT_CACHE, or
    ~/.cache/llama-peft-zoo. Created if missing."""
    root = Path(path or os.environ.get("LLAMA_PEFT_CACHE") or Path.home() / ".cache" / "llama-peft-zoo")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cache directory {root} cannot be created ({err}); pass a writable --cache-dir or set "
                         f"LLAMA_PEFT_CACHE") from None
    return root


# =====================================================================================================================
# 1. Built-in pre-training corpus: standard-library docstrings
# =====================================================================================================================

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "turtledemo"}


def stdlib_docstrings(max_chars: int = 4_000_000, min_chars: int = 40) -> Iterator[str]:
    """Every docstring (module, class, function) of the running Python's standard library, in sorted file order.

    The text differs between Python versions, so a corpus (and everything trained on it) is reproducible per
    interpreter version, which is why the cache key below contains it.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIP_DIRS)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                tree = ast.parse(Path(directory, name).read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue  # a few stdlib files are deliberately invalid (lib2to3 fixtures and the like)
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node, clean=True)
                    if doc and len(doc) >= min_chars:
                        yield doc
                        total += len(doc)
                        if total >= max_chars:
                            return


def builtin_corpus(cache: Optional[str | os.PathLike] = None, max_chars: int = 4_000_000) -> list[str]:
    """The standard-library docstring corpus as a list of documents, extracted once and cached as JSON."""
    version = f"py{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    path = cache_dir(cache) / f"corpus-stdlib-{version}-{max_chars}.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    docs = list(stdlib_docstrings(max_chars))
    if not docs:
        raise RuntimeError(f"no docstrings found under {sysconfig.get_paths()['stdlib']}; this Python ships without "
                           f"its standard-library sources: pass your own corpus with a text file (data.path=...)")
    atomic_write_bytes(path, json.dumps(docs).encode("utf-8"))
    return docs


# =====================================================================================================================
# 2. A SentencePiece BPE tokenizer trained on the corpus at first use
# =====================================================================================================================

def train_tokenizer(documents: Sequence[str], vocab_size: int) -> bytes:
    """Train a SentencePiece BPE model (the LLaMA 1/2 tokenizer family) and return its serialized bytes.

    Same conventions as Meta's tokenizer (unk 0, bos 1, eos 2, byte fallback, digits split into single pieces) plus a
    real pad piece (3) that differs from every stop token, so padding can never mask an EOS target (unsloth #416).
    Newlines are kept as a piece of their own. One thread and no input shuffling make training deterministic.
    """
    if vocab_size < 300:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-fallback BPE (256 byte pieces + specials "
                         f"+ merges); use at least 300")
    model = io.BytesIO()
    try:
        # hard_vocab_limit=False: a small corpus may support fewer merges; the tokenizer then has fewer pieces
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(documents), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            hard_vocab_limit=False, byte_fallback=True, split_digits=True, character_coverage=0.9995, unk_id=0,
            bos_id=1, eos_id=2, pad_id=3, user_defined_symbols=["\n"], normalization_rule_name="identity",
            remove_extra_whitespaces=False, max_sentence_length=1 << 20, num_threads=1, shuffle_input_sentence=False,
            minloglevel=2)
    except RuntimeError as err:
        raise ValueError(f"SentencePiece could not train a {vocab_size}-piece BPE on {len(documents)} documents "
                         f"({str(err).splitlines()[0][:120]}); raise vocab_size (the corpus has many distinct "
                         f"characters) or give more text") from None
    return model.getvalue()


def builtin_tokenizer(cache: Optional[str | os.PathLike] = None, vocab_size: int = 1024,
                      documents: Optional[Sequence[str]] = None):
    """A `llama.Tokenizer` trained on `documents` (default: the stdlib corpus), cached by content hash."""
    documents = builtin_corpus(cache) if documents is None else documents
    digest = hashlib.sha256("\x00".join(documents).encode("utf-8")).hexdigest()[:16]
    path = cache_dir(cache) / f"tokenizer-bpe{vocab_size}-{digest}.model"
    if not path.exists():
        atomic_write_bytes(path, train_tokenizer(documents, vocab_size))
    return llama.Tokenizer(path)


class ByteTokenizer:
    """UTF-8 bytes as token ids: 256 ids, the vocabulary of the `tiny-*` presets; no file, nothing to train.

    The three special ids are ASCII's own control codes for the job, which text never needs: NUL (0) pads, STX
    (start of text, 2) is bos, ETX (end of text, 3) is eos. Text that contains one of them is refused rather than
    silently read as a special token. The same interface as `llama.Tokenizer` (encode, decode, n_words, bos_id,
    eos_id, pad_id, stop_tokens); `path` is None.
    """

    kind = "bytes"
    path = None
    n_words = vocab_size = 256
    pad_id, bos_id, eos_id = 0, 2, 3
    stop_tokens = (3,)

    def encode(self, s: str, *, bos: bool, eos: bool, **_) -> list[int]:
        ids = list(s.encode("utf-8"))
        for special in (self.pad_id, self.bos_id, self.eos_id):
            if special in ids:
                raise ValueError(f"text contains the control byte {special:#04x} at character {ids.index(special)}, "
                                 f"which the byte tokenizer reserves (pad NUL, bos STX, eos ETX); remove it")
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Sequence[int]) -> str:
        """The text of the byte ids (special ids dropped; a cut multi-byte character becomes U+FFFD)."""
        bad = [t for t in ids if not 0 <= t < 256]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the byte tokenizer's vocabulary [0, 256)")
        specials = (self.pad_id, self.bos_id, self.eos_id)
        return bytes(t for t in ids if t not in specials).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(n_words=256, pad_id=0, bos_id=2, eos_id=3)"


def load_tokenizer(spec: Optional[str | os.PathLike], cache: Optional[str | os.PathLike] = None,
                   vocab_size: int = 1024, corpus_chars: int = 4_000_000):
    """The tokenizer a config names: "bytes" (ByteTokenizer), a tokenizer file, or None (the built-in BPE)."""
    if spec == "bytes":
        return ByteTokenizer()
    if spec:
        return llama.Tokenizer(spec)
    return builtin_tokenizer(cache, vocab_size, builtin_corpus(cache, corpus_chars))


# =====================================================================================================================
# 3. Synthetic instruction tasks (defined in code, scored by exact match)
# =====================================================================================================================

@dataclass(frozen=True)
class Example:
    """One instruction-following example: the model reads `prompt` and must answer `response` (then stop)."""

    prompt: str
    response: str


def _digits(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(rng.randint(lo, hi)))


# The digit-string tasks: instruction prompt (with {x} for the digits) and the answer as a function of the digits.
DIGIT_TASKS: dict[str, tuple[str, Callable[[str], str]]] = {
    "reverse": ("Reverse: {x}\nAnswer:", lambda x: x[::-1]),
    "sort": ("Sort: {x}\nAnswer:", lambda x: "".join(sorted(x))),
}


def _digit_task(name: str) -> Callable[[random.Random], Example]:
    instruction, answer = DIGIT_TASKS[name]

    def make(rng: random.Random) -> Example:
        x = _digits(rng, 3, 7)
        return Example(instruction.format(x=x), answer(x))
    return make


def _add(rng: random.Random) -> Example:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return Example(f"Add: {a}+{b}\nAnswer:", str(a + b))


def _recall(rng: random.Random) -> Example:
    keys = rng.sample("abcdefghijklmnopqrstuvwxyz", rng.randint(3, 5))
    pairs = {k: rng.choice("0123456789") for k in keys}
    query = rng.choice(keys)
    listing = " ".join(f"{k}={v}" for k, v in pairs.items())
    return Example(f"Recall: {listing}; {query}?\nAnswer:", pairs[query])


TASKS: dict[str, Callable[[random.Random], Example]] = {
    "reverse": _digit_task("reverse"),  # reverse a string of 3-7 digits
    "sort": _digit_task("sort"),        # sort 3-7 digits ascending
    "add": _add,          # add two integers in [0, 999]
    "recall": _recall,    # key-value recall: 3-5 letter=digit pairs, then one key is queried
}


def _is_eval(prompt: str, eval_fraction: float) -> bool:
    """Held-out split by a hash of the prompt: a prompt is in exactly one split, whatever the sample sizes."""
    h = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big")
    return h / 2 ** 64 < eval_fraction


def task_examples(task: str, n: int, split: str = "train", seed: int = 0,
                  eval_fraction: float = 0.1) -> list[Example]:
    """`n` distinct examples of `task` ("reverse", "sort", "add", "recall", or "mix" of all four) from one split.

    The train and eval splits never share a prompt (split by prompt hash), so eval accuracy measures generalisation,
    not memorisation.
    """
    names = list(TASKS) if task == "mix" else [task]
    for name in names:
        if name not in TASKS:
            raise ValueError(f"unknown task {task!r}; use one of {sorted(TASKS) + ['mix']}, or give a JSONL file")
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rng = random.Random(f"{task}-{split}-{seed}")
    out, seen = [], set()
    for _ in range(200 * n + 1000):  # generous cap: the small task spaces (e.g. recall) may run out of prompts
        ex = TASKS[names[len(out) % len(names)]](rng)
        if ex.prompt in seen or _is_eval(ex.prompt, eval_fraction) != (split == "eval"):
            continue
        seen.add(ex.prompt)
        out.append(ex)
        if len(out) == n:
            return out
    raise ValueError(f"task {task!r} has fewer than {n} distinct {split} prompts; ask for fewer examples")


def exact_match(prediction: str, reference: str) -> bool:
    """The task metric: the generated answer, stripped of surrounding whitespace, equals the reference exactly."""
    return prediction.strip() == reference.strip()


# -- The same skills in raw form: pre-training text for a base that has the skill before it is asked for -------------
# LLaMA had seen sorted lists, lookups and arithmetic in free text long before Alpaca asked for them in an instruction
# format. These documents do the same for a digit task in miniature (the main job's "papers' regime",
# scripts/ablate_peft.py): the skill appears in free-text sentences, never in the task's instruction format (so
# instruction tuning still has a format to learn), and never on digits whose instruction prompt is held out (so the
# held-out split stays unseen).

RAW_SENTENCES: dict[str, tuple[str, ...]] = {  # {x}: the digits, {y}: the answer
    "sort": ("The digits of {x} in ascending order are {y}.", "Sorted, {x} becomes {y}.",
             ">>> ''.join(sorted('{x}'))\n'{y}'", "Putting the digits {x} in order gives {y}.", "{x} sorted is {y}."),
    "reverse": ("The digits of {x} in reverse order are {y}.", "Reversed, {x} becomes {y}.", ">>> '{x}'[::-1]\n'{y}'",
                "Reading the digits {x} backwards gives {y}.", "{x} reversed is {y}."),
}
RAW_PROBES = {"sort": "The digits of {x} in ascending order are", "reverse": "The digits of {x} in reverse order are"}


def _raw_task(task: str) -> tuple[str, Callable[[str], str]]:
    if task not in RAW_SENTENCES:
        raise ValueError(f"task {task!r} has no raw form; use one of {sorted(RAW_SENTENCES)}")
    return DIGIT_TASKS[task]


def raw_skill_documents(task: str, n: int, seed: int = 0, eval_fraction: float = 0.1,
                        sentences: tuple[int, int] = (2, 5)) -> list[str]:
    """`n` documents of 2-5 free-text sentences, each showing `task`'s answer on fresh training-split digits."""
    instruction, answer = _raw_task(task)
    rng = random.Random(f"raw-{task}-{seed}")
    docs = []
    while len(docs) < n:
        lines = []
        for _ in range(rng.randint(*sentences)):
            x = _digits(rng, 3, 7)
            if not _is_eval(instruction.format(x=x), eval_fraction):
                lines.append(rng.choice(RAW_SENTENCES[task]).format(x=x, y=answer(x)))
        if lines:
            docs.append(" ".join(lines))
    return docs


def raw_probe_examples(task: str, n: int, seed: int = 0, eval_fraction: float = 0.1) -> list[Example]:
    """The held-out inputs of `task_examples(task, n, "eval")`, asked in raw form ("The digits of 4912 in ascending
    order are"): what the base can do before any instruction tuning. Score with `raw_probe_correct`."""
    instruction, answer = _raw_task(task)
    prefix, suffix = instruction.split("{x}")
    inputs = [e.prompt[len(prefix):len(e.prompt) - len(suffix)]
              for e in task_examples(task, n, "eval", seed, eval_fraction)]
    return [Example(RAW_PROBES[task].format(x=x), answer(x)) for x in inputs]


def raw_probe_correct(continuation: str, answer: str) -> bool:
    """Free text goes on after the answer (" 1249. Sorted, …"): the first run of digits must be the answer."""
    found = re.match(r"\s*(\d+)", continuation)
    return found is not None and found.group(1) == answer


# =====================================================================================================================
# 4. User data files
# =====================================================================================================================

def _check_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"dataset file {p} does not exist; check the path (data.path=...)")
    if p.stat().st_size == 0:
        raise ValueError(f"dataset file {p} is empty; it needs at least one document or example")
    return p


def read_text_documents(path: str | os.PathLike) -> list[str]:
    """A plain-text pre-training corpus: documents separated by blank lines."""
    p = _check_file(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{p} is not UTF-8 text (byte {err.start}); convert it to UTF-8 first") from None
    docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    if not docs:
        raise ValueError(f"dataset file {p} holds only whitespace; it needs at least one document")
    return docs


def read_jsonl_examples(path: str | os.PathLike) -> list[Example]:
    """SFT examples from JSONL, one object per line: {"prompt": str, "response": str}. Blank lines are skipped."""
    p = _check_file(path)
    out = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{p}:{lineno}: not valid JSON ({err.msg}); each line must be one JSON object like "
                                 f'{{"prompt": "...", "response": "..."}}') from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or \
                    not isinstance(obj.get("response"), str):
                raise ValueError(f'{p}:{lineno}: expected an object with string fields "prompt" and "response", '
                                 f"got {line.strip()[:80]!r}")
            if not obj["response"].strip():
                raise ValueError(f"{p}:{lineno}: the response is empty, so the example has nothing to learn; "
                                 f"remove it or fill in the response")
            out.append(Example(obj["prompt"], obj["response"]))
    if not out:
        raise ValueError(f"dataset file {p} holds no examples (only blank lines)")
    return out


# =====================================================================================================================
# 5. Tokenisation
# =====================================================================================================================

@dataclass
class TokenSequence:
    """One tokenised training sequence: inputs and already-shifted targets, equal length."""

    tokens: list[int]
    targets: list[int]

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def n_targets(self) -> int:
        return sum(t != IGNORE_INDEX for t in self.targets)


def encode_sft(example: Example, tokenizer, max_len: int, truncate: bool = False,
               index: Optional[int] = None) -> TokenSequence:
    """<bos> prompt response <eos>, with loss on the response tokens and on <eos> only.

    Llama 2 §3.1: "we zero-out the loss on tokens from the user prompt, so as a result, we backpropagate only on
    answer tokens". EOS is a target, so the model learns to stop (unsloth #416). The prompt and the response are
    tokenised separately, exactly as generation later sees them (prompt ids, then generated ids).
    """
    where = f"example {index}" if index is not None else "example"
    prompt = tokenizer.encode(example.prompt, bos=True, eos=False)
    response = tokenizer.encode(example.response, bos=False, eos=True)
    ids = prompt + response
    # shifted: position t predicts ids[t+1]; the first len(prompt)-1 predictions are prompt tokens (masked)
    tokens, targets = ids[:-1], [IGNORE_INDEX] * (len(prompt) - 1) + response
    if len(tokens) > max_len:
        if not truncate:
            raise ValueError(f"{where} has {len(tokens)} tokens, longer than the context of {max_len}; raise "
                             f"data.seq_len, shorten the example, or pass data.truncate=true to cut its response")
        tokens, targets = tokens[:max_len], targets[:max_len]
    seq = TokenSequence(tokens, targets)
    if seq.n_targets == 0:
        raise ValueError(f"{where} has no trainable token (its prompt of {len(prompt)} tokens fills the whole "
                         f"context of {max_len}); shorten the prompt or raise data.seq_len")
    return seq


def encode_documents(documents: Sequence[str], tokenizer, seq_len: int) -> list[TokenSequence]:
    """Pre-training windows: all documents as <bos> doc <eos>, concatenated, cut into rows of seq_len + 1 ids.

    Every position is a target (plain next-token prediction). The tail that does not fill a row is dropped.
    """
    stream: list[int] = []
    for doc in documents:
        stream += tokenizer.encode(doc, bos=True, eos=True)
    n_rows = (len(stream) - 1) // seq_len
    if n_rows == 0:
        raise ValueError(f"the corpus has only {len(stream)} tokens, fewer than one row of seq_len={seq_len}; give "
                         f"more text or a shorter data.seq_len")
    return [TokenSequence(stream[i * seq_len:(i + 1) * seq_len], stream[i * seq_len + 1:(i + 1) * seq_len + 1])
            for i in range(n_rows)]


# =====================================================================================================================
# 6. Packing
# =====================================================================================================================

@dataclass
class Row:
    """One row of a batch: one sequence, or several packed ones with their segment ids."""

    tokens: list[int]
    targets: list[int]
    segments: Optional[list[int]] = None  # None: a single sequence (plain causal attention)
    # extra model inputs of this row (a multimodal model's image tensors, e.g. pixel_values [I, Tt, C, P, P]);
    # collate stacks them along a new batch axis, so every row of a batch must give the same names and shapes
    inputs: Optional[dict[str, torch.Tensor]] = None

    def __len__(self) -> int:
        return len(self.tokens)


def single_rows(sequences: Sequence[TokenSequence]) -> list[Row]:
    return [Row(s.tokens, s.targets) for s in sequences]


def pack(sequences: Sequence[TokenSequence], seq_len: int) -> list[Row]:
    """Greedy packing (torchtune `PackedDataset`, `split_across_pack=False`): fill each row with whole sequences in
    order, start a new row when the next one does not fit. Segment k of a row is its k-th sequence; the model blocks
    attention across segments and restarts positions at each segment start (`Transformer(segment_ids=...)`).
    """
    rows: list[Row] = []
    cur = Row([], [], [])
    for s in sequences:
        if len(s) > seq_len:
            raise ValueError(f"a sequence of {len(s)} tokens cannot be packed into rows of {seq_len}; raise seq_len")
        if len(cur) + len(s) > seq_len:
            rows.append(cur)
            cur = Row([], [], [])
        seg = cur.segments[-1] + 1 if cur.segments else 0
        cur.tokens += s.tokens
        cur.targets += s.targets
        cur.segments += [seg] * len(s)
    if cur.tokens:
        rows.append(cur)
    return rows


# =====================================================================================================================
# 7. Batches and the visiting order
# =====================================================================================================================

@dataclass
class Batch:
    tokens: torch.Tensor  # [B, T] long
    targets: torch.Tensor  # [B, T] long, IGNORE_INDEX where there is no loss
    segment_ids: Optional[torch.Tensor]  # [B, T] long, or None when no row is packed
    n_tokens: int  # real (non-padding) input tokens, for tokens/s
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # extra model inputs, stacked per row: [B, ...]

    @property
    def n_targets(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    def to(self, device) -> "Batch":
        seg = None if self.segment_ids is None else self.segment_ids.to(device)
        return Batch(self.tokens.to(device), self.targets.to(device), seg, self.n_tokens,
                     {k: v.to(device) for k, v in self.inputs.items()})


def collate(rows: Sequence[Row], pad_id: int, length: Optional[int] = None) -> Batch:
    """Right-pad rows to `length` (default: the longest row). Padding has target IGNORE_INDEX; in packed batches it
    gets a segment id of its own, so no real token attends to it (causality already ensures that when unpacked)."""
    T = length or max(len(r) for r in rows)
    tokens = torch.full((len(rows), T), max(pad_id, 0), dtype=torch.long)
    targets = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    packed = any(r.segments is not None for r in rows)
    segment_ids = torch.zeros((len(rows), T), dtype=torch.long) if packed else None
    for i, r in enumerate(rows):
        n = len(r)
        tokens[i, :n] = torch.tensor(r.tokens)
        targets[i, :n] = torch.tensor(r.targets)
        if packed:
            segs = r.segments if r.segments is not None else [0] * n
            segment_ids[i, :n] = torch.tensor(segs)
            segment_ids[i, n:] = (segs[-1] + 1) if segs else 0  # [B, T]: padding is one more segment
    names = {tuple(sorted(r.inputs or {})) for r in rows}
    if len(names) > 1:
        raise ValueError(f"rows of one batch give different extra inputs {sorted(names)}; give every row the same")
    inputs = {k: torch.stack([r.inputs[k] for r in rows]) for k in (rows[0].inputs or {})}
    return Batch(tokens, targets, segment_ids, sum(len(r) for r in rows), inputs)


class RowOrder:
    """Deterministic visiting order over `n_rows` rows: a fresh seeded permutation per epoch, epochs back to back.

    Item k of the stream is row `perm(k // n_rows)[k % n_rows]`, so the data position of a run is a single integer
    (rows consumed) and resuming from it reproduces the rest of the stream exactly, mid-epoch included.
    """

    def __init__(self, n_rows: int, seed: int, shuffle: bool = True):
        if n_rows <= 0:
            raise ValueError("the dataset has no rows; check the data settings")
        self.n_rows, self.seed, self.shuffle = n_rows, seed, shuffle
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._perm = torch.randperm(self.n_rows, generator=g).tolist()
            else:
                self._perm = list(range(self.n_rows))
            self._perm_epoch = epoch
        return self._perm

    def take(self, start: int, count: int) -> list[int]:
        """Row indices of stream items start … start+count-1."""
        return [self._permutation(k // self.n_rows)[k % self.n_rows] for k in range(start, start + count)]
