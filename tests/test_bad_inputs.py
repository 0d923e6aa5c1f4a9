"""Every bad input of the catalogue (tests/bad_inputs.py) is refused with the expected error type, a message that
names the field or file at fault and the fix, and before anything is changed (a table-driven test: one row per case;
`python -m tests.bad_inputs` prints the same catalogue as a per-area probe)."""

from __future__ import annotations

import pytest

from tests.bad_input_probe import Case, Pristine, Workspace, classify
from tests.bad_inputs import CASES


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Pristine:
    return Pristine(tmp_path_factory.mktemp("pristine"))


def test_the_catalogue_is_large_and_names_are_unique():
    assert len(CASES) >= 200
    assert len({(c.area, c.name) for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.area}: {c.name}" for c in CASES])
def test_bad_input_is_refused_clearly_before_anything_changes(case, pristine, tmp_path):
    outcome, detail = classify(case, Workspace(pristine, tmp_path))
    assert outcome == "clear", f"{outcome}: {detail}"


# The classifier itself can fail a case: a call that is accepted, one with the wrong words, one that modifies a
# watched folder before refusing.
def _accepts(ws):
    return None


def _wrong_words(ws):
    raise ValueError("something went wrong")


def _writes_then_refuses(ws):
    folder = ws.watch_folder(ws.tmp / "ckpt")
    folder.mkdir()
    raise ValueError("refused: bad field")


@pytest.mark.parametrize("run, expected", [(_accepts, "accepted"), (_wrong_words, "cryptic"),
                                           (_writes_then_refuses, "changed")])
def test_the_classifier_reports_what_is_not_clear(run, expected, pristine, tmp_path):
    case = Case("self-test", expected, run, ValueError, ("bad field",))
    assert classify(case, Workspace(pristine, tmp_path))[0] == expected
