from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from torchrun import CONFIG, WORKER, accelerate, assert_same_metrics, assert_same_step, launch, torchrun

from safesteer_lens.distill import PRESETS, train
from safesteer_lens.errors import SafeSteerError
from safesteer_lens.parallel import World


def test_two_processes_give_the_single_process_loss_and_gradients(run_dir, tmp_path):
    from parallel_worker import step_gradients

    single = step_gradients(str(run_dir), CONFIG)
    out = tmp_path / "grads.pt"
    launch("grads", run_dir, out, CONFIG)
    assert_same_step(single, torch.load(out, weights_only=False), torch.load(f"{out}.rank1", weights_only=False))


def test_accelerate_launch_gives_the_single_process_loss_and_gradients(run_dir, tmp_path):
    from parallel_worker import step_gradients

    single = step_gradients(str(run_dir), CONFIG)
    out = tmp_path / "grads.pt"
    accelerate(str(WORKER), "grads", str(run_dir), str(out), json.dumps(asdict(CONFIG)))
    assert_same_step(single, torch.load(out, weights_only=False), torch.load(f"{out}.rank1", weights_only=False))


def test_two_process_training_writes_once_and_resumes_in_one_process(run_dir, tmp_path):
    reference_dir = tmp_path / "one-process"
    shutil.copytree(run_dir, reference_dir)
    reference = train(reference_dir, CONFIG, progress=False, export=False).metrics

    launch("train", run_dir, tmp_path / "metrics.pt", CONFIG)  # 2 of 4 steps, on 2 processes
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # rank 0 alone wrote them
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["step"] == 2
    # no half-written files (the lock file stays: an flock is released by closing it, not by deleting it)
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".") and p.name != ".safesteer.lock"]
    assert_same_metrics(torch.load(tmp_path / "metrics.pt", weights_only=False)["metrics"], reference[:2])

    resumed = train(run_dir, CONFIG, progress=False, export=False, resume=True).metrics  # world size 2 -> 1
    assert_same_metrics(resumed, reference)


def test_the_safesteer_command_trains_under_torchrun(run_dir):
    # the console script pip installed; --run-dir, because torchrun reads --run as its --run-path
    script = Path(sys.executable).with_name("safesteer")
    done = torchrun(str(script), "train", "--run-dir", str(run_dir), "--n-prompts", "4", "--task-prompts", "0", "--samples", "2",
                    "--max-new-tokens", "4", "--sequences-per-step", "4")
    assert done.stdout.count("on 2 processes") == 1  # only rank 0 reports
    demo = replace(PRESETS["demo"], n_prompts=4, samples_per_prompt=2, sequences_per_step=4, task_prompts=0)
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == demo.total_steps  # 2 prompts a step, the demo's epochs
    assert (run_dir / "student" / "config.json").exists()


def test_the_pipeline_runs_under_torchrun_with_rank_0_doing_the_single_process_stages(tiny_dir, tmp_path):
    import json

    out = tmp_path / "run"
    done = torchrun(str(WORKER), "pipeline", str(out), str(tmp_path / "table"), json.dumps({"model": str(tiny_dir)}))
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


def test_one_process_reductions_are_the_values_themselves():
    assert World().sum([1.5, 2.0]) == [1.5, 2.0]
    assert World().max([3.0]) == [3.0]
    assert World().main_says(True) and not World().main_says(False)
