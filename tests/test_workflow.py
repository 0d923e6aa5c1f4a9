"""The README's fine-tuning workflow, typed as a new user types it: pre-train, LoRA fine-tune, SIGKILL and resume,
generate, merge into a standalone HF checkpoint, export the adapter; then both are loaded by transformers and by HF
PEFT (in the reference process, tests/reference/isolation.py) and generate the same tokens as our model.

The commands are read from the README's workflow block and run by bash in a scratch folder (with `configs/` and
`scripts/` linked in, `python` the test's interpreter), exactly as written plus the overrides in SHRINK, which cut
the training commands to seconds. The resume command gets no override: it continues the killed run as typed.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import llama
from peft.training.recipe import load_run
from tests.reference.isolated_install import hf_peft_folder
from tests.reference.isolation import reference
from tests.reference.paper_peft import max_rel_error
from tests.reference.tolerance import forward_reduction_length, tolerance

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["scripts/train.py", "scripts/train.py", "scripts/train.py", "scripts/generate.py", "scripts/merge.py",
           "scripts/export_hf.py"]
SHRINK = {  # appended to the README's command: a smaller model, corpus and tokenizer, fewer steps, checkpoints every 2
    "configs/pretrain_tiny.toml": "--model.dim 64 --model.n_layers 2 --train.steps 4 --train.batch_size 8 "
                                  "--train.save_every 2 --data.corpus_chars 60000 --data.vocab_size 512 "
                                  "--data.n_eval 8 --no-progress",
    "configs/sft_lora.toml": "--train.steps 30 --train.batch_size 8 --train.save_every 2 --data.n_train 300 "
                             "--data.n_eval 8 --eval.n_generate 4 --no-progress",
}
KILL_AT = "step-00000004"  # step 2 of the workflow is killed once this checkpoint is committed
PROBE = "Sort: 3914\nAnswer:"
NEW_TOKENS = 8


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Fine-tuning workflow", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    root = tmp_path_factory.mktemp("workflow")
    (root / "bin").mkdir()
    python = root / "bin" / "python"  # a wrapper, not a link: a link would lose the interpreter's virtualenv
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    for name in ("configs", "scripts"):
        (root / name).symlink_to(REPO / name)
    return root


def bash(scratch: Path, command: str, **kwargs):
    env = {**os.environ, "PATH": f"{scratch / 'bin'}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "LLAMA_PEFT_CACHE": str(scratch / "cache")}
    return subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=scratch, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def typed(command: str) -> str:
    extra = next((flags for config, flags in SHRINK.items() if config in command), "")
    return f"{command} {extra}".strip()


def finish(proc) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out


@pytest.fixture(scope="module")
def workflow(scratch):
    commands = readme_commands()
    assert [c.split()[1] for c in commands] == SCRIPTS, commands
    pretrain, finetune, resume, generate, merge, export = commands
    finish(bash(scratch, typed(pretrain)))

    proc = bash(scratch, typed(finetune))
    latest = scratch / "runs" / "sft_lora" / "checkpoints" / "latest"
    deadline = time.monotonic() + 600
    while not (latest.exists() and latest.read_text() >= KILL_AT) and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the fine-tune finished before it could be killed"

    finish(bash(scratch, resume))  # as typed: the run's own settings from runs/sft_lora/config.toml
    for command in (generate, merge, export):
        finish(bash(scratch, command))
    return scratch / "runs"


def test_killed_run_resumed_as_typed_and_recorded_once(workflow):
    run = workflow / "sft_lora"
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 30 and len(results["resumes"]) == 1 and results["resumes"][0]["changed"] == {}
    assert results["resumes"][0]["from_step"] >= 4
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 31))  # every step logged once, the ones after the kill re-done
    assert (run / "final" / "config.toml").read_text() == (run / "config.toml").read_text()
    generated = json.loads(next((workflow / "generate").glob("*/results.json")).read_text())
    assert [r["prompt"] for r in generated["rows"]] == [PROBE]


def ours(model, tokens):
    model = model.to(torch.float64).eval()
    with torch.no_grad():
        logits, ids = model(tokens), tokens
        for _ in range(NEW_TOKENS):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    return logits, ids[:, tokens.shape[1]:]


def test_merged_checkpoint_and_exported_adapter_load_in_transformers_and_hf_peft(workflow, monkeypatch):
    monkeypatch.chdir(workflow.parent)  # the configs name their base as runs/…, relative to where one trains
    merged_dir, adapter_dir = workflow / "sft_lora_merged" / "model", workflow / "sft_lora_hf" / "adapter"
    tokenizer = llama.Tokenizer(merged_dir)  # merge.py puts the run's tokenizer beside the weights
    tokens = torch.tensor([tokenizer.encode(PROBE, bos=True, eos=False)])
    hf = reference(path=[hf_peft_folder()]).call("hf_peft.greedy_from_checkpoints", merged_dir.resolve(),
                                                 (workflow / "pretrain_tiny" / "final" / "model").resolve(),
                                                 adapter_dir.resolve(), tokens, NEW_TOKENS)

    merged_logits, merged_ids = ours(llama.load(merged_dir), tokens)
    attached, _, _ = load_run(workflow / "sft_lora")
    adapter_logits, adapter_ids = ours(attached, tokens)
    base_logits, _ = ours(llama.load(workflow / "pretrain_tiny" / "final" / "model"), tokens)
    assert max_rel_error(adapter_logits, base_logits) > 1e-3  # the fine-tune changed the model
    # float64 on both sides, the same weights: the project's parity bound
    assert max_rel_error(hf["merged_logits"], merged_logits) < 1e-10
    assert max_rel_error(hf["adapter_logits"], adapter_logits) < 1e-10
    assert torch.equal(hf["merged_ids"], merged_ids) and torch.equal(hf["adapter_ids"], adapter_ids)
    # merged weights are stored in float32 (one rounding per weight on the path; the norms round to float32 on both
    # sides): merged and attached agree to that, and greedily
    args, T = attached.args, tokens.shape[1]
    roundings = args.n_layers * (2 + 4) + 1  # per layer: 2 norms, wq|wk|wv, wo, w1|w3, w2; the final norm
    assert max_rel_error(merged_logits, adapter_logits) <= tolerance(
        torch.float32, forward_reduction_length(args, T), roundings=roundings, accumulate=torch.float64)
    assert torch.equal(merged_ids, adapter_ids)
    # merge.py's own check, both forwards in float32 on its 16-token probe
    results = json.loads((workflow / "sft_lora_merged" / "results.json").read_text())
    assert results["format"] == "hf" and results["max_rel_logit_difference"] <= tolerance(
        torch.float32, forward_reduction_length(args, results["probe_tokens"]), roundings=roundings)
