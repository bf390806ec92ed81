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
- ``teacher``: a milder teacher (``teacher_coeff=1.0`` against the direction's 1.5), seeds 0-2.

``val_trials_in_turn.csv``: those rounds' trials (validation split) and the base row.
``test_seeds_in_turn.csv``: the ``test-in-turn`` sweep (test split), when it has run.
``figures/study_in_turn.png``: the validation trade-off (needs kaleido and Chromium).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safesteer_lens.sweep import load_trials, sweep_figure

ROUNDS = ("categories", "full-anchor", "full-anchor-w", "teacher")
HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo", help="run directory holding the rounds' sweeps")
    args = parser.parse_args()

    rounds = [name for name in ROUNDS if (Path(args.run) / name).is_dir()]
    val = load_trials(args.run, rounds)
    val.to_csv(HERE / "val_trials_in_turn.csv")
    figure = sweep_figure(val).update_layout(
        title="Validation split, 13 categories in turn (size: MCQ accuracy, colour: degenerate)")
    figure.write_image(HERE.parents[1] / "figures" / "study_in_turn.png")
    if any((Path(args.run) / "test-in-turn").glob("*/trial.json")):
        load_trials(args.run, ["test-in-turn"]).to_csv(HERE / "test_seeds_in_turn.csv")


if __name__ == "__main__":
    main()
