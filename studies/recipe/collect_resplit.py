"""Write the tables of the rounds run on the re-split prompts (``resplit_prompts.py``).

    python studies/recipe/collect_resplit.py --run runs/split

Every round here ran on one run directory made from an empty one after the re-split
(``safesteer run --out runs/split --preset demo --until tokens``), whose direction stage chose
its coefficient and whose tokens stage chose S on the new validation split. The rounds:

- ``preset``: the ``demo`` preset of the time (S with the opener, ``teacher_coeff=1.0``), seeds 0-2;
- the rounds listed in ``ROUNDS`` after it, in the order they ran (the study README has their grids).

``val_trials_resplit.csv``: those rounds' trials (validation split) and the base row.
``test_seeds_resplit.csv``: the ``test-resplit`` sweep (test split, the chosen preset, seeds 1-2;
seed 0 is ``make demo`` in the same run directory).
``figures/study_resplit.png``: the validation trade-off (needs kaleido and Chromium).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tables import write_test_sweep, write_validation

from safesteer_lens.sweep import load_trials

ROUNDS = ("preset", "anchor", "variety", "variety-teacher", "variety-anchor")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/split", help="run directory holding the rounds' sweeps")
    args = parser.parse_args()

    val = load_trials(args.run, [name for name in ROUNDS if (Path(args.run) / name).is_dir()])
    write_validation(val, "val_trials_resplit.csv", "study_resplit.png", "Validation split after the re-split")
    write_test_sweep(args.run, "test-resplit", "test_seeds_resplit.csv")

if __name__ == "__main__":
    main()
