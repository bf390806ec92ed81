"""Would a conditional teacher know a look-alike from a harmful request? Per-layer gate rates.

A conditional teacher (conditional activation steering) steers only when the prompt's state at
a gate layer projects on a harmfulness direction above a threshold. This script builds that gate
on the embedded model as such a teacher would: the difference-in-means direction of the built-in
harmful and harmless *train* prompts at each layer's ``resid_pre`` (last prompt token),
thresholded halfway between the two train means. It reports, per layer, how often the gate
opens on each *validation* set: harmful, benchmark-phrased harmful (``tasks``), generic harmless
and look-alike harmless. A second gate is fitted with the look-alike train split among the
harmless prompts, as the anchor lever uses it. No test split is read.

Usage (from the repository root)::

    python studies/lookalike/gate_probes.py [--out studies/lookalike/gate_probes_val.csv]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas
import torch
from jaxtyping import Float
from torch import Tensor

from safesteer_lens import load_model
from safesteer_lens.models import DEFAULT_MODEL
from safesteer_lens.data import load_builtin_prompts, load_study_set, prompt_texts
from safesteer_lens.probes import last_token_states
from safesteer_lens.stats import Rate

VAL_SETS = {
    "harmful": lambda: load_builtin_prompts("harmful", "val"),
    "tasks": lambda: load_study_set("tasks", "val"),
    "harmless": lambda: load_builtin_prompts("harmless", "val"),
    "lookalike": lambda: load_study_set("lookalike", "val"),
}


def midpoint_gate(
    harmful: Float[Tensor, "n d_model"], harmless: Float[Tensor, "m d_model"]
) -> tuple[Float[Tensor, " d_model"], float]:
    """The difference-in-means direction and the threshold halfway between the classes' mean projections."""
    direction = harmful.mean(0) - harmless.mean(0)
    return direction, float(((harmful @ direction).mean() + (harmless @ direction).mean()) / 2)


def gate_rates(model_name: str = DEFAULT_MODEL) -> pandas.DataFrame:
    """Per layer and gate, how often the gate opens on each validation set (95% Wilson intervals)."""
    model = load_model(model_name)
    train_harmful = last_token_states(model, prompt_texts(load_builtin_prompts("harmful", "train")))
    train_harmless = last_token_states(model, prompt_texts(load_builtin_prompts("harmless", "train")))
    train_lookalike = last_token_states(model, prompt_texts(load_study_set("lookalike", "train")))
    val = {name: last_token_states(model, prompt_texts(load())) for name, load in VAL_SETS.items()}
    gates = {
        "harmful vs harmless": lambda layer: midpoint_gate(train_harmful[layer], train_harmless[layer]),
        "harmful vs harmless + look-alikes": lambda layer: midpoint_gate(
            train_harmful[layer], torch.cat([train_harmless[layer], train_lookalike[layer]])),
    }
    rows = []
    for gate, fit in gates.items():
        for layer in range(model.n_layers):
            direction, threshold = fit(layer)
            row: dict[str, object] = {"gate": gate, "layer": layer}
            for name, states in val.items():
                opened = int((states[layer] @ direction > threshold).sum())
                row.update(Rate(opened, states.shape[1]).columns(f"{name}_opens"))
            rows.append(row)
    return pandas.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model to probe (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--out", type=Path, default=Path("studies/lookalike/gate_probes_val.csv"))
    args = parser.parse_args()
    table = gate_rates(args.model)
    table.to_csv(args.out, index=False)
    shown = table[["gate", "layer", *[c for c in table.columns if c.endswith("_opens")]]]
    print(shown.to_string(index=False, float_format=lambda v: f"{100 * v:.0f}%"))


if __name__ == "__main__":
    main()
