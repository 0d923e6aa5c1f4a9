"""The command-line convention (scripts/_cli.py, docs/cli.md) holds for every script: the common flags with their
defaults in --help, --out a folder that the script reports, no abbreviations; and scripts/compare_runs.py."""

import importlib
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (REPO / "scripts").glob("*.py")
                 if not p.stem.startswith("_"))


def script(name):
    return importlib.import_module(f"scripts.{name}")


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_takes_the_common_flags(name, capsys):
    main = script(name).main
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--out DIR", "--seed N", "--threads N", "--no-progress", "--debug"):
        assert flag in text, (name, flag)
    assert f"runs/{name}/<timestamp>" in text and "torch CPU threads (default: 1)" in text
    with pytest.raises((SystemExit, ValueError)) as done:  # train.py: an unknown flag is a bad override
        main(["--thread", "2"])  # an abbreviation is not a flag
    assert isinstance(done.value, ValueError) or done.value.code == 2


def write_run(folder: Path, losses: list[float]) -> Path:
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "loss": x}) + "\n"
                                                  for i, x in enumerate(losses)))
    return folder


def test_compare_runs(tmp_path, capsys):
    a = write_run(tmp_path / "a", [3.0, 2.0, 1.5, 1.25, 1.0])
    b = write_run(tmp_path / "b", [3.0, 2.0, 1.5, 1.25 * (1 + 1e-6), 1.1])
    result = script("compare_runs").main(["--runs", str(a), str(b), "--out", str(tmp_path / "out")])
    assert result["first_differing_step"] == 4 and result["steps"] == 5
    assert [r["step"] for r in result["rows"]] == [1, 2, 5]
    assert result["rows"][-1]["rel_diff"] == pytest.approx(0.1) and result["rows"][1]["max_rel_diff_so_far"] == 0
    assert (tmp_path / "out" / "results.md").read_text().startswith("| step | loss A |")
    with pytest.raises(ValueError, match="metrics.jsonl not found"):
        script("compare_runs").main(["--runs", str(a), str(tmp_path), "--out", str(tmp_path / "x")])
