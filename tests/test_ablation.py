"""The main job at smoke size: every method runs, the table/JSON/PNG are complete, the cached base is reused, and a
rerun with the same seed reproduces every loss and metric."""

import json

import pytest

from scripts.ablate_peft import METHODS, AblationConfig, main, run_ablation


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """scripts/ablate_peft.py itself, shrunk with --max-steps (the README's smoke command)."""
    root = tmp_path_factory.mktemp("ablation")
    report = main(["--max-steps", "2", "--n-eval", "6", "--cache-dir", str(root / "cache"), "--out",
                          str(root / "out"), "--no-progress", "--seed", "3"])
    return root, report


def test_table_json_and_plot_are_complete(first_run):
    root, report = first_run
    out = root / "out"
    saved = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in saved["rows"]] == list(METHODS)
    base_params = saved["base"]["parameters"]
    by = {r["method"]: r for r in saved["rows"]}
    assert by["full"]["trainable"] == base_params and by["full"]["trainable_pct"] == pytest.approx(100)
    assert by["lora"]["trainable"] == by["qlora"]["trainable"]  # same LoRA config; QLoRA only quantizes the base
    for r in saved["rows"]:
        assert 0 < r["trainable"] <= base_params
        assert r["peak_memory_mb"] > 0 and r["step_time_ms"] > 0 and r["tokens_per_s"] > 0
        assert r["eval_loss"] > 0 and 0 <= r["exact_match"] <= 1
        assert len(saved["curves"][r["method"]]) == 2  # --max-steps 2
    # full fine-tuning keeps gradients and two Adam moments for every weight: measurably more memory than LoRA
    assert by["full"]["peak_memory_mb"] > by["lora"]["peak_memory_mb"]
    assert saved["base"]["pretrain_steps"] == 2 and not saved["base"]["cached"]
    table = (out / "results.md").read_text()
    assert table.startswith("| method | trainable params | % of model | peak memory (MB) |")
    assert all(f"| {m} |" in table for m in METHODS) and "| base (no fine-tuning) |" in table
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for m in METHODS:
        assert (out / m / "metrics.jsonl").exists()
        assert (out / m / "final" / ("model" if m == "full" else "adapter.safetensors")).exists()


def test_rerun_reuses_the_base_and_reproduces_everything(first_run):
    root, first = first_run
    cfg = AblationConfig(max_steps=2, n_eval=6, cache_dir=str(root / "cache"), out=str(root / "again"), seed=3,
                         progress=False)
    again = run_ablation(cfg)
    assert again["base"]["cached"] and again["base"]["key"] == first["base"]["key"]
    assert again["curves"] == first["curves"]  # bit-identical losses
    for a, b in zip(again["rows"], first["rows"]):
        for key in ("trainable", "eval_loss", "exact_match", "train_loss", "peak_memory_mb"):
            assert a[key] == b[key], (a["method"], key)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['prefix'\]"):
        AblationConfig(methods=("lora", "prefix"))
    with pytest.raises(ValueError, match="--max-steps must be positive"):
        AblationConfig(max_steps=0)
    with pytest.raises(ValueError, match="unknown task 'sorting'"):
        AblationConfig(task="sorting")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="not writable"):
        run_ablation(AblationConfig(out=str(blocker / "out"), cache_dir=str(tmp_path / "c"), max_steps=1))
