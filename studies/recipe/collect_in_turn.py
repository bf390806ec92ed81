"""Write the tables of the rounds evaluated with the prompts' categories in turn.

    python studies/recipe/collect_in_turn.py --run runs/demo

The earlier rounds (``collect.py``) were evaluated on the first 40 prompts of each kind in
file order, which ask about 8 of the 13 categories. These rounds' evaluation takes the
categories in turn (``EvalConfig.mix_categories``), so their 40 ask about all 13:

- ``categories``: the preset against ``mix_categories=True`` (the training and anchor
  prompts also taken categories in turn), seeds 0-2 of each;
- ``full-anchor``: the anchor scored over the whole vocabulary (``anchor_loss=full-reverse``)
  instead of over S, at the preset's weight 0.75 (seed 0; stopped after it, see the README);
- ``full-anchor-w``: the same anchor at weight 0.2 (seed 0; stopped after it);
- ``teacher``: a milder teacher (``teacher_coeff=1.0`` against the direction's 1.5), seeds 0-2;
- ``teacher-epochs``: the milder teacher with three epochs (seeds 0-2), and ``teacher_coeff=1.25``
  with three epochs (seed 0);
- ``teacher-lr``: ``teacher_coeff=1.0``, three epochs, lr 2e-3 (seed 0; stopped after it);
- ``opener`` (in ``--opener-run``, whose S is the demo run's plus the refusal's opener "I"): the
  preset's teacher (seed 0) and ``teacher_coeff=1.0`` (seeds 0-2).

``val_trials_in_turn.csv``: those rounds' trials (validation split) and the base row; the
``openers`` column says which S a trial trained on (0: the vote's, 1: with the opener).
``test_seeds_in_turn.csv``: the ``test-in-turn`` sweep (test split, the earlier preset).
``test_seeds_opener.csv``: the ``test-opener`` sweep (test split, the preset with the opener).
``figures/study_in_turn.png``: the validation trade-off (needs kaleido and Chromium).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas

from tables import write_test_sweep, write_validation

from safesteer_lens.sweep import load_trials

ROUNDS = ("categories", "full-anchor", "full-anchor-w", "teacher", "teacher-epochs", "teacher-lr")
OPENER_ROUNDS = ("opener",)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo", help="run directory holding the rounds' sweeps")
    parser.add_argument("--opener-run", default="runs/opener",
                        help="run directory whose S adds the opener, holding the opener rounds")
    parser.add_argument("--test-run", default="runs/demo", help="run directory holding the test-opener sweep")
    args = parser.parse_args()

    parts = []
    for run, names, openers in ((args.run, ROUNDS, 0), (args.opener_run, OPENER_ROUNDS, 1)):
        present = [name for name in names if (Path(run) / name).is_dir()]
        if present:
            part = load_trials(run, present)
            part["openers"] = openers
            parts.append(part if not parts else part.drop(index="base", errors="ignore"))
    write_validation(pandas.concat(parts), "val_trials_in_turn.csv", "study_in_turn.png",
                     "Validation split, 13 categories in turn")
    write_test_sweep(args.run, "test-in-turn", "test_seeds_in_turn.csv")
    write_test_sweep(args.test_run, "test-opener", "test_seeds_opener.csv")


if __name__ == "__main__":
    main()
