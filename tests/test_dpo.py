"""DPO through the training loop (peft.training.dpo): the step-0 identity log 2 for every method (reference = the
same model with its adapter off, or precomputed), gradient accumulation with the NLL term, Llama 3's formatting-token
mask, and errors raised before any parameter changes."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import peft
from peft.training.dpo import DPOConfig, DPOLoss, mask_tokens, precompute_reference
from peft.training.loop import Dist, TrainConfig, accumulate_gradients, train
from peft.training.pairs import collate_pairs, encode_pairs
from peft.training.recipe import apply_method
from tests.preference_testing import PAIRS, CharTokenizer, tiny_model

TOK = CharTokenizer()
METHODS = {
    "lora": {"name": "lora", "r": 4, "target_modules": ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]},
    "qlora": {"name": "qlora", "r": 4, "target_modules": ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]},
    "adapter_v1": {"name": "adapter_v1", "adapter_len": 3, "adapter_layers": 2},
    "adapter_v2": {"name": "adapter_v2", "adapter_len": 3, "adapter_layers": 2},
    "excitor": {"name": "excitor", "adapter_len": 3, "adapter_layers": 2, "rank": 4},
}


def dpo_train(model, encoded, cfg, steps=4):
    tc = TrainConfig(steps=steps, batch_size=8, micro_batch_size=4, lr=3e-2, warmup_steps=1, progress=False)
    return train(model, encoded, tc, objective=DPOLoss(cfg, TOK.pad_id), ctx=Dist()).history


@pytest.mark.parametrize("method", list(METHODS))
def test_step_zero_is_log_2_with_the_adapter_switched_off(method):
    """At initialisation every method equals its base, so h = 0 for every pair: loss log 2, rewards 0, accuracy 0
    (ties count as wrong); then DPO separates the pairs."""
    policy = apply_method(tiny_model(dtype=torch.float32), METHODS[method])
    history = dpo_train(policy, encode_pairs(PAIRS, TOK, 48), DPOConfig(beta=0.5))
    first = history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == 0
    assert first["rewards/accuracies"] == 0
    assert history[-1]["loss"] < math.log(2) and history[-1]["rewards/margins"] > 0


def test_step_zero_is_log_2_with_a_precomputed_reference():
    policy = tiny_model(dtype=torch.float32)
    encoded = precompute_reference(policy, encode_pairs(PAIRS, TOK, 48), TOK.pad_id)
    history = dpo_train(apply_method(policy, {"name": "full"}), encoded, DPOConfig(reference="precomputed"))
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and history[0]["rewards/margins"] == 0
    assert history[-1]["loss"] < math.log(2)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulation_with_the_nll_term_equals_one_batch():
    """Two normalisers in one step: pairs (DPO) and chosen tokens (NLL). k micro-batches of b pairs give the gradient
    of one batch of k·b pairs, although the micro-batches hold different numbers of chosen tokens."""
    policy = tiny_model(1)
    cfg = DPOConfig(beta=0.3, nll_alpha=0.2, mask_token_ids=(TOK.eos_id,), reference="precomputed")
    encoded = precompute_reference(tiny_model(2), encode_pairs(PAIRS, TOK, 48), TOK.pad_id, cfg.mask_token_ids)
    big = collate_pairs(encoded, TOK.pad_id)
    # independent reference: the formulas on one batch of all 8 pairs
    logits = policy(big.tokens)
    dpo_labels = big.labels.masked_fill(big.labels == TOK.eos_id, -100)
    lp = peft.sequence_logps(logits, dpo_labels)
    h = (lp[:8] - big.ref_logps[:8]) - (lp[8:] - big.ref_logps[8:])
    nll = F.cross_entropy(logits[:8, :-1].flatten(0, 1), big.labels[:8, 1:].flatten(), ignore_index=-100)
    (-F.logsigmoid(0.3 * h).mean() + 0.2 * nll).backward()
    ref = grads(policy)
    objective = DPOLoss(cfg, TOK.pad_id)
    n_tokens = int((big.labels[:8, 1:] != -100).sum())
    for b in (1, 2, 4):
        policy.zero_grad()
        micro = [objective.collate(encoded[i:i + b]) for i in range(0, 8, b)]
        assert len({objective.counts(m)["tokens"] for m in micro}) > 1  # really different token counts
        accumulate_gradients(policy, micro, {"pairs": 8, "tokens": n_tokens}, objective=objective)
        for n, g in grads(policy).items():
            torch.testing.assert_close(g, ref[n], rtol=1e-10, atol=1e-13, msg=f"{n}, micro-batches of {b}")
    # a mean of per-micro-batch means would differ: the test can fail
    policy.zero_grad()
    for i in range(0, 8, 2):
        m = objective.collate(encoded[i:i + 2])
        out = policy(m.tokens)
        lp = peft.sequence_logps(out, m.labels.masked_fill(m.labels == TOK.eos_id, -100))
        h = (lp[:2] - m.ref_logps[:2]) - (lp[2:] - m.ref_logps[2:])
        nll = F.cross_entropy(out[:2, :-1].flatten(0, 1), m.labels[:2, 1:].flatten(), ignore_index=-100)
        ((-F.logsigmoid(0.3 * h).mean() + 0.2 * nll) / 4).backward()
    assert max((g - ref[n]).abs().max() for n, g in grads(policy).items()) > 1e-8


def test_formatting_tokens_leave_the_dpo_logps_and_stay_in_the_nll():
    policy = tiny_model(3)
    encoded = encode_pairs(PAIRS, TOK, 48)
    batch = collate_pairs(encoded, TOK.pad_id)
    assert (batch.labels == TOK.eos_id).sum() == 16  # every response ends in EOS
    masked = mask_tokens(batch.labels, (TOK.eos_id,))
    assert (masked == TOK.eos_id).sum() == 0 and ((masked != -100).sum() == (batch.labels != -100).sum() - 16)
    encoded = precompute_reference(tiny_model(4), encoded, TOK.pad_id, (TOK.eos_id,))
    with torch.no_grad():
        logits = policy(batch.tokens)
        for keep_in_nll in (True, False):
            cfg = DPOConfig(nll_alpha=1.0, mask_token_ids=(TOK.eos_id,), nll_masks_formatting=not keep_in_nll,
                            reference="precomputed")
            objective = DPOLoss(cfg, TOK.pad_id)
            b = objective.collate(encoded)
            terms = objective(policy, b)
            assert terms.metrics["logps/chosen"][0] == pytest.approx(
                float(peft.sequence_logps(logits, masked)[:8].sum()), rel=1e-12)
            nll_labels = batch.labels[:8] if keep_in_nll else masked[:8]
            assert terms.metrics["nll"][0] == pytest.approx(-float(peft.sequence_logps(logits[:8], nll_labels).sum()),
                                                            rel=1e-12)
            assert objective.counts(b)["tokens"] == int((nll_labels[:, 1:] != -100).sum())


def test_bad_settings_fail_before_any_parameter_changes():
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        DPOConfig(beta=0.0)
    with pytest.raises(ValueError, match="unknown reference"):
        DPOConfig(reference="copy")
    with pytest.raises(ValueError, match="nll_alpha must be >= 0"):
        DPOConfig(nll_alpha=-0.2)
    model = tiny_model(dtype=torch.float32)
    before = copy.deepcopy(model.state_dict())
    encoded = encode_pairs(PAIRS, TOK, 48)
    with pytest.raises(ValueError, match="no reference log-probabilities"):
        dpo_train(model, encoded, DPOConfig(reference="precomputed"))
    with pytest.raises(ValueError, match="needs a model with an adapter"):  # full fine-tuning, adapters_off
        dpo_train(model, encoded, DPOConfig())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
