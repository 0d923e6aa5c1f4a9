"""The reward model (peft.training.reward_model): a scalar head read at the EOS from explicit lengths, under left and
right padding; its initialisation; training with full fine-tuning and every PEFT method through the one loop; and
the bad inputs of preference pairs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import peft
from peft.training.loop import Dist, TrainConfig, accumulate_gradients, train
from peft.training.pairs import Pair, collate_pairs, encode_pair, encode_pairs
from peft.training.reward_model import RewardLoss, evaluate_pairs, score, score_sequences
from tests.preference_testing import PAIRS, CharTokenizer, tiny_model

TOK = CharTokenizer()
METHODS = {
    "full": {"name": "full"},
    "lora": {"name": "lora", "r": 4, "target_modules": ["wq", "wv"]},
    "qlora": {"name": "qlora", "r": 4, "target_modules": ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]},
    "adapter_v1": {"name": "adapter_v1", "adapter_len": 3, "adapter_layers": 2},
    "adapter_v2": {"name": "adapter_v2", "adapter_len": 3, "adapter_layers": 2},
    "excitor": {"name": "excitor", "adapter_len": 3, "adapter_layers": 2, "rank": 4},
}


def random_head_rm(seed=0):
    """A reward model whose head is random (the zero-initialised one would score everything 0)."""
    rm = peft.reward_model(tiny_model(seed))
    with torch.no_grad():
        rm.output.weight.normal_(0, 1, generator=torch.Generator().manual_seed(seed))
    return rm


def sequences(pad_is_eos=False):
    """Sequences of different lengths, each ending in EOS (id 2); the padding id may equal the EOS id."""
    g = torch.Generator().manual_seed(4)
    seqs = [[1] + torch.randint(4, TOK.n_words, (n,), generator=g).tolist() + [2] for n in (3, 9, 6, 12)]
    return seqs, (2 if pad_is_eos else TOK.pad_id)


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_reward_is_read_at_the_eos_under_left_and_right_padding(pad_is_eos):
    rm = random_head_rm()
    seqs, pad = sequences(pad_is_eos)
    with torch.no_grad():
        alone = torch.stack([rm(torch.tensor([s]))[0, -1, 0] for s in seqs])  # each sequence by itself, unpadded
    N, T = len(seqs), max(len(s) for s in seqs)
    lengths = torch.tensor([len(s) for s in seqs])
    right = torch.full((N, T), pad)
    left = torch.full((N, T), pad)
    for i, s in enumerate(seqs):
        right[i, :len(s)] = torch.tensor(s)
        left[i, T - len(s):] = torch.tensor(s)
    assert (right[torch.arange(N), lengths - 1] == 2).all() and (left[:, -1] == 2).all()  # both read at an EOS
    with torch.no_grad():
        got_right = score(rm, right, lengths, "right")
        got_left = score(rm, left, lengths, "left")
    torch.testing.assert_close(got_right, alone, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_left, alone, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(score_sequences(rm, seqs, pad).double(), alone.float().double())
    if pad_is_eos:  # "the last non-pad token" would find the wrong position when pad == EOS: lengths are needed
        naive = (right != pad).long().cumsum(1).argmax(1)
        assert (naive != lengths - 1).any()


def test_the_padding_content_never_matters():
    rm = random_head_rm(1)
    seqs, _ = sequences()
    lengths = torch.tensor([len(s) for s in seqs])
    outs = []
    for pad in (0, 3, 7):
        tokens = torch.full((len(seqs), 16), pad)
        for i, s in enumerate(seqs):
            tokens[i, 16 - len(s):] = torch.tensor(s)
        with torch.no_grad():
            outs.append(score(rm, tokens, lengths, "left"))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.testing.assert_close(outs[0], outs[2], rtol=0, atol=0)


def test_reward_model_initialisation():
    checkpoint = tiny_model()
    before = {k: v.clone() for k, v in checkpoint.state_dict().items()}
    rm = peft.reward_model(checkpoint)
    assert isinstance(rm.output, nn.Linear) and rm.output.weight.shape == (1, checkpoint.args.dim)
    assert all(torch.equal(v, checkpoint.state_dict()[k]) for k, v in before.items())  # the checkpoint is untouched
    trunk = {k: v for k, v in rm.state_dict().items() if k != "output.weight"}
    assert all(torch.equal(v, before[k]) for k, v in trunk.items())  # initialised from it
    batch = collate_pairs(encode_pairs(PAIRS, TOK, 48), TOK.pad_id)
    terms = RewardLoss(TOK.pad_id)(rm, batch)
    assert float(terms.loss["pairs"]) / batch.n_pairs == pytest.approx(math.log(2), rel=1e-14)  # all rewards 0


@pytest.mark.parametrize("method", list(METHODS))
def test_reward_model_trains_with_every_method(method):
    checkpoint = tiny_model(dtype=torch.float32)
    rm = peft.reward_model(checkpoint, METHODS[method])
    assert rm.output.weight.requires_grad
    frozen = {n: p.detach().clone() for n, p in rm.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in rm.named_parameters() if p.requires_grad}
    assert (method == "full") == (not frozen)
    encoded = encode_pairs(PAIRS, TOK, 48)
    cfg = TrainConfig(steps=3, batch_size=8, micro_batch_size=4, lr=1e-2, warmup_steps=1, progress=False)
    history = train(rm, encoded, cfg, objective=RewardLoss(TOK.pad_id, "small"), ctx=Dist()).history
    # step 1 sees every pair, two of each rating, all rewards 0: the mean of log(1 + e^m) over the small margins
    assert history[0]["loss"] == pytest.approx(math.log(1 + math.e) / 4 + math.log(1 + math.exp(2 / 3)) / 4
                                               + math.log(1 + math.exp(1 / 3)) / 4 + math.log(2) / 4, rel=1e-5)
    assert all(math.isfinite(h["loss"]) for h in history) and "accuracy" in history[-1]
    params = dict(rm.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())  # the base stays frozen
    assert not torch.equal(params["output.weight"], trained["output.weight"])  # the head trains
    assert any(not torch.equal(params[n], v) for n, v in trained.items() if n != "output.weight")  # so does the rest
    accuracy, by_rating = evaluate_pairs(rm, encoded, TOK.pad_id)
    assert 0 <= accuracy <= 1 and set(by_rating) <= {p.rating for p in PAIRS}


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulation_of_micro_batches_equals_one_batch():
    rm = random_head_rm(2)
    objective = RewardLoss(TOK.pad_id, "large", center_coef=0.01)
    encoded = encode_pairs(PAIRS, TOK, 48)
    big = collate_pairs(encoded, TOK.pad_id)
    # independent reference: the mean per-pair loss of one batch of all pairs, by the formula
    rewards = score(rm, big.tokens, big.lengths)
    c, r = rewards[:8], rewards[8:]
    m = torch.tensor([{"significantly better": 3.0, "better": 2.0, "slightly better": 1.0,
                       "negligibly better": 0.0}[p.rating] for p in PAIRS], dtype=torch.float64)
    (-torch.nn.functional.logsigmoid(c - r - m) + 0.01 * (c + r) ** 2).mean().backward()
    ref = grads(rm)
    for b in (1, 2, 4):
        rm.zero_grad()
        micro = [objective.collate(encoded[i:i + b]) for i in range(0, 8, b)]
        accumulate_gradients(rm, micro, {"pairs": 8}, objective=objective)
        for n, g in grads(rm).items():
            torch.testing.assert_close(g, ref[n], rtol=1e-10, atol=1e-13, msg=f"{n}, micro-batches of {b}")


def test_pairs_are_stored_whole_with_the_prompt_masked():
    e = encode_pair(Pair("Sort: 312\nAnswer:", "123", "13", "better"), TOK, 48)
    prompt = TOK.encode("Sort: 312\nAnswer:", bos=True, eos=False)
    assert e.chosen == prompt + TOK.encode("123", bos=False, eos=True) and e.prompt_len == len(prompt)
    batch = collate_pairs([e], TOK.pad_id)
    assert batch.lengths.tolist() == [len(e.chosen), len(e.rejected)]
    assert batch.labels[0].tolist() == [-100] * len(prompt) + TOK.encode("123", bos=False, eos=True)
    assert batch.labels[1].tolist() == [-100] * len(prompt) + TOK.encode("13", bos=False, eos=True) + [-100]


def test_bad_pairs_fail_before_anything_trains():
    bad = {
        "are the same response": Pair("Sort: 21\nAnswer:", "12", "12"),
        "the rejected response is empty": Pair("Sort: 21\nAnswer:", "12", "  "),
        "the chosen response is empty": Pair("Sort: 21\nAnswer:", "", "21"),
        "not in Llama 2's table": Pair("Sort: 21\nAnswer:", "12", "21", rating="much better"),
        "longer than the context": Pair("Sort: " + "9" * 60 + "\nAnswer:", "1", "2"),
    }
    for message, pair in bad.items():
        with pytest.raises(ValueError, match=message):
            encode_pairs(PAIRS + [pair], TOK, 48)
    with pytest.raises(ValueError, match="unknown margin table"):
        RewardLoss(TOK.pad_id, "huge")
    with pytest.raises(ValueError, match="padding_side"):
        score(random_head_rm(), torch.ones(1, 3, dtype=torch.long), torch.tensor([3]), "middle")
    with pytest.raises(ValueError, match="lengths must be"):
        score(random_head_rm(), torch.ones(1, 3, dtype=torch.long), torch.tensor([4]))
