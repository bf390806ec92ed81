"""FSDP2 sharding, checked on CPU with 2 gloo processes against the single-process run."""

from __future__ import annotations

import json
import math
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torchrun import CONFIG, WORKER, assert_same_metrics, assert_same_step, launch, torchrun

from safesteer_lens.cli import main
from safesteer_lens.checkpoints import CHECKPOINT
from safesteer_lens.distill import train
from safesteer_lens.errors import SafeSteerError
from safesteer_lens.parallel import World
from safesteer_lens.sharding import check_sharding, full_state, is_sharded, load_full_state


def _base_weights(run_dir: Path) -> Path:
    """The tiny base model's weights file (the model named in the run's direction.json)."""
    return Path(json.loads((run_dir / "direction.json").read_text())["model"]) / "model.safetensors"


@pytest.mark.parametrize("shard", ["student", "all"])
def test_sharded_runs_give_the_single_process_rollouts_loss_and_gradients(run_dir, tmp_path, shard):
    # with "all" the teacher is sharded too, and its steering hook must still shape the loss
    from parallel_worker import step_gradients

    single = step_gradients(str(run_dir), CONFIG)
    out = tmp_path / "grads.pt"
    launch("grads", run_dir, out, CONFIG, shard)
    assert_same_step(single, torch.load(out, weights_only=False), torch.load(f"{out}.rank1", weights_only=False))


def test_a_sharded_step_in_bfloat16_gathers_and_multiplies_in_bfloat16_and_sums_float32_gradients(run_dir, tmp_path):
    # FSDP's mixed precision rather than autocast: the residual stream itself is bfloat16 there,
    # so the step matches the whole model's autocast step to bfloat16's precision, not exactly
    from parallel_worker import step_gradients

    bf16 = replace(CONFIG, precision="bfloat16")
    whole, exact = step_gradients(str(run_dir), bf16), step_gradients(str(run_dir), CONFIG)
    out = tmp_path / "grads.pt"
    launch("grads", run_dir, out, bf16, "all")
    rank0, rank1 = torch.load(out, weights_only=False), torch.load(f"{out}.rank1", weights_only=False)
    assert rank0["texts"] + rank1["texts"] == whole["texts"] == exact["texts"]  # the same float32 rollouts
    assert rank0["dtypes"]["logits"] == whole["dtypes"]["logits"] == {torch.bfloat16}
    assert rank0["dtypes"]["embeddings"] == {torch.bfloat16}  # gathered in bfloat16 ...
    assert whole["dtypes"]["embeddings"] == {torch.float32}  # ... where autocast casts only the matmuls
    assert rank0["stats"]["loss"] == pytest.approx(whole["stats"]["loss"], rel=0.03)
    flat = {name: torch.cat([g.flatten() for g in run["grads"].values()]) for name, run in
            (("sharded", rank0), ("whole", whole), ("float32", exact))}
    assert all(g.dtype == torch.float32 for g in rank0["grads"].values())  # reduced into the float32 shards
    assert torch.isfinite(flat["sharded"]).all()
    assert not torch.equal(flat["sharded"], flat["float32"])  # it really multiplied in bfloat16
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(flat["sharded"], flat["whole"], 0) > 0.99
    assert cosine(flat["sharded"], flat["float32"], 0) > 0.99


def test_a_bfloat16_run_moves_between_one_process_and_sharded_processes(run_dir, tmp_path):
    # sharded and whole runs now multiply in the same dtype, so a run resumes across them
    bf16 = replace(CONFIG, precision="bfloat16")
    train(run_dir, bf16, progress=False, export=False, max_steps=1)
    launch("train", run_dir, tmp_path / "metrics.pt", bf16, "all")  # steps 1-2: resumed, sharded
    state = torch.load(run_dir / CHECKPOINT, weights_only=False)
    assert state["step"] == 3 and state["matmul_dtype"] == "bfloat16"
    rows = torch.load(tmp_path / "metrics.pt", weights_only=False)["metrics"]
    assert [(m["step"], m["precision"]) for m in rows] == [(0, "bfloat16"), (1, "bfloat16"), (2, "bfloat16")]
    assert all(math.isfinite(m["loss"]) for m in rows)
    resumed = train(run_dir, bf16, progress=False, export=False, resume=True).metrics
    assert [m["step"] for m in resumed] == [0, 1, 2, 3]


def test_sharded_ranks_that_finish_at_different_times_sample_what_one_process_would(run_dir, tmp_path):
    # rank 0 stops after 3 tokens, rank 1 after 6: rank 0 must keep joining rank 1's layer
    # gathers until both are done (a hang here means the ranks stopped decoding in lock-step)
    from parallel_worker import sample_settings

    from safesteer_lens.models import load_model
    from safesteer_lens.rollouts import RolloutSampler

    launch("sample", run_dir, tmp_path / "samples", CONFIG, "student")
    sampler = RolloutSampler(load_model(str(Path(_base_weights(run_dir)).parent), device="cpu"))
    for rank in (0, 1):
        got = torch.load(tmp_path / f"samples.rank{rank}", weights_only=False)
        for kind in ("sampled", "greedy"):
            settings = sample_settings(rank)
            want = sampler.sample(settings.pop("prompts"), **settings, do_sample=kind == "sampled")
            for low_memory in (False, True):  # layers kept whole while sampling, or gathered per token
                assert torch.equal(got[kind, low_memory], want.completion_ids), (rank, kind, low_memory)
        assert got["sampled", False].shape[1] == 3 + 3 * rank
        assert got["sharded_after"]  # the decoder layers kept whole for sampling were sharded again


def test_a_sharded_teacher_scores_ranks_of_different_widths_in_the_same_number_of_forwards(run_dir, tmp_path):
    # rank 0's rollouts are 3 tokens wide, rank 1's 6: sized by its own width rank 0 would score
    # its 8 rows in 2 forwards and rank 1 in 4, and the sharded teacher's gathers would not pair up
    from parallel_worker import teacher_chunks

    from safesteer_lens.models import load_model

    launch("teacher", run_dir, tmp_path / "teacher", CONFIG, "all")
    whole = load_model(str(Path(_base_weights(run_dir)).parent), device="cpu")
    got = [torch.load(tmp_path / f"teacher.rank{rank}", weights_only=False) for rank in (0, 1)]
    assert got[0]["bounds"] == got[1]["bounds"] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert got[0]["logits"].shape[1] == 3 and got[1]["logits"].shape[1] == 6
    assert got[0]["forwards"] == got[1]["forwards"] == 4  # 2 chunks, each a prompt pass and a completion pass
    alone = [teacher_chunks(str(run_dir), whole, World(rank, 1)) for rank in (0, 1)]  # own width decides
    assert alone[0]["forwards"] == 2  # what rank 0 would have run without agreeing on the width
    assert got[0]["sharded_after"] and got[1]["sharded_after"]
    for rank in (0, 1):  # the same steered logits as the whole teacher's
        assert torch.allclose(got[rank]["logits"], alone[rank]["logits"], atol=1e-5), rank


def test_a_run_moves_between_one_process_and_sharded_processes(run_dir, tmp_path):
    reference_dir = tmp_path / "reference"
    shutil.copytree(run_dir, reference_dir)
    reference = train(reference_dir, CONFIG, progress=False, export=False).metrics  # 4 steps

    train(run_dir, CONFIG, progress=False, export=False, max_steps=1)  # step 0: one process
    launch("train", run_dir, tmp_path / "metrics.pt", CONFIG, "student")  # steps 1-2: resumed, sharded
    assert torch.load(run_dir / CHECKPOINT, weights_only=False)["step"] == 3
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3  # rank 0 alone appended
    assert_same_metrics(torch.load(tmp_path / "metrics.pt", weights_only=False)["metrics"], reference[:3])

    resumed = train(run_dir, CONFIG, progress=False, export=False, resume=True).metrics  # step 3: one process
    assert_same_metrics(resumed, reference)


def test_the_safesteer_command_trains_sharded_and_exports_the_whole_student(run_dir, tmp_path):
    # float32: bfloat16 rounding depends on the batch shape (see tests/torchrun.py)
    flags = ["--n-prompts", "4", "--samples", "2", "--max-new-tokens", "4", "--sequences-per-step", "4",
             "--precision", "float32", "--lora-rank", "0", "--task-prompts", "0"]  # the demo preset's LoRA trains whole students only
    single_dir = tmp_path / "single"
    shutil.copytree(run_dir, single_dir)
    assert main(["train", "--run", str(single_dir), *flags]) == 0
    script = Path(sys.executable).with_name("safesteer")
    torchrun(str(script), "train", "--run-dir", str(run_dir), "--shard", "all", *flags)

    from safetensors.torch import load_file

    sharded = load_file(run_dir / "student" / "model.safetensors")
    single = load_file(single_dir / "student" / "model.safetensors")
    base = load_file(_base_weights(run_dir))
    assert sharded.keys() == single.keys()
    moved = max((single[k] - base[k]).abs().max().item() for k in single)
    assert moved > 1e-4  # training changed the weights, so equal exports mean something
    for key, value in single.items():
        assert torch.allclose(sharded[key], value, atol=1e-5, rtol=0), key


def test_the_pipeline_runs_with_student_and_teacher_sharded(tiny_dir, tmp_path):
    # rank 0 lets the base model go before training and loads it again for evaluation
    out = tmp_path / "run"
    done = torchrun(str(WORKER), "pipeline", str(out), str(tmp_path / "table"), json.dumps({"model": str(tiny_dir)}), "all")
    assert done.stdout.count("[3/6] train") == 1 and done.stdout.count("[6/6] report") == 1
    for name in ("student/config.json", "ablation-full-reverse/student/config.json", "results.csv", "report.md"):
        assert (out / name).exists(), name
    assert "SafeSteer student" in torch.load(tmp_path / "table.rank1", weights_only=False)["index"]


def test_full_state_round_trips_a_whole_model(tiny_dir):
    from safesteer_lens.models import load_model

    a = load_model(str(tiny_dir), device="cpu")
    b = load_model(str(tiny_dir), device="cpu")
    with torch.no_grad():
        for p in a.hf_model.parameters():
            p.add_(0.5)
    weights, _ = full_state(a)
    assert "model.layers.0.self_attn.q_proj.weight" in weights  # Hugging Face names
    assert not is_sharded(a)
    load_full_state(b, weights)
    for (name, pa), pb in zip(a.hf_model.named_parameters(), b.hf_model.parameters()):
        assert torch.equal(pa, pb), name
    with pytest.raises(SafeSteerError, match="no weights for"):
        load_full_state(b, {k: v for k, v in weights.items() if "layers.0." not in k})


def test_sharding_needs_several_processes_and_a_known_mode(run_dir, capsys):
    with pytest.raises(SafeSteerError, match="unknown shard mode 'zero3'"):
        check_sharding("zero3", World(0, 2))
    check_sharding("all", World(0, 2))
    with pytest.raises(SafeSteerError, match="launch with `torchrun"):
        train(run_dir, CONFIG, progress=False, shard="student")
    assert main(["train", "--run", str(run_dir), "--shard", "all"]) == 2
    assert "torchrun" in capsys.readouterr().err
    assert not (run_dir / "metrics.jsonl").exists()
