"""Every malformed input a user can hand the CLI: exit 2, one line, no traceback, nothing touched.

Each case copies a finished tiny training run (direction, S, metrics, checkpoint, student),
damages one thing, runs one command in-process and checks that it failed the way a user can act
on, and that no file under the working directory was created, changed or removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import pytest

from safesteer_lens.cli import main
from safesteer_lens.distill import TrainConfig, train

TRAIN = ["--n-prompts", "2", "--samples", "2", "--max-new-tokens", "3", "--sequences-per-step", "4", "--epochs", "1",
         "--lora-rank", "0", "--anchor-weight", "0"]


@pytest.fixture(scope="module")
def trained(tiny, tiny_dir, tmp_path_factory):
    """A finished tiny run: direction, S, two steps of metrics, a checkpoint and a student."""
    import torch

    from safesteer_lens.directions import Direction
    from safesteer_lens.tokens import SafetyTokens

    out = tmp_path_factory.mktemp("trained")
    torch.manual_seed(0)
    Direction(torch.randn(tiny.d_model) * 4, str(tiny_dir), "diff-means", 2, -1, 1.0).save(out)
    SafetyTokens([{"id": i, "text": tiny.tokenizer.decode([i]), "votes": 1, "mean_delta": 0.0} for i in range(20, 60)]).save(out)
    train(out, TrainConfig(n_prompts=4, samples_per_prompt=2, max_new_tokens=3, sequences_per_step=4, micro_batch=2),
          teacher=tiny, progress=False)
    return out


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under root (but the lock file, which holds only the last holder's pid) by content hash."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".safesteer.lock"}


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _hf_copy(tiny_dir: Path, work: Path, damage: Callable[[Path], None]) -> Path:
    model = work / "model"
    shutil.copytree(tiny_dir, model)
    damage(model)
    return model


# (name, damage(work, run, tiny_dir) -> extra argv substitutions, argv with {run} {work} {model}, expected words)
CASES = [
    ("direction.json truncated", lambda w, r, t: _truncate(r / "direction.json"),
     ["train", "--run", "{run}", "--overwrite", *TRAIN], "direction.json"),
    ("direction.json missing a key", lambda w, r, t: _edit_json(r / "direction.json", lambda d: d.pop("layer")),
     ["train", "--run", "{run}", "--overwrite", *TRAIN], "lacks 'layer'"),
    ("direction.json layer as text", lambda w, r, t: _edit_json(r / "direction.json", lambda d: d.update(layer="2")),
     ["tokens", "--run", "{run}"], "layer"),
    ("direction.safetensors truncated", lambda w, r, t: _truncate(r / "direction.safetensors"),
     ["evaluate", "--run", "{run}", "--n", "2"], "direction.safetensors"),
    ("safety_tokens.json with no tokens", lambda w, r, t: _edit_json(r / "safety_tokens.json", lambda d: d.update(tokens=[])),
     ["train", "--run", "{run}", "--overwrite", *TRAIN], "holds no tokens"),
    ("safety_tokens.json id as text",
     lambda w, r, t: _edit_json(r / "safety_tokens.json", lambda d: d["tokens"][0].update(id="21")),
     ["train", "--run", "{run}", "--overwrite", *TRAIN], "token 0 has id '21'"),
    ("safety_tokens.json negative id",
     lambda w, r, t: _edit_json(r / "safety_tokens.json", lambda d: d["tokens"][3].update(id=-3)),
     ["train", "--run", "{run}", "--overwrite", *TRAIN], "token 3 has id -3"),
    ("safety_tokens.json truncated", lambda w, r, t: _truncate(r / "safety_tokens.json"),
     ["train", "--run", "{run}", "--overwrite", *TRAIN], "safety_tokens.json"),
    ("checkpoint.pt truncated", lambda w, r, t: _truncate(r / "checkpoint.pt"),
     ["train", "--run", "{run}", "--resume", *TRAIN], "checkpoint.pt"),
    ("metrics.jsonl truncated mid-line", lambda w, r, t: _truncate(r / "metrics.jsonl", 0.75),
     ["train", "--run", "{run}", "--resume", *TRAIN], "metrics.jsonl"),
    ("more prompts than the split has", None, ["train", "--run", "{run}", "--overwrite", *TRAIN, "--n-prompts", "100000"], "n_prompts"),
    ("--lr inf", None, ["train", "--run", "{run}", "--overwrite", *TRAIN, "--lr", "inf"], "lr"),
    ("--teacher-coeff nan", None, ["train", "--run", "{run}", "--overwrite", *TRAIN, "--teacher-coeff", "nan"], "teacher_coeff"),
    ("empty prompt file", lambda w, r, t: (w / "empty.jsonl").write_text(""),
     ["direction", "--out", "{work}/new-run", "--model", "{tiny}", "--harmful", "{work}/empty.jsonl",
      "--harmless", "{work}/empty.jsonl"], "empty.jsonl"),
    ("negative --n-val", None, ["direction", "--out", "{work}/new-run", "--model", "{tiny}", "--n-val", "-1"], "n_val"),
    ("truncated gguf with a valid magic", lambda w, r, t: (w / "model.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 40),
     ["info", "--model", "{work}/model.gguf"], "model.gguf"),
    ("HF directory with a bad config.json", lambda w, r, t: (_hf_copy(t, w, lambda m: (m / "config.json").write_text("{oops"))),
     ["info", "--model", "{work}/model"], "config.json"),
    ("HF directory with no tokenizer",
     lambda w, r, t: _hf_copy(t, w, lambda m: [p.unlink() for p in m.glob("*token*")]),
     ["info", "--model", "{work}/model"], "tokenizer"),
    ("HF directory with truncated weights",
     lambda w, r, t: _hf_copy(t, w, lambda m: _truncate(m / "model.safetensors")),
     ["info", "--model", "{work}/model"], "SafetensorError"),
    ("evaluate --n 0", None, ["evaluate", "--run", "{run}", "--n", "0"], "n_harmful"),
    ("evaluate --teacher-coeff -1", None, ["evaluate", "--run", "{run}", "--teacher-coeff", "-1"], "--teacher-coeff"),
    ("tokens --prob-floor 2", None, ["tokens", "--run", "{run}", "--prob-floor", "2"], "prob_floor"),
    ("tokens --compare-horizon -1", None, ["tokens", "--run", "{run}", "--compare-horizon", "-1"], "--compare-horizon"),
    ("--out naming a file", lambda w, r, t: (w / "a-file").write_text("x"),
     ["run", "--out", "{work}/a-file", "--model", "{tiny}"], "a-file"),
    ("export of a layer llama.cpp cannot steer",
     lambda w, r, t: _edit_json(r / "direction.json", lambda d: d.update(layer=1)),
     ["export-direction", "--run", "{run}", "--out", "{work}/cv.gguf"], "layer 2 or later"),
    ("a truncated control vector", lambda w, r, t: (w / "cv.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\x01"),
     ["train", "--run", "{run}", "--overwrite", "--direction", "{work}/cv.gguf", *TRAIN], "cv.gguf"),
]


@pytest.mark.parametrize("name, damage, argv, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(name, damage, argv, words, trained, tiny_dir, tmp_path, capsys):
    work = tmp_path / "work"
    run = work / "run"
    shutil.copytree(trained, run)
    if damage is not None:
        damage(work, run, Path(tiny_dir))
    before = _snapshot(work)
    capsys.readouterr()
    code = main([a.format(run=run, work=work, tiny=tiny_dir) for a in argv])
    captured = capsys.readouterr()
    assert code == 2, (code, captured.err[-2000:])
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err, captured.err
    assert words in lines[0], lines[0]
    assert _snapshot(work) == before, "the failed command created, changed or removed files"
    assert not (work / "new-run").exists()


def test_a_second_writer_fails_at_once_naming_the_holder(trained, tmp_path, capsys):
    from safesteer_lens.rundir import locked

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = _snapshot(tmp_path)
    with locked(run, "safesteer train"):
        holder = (run / ".safesteer.lock").read_text()
        # a second open file description of the lock conflicts with this one, as another process's would
        import fcntl

        with open(run / ".safesteer.lock") as other:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert holder == f"pid {os.getpid()} (safesteer train)"
    assert _snapshot(tmp_path) == before


def test_a_locked_run_directory_stops_another_process(trained, tmp_path):
    import subprocess
    import sys

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    from safesteer_lens.rundir import locked

    with locked(run, "safesteer run"):
        result = subprocess.run([sys.executable, "-m", "safesteer_lens.cli", "train", "--run", str(run), *TRAIN],
                                capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {run} is in use by pid {os.getpid()} (safesteer run); wait for it to "
                                     "finish or use another run directory")


def test_a_full_disk_during_a_checkpoint_leaves_no_orphan(trained, tmp_path, monkeypatch):
    import torch

    from safesteer_lens import checkpoints
    from safesteer_lens.errors import SafeSteerError

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = _snapshot(run)

    def full(obj, path, *args, **kwargs):  # what torch.save raises when the disk fills mid-write
        Path(path).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(SafeSteerError, match="could not write a checkpoint at step 9 .*the last good checkpoint is step 2"):
        checkpoints.save_checkpoint(run, {"step": 9})
    assert _snapshot(run) == before and not list(run.glob(".checkpoint*"))


def test_a_lock_file_planted_as_a_symlink_is_refused_and_its_target_kept(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / ".safesteer.lock").unlink(missing_ok=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (run / ".safesteer.lock").symlink_to(victim)
    assert main(["train", "--run", str(run), *TRAIN]) == 2
    assert "cannot use the lock file" in capsys.readouterr().err
    assert victim.read_text() == "keep me"
