"""Built-in data: corpus, cached tokenizer, synthetic tasks and splits, user files, SFT masking, packing, order."""

import json
import re

import pytest

from peft.training import data as D


class CharTokenizer:
    """An independent reference tokenizer: one id per character, bos 1, eos 2, pad 3 (ids 4+ are characters)."""

    bos_id, eos_id, pad_id = 1, 2, 3
    stop_tokens = (2,)

    def encode(self, s, *, bos, eos):
        return [1] * bos + [4 + ord(c) % 200 for c in s] + [2] * eos


# ---------------------------------------------------------------------------------------------------------------------
# synthetic tasks


def _answer(prompt: str) -> str:
    """Solve a task prompt independently of peft.training.data (parse the text, compute the answer)."""
    kind, body = re.match(r"(\w+): (.*)\nAnswer:", prompt, re.S).groups()
    if kind == "Reverse":
        return "".join(reversed(body))
    if kind == "Sort":
        return "".join(sorted(body, key=int))
    if kind == "Add":
        a, b = body.split("+")
        return str(int(a) + int(b))
    if kind == "Recall":
        listing, query = body.split("; ")
        return dict(p.split("=") for p in listing.split())[query.rstrip("?")]
    raise AssertionError(kind)


@pytest.mark.parametrize("task", ["reverse", "sort", "add", "recall", "mix"])
def test_task_answers_are_correct_and_splits_disjoint(task):
    train = D.task_examples(task, 300, "train", seed=0)
    held_out = D.task_examples(task, 100, "eval", seed=0)
    assert len(train) == 300 and len(held_out) == 100
    for ex in train + held_out:
        assert ex.response == _answer(ex.prompt)
    assert not {e.prompt for e in train} & {e.prompt for e in held_out}
    assert len({e.prompt for e in train}) == 300  # distinct
    assert D.task_examples(task, 300, "train", seed=0) == train  # deterministic
    assert D.task_examples(task, 300, "train", seed=1) != train


def test_mix_contains_every_task():
    kinds = {e.prompt.split(":")[0] for e in D.task_examples("mix", 40)}
    assert kinds == {"Reverse", "Sort", "Add", "Recall"}


def test_task_errors():
    with pytest.raises(ValueError, match="unknown task 'sorting'"):
        D.task_examples("sorting", 10)
    with pytest.raises(ValueError, match="split must be"):
        D.task_examples("sort", 10, split="test")


def test_exact_match_strips_whitespace_only():
    assert D.exact_match(" 123 ", "123")
    assert not D.exact_match("1234", "123")
    assert not D.exact_match("12 3", "123")


# ---------------------------------------------------------------------------------------------------------------------
# corpus and tokenizer


def test_stdlib_corpus_is_docstrings_and_cached(tmp_path):
    docs = D.builtin_corpus(tmp_path, max_chars=200_000)
    assert len(docs) > 50 and all(len(d) >= 40 for d in docs)
    assert sum(map(len, docs)) >= 200_000
    assert json.__doc__.strip().splitlines()[0] in "\n".join(D.builtin_corpus(tmp_path, 4_000_000))
    cached = list(tmp_path.glob("corpus-stdlib-*-200000.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text()) == docs


def test_builtin_tokenizer_trained_once_and_deterministic(tmp_path):
    docs = [e.prompt + " " + e.response for e in D.task_examples("mix", 400)]
    tok = D.builtin_tokenizer(tmp_path / "a", 400, documents=docs)
    path = tok.path
    mtime = path.stat().st_mtime_ns
    again = D.builtin_tokenizer(tmp_path / "a", 400, documents=docs)
    assert again.path == path and path.stat().st_mtime_ns == mtime  # cached, not retrained
    other = D.builtin_tokenizer(tmp_path / "b", 400, documents=docs)
    assert other.path.read_bytes() == path.read_bytes()  # training is deterministic
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    assert tok.pad_id not in tok.stop_tokens
    text = "Sort: 90210\nAnswer: 00129"
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text
    digit_pieces = [tok.decode([i]) for i in tok.encode("90210", bos=False, eos=False)]
    assert "".join(digit_pieces).strip() == "90210" and all(len(p.strip()) <= 1 for p in digit_pieces)


def test_tokenizer_vocab_too_small_is_explained(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        D.train_tokenizer(["abc"], 100)


# ---------------------------------------------------------------------------------------------------------------------
# user files


def test_jsonl_reader(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": "d", "extra": 1}\n')
    assert D.read_jsonl_examples(p) == [D.Example("a", "b"), D.Example("c", "d")]


@pytest.mark.parametrize("content, match", [
    ('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": \n', r"d\.jsonl:2: not valid JSON"),
    ('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n', r'd\.jsonl:2: expected an object with string fields'),
    ('["a", "b"]\n', r"d\.jsonl:1: expected an object"),
    ('{"prompt": "a", "response": "   "}\n', r"d\.jsonl:1: the response is empty"),
    ("\n\n", "holds no examples"),
])
def test_jsonl_malformed_names_the_line(tmp_path, content, match):
    p = tmp_path / "d.jsonl"
    p.write_text(content)
    with pytest.raises(ValueError, match=match):
        D.read_jsonl_examples(p)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.read_jsonl_examples(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.read_text_documents(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        D.read_text_documents(tmp_path / "empty.txt")
    (tmp_path / "blank.txt").write_text("\n \n\n")
    with pytest.raises(ValueError, match="only whitespace"):
        D.read_text_documents(tmp_path / "blank.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(ValueError, match="not UTF-8"):
        D.read_text_documents(tmp_path / "bin.txt")


def test_text_documents_split_on_blank_lines(tmp_path):
    (tmp_path / "c.txt").write_text("first doc\nline two\n\n\nsecond\n")
    assert D.read_text_documents(tmp_path / "c.txt") == ["first doc\nline two", "second"]


# ---------------------------------------------------------------------------------------------------------------------
# SFT tokenisation: loss on the response and EOS only


def test_encode_sft_masks_prompt_and_targets_eos():
    tok = CharTokenizer()
    seq = D.encode_sft(D.Example("ab", "xyz"), tok, max_len=32)
    a, b, x, y, z = (4 + ord(c) for c in "abxyz")
    # full sequence: <bos> a b x y z <eos>; inputs drop the last id, targets drop the first
    assert seq.tokens == [1, a, b, x, y, z]
    assert seq.targets == [D.IGNORE_INDEX, D.IGNORE_INDEX, x, y, z, 2]
    assert seq.n_targets == 4  # x y z and EOS


def test_encode_sft_too_long_errors_unless_truncate():
    tok = CharTokenizer()
    ex = D.Example("ab", "xyzuvw")  # 10 ids (bos, 2 + 6 chars, eos) -> 9 positions
    with pytest.raises(ValueError, match=r"example 7 has 9 tokens, longer than the context of 6.*truncate"):
        D.encode_sft(ex, tok, max_len=6, index=7)
    seq = D.encode_sft(ex, tok, max_len=6, truncate=True)
    assert len(seq.tokens) == 6 and seq.targets[-1] != 2 and seq.n_targets == 4


def test_example_without_trainable_token_is_an_error():
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="no trainable token"):
        D.encode_sft(D.Example("a long prompt", "x"), tok, max_len=5, truncate=True, index=3)


def test_pretraining_windows_shift_by_one():
    tok = CharTokenizer()
    seqs = D.encode_documents(["abcdefg", "hij"], tok, seq_len=4)
    stream = tok.encode("abcdefg", bos=True, eos=True) + tok.encode("hij", bos=True, eos=True)
    assert len(seqs) == (len(stream) - 1) // 4
    for i, s in enumerate(seqs):
        assert s.tokens == stream[4 * i:4 * i + 4] and s.targets == stream[4 * i + 1:4 * i + 5]
    with pytest.raises(ValueError, match="fewer than one row"):
        D.encode_documents(["a"], tok, seq_len=64)


# ---------------------------------------------------------------------------------------------------------------------
# packing, collation, order


def test_pack_keeps_examples_whole_with_segment_ids():
    tok = CharTokenizer()
    seqs = [D.encode_sft(D.Example("p" * n, "r"), tok, 16) for n in (3, 5, 2, 8, 1)]
    rows = D.pack(seqs, seq_len=10)
    # lengths 5, 7, 4, 10, 3: greedy in order -> rows [5] [7] [4] [10] [3] (row contents checked below)
    flat = [t for r in rows for t in r.tokens]
    assert flat == [t for s in seqs for t in s.tokens]
    for r in rows:
        assert len(r) <= 10
        # segment ids count up from 0 in each row and change exactly at sequence boundaries
        assert r.segments[0] == 0 and all(b - a in (0, 1) for a, b in zip(r.segments, r.segments[1:]))
    seg_lengths = [sum(1 for s in r.segments if s == k) for r in rows for k in range(r.segments[-1] + 1)]
    assert seg_lengths == [len(s) for s in seqs]
    with pytest.raises(ValueError, match="cannot be packed"):
        D.pack(seqs, seq_len=8)


def test_pack_fills_rows_greedily():
    tok = CharTokenizer()
    seqs = [D.encode_sft(D.Example("p", "r" * n), tok, 16) for n in (1, 1, 1, 5)]  # lengths 3, 3, 3, 7
    rows = D.pack(seqs, seq_len=9)
    assert [len(r) for r in rows] == [9, 7]
    assert rows[0].segments == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_collate_pads_with_ignored_targets_and_own_segment():
    rows = [D.Row([1, 5, 6], [5, 6, 2], [0, 0, 0]), D.Row([1, 7], [7, 2], [0, 0])]
    b = D.collate(rows, pad_id=3, length=4)
    assert b.tokens.tolist() == [[1, 5, 6, 3], [1, 7, 3, 3]]
    assert b.targets.tolist() == [[5, 6, 2, -100], [7, 2, -100, -100]]
    assert b.segment_ids.tolist() == [[0, 0, 0, 1], [0, 0, 1, 1]]
    assert b.n_tokens == 5 and b.n_targets == 5
    unpacked = D.collate([D.Row([1, 5], [5, 2]), D.Row([1], [2])], pad_id=-1)
    assert unpacked.segment_ids is None and unpacked.tokens.tolist() == [[1, 5], [1, 0]]


def test_row_order_is_resumable_and_covers_each_epoch():
    order = D.RowOrder(10, seed=3)
    stream = order.take(0, 35)
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]  # reshuffled per epoch
    fresh = D.RowOrder(10, seed=3)
    assert fresh.take(17, 18) == stream[17:]  # a resumed run continues the same stream mid-epoch
    assert D.RowOrder(10, seed=4).take(0, 10) != stream[:10]
    with pytest.raises(ValueError, match="no rows"):
        D.RowOrder(0, seed=0)


# ---------------------------------------------------------------------------------------------------------------------
# the skill in raw form (pre-training text of the main job's "papers' regime" base)


def test_raw_skill_documents_show_correct_answers_outside_the_instruction_format_and_held_out_inputs():
    docs = D.raw_skill_documents("sort", 300, seed=0)
    assert len(docs) == 300 and docs == D.raw_skill_documents("sort", 300, seed=0)
    held_out = {re.search(r"\d+", e.prompt).group() for e in D.task_examples("sort", 3000, "eval")}
    pairs = []
    for doc in docs:
        assert "Sort:" not in doc and "Answer:" not in doc  # the instruction format is left for tuning to teach
        # every sentence pairs the digits with their sorted form; parse both independently of the templates
        found = re.findall(r"(\d{3,7})\D+?(\d{3,7})", doc)
        assert len(found) >= 1
        pairs += found
    for x, y in pairs:
        assert y == "".join(sorted(x, key=int)), (x, y)
    assert not {x for x, _ in pairs} & held_out  # no held-out input ever appears in pre-training
    assert len(pairs) > 600  # 2-5 sentences per document


def test_raw_probes_ask_the_held_out_inputs_in_raw_form():
    probes = D.raw_probe_examples("sort", 20)
    held_out = D.task_examples("sort", 20, "eval")
    for probe, ex in zip(probes, held_out):
        digits = re.search(r"\d+", ex.prompt).group()
        assert probe.prompt == f"The digits of {digits} in ascending order are" and probe.response == ex.response
    assert D.raw_probe_correct(" 0123. Sorted, 12 becomes", "0123")
    assert not D.raw_probe_correct(" 01234.", "0123")  # the whole first run of digits must match
    assert not D.raw_probe_correct(" the digits 0123", "0123")  # and come first
    with pytest.raises(ValueError, match="task 'add' has no raw form"):
        D.raw_skill_documents("add", 3)
