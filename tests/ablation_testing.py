"""What the two model-ablation test files share: a small synthetic corpus and a plain training loop."""

import torch
import torch.nn.functional as F


def toy_docs(n: int) -> list[str]:
    """n tiny Python-source documents (docstrings included), so no test depends on the stdlib's text."""
    return [f"def f{i}(x):\n    '''Return x plus {i}, the {i}-th helper of this module.'''\n    return x + {i}\n" * 3
            for i in range(n)]


def adamw_loop(model, examples, spec, on_step=None):
    """A plain training loop (independent of peft.train): masked next-byte CE + the model's weighted aux loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr)
    losses = []
    for step in range(spec.steps):
        batch = examples[step * spec.batch_size:(step + 1) * spec.batch_size]
        x, y = torch.tensor([e[0] for e in batch]), torch.tensor([e[1] for e in batch])
        ce = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
        (ce + model.aux_loss()).backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(ce.detach()))
        if on_step:
            on_step(step + 1)
    return losses
