"""`scripts/ablate_moe.py`: equal active parameters, load statistics, a tiny end-to-end run."""

import json

import pytest

from llama.config import count_active_parameters
from scripts.ablate_moe import VARIANTS, MoEAblationConfig, format_table, imbalance, main, plot, run, variant_args
from tests.ablation_testing import toy_docs

DOCS = toy_docs(200)


def test_every_variant_touches_the_same_hidden_units_per_token():
    cfg = MoEAblationConfig()
    dense = count_active_parameters(variant_args(cfg, "dense"))
    for v in VARIANTS[1:]:
        router = cfg.n_layers * cfg.dim * cfg.n_experts  # the only extra weights a token touches
        assert count_active_parameters(variant_args(cfg, v)) == dense + router, v
    args = variant_args(cfg, "moe-no-shared-no-aux")
    assert not args.moe_args.shared_expert and args.moe_args.load_balance_coef == 0 == args.moe_args.router_z_loss_coef
    assert variant_args(cfg, "moe").moe_hidden_dim == cfg.ffn_hidden // 2


def test_imbalance_by_hand():
    assert imbalance([[0.25] * 4, [0.25] * 4]) == 1.0
    assert imbalance([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0]]) == (4 + 2) / 2


def test_tiny_run_report_table_and_plot(tmp_path):
    cfg = MoEAblationConfig(dim=32, n_layers=2, n_heads=2, ffn_hidden=64, n_experts=4, seq_len=16, batch_size=4,
                            steps=3, eval_tokens=256, capacity_factor=1.0)
    report = run(cfg, DOCS, log=lambda *a: None)
    assert list(report["results"]) == list(VARIANTS)
    moe = report["results"]["moe"]
    assert len(moe["loss_curve"]) == 3 and len(moe["shares"]) == 3 and len(moe["load_balance"]) == 3
    for layer in moe["eval_shares"]:
        assert sum(layer) == pytest.approx(1.0)
    assert 1.0 <= moe["eval_imbalance"] <= 4.0
    assert report["results"]["dense"]["shares"] == []
    table = format_table(report)
    assert all(v in table for v in VARIANTS)
    plot(report, tmp_path / "moe.png")
    assert (tmp_path / "moe.png").stat().st_size > 10_000


def test_bad_config():
    with pytest.raises(ValueError, match="unknown MoE variants"):
        MoEAblationConfig(variants=("dense", "soft-moe"))
    with pytest.raises(ValueError, match="ffn_hidden must be even"):
        MoEAblationConfig(ffn_hidden=255)


def test_script_end_to_end_through_the_project_training_loop(tmp_path):
    report = main(["--steps", "2", "--dim", "32", "--n-layers", "1", "--n-heads", "2", "--ffn-hidden", "64",
                          "--n-experts", "4", "--batch-size", "4", "--seq-len", "16", "--eval-tokens", "256",
                          "--variants", "dense", "moe", "--corpus-chars", "100000", "--threads", "1",
                          "--seed", "3", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["seed"] == 3 and set(saved["results"]) == {"dense", "moe"} == set(report["results"])
    assert (tmp_path / "moe_ablation.png").exists()
