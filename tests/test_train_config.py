"""Configs (TOML + --section.key=value), the scripts/train.py and scripts/generate.py entry points, user data through
a config, and generation with an adapter attached vs merged."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llama

from peft.training import data as D
from peft.training.config import build_config, load_config, parse_value, to_toml
from peft.training.recipe import load_run, run

REPO = Path(__file__).resolve().parents[1]


def script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    docs = [e.prompt + " " + e.response for e in D.task_examples("mix", 400)]
    return str(D.builtin_tokenizer(tmp_path_factory.mktemp("tok"), 400, documents=docs).path)


def tiny(out_dir, tokenizer_path, *extra):
    return [f"--train.out_dir={out_dir}", f"--data.tokenizer={tokenizer_path}", "--data.n_train=64",
            "--data.n_eval=4", "--data.seq_len=48", "--eval.n_generate=4", "--model.dim=32", "--model.n_layers=2",
            "--model.max_seq_len=48", "--train.steps=3", "--train.batch_size=4", "--train.micro_batch_size=4",
            "--train.progress=false", *extra]


# ---------------------------------------------------------------------------------------------------------------------
# parsing


def test_file_plus_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[model]\npreset = "tiny-llama-3"\n[method]\nname = "lora"\nr = 4\n[train]\nlr = 1e-3\nsteps = 7\n')
    cfg = load_config(str(f), ["--train.lr=3e-4", "--method.target_modules=['wq', 'wk']", "--data.path=/x/y.jsonl",
                               "--data.pack=false", "--data.source=jsonl"])
    assert cfg.model.preset == "tiny-llama-3" and cfg.train.steps == 7 and cfg.train.lr == 3e-4
    assert cfg.method == {"name": "lora", "r": 4, "target_modules": ["wq", "wk"]}
    assert cfg.data.path == "/x/y.jsonl" and cfg.data.pack is False
    text = to_toml(cfg)
    assert "[train]\n" in text and "lr = 0.0003" in text and 'preset = "tiny-llama-3"' in text
    assert parse_value("1e-3") == 1e-3 and parse_value("true") is True and parse_value("runs/a b") == "runs/a b"


def test_every_shipped_config_parses():
    for f in sorted((REPO / "configs").glob("*.toml")):
        cfg = load_config(str(f))
        assert cfg.method["name"] in f.stem or f.stem.startswith("pretrain"), f


@pytest.mark.parametrize("overrides, match", [
    (["--trian.lr=1"], r"unknown config section 'trian'; did you mean 'train'\?"),
    (["--train.learning_rate=1"], r"unknown config key in \[train\] 'learning_rate'"),
    (["--train.lr"], r"--train.lr needs a value"),
    (["--lr=1"], r"overrides look like --section.key=value or --section.key value"),
    (["--train.steps=ten"], r"train.steps must be an integer, got the string 'ten'"),
    (["--train.steps=2.5"], r"train.steps must be an integer, got 2.5"),
    (["--train.lr=fast"], r"train.lr must be a number, got the string 'fast'"),
    (["--train.lr=nan"], r"train.lr must be a finite number"),
    (["--data.pack=yes"], r"data.pack must be true or false, got the string 'yes'"),
    (["--data.eval_fraction=inf"], r"data.eval_fraction must be a finite number"),
    (["--data.source=csv"], r"unknown data.source 'csv'"),
    (["--model.device=gpu"], r"model.device='gpu' is not a torch device name; use 'cuda'"),
    (["--model.dim=-8"], r"model.dim must be a positive integer"),
    (["--eval.max_new_tokens=-3"], r"eval.max_new_tokens must be a positive integer"),
    (["--train.micro_batch_size=0"], r"train.micro_batch_size must be a positive integer"),
    (["--method.name=lora", "--method.r=four"], r"method.r must be an integer, got the string 'four'"),
    (["--method.name=prefix"], r"unknown method 'prefix'"),
    (["--method.name=lora", "--method.rank=4"], r"unknown option of method 'lora' 'rank' \(valid: .*, r, "),
    (["--method.name=lora", "--method.alpah=4"], r"unknown option of method 'lora' 'alpah'; did you mean 'alpha'\?"),
    (["--method.name=full", "--method.r=4"], r"method 'full' takes no options"),
    (["--method.name=qlora", "--method.quantize_base=false"], r"drop quantize_base=false"),
    (["--method.name=lora", "--method.r=0"], r"LoRA rank r must be a positive integer"),
    (["--train.precision=fp8"], r"train.precision must be one of"),
])
def test_bad_config_is_rejected(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, overrides)


def test_bad_config_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(str(tmp_path / "nope.toml"))
    (tmp_path / "bad.toml").write_text("[train\nlr = 1")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(str(tmp_path / "bad.toml"))
    with pytest.raises(ValueError, match=r"\[train\] must be a table"):
        build_config({"train": 3})


def test_printed_config_is_toml_that_reads_back_to_the_same_config(tmp_path):
    for f in sorted((REPO / "configs").glob("*.toml")):
        cfg = load_config(str(f), ["--method.r=4"] if "lora" in f.stem else [])
        text = to_toml(cfg)
        assert "null" not in text and "None" not in text
        (tmp_path / "again.toml").write_text(text)
        assert load_config(str(tmp_path / "again.toml")) == cfg, f
    # a run record in JSON (null: the default) is read as well
    (tmp_path / "run.json").write_text(json.dumps(cfg.to_dict()))
    assert load_config(str(tmp_path / "run.json")) == cfg


def test_overrides_with_a_space_and_string_fields_as_typed():
    cfg = load_config(None, ["--train.lr", "3e-4", "--data.path", "2024", "--train.steps=7", "--data.pack", "false",
                             "--method.name", "lora", "--method.target_modules", "['wq', 'wv']", "--train.min_lr_ratio",
                             "0"])
    assert cfg.train.lr == 3e-4 and cfg.train.steps == 7 and cfg.data.pack is False
    assert cfg.data.path == "2024"  # a string field keeps the text: a path, not the integer 2024
    assert cfg.method == {"name": "lora", "target_modules": ["wq", "wv"]} and cfg.train.min_lr_ratio == 0.0
    assert isinstance(load_config(None, ["--train.lr=1"]).train.lr, float)  # an integer where a float goes


def test_numbers_written_as_strings_in_a_file_name_the_field(tmp_path):
    (tmp_path / "c.toml").write_text('[train]\nlr = "1e-3"\n')
    with pytest.raises(ValueError, match=r"train.lr must be a number, got the string '1e-3'; write it without quotes"):
        load_config(str(tmp_path / "c.toml"))
    (tmp_path / "c.toml").write_text('[method]\nname = "lora"\nr = "8"\n')
    with pytest.raises(ValueError, match=r"method.r must be an integer, got the string '8'; write it without quotes"):
        load_config(str(tmp_path / "c.toml"))


def test_train_script_flags_are_names_for_config_keys(capsys):
    train_script = script("train")
    config = str(REPO / "configs" / "sft_lora.toml")
    assert train_script.main(["--config", config, "--train.lr", "5e-4", "--seed", "7", "--no-progress", "--out",
                              "elsewhere", "--dry-run"]) == {}
    printed = capsys.readouterr().out
    cfg = _toml_loads(printed)
    assert cfg["train"]["lr"] == 5e-4 and cfg["train"]["seed"] == 7 and cfg["train"]["progress"] is False
    assert cfg["train"]["out_dir"] == "elsewhere" and cfg["method"]["name"] == "lora"
    with pytest.raises(ValueError, match="--seed and --train.seed name the same setting"):
        train_script.main(["--config", config, "--seed", "1", "--train.seed", "2", "--dry-run"])
    with pytest.raises(ValueError, match="unknown config key in \\[data\\] 'pth'"):
        train_script.main(["--config", config, "--data.pth=x", "--dry-run"])
    with pytest.raises(ValueError, match="no config: pass --config FILE"):
        train_script.main([])


def _toml_loads(text):
    import tomllib
    return tomllib.loads(text)


def test_train_script_user_errors_are_one_line_and_exit_2():
    """As a user sees it (a process of its own: run_cli); the messages themselves are tested in-process above."""
    argv = [sys.executable, str(REPO / "scripts" / "train.py"), "--config", "configs/sft_lora.toml", "--trian.lr", "1",
            "--dry-run"]
    message = "error: unknown config section 'trian'; did you mean 'train'?"
    done = subprocess.run(argv, capture_output=True, text=True, cwd=str(REPO), timeout=120)
    assert done.returncode == 2 and done.stderr.startswith(message) and done.stderr.count("\n") == 1, done.stderr
    debug = subprocess.run(argv + ["--debug"], capture_output=True, text=True, cwd=str(REPO), timeout=120)
    assert debug.returncode == 2 and "Traceback" in debug.stderr and message in debug.stderr


def test_config_toml_reproduces_the_run(tmp_path, tokenizer_path):
    train_script = script("train")
    shrunk = tiny(tmp_path / "a", tokenizer_path, "--model.checkpoint=", "--method.r=2")[1:]  # without out_dir
    first = train_script.main(["--config", str(REPO / "configs" / "sft_lora.toml"), *shrunk, "--out",
                               str(tmp_path / "a")])
    again = train_script.main(["--config", str(tmp_path / "a" / "config.toml"), "--out", str(tmp_path / "b")])
    assert [json.loads(line)["loss"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()] == \
        [json.loads(line)["loss"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert again["eval_loss"] == first["eval_loss"] and again["tokens"] == first["tokens"]
    assert (tmp_path / "b" / "config.toml").read_text() == (tmp_path / "a" / "config.toml").read_text()
    assert (tmp_path / "a" / "final" / "config.toml").read_text() == (tmp_path / "a" / "config.toml").read_text()


TINY_PRESETS = [name for name in llama.list_models() if name.startswith("tiny-") and not name.endswith("-vision")]


def test_every_tiny_preset_trains_from_the_cli_at_its_own_vocabulary(tmp_path):
    """configs/pretrain_bytes.toml: the byte tokenizer's 256 ids are every tiny preset's vocabulary."""
    train_script = script("train")
    shrink = ["--train.steps", "1", "--train.batch_size", "2", "--data.seq_len", "32", "--data.corpus_chars", "20000",
              "--data.n_eval", "2", "--no-progress"]
    for preset in TINY_PRESETS:
        train_script.main(["--config", str(REPO / "configs" / "pretrain_bytes.toml"), "--model.preset", preset,
                           "--out", str(tmp_path / preset), *shrink])
        model = llama.load(tmp_path / preset / "final" / "model")
        assert model.args == llama.ModelArgs.from_name(preset, max_seq_len=model.args.max_seq_len), preset
        assert not (tmp_path / preset / "final" / "tokenizer.model").exists()  # bytes: no file
    # and fine-tuned from the command line with a shipped SFT config
    result = train_script.main(["--config", str(REPO / "configs" / "sft_lora.toml"), "--model.checkpoint",
                                str(tmp_path / "tiny-llama-3.2" / "final" / "model"), "--data.tokenizer", "bytes",
                                "--data.n_train", "32", "--data.n_eval", "2", "--eval.n_generate", "2",
                                "--out", str(tmp_path / "sft"), *shrink[:6], "--no-progress"])
    assert result["method"] == "lora" and result["exact_match"] is not None
    model, tokenizer, _ = load_run(tmp_path / "sft")
    assert tokenizer.n_words == model.args.vocab_size == 256
    with pytest.raises(ValueError, match="'tiny-llama-4-scout-vision' is multimodal"):  # refused before training
        train_script.main(["--config", str(REPO / "configs" / "pretrain_bytes.toml"), "--model.preset",
                           "tiny-llama-4-scout-vision", "--out", str(tmp_path / "vision"), *shrink])


def test_a_checkpoint_and_a_tokenizer_of_another_vocabulary_are_refused_before_training(tmp_path, tokenizer_path):
    run(load_config(None, tiny(tmp_path / "base", tokenizer_path)), quiet=True)
    with pytest.raises(ValueError, match="the tokenizer has 256 ids but the checkpoint .* has vocab_size="):
        run(load_config(None, tiny(tmp_path / "sft", tokenizer_path, f"--model.checkpoint={tmp_path}/base/final/model",
                                   "--data.tokenizer=bytes")), quiet=True)
    with pytest.raises(ValueError, match="exact match would generate eval.max_new_tokens=40 tokens"):
        run(load_config(None, tiny(tmp_path / "sft2", tokenizer_path, "--eval.max_new_tokens=40")), quiet=True)
    assert not (tmp_path / "sft").exists() and not (tmp_path / "sft2").exists()  # refused runs leave no folder


# ---------------------------------------------------------------------------------------------------------------------
# user data through a config


def test_user_jsonl_and_text_files(tmp_path, tokenizer_path):
    sft = tmp_path / "d.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"Q{i}:", "response": str(i)}) + "\n" for i in range(40)))
    out = run(load_config(None, tiny(tmp_path / "r1", tokenizer_path, "--data.source=jsonl",
                                     f"--data.path={sft}", "--data.eval_fraction=0.1")), quiet=True)
    assert len(out.data.eval_examples) == 4 and out.data.eval_examples[0].prompt == "Q36:"
    assert "exact_match" in out.result.history[-1]
    text = tmp_path / "c.txt"
    text.write_text("\n\n".join(f"document number {i} " * 20 for i in range(30)))
    out = run(load_config(None, tiny(tmp_path / "r2", tokenizer_path, "--data.source=text", f"--data.path={text}")),
              quiet=True)
    assert not out.data.sft and out.data.length is None and "exact_match" not in out.result.history[-1]


def test_data_errors_through_config(tmp_path, tokenizer_path):
    with pytest.raises(ValueError, match=r"data.source='jsonl' needs data.path"):
        run(load_config(None, tiny(tmp_path, tokenizer_path, "--data.source=jsonl")), quiet=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(load_config(None, tiny(tmp_path, tokenizer_path, "--data.source=jsonl", "--data.path=/no/such.jsonl")),
            quiet=True)
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "p " * 100, "response": "r"}) + "\n" + json.dumps(
        {"prompt": "q", "response": "r"}) + "\n")
    with pytest.raises(ValueError, match="example 0 has .* tokens, longer than the context of 48"):
        run(load_config(None, tiny(tmp_path, tokenizer_path, "--data.source=jsonl", f"--data.path={long}",
                                   "--data.eval_path=" + str(long))), quiet=True)
    with pytest.raises(ValueError, match="exceeds the model context"):
        run(load_config(None, tiny(tmp_path, tokenizer_path, "--data.seq_len=96")), quiet=True)
    with pytest.raises(ValueError, match="unknown data.source 'csv'"):
        run(load_config(None, tiny(tmp_path, tokenizer_path, "--data.source=csv")), quiet=True)


# ---------------------------------------------------------------------------------------------------------------------
# generation: attached vs merged


def test_generate_attached_equals_merged(tmp_path, tokenizer_path):
    run(load_config(None, tiny(tmp_path, tokenizer_path, "--method.name=lora", "--method.r=4", "--train.lr=3e-2",
                               "--method.target_modules=['wq', 'wv', 'w1', 'w2']")), quiet=True)
    gen = script("generate")
    prompts = ["--prompt", "Sort: 3914\nAnswer:", "--prompt", "Add: 12+5\nAnswer:"]
    attached = gen.main(["--run", str(tmp_path), *prompts, "--max-new-tokens", "8", "--out", str(tmp_path / "g1")])
    merged = gen.main(["--run", str(tmp_path), "--merge", *prompts, "--max-new-tokens", "8", "--out",
                       str(tmp_path / "g2")])
    assert [r["completion"] for r in attached] == [r["completion"] for r in merged]
    # and the adapter really is loaded: its tensors equal the trained ones
    model, _, cfg = load_run(tmp_path)
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "final" / "adapter.safetensors"))
    assert saved and all(torch.equal(model.get_parameter(k), v) for k, v in saved.items())
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k or "B" in k.split(".")[-1])


def test_generate_full_checkpoint_and_errors(tmp_path, tokenizer_path):
    run(load_config(None, tiny(tmp_path, tokenizer_path)), quiet=True)
    gen = script("generate")
    rows = gen.main(["--checkpoint", str(tmp_path / "final" / "model"), "--tokenizer", tokenizer_path,
                     "--prompt", "Sort: 12\nAnswer:", "--max-new-tokens", "4", "--out", str(tmp_path / "g")])
    assert json.loads((tmp_path / "g" / "results.json").read_text())["rows"] == rows and rows[0]["tokens"] <= 4
    with pytest.raises(ValueError, match="exactly one of --run"):
        gen.main(["--prompt", "x"])
    with pytest.raises(ValueError, match="no prompt given"):
        gen.main(["--run", str(tmp_path)])
    with pytest.raises(ValueError, match=r"the tokenizer has 256 ids but .* has vocab_size=\d+; pass the tokenizer"):
        gen.main(["--checkpoint", str(tmp_path / "final" / "model"), "--tokenizer", "bytes", "--prompt", "x"])
    with pytest.raises(FileNotFoundError, match="final/config.toml not found"):
        load_run(tmp_path / "nothing")


def test_generate_fill_in_the_middle(tmp_path, tokenizer_path, monkeypatch):
    """--suffix: Code Llama's infilling prompt goes to the model, generation stops at <EOT>, and the middle is
    decoded with its leading space (a fake generate returns a known middle)."""
    from llama import ModelArgs, Transformer, save
    from llama.tokenizer import Tokenizer
    from tests.tokenizer_files import train_sentencepiece

    code = train_sentencepiece(tmp_path / "code.model",
                               control_symbols=("▁<PRE>", "▁<MID>", "▁<SUF>", "▁<EOT>"))  # Code Llama's pieces
    tok = Tokenizer(code)
    torch.manual_seed(0)
    save(Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=tok.n_words, multiple_of=16,
                               max_seq_len=128)), tmp_path / "model", format="meta")
    gen = script("generate")
    seen = []
    middle = tok.encode_infilling(" x = 1")

    def fake_generate(model, ids, max_new_tokens, **kwargs):
        seen.append((ids, kwargs["stop_tokens"]))
        return [middle + [tok.eot_id] for _ in ids]

    monkeypatch.setattr(gen, "generate", fake_generate)
    rows = gen.main(["--checkpoint", str(tmp_path / "model"), "--tokenizer", str(code), "--prompt", "def f(x):\n",
                     "--suffix", "\n    return x\n", "--out", str(tmp_path / "g")])
    assert seen == [([tok.infilling_prompt("def f(x):\n", "\n    return x\n")], (tok.eot_id, tok.eos_id))]
    assert rows == [{"prompt": "def f(x):\n", "completion": " x = 1", "tokens": len(middle) + 1, "stopped": True}]
    plain = Tokenizer(tokenizer_path)  # a SentencePiece model without Code Llama's pieces
    save(Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=plain.n_words, multiple_of=16,
                               max_seq_len=128)), tmp_path / "plain", format="meta")
    with pytest.raises(ValueError, match="no infilling pieces"):
        gen.main(["--checkpoint", str(tmp_path / "plain"), "--tokenizer", tokenizer_path, "--prompt", "a",
                  "--suffix", "b"])
