from __future__ import annotations

import json
from dataclasses import replace

import pytest

from safesteer_lens.cli import main
from safesteer_lens.errors import SafeSteerError
from safesteer_lens.parallel import World
from safesteer_lens.pipeline import BOUNDED, FULL_REVERSE, PIPELINE_PRESETS, Ablation, PipelineConfig, _Job, run_pipeline

from conftest import tiny_pipeline_config

TINY = tiny_pipeline_config()


def test_pipeline_writes_every_artifact_then_skips_current_stages(tiny, tmp_path, capsys):
    assert run_pipeline(tmp_path, config=TINY, model=tiny, until="tokens") is None  # S, before any student trains
    assert (tmp_path / "safety_tokens.json").exists() and not (tmp_path / "metrics.jsonl").exists()
    assert "tokens:" in capsys.readouterr().out
    table = run_pipeline(tmp_path, config=TINY, model=tiny)
    assert list(table.index) == ["base", table.index[1], "SafeSteer student", FULL_REVERSE.label, BOUNDED.label]
    for name in ("direction.json", "safety_tokens.json", "metrics.jsonl", "student/config.json",
                 "ablation-full-reverse/student/config.json", "ablation-bounded/student/config.json", "results.csv", "report.md", "report.html",
                 "figures/representation_shift.html", "figures/training_curves.html"):
        assert (tmp_path / name).exists(), name
    first = capsys.readouterr().out
    assert first.count("current, skipped") == 2 and "train: training" in first  # it went on where --until stopped
    mtime = (tmp_path / "student" / "config.json").stat().st_mtime_ns
    run_pipeline(tmp_path, config=TINY, model=tiny)
    second = capsys.readouterr().out
    assert second.count("current, skipped") == 6  # all but the report, which is always rewritten
    assert (tmp_path / "student" / "config.json").stat().st_mtime_ns == mtime
    # changed training settings make training and everything after it stale, not the earlier stages
    run_pipeline(tmp_path, config=replace(TINY, train=replace(TINY.train, lr=2e-3)), model=tiny)
    third = capsys.readouterr().out
    assert "direction: current, skipped" in third and "tokens: current, skipped" in third
    assert "train: training" in third and "evaluate: base" in third
    # a hand-made change upstream (one token dropped from S) makes every stage that read it stale
    tokens = json.loads((tmp_path / "safety_tokens.json").read_text())
    tokens["tokens"] = tokens["tokens"][:-1]
    (tmp_path / "safety_tokens.json").write_text(json.dumps(tokens))
    run_pipeline(tmp_path, config=replace(TINY, train=replace(TINY.train, lr=2e-3)), model=tiny)
    fourth = capsys.readouterr().out
    assert "direction: current, skipped" in fourth and "tokens: current, skipped" in fourth
    assert fourth.count("training the") == 1 + len(TINY.ablations) and "evaluate: base" in fourth


def test_every_stage_reads_only_what_an_earlier_stage_wrote(tiny, tmp_path):
    stages = _Job(tmp_path, "tiny", TINY, tiny, False, "none", False, None, "none", World()).stages()
    assert [s.name for s in stages] == ["direction", "tokens", "train", *["ablation"] * len(TINY.ablations),
                                        "evaluate", "report"]
    written: set = set()
    for stage in stages:
        assert set(stage.inputs) <= written, f"{stage.name} reads {set(stage.inputs) - written}, which nothing wrote before it"
        assert not set(stage.outputs) & written, f"{stage.name} rewrites an earlier stage's artifact"
        written |= set(stage.outputs)


def test_changed_shipped_prompts_make_the_direction_and_evaluation_stale(tiny, tmp_path, monkeypatch):
    """A run made before the built-in prompts were re-split must not mix old and new splits."""
    import safesteer_lens.pipeline as pipeline

    keys = lambda: {s.name: s.key for s in _Job(tmp_path, "tiny", TINY, tiny, False, "none", False, None,  # noqa: E731
                                                  "none", World()).stages()}
    before = keys()
    monkeypatch.setattr(pipeline, "builtin_data_digest", lambda *names: "re-split")
    after = keys()
    for name in ("direction", "tokens", "train", "evaluate"):
        assert before[name] != after[name], name


def test_unknown_stage_or_preset_is_rejected(tmp_path):
    with pytest.raises(SafeSteerError, match="unknown stage"):
        run_pipeline(tmp_path, rerun=("everything",))
    with pytest.raises(SafeSteerError, match="unknown stage 'training' to stop after"):
        run_pipeline(tmp_path, until="training")
    assert main(["run", "--out", str(tmp_path), "--preset", "huge"]) == 2  # argparse's error, as one line


def test_ablations_are_named_once_and_validated_before_anything_runs(tmp_path):
    with pytest.raises(SafeSteerError, match="unique"):
        PipelineConfig(ablations=(FULL_REVERSE, FULL_REVERSE))
    bad = replace(TINY, ablations=(Ablation("odd", "odd student", (("loss", "kl"),)),))
    with pytest.raises(SafeSteerError, match="unknown loss 'kl'"):
        run_pipeline(tmp_path / "run", config=bad)
    assert not (tmp_path / "run").exists()


def test_the_demo_preset_compares_four_students_on_one_budget():
    demo = PIPELINE_PRESETS["demo"]
    configs = [demo.train, *(a.config(demo.train) for a in demo.ablations)]
    assert len(configs) == 4
    budget = {(c.n_prompts, c.samples_per_prompt, c.max_new_tokens, c.sequences_per_step, c.epochs, c.lr, c.seed,
               c.lora_rank, c.teacher_coeff) for c in configs}
    assert len(budget) == 1
    assert {c.loss for c in configs[1:]} == {"safesteer", "full-reverse", "safesteer-bounded"}
    assert all(c.anchor_weight == 0 for c in configs[1:])
