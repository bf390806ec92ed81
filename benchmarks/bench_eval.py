"""What the fuller evaluation costs: the demo's evaluation stage against the stage it replaced.

Both settings evaluate the same four models of a finished run (base, teacher, SafeSteer
student, full-vocabulary student) on the same held-out prompts, in one invocation, in the
order baseline, new, new, baseline, so a machine that speeds up or slows down during the run
weighs on both alike:

* ``baseline``: 24-token greedy replies, no capability questions (the evaluation before the
  coherence, capability and interval columns);
* ``new``: the demo preset's evaluation (48-token replies, 60 shipped questions scored by
  lm-evaluation-harness, coherence and intervals).

::

    python benchmarks/bench_eval.py [--run runs/demo] [--json out.json]

The budget is 3 minutes more than the baseline on 2 CPU cores; the last line is
``extra_s=<new - baseline, seconds>``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

from safesteer_lens.directions import load_direction
from safesteer_lens.evaluate import Subject, evaluate_models
from safesteer_lens.models import load_model
from safesteer_lens.pipeline import FULL_REVERSE, PIPELINE_PRESETS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo", help="a finished run directory (make demo)")
    parser.add_argument("--json", default=None, help="also write the timings here")
    args = parser.parse_args()

    base = load_model(device="cpu")
    direction = load_direction(args.run)
    subjects = [
        Subject("base", base),
        Subject("teacher", base, direction.hooks(base)),
        Subject("SafeSteer student", load_model(f"{args.run}/student", device="cpu")),
        Subject("full-reverse student", load_model(f"{args.run}/{FULL_REVERSE.dir_name}/student", device="cpu")),
    ]
    new = PIPELINE_PRESETS["demo"].evaluate
    settings = {"baseline": replace(new, max_new_tokens=24, n_mcq=0), "new": new}
    times: dict[str, list[float]] = {"baseline": [], "new": []}
    for name in ("baseline", "new", "new", "baseline"):
        start = time.perf_counter()
        evaluate_models(subjects, base, settings[name])
        times[name].append(time.perf_counter() - start)
        print(f"{name}: {times[name][-1]:.1f} s", flush=True)
    result = {name: statistics.mean(t) for name, t in times.items()}
    result["extra_s"] = result["new"] - result["baseline"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"times": times, **result}, f, indent=2)
    print(f"baseline={result['baseline']:.1f}s new={result['new']:.1f}s")
    print(f"extra_s={result['extra_s']:.1f}")


if __name__ == "__main__":
    main()
