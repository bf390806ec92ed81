"""Launch helpers shared by the tests that run several processes under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from safesteer_lens.distill import TrainConfig

WORKER = Path(__file__).with_name("parallel_worker.py")
TIMING = ("rollout_tokens_per_s", "update_tokens_per_s", "seconds")
# 4 steps of 4 prompts x 2 samples on the tiny model; lr high enough that the weights move.
# float32: bfloat16 rounding depends on the batch shape, so 1 and 2 processes would differ by
# more than the reduction order.
CONFIG = TrainConfig(n_prompts=16, samples_per_prompt=2, max_new_tokens=5, sequences_per_step=8, micro_batch=2,
                     lr=3e-3, checkpoint_every=1, warmup_fraction=0.0, precision="float32")


def _run_launcher(command: list[str]) -> subprocess.CompletedProcess:
    """Run a launcher command with one thread per process and no inherited rank variables; assert success."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    done = subprocess.run(command, capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def torchrun(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    """Run ``args`` under ``torch.distributed.run`` on ``processes`` CPU processes; assert success."""
    return _run_launcher(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *args]
    )


def accelerate(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    """Run ``args`` under ``accelerate launch`` on ``processes`` CPU processes; assert success.

    ``--multi_gpu`` is accelerate's multi-process launcher (torch's elastic launch underneath);
    on a machine without GPUs its processes run on the CPU with gloo.
    """
    import socket

    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return _run_launcher(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={processes}",
         "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={port}", *args]
    )


def launch(mode: str, run_dir: Path, out: Path, config: TrainConfig, shard: str = "none") -> None:
    """Run ``tests/parallel_worker.py MODE`` on 2 processes."""
    torchrun(str(WORKER), mode, str(run_dir), str(out), json.dumps(asdict(config)), shard)


def assert_same_metrics(a: list[dict], b: list[dict]) -> None:
    """Per-step metrics equal up to float reduction order (timings left out)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        x = {k: v for k, v in x.items() if k not in TIMING}
        y = {k: v for k, v in y.items() if k not in TIMING}
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], float):
                assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), key
            else:
                assert x[key] == y[key], key


def assert_same_step(single: dict, rank0: dict, rank1: dict) -> None:
    """A 2-process step (rank 0's and rank 1's outputs of ``grads``) equals the single process's."""
    import torch

    # each rank sampled its half of the step, and together they are the single process's rollouts
    assert rank0["texts"] + rank1["texts"] == single["texts"]
    assert len(rank0["texts"]) == len(single["texts"]) // 2
    for key in ("loss", "kl_s", "kl_full", "s_mass_student", "projection_sum", "rows", "completion_tokens"):
        assert rank0["stats"][key] == pytest.approx(single["stats"][key], rel=1e-5, abs=1e-7), key
    assert single["grads"].keys() == rank0["grads"].keys()
    for name, grad in single["grads"].items():
        assert torch.allclose(rank0["grads"][name], grad, rtol=1e-4, atol=1e-6), name
    assert any(g.abs().sum() > 0 for g in single["grads"].values())
