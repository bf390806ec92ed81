from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest
import torch

from safesteer_lens.cli import main


def test_help_lists_the_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "info" in out and "chat" in out


def test_info_prints_the_shape(tiny_dir, capsys):
    assert main(["info", "--model", str(tiny_dir), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "layers" in out and "d_model" in out and "load time" in out
    assert "64" in out
    from safesteer_lens.precision import native_bf16

    expected = "bfloat16" if native_bf16(torch.device("cpu")) else "float32"
    assert re.search(rf"training matmuls +{expected} \(--precision auto", out)


def test_chat_prints_replies(tiny_dir, capsys):
    assert main(["chat", "--model", str(tiny_dir), "--max-new-tokens", "3", "Hello"]) == 0
    assert "user: Hello" in capsys.readouterr().out


@pytest.mark.parametrize("model", ["unknown-model", "./nowhere", "broken.gguf"])
def test_bad_model_exits_2_with_one_line(model):
    result = subprocess.run(
        [sys.executable, "-m", "safesteer_lens.cli", "info", "--model", model],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ")
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_evaluate_writes_the_tables_and_the_per_prompt_comparison(run_dir, capsys):
    import pandas

    (run_dir / "evaluate.json").write_text('{"key": "from a pipeline run"}')
    assert main(["evaluate", "--run", str(run_dir), "--device", "cpu", "--n", "2", "--max-new-tokens", "3",
                 "--n-mcq", "6", "--split", "val"]) == 0
    assert "comparison.csv" in capsys.readouterr().out
    comparison = pandas.read_csv(run_dir / "comparison.csv")
    assert {"base: reply", "teacher: refused", "teacher: degenerate"} <= set(comparison.columns)
    # 2 + 2 built-in prompts, and by default the demo's kind-balanced look-alike and benchmark-phrased subsets
    assert comparison["set"].value_counts().to_dict() == {"harmful": 2, "harmless": 2, "lookalike": 40, "tasks": 26}
    table = pandas.read_csv(run_dir / "results.csv", index_col="model")
    assert table.loc["base", "mcq_acc_n"] == 6 and "harmful_refusal_low" in table.columns
    assert len(pandas.read_csv(run_dir / "mcq.csv")) == 12  # 6 questions x (base, teacher)
    assert not (run_dir / "evaluate.json").exists()  # a later `safesteer run` evaluates its own students again
    assert table.loc["teacher", "kl_from_base"] > 0
    assert main(["evaluate", "--run", str(run_dir), "--device", "cpu", "--n", "2", "--max-new-tokens", "3",
                 "--n-mcq", "0", "--split", "val", "--teacher-coeff", "1e-6", "--n-lookalike", "0",
                 "--n-tasks", "0"]) == 0  # the teacher the students distilled
    assert len(pandas.read_csv(run_dir / "comparison.csv")) == 4
    faint = pandas.read_csv(run_dir / "results.csv", index_col="model")
    assert faint.loc["teacher", "kl_from_base"] < 1e-3 < table.loc["teacher", "kl_from_base"]


def _bad_evaluate(run_dir, tmp_path, *extra):
    before = sorted(p.name for p in run_dir.iterdir())
    result = subprocess.run([sys.executable, "-m", "safesteer_lens.cli", "evaluate", "--run", str(run_dir), "--device", "cpu",
                             *extra], capture_output=True, text=True, timeout=300)
    assert sorted(p.name for p in run_dir.iterdir()) == before  # nothing written before the inputs are checked
    return result


@pytest.mark.parametrize("extra,message", [
    (["--n", "0"], "n_harmful must be at least 1"),
    (["--judge", "llama-guard=./no-such-judge"], "not a Llama Guard model directory"),
    (["--judge", "guard"], "--judge takes NAME=PATH_OR_ID"),
    (["--mcq", "mmlu={bad}"], "not mmlu data: missing column"),
])
def test_evaluate_bad_input_exits_2_with_one_line(run_dir, tmp_path, extra, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Hi", "answer": 1}\n')
    result = _bad_evaluate(run_dir, tmp_path, *(e.format(bad=bad) for e in extra))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_top_k_takes_a_count_or_a_share():
    import argparse

    from safesteer_lens.cli import _count_or_share

    assert _count_or_share("200") == 200 and isinstance(_count_or_share("200"), int)
    assert _count_or_share("0.05") == 0.05 and _count_or_share("5e-2") == 0.05
    with pytest.raises(argparse.ArgumentTypeError, match="a count such as 200"):
        _count_or_share("many")


def test_every_train_setting_is_a_flag_with_help_and_reaches_the_config():
    """The config is the only source of `safesteer train`'s settings: every field a flag, with its docstring as help."""
    import dataclasses

    from safesteer_lens.cli import build_parser
    from safesteer_lens.config_flags import config_overrides
    from safesteer_lens.distill import TrainConfig

    train = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    flags = {a.dest: a for a in train._actions}
    for field in dataclasses.fields(TrainConfig):
        assert field.name in flags, f"TrainConfig.{field.name} has no flag"
        assert flags[field.name].help and "default: the preset's" in flags[field.name].help
    args = train.parse_args(["--run", "r", "--samples", "3", "--jsd-beta", "0.25", "--no-mix-categories",
                             "--student-dtype", "bf16", "--micro-batch", "2"])
    assert config_overrides(args, TrainConfig) == {"samples_per_prompt": 3, "jsd_beta": 0.25, "mix_categories": False,
                                                   "student_dtype": "bf16", "micro_batch": 2}
