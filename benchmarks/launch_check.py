"""Check that `safesteer train` runs under torchrun here (random weights, no downloads).

Builds a random-weight model (the SmolLM2-135M shape, or a tiny one with ``--small``), writes a
run directory with a random steering direction and 50 safety tokens, then launches::

    torchrun --standalone --nproc-per-node N $(which safesteer) train --run-dir RUN ...

for a few steps. On a GPU machine each process takes its own card (``cuda:LOCAL_RANK``), so
``--processes 1`` on a one-GPU machine checks the launcher path on that card. Prints the wall
time, the per-step seconds from ``metrics.jsonl`` and whether rank 0 exported the student, and
writes them to the JSON file named on the command line::

    python benchmarks/launch_check.py out.json [--processes 1] [--steps 3] [--shard none|student|all] [--precision P]
    python benchmarks/launch_check.py out.json --small --processes 2   # a quick check on a CPU

``--shard`` needs 2 or more processes: on a GPU machine 2 or more cards (NCCL cannot put two
ranks on one card), on a CPU any 2 processes (gloo).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from safesteer_lens.precision import PRECISIONS

SHAPE_135M = dict(n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, d_mlp=1536, vocab_size=49152)
SHAPE_TINY = dict(n_layers=4, d_model=64, n_heads=4, n_kv_heads=2, d_mlp=128, vocab_size=512)


def make_run_dir(root: Path, shape: dict) -> Path:
    """A model directory plus a run directory holding a random direction and safety tokens."""
    from transformers import AutoTokenizer

    from safesteer_lens.directions import Direction
    from safesteer_lens.tiny import build_tiny_llama
    from safesteer_lens.tokens import SafetyTokens

    model_dir = build_tiny_llama(root / "model", **shape)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    run_dir = root / "run"
    torch.manual_seed(0)
    Direction(torch.randn(shape["d_model"]), str(model_dir), "random", shape["n_layers"] // 2, -1, 1.0).save(run_dir)
    ids = range(100, 150)
    SafetyTokens([{"id": i, "text": tokenizer.decode([i]), "votes": 1, "mean_delta": 0.0} for i in ids]).save(run_dir)
    return run_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON file for the results")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--samples", type=int, default=8, help="rollouts per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--small", action="store_true", help="a tiny model and short rollouts, for a CPU")
    parser.add_argument("--shard", choices=["none", "student", "all"], default="none", help="train's --shard")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help="train's --precision")
    parser.add_argument("--keep", action="store_true", help="keep the model and run directory (GBs at the 135M shape)")
    args = parser.parse_args()
    if args.small:
        args.samples, args.max_new_tokens = 2, 8
    prompts_per_step = 2 * args.processes
    root = Path(tempfile.mkdtemp(prefix="launch-check-"))
    run_dir = make_run_dir(root, SHAPE_TINY if args.small else SHAPE_135M)
    script = shutil.which("safesteer") or str(Path(sys.executable).with_name("safesteer"))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.processes}",
        script, "train", "--run-dir", str(run_dir), "--n-prompts", str(prompts_per_step * args.steps), "--task-prompts", "0",
        "--samples", str(args.samples), "--sequences-per-step", str(prompts_per_step * args.samples),
        "--max-new-tokens", str(args.max_new_tokens), "--shard", args.shard, "--precision", args.precision,
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", **env})
    wall = time.perf_counter() - start
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] \
        if (run_dir / "metrics.jsonl").exists() else []
    result = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "processes": args.processes,
        "shard": args.shard,
        "precision": sorted({m["precision"] for m in metrics}),  # what the run multiplied in
        "returncode": done.returncode,
        "wall_s": round(wall, 1),
        "steps": len(metrics),
        "step_seconds": [m["seconds"] for m in metrics],
        "rollout_tokens_per_s": [m["rollout_tokens_per_s"] for m in metrics],
        "student_exported": (run_dir / "student" / "config.json").exists(),
        "stdout_tail": done.stdout[-1500:],
        "stderr_tail": done.stderr[-3000:] if done.returncode else "",
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    if args.keep:
        print(f"kept {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{result['device']}: {args.processes} process(es), shard {args.shard}, {'/'.join(result['precision'])}, "
          f"exit {done.returncode}, {len(metrics)} steps, "
          f"{wall:.1f} s wall; step seconds {result['step_seconds']}; student exported: {result['student_exported']}")
    if done.returncode:
        print(done.stderr[-3000:], file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
