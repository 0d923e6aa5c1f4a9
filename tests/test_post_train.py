"""Rejection sampling, the prompt pool, the known-reward oracle, and scripts/post_train.py end to end (tiny sizes):
its results.json schema, and bad input failing before anything is trained or written."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

from peft.training import oracle
from peft.training.prompts import Prompt, PromptPool
from peft.training.rejection import best_of_k, expected_best_of_k, kl_bound, sample_responses
from tests.preference_testing import CharTokenizer, tiny_model

REPO = Path(__file__).resolve().parents[1]
TOK = CharTokenizer()


# ---------------------------------------------------------------------------------------------------------------------
# rejection sampling


def test_expected_best_of_k_equals_the_average_over_every_subset():
    g = torch.Generator().manual_seed(0)
    selector = torch.randn(3, 6, generator=g)
    value = torch.rand(3, 6, generator=g, dtype=torch.float64)
    for k in range(1, 7):
        brute = sum(float(value[p, max(s, key=lambda i: float(selector[p, i]))])
                    for p in range(3) for s in itertools.combinations(range(6), k)) / (3 * math.comb(6, k))
        assert expected_best_of_k(selector, value, k) == pytest.approx(brute, rel=1e-12)
    assert expected_best_of_k(value, value, 1) == pytest.approx(float(value.mean()), rel=1e-12)
    assert expected_best_of_k(value, value, 6) == pytest.approx(float(value.max(1).values.mean()), rel=1e-12)


def test_kl_bound_of_best_of_k():
    assert kl_bound(1) == 0
    assert kl_bound(2) == pytest.approx(math.log(2) - 0.5)
    assert kl_bound(16) == pytest.approx(math.log(16) - 15 / 16)


def test_best_of_k_never_picks_an_unterminated_sample():
    scores = torch.tensor([[0.1, 5.0, 0.3], [2.0, 1.0, 0.0]])
    stopped = torch.tensor([[True, False, True], [True, True, True]])
    assert best_of_k(scores, stopped).tolist() == [2, 0]


def test_sampling_k_per_prompt_is_batched_and_reproducible():
    model = tiny_model(dtype=torch.float32)
    prompts = ["Sort: 312\nAnswer:", "Sort: 90\nAnswer:"]
    a = sample_responses(model, TOK, prompts, 3, 5, seed=1, batch_size=4)
    assert [len(row) for row in a] == [3, 3]
    assert all(s.prompt_ids == TOK.encode(p, bos=True, eos=False) for row, p in zip(a, prompts) for s in row)
    assert all(s.stopped == (s.response_ids[-1:] == [TOK.eos_id]) for row in a for s in row)
    b = sample_responses(model, TOK, prompts, 3, 5, seed=1, batch_size=4)
    assert [[s.response_ids for s in row] for row in a] == [[s.response_ids for s in row] for row in b]


def test_rejection_sampling_bad_input():
    model = tiny_model(dtype=torch.float32)
    for k in (0, -1, 1.5):
        with pytest.raises(ValueError, match="K .* must be an integer >= 1"):
            sample_responses(model, TOK, ["Sort: 1\nAnswer:"], k, 4)
    with pytest.raises(ValueError, match="exceeds the model context of 48"):
        sample_responses(model, TOK, ["Sort: 1\nAnswer:", "Sort: " + "9" * 40 + "\nAnswer:"], 2, 4)


# ---------------------------------------------------------------------------------------------------------------------
# prompts and the oracle


def test_prompt_pool_tags_deduplicates_and_records_provenance():
    pool = PromptPool()
    first = pool.draw(40, 1, ("sort", "reverse"))
    assert len(first) == 40 and {p.tag for p in first} == {"sort", "reverse"}
    assert all(p.round == 1 and p.source == "synthetic/train" for p in first)
    assert first[0].provenance == {"round": 1, "source": "synthetic/train", "tag": first[0].tag}
    second = pool.draw(40, 2, ("sort",))
    assert not {p.text for p in first} & {p.text for p in second}  # a prompt is drawn once across rounds
    again = Prompt(" ".join(first[0].text.split(" ")) + " ", "sort", 3, "human", first[0].answer)
    assert pool.add([again]) == [] and len(pool) == 80  # duplicates up to whitespace are dropped
    held_out = PromptPool().draw(20, 0, ("sort",), split="eval")
    assert not {p.text for p in held_out} & {p.text for p in first + second}
    with pytest.raises(ValueError, match="unknown capability tag"):
        pool.draw(4, 1, ("poetry",))


def test_true_reward_is_the_fraction_of_items_in_place():
    assert oracle.true_reward("1234", "1234") == 1.0
    assert oracle.true_reward("1324", "1234") == 0.5
    assert oracle.true_reward("123", "1234") == 0.75
    assert oracle.true_reward("12345", "1234") == 0.8
    assert oracle.true_reward("1234", "1234", stopped=False) == 0.0
    assert oracle.true_reward(" ", "1234") == 0.0


def test_teacher_annotators_and_ratings():
    rng = random.Random(0)
    outs = [oracle.teacher_response("0123456", rng) for _ in range(400)]
    assert all(sorted(o) == list("0123456") for o in outs)  # adjacent swaps keep a permutation
    assert 0.1 < sum(o == "0123456" for o in outs) / 400 < 0.5  # k = 0 in about a quarter of the draws
    assert [oracle.rating_for(g) for g in (1.0, 0.5, 0.4, 0.3, 0.2, 0.15, 0.1, 0.0)] == [
        "significantly better", "significantly better", "better", "better", "slightly better", "slightly better",
        "negligibly better", "negligibly better"]
    assert oracle.annotate("p", "12", "12", 1.0, 1.0, rng, 0.1) is None
    pair = oracle.annotate("p", "21", "12", 0.0, 1.0, rng, 0.0, {"round": 2})  # τ = 0: always the better one
    assert (pair.chosen, pair.rejected, pair.rating, pair.provenance) == ("12", "21", "significantly better",
                                                                         {"round": 2})
    wins = sum(oracle.annotate("p", "a", "b", 0.6, 0.5, rng, 0.1).chosen == "a" for _ in range(4000)) / 4000
    assert wins == pytest.approx(1 / (1 + math.exp(-1)), abs=0.03)  # Bradley–Terry: σ(0.1 / 0.1)
    assert oracle.bayes_accuracy(0.0, 0.1) == 0.5 and oracle.bayes_accuracy(-0.3, 0.1) == pytest.approx(
        1 / (1 + math.exp(-3)))


# ---------------------------------------------------------------------------------------------------------------------
# the script


def script():
    spec = importlib.util.spec_from_file_location("post_train", REPO / "scripts" / "post_train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["post_train"] = module
    spec.loader.exec_module(module)
    return module


TINY = ["--smoke", "--no-progress", "--dim", "32", "--vocab-size", "300"]


def test_script_end_to_end_writes_the_issues_schema(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_PEFT_CACHE", str(tmp_path / "cache"))
    report = script().main(TINY + ["--out", str(tmp_path / "run")])
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["stages"] == report["stages"]
    assert [(s["round"], s["stage"]) for s in saved["stages"]] == [(0, "base"), (0, "sft"), (1, "rs"), (1, "dpo")]
    assert all(set(s) == {"round", "stage", "true_reward", "exact_match", "kl_to_ref"} for s in saved["stages"])
    assert saved["stages"][1]["kl_to_ref"] == 0  # the sft policy is the reference
    assert set(saved["reward_model"]) == {"accuracy", "accuracy_by_rating"}
    assert set(saved["reward_model"]["accuracy_by_rating"]) <= set(oracle.RATINGS)
    for name in ("results.md", "post_training.png", "data/round0.jsonl", "data/round1.jsonl"):
        assert (tmp_path / "run" / name).is_file()
    example = json.loads((tmp_path / "run" / "data" / "round1.jsonl").read_text().splitlines()[0])
    assert example["provenance"]["round"] == 1 and example["provenance"]["source"]


@pytest.mark.parametrize("flags,message", [
    (["--beta", "0"], "must be > 0"),
    (["--k", "0"], "must be > 0"),
    (["--dpo-loss", "kto"], "unknown DPO loss_type"),
    (["--tasks", "poetry"], "unknown task"),
    (["--max-seq-len", "12"], "exceeds the model context"),
    (["--rm-method", "adapter_v1"], "--rm-method must be"),
    (["--label-smoothing", "0.5"], "label_smoothing must be in"),
])
def test_script_bad_input_fails_before_anything_is_written(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.setenv("LLAMA_PEFT_CACHE", str(tmp_path / "cache"))
    module = script()
    with pytest.raises(SystemExit) as exit_info:
        module.run_cli(module.main, TINY + flags + ["--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
