"""Write the recipe study's tables from the run directories that hold its trials.

    python studies/recipe/collect.py --study-run runs/demo --test-run runs/demo-fresh

``val_trials.csv``: every validation trial of the study's rounds (``load_trials``).
``figures/study.png``: their trade-off figure, for the README.
``test_seeds.csv``: the base model and three recipes on the test split, each on seeds 0-2:
the full fine-tuning recipe and the paper's loss (seed 0 from the test run's own
``results.csv``, made by ``make demo`` while that recipe was the demo preset; seeds 1 and 2
from its ``test-recipe`` and ``test-paper`` sweeps), and the LoRA recipe that the demo preset
is now (its ``test-lora`` sweep). Every sweep uses the demo run's evaluation settings.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas

from safesteer_lens.pipeline import PAPER_LOSS, RECIPE_LABEL
from safesteer_lens.sweep import load_trials, sweep_figure

ROUNDS = ("sweep", "anchor", "seeds", "steps", "small-steps", "lora", "lora-anchor", "anchor-prompts")
# the demo training preset while the validation rounds ran: a setting a round did not vary had this value
PRESET_THEN = {"loss": "safesteer", "anchor_weight": 0.0, "lr": 1e-4, "epochs": 1, "sequences_per_step": 16, "lora_rank": 0,
               "anchor_prompts": 0}
# rounds run on a later preset (the LoRA recipe) fill their unvaried settings from it instead
LORA_PRESET = {"loss": "safesteer-bounded", "anchor_weight": 0.75, "lr": 1e-3, "epochs": 2, "sequences_per_step": 16,
               "lora_rank": 8, "anchor_prompts": 0}
LATER_PRESETS = {"lora-anchor": LORA_PRESET, "anchor-prompts": LORA_PRESET}
HERE = Path(__file__).parent
FULL, LORA = "full fine-tuning recipe", "LoRA recipe (demo preset)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study-run", default="runs/demo", help="run directory holding the validation rounds")
    parser.add_argument("--test-run", default="runs/demo", help="run directory of `make demo` with the test sweeps")
    args = parser.parse_args()

    trials = load_trials(args.study_run, ROUNDS)
    for column, value in PRESET_THEN.items():
        values = trials[column] if column in trials else pandas.Series(None, index=trials.index, dtype=object)
        preset = pandas.Series([LATER_PRESETS.get(str(name).split("/")[0], PRESET_THEN)[column] for name in trials.index],
                               index=trials.index, dtype=object)
        trials[column] = values.astype(object).where(values.notna(), preset)
    trials.loc["base", list(PRESET_THEN)] = None
    trials.to_csv(HERE / "val_trials.csv")
    figure = sweep_figure(trials).update_layout(title="Recipe study, validation split (size: MCQ accuracy, colour: degenerate)")
    figure.write_image(HERE.parents[1] / "figures" / "study.png")  # the README's picture (needs kaleido + Chromium)

    demo = pandas.read_csv(Path(args.test_run) / "results.csv", index_col="model")
    rows = [demo.loc[["base"]].assign(recipe="base", seed=float("nan")),
            demo.loc[[RECIPE_LABEL]].rename(index=lambda _: f"{FULL}, seed 0").assign(recipe=FULL, seed=0),
            demo.loc[[PAPER_LOSS.label]].rename(index=lambda _: "paper loss, seed 0").assign(recipe="paper loss", seed=0)]
    for sweep, recipe in (("test-recipe", FULL), ("test-paper", "paper loss"), ("test-lora", LORA)):
        trials = load_trials(args.test_run, [sweep]).drop(index="base")
        trials.index = [f"{recipe}, seed {int(s)}" for s in trials["seed"]]
        rows.append(trials.assign(recipe=recipe))
    table = pandas.concat(rows)
    table.index.name = "trial"
    table.drop(columns=[c for c in ("pareto", "sweep") if c in table]).to_csv(HERE / "test_seeds.csv")


if __name__ == "__main__":
    main()
