"""llama.tokenizer against independent references: the sentencepiece library, a pure-Python byte-level BPE, a direct
tiktoken.Encoding, Hugging Face tokenizers (transformers' converters and LlamaTokenizer run in the reference process,
tests/reference/isolation.py), and Meta's special-token ids written out by hand."""

import base64
import math
import re
import shutil
from pathlib import Path

import pytest
import regex
import sentencepiece
import tiktoken
import tokenizers

from llama import ModelArgs
from llama.chat_format import chat_format_for
from llama.tokenizer import (LLAMA3_PATTERN, LLAMA4_PATTERN, HFTokenizer, SentencePieceTokenizer, TiktokenTokenizer,
                             Tokenizer)
from tests.reference.isolation import reference
from tests.tokenizer_files import (META_LLAMA3_PATTERN, META_LLAMA4_PATTERN, sample_text, single_byte_ranks,
                                   train_bpe_ranks, train_sentencepiece, write_llama3_sized_ranks, write_ranks)

TRICKY = [
    "",
    "Hello world!",
    " leading space and trailing space ",
    "two  spaces,\tabs\tand\nnew\n\nlines\r\n",
    "digits 1234567 and 3.14159",
    "I'm sure they've DON'T it's",
    "naïve café über straße",
    "東京 日本語 🦙 emoji outside the training text: 🚀✨",
    "<s> </s> [INST] <<SYS>> <|eot_id|> look like specials but are text",
    "    \n   ",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    ranks = train_bpe_ranks(sample_text(), n_merges=300)
    return {
        "sp": train_sentencepiece(root / "sp.model"),
        "sp_code": train_sentencepiece(root / "sp_code.model",
                                       control_symbols=("▁<PRE>", "▁<MID>", "▁<SUF>", "▁<EOT>", "<step>")),
        "ranks": ranks,
        # Meta ships the Llama 3 ranks under the same name as the SentencePiece file.
        "bpe": write_ranks(root / "tokenizer.model", ranks),
        "root": root,
    }


@pytest.fixture(scope="module")
def sp_tok(files):
    return Tokenizer(files["sp"])


@pytest.fixture(scope="module")
def bpe_tok(files):
    return Tokenizer(files["bpe"])


# ---------------------------------------------------------------------------------------------------------------------
# Format detection
# ---------------------------------------------------------------------------------------------------------------------


def test_format_is_detected_from_content_not_name(files, tmp_path):
    assert type(Tokenizer(files["sp"])) is SentencePieceTokenizer
    assert type(Tokenizer(files["bpe"])) is TiktokenTokenizer
    swapped = shutil.copy(files["sp"], tmp_path / "looks_like_text.txt")
    assert isinstance(Tokenizer(swapped), SentencePieceTokenizer)
    assert isinstance(Tokenizer(swapped), Tokenizer)
    assert Tokenizer(files["sp"]).kind == "sentencepiece" and Tokenizer(files["bpe"]).kind == "tiktoken"


def test_checkpoint_folder_resolves_to_its_tokenizer_model(files):
    tok = Tokenizer(files["root"])  # the folder holds tokenizer.model (the BPE file)
    assert isinstance(tok, TiktokenTokenizer) and tok.path.name == "tokenizer.model"


def test_subclasses_can_be_called_directly(files):
    assert SentencePieceTokenizer(files["sp"]).n_words == 512
    assert TiktokenTokenizer(files["bpe"]).n_words == len(files["ranks"]) + 256


# ---------------------------------------------------------------------------------------------------------------------
# SentencePiece (LLaMA 1 / Llama 2 / Code Llama)
# ---------------------------------------------------------------------------------------------------------------------


def test_sentencepiece_ids_and_properties(sp_tok):
    assert (sp_tok.n_words, sp_tok.vocab_size) == (512, 512)
    assert (sp_tok.bos_id, sp_tok.eos_id, sp_tok.pad_id) == (1, 2, -1)  # LLaMA: unk 0, bos 1, eos 2, no pad
    assert sp_tok.stop_tokens == (2,)
    assert sp_tok.prefix_id is None and sp_tok.eot_id is None  # no Code Llama infilling pieces in this model


def test_sentencepiece_matches_the_library_and_round_trips(files, sp_tok):
    reference = sentencepiece.SentencePieceProcessor(model_file=str(files["sp"]))
    for text in TRICKY + sample_text(200, seed=7):
        ids = reference.encode(text)
        assert sp_tok.encode(text, bos=False, eos=False) == ids
        assert sp_tok.encode(text, bos=True, eos=False) == [1] + ids
        assert sp_tok.encode(text, bos=True, eos=True) == [1] + ids + [2]
        assert sp_tok.encode(text, bos=False, eos=True) == ids + [2]
        assert sp_tok.decode(ids) == text  # identity normalisation + byte fallback: lossless
        assert sp_tok.decode([1] + ids + [2]) == text  # control pieces decode to nothing


def test_sentencepiece_byte_fallback_for_unseen_characters(sp_tok):
    ids = sp_tok.encode("🚀", bos=False, eos=False)
    pieces = [sp_tok.sp_model.id_to_piece(i) for i in ids]
    assert "<0xF0>" in pieces and sp_tok.decode(ids) == "🚀"


def test_code_llama_infilling_ids(files):
    tok = Tokenizer(files["sp_code"])
    reference = sentencepiece.SentencePieceProcessor(model_file=str(files["sp_code"]))
    assert tok.prefix_id == reference.piece_to_id("▁<PRE>") != reference.unk_id()
    assert tok.middle_id == reference.piece_to_id("▁<MID>")
    assert tok.suffix_id == reference.piece_to_id("▁<SUF>")
    assert tok.eot_id == reference.piece_to_id("▁<EOT>")
    assert tok.step_id == reference.piece_to_id("<step>")
    assert len({tok.prefix_id, tok.middle_id, tok.suffix_id, tok.eot_id, tok.step_id}) == 5


def without_dummy_prefix(model_file) -> sentencepiece.SentencePieceProcessor:
    """The same SentencePiece model with its implicit leading space switched off in the model's normalizer spec."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(open(model_file, "rb").read())
    proto.normalizer_spec.add_dummy_prefix = False
    return sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())


def test_code_llama_infilling_prompt(files):
    """Code Llama §2.3 / Meta `infilling_prompt_tokens`, against sentencepiece itself: the prefix encoded normally,
    the suffix as the model with no dummy prefix encodes it."""
    tok = Tokenizer(files["sp_code"])
    plain = sentencepiece.SentencePieceProcessor(model_file=str(files["sp_code"]))
    bare = without_dummy_prefix(files["sp_code"])
    prefix, suffix = "def hello(x):\n    ", "\n    return x  # café 🦙\n"
    pre, suf = plain.encode(prefix), bare.encode(suffix)
    assert tok.encode_infilling(suffix) == suf and tok.decode(suf) == suffix
    bos, p, m, s = tok.bos_id, tok.prefix_id, tok.middle_id, tok.suffix_id
    assert tok.infilling_prompt(prefix, suffix) == [bos, p] + pre + [s] + suf + [m]
    assert tok.infilling_prompt(prefix, suffix, suffix_first=True) == [bos, p, s] + suf + [m] + pre
    for text in TRICKY:
        assert tok.encode_infilling(text) == bare.encode(text), text
        assert tok.decode_infilling(tok.encode_infilling(text)) == text, text    # leading spaces kept


def test_infilling_needs_a_code_llama_tokenizer(sp_tok):
    with pytest.raises(ValueError, match="no infilling pieces"):
        sp_tok.infilling_prompt("a", "b")


# Two known differences between HF's Llama tokenizers and Meta's sentencepiece, skipped where compared: HF fuses a
# leading space of the text into the dummy "▁" prefix (its Metaspace pre-tokeniser; huggingface/transformers PR
# #47700), and HF always reads "<s>"/"</s>" in the text as control tokens (huggingface/transformers#24569) where
# Meta's sentencepiece encodes them as characters.
def comparable_with_hf(texts: list[str]) -> list[str]:
    return [t for t in texts if not t[:1].isspace() and "<s>" not in t and "</s>" not in t]


def test_sentencepiece_matches_hugging_face_llama_tokenizer(files, sp_tok, tmp_path):
    shutil.copy(files["sp"], tmp_path / "tokenizer.model")
    texts = comparable_with_hf(TRICKY + sample_text(100, seed=3))
    assert len(texts) > 100
    hf = reference().call("hf_llama.llama_tokenizer", str(tmp_path), texts)
    assert (hf["bos"], hf["eos"], hf["unk"]) == (1, 2, 0)
    for text, hf_ids, hf_text in zip(texts, hf["ids"], hf["decoded"]):
        ids = sp_tok.encode(text, bos=False, eos=False)
        assert hf_ids == ids, text
        assert hf_text == sp_tok.decode(ids)


# ---------------------------------------------------------------------------------------------------------------------
# Llama 3 byte-level BPE
# ---------------------------------------------------------------------------------------------------------------------


def reference_bpe(ranks: dict[bytes, int], text: str) -> list[int]:
    """Byte-level BPE written from the definition: split with the regex, then in each piece repeatedly merge the
    adjacent pair whose concatenation has the lowest rank (leftmost on ties). Like tiktoken, a piece that is itself a
    token is emitted whole."""
    ids = []
    for piece in regex.findall(META_LLAMA3_PATTERN, text):
        data = piece.encode("utf-8")
        if data in ranks:
            ids.append(ranks[data])
            continue
        parts = [bytes([b]) for b in data]
        while len(parts) > 1:
            rank, i = min((ranks.get(parts[i] + parts[i + 1], math.inf), i) for i in range(len(parts) - 1))
            if rank == math.inf:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids += [ranks[p] for p in parts]
    return ids


def test_pretokenizer_pattern_is_metas():
    assert LLAMA3_PATTERN == META_LLAMA3_PATTERN
    pieces = regex.findall(LLAMA3_PATTERN, "I'll pay 12345 dollars!!\n\n  ok")
    assert pieces == ["I", "'ll", " pay", " ", "123", "45", " dollars", "!!\n\n", " ", " ok"]


def test_bpe_matches_pure_python_reference(files, bpe_tok):
    for text in TRICKY + sample_text(300, seed=11):
        assert bpe_tok.encode(text, bos=False, eos=False) == reference_bpe(files["ranks"], text), text


def test_bpe_round_trip(bpe_tok):
    for text in TRICKY + sample_text(200, seed=5):
        ids = bpe_tok.encode(text, bos=True, eos=True)
        assert ids[0] == bpe_tok.bos_id and ids[-1] == bpe_tok.eos_id
        assert bpe_tok.decode(ids[1:-1]) == text
        assert bpe_tok.decode(ids) == "<|begin_of_text|>" + text + "<|end_of_text|>"


def test_bpe_bos_eos_flags(bpe_tok):
    plain = bpe_tok.encode("Hello world", bos=False, eos=False)
    assert bpe_tok.encode("Hello world", bos=True, eos=False) == [bpe_tok.bos_id] + plain
    assert bpe_tok.encode("Hello world", bos=False, eos=True) == plain + [bpe_tok.eos_id]
    assert bpe_tok.encode("", bos=True, eos=True) == [bpe_tok.bos_id, bpe_tok.eos_id]


# Meta's Llama 3 special tokens, written out by hand (llama-models/models/llama3/tokenizer.py); ids for the released
# 128,000-rank file in that file's order (bos 128000, eos 128001, eom 128008, eot 128009, python_tag 128010,
# <|image|> 128011).
META_SPECIAL_IDS = {
    "<|begin_of_text|>": 128000,
    "<|end_of_text|>": 128001,
    "<|reserved_special_token_0|>": 128002,
    "<|reserved_special_token_1|>": 128003,
    "<|finetune_right_pad_id|>": 128004,
    "<|step_id|>": 128005,
    "<|start_header_id|>": 128006,
    "<|end_header_id|>": 128007,
    "<|eom_id|>": 128008,
    "<|eot_id|>": 128009,
    "<|python_tag|>": 128010,
    "<|image|>": 128011,
    "<|reserved_special_token_2|>": 128012,
    "<|reserved_special_token_3|>": 128013,
    "<|reserved_special_token_100|>": 128110,
    "<|reserved_special_token_245|>": 128255,
}


def test_llama3_special_token_ids_on_a_128000_rank_file(tmp_path):
    tok = Tokenizer(write_llama3_sized_ranks(tmp_path / "tokenizer.model"))
    assert tok.n_words == tok.vocab_size == 128_256
    for name, token_id in META_SPECIAL_IDS.items():
        assert tok.special_tokens[name] == token_id, name
    assert len(tok.special_tokens) == 256
    assert sorted(tok.special_tokens.values()) == list(range(128_000, 128_256))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (128000, 128001, 128004)
    assert (tok.eot_id, tok.eom_id, tok.python_tag_id) == (128009, 128008, 128010)
    assert set(tok.stop_tokens) == {128001, 128008, 128009}
    assert tok.encode("<|eot_id|>", bos=True, eos=False, allowed_special="all") == [128000, 128009]
    assert tok.decode([128006, 128007, 128255]) == "<|start_header_id|><|end_header_id|><|reserved_special_token_245|>"


def test_special_ids_follow_the_base_vocabulary(files, bpe_tok):
    n = len(files["ranks"])
    for name, token_id in META_SPECIAL_IDS.items():
        assert bpe_tok.special_tokens[name] == token_id - 128_000 + n


def test_special_token_text_is_plain_text_unless_allowed(bpe_tok):
    eot = bpe_tok.eot_id
    text = "a<|eot_id|>b"
    plain = bpe_tok.encode(text, bos=False, eos=False)  # Meta's default: a user cannot inject a special token
    assert eot not in plain and len(plain) > 3 and bpe_tok.decode(plain) == text
    a, b = bpe_tok.encode("a", bos=False, eos=False), bpe_tok.encode("b", bos=False, eos=False)
    assert bpe_tok.encode(text, bos=False, eos=False, allowed_special={"<|eot_id|>"}) == a + [eot] + b
    assert bpe_tok.encode(text, bos=False, eos=False, allowed_special="all") == a + [eot] + b
    # allowed only a different token: <|eot_id|> stays text
    assert bpe_tok.encode(text, bos=False, eos=False, allowed_special=["<|eom_id|>"]) == plain
    for name, token_id in bpe_tok.special_tokens.items():
        assert bpe_tok.encode(name, bos=False, eos=False, allowed_special="all") == [token_id]


def test_bpe_matches_direct_tiktoken_encoding(files, bpe_tok):
    n = len(files["ranks"])
    specials = {name: token_id - 128_000 + n for name, token_id in META_SPECIAL_IDS.items()}
    reference = tiktoken.Encoding("reference", pat_str=META_LLAMA3_PATTERN, mergeable_ranks=files["ranks"],
                                  special_tokens=specials)
    names = "".join(specials)
    for text in TRICKY + sample_text(200, seed=13) + [f"x {names} y"]:
        assert bpe_tok.encode(text, bos=False, eos=False, allowed_special="all") == \
            reference.encode(text, allowed_special="all")
        assert bpe_tok.encode(text, bos=False, eos=False) == reference.encode(text, disallowed_special=())


def test_long_runs_are_cut_like_meta(bpe_tok, files):
    # Meta cuts runs longer than 25,000 (non-)whitespace characters before calling tiktoken.
    reference = tiktoken.Encoding("reference", pat_str=META_LLAMA3_PATTERN, mergeable_ranks=files["ranks"],
                                  special_tokens={})
    text = "a" * 30_000 + " " * 26_000 + "b"
    expected = (reference.encode("a" * 25_000) + reference.encode("a" * 5_000 + " " * 20_000)
                + reference.encode(" " * 6_000 + "b"))
    assert bpe_tok.encode(text, bos=False, eos=False) == expected
    assert bpe_tok.decode(expected) == text


@pytest.mark.parametrize("family, pattern, specials", [
    ("llama3", META_LLAMA3_PATTERN, "<|begin_of_text|>Hi<|eot_id|><|python_tag|>"),
    ("llama4", META_LLAMA4_PATTERN, "<|begin_of_text|>Hi<|eot|><|python_start|>x<|python_end|>"),
])
def test_bpe_matches_hugging_face_tokenizers(files, family, pattern, specials, tmp_path):
    tok = Tokenizer(files["bpe"], family=family)
    hf = tokenizers.Tokenizer.from_file(str(hub_tokenizer_json(files["bpe"], tok, pattern, tmp_path)))
    for text in TRICKY + sample_text(100, seed=17) + [specials]:
        # Hugging Face always treats special-token text as the special token.
        ids = tok.encode(text, bos=False, eos=False, allowed_special="all")
        assert hf.encode(text, add_special_tokens=False).ids == ids, text
        assert hf.decode(ids, skip_special_tokens=False) == tok.decode(ids)


# ---------------------------------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json (hub folders), read by the tokenizers library
# ---------------------------------------------------------------------------------------------------------------------

CORPUS = TRICKY + sample_text(300, seed=23)


def hub_tokenizer_json(ranks_file, tok: Tokenizer, pattern: str, folder) -> Path:
    """tokenizer.json as the hub's Llama 3/4 files were made: transformers' TikTokenConverter on the ranks file."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tok.special_tokens, key=tok.special_tokens.get)
    reference().call("hf_llama.tokenizer_json_from_tiktoken", str(ranks_file), pattern, names,
                     str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


@pytest.mark.parametrize("family, pattern", [("llama3", META_LLAMA3_PATTERN), ("llama4", META_LLAMA4_PATTERN)])
def test_hub_tokenizer_json_ids_equal_the_tokenizers_library_and_tiktoken(files, family, pattern, tmp_path):
    meta = Tokenizer(files["bpe"], family=family)
    library = tokenizers.Tokenizer.from_file(str(hub_tokenizer_json(files["bpe"], meta, pattern, tmp_path / "hub")))
    hub = Tokenizer(tmp_path / "hub")  # a folder with tokenizer.json only
    assert isinstance(hub, HFTokenizer) and hub.kind == "tokenizers" and hub.family == family
    assert (hub.n_words, hub.bos_id, hub.eos_id, hub.pad_id, hub.special_tokens) == \
        (meta.n_words, meta.bos_id, meta.eos_id, meta.pad_id, meta.special_tokens)
    assert set(hub.stop_tokens) == set(meta.stop_tokens)
    for text in CORPUS:
        ids = hub.encode(text, bos=False, eos=False, allowed_special="all")
        assert ids == library.encode(text, add_special_tokens=False).ids, text  # the library's own ids
        assert ids == meta.encode(text, bos=False, eos=False, allowed_special="all"), text
        assert hub.encode(text, bos=True, eos=False) == meta.encode(text, bos=True, eos=False), text  # specials as text
        assert hub.decode(ids) == library.decode(ids, skip_special_tokens=False) == meta.decode(ids)
    eot = "<|eot_id|>" if family == "llama3" else "<|eot|>"
    text = f"a{eot}b<|begin_of_text|>c"
    assert hub.encode(text, bos=False, eos=False, allowed_special={eot}) == \
        meta.encode(text, bos=False, eos=False, allowed_special={eot})
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Hi {eot} there"}]
    assert chat_format_for(hub).encode_dialog_prompt(dialog) == chat_format_for(meta).encode_dialog_prompt(dialog)


def test_hub_tokenizer_json_of_a_sentencepiece_model(files, sp_tok, tmp_path):
    shutil.copy(files["sp"], tmp_path / "tokenizer.model")
    (tmp_path / "hub").mkdir()
    reference().call("hf_llama.tokenizer_json_from_sentencepiece", str(tmp_path),
                     str(tmp_path / "hub" / "tokenizer.json"))
    library = tokenizers.Tokenizer.from_file(str(tmp_path / "hub" / "tokenizer.json"))
    hub = Tokenizer(tmp_path / "hub")
    assert hub.family == "llama2" and (hub.n_words, hub.bos_id, hub.eos_id, hub.pad_id) == (sp_tok.n_words, 1, 2, -1)
    for text in CORPUS:
        assert hub.encode(text, bos=False, eos=False, allowed_special="all") == \
            library.encode(text, add_special_tokens=False).ids, text
    for text in comparable_with_hf(CORPUS):
        assert hub.encode(text, bos=True, eos=True) == sp_tok.encode(text, bos=True, eos=True), text


def test_hub_tokenizer_config_names_bos_eos_pad(files, tmp_path):
    meta = Tokenizer(files["bpe"])
    hub_tokenizer_json(files["bpe"], meta, META_LLAMA3_PATTERN, tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": {"content": "<|begin_of_text|>"}, '
                                                    '"eos_token": "<|eot_id|>", "pad_token": null}')
    hub = Tokenizer(tmp_path / "tokenizer.json")
    assert (hub.bos_id, hub.eos_id, hub.pad_id) == (meta.bos_id, meta.eot_id, meta.pad_id)  # Instruct: eos = eot
    shutil.copy(files["bpe"], tmp_path / "tokenizer.model")
    assert isinstance(Tokenizer(tmp_path), TiktokenTokenizer)  # a folder with both: Meta's file first


# ---------------------------------------------------------------------------------------------------------------------
# Llama 4 (o200k pre-tokeniser, 2,048 specials)
# ---------------------------------------------------------------------------------------------------------------------


def test_llama4_pretokenizer_pattern_is_metas_and_tiktokens_o200k(monkeypatch):
    import tiktoken_ext.openai_public as openai_public

    assert LLAMA4_PATTERN == META_LLAMA4_PATTERN
    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *args, **kwargs: {})  # no download
    assert LLAMA4_PATTERN == openai_public.o200k_base()["pat_str"]
    # Case changes split words and contractions stay on their word (Llama 3: "HelloWorld", "DON", "'T").
    assert regex.findall(LLAMA4_PATTERN, "HelloWorld DON'T iPhone 12345") == \
        ["Hello", "World", " DON'T", " i", "Phone", " ", "123", "45"]


def test_llama4_special_token_ids_on_a_200000_rank_file(tmp_path):
    """Meta's ids (llama-models models/llama4/tokenizer.py) and Hugging Face's Llama4Config vision ids."""
    tok = Tokenizer(write_llama3_sized_ranks(tmp_path / "tokenizer.model", n_base=200_000))
    assert tok.family == "llama4"                                           # recognised from the 200,000 ranks
    assert tok.n_words == 202_048 == ModelArgs.from_name("llama-4-scout").vocab_size
    assert sorted(tok.special_tokens.values()) == list(range(200_000, 202_048))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eom_id, tok.eot_id) == (200000, 200001, 200018, 200007, 200008)
    assert set(tok.stop_tokens) == {200001, 200007, 200008} and tok.python_tag_id is None
    named = {"<|header_start|>": 200005, "<|header_end|>": 200006, "<|python_start|>": 200016,
             "<|python_end|>": 200017, "<|text_post_train_reserved_special_token_68|>": 200079,
             "<|tile_x_separator|>": 200084, "<|image|>": 200090, "<|vision_reserved_special_token_1047|>": 201133,
             "<|reasoning_thinking_start|>": 201142, "<|reasoning_thinking_end|>": 201143,
             "<|reserved_special_token_0|>": 201144, "<|reserved_special_token_903|>": 202047}
    for name, token_id in named.items():
        assert tok.special_tokens[name] == token_id, name
    hf = reference().call("hf_llama.llama4_vision_token_ids")
    assert (tok.special_tokens["<|image_start|>"], tok.special_tokens["<|image_end|>"],
            tok.special_tokens["<|patch|>"]) == (hf["boi"], hf["eoi"], hf["image"])
    assert tok.encode("<|eot|>", bos=True, eos=False, allowed_special="all") == [200000, 200008]


def test_family_is_recognised_from_the_rank_count(files):
    assert Tokenizer(files["bpe"]).family == "llama3"              # 300 merges: not Meta's 200,000-rank Llama 4 file
    assert Tokenizer(files["bpe"], family="llama4").family == "llama4"


def test_llama4_never_merges_across_a_case_change(tmp_path):
    """One merge, "oW": Llama 3's pre-tokeniser keeps "HelloWorld" whole and uses it, Llama 4's cuts before "W"."""
    ranks = single_byte_ranks()
    ranks[b"oW"] = len(ranks)
    path = write_ranks(tmp_path / "tokenizer.model", ranks)
    assert ranks[b"oW"] in Tokenizer(path).encode("HelloWorld", bos=False, eos=False)
    assert Tokenizer(path, family="llama4").encode("HelloWorld", bos=False, eos=False) == \
        [ranks[bytes([b])] for b in b"HelloWorld"]


def test_unknown_family_and_family_on_a_sentencepiece_file(files):
    with pytest.raises(ValueError, match="unknown tokenizer family 'llama5'"):
        Tokenizer(files["bpe"], family="llama5")
    with pytest.raises(ValueError, match="is a SentencePiece model"):
        Tokenizer(files["sp"], family="llama4")


# ---------------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------------


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json in folder"):
        Tokenizer(tmp_path)
    with pytest.raises(TypeError, match="needs the path"):
        Tokenizer()


def test_empty_and_unknown_formats(tmp_path):
    (tmp_path / "empty.model").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        Tokenizer(tmp_path / "empty.model")
    (tmp_path / "text.model").write_text("just some text\nnot a tokenizer\n")
    with pytest.raises(ValueError, match="neither a SentencePiece model nor a Llama 3 BPE ranks file"):
        Tokenizer(tmp_path / "text.model")
    (tmp_path / "noise.model").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match="neither a SentencePiece model"):
        Tokenizer(tmp_path / "noise.model")


def test_truncated_sentencepiece_model(files, tmp_path):
    data = files["sp"].read_bytes()
    (tmp_path / "cut.model").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        Tokenizer(tmp_path / "cut.model")


def test_corrupt_ranks_files(files, tmp_path):
    text = files["bpe"].read_text()
    path = tmp_path / "bad.model"
    path.write_text(text[: len(text) // 2 - 3].rsplit("\n", 1)[0] + "\nQUJD")  # cut inside a line
    with pytest.raises(ValueError, match=r"line \d+: expected '<base64 token> <rank>'"):
        Tokenizer(path)
    path.write_text(text + "@@@@ 99999\n")
    with pytest.raises(ValueError, match="not valid base64"):
        Tokenizer(path)
    first_token = text.split(" ", 1)[0]
    path.write_text(text + f"{first_token} {len(files['ranks'])}\n")
    with pytest.raises(ValueError, match="appears twice"):
        Tokenizer(path)
    path.write_text(text + f"{base64.b64encode(b'new token').decode()} {len(files['ranks']) + 5}\n")
    with pytest.raises(ValueError, match="not the consecutive integers"):
        Tokenizer(path)
    path.write_bytes(text.encode() + "éé 3\n".encode())
    with pytest.raises(ValueError, match="non-ASCII"):
        Tokenizer(path)


def test_ranks_file_without_every_byte(tmp_path):
    ranks = {bytes([b]): b for b in range(200)}
    with pytest.raises(ValueError, match="56 of the 256 single bytes have no rank"):
        Tokenizer(write_ranks(tmp_path / "partial.model", ranks))


@pytest.mark.parametrize("which", ["sp_tok", "bpe_tok"])
def test_decode_rejects_out_of_range_and_non_integer_ids(which, request):
    tok = request.getfixturevalue(which)
    with pytest.raises(ValueError, match=rf"token id {tok.n_words} at position 1 is outside .*\[0, {tok.n_words}\)"):
        tok.decode([5, tok.n_words])
    with pytest.raises(ValueError, match="remove padding"):
        tok.decode([-1, 5])
    with pytest.raises(TypeError, match="integer token ids"):
        tok.decode([1.5])
    with pytest.raises(TypeError, match="sequence of token ids"):
        tok.decode("hello")


@pytest.mark.parametrize("which", ["sp_tok", "bpe_tok"])
def test_encode_rejects_non_strings(which, request):
    tok = request.getfixturevalue(which)
    with pytest.raises(TypeError, match="encode expects a str"):
        tok.encode(b"bytes", bos=False, eos=False)
    with pytest.raises(TypeError):  # bos and eos are required keywords, as in Meta's API
        tok.encode("text")


def test_decode_accepts_tensor_like_integers(bpe_tok):
    torch = pytest.importorskip("torch")
    ids = bpe_tok.encode("Hello world", bos=False, eos=False)
    assert bpe_tok.decode(torch.tensor(ids)) == "Hello world"


def test_sentencepiece_rejects_special_token_arguments(sp_tok):
    with pytest.raises(ValueError, match="no special tokens inside text"):
        sp_tok.encode("<s>", bos=False, eos=False, allowed_special="all")
    with pytest.raises(ValueError, match="no special tokens inside text"):
        sp_tok.encode("<s>", bos=False, eos=False, disallowed_special={"<s>"})


def test_bpe_special_token_argument_errors(bpe_tok):
    with pytest.raises(ValueError, match="not Llama 3 special tokens"):
        bpe_tok.encode("x", bos=False, eos=False, allowed_special={"<|im_end|>"})
    with pytest.raises(TypeError, match=r"write allowed_special=\{'<\|eot_id\|>'\}"):
        bpe_tok.encode("x", bos=False, eos=False, allowed_special="<|eot_id|>")
    refused = re.escape("contains '<|eot_id|>', a special token listed in disallowed_special")
    with pytest.raises(ValueError, match=refused):
        bpe_tok.encode("x<|eot_id|>", bos=False, eos=False, disallowed_special="all")
    with pytest.raises(ValueError, match="listed in disallowed_special"):
        bpe_tok.encode("x<|eot_id|>", bos=False, eos=False, disallowed_special={"<|eot_id|>"})
    # allowed wins over disallowed="all" (tiktoken's rule); other specials in the text are still refused
    assert bpe_tok.encode("<|eot_id|>", bos=False, eos=False, allowed_special={"<|eot_id|>"},
                          disallowed_special="all") == [bpe_tok.eot_id]
    with pytest.raises(ValueError, match=re.escape("'<|eom_id|>'")):
        bpe_tok.encode("<|eot_id|><|eom_id|>", bos=False, eos=False, allowed_special={"<|eot_id|>"},
                       disallowed_special="all")


def test_bos_eos_missing_from_model(tmp_path):
    import io

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sample_text(300)), model_writer=model, model_type="bpe", vocab_size=400,
        byte_fallback=True, bos_id=-1, eos_id=-1, unk_id=0, pad_id=-1, minloglevel=2, num_threads=1)
    (tmp_path / "nobos.model").write_bytes(model.getvalue())
    tok = Tokenizer(tmp_path / "nobos.model")
    with pytest.raises(ValueError, match="defines no bos token"):
        tok.encode("hi", bos=True, eos=False)
    with pytest.raises(ValueError, match="defines no eos token"):
        tok.encode("hi", bos=False, eos=True)
