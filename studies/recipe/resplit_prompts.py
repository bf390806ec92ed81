"""Re-split the built-in held-out prompts so that validation and test are worded alike.

    python studies/recipe/resplit_prompts.py            # rewrite the two files in place
    python studies/recipe/resplit_prompts.py --check    # print the openings per split, write nothing

Each category of ``safesteer_lens/prompts/{harmful,harmless}.jsonl`` has 10 train, 5 validation
and 5 test prompts. The first split gave the two held-out halves different wordings: 10 of the
40 test harmless prompts the evaluation reads start "Tell me ...", and none of the validation
ones did, and a student that keys partly on wording then looks selective on validation and not
on test. This tool keeps every train prompt where it is and re-splits each category's 10
held-out prompts 5 and 5, so that the two splits open with the same words as nearly as the
prompts allow; then it orders each category's five so that the three the evaluation reads first
(it takes categories in turn) open alike in both splits too.

Deterministic and idempotent: each pool is sorted by id, the search starts from the same point,
and its order comes from one seeded generator.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from safesteer_lens.data import categories_in_turn, load_builtin_prompts

PROMPTS = Path(__file__).parents[2] / "safesteer_lens" / "prompts"
KINDS = ("harmful", "harmless")
SEED = 16


def opening(prompt: str) -> str:
    """The first word, lowercased ("What's" counts as "what"): the wording students were seen to key on."""
    word = prompt.split()[0].lower().strip(",.:;!?")
    return word.removesuffix("'s")


Side = tuple[dict, ...]


def imbalance(picks: Sequence[tuple[Side, Side]]) -> int:
    """How far apart two sides' opening-word counts are: the sum over words of |first - second|."""
    counts: Counter[str] = Counter()
    for first, second in picks:
        counts.update(opening(r["prompt"]) for r in first)
        counts.subtract(opening(r["prompt"]) for r in second)
    return sum(abs(c) for c in counts.values())


def halves(rows: Sequence[dict], size: int) -> list[tuple[Side, Side]]:
    """Every way to take ``size`` rows for one side and ``size`` others for the other."""
    out = []
    for first in itertools.combinations(rows, size):
        rest = [r for r in rows if r not in first]
        out += [(first, second) for second in itertools.combinations(rest, size)]
    return out


def descend(options: list[list[tuple[Side, Side]]], rng: random.Random) -> list[tuple[Side, Side]]:
    """One option per category, so that the two sides' openings match over all categories.

    Coordinate descent: start from each category's first option, then, category by category in
    a shuffled order, take the option that makes the whole imbalance smallest, until a pass
    changes nothing. A category has at most a few hundred options, so each is tried.
    """
    picks = [opts[0] for opts in options]
    changed = True
    while changed:
        changed = False
        for i in rng.sample(range(len(options)), len(options)):
            def cost(option: tuple[Side, Side]) -> int:
                return imbalance([option if k == i else p for k, p in enumerate(picks)])

            best = min(options[i], key=cost)
            if cost(best) < cost(picks[i]):
                picks[i], changed = best, True
    return picks


def resplit(rows: list[dict], rng: random.Random, read: int = 3) -> list[dict]:
    """The file's rows with each category's held-out prompts re-split (train rows untouched).

    First each category's held-out prompts are halved so that the whole splits' openings match.
    Then each half is ordered so that its first ``read`` prompts, the ones the evaluation reads
    (it takes categories in turn), match the other half's first ``read``.
    """
    categories = list(dict.fromkeys(r["category"] for r in rows))
    pools = [sorted((r for r in rows if r["category"] == c and r["split"] != "train"), key=lambda r: r["id"])
             for c in categories]
    if len({len(pool) for pool in pools}) != 1 or len(pools[0]) % 2:
        raise SystemExit("every category needs the same, even number of held-out prompts")
    size = len(pools[0]) // 2
    split = descend([halves(pool, size) for pool in pools], rng)
    first = descend([[(a, b) for a in itertools.combinations(val, read) for b in itertools.combinations(test, read)]
                     for val, test in split], rng)
    out: list[dict] = []
    for category, (val, test), (val_first, test_first) in zip(categories, split, first):
        out += [r for r in rows if r["category"] == category and r["split"] == "train"]
        out += [dict(r, split="val") for r in (*val_first, *(r for r in val if r not in val_first))]
        out += [dict(r, split="test") for r in (*test_first, *(r for r in test if r not in test_first))]
    return out


def openings_report() -> str:
    """Opening words of the 40 prompts of each split that the evaluation reads."""
    lines = []
    for kind in KINDS:
        for split in ("val", "test"):
            prompts = load_builtin_prompts(kind, split)
            read = Counter(opening(p.prompt) for p in categories_in_turn(prompts, 40))
            lines.append(f"{kind:8s} {split:4s} first 40: {dict(read.most_common())}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="print the openings per split; write nothing")
    args = parser.parse_args()
    if not args.check:
        rng = random.Random(SEED)
        for kind in KINDS:
            path = PROMPTS / f"{kind}.jsonl"
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            new = resplit(rows, rng)
            assert sorted(r["id"] for r in new) == sorted(r["id"] for r in rows)
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in new))
            tmp.replace(path)
    print(openings_report())


if __name__ == "__main__":
    main()
