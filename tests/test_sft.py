"""SFT: loss on response tokens and EOS only; packing (blocked attention, restarted positions) equals no packing."""

import math

import pytest
import torch

from llama import ModelArgs, Transformer
from peft.training import data as D
from peft.training.loop import forward, token_loss_sum
from tests.reference.tolerance import tolerance


class SmallCharTokenizer:
    bos_id, eos_id, pad_id = 1, 2, 3
    stop_tokens = (2,)

    def encode(self, s, *, bos, eos):
        return [1] * bos + [4 + ord(c) % 40 for c in s] + [2] * eos


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=48, multiple_of=16,
                              max_seq_len=64)).double()
    return m


EXAMPLES = [D.Example("Sort: 312\nAnswer:", "123"), D.Example("Add: 1+1\nAnswer:", "2"),
            D.Example("Reverse: 98\nAnswer:", "89"), D.Example("Q", "a longer answer here"),
            D.Example("Recall: a=1 b=2; b?\nAnswer:", "2")]


@torch.no_grad()
def reference_loss(model, examples, tok):
    """Σ over examples and response positions of −log p(next id), run one example at a time, by an explicit loop
    over positions (no IGNORE_INDEX, no packing, no batching), divided by the number of response tokens."""
    total, count = 0.0, 0
    for ex in examples:
        prompt = tok.encode(ex.prompt, bos=True, eos=False)
        ids = prompt + tok.encode(ex.response, bos=False, eos=True)
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0], dim=-1)
        for t in range(len(prompt) - 1, len(ids) - 1):  # predicting ids[t+1]: every response id and the EOS
            total -= float(logp[t, ids[t + 1]])
            count += 1
    return total / count, count


@torch.no_grad()
def batch_loss(model, batch):
    logits, _ = forward(model, batch)
    return float(token_loss_sum(logits, batch.targets)) / batch.n_targets, batch.n_targets


def test_masked_loss_matches_reference(model):
    tok = SmallCharTokenizer()
    seqs = [D.encode_sft(e, tok, 64) for e in EXAMPLES]
    ref, n_ref = reference_loss(model, EXAMPLES, tok)
    loss, n = batch_loss(model, D.collate(D.single_rows(seqs), tok.pad_id))
    assert n == n_ref == sum(len(tok.encode(e.response, bos=False, eos=True)) for e in EXAMPLES)
    assert loss == pytest.approx(ref, rel=1e-12)


def test_packed_loss_equals_unpacked(model):
    tok = SmallCharTokenizer()
    seqs = [D.encode_sft(e, tok, 64) for e in EXAMPLES]
    rows = D.pack(seqs, 40)
    assert len(rows) < len(seqs) and any(r.segments[-1] > 0 for r in rows)  # really packed
    ref, _ = reference_loss(model, EXAMPLES, tok)
    packed, _ = batch_loss(model, D.collate(rows, tok.pad_id, length=40))
    assert packed == pytest.approx(ref, rel=1e-12)
    # naive concatenation (no segment ids: later examples attend to earlier ones, positions keep counting) differs
    naive = D.collate([D.Row(r.tokens, r.targets) for r in rows], tok.pad_id, length=40)
    naive_loss, _ = batch_loss(model, naive)
    assert abs(naive_loss - ref) > 1e-4


def test_packed_gradient_equals_unpacked(model):
    tok = SmallCharTokenizer()
    seqs = [D.encode_sft(e, tok, 64) for e in EXAMPLES]

    def grads(batch):
        model.zero_grad()
        logits, _ = forward(model, batch)
        (token_loss_sum(logits, batch.targets) / batch.n_targets).backward()
        return [p.grad.clone() for p in model.parameters()]

    g_packed = grads(D.collate(D.pack(seqs, 40), tok.pad_id, length=40))
    g_single = grads(D.collate(D.single_rows(seqs), tok.pad_id))
    for a, b in zip(g_packed, g_single):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    model.zero_grad()


def test_eos_is_a_target_and_padding_is_not(model):
    tok = SmallCharTokenizer()
    seqs = [D.encode_sft(e, tok, 64) for e in EXAMPLES]
    batch = D.collate(D.single_rows(seqs), tok.pad_id)
    lengths = [len(s) for s in seqs]
    for i, n in enumerate(lengths):
        assert batch.targets[i, n - 1] == tok.eos_id  # the last real position predicts EOS
        assert (batch.targets[i, n:] == D.IGNORE_INDEX).all()  # padding carries no loss
    assert int((batch.targets == tok.eos_id).sum()) == len(EXAMPLES)
    # the token ids at padded positions do not matter
    pads = batch.targets == D.IGNORE_INDEX
    pads[:, :max(lengths)] &= torch.arange(max(lengths))[None, :] >= torch.tensor(lengths)[:, None]
    other = D.Batch(torch.where(pads, torch.full_like(batch.tokens, 7), batch.tokens), batch.targets, None,
                    batch.n_tokens)
    assert (other.tokens != batch.tokens).any()
    assert batch_loss(model, other)[0] == pytest.approx(batch_loss(model, batch)[0], rel=1e-12)


def test_loss_is_log_vocab_for_uniform_model():
    """An independent anchor: a model with zero output weights predicts uniformly, so the mean loss is log V."""
    m = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=48, multiple_of=16, max_seq_len=64))
    torch.nn.init.zeros_(m.output.weight)
    tok = SmallCharTokenizer()
    batch = D.collate(D.pack([D.encode_sft(e, tok, 64) for e in EXAMPLES], 40), tok.pad_id, 40)
    # float32 log-sum-exp over the 48 zero logits, then the mean over the target tokens
    n_targets = int((batch.targets != -100).sum())
    assert batch_loss(m, batch)[0] == pytest.approx(math.log(48), rel=tolerance(torch.float32, 48 + 2 + n_targets))
