"""Pinned training results of tiny-model runs, so refactors of the trainer can prove they changed nothing.

Each case trains the tiny model in float32 from the shared run fixture and compares every
per-step metric and a fingerprint of every exported weight with ``tests/data/equivalence.json``.
A refactor must leave them unchanged. Rounded metrics compare exactly; weight fingerprints
(sum and sum of squares per tensor, float64) to 1e-6 relative, which a changed update of any
weight would exceed by far. After an intended change of the numbers, rewrite the pins with
``SAFESTEER_PIN=1 pytest tests/test_equivalence.py`` and say why in the commit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file

from safesteer_lens.distill import TrainConfig, train

PINS = Path(__file__).parent / "data" / "equivalence.json"
TIMING = {"seconds", "rollout_tokens_per_s", "update_tokens_per_s", "precision"}
BASE = dict(n_prompts=4, samples_per_prompt=2, max_new_tokens=4, sequences_per_step=4, micro_batch=2, lr=1e-3,
            precision="float32", seed=3)
CASES = {
    "paper-loss": TrainConfig(**BASE),
    "bounded-anchor": TrainConfig(**BASE, loss="safesteer-bounded", anchor_weight=0.5),
    "lora-full-reverse": TrainConfig(**BASE, loss="full-reverse", lora_rank=2, lora_targets="q_proj,v_proj"),
}


def _fingerprint(student_dir: Path) -> dict[str, list[float]]:
    weights = load_file(str(student_dir / "model.safetensors"))
    return {name: [float(t.double().sum()), float(t.double().square().sum())] for name, t in sorted(weights.items())}


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_matches_the_pinned_run(case, tiny, run_dir):
    result = train(run_dir, CASES[case], teacher=tiny, progress=False)
    metrics = [{k: v for k, v in row.items() if k not in TIMING} for row in result.metrics]
    observed = {"metrics": metrics, "weights": _fingerprint(run_dir / "student")}
    pins = json.loads(PINS.read_text()) if PINS.is_file() else {}
    if os.environ.get("SAFESTEER_PIN") == "1":
        pins[case] = observed
        PINS.write_text(json.dumps(pins, indent=1, sort_keys=True) + "\n")
    assert case in pins, f"no pins for {case}: run SAFESTEER_PIN=1 pytest {__file__}"
    assert metrics == pins[case]["metrics"]
    assert observed["weights"].keys() == pins[case]["weights"].keys()
    for name, (total, squares) in observed["weights"].items():
        assert [total, squares] == pytest.approx(pins[case]["weights"][name], rel=1e-6, abs=1e-9), name
