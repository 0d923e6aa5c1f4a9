"""The `hf_models` fixture shared by test_checkpoint.py and test_checkpoint_errors.py: random float64 HF models,
built once per test module and per `ModelArgs`."""

from __future__ import annotations

import pytest
import torch

from hf_reference import random_hf_model
from llama import ModelArgs


@pytest.fixture(scope="module")
def hf_models():
    cache = {}

    def get(args: ModelArgs):
        key = repr(args)
        if key not in cache:
            cache[key] = random_hf_model(args, dtype=torch.float64)
        return cache[key]

    return get
