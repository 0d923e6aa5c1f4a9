"""The training loop: loss-exact gradient accumulation, schedule, clipping, MoE auxiliary losses, NaN guard, metrics,
bf16 autocast, and its bad-input errors."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from llama import ModelArgs, Transformer
from tests.reference.tolerance import forward_reduction_length, forward_tolerance, tolerance
from peft.training import data as D
from peft.training.loop import (Dist, NonFiniteLoss, TrainConfig, WarmupCosine, accumulate_gradients, build_optimizer,
                                split_batch, train)

V = 40


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=V, multiple_of=16, max_seq_len=64)
    args.update(kw)
    return Transformer(ModelArgs(**args))


def random_rows(n, seed=0, lo=4, hi=20):
    """SFT-like rows with very different numbers of target tokens (masked prefixes of random length)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        T = int(torch.randint(lo, hi, (1,), generator=g))
        ids = torch.randint(4, V, (T + 1,), generator=g).tolist()
        masked = int(torch.randint(0, T - 1, (1,), generator=g))
        targets = [D.IGNORE_INDEX] * masked + ids[masked + 1:]
        rows.append(D.Row(ids[:-1], targets))
    return rows


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------------------------------------------------
# gradient accumulation


def test_accumulation_equals_one_big_batch():
    """k micro-batches of b rows give the gradient of one batch of k·b rows: the token-mean CE over all targets."""
    rows = random_rows(8)
    model = tiny_model().double()
    # independent reference: one padded batch, PyTorch's mean cross-entropy over every non-ignored target
    big = D.collate(rows, pad_id=0)
    logits = model(big.tokens)
    F.cross_entropy(logits.flatten(0, 1), big.targets.flatten(), ignore_index=-100).backward()
    ref = grads(model)
    n_global = sum(D.collate([r], 0).n_targets for r in rows)
    for b in (1, 2, 4, 8):
        model.zero_grad()
        micro = [D.collate(rows[i:i + b], pad_id=0) for i in range(0, 8, b)]
        assert len({m.n_targets for m in micro}) > 1 or b == 8  # micro-batches really hold different token counts
        accumulate_gradients(model, micro, n_global)
        for n, g in grads(model).items():
            torch.testing.assert_close(g, ref[n], rtol=1e-10, atol=1e-13, msg=f"{n} with micro-batches of {b}")
    # the mean-of-means normalisation (each micro-batch's mean / k) would not match: the test can fail
    model.zero_grad()
    for i in range(0, 8, 2):
        m = D.collate(rows[i:i + 2], 0)
        (F.cross_entropy(model(m.tokens).flatten(0, 1), m.targets.flatten(), ignore_index=-100) / 4).backward()
    wrong = grads(model)
    assert max((wrong[n] - ref[n]).abs().max() for n in ref) > 1e-6


def test_train_loss_sequence_independent_of_micro_batch_size():
    rows = random_rows(48, seed=1)
    losses = []
    for micro in (8, 2):
        model = tiny_model().double()
        cfg = TrainConfig(steps=4, batch_size=8, micro_batch_size=micro, lr=1e-2, warmup_steps=1, progress=False)
        losses.append([h["loss"] for h in train(model, rows, cfg, pad_id=0, ctx=Dist()).history])
    assert losses[0] == pytest.approx(losses[1], rel=1e-10)


def test_moe_auxiliary_loss_is_added():
    model = tiny_model(**ModelArgs.from_name("tiny-llama-4-scout", vocab_size=V).to_dict())
    model = model.double()
    rows = random_rows(4, seed=2)
    batch = D.collate(rows, 0)
    # reference: mean CE plus the model's own weighted auxiliary loss of the same forward
    logits = model(batch.tokens)
    ce = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=-100)
    aux = model.aux_loss()
    assert float(aux.detach()) > 0
    (ce + aux).backward()
    ref = grads(model)
    model.zero_grad()
    accumulate_gradients(model, [batch], batch.n_targets)
    got = grads(model)
    router = [n for n in ref if "router" in n]
    assert router
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-9, atol=1e-12)
    # without the auxiliary term the router gradient would differ
    model.zero_grad()
    F.cross_entropy(model(batch.tokens).flatten(0, 1), batch.targets.flatten(), ignore_index=-100).backward()
    assert (model.get_parameter(router[0]).grad - ref[router[0]]).abs().max() > 1e-8


# ---------------------------------------------------------------------------------------------------------------------
# schedule, clipping, optimizer groups


def test_warmup_cosine_values():
    f = WarmupCosine(warmup=2, total=12, min_ratio=0.1)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0)  # cosine starts at the peak
    assert f(11) == pytest.approx(0.1)  # and ends at min_ratio on the last step
    mid = 2 + (11 - 2) / 2
    assert WarmupCosine(2, 12, 0.1)(int(mid)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 9)))


def test_logged_lr_and_grad_norm():
    rows = random_rows(16, seed=3)
    model = tiny_model()
    reference = tiny_model()
    cfg = TrainConfig(steps=4, batch_size=8, micro_batch_size=8, lr=2e-3, warmup_steps=2, min_lr_ratio=0.5,
                      grad_clip=1e-3, progress=False)
    hist = train(model, rows, cfg, pad_id=0, ctx=Dist()).history
    assert [h["lr"] for h in hist] == pytest.approx([1e-3, 2e-3, 2e-3, 1e-3])
    # first step's gradient norm, computed independently from the same rows in the same order
    order = D.RowOrder(len(rows), seed=0).take(0, 8)
    b = D.collate([rows[i] for i in order], 0)
    F.cross_entropy(reference(b.tokens).flatten(0, 1), b.targets.flatten(), ignore_index=-100).backward()
    norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in reference.parameters()))
    # two float32 forward + backward passes (each reduction twice), then a sum of squares over the largest tensor
    T, largest = b.tokens.shape[1], max(p.numel() for p in reference.parameters())
    bound = tolerance(torch.float32, 2 * forward_reduction_length(reference.args, T) + largest)
    assert hist[0]["grad_norm"] == pytest.approx(float(norm), rel=bound)


def test_weight_decay_only_on_matrices():
    model = tiny_model()
    opt, _ = build_optimizer(model, TrainConfig(weight_decay=0.1))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for n, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim >= 2), n


# ---------------------------------------------------------------------------------------------------------------------
# NaN / inf guard


def test_nan_parameter_stops_with_step_and_cause():
    rows = random_rows(16)
    model = tiny_model()

    def poison(step, record):
        if step == 2:
            with torch.no_grad():
                model.layers[1].feed_forward.w2.weight[0, 0] = float("nan")

    cfg = TrainConfig(steps=5, batch_size=4, micro_batch_size=4, progress=False)
    with pytest.raises(NonFiniteLoss, match=r"step 3: .*parameters are non-finite \(layers\.1\.feed_forward\.w2"):
        train(model, rows, cfg, pad_id=0, callbacks=[poison], ctx=Dist())


def test_overflowing_logits_are_named():
    model = tiny_model()
    with torch.no_grad():
        model.output.weight.fill_(3e38)
    cfg = TrainConfig(steps=2, batch_size=4, micro_batch_size=4, progress=False)
    with pytest.raises(NonFiniteLoss, match=r"step 1: .*non-finite logits"):
        train(model, random_rows(8), cfg, pad_id=0, ctx=Dist())


# ---------------------------------------------------------------------------------------------------------------------
# precision, metrics files


def test_bf16_autocast_close_to_fp32():
    rows = random_rows(16, seed=4)
    out = {}
    for precision in ("fp32", "bf16-mixed"):
        model = tiny_model()
        cfg = TrainConfig(steps=3, batch_size=8, micro_batch_size=4, lr=3e-3, precision=precision, progress=False)
        out[precision] = [h["loss"] for h in train(model, rows, cfg, pad_id=0, ctx=Dist()).history]
        assert next(model.parameters()).dtype == torch.float32  # master weights stay fp32
    # autocast stores about 10 results per layer in bfloat16 (tests/reference/tolerance.py)
    bound = forward_tolerance(tiny_model().args, 20, torch.bfloat16, roundings_per_layer=10)
    assert out["bf16-mixed"] == pytest.approx(out["fp32"], rel=bound)
    assert out["bf16-mixed"] != out["fp32"]  # autocast really ran in bf16


def test_metrics_jsonl_and_csv(tmp_path):
    rows = random_rows(16)
    eval_rows = random_rows(4, seed=9)
    cfg = TrainConfig(steps=6, batch_size=4, micro_batch_size=2, log_every=2, eval_every=3, out_dir=str(tmp_path),
                      progress=False)
    seen = []
    res = train(tiny_model(), rows, cfg, pad_id=0, eval_rows=eval_rows, ctx=Dist(),
                evaluators=[lambda m: {"custom": 1.0}], callbacks=[lambda s, r: seen.append(s)])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 3, 4, 6] == seen  # every 2nd step, plus eval steps 3 and 6
    assert records == res.history
    assert "eval_loss" in records[1] and records[1]["custom"] == 1.0 and "eval_loss" not in records[0]
    csv = (tmp_path / "metrics.csv").read_text().splitlines()
    assert csv[0].split(",")[:3] == ["step", "loss", "lr"] and len(csv) == 5
    for r in records:
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and math.isfinite(r["loss"])
    assert res.tokens == sum(sum(len(rows[i]) for i in D.RowOrder(16, 0).take(s * 4, 4)) for s in range(6))


# ---------------------------------------------------------------------------------------------------------------------
# bad input


def test_world_size_that_does_not_fit():
    cfg = TrainConfig(steps=1, batch_size=8, micro_batch_size=2, progress=False)
    with pytest.raises(ValueError, match=r"batch_size=8 does not split over 3 processes; make it a multiple of 3 "
                                         r"\(or run 1 or 2 or 4 or 8 processes\)"):
        train(tiny_model(), random_rows(8), cfg, pad_id=0, ctx=Dist(rank=0, world_size=3))
    with pytest.raises(ValueError, match="gives 2 rows per rank, not a whole number of micro_batch_size=3; make "
                                         "batch_size a multiple of 12"):
        train(tiny_model(), random_rows(8), dataclasses.replace(cfg, micro_batch_size=3), pad_id=0,
              ctx=Dist(rank=0, world_size=4))


def test_micro_batch_size_defaults_to_one_per_rank():
    assert split_batch(TrainConfig(batch_size=16), 1) == (16, 16)
    assert split_batch(TrainConfig(batch_size=16), 2) == (8, 8)
    assert split_batch(TrainConfig(batch_size=16, micro_batch_size=4), 2) == (8, 4)


def test_output_directory_not_writable(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cfg = TrainConfig(steps=1, batch_size=2, micro_batch_size=2, out_dir=str(blocker / "run"), progress=False)
    with pytest.raises(ValueError, match="is not writable"):
        train(tiny_model(), random_rows(4), cfg, pad_id=0, ctx=Dist())


def test_nothing_to_train_and_bad_settings():
    model = tiny_model()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        train(model, random_rows(4), TrainConfig(steps=1, batch_size=2, micro_batch_size=2, progress=False),
              pad_id=0, ctx=Dist())
    with pytest.raises(ValueError, match="train.precision must be one of"):
        TrainConfig(precision="fp16")
    with pytest.raises(ValueError, match="train.steps must be a positive integer"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="train.lr must be > 0"):
        TrainConfig(lr=-1.0)
    all_masked = [D.Row([1, 2, 3], [D.IGNORE_INDEX] * 3)] * 4
    with pytest.raises(ValueError, match="no target token"):
        train(tiny_model(), all_masked, TrainConfig(steps=1, batch_size=2, micro_batch_size=2, progress=False),
              pad_id=0, ctx=Dist())
