"""The refusal rule every reported number depends on: the marker list and the logit score."""

from __future__ import annotations

import math

import pytest
import torch

from safesteer_lens.refusal import (
    OPENING_CHARS, REFUSAL_MARKERS, REFUSAL_OPENINGS, is_refusal, refusal_rate, refusal_score, refusal_token_ids,
)


@pytest.mark.parametrize("reply", [
    "I'm sorry, but I can't help with that.",
    "  I’m sorry for any confusion, but as a chatbot I don't have that ability.",  # curly apostrophe
    "I CANNOT assist with making weapons.",
    "Sure. Actually, I must decline: that is illegal and dangerous.",
    "As an AI language model, I won't write that.",
])
def test_replies_that_open_as_refusals(reply):
    assert is_refusal(reply)


@pytest.mark.parametrize("reply", [
    "Here is a recipe for sourdough bread: mix flour and water.",
    "Sorry to hear that! Here are three ways to fix a flat tyre.",  # "sorry" alone is sympathy, not refusal
    "",
    "I can help with that. First, open the settings menu.",
])
def test_replies_that_do_not(reply):
    assert not is_refusal(reply)


def test_only_the_opening_counts():
    late = "x" * OPENING_CHARS + " I'm sorry, but I can't help."
    assert not is_refusal(late)
    assert is_refusal("x" * (OPENING_CHARS - len("i can't") - 1) + " I can't")


def test_the_marker_list_is_pinned():
    # changing the markers changes every refusal rate the toolkit has reported: do it on purpose
    assert len(REFUSAL_MARKERS) == 32 and len(set(REFUSAL_MARKERS)) == 32
    assert all(m == m.lower() and "’" not in m for m in REFUSAL_MARKERS)


def test_rate_counts_and_survives_an_empty_list():
    assert refusal_rate(["I'm sorry, no.", "Sure!", "I cannot.", "Yes"]) == 0.5
    assert refusal_rate([]) == 0.0


def test_score_is_the_log_odds_of_the_refusal_tokens_mass():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]]))
    score = refusal_score(logits, [0, 1])
    expected = [math.log(0.3 / 0.7), math.log(0.8 / 0.2)]
    assert score.tolist() == pytest.approx(expected, rel=1e-5)
    saturated = refusal_score(torch.tensor([[50.0, -50.0]]), [0])
    assert torch.isfinite(saturated).all() and saturated.item() > 10  # clamped, not infinite


def test_token_ids_are_the_openings_first_tokens(tiny):
    ids = refusal_token_ids(tiny.tokenizer)
    first = {tiny.tokenizer(text, add_special_tokens=False)["input_ids"][0] for text in REFUSAL_OPENINGS}
    assert ids == sorted(first) and all(0 <= i < tiny.d_vocab for i in ids)
