"""Rollout throughput and training-step time on a GPU, with random weights (no downloads).

For each model shape (SmolLM2-135M and a ~0.5B Llama), in one process, sampling ``--batch``
sequences (``--batch / M`` distinct prompts, M samples each, as in training) of
``--new-tokens`` tokens after a ``--prompt-len`` prompt:

* rollout tokens/s of plain HF ``generate`` (sdpa attention, no bridge): the baseline;
* rollout tokens/s of generation through the TransformerLens bridge (what every other stage
  uses), for context;
* rollout tokens/s of the trainer's sampler, :class:`safesteer_lens.rollouts.RolloutSampler`
  (sdpa twin, one prefill per prompt, static cache + compiled decoding on CUDA);
* the time and peak memory of one training step (:func:`safesteer_lens.distill.train_step`)
  with a float32 student, as ``safesteer train`` runs it by default.

Ends with a table and writes every number to the JSON file named on the command line::

    python benchmarks/gpu_check.py out.json [--device cuda] [--dtype bfloat16]
    python benchmarks/gpu_check.py out.json --device cpu --small   # a quick check on a CPU

Issue 7's targets: at least 5,000 rollout tokens/s for the 135M shape at batch 32 on an H100,
and at least 3x HF generate in the same run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from safesteer_lens.precision import PRECISIONS

SHAPES = {
    "smollm2-135m": dict(n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, d_mlp=1536),
    "llama-0.5b": dict(n_layers=16, d_model=1536, n_heads=12, n_kv_heads=4, d_mlp=4096),
}
SMALL = {"tiny": dict(n_layers=4, d_model=64, n_heads=4, n_kv_heads=2, d_mlp=128)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None


def measure(shape: dict, args: argparse.Namespace, device: torch.device, dtype: torch.dtype, workdir: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from safesteer_lens.directions import Direction
    from safesteer_lens.distill import TrainingRun, build_optimizer, preset, train_step
    from safesteer_lens.parallel import World
    from safesteer_lens.generation import generate
    from safesteer_lens.models import load_model
    from safesteer_lens.precision import compute_dtype, dtype_name
    from safesteer_lens.rollouts import RolloutSampler
    from safesteer_lens.tiny import build_tiny_llama

    directory = build_tiny_llama(workdir / "model", vocab_size=args.vocab, **shape)
    words = "please explain in detail how the following everyday thing works and why " * 16
    base = " ".join(words.split()[: args.prompt_len - 1])
    m = args.samples_per_prompt
    distinct = [f"{i} {base}" for i in range(args.batch // m)]  # as in training: M samples per prompt
    expanded = [p for p in distinct for _ in range(m)]
    row: dict = {"shape": shape, "vocab": args.vocab, "batch": len(expanded), "samples_per_prompt": m,
                 "new_tokens": args.new_tokens}

    plain = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    teacher = load_model(str(directory), device=device, dtype=dtype)
    student = load_model(str(directory), device=device, dtype=dtype)
    sampler = RolloutSampler(student, compile=args.compile)
    batch = teacher.tokenize(expanded)
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=True, top_k=0,
                  pad_token_id=teacher.tokenizer.pad_token_id)
    engines = {
        "hf_generate_sdpa": lambda: plain.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kwargs),
        "bridge_generate": lambda: generate(teacher, expanded, max_new_tokens=args.new_tokens, do_sample=True, seed=0,
                                            batch_size=len(expanded)).completion_ids,
        "safesteer_rollouts": lambda: sampler.sample(distinct, m, max_new_tokens=args.new_tokens, seed=0).completion_ids,
    }
    for name, run in engines.items():
        with torch.no_grad():
            run()  # warm-up (and compilation)
            _sync(device)
            start = time.perf_counter()
            for _ in range(args.repeats):
                out = run()
            _sync(device)
        seconds = (time.perf_counter() - start) / args.repeats
        width = out.shape[1] - (batch.input_ids.shape[1] if name == "hf_generate_sdpa" else 0)
        row[f"{name}_s"] = round(seconds, 4)
        row[f"{name}_tokens_per_s"] = round(len(expanded) * width / seconds, 1)
    row["rollout_speedup_vs_hf"] = round(row["safesteer_rollouts_tokens_per_s"] / row["hf_generate_sdpa_tokens_per_s"], 3)
    row["sampler_compiled"] = sampler.compile  # False if compilation failed and it fell back
    del plain

    # the training step as `safesteer train` runs it: a float32 student (TrainConfig.student_dtype)
    # with its own sampler, scored against the teacher in the device's dtype
    del sampler, student
    student = load_model(str(directory), device=device, dtype=torch.float32)
    row["train_student_dtype"] = "float32"
    config = preset("demo", samples_per_prompt=m, sequences_per_step=len(expanded), micro_batch=len(expanded),
                    max_new_tokens=args.new_tokens, n_prompts=len(distinct), precision=args.precision,
                    loss="safesteer", anchor_weight=0.0, task_prompts=0)  # the harmful step alone
    # the sampler in the trainer's precision (bfloat16 autocast on a bf16 card), as `train` builds it
    train_dtype = compute_dtype(config.precision, device)
    sampler = RolloutSampler(student, compile=args.compile, dtype=train_dtype)
    row["train_precision"] = dtype_name(train_dtype)
    optimizer, scheduler = build_optimizer(student, config)
    torch.manual_seed(0)
    direction = Direction(torch.randn(teacher.d_model), str(directory), "random", teacher.n_layers // 2, -1, 1.0)
    hooks = direction.hooks(teacher)
    safety = torch.arange(10, 60, device=device)
    run = TrainingRun(config, World(), student, teacher, hooks, direction, safety, optimizer, scheduler, sampler, distinct)
    train_step(run, 0)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    start = time.perf_counter()
    metrics = train_step(run, 1)
    _sync(device)
    row["train_step_s"] = round(time.perf_counter() - start, 4)
    row["train_step_rollout_tokens_per_s"] = metrics["rollout_tokens_per_s"]
    row["train_step_peak_mb"] = _peak_mb(device)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON file for the full numbers")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--samples-per-prompt", type=int, default=8, help="M: rollouts per distinct prompt")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="static cache + compiled decoding for our sampler (default: on CUDA only)")
    parser.add_argument("--vocab", type=int, default=49152, help="BPE vocabulary of the random model")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="the training step's matmul precision (auto: bfloat16 autocast on a bf16 card)")
    parser.add_argument("--shape", default=None, help="measure only this shape (default: every shape)")
    parser.add_argument("--small", action="store_true", help="a tiny shape and short runs, to check the script on a CPU")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = {None: torch.bfloat16 if device.type == "cuda" else torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16, "float32": torch.float32}[args.dtype]
    shapes = SMALL if args.small else SHAPES
    if args.shape:
        if args.shape not in shapes:
            parser.error(f"--shape {args.shape}: use one of {', '.join(shapes)}")
        shapes = {args.shape: shapes[args.shape]}
    if args.small:
        args.batch, args.new_tokens, args.prompt_len, args.repeats, args.vocab = 16, 8, 16, 1, 512
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "dtype": str(dtype), "shapes": {}}
    for name, shape in shapes.items():
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as workdir:  # the random model: GBs at 0.5B
            results["shapes"][name] = measure(shape, args, device, dtype, Path(workdir))
        Path(args.out).write_text(json.dumps(results, indent=2))  # keep what finished if a later shape fails
    print(f"device {results['device']}, {results['dtype']}, batch {args.batch}, {args.prompt_len} prompt + {args.new_tokens} new tokens")
    print(f"{'shape':<14} {'HF sdpa tok/s':>14} {'bridge tok/s':>13} {'ours tok/s':>11} {'ratio':>6} "
          f"{'compiled':>9} {'step s':>8} {'peak MB':>8}")
    for name, r in results["shapes"].items():
        peak = "-" if r["train_step_peak_mb"] is None else f"{r['train_step_peak_mb']:.0f}"
        print(f"{name:<14} {r['hf_generate_sdpa_tokens_per_s']:>14.0f} {r['bridge_generate_tokens_per_s']:>13.0f} "
              f"{r['safesteer_rollouts_tokens_per_s']:>11.0f} {r['rollout_speedup_vs_hf']:>6.2f} "
              f"{str(r['sampler_compiled']):>9} {r['train_step_s']:>8.2f} {peak:>8}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
