"""Refusal rates on the test prompts that no evaluation of the study had read.

    python studies/recipe/unread_check.py --students "seed 0=runs/demo/student" "seed 1=..." ...

Every test-split evaluation of the study used the first 40 test prompts of each kind, so the
last 25 of each (prompts 41-65: for harmless prompts the categories home and DIY, education,
technology, everyday advice and alarming-but-benign) were never read while the recipe was
chosen. A recipe chosen after its test rows were read is reported here too, on prompts that
could not have shaped the choice. Writes ``unread_check.csv`` beside this file: one row per
model, each rate with its 95% interval.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safesteer_lens.data import load_builtin_prompts
from safesteer_lens.evaluate import EvalConfig, Subject, evaluate_models
from safesteer_lens.models import DEFAULT_MODEL, load_model

HERE = Path(__file__).parent
READ = 40  # test prompts per kind that the study's evaluations read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", nargs="+", required=True, help="student directories, as LABEL=PATH or PATH")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the base model")
    args = parser.parse_args()

    base = load_model(args.model)
    subjects = [Subject("base", base)]
    for spec in args.students:
        label, _, path = spec.rpartition("=")
        subjects.append(Subject(label or path, load_model(path, device=base.device)))
    unread = {kind: load_builtin_prompts(kind, "test")[READ:] for kind in ("harmful", "harmless")}
    # the held-out sets proper are cut to one prompt each: only the unread sets are measured
    config = EvalConfig(n_harmful=1, n_harmless=1, n_kl_prompts=1, n_general=1, n_mcq=0, max_new_tokens=48)
    evaluation = evaluate_models(subjects, base, config, extra_sets={f"unread_{k}": v for k, v in unread.items()})
    columns = [c for c in evaluation.table.columns if c.startswith("unread_")]
    table = evaluation.table[columns]
    table.to_csv(HERE / "unread_check.csv")
    print(table.to_string())


if __name__ == "__main__":
    main()
