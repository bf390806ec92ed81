"""What the collect scripts write for a group of rounds: the validation table, its figure, test sweeps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safesteer_lens.sweep import load_trials, pareto_mask, sweep_figure

HERE = Path(__file__).parent
FIGURES = HERE.parents[1] / "figures"


def write_validation(trials: Any, csv_name: str, png_name: str, title: str) -> None:
    """Mark the Pareto frontier over all rounds, write the table and the README's trade-off figure.

    The figure needs kaleido and Chromium.
    """
    trials["pareto"] = pareto_mask(trials)
    trials.to_csv(HERE / csv_name)
    figure = sweep_figure(trials).update_layout(title=f"{title} (size: MCQ accuracy, colour: degenerate)")
    figure.write_image(FIGURES / png_name)


def write_test_sweep(run: str | Path, name: str, csv_name: str) -> None:
    """Write one test-split sweep's table, if any of its trials has finished."""
    if any((Path(run) / name).glob("*/trial.json")):
        load_trials(run, [name]).to_csv(HERE / csv_name)
