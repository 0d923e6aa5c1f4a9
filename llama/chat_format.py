"""Chat prompt formats: how a dialog becomes the token ids an instruction-tuned LLaMA was trained on.

A dialog is a list of messages `{"role": ..., "content": ...}`. Three formats exist:

* Llama 2 chat (Llama 2 paper §3, Meta `llama/generation.py::chat_completion`; Code Llama Instruct 7B-34B too).
  Each user turn is wrapped in `[INST] ... [/INST]`; an optional system prompt is folded into the first user turn
  between `<<SYS>>\\n` and `\\n<</SYS>>\\n\\n`. Every finished (user, assistant) exchange is its own sequence
  `<s>[INST] {user} [/INST] {assistant} </s>`; the final user turn is `<s>[INST] {user} [/INST]` with no eos, and the
  model continues from there. The tags are plain text, not special tokens.
* Llama 3 chat (Meta `llama3` / `llama-models` `ChatFormat`; Llama 3, 3.1, 3.2, 3.3 Instruct).
  `<|begin_of_text|>`, then per message `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`, then
  an open assistant header `<|start_header_id|>assistant<|end_header_id|>\\n\\n` for the model to complete. The
  markers are single special tokens.
* Llama 4 chat (Meta `llama-models` `models/llama4/chat_format.py`; Llama 4 Scout / Maverick Instruct). The same
  layout with Llama 4's markers: `<|header_start|>{role}<|header_end|>\\n\\n{content}<|eot|>`, a tool's output
  under the role "ipython"; unlike Llama 3, Meta does not strip the content.

Not covered: Code Llama 70B Instruct's "Source: ... <step>" format, tool-call bodies (a tool result is just a
message with role "ipython"; an assistant turn that ends in a tool call would end with eom), images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

from .tokenizer import TIKTOKEN_FAMILIES, Tokenizer

__all__ = ["Message", "Dialog", "Llama2ChatFormat", "Llama3ChatFormat", "Llama4ChatFormat", "chat_format_for"]


class Message(TypedDict):
    role: str  # "system" | "user" | "assistant" (Llama 3 and 4 also "ipython": a tool's output)
    content: str


Dialog = Sequence[Message]


def _check_messages(dialog: Dialog, roles: Sequence[str]) -> None:
    if isinstance(dialog, (str, dict)) or not isinstance(dialog, Sequence):
        raise TypeError(f"a dialog is a list of {{'role': ..., 'content': ...}} dicts, got {type(dialog).__name__}; "
                        "wrap a single message in a list")
    if len(dialog) == 0:
        raise ValueError("the dialog is empty; add at least one {'role': 'user', 'content': ...} message")
    for i, message in enumerate(dialog):
        if not isinstance(message, dict) or not {"role", "content"} <= message.keys():
            raise TypeError(f"message {i} must be a dict with keys 'role' and 'content', got {message!r:.80}")
        if message["role"] not in roles:
            raise ValueError(f"message {i} has role {message['role']!r}; this format knows only {list(roles)}")
        if not isinstance(message["content"], str):
            raise TypeError(f"message {i} content must be a str, got {type(message['content']).__name__}")


class Llama2ChatFormat:
    """`[INST]` / `<<SYS>>` prompts for Llama 2 chat and Code Llama Instruct (any tokenizer with bos and eos)."""

    B_INST, E_INST = "[INST]", "[/INST]"
    B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
    # Meta refuses to answer when a message contains these tags (they would let a user forge turns); we raise.
    SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def encode_dialog_prompt(self, dialog: Dialog) -> list[int]:
        """Dialog ending with a user message -> prompt ids; the model's reply follows the last `[/INST]`."""
        _check_messages(dialog, ("system", "user", "assistant"))
        for i, message in enumerate(dialog):
            for tag in self.SPECIAL_TAGS:
                if tag in message["content"]:
                    raise ValueError(f"message {i} contains the chat tag {tag!r}, which would forge a turn "
                                     "boundary; remove it from the content")
        turns = [dict(m) for m in dialog]
        # The system prompt is not a turn of its own: it is prepended to the first user message.
        if turns[0]["role"] == "system":
            if len(turns) < 2:
                raise ValueError("the dialog holds only a system message; add the user message that follows it")
            system, first = turns[0], turns[1]
            turns = [{"role": first["role"],
                      "content": self.B_SYS + system["content"] + self.E_SYS + first["content"]}] + turns[2:]
        for i, message in enumerate(turns):
            expected = "user" if i % 2 == 0 else "assistant"
            if message["role"] != expected:
                raise ValueError(f"turn {i} (after folding the system prompt) is from {message['role']!r} but "
                                 f"{expected!r} was expected; Llama 2 chat needs an optional 'system' first, then "
                                 "'user' and 'assistant' alternating, ending with 'user'")
        if turns[-1]["role"] != "user":
            raise ValueError("the last message is from 'assistant'; end the dialog with the 'user' message the "
                             "model should answer")

        tokens: list[int] = []
        # Each finished exchange: "<s>[INST] {user} [/INST] {answer} </s>" (contents stripped, spaces as Meta).
        for user, answer in zip(turns[:-1:2], turns[1::2]):
            text = f"{self.B_INST} {user['content'].strip()} {self.E_INST} {answer['content'].strip()} "
            tokens += self.tokenizer.encode(text, bos=True, eos=True)
        # The open turn: "<s>[INST] {user} [/INST]", no eos.
        text = f"{self.B_INST} {turns[-1]['content'].strip()} {self.E_INST}"
        tokens += self.tokenizer.encode(text, bos=True, eos=False)
        return tokens


class Llama3ChatFormat:
    """Header / `<|eot_id|>` prompts for Llama 3, 3.1, 3.2 and 3.3 Instruct (needs a Llama 3 tokenizer: Meta's
    tiktoken file or a hub folder's tokenizer.json)."""

    ROLES = ("system", "user", "assistant", "ipython")
    FAMILY = "llama3"
    HEADER_START, HEADER_END, END_OF_TURN = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
    STRIP_CONTENT = True   # Meta's llama3 and the Hugging Face template strip each message

    def __init__(self, tokenizer: Tokenizer):
        family = getattr(tokenizer, "family", None)
        if not isinstance(tokenizer, Tokenizer) or family != self.FAMILY:
            title = TIKTOKEN_FAMILIES[self.FAMILY].title
            got = (f"the {TIKTOKEN_FAMILIES[family].title} tokenizer" if family in TIKTOKEN_FAMILIES
                   else f"a {type(tokenizer).__name__}")
            raise TypeError(f"{type(self).__name__} needs a {title} tokenizer, got {got}; use "
                            "chat_format_for(tokenizer) for the format that matches a tokenizer")
        self.tokenizer = tokenizer
        self.special = tokenizer.special_tokens

    def encode_header(self, role: str) -> list[int]:
        """`{HEADER_START}{role}{HEADER_END}\\n\\n`; the role name and "\\n\\n" are ordinary text."""
        return ([self.special[self.HEADER_START]]
                + self.tokenizer.encode(role, bos=False, eos=False)
                + [self.special[self.HEADER_END]]
                + self.tokenizer.encode("\n\n", bos=False, eos=False))

    def encode_message(self, message: Message) -> list[int]:
        """Header, content (stripped for Llama 3, as is for Llama 4), end-of-turn token."""
        _check_messages([message], self.ROLES)
        content = message["content"].strip() if self.STRIP_CONTENT else message["content"]
        return (self.encode_header(message["role"])
                + self.tokenizer.encode(content, bos=False, eos=False)
                + [self.special[self.END_OF_TURN]])

    def encode_dialog_prompt(self, dialog: Dialog) -> list[int]:
        """`<|begin_of_text|>`, every message, then the open assistant header the model completes.

        Like Meta's, this imposes no order on the roles (several system messages or tool outputs are allowed).
        """
        _check_messages(dialog, self.ROLES)
        tokens = [self.special["<|begin_of_text|>"]]
        for message in dialog:
            tokens += self.encode_message(message)
        return tokens + self.encode_header("assistant")


class Llama4ChatFormat(Llama3ChatFormat):
    """Header / `<|eot|>` prompts for Llama 4 Instruct (needs the Llama 4 tokenizer): Llama 3's layout with
    Llama 4's marker tokens, and the content kept as it is (Meta's llama4 `ChatFormat` does not strip it)."""

    FAMILY = "llama4"
    HEADER_START, HEADER_END, END_OF_TURN = "<|header_start|>", "<|header_end|>", "<|eot|>"
    STRIP_CONTENT = False


def chat_format_for(tokenizer: Tokenizer) -> Llama2ChatFormat | Llama3ChatFormat | Llama4ChatFormat:
    """The chat format that matches a tokenizer's family: Llama 2 (SentencePiece), Llama 3 or Llama 4."""
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"expected a llama.Tokenizer, got {type(tokenizer).__name__}; load one with Tokenizer(path)")
    formats = {"llama2": Llama2ChatFormat, "llama3": Llama3ChatFormat, "llama4": Llama4ChatFormat}
    if tokenizer.family not in formats:
        raise ValueError(f"{tokenizer.path} is not recognised as a Llama 2, 3 or 4 tokenizer (none of </s>, "
                         f"<|eot_id|>, <|eot|> in its vocabulary), so no chat format matches it; pass family= to "
                         f"Tokenizer")
    return formats[tokenizer.family](tokenizer)
