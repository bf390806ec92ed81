"""What the Gemma 3 270M base model shows in the direction and token stages: one table per direction method.

Reads the run directories ``run_gemma3.sh`` writes, regenerates each direction's held-out
teacher replies exactly as the direction stage does (the test splits, greedy, 24 new tokens)
and reads them two ways: the pinned marker rule (what the stage reports) and the three-class
rule (``classify_reply``), which does not count "I can't believe ..." as a refusal. Rates come
with their n and 95% Wilson interval. Writes ``gemma3_teacher.csv`` and prints a markdown table::

    python studies/families/gemma3_summary.py [--runs runs/gemma3]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from safesteer_lens.data import load_builtin_prompts, prompt_texts
from safesteer_lens.directions import load_direction
from safesteer_lens.generation import generate
from safesteer_lens.models import load_model
from safesteer_lens.refusal import classify_reply, is_refusal
from safesteer_lens.stats import Rate
from safesteer_lens.steering import add_hooks

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/gemma3")
    args = parser.parse_args()
    model = load_model("gemma3-270m", device="cpu")
    rows = []
    for method in ("diff-means", "contrastive"):
        run = Path(args.runs) / method
        direction = load_direction(run)
        n_test = json.loads((run / "direction.json").read_text())["settings"]["n_test"]
        tokens = json.loads((run / "safety_tokens.json").read_text())["tokens"]
        hooks = add_hooks(model, direction.vector, direction.layer, direction.coeff)
        for kind in ("harmful", "harmless"):
            prompts = prompt_texts(load_builtin_prompts(kind, "test"))[:n_test]
            for who, fwd in (("base", ()), ("teacher", hooks)):
                texts = generate(model, prompts, max_new_tokens=24, fwd_hooks=fwd).texts
                marker = Rate.of(is_refusal(t) for t in texts)
                declined = Rate.of(classify_reply(t).refused for t in texts)
                rows.append({"method": method, "layer": direction.layer, "coeff": direction.coeff, "prompts": kind,
                             "model": who, "n": marker.n, "marker_rate": marker.value, "marker_low": marker.low,
                             "marker_high": marker.high, "declined_rate": declined.value, "declined_low": declined.low,
                             "declined_high": declined.high, "first_reply": texts[0].strip()[:80],
                             "safety_tokens": " ".join(repr(t["text"]) for t in tokens[:12])})
    with (HERE / "gemma3_teacher.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("| direction | prompts | model | marker rule | declines (three-class rule) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} (layer {r['layer']}, coeff {r['coeff']:g}) | {r['prompts']} | {r['model']} | "
              f"{100 * r['marker_rate']:.1f}% [{100 * r['marker_low']:.1f}-{100 * r['marker_high']:.1f}] | "
              f"{100 * r['declined_rate']:.1f}% [{100 * r['declined_low']:.1f}-{100 * r['declined_high']:.1f}] |")


if __name__ == "__main__":
    main()
