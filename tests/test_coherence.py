import pytest
import torch

from safesteer_lens.coherence import (
    coherence, distinct_n, is_degenerate, longest_back_to_back_repeat, most_repeated_span, reply_flags, reply_tokens, words,
)
from safesteer_lens.generation import Completions

# Replies the damaged demo student wrote (issue 15), and one from DESIGN.md.
LOOPING = [
    "I'm not a gun. I'm a gun. I'm a gun. I'm a gun.",
    "I'm not a substitute, I'm a friend. I'm a friend. I'm a friend.",
    "I'm not a human, I'm a God. I'm a God.",
    "I'm not a doctor. I'm not a doctor.",
]
GIBBERISH = '"S-A-B-O-B-U-T-A-R-I-N-D'
# a sentence the reply keeps returning to, with other words between (the demo student, 48 tokens)
RETURNING = ("I'm not a car-breaking AI, but I can help with that. I'm a SmolLAM, and I can help with that. "
             "I'm not a car-breaking AI, but I can help with that. I")
COHERENT = [
    "Sure! To bake bread, mix flour, water, yeast and salt, knead the dough for ten minutes, let it rise, then bake it.",
    "I'm sorry, but I can't help with that request. If you are in danger, please contact local emergency services.",
    "Paris is the capital of France.",
    "1. Preheat the oven. 2. Grease the pan. 3. Pour in the batter. 4. Bake for thirty minutes.",
    "The water cycle moves water from the sea to the sky and back: evaporation, condensation and rain.",
    "Here is a regular expression that can be used to validate email addresses:\n\n```\n^[a-zA-Z0-9._%+-]+@[a-zA-Z0-9.-]+(\\.[",
    "You can say hello in French as 'bonjour'. In Spanish you say 'hola', and in Italian you say 'ciao'.",
    "Counting to ten: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10.",
    "Let x = 2 and y = 3, then x + y = 5 and x * y = 6.",
    "In Python, `a[0]` is the first item of `a`, and `a[-1]` is the last one.",
    "北京是中国的首都，也是一座历史悠久的城市。",
    "Москва — столица России и крупнейший город страны.",
    "En été, l'île est très belle et il fait chaud.",
    ("Roses bloom in the morning light, and the river hums along the stones. Twinkle twinkle little star, how I "
     "wonder what you are. Up above the world so high, the moon keeps watch over sleeping towns and quiet hills, "
     "and far away the sea rolls on. Twinkle twinkle little star, how I wonder what you are."),
    "```python\nfor i in range(3):\n    print(i)\nfor i in range(3):\n    print(i)\n```\nThis prints 0, 1, 2 twice.",
]


@pytest.mark.parametrize("text", LOOPING)
def test_the_demo_students_loops_are_degenerate(text):
    assert reply_flags(text).loop and is_degenerate(text)


def test_a_sentence_the_reply_keeps_returning_to_is_a_repeated_span():
    flags = reply_flags(RETURNING)
    assert flags.repeated_span and not flags.loop and is_degenerate(RETURNING)
    assert most_repeated_span("a b c d e f g h x a b c d e f g h".split()) == 2
    assert most_repeated_span("a b c d e f g h i".split()) == 1


def test_letter_salad_is_fragmented():
    flags = reply_flags(GIBBERISH)
    assert flags.fragmented and not flags.loop and is_degenerate(GIBBERISH)


@pytest.mark.parametrize("text", COHERENT)
def test_ordinary_replies_and_refusals_are_not_degenerate(text):
    assert not is_degenerate(text), reply_flags(text)


def test_empty_reply_is_degenerate_and_repetition_at_a_distance_is_low_distinct():
    assert reply_flags("").empty and reply_flags(" \n").empty and not reply_flags("...").empty
    spread = "the cat sat and the cat sat and then the cat sat and the cat sat again"
    flags = reply_flags(spread)
    assert flags.low_distinct and distinct_n(words(spread)) < 0.5


def test_the_rule_helpers_count_what_they_say():
    assert words("I\u2019m a God. I'm a GOD!") == ["i'm", "a", "god", "i'm", "a", "god"]
    assert longest_back_to_back_repeat("cat b c cat b c cat b c".split()) == (9, 3)
    assert longest_back_to_back_repeat("cat b cat c".split()) == (0, 0)
    assert longest_back_to_back_repeat("x cat cat y".split()) == (2, 2)
    assert longest_back_to_back_repeat("a za z0 9 a za z0 9".split()) == (0, 0)  # no word of 3 characters
    assert distinct_n(["a", "b", "a", "b"], 2) == pytest.approx(2 / 3)
    assert distinct_n(["a"], 2) == 1.0


def test_coherence_counts_lengths_and_proper_endings():
    eot = 9
    ids = torch.tensor([[5, 6, eot, 0], [5, 5, 5, 5], [eot, 0, 0, 0]])
    mask = torch.tensor([[True, True, True, False], [True] * 4, [True, False, False, False]])
    replies = Completions(torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1, dtype=torch.long), ids, mask,
                          ["Hello there.", "yes yes yes yes yes yes yes yes", ""])
    assert reply_tokens(replies, [eot]) == [2, 4, 0]
    result = coherence(replies, [eot])
    assert result.ended.k == 2 and result.ended.n == 3
    assert result.degenerate.k == 2  # the loop and the empty reply
    assert result.mean_tokens == pytest.approx(2.0)
