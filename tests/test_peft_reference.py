"""The paper-form reference (`tests/reference/paper_peft.py`) reproduces the frozen `llama.Transformer`, and is not
trivially equal to it."""

from __future__ import annotations

import pytest
import torch

from tests.reference.paper_peft import PRESETS, base_weights, make_model, max_rel_error, reference_forward, tokens


@pytest.mark.parametrize("kind", list(PRESETS))
def test_reference_matches_frozen_model(kind):
    model = make_model(kind)
    toks = tokens(model.args)
    with torch.no_grad():
        ours = model(toks)
        ref = reference_forward(model.args, base_weights(model), toks)
    assert max_rel_error(ours, ref) < 1e-12


def test_reference_is_not_trivially_equal():
    """A wrong weight must show: the comparison above can fail."""
    model = make_model("gqa")
    toks = tokens(model.args)
    W = base_weights(model)
    W["layers.1.attention.wv.weight"] = W["layers.1.attention.wv.weight"] * 1.001
    with torch.no_grad():
        assert max_rel_error(model(toks), reference_forward(model.args, W, toks)) > 1e-6
