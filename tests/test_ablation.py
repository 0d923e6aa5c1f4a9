"""The main job (scripts/ablate_peft.py) at smoke size, and the two claim scripts (ablate_zero_init.py,
ablate_quant.py) on the same cached bases: every method runs in both regimes; the rows carry what the issue asks
(seeds, mean/std, lr, paired differences to full fine-tuning), recomputed here from the per-run records; the chosen
rate is the sweep's lowest validation loss; a rerun reuses the cached bases and sweep and reproduces every number,
in worker processes too."""

import json
import statistics

import pytest

from scripts import ablate_quant, ablate_zero_init
from scripts._cli import run_cli
from scripts.ablate_peft import LR_GRID, METHODS, REGIMES, MainJobConfig, choose, main, run_main_job

SMOKE = dict(max_steps=1, seeds=2, seed=3, n_train=40, n_val=4, n_test=6, max_new_tokens=4, dim=32, n_layers=2,
             progress=False)


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    root = tmp_path_factory.mktemp("mainjob")
    cfg = MainJobConfig(cache_dir=str(root / "cache"), jobs=1, **SMOKE)
    return root, cfg, run_main_job(cfg, root / "out")


def test_rows_carry_seeds_spread_lr_and_paired_differences(first):
    root, cfg, report = first
    saved = json.loads((root / "out" / "results.json").read_text())
    assert [(r["regime"], r["method"]) for r in saved["rows"]] == [(g, m) for g in REGIMES for m in METHODS]
    runs = {(r["regime"], r["method"], r["seed"]): r for r in saved["runs"]}
    for row in saved["rows"]:
        assert row["seeds"] == [3, 4]
        em = [runs[row["regime"], row["method"], s]["test_exact_match"] for s in row["seeds"]]
        loss = [runs[row["regime"], row["method"], s]["test_loss"] for s in row["seeds"]]
        assert row["exact_match"] == em and row["eval_loss"] == loss
        assert row["exact_match_mean"] == pytest.approx(statistics.mean(em))
        assert row["exact_match_std"] == pytest.approx(statistics.stdev(em))
        assert row["eval_loss_mean"] == pytest.approx(statistics.mean(loss))
        assert row["eval_loss_std"] == pytest.approx(statistics.stdev(loss)) and row["eval_loss_std"] > 0
        full = [runs[row["regime"], "full", s] for s in row["seeds"]]
        assert row["delta_eval_loss_vs_full"] == pytest.approx([a - f["test_loss"] for a, f in zip(loss, full)])
        # the learning rate: a grid point, the one with the lowest validation loss at the first seed
        sweep = next(s for s in saved["sweep"] if (s["regime"], s["method"]) == (row["regime"], row["method"]))
        assert [g["lr"] for g in sweep["grid"]] == list(LR_GRID[row["method"]]) and not sweep["cached"]
        assert row["lr"] == min(sweep["grid"], key=lambda g: g["val_loss"])["lr"] == sweep["chosen_lr"]
        assert row["lr_at_grid_edge"] == (row["lr"] in (LR_GRID[row["method"]][0], LR_GRID[row["method"]][-1]))
        assert runs[row["regime"], row["method"], 4]["lr"] == row["lr"]  # the other seeds use the chosen rate
    by = {(r["regime"], r["method"]): r for r in saved["rows"]}
    assert by["skill", "full"]["delta_exact_match_vs_full"] == [0.0, 0.0]
    assert by["skill", "lora"]["trainable"] == by["skill", "qlora"]["trainable"] < by["skill", "full"]["trainable"]
    assert by["skill", "full"]["peak_memory_mb"] > by["skill", "lora"]["peak_memory_mb"] > 0
    # two different bases: only the skill base saw raw sort text
    bases = saved["bases"]
    assert bases["skill"]["key"] != bases["new"]["key"] and not bases["skill"]["cached"]
    assert set(bases["skill"]["heldout_loss"]) == {"docs", "sort"}
    assert (root / "out" / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert (root / "out" / "lr_sweep.png").read_bytes()[:4] == b"\x89PNG"
    tables = (root / "out" / "results.md").read_text()
    assert tables.count("| base (no fine-tuning) |") == 2 and "Learning-rate sweep" in tables
    assert (root / "out" / "skill" / "lora" / f"lr{by['skill', 'lora']['lr']:g}-seed4" / "metrics.jsonl").exists()


def test_rerun_in_worker_processes_reuses_the_caches_and_reproduces_every_number(first):
    root, cfg, report = first
    subset = ("lora",)
    # --resweep in two worker processes: the sweep runs again, in other processes, and gives the same bits
    again = run_main_job(MainJobConfig(cache_dir=cfg.cache_dir, jobs=2, methods=subset, resweep=True, **SMOKE),
                         root / "again")
    assert all(b["cached"] for b in again["bases"].values())
    assert not any(s["cached"] for s in again["sweep"])
    # and without it, the sweep just written is reused (and says so)
    cached = run_main_job(MainJobConfig(cache_dir=cfg.cache_dir, jobs=1, methods=subset, **SMOKE), root / "cached")
    assert all(s["cached"] for s in cached["sweep"])
    first_rows = {(r["regime"], r["method"]): r for r in report["rows"]}
    for rerun in (again, cached):
        for row in rerun["rows"]:
            ref = first_rows[row["regime"], row["method"]]
            for key in ("lr", "exact_match", "eval_loss", "trainable"):
                assert row[key] == ref[key], (row["regime"], row["method"], key)
        assert {k: v for k, v in rerun["bases"]["skill"].items() if k != "cached"} == \
            {k: v for k, v in report["bases"]["skill"].items() if k != "cached"}


def test_choice_is_the_lowest_validation_loss():
    runs = [{"lr": 1e-3, "val_loss": 0.5, "val_exact_match": 0.9}, {"lr": 3e-3, "val_loss": 0.4,
                                                                    "val_exact_match": 0.8}]
    assert choose(runs)["lr"] == 3e-3


def test_user_errors_exit_with_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as err:
        run_cli(main, ["--task", "add", "--out", str(tmp_path / "o")])
    assert err.value.code == 2 and "invalid choice: 'add'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['prefix'\]"):
        MainJobConfig(methods=("lora", "prefix"))
    with pytest.raises(ValueError, match="--seeds must be >= 1"):
        MainJobConfig(seeds=0)


def test_zero_init_gate_starts_at_the_base_exactly_and_random_does_not(first, tmp_path):
    root, cfg, _ = first  # the main job's (cached) tiny skill base
    three_steps = MainJobConfig(cache_dir=cfg.cache_dir, **{**SMOKE, "max_steps": None, "base_steps": 1, "steps": 3})
    assert three_steps.base("skill") == cfg.base("skill")
    report = ablate_zero_init.run(three_steps, [0, 1], lr=0.1, random_std=1.0)
    zero, rand = report["summary"]
    assert report["base"]["cached"] and zero["init"] == "zero" and zero["step0_equals_base"]
    assert zero["step0_test_loss"]["values"] == [report["base"]["test_loss"]] * 2
    assert not rand["step0_equals_base"] and rand["step0_test_loss"]["std"] > 0
    assert all(len(r["curve"]) == 3 for r in report["runs"])  # every step's training loss
    assert "| zero | " in ablate_zero_init.format_table(report)
    ablate_zero_init.plot(report, tmp_path / "zero_init.png")
    assert (tmp_path / "zero_init.png").read_bytes()[:4] == b"\x89PNG"


def test_quant_formats_on_the_trained_base(first, tmp_path):
    root, cfg, _ = first
    report = ablate_quant.run(cfg.base("skill"), 65536, seed=0, cache=cfg.cache_dir, n_probe=4)
    assert report["base"]["cached"]
    rows = {r["format"]: r for r in report["rows"]}
    assert rows["float32"]["rel_error_trained"] == 0
    gaussian = {name: r["rel_error_gaussian"] for name, r in rows.items()}
    assert gaussian["nf4"] < gaussian["int4"] < gaussian["fp4_bnb"]
    for name in ablate_quant.FORMATS:
        assert 0 < rows[name]["rel_error_trained"] < 0.05
        assert rows[name]["heldout_loss_docs"] != rows["float32"]["heldout_loss_docs"]  # the base really changed
    assert "| nf4_dq | NF4 + double quantisation | 4.127 |" in ablate_quant.format_table(report)
    ablate_quant.plot(report, tmp_path / "q.png")
    assert (tmp_path / "q.png").read_bytes()[:4] == b"\x89PNG"


def test_claim_scripts_refuse_bad_arguments(capsys, tmp_path):
    for module, argv, message in ((ablate_quant, ["--n", "1000"], "--n must be a multiple of 1024"),
                                  (ablate_zero_init, ["--seeds", "0"], "must be > 0")):
        with pytest.raises(SystemExit) as err:
            run_cli(module.main, argv + ["--out", str(tmp_path / "o")])
        assert err.value.code == 2 and message in capsys.readouterr().err
