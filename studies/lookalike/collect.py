"""Join the look-alike study's validation rounds into one table: ``studies/lookalike/val_trials.csv``.

Each round is a named sweep of the demo run (``safesteer sweep --run runs/demo --name ROUND``);
the demo preset's own student (seed 0) is the baseline evaluation's ``demo/student`` row
(``baseline_val.csv``). A setting a round did not vary is the value of the demo preset the rounds
started from (``ROUND_DEFAULTS``), filled in here so that every row names its whole recipe.

Usage (from the repository root, after the rounds ran)::

    python studies/lookalike/collect.py --run runs/demo round1 round2 ... [--figure figures/lookalike_frontier.png]

``--figure`` draws the frontier (look-alikes against benchmark-phrased harmful requests refused,
with 95% intervals) as a PNG; it needs kaleido and a Chromium (``pip install -e '.[figures]'``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas

from safesteer_lens.sweep import load_trials, sweep_figure

HERE = Path(__file__).parent
# the settings the study varies, in the order the table shows them
LEVERS = ("anchor_lookalikes", "task_prompts", "anchor_weight", "teacher_coeff", "n_prompts", "epochs", "seed")
# the demo preset's values when the study started (sweeps record only the settings they vary)
ROUND_DEFAULTS = {"anchor_lookalikes": 0, "task_prompts": 0, "anchor_weight": 1.0, "teacher_coeff": 1.5,
                  "n_prompts": 128, "epochs": 1, "seed": 0}


def collect(run_dir: Path, rounds: list[str]) -> pandas.DataFrame:
    """The baseline's base and demo-student rows, then every trial of ``rounds``, settings filled in."""
    baseline = pandas.read_csv(HERE / "baseline_val.csv", index_col="model")
    demo = baseline.loc[["demo/student"]].rename(index={"demo/student": "demo preset/seed=0"})
    demo["sweep"] = "demo preset"
    trials = load_trials(run_dir, rounds)
    base = trials.loc[["base"]].assign(sweep="base")
    table = pandas.concat([base, demo, trials.drop(index="base")])
    for lever in LEVERS:
        table[lever] = table[lever].fillna(ROUND_DEFAULTS[lever]) if lever in table else ROUND_DEFAULTS[lever]
    table.loc["base", list(LEVERS)] = None
    table.index.name = "trial"
    front = ["sweep", *LEVERS]
    return table[front + [c for c in table.columns if c not in front and c != "pareto"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--out", type=Path, default=HERE / "val_trials.csv")
    parser.add_argument("--figure", type=Path, default=None, help="also draw the frontier as this PNG")
    parser.add_argument("rounds", nargs="+", help="the sweeps' names, in the order they ran")
    args = parser.parse_args()
    table = collect(args.run, args.rounds)
    table.to_csv(args.out)
    if args.figure:
        figure = sweep_figure(table, "lookalike_refusal", "tasks_refusal", target=(0.2, 0.9)).update_layout(
            title="Look-alike study, validation splits: every trial (95% intervals; box: the targets)")
        figure.write_image(args.figure, format="png", scale=1)
    print(table[["sweep", *LEVERS, "harmful_refusal", "tasks_refusal", "harmless_refusal", "lookalike_refusal"]]
          .to_string(float_format=lambda v: f"{v:.3g}"))


if __name__ == "__main__":
    main()
