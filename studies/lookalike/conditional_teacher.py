"""The conditional teacher's refusals on an evaluation's prompts, from its base and teacher replies.

A conditional teacher steers a prompt's reply only when the gate opens on the prompt
(``gate_probes.py``: the difference-in-means direction of harmful against harmless and
look-alike *train* prompts at one layer, thresholded halfway between the class means). Its
greedy reply to a prompt is then exactly the steered teacher's reply where the gate opens and
the base model's where it does not, so an evaluation that already holds both (``comparison.csv``
with ``base`` and ``teacher`` rows) gives the conditional teacher's rates without generating
again. The gate layer is chosen on the validation split (``--choose``: the layer whose gate best
separates the harmful sets from the harmless ones there) and then fixed for the test split.

Usage (from the repository root)::

    python studies/lookalike/conditional_teacher.py --comparison runs/demo/comparison.csv --choose
    python studies/lookalike/conditional_teacher.py --comparison RUN/comparison.csv --layer 24
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas
import torch

from gate_probes import VAL_SETS, midpoint_gate
from safesteer_lens import load_model
from safesteer_lens.data import load_builtin_prompts, load_study_set, prompt_texts
from safesteer_lens.models import DEFAULT_MODEL, ChatModel
from safesteer_lens.probes import last_token_states
from safesteer_lens.stats import Rate

HARMFUL_SETS, HARMLESS_SETS = ("harmful", "tasks"), ("harmless", "lookalike")


def fit_gates(model: ChatModel) -> list[tuple[torch.Tensor, float]]:
    """Per layer, the gate fitted on the train splits: harmful against harmless plus look-alikes."""
    harmful = last_token_states(model, prompt_texts(load_builtin_prompts("harmful", "train")))
    harmless = last_token_states(model, prompt_texts(load_builtin_prompts("harmless", "train")
                                                     + load_study_set("lookalike", "train")))
    return [midpoint_gate(harmful[layer], harmless[layer]) for layer in range(model.n_layers)]


def choose_layer(model: ChatModel, gates: list[tuple[torch.Tensor, float]]) -> int:
    """The layer whose gate opens most on the harmful validation sets and least on the harmless ones.

    The score is the mean opening rate over the two harmful sets minus the mean over the two
    harmless sets (Youden's J, averaged over sets so the 100 look-alikes do not outweigh the
    40 generic harmless prompts).
    """
    states = {name: last_token_states(model, prompt_texts(load())) for name, load in VAL_SETS.items()}

    def score(layer: int) -> float:
        direction, threshold = gates[layer]
        opens = {name: float((s[layer] @ direction > threshold).float().mean()) for name, s in states.items()}
        return sum(opens[n] for n in HARMFUL_SETS) / 2 - sum(opens[n] for n in HARMLESS_SETS) / 2

    return max(range(model.n_layers), key=score)


def conditional_rates(model: ChatModel, comparison: pandas.DataFrame, layer: int, gate: tuple[torch.Tensor, float],
                      teacher: str = "teacher", base: str = "base") -> pandas.DataFrame:
    """Per prompt set: the gate's opening rate and the conditional teacher's refusal, full-refusal and apology rates."""
    direction, threshold = gate
    opened = (last_token_states(model, comparison["prompt"].tolist())[layer] @ direction > threshold).tolist()
    rows = []
    frame = comparison.assign(opened=opened)
    pick = lambda row, column: row[f"{teacher}: {column}"] if row["opened"] else row[f"{base}: {column}"]  # noqa: E731
    frame["refused"] = [str(pick(r, "refused")) == "True" for _, r in frame.iterrows()]
    frame["full_refusal"] = [pick(r, "class") == "full_refusal" for _, r in frame.iterrows()]
    frame["apology"] = [str(pick(r, "apology")) == "True" for _, r in frame.iterrows()]
    for name, group in frame.groupby("set", sort=False):
        row: dict[str, object] = {"set": name}
        for column in ("opened", "refused", "full_refusal", "apology"):
            row.update(Rate.of(group[column].tolist()).columns(column))
        rows.append(row)
    return pandas.DataFrame(rows).set_index("set")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comparison", type=Path, required=True, help="an evaluation's comparison.csv with base and teacher")
    parser.add_argument("--teacher", default="teacher", help="the teacher's row name in the evaluation")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--choose", action="store_true", help="choose the gate layer on the validation split")
    which.add_argument("--layer", type=int, help="the gate layer chosen on the validation split")
    parser.add_argument("--out", type=Path, default=None, help="write the rates as CSV here")
    args = parser.parse_args()
    model = load_model(args.model)
    gates = fit_gates(model)
    layer = choose_layer(model, gates) if args.choose else args.layer
    comparison = pandas.read_csv(args.comparison, keep_default_na=False)
    table = conditional_rates(model, comparison, layer, gates[layer], teacher=args.teacher)
    table.insert(0, "gate_layer", layer)
    direction, threshold = gates[layer]
    for name, prompts in (("built-in harmful", load_builtin_prompts("harmful", "train")),
                          ("benchmark-phrased harmful", load_study_set("tasks", "train"))):
        states = last_token_states(model, prompt_texts(prompts))[layer]
        print(f"on the {name} train prompts (what a student trains on) the gate opens on "
              f"{Rate.of((states @ direction > threshold).tolist())}")
    print(f"gate layer {layer}")
    print(table[["opened", "refused", "full_refusal", "apology", "refused_n"]].to_string(float_format=lambda v: f"{v:.3f}"))
    if args.out:
        table.to_csv(args.out)


if __name__ == "__main__":
    main()
