"""Is a chat reply coherent? Pinned, testable rules for degenerate replies.

Perplexity on prose does not see a model that loops or rambles in chat: a damaged student can
keep its perplexity and still answer "I'm not a gun. I'm a gun. I'm a gun.". These rules read
the reply itself, as lower-cased words (runs of letters or digits in any script, inner
apostrophes kept; each Chinese, Japanese or Korean character is a word), so punctuation and
spacing do not hide a repeat. A reply is **degenerate** when any of these holds:

* ``loop``: a span of words, one of them at least 3 characters long, repeats back to back over
  :data:`LOOP_MIN_WORDS` words or more, 3 times or more, or (outside code) twice over at least
  :data:`MIN_SHARE` of the reply ("i'm a god i'm a god" is 3 words twice; a shebang line
  written three times in a code block is a loop; the character classes of a regular
  expression, "a-zA-Z0-9 ... a-zA-Z0-9", are not);
* ``repeated_span``: outside code blocks, some run of :data:`REPEAT_SPAN_WORDS` words occurs
  twice or more, with other words between, and its copies cover at least :data:`MIN_SHARE` of
  the reply (a sentence the reply keeps coming back to, not a poem's refrain);
* ``low_distinct``: outside code blocks, among at least :data:`DISTINCT_MIN_BIGRAMS` word
  bigrams, fewer than :data:`MIN_DISTINCT_2` of them are distinct;
* ``fragmented``: outside code, at least :data:`FRAGMENT_MIN_WORDS` words, and more than half
  of them are single letters other than "a" and "I" (letter salad such as
  "S-A-B-O-B-U-T-A-R-I-N-D"; numbers, formulas and code are not salad);
* ``empty``: nothing but white space.

Known limits: a reply that is nothing but a short refrain sung twice ("Happy birthday to you,
happy birthday to you") counts as a loop. Changing a constant here changes every reported
degenerate-reply rate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch

from safesteer_lens.generation import Completions
from safesteer_lens.stats import Rate

LOOP_MIN_WORDS = 6
REPEAT_SPAN_WORDS = 8
MIN_SHARE = 0.4
MIN_DISTINCT_2 = 0.5
DISTINCT_MIN_BIGRAMS = 8
FRAGMENT_MIN_WORDS = 8

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af"
_WORD = re.compile(rf"[{_CJK}]|(?:(?![{_CJK}])[^\W_])+(?:'(?:(?![{_CJK}])[^\W_])+)*")
_CODE = re.compile(r"```.*?(?:```|$)|`[^`\n]*`", re.DOTALL)


def words(text: str) -> list[str]:
    """Lower-cased words of a reply (typographic apostrophes read as plain ones)."""
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def prose(text: str) -> str:
    """The reply without its code: fenced blocks (closed or cut off) and inline code spans."""
    return _CODE.sub(" ", text)


def longest_back_to_back_repeat(tokens: Sequence[str]) -> tuple[int, int]:
    """The longest run of one span repeated back to back: ``(words covered, copies)``.

    Only spans holding a word of 3 or more characters count. "cat b c cat b c cat b c" gives
    ``(9, 3)``; "cat b cat c" gives ``(0, 0)``.
    """
    best = (0, 0)
    n_words = len(tokens)
    for span in range(1, n_words // 2 + 1):
        for start in range(0, n_words - 2 * span + 1):
            if all(len(t) < 3 for t in tokens[start : start + span]):
                continue
            copies = 1
            while tokens[start + copies * span : start + (copies + 1) * span] == tokens[start : start + span]:
                copies += 1
            if copies >= 2:
                best = max(best, (copies * span, copies))
    return best


def most_repeated_span(tokens: Sequence[str], span: int = REPEAT_SPAN_WORDS) -> int:
    """Copies of the run of ``span`` words that occurs most often, overlapping copies not counted."""
    last_end: dict[tuple[str, ...], int] = {}
    copies: dict[tuple[str, ...], int] = {}
    for i in range(len(tokens) - span + 1):
        gram = tuple(tokens[i : i + span])
        if i >= last_end.get(gram, 0):
            copies[gram] = copies.get(gram, 0) + 1
            last_end[gram] = i + span
    return max(copies.values(), default=0)


def distinct_n(tokens: Sequence[str], n: int = 2) -> float:
    """Distinct n-grams over all n-grams (1.0 when there are none)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


@dataclass(frozen=True)
class ReplyFlags:
    """Which degeneracy rules a reply breaks (see the module docstring)."""

    loop: bool
    repeated_span: bool
    low_distinct: bool
    fragmented: bool
    empty: bool

    @property
    def degenerate(self) -> bool:
        """True when any rule holds."""
        return self.loop or self.repeated_span or self.low_distinct or self.fragmented or self.empty


def reply_flags(text: str) -> ReplyFlags:
    """Apply the pinned rules to one reply."""
    covered, copies = longest_back_to_back_repeat(words(text))
    outside = words(prose(text))
    covered_outside, _ = longest_back_to_back_repeat(outside)
    repeats = most_repeated_span(outside)
    letters = sum(len(t) == 1 and t.isalpha() and t not in "ai" and not _is_cjk(t) for t in outside)
    return ReplyFlags(
        loop=(covered >= LOOP_MIN_WORDS and copies >= 3)
        or covered_outside >= max(LOOP_MIN_WORDS, MIN_SHARE * len(outside)),
        repeated_span=repeats >= 2 and repeats * REPEAT_SPAN_WORDS >= MIN_SHARE * len(outside),
        low_distinct=len(outside) - 1 >= DISTINCT_MIN_BIGRAMS and distinct_n(outside, 2) < MIN_DISTINCT_2,
        fragmented=len(outside) >= FRAGMENT_MIN_WORDS and letters > len(outside) / 2,
        empty=not text.strip(),
    )


def _is_cjk(char: str) -> bool:
    return re.fullmatch(f"[{_CJK}]", char) is not None


def is_degenerate(text: str) -> bool:
    """True when a reply loops, repeats itself, falls apart into characters or is empty."""
    return reply_flags(text).degenerate


@dataclass(frozen=True)
class Coherence:
    """Coherence of a set of greedy replies.

    Attributes:
        degenerate_flags: Per reply, whether it is degenerate (:func:`is_degenerate`).
        ended_flags: Per reply, whether it stopped at the end-of-turn token within the token
            budget (a reply cut off by ``max_new_tokens`` did not end properly).
        mean_tokens: Mean reply length in tokens, the end-of-turn token not counted.
    """

    degenerate_flags: tuple[bool, ...]
    ended_flags: tuple[bool, ...]
    mean_tokens: float

    @property
    def degenerate(self) -> Rate:
        """Share of degenerate replies."""
        return Rate.of(self.degenerate_flags)

    @property
    def ended(self) -> Rate:
        """Share of replies that ended properly."""
        return Rate.of(self.ended_flags)


def reply_ended(replies: Completions, eot_ids: Sequence[int]) -> list[bool]:
    """Per reply, whether it produced an end-of-turn token."""
    eot = torch.isin(replies.completion_ids, torch.tensor(list(eot_ids), device=replies.completion_ids.device))
    return (eot & replies.completion_mask).any(dim=1).tolist()


def reply_tokens(replies: Completions, eot_ids: Sequence[int], ended: Sequence[bool] | None = None) -> list[int]:
    """Per reply, the tokens it generated before its end-of-turn token (``ended``: :func:`reply_ended`, if known)."""
    ended = reply_ended(replies, eot_ids) if ended is None else ended
    return (replies.completion_mask.long().sum(dim=1).cpu() - torch.tensor(list(ended), dtype=torch.long)).tolist()


def coherence(replies: Completions, eot_ids: Sequence[int]) -> Coherence:
    """Degenerate-reply share, properly ended share and mean length of a set of replies."""
    ended = reply_ended(replies, eot_ids)
    lengths = reply_tokens(replies, eot_ids, ended)
    return Coherence(
        degenerate_flags=tuple(is_degenerate(t) for t in replies.texts),
        ended_flags=tuple(ended),
        mean_tokens=sum(lengths) / len(lengths) if lengths else 0.0,
    )
