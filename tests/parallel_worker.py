"""Run under torchrun by tests/test_parallel.py and tests/test_sharding.py: one piece per process.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/parallel_worker.py MODE RUN_DIR OUT CONFIG_JSON [SHARD]

SHARD (default ``none``) is ``train``'s ``shard`` mode. MODE:

* ``grads``: this rank's rollouts and gradients for step 0; rank 0 saves the loss and the
  summed gradients to OUT.
* ``train``: ``train(RUN_DIR, max_steps=2, resume=True)``; rank 0 saves the metrics to OUT.
* ``sample``: a sharded student samples 2 prompts per rank, rank r with
  ``max_new_tokens = 3 + 3r`` (the ranks finish at different times); each rank saves its
  tokens to OUT.rankR.
* ``teacher``: a sharded, steered teacher scores rollouts 3 tokens wide on rank 0 and 6 on
  rank 1, in chunks sized from the width; each rank saves chunks, logits and its forward
  count to OUT.rankR.
* ``pipeline``: ``run_pipeline`` on the tiny model named by CONFIG_JSON's ``model`` key, with
  tiny settings; each rank saves its table's index to OUT.rankR.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from safesteer_lens.directions import load_direction
from safesteer_lens.distill import TrainConfig, TrainingRun, accumulate_gradients, build_optimizer, sample_rollouts, train
from safesteer_lens.data import load_builtin_prompts, prompt_texts
from safesteer_lens.models import load_model
from safesteer_lens.parallel import current_world, shutdown
from safesteer_lens.pipeline import run_pipeline
from safesteer_lens.precision import compute_dtype
from safesteer_lens.sharding import load_sharded, shard_model
from safesteer_lens.tokens import load_safety_tokens


def step_gradients(run_dir: str, config: TrainConfig, shard: str = "none") -> dict:
    """Loss and summed gradients of step 0 (what every process of the world agrees on).

    In float32 the student samples its own rollouts. In bfloat16 the rounding depends on the
    batch shape, so a whole float32 copy of the (still untrained) student samples them: the
    same tokens in every world, scored in bfloat16.
    """
    world = current_world()
    direction = load_direction(run_dir)
    teacher = load_model(direction.model, device="cpu")
    student = load_model(direction.model, device="cpu")
    compute = compute_dtype(config.precision, torch.device("cpu"))
    if shard != "none":
        shard_model(student, world, "cpu", compute=compute)
    if shard == "all":
        shard_model(teacher, world, "cpu", frozen=True, compute=compute)
    build_optimizer(student, config)
    prompts = prompt_texts(load_builtin_prompts("harmful", "train"))[: config.n_prompts]
    hooks = direction.hooks(teacher)
    ids = torch.tensor(load_safety_tokens(run_dir).ids)
    sampler = student if compute == torch.float32 else load_model(direction.model, device="cpu")
    rollouts = sample_rollouts(sampler, prompts, replace(config, precision="float32"), 0, world=world)
    dtypes = {"embeddings": set(), "logits": set()}  # what the residual stream starts in, what comes out
    records = [student.hf_model.get_input_embeddings().register_forward_hook(lambda m, i, out: dtypes["embeddings"].add(out.dtype)),
               student.hf_model.lm_head.register_forward_hook(lambda m, i, out: dtypes["logits"].add(out.dtype))]
    stats = asdict(accumulate_gradients(TrainingRun(config, world, student, teacher, hooks, direction, ids), rollouts, 0))
    for record in records:
        record.remove()
    # a sharded gradient is gathered whole (every rank takes part)
    grads = {n: (p.grad.full_tensor() if shard != "none" else p.grad).clone() for n, p in student.hf_model.named_parameters()}
    return {"rank": world.rank, "stats": stats, "grads": grads, "texts": rollouts.texts, "dtypes": dtypes}


def sample_settings(rank: int) -> dict:
    """What rank ``rank`` samples in MODE ``sample`` (a single process can repeat it)."""
    prompts = prompt_texts(load_builtin_prompts("harmful", "train"))[2 * rank : 2 * rank + 2]
    return {"prompts": prompts, "samples_per_prompt": 2, "max_new_tokens": 3 + 3 * rank, "seed": 5, "first_row": 4 * rank}


def sharded_samples(run_dir: str) -> dict:
    """This rank's sampled and greedy tokens from a sharded student, layers kept whole or not."""
    from safesteer_lens.rollouts import RolloutSampler
    from safesteer_lens.sharding import local

    world = current_world()
    student = shard_model(load_model(load_direction(run_dir).model, device="cpu"), world, "cpu")
    layers = student.hf_model.model.layers  # FSDP keeps the root (embeddings, unembedding) whole after a forward
    shapes = [local(p).shape for p in layers.parameters()]
    out = {"rank": world.rank}
    for low_memory in (False, True):
        sampler = RolloutSampler(student, low_memory=low_memory)
        for kind in ("sampled", "greedy"):
            settings = sample_settings(world.rank)
            rows = sampler.sample(settings.pop("prompts"), **settings, do_sample=kind == "sampled")
            out[kind, low_memory] = rows.completion_ids
    out["sharded_after"] = [local(p).shape for p in layers.parameters()] == shapes
    return out


def teacher_rollouts(run_dir: str, rank: int):
    """Rank ``rank``'s rollouts in MODE ``teacher``: 4 prompts x 2 samples, 3 + 3 * rank tokens."""
    from safesteer_lens.rollouts import RolloutSampler

    student = load_model(load_direction(run_dir).model, device="cpu")
    prompts = prompt_texts(load_builtin_prompts("harmful", "train"))[4 * rank : 4 * rank + 4]
    return RolloutSampler(student).sample(prompts, 2, max_new_tokens=3 + 3 * rank, seed=3, first_row=8 * rank)


def teacher_chunks(run_dir: str, teacher, world) -> dict:
    """The steered teacher's chunked logits for this rank's rollouts (chunks: 2 micro-batches at width 6)."""
    from safesteer_lens import distill

    direction = load_direction(run_dir)
    forwards = []
    hooks = direction.hooks(teacher)
    hooks.append(("blocks.0.hook_resid_pre", lambda resid, hook: forwards.append(1)))
    config = TrainConfig(samples_per_prompt=2, micro_batch=2, precision="float32")
    rollouts = teacher_rollouts(run_dir, world.rank)
    budget, distill.TEACHER_LOGITS_BUDGET = distill.TEACHER_LOGITS_BUDGET, 2 * (2 * 6 * teacher.d_vocab * 4)
    try:
        chunks = list(distill.teacher_micro_batches(teacher, hooks, rollouts, config, torch.device("cpu"), world))
    finally:
        distill.TEACHER_LOGITS_BUDGET = budget
    from torch.distributed.tensor import DTensor

    return {"bounds": [(a, b) for a, b, _ in chunks], "logits": torch.cat([t for _, _, t in chunks]),
            "forwards": len(forwards), "rank": world.rank,
            # a frozen teacher's root (embeddings, unembedding) is sharded again after each forward
            "sharded_after": all(isinstance(p, DTensor) for p in teacher.hf_model.parameters())}


def tiny_pipeline():
    """Pipeline settings small enough for a tiny model in seconds (as in test_pipeline.py)."""
    from safesteer_lens.directions import DirectionConfig
    from safesteer_lens.evaluate import EvalConfig
    from safesteer_lens.pipeline import PipelineConfig
    from safesteer_lens.tokens import TokenConfig

    return PipelineConfig(
        direction=DirectionConfig(method="diff-means", layers=[1, 2], n_train=4, n_val=2, n_test=2, coeffs=(1.0, 2.0),
                                  max_new_tokens=4),
        tokens=TokenConfig(horizon=3, samples_per_prompt=2, n_prompts=3, top_k_votes=20, set_size=10, prob_floor=0.0),
        train=TrainConfig(n_prompts=4, samples_per_prompt=2, max_new_tokens=4, sequences_per_step=4, micro_batch=2,
                          lr=1e-3),
        evaluate=EvalConfig(n_harmful=2, n_harmless=2, max_new_tokens=4, n_kl_prompts=2, n_general=2, n_examples=2, n_mcq=6),
    )


def main() -> None:
    mode, run_dir, out, config_json = sys.argv[1:5]
    shard = sys.argv[5] if len(sys.argv) > 5 else "none"
    if mode == "pipeline":
        settings = json.loads(config_json)
        table = run_pipeline(run_dir, settings["model"], config=tiny_pipeline(), progress=True, shard=shard)
        rank = current_world().rank
        torch.save({"index": list(table.index)}, f"{out}.rank{rank}")
        shutdown()
        return
    if mode in ("sample", "teacher"):
        if mode == "sample":
            result = sharded_samples(run_dir)
        else:
            world = current_world()
            result = teacher_chunks(run_dir, load_sharded(load_direction(run_dir).model, world, "cpu", frozen=True), world)
        torch.save(result, f"{out}.rank{result['rank']}")
        shutdown()
        return
    config = TrainConfig(**json.loads(config_json))
    if mode == "grads":
        result = step_gradients(run_dir, config, shard)
    else:
        result = {"rank": current_world().rank,
                  "metrics": train(run_dir, config, progress=False, export=False, max_steps=2, resume=True,
                                   shard=shard).metrics}
    if result["rank"] == 0:
        torch.save(result, out)
    else:
        torch.save({"texts": result.get("texts")}, f"{out}.rank{result['rank']}")
    shutdown()


if __name__ == "__main__":
    main()
