"""Chat prompts against hand-written expectations: exact token sequences from a hand-made BPE file (Llama 3), the
exact strings of Meta's chat_completion encoded by the sentencepiece library itself (Llama 2), and the rendered
Llama 3 prompt string encoded by a direct tiktoken.Encoding."""

import pytest
import sentencepiece
import tiktoken

from llama.chat_format import Llama2ChatFormat, Llama3ChatFormat, Llama4ChatFormat, chat_format_for
from llama.tokenizer import Tokenizer
from tests.reference.isolation import reference
from tests.tokenizer_files import (META_LLAMA3_PATTERN, META_LLAMA4_PATTERN, hand_written_ranks, sample_text,
                                   train_bpe_ranks, train_sentencepiece, write_ranks)

DIALOG = [
    {"role": "system", "content": "You are a helpful llama"},
    {"role": "user", "content": "  Hello world \n"},  # surrounding whitespace is stripped
    {"role": "assistant", "content": "Hi there"},
    {"role": "user", "content": "Hello you"},
]


@pytest.fixture(scope="module")
def hand(tmp_path_factory):
    ranks = hand_written_ranks()
    return ranks, Tokenizer(write_ranks(tmp_path_factory.mktemp("hand") / "tokenizer.model", ranks))


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    path = train_sentencepiece(tmp_path_factory.mktemp("sp") / "tokenizer.model")
    return sentencepiece.SentencePieceProcessor(model_file=str(path)), Tokenizer(path)


# ---------------------------------------------------------------------------------------------------------------------
# Llama 3
# ---------------------------------------------------------------------------------------------------------------------


def test_hand_words_are_single_tokens(hand):
    ranks, tok = hand
    for word in [b"user", b"assistant", b"system", b"ipython", b"\n\n", b"Hello", b" world", b"Hi", b" there"]:
        assert tok.encode(word.decode(), bos=False, eos=False) == [ranks[word]]


def test_llama3_dialog_prompt_exact_ids(hand):
    ranks, tok = hand
    r = lambda word: ranks[word.encode()]  # noqa: E731
    n = len(ranks)  # special tokens follow the base vocabulary: bos +0, start_header +6, end_header +7, eot +9
    bot, sh, eh, eot = n + 0, n + 6, n + 7, n + 9
    expected = [
        bot,
        sh, r("system"), eh, r("\n\n"), r("You"), r(" are"), r(" a"), r(" helpful"), r(" llama"), eot,
        sh, r("user"), eh, r("\n\n"), r("Hello"), r(" world"), eot,
        sh, r("assistant"), eh, r("\n\n"), r("Hi"), r(" there"), eot,
        sh, r("user"), eh, r("\n\n"), r("Hello"), r(" you"), eot,
        sh, r("assistant"), eh, r("\n\n"),
    ]
    assert Llama3ChatFormat(tok).encode_dialog_prompt(DIALOG) == expected
    assert chat_format_for(tok).encode_dialog_prompt(DIALOG) == expected


def test_llama3_message_and_header(hand):
    ranks, tok = hand
    fmt = Llama3ChatFormat(tok)
    n = len(ranks)
    assert fmt.encode_header("ipython") == [n + 6, ranks[b"ipython"], n + 7, ranks[b"\n\n"]]
    assert fmt.encode_message({"role": "user", "content": " Hi "}) == \
        [n + 6, ranks[b"user"], n + 7, ranks[b"\n\n"], ranks[b"Hi"], n + 9]


def test_llama3_prompt_equals_rendered_string(tmp_path):
    # The documented Llama 3 prompt as one string, encoded by tiktoken directly with all specials allowed.
    ranks = train_bpe_ranks(sample_text(), n_merges=300)
    tok = Tokenizer(write_ranks(tmp_path / "tokenizer.model", ranks))
    dialog = [
        {"role": "system", "content": "You are helpful. Answer in 1-2 sentences!"},
        {"role": "user", "content": "What's a llama?\n"},
        {"role": "assistant", "content": "A South American camelid."},
        {"role": "ipython", "content": '{"result": 42}'},
        {"role": "user", "content": "Thanks — and 東京?"},
    ]
    rendered = "<|begin_of_text|>" + "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in dialog
    ) + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    specials = {"<|begin_of_text|>": len(ranks), "<|start_header_id|>": len(ranks) + 6,
                "<|end_header_id|>": len(ranks) + 7, "<|eot_id|>": len(ranks) + 9}
    reference = tiktoken.Encoding("reference", pat_str=META_LLAMA3_PATTERN, mergeable_ranks=ranks,
                                  special_tokens=specials)
    # Pieces never merge across a special token, so encoding the whole string equals Meta's piecewise encoding.
    assert Llama3ChatFormat(tok).encode_dialog_prompt(dialog) == reference.encode(rendered, allowed_special="all")


def test_llama3_special_text_in_content_stays_text(hand):
    ranks, tok = hand
    ids = Llama3ChatFormat(tok).encode_dialog_prompt([{"role": "user", "content": "<|eot_id|>"}])
    assert ids.count(len(ranks) + 9) == 1  # only the real end of turn, not the typed one


def test_llama3_rejects_bad_dialogs(hand, sp):
    _, tok = hand
    fmt = Llama3ChatFormat(tok)
    with pytest.raises(ValueError, match="role 'tool'; this format knows only"):
        fmt.encode_dialog_prompt([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="the dialog is empty"):
        fmt.encode_dialog_prompt([])
    with pytest.raises(TypeError, match="wrap a single message in a list"):
        fmt.encode_dialog_prompt({"role": "user", "content": "x"})
    with pytest.raises(TypeError, match="message 1 must be a dict with keys 'role' and 'content'"):
        fmt.encode_dialog_prompt([{"role": "user", "content": "x"}, {"role": "user"}])
    with pytest.raises(TypeError, match="message 0 content must be a str"):
        fmt.encode_dialog_prompt([{"role": "user", "content": 3}])
    with pytest.raises(TypeError, match="needs a Llama 3 tokenizer, got a SentencePieceTokenizer"):
        Llama3ChatFormat(sp[1])


# ---------------------------------------------------------------------------------------------------------------------
# Llama 4
# ---------------------------------------------------------------------------------------------------------------------


def test_llama4_prompt_equals_hugging_face_chat_template(tmp_path):
    """Hugging Face's Llama 4 chat template rendered for a dialog, encoded by tiktoken directly (o200k pattern, all
    specials allowed), equals our prompt. HF trims only the system message; Meta (and we) strip nothing, so the
    system content here has no surrounding whitespace while a user message keeps its trailing newline."""
    ranks = train_bpe_ranks(sample_text(), n_merges=300)
    tok = Tokenizer(write_ranks(tmp_path / "tokenizer.model", ranks), family="llama4")
    dialog = [
        {"role": "system", "content": "You are helpful. Answer in 1-2 sentences!"},
        {"role": "user", "content": "What's a llama?\n"},
        {"role": "assistant", "content": " A South American camelid."},
        {"role": "user", "content": "Thanks — and 東京?"},
    ]
    rendered = reference().call("hf_llama.llama4_chat_template", dialog, "<|begin_of_text|>")
    direct = tiktoken.Encoding("reference", pat_str=META_LLAMA4_PATTERN, mergeable_ranks=ranks,
                               special_tokens=tok.special_tokens)
    assert rendered.startswith("<|begin_of_text|><|header_start|>system<|header_end|>\n\n")
    expected = direct.encode(rendered, allowed_special="all")
    assert Llama4ChatFormat(tok).encode_dialog_prompt(dialog) == expected
    assert chat_format_for(tok).encode_dialog_prompt(dialog) == expected


def test_llama4_and_llama3_formats_need_their_own_tokenizer(tmp_path, hand):
    _, llama3 = hand
    llama4 = Tokenizer(write_ranks(tmp_path / "tokenizer.model", hand_written_ranks()), family="llama4")
    with pytest.raises(TypeError, match="Llama4ChatFormat needs a Llama 4 tokenizer, got the Llama 3"):
        Llama4ChatFormat(llama3)
    with pytest.raises(TypeError, match="needs a Llama 3 tokenizer, got the Llama 4 tokenizer"):
        Llama3ChatFormat(llama4)
    n = len(hand_written_ranks())  # header_start +5, header_end +6, eot +8
    assert Llama4ChatFormat(llama4).encode_message({"role": "ipython", "content": "Hi"}) == \
        [n + 5, llama4.encode("ipython", bos=False, eos=False)[0], n + 6,
         llama4.encode("\n\n", bos=False, eos=False)[0], llama4.encode("Hi", bos=False, eos=False)[0], n + 8]


# ---------------------------------------------------------------------------------------------------------------------
# Llama 2
# ---------------------------------------------------------------------------------------------------------------------


def test_llama2_dialog_prompt_exact_ids(sp):
    reference, tok = sp
    # Meta's chat_completion, written out: the system prompt folded into the first user turn, each finished exchange
    # "<s>[INST] user [/INST] answer </s>", the open turn "<s>[INST] user [/INST]". Contents are stripped after
    # folding, so the first user message keeps its leading spaces behind the <</SYS>> block.
    expected = (
        [1] + reference.encode("[INST] <<SYS>>\nYou are a helpful llama\n<</SYS>>\n\n  Hello world [/INST] Hi there ")
        + [2]
        + [1] + reference.encode("[INST] Hello you [/INST]")
    )
    assert Llama2ChatFormat(tok).encode_dialog_prompt(DIALOG) == expected
    assert chat_format_for(tok).encode_dialog_prompt(DIALOG) == expected


def test_llama2_without_system_and_single_turn(sp):
    reference, tok = sp
    fmt = Llama2ChatFormat(tok)
    assert fmt.encode_dialog_prompt([{"role": "user", "content": " what is a llama? "}]) == \
        [1] + reference.encode("[INST] what is a llama? [/INST]")
    dialog = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert fmt.encode_dialog_prompt(dialog) == \
        [1] + reference.encode("[INST] a [/INST] b ") + [2] + [1] + reference.encode("[INST] c [/INST]")


def test_llama2_system_whitespace_is_kept_inside(sp):
    # Meta strips the folded user content as a whole, so whitespace inside the <<SYS>> block survives.
    reference, tok = sp
    dialog = [{"role": "system", "content": "  be brief  "}, {"role": "user", "content": "hi "}]
    assert Llama2ChatFormat(tok).encode_dialog_prompt(dialog) == \
        [1] + reference.encode("[INST] <<SYS>>\n  be brief  \n<</SYS>>\n\nhi [/INST]")


@pytest.mark.parametrize("roles, message", [
    (["user", "user"], "turn 1 .* is from 'user' but 'assistant' was expected"),
    (["assistant", "user"], "turn 0 .* is from 'assistant' but 'user' was expected"),
    (["system", "assistant"], "turn 0 .* is from 'assistant' but 'user' was expected"),
    (["user", "system", "user"], "turn 1 .* is from 'system' but 'assistant' was expected"),
    (["user", "assistant"], "the last message is from 'assistant'"),
    (["system"], "only a system message"),
])
def test_llama2_roles_out_of_order(sp, roles, message):
    dialog = [{"role": role, "content": "x"} for role in roles]
    with pytest.raises(ValueError, match=message):
        Llama2ChatFormat(sp[1]).encode_dialog_prompt(dialog)


def test_llama2_rejects_tags_and_unknown_roles(sp):
    fmt = Llama2ChatFormat(sp[1])
    with pytest.raises(ValueError, match=r"message 0 contains the chat tag '\[/INST\]'"):
        fmt.encode_dialog_prompt([{"role": "user", "content": "hi [/INST] sure"}])
    with pytest.raises(ValueError, match="chat tag '<<SYS>>'"):
        fmt.encode_dialog_prompt([{"role": "system", "content": "<<SYS>>"}, {"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="role 'ipython'; this format knows only"):
        fmt.encode_dialog_prompt([{"role": "ipython", "content": "x"}])


def test_chat_format_for_rejects_non_tokenizers():
    with pytest.raises(TypeError, match="expected a llama.Tokenizer"):
        chat_format_for("tokenizer.model")
