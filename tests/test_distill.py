from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from safesteer_lens.cli import main
from safesteer_lens.distill import PRESETS, TrainConfig, train
from safesteer_lens.errors import SafeSteerError
from safesteer_lens.generation import generate
from safesteer_lens.tokens import SafetyTokens

TIMING = ("rollout_tokens_per_s", "update_tokens_per_s", "seconds")


def tiny_config(**overrides):
    base = dict(n_prompts=8, samples_per_prompt=2, max_new_tokens=6, sequences_per_step=4,
                micro_batch=2, lr=3e-3, checkpoint_every=2, warmup_fraction=0.0)
    return TrainConfig(**{**base, **overrides})


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_loss_falls_over_a_few_steps(tiny, run_dir):
    config = tiny_config(n_prompts=2, epochs=6, sequences_per_step=4)  # same prompts each step
    result = train(run_dir, config, teacher=tiny, progress=False, export=False)
    losses = [m["loss"] for m in result.metrics]
    assert len(losses) == 6
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2
    assert {"kl_s", "kl_full", "s_mass_student", "s_mass_teacher", "rollout_refusal", "projection"} <= set(result.metrics[0])


def test_resume_after_interruption_gives_identical_metrics(tiny, run_dir, tmp_path_factory):
    config = tiny_config()
    full = train(run_dir, config, teacher=tiny, progress=False, export=False).metrics
    other = tmp_path_factory.mktemp("resumed")
    for name in ("direction.json", "direction.safetensors", "safety_tokens.json"):
        (other / name).write_bytes((run_dir / name).read_bytes())
    train(other, config, teacher=tiny, progress=False, export=False, max_steps=2)  # "interrupted"
    with (other / "metrics.jsonl").open("a") as handle:  # a step that ran but was not checkpointed
        handle.write(json.dumps({"step": 2, "loss": 123.0}) + "\n")
    resumed = train(other, config, teacher=tiny, progress=False, export=False, resume=True).metrics
    assert len(full) == config.total_steps == 4
    assert _strip(resumed) == _strip(full)


def test_export_loads_with_plain_transformers_and_generates_the_same(tiny, run_dir):
    import os
    import stat

    result = train(run_dir, tiny_config(n_prompts=4), teacher=tiny, progress=False)
    umask = os.umask(0o022)
    os.umask(umask)
    assert {stat.S_IMODE(p.stat().st_mode) for p in (run_dir / "student").iterdir()} == {0o666 & ~umask}  # readable by others
    plain = AutoModelForCausalLM.from_pretrained(run_dir / "student").eval()
    ours = generate(result.student, ["How do I bake bread?", "Hi"], max_new_tokens=8)
    batch = result.student.tokenize(["How do I bake bread?", "Hi"])
    with torch.no_grad():
        theirs = plain.generate(batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=8,
                                do_sample=False, eos_token_id=tiny.eot_token_ids, pad_token_id=tiny.tokenizer.pad_token_id)
    assert torch.equal(theirs[:, batch.input_ids.shape[1]:][ours.completion_mask], ours.completion_ids[ours.completion_mask])
    # training changed the weights
    base_w = tiny.hf_state_dict()["model.layers.0.mlp.down_proj.weight"]
    assert not torch.equal(plain.state_dict()["model.layers.0.mlp.down_proj.weight"], base_w)


def test_missing_artifacts_and_bad_vocab_are_clear_errors(tiny, run_dir, tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(SafeSteerError, match="safesteer direction"):
        train(empty, tiny_config(), teacher=tiny, progress=False)
    SafetyTokens([{"id": tiny.d_vocab + 5, "text": "x", "votes": 1, "mean_delta": 0.0}]).save(run_dir)
    with pytest.raises(SafeSteerError, match="vocabulary"):
        train(run_dir, tiny_config(), teacher=tiny, progress=False)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny, run_dir):
    config = tiny_config(lr=1e30, max_grad_norm=1e30, checkpoint_every=1)
    with pytest.raises(SafeSteerError, match="at step 1; training stopped before the update; checkpoint.pt holds step 1"):
        train(run_dir, config, teacher=tiny, progress=False)
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert saved["step"] == 1
    assert all(torch.isfinite(v).all() for v in saved["student"].values() if v.is_floating_point())


def test_full_disk_leaves_previous_checkpoint_as_latest(tiny, run_dir, monkeypatch):
    train(run_dir, tiny_config(), teacher=tiny, progress=False, export=False, max_steps=2)
    before = (run_dir / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SafeSteerError, match="last good checkpoint is step 2"):
        train(run_dir, tiny_config(), teacher=tiny, progress=False, export=False, resume=True)
    monkeypatch.setattr(torch, "save", real_save)
    assert (run_dir / "checkpoint.pt").read_bytes() == before
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".") and p.name != ".safesteer.lock"]  # no temp files


def test_a_bfloat16_teacher_trains_a_float32_student(tiny_dir, run_dir):
    # the CUDA default: the teacher loads in bfloat16, the student keeps float32 weights
    from safesteer_lens.models import load_model

    teacher = load_model(str(tiny_dir), dtype="bfloat16")
    result = train(run_dir, tiny_config(n_prompts=2), teacher=teacher, progress=False, export=False)
    assert result.student.dtype == torch.float32
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in result.metrics)
    assert train(run_dir, tiny_config(n_prompts=2, student_dtype="bfloat16"), teacher=teacher, progress=False,
                 export=False).student.dtype == torch.bfloat16
    with pytest.raises(SafeSteerError, match="unknown student_dtype"):
        tiny_config(student_dtype="fp8")


def test_every_epoch_counts_its_short_last_step():
    config = TrainConfig(n_prompts=10, samples_per_prompt=2, sequences_per_step=8, epochs=2)  # 4 prompts a step
    assert config.total_steps == 6  # 4 + 4 + 2, twice


def test_more_prompts_than_the_train_split_is_a_clear_error(tiny, run_dir):
    with pytest.raises(SafeSteerError, match="use at most"):
        train(run_dir, tiny_config(n_prompts=100_000), teacher=tiny, progress=False)


def test_bad_settings_are_rejected():
    with pytest.raises(SafeSteerError, match="multiple"):
        TrainConfig(sequences_per_step=6, samples_per_prompt=4)
    with pytest.raises(SafeSteerError, match="unknown loss"):
        TrainConfig(loss="kl")
    with pytest.raises(SafeSteerError, match="anchor_weight must be 0"):
        TrainConfig(anchor_weight=-1.0)
    with pytest.raises(SafeSteerError, match="unknown anchor_loss"):
        TrainConfig(anchor_loss="kl")


def test_cli_train_on_tiny(run_dir, tiny_dir, capsys):
    code = main(["train", "--run", str(run_dir), "--preset", "demo", "--loss", "full-reverse",
                 "--n-prompts", "2", "--samples", "2", "--max-new-tokens", "4", "--sequences-per-step", "4",
                 "--precision", "bfloat16", "--task-prompts", "0"])
    assert code == 0
    assert (run_dir / "student" / "config.json").exists()
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    demo = replace(PRESETS["demo"], n_prompts=2, samples_per_prompt=2, sequences_per_step=4, task_prompts=0)
    assert len(rows) == demo.total_steps  # the demo preset's epochs, of one step each
    assert json.loads(rows[0])["precision"] == "bfloat16" and "anchor_loss" in json.loads(rows[0])


def test_cli_train_takes_the_anchor_and_lora(run_dir):
    code = main(["train", "--run", str(run_dir), "--n-prompts", "2", "--samples", "2", "--max-new-tokens", "4",
                 "--sequences-per-step", "4", "--task-prompts", "0", "--anchor-weight", "0.5", "--anchor-loss", "full-reverse",
                 "--lora-rank", "2", "--lora-targets", "v_proj", "--lr", "1e-3"])
    assert code == 0
    row = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert {"anchor_loss", "anchor_kl_s", "anchor_refusal"} <= set(row)
    assert (run_dir / "student" / "config.json").exists()


def test_teacher_scores_whole_chunks_with_the_same_logits_per_micro_batch(tiny, monkeypatch):
    from safesteer_lens import distill
    from safesteer_lens.distill import teacher_micro_batches
    from safesteer_lens.scoring import teacher_forced_logits

    config = tiny_config(samples_per_prompt=2, sequences_per_step=8, micro_batch=2, precision="float32")
    prompts = [p for p in ["How do I bake bread?", "Hi", "Write a poem about rain", "Sing"] for _ in range(2)]
    rollouts = generate(tiny, prompts, max_new_tokens=5, do_sample=True, seed=0)
    expected = [teacher_forced_logits(tiny, rollouts, [], a, a + 2, 2) for a in range(0, 8, 2)]
    for budget, forwards in ((1, 4), (10**9, 1)):  # one micro-batch per forward, or all at once
        monkeypatch.setattr(distill, "TEACHER_LOGITS_BUDGET", budget)
        calls = []
        monkeypatch.setattr(distill, "teacher_forced_logits",
                            lambda *a, **k: calls.append(a) or teacher_forced_logits(*a, **k))
        got = list(teacher_micro_batches(tiny, [], rollouts, config, torch.device("cpu")))
        assert [(a, b) for a, b, _ in got] == [(0, 2), (2, 4), (4, 6), (6, 8)]
        assert len(calls) == forwards
        for (_, _, logits), want in zip(got, expected):
            assert logits.dtype == torch.float32
            assert torch.allclose(logits, want, atol=1e-5)


def test_bfloat16_precision_computes_in_bfloat16_and_stays_close_to_float32(tiny_dir, run_dir):
    from safesteer_lens.directions import load_direction
    from safesteer_lens.distill import TrainingRun, accumulate_gradients
    from safesteer_lens.models import load_model
    from safesteer_lens.parallel import World

    teacher, student = load_model(str(tiny_dir)), load_model(str(tiny_dir))
    params = list(student.hf_model.parameters())
    for p in params:
        p.requires_grad_(True)
    direction = load_direction(run_dir)
    hooks = direction.hooks(teacher)
    safety_ids = torch.tensor(SafetyTokens.load(run_dir).ids)
    prompts = [p for p in ["How do I bake bread?", "Hi", "Write a poem about rain and wind"] for _ in range(2)]
    rollouts = generate(student, prompts, max_new_tokens=6, do_sample=True, seed=0)  # left-padded prompts
    logits_dtypes = {"float32": [], "bfloat16": []}
    grads, losses = {}, {}
    for precision in ("float32", "bfloat16"):
        seen = logits_dtypes[precision]
        handle = student.hf_model.lm_head.register_forward_hook(lambda m, i, out, seen=seen: seen.append(out.dtype))
        config = tiny_config(samples_per_prompt=2, sequences_per_step=6, micro_batch=2, precision=precision)
        stats = accumulate_gradients(TrainingRun(config, World(), student, teacher, hooks, direction, safety_ids), rollouts, 0)
        grads[precision] = torch.cat([p.grad.flatten() for p in params])
        losses[precision] = stats.loss
        handle.remove()
        for p in params:
            p.grad = None
    assert logits_dtypes["float32"] == [torch.float32] * 6  # prompt and completions of 3 micro-batches
    assert logits_dtypes["bfloat16"] == [torch.bfloat16] * 6
    a, b = grads["float32"], grads["bfloat16"]
    assert torch.isfinite(b).all()
    assert not torch.equal(a, b)  # the matmuls really ran in bfloat16
    assert torch.nn.functional.cosine_similarity(a, b, 0) > 0.99
    assert abs(losses["bfloat16"] - losses["float32"]) < 0.05 * abs(losses["float32"]) + 1e-3
    with pytest.raises(SafeSteerError, match="unknown precision"):
        tiny_config(precision="half")


def test_resume_names_the_settings_that_differ_and_reads_older_checkpoints(tiny, run_dir):
    config = tiny_config(precision="float32", checkpoint_every=1)
    train(run_dir, config, teacher=tiny, progress=False, export=False, max_steps=1)
    with pytest.raises(SafeSteerError, match=r"other settings: precision \('float32' there, 'bfloat16' now\)"):
        train(run_dir, tiny_config(precision="bfloat16", checkpoint_every=1), teacher=tiny, progress=False, resume=True)
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    state["matmul_dtype"] = "bfloat16"  # as if "auto" had meant bfloat16 on the machine that wrote it
    torch.save(state, run_dir / "checkpoint.pt")
    with pytest.raises(SafeSteerError, match="trained with bfloat16 matmuls.*resume with --precision bfloat16"):
        train(run_dir, config, teacher=tiny, progress=False, resume=True)
    del state["matmul_dtype"], state["config"]["precision"]  # written before --precision existed: float32
    torch.save(state, run_dir / "checkpoint.pt")
    resumed = train(run_dir, config, teacher=tiny, progress=False, export=False, resume=True, max_steps=1)
    assert [m["step"] for m in resumed.metrics] == [0, 1]


def test_a_sampler_in_another_precision_than_the_scoring_is_refused(tiny_dir, run_dir):
    from safesteer_lens.distill import rollout_sampler, sample_rollouts
    from safesteer_lens.models import load_model
    from safesteer_lens.rollouts import RolloutSampler

    student = load_model(str(tiny_dir))
    config = tiny_config(precision="bfloat16")
    with pytest.raises(SafeSteerError, match="samples in torch.float32 but precision 'bfloat16'"):
        sample_rollouts(student, ["Hi"] * 8, config, 0, sampler=RolloutSampler(student))
    assert len(sample_rollouts(student, ["Hi"] * 8, config, 0, sampler=rollout_sampler(student, config)).texts) == 4


class _Planted:
    """A pickle payload that would create a file if a loader ever unpickled it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_resume_never_runs_code_planted_in_the_checkpoint(tiny, run_dir):
    marker = run_dir / "planted-code-ran"
    torch.save({"format": 1, "step": 1, "payload": _Planted(marker)}, run_dir / "checkpoint.pt")
    with pytest.raises(SafeSteerError, match="cannot be read as a checkpoint.*without --resume"):
        train(run_dir, tiny_config(), teacher=tiny, progress=False, export=False, resume=True)
    assert not marker.exists()


def test_the_bounded_loss_trains_and_falls(tiny, run_dir):
    config = tiny_config(loss="safesteer-bounded", n_prompts=2, epochs=6, sequences_per_step=4)
    losses = [m["loss"] for m in train(run_dir, config, teacher=tiny, progress=False, export=False).metrics]
    assert len(losses) == 6 and all(loss >= 0 for loss in losses)
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2


def test_cli_offers_every_loss():
    from safesteer_lens.cli import build_parser
    from safesteer_lens.losses import LOSSES

    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    loss_action = next(a for a in train_parser._actions if a.dest == "loss")
    assert tuple(loss_action.choices) == LOSSES and "safesteer-bounded" in LOSSES


def test_the_anchor_starts_at_zero_then_holds_the_student_to_the_base(tiny, run_dir):
    # at step 0 the student is the base, so the anchor's KL to the unsteered base is exactly 0
    # (the steered teacher's is not); later steps move the student and the anchor pulls back
    config = tiny_config(anchor_weight=2.0, n_prompts=4, epochs=2)
    metrics = train(run_dir, config, teacher=tiny, progress=False, export=False).metrics
    assert abs(metrics[0]["anchor_loss"]) < 1e-6 and metrics[0]["loss"] > 1e-4
    assert all(m["anchor_loss"] > 1e-6 for m in metrics[1:])
    assert all(0 <= m["anchor_refusal"] <= 1 for m in metrics)
    plain = train(run_dir, tiny_config(n_prompts=4, epochs=2), teacher=tiny, progress=False, export=False).metrics
    assert "anchor_loss" not in plain[0]
    assert plain[0]["loss"] == pytest.approx(metrics[0]["loss"])  # the same harmful rollouts at step 0
    assert metrics[-1]["loss"] != pytest.approx(plain[-1]["loss"])  # and the anchor changed the updates


def test_the_anchor_weight_scales_its_gradient_and_scores_against_the_unsteered_base(tiny, run_dir):
    from safesteer_lens.directions import load_direction
    from safesteer_lens.distill import TrainingRun, accumulate_gradients, sample_rollouts
    from safesteer_lens.models import load_model
    from safesteer_lens.parallel import World

    student = load_model(tiny.name)
    params = list(student.hf_model.parameters())
    for p in params:
        p.requires_grad_(True)
    direction = load_direction(run_dir)
    ids = torch.arange(20, 60)
    config = tiny_config(precision="float32")  # bfloat16 rounding would blur the factor of 3
    harmless = sample_rollouts(student, ["How do I bake bread?", "Name a colour."] * 2, config, 0, stream=1)
    run = TrainingRun(config, World(), student, tiny, direction.hooks(tiny), direction, ids)
    grads = []
    for scale in (1.0, 3.0):
        stats = accumulate_gradients(run, harmless, 0, loss="full-reverse", scale=scale, hooks=[])
        grads.append(torch.cat([p.grad.flatten() for p in params if p.grad is not None]))
        assert abs(stats.loss) < 1e-6  # an untrained student is the unsteered base
        for p in params:
            p.grad = None
    # the KL's gradient vanishes at its minimum: perturb the student so it has one to scale
    with torch.no_grad():
        params[-1].add_(0.05 * torch.randn_like(params[-1]))
    grads = []
    for scale in (1.0, 3.0):
        accumulate_gradients(run, harmless, 0, loss="full-reverse", scale=scale, hooks=[])
        grads.append(torch.cat([p.grad.flatten() for p in params if p.grad is not None]))
        for p in params:
            p.grad = None
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], 3 * grads[0], rtol=1e-4, atol=1e-7)
    other = sample_rollouts(student, ["How do I bake bread?", "Name a colour."] * 2, config, 0, stream=0)
    assert other.texts != harmless.texts  # the anchor's rollouts have their own seeds


def test_lora_trains_only_adapters_and_exports_a_merged_plain_model(tiny, run_dir):
    before = {k: v.clone() for k, v in tiny.hf_state_dict().items()}
    config = tiny_config(lora_rank=4, lora_alpha=8.0, lora_targets="q_proj,v_proj", lr=3e-2, precision="float32")
    result = train(run_dir, config, teacher=tiny, progress=False)
    after = result.student.hf_state_dict()
    assert set(after) == set(before)  # merged: no adapter names are left
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    plain = AutoModelForCausalLM.from_pretrained(run_dir / "student").eval()
    batch = result.student.tokenize(["How do I bake bread?"])
    with torch.no_grad():
        ours = result.student.bridge(batch.input_ids, attention_mask=batch.attention_mask)
        theirs = plain(batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_a_lora_checkpoint_refuses_another_base_model(tiny, run_dir, tmp_path):
    from safesteer_lens.models import load_model
    from safesteer_lens.tiny import build_tiny_llama

    config = tiny_config(lora_rank=2, lr=3e-2, precision="float32")
    train(run_dir, config, teacher=tiny, progress=False, export=False, max_steps=2)
    other_base = load_model(str(build_tiny_llama(tmp_path / "other", seed=1)), device="cpu")  # same shapes, other weights
    with pytest.raises(SafeSteerError, match="adapters trained on other base weights"):
        train(run_dir, config, teacher=other_base, progress=False, export=False, resume=True)


def test_lora_resumes_like_an_uninterrupted_run(tiny, run_dir, tmp_path_factory):
    config = tiny_config(lora_rank=2, lr=3e-2, precision="float32")
    full = train(run_dir, config, teacher=tiny, progress=False, export=False).metrics
    other = tmp_path_factory.mktemp("lora-resumed")
    for name in ("direction.json", "direction.safetensors", "safety_tokens.json"):
        (other / name).write_bytes((run_dir / name).read_bytes())
    train(other, config, teacher=tiny, progress=False, export=False, max_steps=2)
    state = torch.load(other / "checkpoint.pt", weights_only=True)
    assert state["weights"] == "adapters" and state["student"]  # what trains, not the frozen base
    assert all(".lora_" in name for name in state["student"])
    resumed = train(other, config, teacher=tiny, progress=False, export=False, resume=True).metrics
    assert _strip(resumed) == _strip(full)
    with pytest.raises(SafeSteerError, match="no layer matches lora_targets"):
        train(run_dir, tiny_config(lora_rank=2, lora_targets="nonexistent_proj"), teacher=tiny, progress=False)


def test_the_anchor_can_cycle_over_more_harmless_prompts_than_it_trains_on(run_dir):
    from safesteer_lens.distill import _step_prompts, preflight

    config = tiny_config(anchor_weight=1.0, n_prompts=4, anchor_prompts=10, epochs=3)
    inputs = preflight(run_dir, config)
    assert len(inputs.prompts) == 4 and len(inputs.anchor_prompts) == 10
    assert len(preflight(run_dir, replace(config, anchor_prompts=0)).anchor_prompts) == 4  # 0: as many as n_prompts
    assert preflight(run_dir, replace(config, anchor_weight=0.0)).anchor_prompts == []
    seen = {p for step in range(config.total_steps) for p in _step_prompts(inputs.anchor_prompts, config, step)}
    assert len(seen) > len(inputs.prompts)  # the anchor reaches prompts beyond the first n_prompts
    with pytest.raises(SafeSteerError, match="anchor_prompts is 100000 but the built-in harmless train split"):
        preflight(run_dir, replace(config, anchor_prompts=100_000))
    with pytest.raises(SafeSteerError, match="anchor_prompts must be 0"):
        replace(config, anchor_prompts=-1)


def test_mixed_categories_give_the_training_and_anchor_prompts_every_category(run_dir):
    from safesteer_lens.data import load_builtin_prompts
    from safesteer_lens.distill import preflight

    category = {p.prompt: p.category for p in load_builtin_prompts()}
    config = tiny_config(anchor_weight=1.0, n_prompts=64)
    in_file_order = preflight(run_dir, config)
    mixed = preflight(run_dir, replace(config, mix_categories=True))
    for before, after in ((in_file_order.prompts, mixed.prompts), (in_file_order.anchor_prompts, mixed.anchor_prompts)):
        assert len(before) == len(after) == 64
        assert len({category[p] for p in before}) == 7 and len({category[p] for p in after}) == 13
    assert len({category[p] for p in preflight(run_dir, replace(config, mix_categories=True, anchor_prompts=26)).anchor_prompts}) == 13


def test_the_teacher_coefficient_is_the_directions_unless_the_config_names_another(tiny, run_dir):
    from safesteer_lens.directions import load_direction
    from safesteer_lens.distill import Trainer

    config = tiny_config(n_prompts=4, epochs=1)
    own = load_direction(run_dir).coeff
    default = train(run_dir, config, teacher=tiny, progress=False, export=False).metrics
    same = train(run_dir, replace(config, teacher_coeff=own), teacher=tiny, progress=False, export=False).metrics
    milder = train(run_dir, replace(config, teacher_coeff=own / 4), teacher=tiny, progress=False, export=False)
    assert _strip(same) == _strip(default)
    assert [m["kl_full"] for m in milder.metrics] != [m["kl_full"] for m in default]
    assert Trainer(run_dir, replace(config, teacher_coeff=own / 4), teacher=tiny).run.direction.coeff == own / 4
    assert load_direction(run_dir).coeff == own  # the artifact is untouched
    with pytest.raises(SafeSteerError, match="teacher_coeff must be 0"):
        replace(config, teacher_coeff=-1.0)


def test_the_anchor_can_take_look_alike_prompts_kinds_in_turn():
    from safesteer_lens.data import load_study_set
    from safesteer_lens.distill import _anchor_prompts

    plain = _anchor_prompts(TrainConfig(anchor_weight=1.0, n_prompts=4))
    mixed = _anchor_prompts(TrainConfig(anchor_weight=1.0, n_prompts=4, anchor_lookalikes=3))
    train = {p.prompt: p.category for p in load_study_set("lookalike", "train")}
    assert mixed[:4] == plain and len({train[p] for p in mixed[4:]}) == 3  # three kinds of trap
    assert _anchor_prompts(TrainConfig(anchor_weight=0.0, anchor_lookalikes=3)) == []
    with pytest.raises(SafeSteerError, match="look-alike train split has 100"):
        _anchor_prompts(TrainConfig(anchor_weight=1.0, anchor_lookalikes=101))


def test_benchmark_phrased_harmful_prompts_join_the_training_prompts_and_the_steps():
    from safesteer_lens.data import load_study_set
    from safesteer_lens.distill import _harmful_prompts

    config = TrainConfig(n_prompts=4, samples_per_prompt=2, sequences_per_step=4, task_prompts=5)
    prompts = _harmful_prompts(config)
    tasks = {p.prompt: p.category for p in load_study_set("tasks", "train")}
    assert prompts[:4] == _harmful_prompts(replace(config, task_prompts=0))
    assert len({tasks[p] for p in prompts[4:]}) == 5  # five harm categories, in turn
    assert config.harmful_prompts == 9 and config.total_steps == 5  # 9 prompts, 2 per step
    with pytest.raises(SafeSteerError, match=r"tasks\) train split has 52"):
        _harmful_prompts(replace(config, task_prompts=53))
    with pytest.raises(SafeSteerError, match="task_prompts must be 0"):
        replace(config, task_prompts=-1)


@pytest.mark.parametrize("loss, lora", [("safesteer-bounded", 0), ("safesteer", 4)])
def test_training_from_hidden_states_in_chunks_scores_the_step_as_whole_logits_do(tiny, run_dir, tmp_path, loss, lora):
    """unembed_chunk changes where the logits are formed, not the step: the first step's loss, monitors and gradient
    norm agree (float32). Later steps drift apart by rounding that AdamW amplifies on near-zero gradients, so the
    gradients themselves are pinned in float64 in tests/test_fused_loss.py."""
    import shutil

    other = tmp_path / "chunked"
    shutil.copytree(run_dir, other)
    config = tiny_config(n_prompts=2, loss=loss, lora_rank=lora, anchor_weight=0.5)
    whole = train(run_dir, config, teacher=tiny, progress=False, export=False)
    chunked = train(other, replace(config, unembed_chunk=2), teacher=tiny, progress=False, export=False)
    first, first_chunked = _strip(whole.metrics)[0], _strip(chunked.metrics)[0]
    assert first.keys() == first_chunked.keys()
    for key in ("loss", "kl_s", "kl_full", "s_mass_student", "s_mass_teacher", "grad_norm", "anchor_loss"):
        assert first_chunked[key] == pytest.approx(first[key], rel=1e-4, abs=2e-6), key  # metrics.jsonl keeps 6 places


@pytest.mark.parametrize("settings, name", [({"loss": "jsd", "jsd_beta": 0.0}, "jsd_beta"),
                                            ({"anchor_loss": "jsd", "jsd_beta": 1.0}, "jsd_beta"),
                                            ({"unembed_chunk": -1}, "unembed_chunk")])
def test_settings_a_loss_would_reject_fail_when_the_config_is_built(settings, name):
    with pytest.raises(SafeSteerError, match=name):
        TrainConfig(**settings)
    assert TrainConfig(jsd_beta=1.0).jsd_beta == 1.0  # a loss that does not read it does not check it
