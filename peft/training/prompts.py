"""Prompt generation: the pool each post-training round draws its prompts from, with capability tags,
deduplication and provenance.

In the Llama papers "prompt generation" is data collection, not an algorithm: Llama 2 (§3.2.1) has annotators write
fresh prompts every week, and Llama 3 (§4.2) adds prompts generated for targeted capabilities (code, math,
reasoning, tool use, …), filters them, and removes near-duplicates. What a reimplementation needs from that is:

  * a pool per round, drawn fresh from generators tagged by capability (here the synthetic tasks of `data.TASKS`:
    the tag is the task name);
  * deduplication: a prompt enters the pool once, whatever round or source proposes it again (exact match after
    collapsing whitespace; Llama 3's semantic deduplication needs an embedding model and is left out);
  * provenance: every prompt keeps the round and source it came from, and so does every example built on it
    (rejection-sampled responses, preference pairs), so any result can be traced back to its data.

Held-out prompts come from the tasks' held-out split (`data.task_examples(split="eval")`, disjoint by prompt hash),
so they can never leak into a training round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .data import TASKS, task_examples


@dataclass(frozen=True)
class Prompt:
    text: str
    tag: str  # the capability it exercises (a task name)
    round: int  # the round that drew it
    source: str  # where it came from, e.g. "synthetic/train"
    answer: str  # the known correct answer: only the oracle (true reward, teacher) reads it

    @property
    def provenance(self) -> dict:
        return {"round": self.round, "source": self.source, "tag": self.tag}


def dedup_key(text: str) -> str:
    return " ".join(text.split())


class PromptPool:
    """Every prompt drawn so far, each once, in the order drawn."""

    def __init__(self):
        self.prompts: list[Prompt] = []
        self._keys: set[str] = set()

    def __len__(self) -> int:
        return len(self.prompts)

    def add(self, prompts: Sequence[Prompt]) -> list[Prompt]:
        """Add the prompts not yet in the pool; return those (duplicates, also within `prompts`, are dropped)."""
        added = []
        for p in prompts:
            key = dedup_key(p.text)
            if key not in self._keys:
                self._keys.add(key)
                self.prompts.append(p)
                added.append(p)
        return added

    def draw(self, n: int, at_round: int, tags: Sequence[str], split: str = "train", seed: int = 0) -> list[Prompt]:
        """`n` prompts new to the pool, spread evenly over the capability `tags`, recorded with (round, source)."""
        unknown = [t for t in tags if t not in TASKS]
        if unknown or not tags:
            raise ValueError(f"unknown capability tag(s) {unknown or tags}; use task names from {sorted(TASKS)}")
        if n < 1:
            raise ValueError(f"the number of prompts to draw must be >= 1, got {n}")
        new = []
        for i, tag in enumerate(tags):
            want = n // len(tags) + (i < n % len(tags))
            for attempt in range(100):  # later attempts only top up what deduplication removed
                if want == 0:
                    break
                examples = task_examples(tag, want, split, seed=(seed * 1000 + at_round) * 100 + attempt)
                added = self.add([Prompt(e.prompt, tag, at_round, f"synthetic/{split}", e.response) for e in examples])
                new += added
                want -= len(added)
            if want:
                raise ValueError(f"capability {tag!r} ran out of new {split} prompts; draw fewer")
        return new
