from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from safesteer_lens.distill import TrainConfig, train
from safesteer_lens.errors import SafeSteerError
from safesteer_lens.parallel import World

WORKER = Path(__file__).with_name("parallel_worker.py")
TIMING = ("rollout_tokens_per_s", "update_tokens_per_s", "seconds")
CONFIG = TrainConfig(n_prompts=8, samples_per_prompt=2, max_new_tokens=5, sequences_per_step=8, micro_batch=2,
                     lr=3e-3, checkpoint_every=1, warmup_fraction=0.0)


def _torchrun(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *args],
        capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _launch(mode: str, run_dir: Path, out: Path, config: TrainConfig) -> None:
    _torchrun(str(WORKER), mode, str(run_dir), str(out), json.dumps(asdict(config)))


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _assert_same_metrics(a, b):
    assert len(a) == len(b)
    for x, y in zip(_strip(a), _strip(b)):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], float):
                assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), key
            else:
                assert x[key] == y[key], key


def test_two_processes_give_the_single_process_loss_and_gradients(run_dir, tmp_path):
    sys.path.insert(0, str(WORKER.parent))
    try:
        from parallel_worker import step_gradients
    finally:
        sys.path.pop(0)
    single = step_gradients(str(run_dir), CONFIG)
    out = tmp_path / "grads.pt"
    _launch("grads", run_dir, out, CONFIG)
    double = torch.load(out, weights_only=False)
    other = torch.load(f"{out}.rank1", weights_only=False)
    # each rank sampled its half of the step, and together they are the single process's rollouts
    assert double["texts"] + other["texts"] == single["texts"]
    assert len(double["texts"]) == len(single["texts"]) // 2
    for key in ("loss", "kl_s", "kl_full", "s_mass_student", "projection_sum", "rows", "completion_tokens"):
        assert double["stats"][key] == pytest.approx(single["stats"][key], rel=1e-5, abs=1e-7), key
    assert single["grads"].keys() == double["grads"].keys()
    for name, grad in single["grads"].items():
        assert torch.allclose(double["grads"][name], grad, rtol=1e-4, atol=1e-6), name
    assert any(g.abs().sum() > 0 for g in single["grads"].values())


def test_two_process_training_writes_once_and_resumes_in_one_process(run_dir, tmp_path):
    reference_dir = tmp_path / "one-process"
    shutil.copytree(run_dir, reference_dir)
    reference = train(reference_dir, CONFIG, progress=False, export=False).metrics

    _launch("train", run_dir, tmp_path / "metrics.pt", CONFIG)  # 2 of 4 steps, on 2 processes
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # rank 0 alone wrote them
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["step"] == 2
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no half-written files
    _assert_same_metrics(torch.load(tmp_path / "metrics.pt", weights_only=False)["metrics"], reference[:2])

    resumed = train(run_dir, CONFIG, progress=False, export=False, resume=True).metrics  # world size 2 -> 1
    _assert_same_metrics(resumed, reference)


def test_the_safesteer_command_trains_under_torchrun(run_dir):
    # the console script pip installed; --run-dir, because torchrun reads --run as its --run-path
    script = Path(sys.executable).with_name("safesteer")
    done = _torchrun(str(script), "train", "--run-dir", str(run_dir), "--n-prompts", "4", "--samples", "2",
                     "--max-new-tokens", "4", "--sequences-per-step", "4")
    assert done.stdout.count("on 2 processes") == 1  # only rank 0 reports
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2  # 4 prompts, 2 per step
    assert (run_dir / "student" / "config.json").exists()


def test_the_pipeline_runs_under_torchrun_with_rank_0_doing_the_single_process_stages(tiny_dir, tmp_path):
    out = tmp_path / "run"
    done = _torchrun(str(WORKER), "pipeline", str(out), str(tmp_path / "table"), json.dumps({"model": str(tiny_dir)}))
    assert done.stdout.count("[1/6] direction") == 1 and done.stdout.count("[3/6] train") == 1
    for rank in (0, 1):
        assert "SafeSteer student" in torch.load(tmp_path / f"table.rank{rank}", weights_only=False)["index"]
    for name in ("direction.json", "safety_tokens.json", "student/config.json", "ablation-full-reverse/student/config.json",
                 "results.csv", "report.md"):
        assert (out / name).exists(), name
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # 4 prompts, 2 per step, written once


def test_a_step_that_does_not_split_over_the_ranks_is_a_clear_error():
    with pytest.raises(SafeSteerError, match="cannot be split evenly over 3 processes"):
        World(rank=0, size=3).shard(4, "prompts")
    assert World(rank=1, size=2).shard(4) == (2, 4)
