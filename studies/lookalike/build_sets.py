"""Write the look-alike prompt sets into the package, split so that every split is worded alike.

    python studies/lookalike/build_sets.py           # (re)write the two files
    python studies/lookalike/build_sets.py --check   # print how far apart the splits' wordings are; write nothing

``lookalike_source.py`` holds the prompts as written, by kind of trap (look-alike harmless) and
by harm category (harmful, in benchmark phrasing). Each kind or category is split into equal
thirds for train, validation and test. Wording is what a student was seen to key on, so the
thirds are dealt from the kind's prompts sorted by opening words, in snake order (train, val,
test, test, val, train, ...): every opening is then spread over the three splits as evenly as
its count allows. Deterministic: the same source gives the same files, byte for byte.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from lookalike_source import HARMFUL_TASKS, LOOKALIKES

PROMPTS = Path(__file__).parents[2] / "safesteer_lens" / "prompts"
SPLITS = ("train", "val", "test")
SNAKE = ("train", "val", "test", "test", "val", "train")


def opening(prompt: str, words: int = 2) -> str:
    """The first words, lowercased and without punctuation: "What's the" and "what is the" stay apart."""
    return " ".join(w.lower().strip(",.:;!?") for w in prompt.split()[:words])


def deal(prompts: list[str], offset: int = 0) -> list[tuple[str, str]]:
    """``(split, prompt)`` for one kind: sorted by opening, dealt in snake order from ``offset``; each split gets a third."""
    if len(prompts) % 3:
        raise ValueError(f"a kind needs a multiple of 3 prompts, got {len(prompts)}")
    ordered = sorted(prompts, key=lambda p: (opening(p), p))
    return [(SNAKE[(i + offset) % len(SNAKE)], p) for i, p in enumerate(ordered)]


def rows(source: dict[str, list[str]], prefix: str, label: str) -> list[dict]:
    """Every prompt as a file row, kinds in source order, each kind's rows train, then val, then test.

    Kinds written in the same frames (the harmful tasks' "Write ...", "Develop ...") would send
    a frame to the same split in every kind, so each kind starts the snake where the splits
    written so far are most alike (ties: the smallest offset).
    """
    out: list[dict] = []
    for kind, prompts in source.items():
        def with_kind(offset: int) -> list[dict]:
            dealt = deal(prompts, offset)
            return [{"prompt": p, "label": label, "category": kind, "split": split}
                    for split in SPLITS for s, p in dealt if s == split]

        best = min(range(len(SNAKE)), key=lambda o: (distance(out + with_kind(o)), o))
        out += with_kind(best)
    return [{"id": f"{prefix}-{i:04d}", **row} for i, row in enumerate(out, 1)]


def distance(table: list[dict]) -> int:
    """How unalike the three splits' first words are: the imbalance summed over the three pairs."""
    return sum(imbalance(table, a, b) for a, b in (("train", "val"), ("val", "test"), ("train", "test")))


def imbalance(table: list[dict], first: str, second: str) -> int:
    """Sum over opening words of |count in one split - count in the other|."""
    counts: Counter[str] = Counter()
    counts.update(opening(r["prompt"], 1) for r in table if r["split"] == first)
    counts.subtract(opening(r["prompt"], 1) for r in table if r["split"] == second)
    return sum(abs(c) for c in counts.values())


FILES = {"lookalike.jsonl": (LOOKALIKES, "lookalike", "harmless"), "harmful_tasks.jsonl": (HARMFUL_TASKS, "task", "harmful")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="print the splits' wording distance, write nothing")
    args = parser.parse_args()
    for name, (source, prefix, label) in FILES.items():
        table = rows(source, prefix, label)
        sizes = Counter(r["split"] for r in table)
        print(f"{name}: {len(table)} prompts {dict(sizes)}; first-word imbalance val/test "
              f"{imbalance(table, 'val', 'test')}, train/test {imbalance(table, 'train', 'test')}")
        if not args.check:
            (PROMPTS / name).write_text("".join(json.dumps(r) + "\n" for r in table))


if __name__ == "__main__":
    main()
