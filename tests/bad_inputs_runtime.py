"""The bad-input catalogue, second half: tokenizers, chat formats, `llama.generate`, `peft` adapters and
post-training (the first half, and the probe's command line, are in tests/bad_inputs.py).
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

import llama
import peft
from llama import ModelArgs, Tokenizer
from llama.chat_format import Llama2ChatFormat, Llama3ChatFormat, Llama4ChatFormat, chat_format_for
from peft.training.dpo import DPOConfig
from peft.training.pairs import Pair, encode_pairs
from peft.training.rejection import sample_responses
from tests.bad_input_probe import (ARGS, NAN, REMOVE, TINY, Case, Workspace, adder, damage, edit_json, edit_tensors,
                                   lora_model, model)
from tests.preference_testing import CharTokenizer
from tests.tokenizer_files import write_ranks

CASES: list[Case] = []
add = adder(CASES)


# =====================================================================================================================
# Tokenizers


def tokenizer_file(kind: str, content, name: str = "tokenizer.model", **kw):
    """Tokenizer(...) on a copy of a pristine tokenizer whose file is replaced by `content(original bytes)`."""
    def run(ws: Workspace):
        folder = ws.copy(kind)
        path = folder / ("tokenizer.json" if kind == "hub" else name)
        path.write_bytes(content(path.read_bytes()))
        Tokenizer(path, **kw)
    return run


def extra_ranks_line(line: str):
    return lambda data: data + line.encode()


def ranks_without_every_byte(ws: Workspace):
    Tokenizer(write_ranks(ws.tmp / "partial.model", {bytes([b]): b for b in range(200)}))


def tokenizer_call(kind: str, call):
    return lambda ws: call(Tokenizer(ws.copy(kind)))


for name, run, error, words in [
    ("no such file", lambda ws: Tokenizer(ws.tmp / "nope.model"), FileNotFoundError, ["does not exist"]),
    ("folder without a tokenizer", lambda ws: Tokenizer(ws.tmp), FileNotFoundError,
     ["no tokenizer.model or tokenizer.json in folder"]),
    ("path 5", lambda ws: Tokenizer(5), TypeError, ["needs a file or folder path"]),
    ("empty file", tokenizer_file("sp", lambda d: b""), ValueError, ["is empty", "re-download"]),
    ("truncated sentencepiece", tokenizer_file("sp", lambda d: d[: len(d) // 2]), ValueError,
     ["truncated or corrupt", "re-download"]),
    ("random bytes", tokenizer_file("sp", lambda d: os.urandom(500)), ValueError, ["truncated or corrupt"]),
    ("ranks line cut", tokenizer_file("bpe", extra_ranks_line("QUJD\n")), ValueError,
     ["expected '<base64 token> <rank>'"]),
    ("ranks bad base64", tokenizer_file("bpe", extra_ranks_line("@@@@ 99999\n")), ValueError, ["not valid base64"]),
    ("ranks duplicate token", tokenizer_file("bpe", lambda d: d + d.splitlines(keepends=True)[0].split(b" ")[0]
                                              + b" 99999\n"), ValueError, ["appears twice"]),
    ("ranks with a gap", tokenizer_file("bpe", extra_ranks_line("bmV3IHRva2Vu 99999\n")), ValueError,
     ["not the consecutive integers"]),
    ("ranks non-ASCII", tokenizer_file("bpe", lambda d: d + "éé 3\n".encode()), ValueError, ["non-ASCII"]),
    ("ranks without every byte", ranks_without_every_byte, ValueError, ["56 of the 256 single bytes have no rank"]),
    ("family 'llama5'", tokenizer_file("bpe", lambda d: d, family="llama5"), ValueError,
     ["unknown tokenizer family 'llama5'"]),
    ("family on a sentencepiece file", tokenizer_file("sp", lambda d: d, family="llama3"), ValueError,
     ["is a SentencePiece model", "drop family="]),
    ("tokenizer.json garbage", tokenizer_file("hub", lambda d: b"{" + os.urandom(100)), ValueError,
     ["is not a valid Hugging Face tokenizer.json", "re-download"]),
    ("tokenizer.json truncated", tokenizer_file("hub", lambda d: d[: len(d) // 2]), ValueError,
     ["is not a valid Hugging Face tokenizer.json"]),
    ("tokenizer.json family 'llama9'", tokenizer_file("hub", lambda d: d, family="llama9"), ValueError,
     ["unknown tokenizer family 'llama9'"]),
    ("encode bytes", tokenizer_call("bpe", lambda t: t.encode(b"x", bos=False, eos=False)), TypeError,
     ["encode expects a str", "decode bytes first"]),
    ("encode None (sentencepiece)", tokenizer_call("sp", lambda t: t.encode(None, bos=False, eos=False)), TypeError,
     ["encode expects a str"]),
    ("encode 5 (tokenizer.json)", tokenizer_call("hub", lambda t: t.encode(5, bos=False, eos=False)), TypeError,
     ["encode expects a str"]),
    ("decode a string", tokenizer_call("bpe", lambda t: t.decode("abc")), TypeError,
     ["decode expects a sequence of token ids"]),
    ("decode 1.5", tokenizer_call("sp", lambda t: t.decode([1.5])), TypeError, ["integer token ids"]),
    ("decode -1", tokenizer_call("bpe", lambda t: t.decode([3, -1])), ValueError,
     ["token id -1 at position 1 is outside"]),
    ("decode n_words", tokenizer_call("hub", lambda t: t.decode([t.n_words])), ValueError,
     [" is outside this tokenizer's vocabulary"]),
    ("allowed_special a string", tokenizer_call("bpe", lambda t: t.encode("x", bos=False, eos=False,
                                                                          allowed_special="<|eot_id|>")),
     TypeError, ["allowed_special must be 'all' or a collection", "allowed_special={'<|eot_id|>'}"]),
    ("allowed_special unknown", tokenizer_call("bpe", lambda t: t.encode("x", bos=False, eos=False,
                                                                         allowed_special={"<|im_end|>"})),
     ValueError, ["not Llama 3 special tokens"]),
    ("disallowed special in text", tokenizer_call("bpe", lambda t: t.encode("a<|eot_id|>", bos=False, eos=False,
                                                                            disallowed_special="all")),
     ValueError, ["'<|eot_id|>', a special token listed in disallowed_special"]),
    ("special arguments to sentencepiece", tokenizer_call("sp", lambda t: t.encode("x", bos=False, eos=False,
                                                                                   allowed_special="all")),
     ValueError, ["SentencePiece tokenizer has no special tokens inside text"]),
    ("infilling without infilling pieces", tokenizer_call("sp", lambda t: t.infilling_prompt("a", "b")), ValueError,
     ["no infilling pieces", "Code Llama"]),
    ("encode_infilling 5", tokenizer_call("sp", lambda t: t.encode_infilling(5)), TypeError,
     ["encode_infilling expects a str"]),
]:
    add("Tokenizer", name, run, error, *words)


def bad_tokenizer_config(ws: Workspace):
    folder = ws.copy("hub")
    (folder / "tokenizer_config.json").write_text('{"eos_token": ')
    Tokenizer(folder)


add("Tokenizer", "tokenizer_config.json cut", bad_tokenizer_config, ValueError,
    "tokenizer_config.json is not valid JSON")


# =====================================================================================================================
# Chat formats and generation


def chat(kind: str, dialog, fmt=None):
    def run(ws: Workspace):
        tok = Tokenizer(ws.copy(kind))
        (fmt or chat_format_for)(tok).encode_dialog_prompt(dialog)
    return run


USER = {"role": "user", "content": "hi"}
for name, run, error, words in [
    ("dialog a string", chat("bpe", "hi"), TypeError, ["a dialog is a list of", "wrap a single message in a list"]),
    ("dialog a dict", chat("sp", USER), TypeError, ["a dialog is a list of"]),
    ("empty dialog", chat("bpe", []), ValueError, ["the dialog is empty"]),
    ("message a string", chat("bpe", ["hi"]), TypeError, ["message 0 must be a dict with keys 'role' and 'content'"]),
    ("message without content", chat("sp", [{"role": "user"}]), TypeError,
     ["message 0 must be a dict with keys 'role' and 'content'"]),
    ("content an int", chat("bpe", [{"role": "user", "content": 3}]), TypeError, ["message 0 content must be a str"]),
    ("unknown role", chat("bpe", [{"role": "bot", "content": "x"}]), ValueError, ["message 0 has role 'bot'"]),
    ("Llama 2 tag in content", chat("sp", [{"role": "user", "content": "a [INST] b"}]), ValueError,
     ["contains the chat tag '[INST]'", "forge"]),
    ("Llama 2 system only", chat("sp", [{"role": "system", "content": "x"}]), ValueError,
     ["holds only a system message"]),
    ("Llama 2 assistant first", chat("sp", [{"role": "assistant", "content": "x"}, USER]), ValueError,
     ["turn 0", "is from 'assistant' but 'user' was expected"]),
    ("Llama 2 ends with assistant", chat("sp", [USER, {"role": "assistant", "content": "x"}]), ValueError,
     ["the last message is from 'assistant'"]),
    ("Llama 3 format, sentencepiece tokenizer", chat("sp", [USER], Llama3ChatFormat), TypeError,
     ["needs a Llama 3 tokenizer, got a SentencePieceTokenizer"]),
    ("Llama 4 format, Llama 3 tokenizer", chat("bpe", [USER], Llama4ChatFormat), TypeError,
     ["Llama4ChatFormat needs a Llama 4 tokenizer, got the Llama 3 tokenizer"]),
    ("Llama 2 closing tag in content", chat("bpe", [USER, {"role": "assistant", "content": "y"},
                                                   {"role": "user", "content": "[/INST]"}], Llama2ChatFormat),
     ValueError, ["contains the chat tag '[/INST]'"]),
]:
    add("chat formats", name, run, error, *words)
add("chat formats", "not a tokenizer", lambda ws: chat_format_for(5), TypeError, "expected a llama.Tokenizer")


def generating(prompts, **kw):
    return lambda ws: llama.generate(model(), prompts, **{"max_new_tokens": 4, **kw})


for name, run, error, words in [
    ("max_new_tokens -3", generating([[1]], max_new_tokens=-3), ValueError,
     ["max_new_tokens must be a non-negative integer, got -3"]),
    ("max_new_tokens '5'", generating([[1]], max_new_tokens="5"), ValueError, ["max_new_tokens", "'5'"]),
    ("prompts a tensor", generating(torch.tensor([[1, 2]])), TypeError, ["prompts must be a list of token-id lists"]),
    ("no prompts", generating([]), ValueError, ["prompts is empty"]),
    ("empty prompt", generating([[1], []]), ValueError, ["prompt 1 is empty"]),
    ("float token id", generating([[1.5]]), TypeError, ["prompt 0 must contain Python ints only"]),
    ("token id past the vocabulary", generating([[999]]), ValueError, ["prompt 0 has token id 999 outside [0, 256)"]),
    ("prompt longer than the context", generating([[1] * 250], max_new_tokens=20), ValueError,
     ["prompt 0 (250 tokens) + max_new_tokens (20)"]),
    ("temperature -1", generating([[1]], temperature=-1.0), ValueError, ["temperature must be a finite number >= 0"]),
    ("temperature NaN", generating([[1]], temperature=NAN), ValueError, ["temperature must be a finite number"]),
    ("top_p 0", generating([[1]], temperature=1.0, top_p=0.0), ValueError, ["top_p must be in (0, 1]"]),
    ("top_p 1.5", generating([[1]], temperature=1.0, top_p=1.5), ValueError, ["top_p must be in (0, 1]"]),
    ("seed and generator", generating([[1]], seed=1, generator=torch.Generator()), ValueError,
     ["give either seed or generator"]),
]:
    add("llama.generate", name, run, error, *words)


# =====================================================================================================================
# peft.load_adapter / peft.save_adapter: everything read and checked before the model changes


def loading_adapter(edit=None, target=lambda: model()):
    def run(ws: Workspace):
        folder = ws.copy("adapter")
        if edit is not None:
            edit(folder)
        peft.load_adapter(ws.watch_model(target()), folder)
    return run


def adapter_json(**changes):
    return lambda folder: edit_json(folder / "adapter.json", changes)


def adapter_config(**changes):
    def edit(folder):
        meta = json.loads((folder / "adapter.json").read_text())
        meta["config"].update(changes)
        (folder / "adapter.json").write_text(json.dumps(meta))
    return edit


def adapter_tensors(edit):
    return lambda folder: edit_tensors(folder / "adapter.safetensors", edit)


def renamed_in_both(folder):
    """Both files agree, but on names the config does not attach: found only after attaching (then undone)."""
    tensors = load_file(str(folder / "adapter.safetensors"))
    meta = json.loads((folder / "adapter.json").read_text())
    old = next(iter(tensors))
    new = old.replace("layers.0.", "layers.7.")
    tensors[new] = tensors.pop(old)
    meta["parameters"][new] = meta["parameters"].pop(old)
    save_file(tensors, str(folder / "adapter.safetensors"))
    (folder / "adapter.json").write_text(json.dumps(meta))


def first_tensor(edit):
    def apply(t):
        key = next(iter(t))
        t[key] = edit(t[key])
    return apply


def merged_lora_model():
    return peft.merge(lora_model())


for name, run, error, words in [
    ("no such folder", lambda ws: peft.load_adapter(ws.watch_model(model()), ws.tmp / "nowhere"), FileNotFoundError,
     ["has no adapter.json and adapter.safetensors", "peft.save_adapter"]),
    ("adapter.json missing", loading_adapter(lambda f: (f / "adapter.json").unlink()), FileNotFoundError,
     ["has no adapter.json"]),
    ("adapter.json cut", loading_adapter(lambda f: (f / "adapter.json").write_text('{"format_version": 1,')),
     ValueError, ["adapter.json is not valid JSON", "save the adapter again"]),
    ("adapter.json a list", loading_adapter(lambda f: (f / "adapter.json").write_text("[1]")), ValueError,
     ["unsupported adapter format_version None"]),
    ("format_version 2", loading_adapter(adapter_json(format_version=2)), ValueError,
     ["unsupported adapter format_version 2"]),
    ("no config", loading_adapter(adapter_json(config=REMOVE)), ValueError, ["has no 'config' object"]),
    ("unknown method", loading_adapter(adapter_config(method="lora2")), ValueError,
     ["its 'config' is not a valid adapter config", "unknown PEFT method 'lora2'"]),
    ("rank -1", loading_adapter(adapter_config(r=-1)), ValueError,
     ["its 'config' is not a valid adapter config", "r must be a positive integer"]),
    ("unknown config field", loading_adapter(adapter_config(rank=4)), ValueError,
     ["its 'config' is not a valid adapter config", "rank"]),
    ("other base model", loading_adapter(target=lambda: llama.Transformer(ModelArgs(**{**TINY, "n_kv_heads": 2,
                                                                                         "n_layers": 3}))),
     ValueError, ["trained on a model of a different shape", "n_layers saved 2 vs model 3"]),
    ("tensor missing", loading_adapter(adapter_tensors(lambda t: t.pop(next(iter(t))))), ValueError,
     ["disagree on the adapter's tensors", "save the adapter again"]),
    ("extra tensor", loading_adapter(adapter_tensors(lambda t: t.update({"layers.0.extra": torch.zeros(2)}))),
     ValueError, ["disagree on the adapter's tensors", "layers.0.extra"]),
    ("mis-shaped tensor", loading_adapter(adapter_tensors(first_tensor(lambda w: w[:1]))), ValueError,
     ["disagree on the adapter's tensors"]),
    ("safetensors garbage", loading_adapter(lambda f: damage(f / "adapter.safetensors", "garbage")), ValueError,
     ["adapter.safetensors: the safetensors file is corrupt or truncated"]),
    ("safetensors truncated", loading_adapter(lambda f: damage(f / "adapter.safetensors", "truncated")), ValueError,
     ["adapter.safetensors: the safetensors file is corrupt or truncated"]),
    ("NaN weight", loading_adapter(adapter_tensors(first_tensor(lambda w: w.index_fill(0, torch.tensor([0]),
                                                                                        NAN)))),
     ValueError, ["holds nan at [0, 0]", "diverged"]),
    ("integer weight", loading_adapter(adapter_tensors(first_tensor(lambda w: w.long()))), ValueError,
     ["torch.int64; adapter weights are floating point"]),
    ("names the config does not attach", loading_adapter(renamed_in_both), ValueError,
     ["does not match the adapter this config attaches", "layers.7."]),
    ("other method attached",
     loading_adapter(target=lambda: peft.apply(model(), peft.AdapterV1Config(adapter_layers=1))),
     ValueError, ["is lora but the model carries adapter_v1"]),
    ("other config attached", loading_adapter(target=lambda: peft.apply(model(), peft.LoraConfig(r=4))),
     ValueError, ["differs from the attached one", "load it onto a fresh model"]),
    ("merged adapter attached", loading_adapter(target=merged_lora_model), ValueError,
     ["is merged; call peft.unmerge(model)"]),
    ("not a Transformer", lambda ws: peft.load_adapter(torch.nn.Linear(2, 2), ws.copy("adapter")), TypeError,
     ["expected a llama.Transformer"]),
    ("path 5", lambda ws: peft.load_adapter(ws.watch_model(model()), 5), TypeError, ["needs a folder path"]),
    ("save without an adapter", lambda ws: peft.save_adapter(model(), ws.watch_folder(ws.tmp / "a")), ValueError,
     ["no adapter is attached", "peft.apply"]),
    ("save into a file", lambda ws: peft.save_adapter(lora_model(), ws.watch_folder(ws.copy("adapter") /
                                                                                    "adapter.json")),
     ValueError, ["is a file; pass a folder path"]),
    ("save to path 5", lambda ws: peft.save_adapter(lora_model(), 5), TypeError, ["needs a folder path"]),
]:
    add("peft adapters", name, run, error, *words)


# =====================================================================================================================
# Post-training: preference losses, pairs, rejection sampling, the adapter-free reference


def logps(n: int = 3) -> torch.Tensor:
    return torch.zeros(n)


def pairs(*bad: Pair):
    return lambda ws: encode_pairs([Pair("Sort: 21\nAnswer:", "12", "21"), *bad], CharTokenizer(), 48)


def merged_policy():
    m = lora_model()
    peft.merge(m)
    return m


def reference_of(m):
    def run(ws: Workspace):
        with peft.disable_adapters(ws.watch_model(m)):
            pass
    return run


for name, run, error, words in [
    ("DPO beta 0", lambda ws: peft.dpo_loss(logps(), logps(), logps(), logps(), beta=0.0), ValueError,
     ["beta must be a finite number > 0"]),
    ("DPO beta NaN", lambda ws: peft.dpo_loss(logps(), logps(), logps(), logps(), beta=NAN), ValueError,
     ["beta must be a finite number > 0"]),
    ("DPO unknown loss", lambda ws: peft.dpo_loss(logps(), logps(), logps(), logps(), loss_type="kto"), ValueError,
     ["unknown DPO loss_type", "sigmoid"]),
    ("DPO smoothing 0.5", lambda ws: peft.dpo_loss(logps(), logps(), logps(), logps(), label_smoothing=0.5),
     ValueError, ["label_smoothing must be in [0, 0.5)"]),
    ("DPO shapes differ", lambda ws: peft.dpo_loss(logps(3), logps(2), logps(3), logps(3)), ValueError,
     ["must all be [B]"]),
    ("DPOConfig reference", lambda ws: DPOConfig(reference="copy"), ValueError, ["unknown reference", "precomputed"]),
    ("reward loss shapes", lambda ws: peft.reward_loss(logps(3), logps(2)), ValueError, ["must both be [B]"]),
    ("rating outside the table", pairs(Pair("Sort: 31\nAnswer:", "13", "31", rating="much better")), ValueError,
     ["not in Llama 2's table", "significantly better"]),
    ("chosen identical to rejected", pairs(Pair("Sort: 31\nAnswer:", "13", "13")), ValueError,
     ["chosen and rejected are the same response", "drop it"]),
    ("empty response", pairs(Pair("Sort: 31\nAnswer:", "13", " ")), ValueError,
     ["the rejected response is empty"]),
    ("pair longer than the context", pairs(Pair("Sort: " + "9" * 50 + "\nAnswer:", "1", "2")), ValueError,
     ["longer than the context of"]),
    ("K = 0", lambda ws: sample_responses(model(), CharTokenizer(), ["Sort: 1\nAnswer:"], 0, 4), ValueError,
     ["K (samples per prompt) must be an integer >= 1"]),
    ("prompt longer than the context",
     lambda ws: sample_responses(model(), CharTokenizer(), ["Sort: " + "9" * ARGS.max_seq_len + "\nAnswer:"], 2, 4),
     ValueError, [f"exceeds the model context of {ARGS.max_seq_len}", "shorten the prompts"]),
    ("reference without an adapter", reference_of(model()), ValueError,
     ["needs a model with an adapter", "precompute"]),
    ("reference of a merged adapter", reference_of(merged_policy()), ValueError,
     ["adapter is merged", "peft.unmerge"]),
]:
    add("post-training", name, run, error, *words)
