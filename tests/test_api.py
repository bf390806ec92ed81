"""The public API: one import line reaches every stage."""

from __future__ import annotations

import safesteer_lens


def test_every_public_name_is_importable_and_documented():
    assert len(set(safesteer_lens.__all__)) == len(safesteer_lens.__all__)
    for name in safesteer_lens.__all__:
        value = getattr(safesteer_lens, name)
        if callable(value):
            assert (value.__doc__ or "").strip(), f"{name} has no docstring"


def test_the_stages_come_from_the_package_itself():
    from safesteer_lens import find_direction, run_pipeline, select_safety_tokens, train
    from safesteer_lens.directions import find_direction as stage_1
    from safesteer_lens.distill import train as stage_3
    from safesteer_lens.pipeline import run_pipeline as everything
    from safesteer_lens.tokens import select_safety_tokens as stage_2

    assert (find_direction, select_safety_tokens, train, run_pipeline) == (stage_1, stage_2, stage_3, everything)
