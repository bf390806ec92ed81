"""Per-optimizer-step time and peak memory: `safesteer train` against a plain-transformers loop.

The reference loop follows how the paper's released TRL-based code works: HF ``generate`` for
the student's rollouts, an HF teacher whose steering vector is added by a forward pre-hook on
the decoder layer, full ``log_softmax`` over the vocabulary for both models, and the loss
gathered on the safety tokens S. Ours is :func:`safesteer_lens.distill.train_step` exactly as
``safesteer train`` runs it (with its monitoring). Same model, prompts, settings and seeds, and
the same compute precision (``--precision``, default ``auto`` as in ``safesteer train``): where
it means bfloat16, the reference runs its generation and forwards under ``torch.autocast`` too,
as HF Trainer (and so TRL) does with ``bf16=True``.

Each loop runs in its own subprocesses (so peak RSS belongs to one loop), in a single
invocation. The timed steps are split into rounds run in the order reference, ours, ours,
reference, ... (each subprocess warms up with one untimed step first), so a machine that
slows down or speeds up during the run weighs on both loops alike::

    python benchmarks/bench_train.py [--model M] [--steps 8] [--rounds 2] [--run RUN_DIR] [--precision P]

``RUN_DIR`` must hold ``direction.*`` and ``safety_tokens.json`` (default ``runs/demo``, made
by ``make demo``). The last line is ``speedup=<reference step time / our step time>``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from safesteer_lens.precision import PRECISIONS


def _setup(args: argparse.Namespace):
    import torch

    from safesteer_lens.data import load_builtin_prompts, prompt_texts
    from safesteer_lens.directions import load_direction
    from safesteer_lens.distill import preset
    from safesteer_lens.tokens import load_safety_tokens

    torch.manual_seed(0)
    # one harmful step with the paper's loss, as the reference loop runs it (no harmless anchor)
    config = preset("demo", loss="safesteer", anchor_weight=0.0, epochs=1, precision=args.precision, task_prompts=0)
    direction = load_direction(args.run)
    tokens = load_safety_tokens(args.run)
    prompts = prompt_texts(load_builtin_prompts("harmful", "train"))[: config.n_prompts]
    return config, direction, tokens, prompts


def run_ours(args: argparse.Namespace) -> list[float]:
    """Step times of safesteer-lens's own training step."""
    import torch

    from safesteer_lens.distill import TrainingRun, build_optimizer, rollout_sampler, train_step
    from safesteer_lens.models import load_model

    config, direction, tokens, prompts = _setup(args)
    teacher = load_model(args.model or direction.model)
    student = load_model(teacher.name)
    optimizer, scheduler = build_optimizer(student, config)  # as `safesteer train` builds them
    hooks = direction.hooks(teacher)
    ids = torch.tensor(tokens.ids)
    sampler = rollout_sampler(student, config)  # built once, as `train` does
    from safesteer_lens.parallel import World

    run = TrainingRun(config, World(), student, teacher, hooks, direction, ids, optimizer, scheduler, sampler, prompts)
    times = []
    for step in _steps(args):
        start = time.perf_counter()
        train_step(run, step)
        times.append(time.perf_counter() - start)
    return times[1:]


def run_reference(args: argparse.Namespace) -> list[float]:
    """Step times of a plain-transformers loop in the style of the paper's TRL-based code."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

    from safesteer_lens.distill import _step_prompts
    from safesteer_lens.models import _gguf_as_hf_dir, embedded_model_path, EMBEDDED_MODELS
    from safesteer_lens.precision import autocast, compute_dtype

    config, direction, tokens, prompts = _setup(args)
    name = args.model or direction.model
    path = _gguf_as_hf_dir(embedded_model_path(name), torch.float32) if name in EMBEDDED_MODELS else Path(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    student = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    vector = direction.coeff * direction.vector

    def pre_hook(module, args_, kwargs):
        hidden = args_[0] if args_ else kwargs["hidden_states"]
        hidden = hidden + vector.to(hidden.dtype)
        if args_:
            return (hidden, *args_[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args_, kwargs

    teacher.model.layers[direction.layer].register_forward_pre_hook(pre_hook, with_kwargs=True)
    # HF Trainer (which TRL builds on) defaults to the fused AdamW kernel with torch >= 2.8
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, fused=True)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 0, config.total_steps)
    s_ids = torch.tensor(tokens.ids)
    eos = tokenizer.eos_token_id
    cpu = torch.device("cpu")
    dtype = compute_dtype(config.precision, cpu)
    times = []
    for step in _steps(args):
        start = time.perf_counter()
        chosen = _step_prompts(prompts, config, step)  # the same prompts as ours at this step
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                 for p in chosen for _ in range(config.samples_per_prompt)]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        torch.manual_seed(config.seed * 1_000_003 + step)
        with torch.no_grad(), autocast(dtype, cpu):
            out = student.generate(**enc, max_new_tokens=config.max_new_tokens, do_sample=True, temperature=1.0,
                                   top_k=0, top_p=1.0, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
        p_len = enc["input_ids"].shape[1]
        completion = out[:, p_len:]
        is_eos = completion == eos
        mask = (torch.cumsum(is_eos.long(), 1) - is_eos.long()) == 0
        attention = torch.cat([enc["attention_mask"], mask.long()], 1)
        n = out.shape[0]
        for lo in range(0, n, config.micro_batch):
            hi = min(lo + config.micro_batch, n)
            with torch.no_grad(), autocast(dtype, cpu):
                t_logits = teacher(out[lo:hi], attention_mask=attention[lo:hi]).logits[:, p_len - 1 : -1]
            with autocast(dtype, cpu):
                s_logits = student(out[lo:hi], attention_mask=attention[lo:hi]).logits[:, p_len - 1 : -1]
            log_ps = torch.log_softmax(s_logits.float(), -1)
            log_pt = torch.log_softmax(t_logits.float(), -1)
            ps_s, lps_s, lpt_s = log_ps.exp()[..., s_ids], log_ps[..., s_ids], log_pt[..., s_ids]
            per_token = (ps_s * (lps_s - lpt_s)).sum(-1)
            m = mask[lo:hi].float()
            loss = ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).mean()
            (loss * (hi - lo) / n).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times[1:]


def _steps(args: argparse.Namespace) -> range:
    """A child's step indices: one untimed warm-up step, then its timed steps."""
    return range(args.first_step, args.first_step + args.steps + 1)


def _child(args: argparse.Namespace) -> None:
    times = run_ours(args) if args.child == "ours" else run_reference(args)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"times": times, "peak_rss_mb": peak_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the model named in RUN/direction.json")
    parser.add_argument("--run", default="runs/demo", help="run directory with direction and safety tokens")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per loop, over all rounds")
    parser.add_argument("--rounds", type=int, default=2, help="subprocesses per loop, run alternately")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="compute precision of both loops (auto: bfloat16 where the CPU has native bf16)")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    parser.add_argument("--child", choices=["ours", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--first-step", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    if not (Path(args.run) / "direction.json").exists():
        sys.exit(f"error: {args.run} has no direction.json; run `make demo` (or safesteer direction/tokens) first")
    if args.rounds < 1 or args.steps % args.rounds:
        sys.exit(f"error: --steps ({args.steps}) must be a positive multiple of --rounds ({args.rounds})")
    per_round = args.steps // args.rounds
    results: dict = {loop: {"times": [], "peak_rss_mb": 0.0} for loop in ("reference", "ours")}
    for r in range(args.rounds):
        order = ("reference", "ours") if r % 2 == 0 else ("ours", "reference")  # ABBA...: drift cancels
        for loop in order:
            cmd = [sys.executable, __file__, "--child", loop, "--run", args.run, "--steps", str(per_round),
                   "--first-step", str(r * per_round), "--precision", args.precision]
            if args.model:
                cmd += ["--model", args.model]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            child = json.loads(done.stdout.strip().splitlines()[-1])
            results[loop]["times"] += child["times"]
            results[loop]["peak_rss_mb"] = max(results[loop]["peak_rss_mb"], child["peak_rss_mb"])
    results["precision"] = args.precision
    ref = statistics.median(results["reference"]["times"])
    ours = statistics.median(results["ours"]["times"])
    print(f"{'loop':<10} {'median step s':>14} {'peak RSS MB':>12}")
    for loop in ("reference", "ours"):
        r = results[loop]
        print(f"{loop:<10} {statistics.median(r['times']):>14.2f} {r['peak_rss_mb']:>12.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"speedup={ref / ours:.2f}")


if __name__ == "__main__":
    main()
