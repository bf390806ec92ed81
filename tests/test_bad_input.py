"""Every malformed input a user can hand the CLI: exit 2, one line, no traceback, nothing touched.

Each case copies a finished tiny training run (direction, S, metrics, checkpoint, student),
damages one thing, runs one command in-process and checks that it failed the way a user can act
on, and that no file under the working directory was created, changed or removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import pytest

from safesteer_lens.cli import main
from safesteer_lens.distill import TrainConfig, train

TRAIN = ["--n-prompts", "2", "--samples", "2", "--max-new-tokens", "3", "--sequences-per-step", "4", "--epochs", "1",
         "--lora-rank", "0", "--anchor-weight", "0", "--task-prompts", "0"]


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


def _messages(err: str) -> list[str]:
    """What a command said on stderr, less the progress bars a model load draws (they end in a carriage return)."""
    return [line for line in err.strip().splitlines() if line.strip() and not re.search(r"\d+%\|", line)]


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _hf_copy(tiny_dir: Path, work: Path, damage: Callable[[Path], None], name: str = "model") -> Path:
    model = work / name
    shutil.copytree(tiny_dir, model)
    damage(model)
    return model


def _plant_code(model: Path, config: str = "config.json") -> None:
    """Make a model folder ask transformers to import its own module, which would leave a marker beside the work folder."""
    marker = model.parent.parent / "code-ran"
    (model / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
                                   "from transformers import LlamaConfig as EvilConfig, LlamaForCausalLM as EvilModel\n"
                                   "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    data = json.loads((model / config).read_text())
    if config == "config.json":
        data.update(model_type="evil-llama", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
    else:
        data.update(auto_map={"AutoTokenizer": [None, "evil.EvilTokenizer"]}, tokenizer_class="EvilTokenizer")
    (model / config).write_text(json.dumps(data))


def _code_in_the_run(work: Path, run: Path, tiny_dir: Path) -> None:
    """A shared run directory whose direction.json names a model folder, inside the run, that carries code."""
    model = _hf_copy(tiny_dir, run, _plant_code, name="shipped-model")
    _edit_json(run / "direction.json", lambda d: d.update(model=str(model)))


def _control_vector(path: Path, hint: str, tensors: dict[str, object]) -> None:
    """A llama.cpp control vector as another tool would write it: the given tensors, no safesteer metadata."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", hint)
    writer.add_uint32("controlvector.layer_count", len(tensors))
    for name, values in tensors.items():
        writer.add_tensor(name, np.asarray(values, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write(path: Path, data: str | bytes) -> None:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


def _edit_checkpoint(run: Path, change: Callable[[dict], None]) -> None:
    import torch

    state = torch.load(run / "checkpoint.pt", weights_only=True)
    change(state)
    torch.save(state, run / "checkpoint.pt")


def _int_direction(run: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"direction": torch.arange(1, 65, dtype=torch.int32)}, str(run / "direction.safetensors"))


def _blocked_template(model: Path) -> None:
    (model / "chat_template.jinja").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}{{ messages[0]['content'] }}")


EVAL = ["--n", "2", "--n-mcq", "0", "--max-new-tokens", "3"]


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
    # 1. no code from files: every case runs with "y" on stdin, and a planted module would leave tmp/code-ran
    ("--model: a folder whose config.json has auto_map", lambda w, r, t: _hf_copy(t, w, _plant_code),
     ["info", "--model", "{work}/model"], "auto_map"),
    ("--model: a folder whose tokenizer_config.json has auto_map",
     lambda w, r, t: _hf_copy(t, w, lambda m: _plant_code(m, "tokenizer_config.json")),
     ["info", "--model", "{work}/model"], "auto_map"),
    ("--judge: a folder with auto_map", lambda w, r, t: _hf_copy(t, w, _plant_code),
     ["evaluate", "--run", "{run}", *EVAL, "--judge", "llama-guard={work}/model"], "auto_map"),
    ("a run whose direction.json names a folder with auto_map", lambda w, r, t: _code_in_the_run(w, r, t),
     ["tokens", "--run", "{run}"], "auto_map"),
    # 2. every path stays inside the run: grid values are checked by their config field, used or not
    ("a grid file whose lora_targets climbs out of the run",
     lambda w, r, t: _write(w / "grid.json", json.dumps({"lora_targets": ["x/../../../victim"], "seed": [0]})),
     ["sweep", "--run", "{run}", "--grid-file", "{work}/grid.json"], "lora_targets"),
    ("a --grid lora_targets with a path", None, ["sweep", "--run", "{run}", "--grid", "lora_targets=../../victim"],
     "lora_targets"),
    ("a sweep --name with a path", None, ["sweep", "--run", "{run}", "--grid", "seed=0", "--name", "../../victim"],
     "one plain directory name"),
    # 3. an imported direction is checked against the model before the run's own is touched
    ("a control vector of zeros", lambda w, r, t: _control_vector(w / "cv.gguf", "llama", {"direction.1": [0.0] * 64}),
     ["train", "--run", "{run}", "--overwrite", "--direction", "{work}/cv.gguf", "--model", "{tiny}", *TRAIN], "zero"),
    ("a foreign control vector without --model", lambda w, r, t: _control_vector(w / "cv.gguf", "llama", {"direction.1": [1.0] * 64}),
     ["train", "--run", "{run}", "--overwrite", "--direction", "{work}/cv.gguf", *TRAIN], "pass --model"),
    ("a control vector of 32 values", lambda w, r, t: _control_vector(w / "cv.gguf", "llama", {"direction.1": [1.0] * 32}),
     ["train", "--run", "{run}", "--overwrite", "--direction", "{work}/cv.gguf", "--model", "{tiny}", *TRAIN], "d_model 64"),
    ("a control vector holding a 2x64 tensor",
     lambda w, r, t: _control_vector(w / "cv.gguf", "llama", {"direction.1": [[1.0] * 64, [2.0] * 64]}),
     ["tokens", "--run", "{run}", "--direction", "{work}/cv.gguf", "--model", "{tiny}"], "d_model 64"),
    ("a control vector for layer 1000", lambda w, r, t: _control_vector(w / "cv.gguf", "llama", {"direction.999": [1.0] * 64}),
     ["evaluate", "--run", "{run}", *EVAL, "--direction", "{work}/cv.gguf", "--model", "{tiny}"], "layers 0-3"),
    ("another run's direction stored as integers",
     lambda w, r, t: (shutil.copytree(r, w / "other"), _int_direction(w / "other")),
     ["sweep", "--run", "{run}", "--grid", "seed=0", "--direction", "{work}/other"], "float tensor"),
    # 4. bounded inputs
    ("a benchmark file with a 50,000-character prompt",
     lambda w, r, t: _write(w / "long.jsonl", json.dumps({"prompt": "why " * 12_500}) + "\n"),
     ["evaluate", "--run", "{run}", *EVAL, "--benchmark", "advbench={work}/long.jsonl"], "advbench-0 of /"),
    ("chat --max-new-tokens past the context", None,
     ["chat", "--model", "{tiny}", "--max-new-tokens", "100000", "hello"], "context of 512"),
    ("train --max-new-tokens past the context", None,
     ["train", "--run", "{run}", "--overwrite", *TRAIN, "--max-new-tokens", "100000"], "context of 512"),
    ("tokens --horizon past the context", None, ["tokens", "--run", "{run}", "--horizon", "5000"], "context of 512"),
    ("evaluate --max-new-tokens past the context", None,
     ["evaluate", "--run", "{run}", "--n", "2", "--n-mcq", "0", "--max-new-tokens", "600"], "context of 512"),
    # 5. own only your own files
    ("a user's file inside student/", lambda w, r, t: _write(r / "student" / "my-notes.txt", "mine"),
     ["train", "--run", "{run}", "--overwrite", *TRAIN], "my-notes.txt"),
    # 8. a fresh start never replaces a finished run by accident
    ("a fresh train on a finished run", None, ["train", "--run", "{run}", *TRAIN, "--lr", "1e12"], "--overwrite"),
    ("--resume and --overwrite together", None, ["train", "--run", "{run}", "--resume", "--overwrite", *TRAIN], "one of them"),
    # 10. one line instead of a traceback
    ("a direction stored as integers", lambda w, r, t: _int_direction(r), ["tokens", "--run", "{run}"], "float tensor"),
    ("a checkpoint without its config", lambda w, r, t: _edit_checkpoint(r, lambda c: c.pop("config")),
     ["train", "--run", "{run}", "--resume", *TRAIN], "'config'"),
    ("a checkpoint whose student is not tensors", lambda w, r, t: _edit_checkpoint(r, lambda c: c.update(student={"a": 1})),
     ["train", "--run", "{run}", "--resume", *TRAIN], "named tensors"),
    ("grid lr=,,", None, ["sweep", "--run", "{run}", "--grid", "lr=,,"], "no values"),
    ("--lora-targets with a slash", None, ["train", "--run", "{run}", "--overwrite", *TRAIN, "--lora-targets", "q_proj/x"],
     "lora_targets"),
    ("a prompt file that is not UTF-8", lambda w, r, t: _write(w / "latin1.jsonl", b'{"prompt": "caf\xe9 au lait"}\n' * 6),
     ["direction", "--out", "{work}/new-run", "--model", "{tiny}", "--harmful", "{work}/latin1.jsonl"], "not UTF-8"),
    ("a CSV that is not UTF-8", lambda w, r, t: _write(w / "latin1.csv", b"prompt\n" + b"caf\xe9 au lait\n" * 6),
     ["direction", "--out", "{work}/new-run", "--model", "{tiny}", "--harmless", "{work}/latin1.csv"], "not UTF-8"),
    ("a grid file that is not UTF-8", lambda w, r, t: _write(w / "grid.json", b'{"lr": [0.001], "loss": ["caf\xe9"]}'),
     ["sweep", "--run", "{run}", "--grid-file", "{work}/grid.json"], "not UTF-8"),
    ("a chat template the Jinja sandbox blocks", lambda w, r, t: _hf_copy(t, w, _blocked_template),
     ["info", "--model", "{work}/model"], "Jinja sandbox"),
    # 11. nothing silent: counts above what exists, strings split twice, impossible steps, usage errors
    ("evaluate --n above the split", None, ["evaluate", "--run", "{run}", "--n", "1000", "--n-mcq", "0"], "--n)"),
    ("evaluate --n-mcq above the split", None, ["evaluate", "--run", "{run}", "--n", "2", "--n-mcq", "100000"], "--n-mcq"),
    ("tokens --n-prompts above the split", None, ["tokens", "--run", "{run}", "--n-prompts", "100000"], "n_prompts"),
    ("a grid-file string with a comma", lambda w, r, t: _write(w / "grid.json", json.dumps({"lr": ["1e-4,5"]})),
     ["sweep", "--run", "{run}", "--grid-file", "{work}/grid.json"], "lr"),
    ("a grid-file boolean for a number", lambda w, r, t: _write(w / "grid.json", json.dumps({"lr": [True]})),
     ["sweep", "--run", "{run}", "--grid-file", "{work}/grid.json"], "not a float"),
    ("a checkpoint at step 10^6", lambda w, r, t: _edit_checkpoint(r, lambda c: c.update(step=10**6)),
     ["train", "--run", "{run}", "--resume", *TRAIN], "step 1000000"),
    ("a flag argparse cannot read", None, ["train", "--run", "{run}", "--lr", "abc"], "invalid float value"),
    ("an unknown command", None, ["frobnicate"], "invalid choice"),
    ("a missing required flag", None, ["evaluate"], "--run"),
    ("a run directory that does not exist", None, ["evaluate", "--run", "{work}/no-such-run"], "no run directory"),
    ("export-direction into a directory", lambda w, r, t: (w / "out").mkdir(),
     ["export-direction", "--run", "{run}", "--out", "{work}/out"], "is a directory"),
]


@pytest.mark.parametrize("name, damage, argv, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(name, damage, argv, words, trained, tiny_dir, tmp_path, capsys,
                                                         monkeypatch):
    """Everything under tmp_path (the work folder with the run, and a victim folder beside it) stays byte-identical."""
    import io

    work = tmp_path / "work"
    run = work / "run"
    shutil.copytree(trained, run)
    victim = tmp_path / "victim"
    shutil.copytree(trained, victim)  # what a path climbing out of the run would reach
    if damage is not None:
        damage(work, run, Path(tiny_dir))
    before = _snapshot(tmp_path)
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 50))  # `yes |`: a prompt to run code would be answered
    capsys.readouterr()
    code = main([a.format(run=run, work=work, tiny=tiny_dir) for a in argv])
    captured = capsys.readouterr()
    assert code == 2, (code, captured.err[-2000:])
    lines = _messages(captured.err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err, captured.err
    assert words in lines[0], lines[0]
    assert not (tmp_path / "code-ran").exists(), "a module from a model folder ran"
    assert _snapshot(tmp_path) == before, "the failed command created, changed or removed files"
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


@pytest.mark.parametrize("argv", [
    ["direction", "--out", "{run}", "--model", "{tiny}", "--n-train", "4", "--n-val", "2", "--n-test", "2"],
    ["tokens", "--run", "{run}"],
    ["evaluate", "--run", "{run}", *EVAL],
    ["export-direction", "--run", "{run}", "--out", "{run}/cv.gguf"],
    ["sweep", "--run", "{run}", "--grid", "seed=0"],
    ["train", "--run", "{run}", "--overwrite", *TRAIN],
], ids=lambda argv: argv[0])
def test_every_writer_takes_the_lock(argv, trained, tiny_dir, tmp_path, capsys):
    """Another process holds the run's lock (as `safesteer train` does): every writer stops before writing."""
    import subprocess
    import sys

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = _snapshot(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"f = open({str(run / '.safesteer.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
         "f.truncate(0); f.write(f'pid {os.getpid()} (safesteer train)'); f.flush(); print('held', flush=True)\n"
         "time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code = main([a.format(run=run, tiny=tiny_dir) for a in argv])
    finally:
        holder.kill()
        holder.wait()
    lines = _messages(capsys.readouterr().err)
    assert code == 2 and len(lines) == 1 and "is in use by pid" in lines[0] and "(safesteer train)" in lines[0], lines
    assert _snapshot(tmp_path) == before


def test_resume_before_the_first_checkpoint_starts_again_at_step_0(trained, tmp_path, capsys):
    """A run killed before its first checkpoint left metrics but nothing to continue from."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "checkpoint.pt").unlink()
    (run / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n')
    assert main(["train", "--run", str(run), "--resume", *TRAIN]) == 0
    assert "training starts at step 0" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(len(steps))) and len(steps) >= 1 and (run / "checkpoint.pt").is_file()


def test_overwrite_starts_a_new_run_in_place(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    weights = (run / "student" / "model.safetensors").read_bytes()
    assert main(["train", "--run", str(run), "--overwrite", *TRAIN, "--lr", "3e-3"]) == 0
    assert (run / "student" / "model.safetensors").read_bytes() != weights  # the new run's student
    assert json.loads((run / "student" / ".safesteer-export.json").read_text())["files"]


def _oserror(code: int, path: str) -> Callable[..., None]:
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code), path)

    return fail


def test_a_full_disk_at_the_student_export_is_one_line_naming_what_to_do(trained, tmp_path, monkeypatch, capsys):
    import errno

    from transformers import PreTrainedModel

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", _oserror(errno.ENOSPC, "model.safetensors"))
    assert main(["train", "--run", str(run), "--overwrite", *TRAIN]) == 2
    lines = _messages(capsys.readouterr().err)
    assert len(lines) == 1 and "No space left on device" in lines[0] and "--resume" in lines[0], lines
    assert not list(run.glob(".student-*")) and (run / "student" / "config.json").is_file()  # the earlier export stays


@pytest.mark.parametrize("target, argv, code", [
    ("safesteer_lens.pages.write_direction_report",
     ["direction", "--out", "{work}/new", "--model", "{tiny}", "--n-train", "4", "--n-val", "2", "--n-test", "2"], "ENOSPC"),
    ("safesteer_lens.pipeline.write_evaluation", ["evaluate", "--run", "{run}", *EVAL], "EROFS"),
    ("safesteer_lens.control_vectors.write_atomic", ["export-direction", "--run", "{run}", "--out", "{work}/cv.gguf"], "EROFS"),
])
def test_full_and_read_only_disks_are_one_named_line(target, argv, code, trained, tiny_dir, tmp_path, monkeypatch, capsys):
    """Tests run as root, for whom chmod does not make a folder read-only: the writer fails the way the kernel would."""
    import errno

    work = tmp_path / "work"
    run = work / "run"
    shutil.copytree(trained, run)
    monkeypatch.setattr(target, _oserror(getattr(errno, code), str(work / "somefile")))
    assert main([a.format(run=run, work=work, tiny=tiny_dir) for a in argv]) == 2
    lines = _messages(capsys.readouterr().err)
    words = "the disk is full" if code == "ENOSPC" else "Read-only file system"
    assert len(lines) == 1 and words in lines[0] and "somefile" in lines[0], lines


def test_an_export_removes_what_a_killed_export_left_and_refuses_foreign_files(tiny, tmp_path):
    from safesteer_lens.checkpoints import export_student
    from safesteer_lens.errors import SafeSteerError

    (tmp_path / ".student-x1y2").mkdir()
    (tmp_path / ".student-x1y2" / "model.safetensors").write_bytes(b"partial")
    export_student(tiny, tmp_path / "student")
    assert not (tmp_path / ".student-x1y2").exists() and (tmp_path / "student" / "config.json").is_file()
    (tmp_path / "student" / "results-by-hand.csv").write_text("mine")
    with pytest.raises(SafeSteerError, match="results-by-hand.csv"):
        export_student(tiny, tmp_path / "student")
    assert (tmp_path / "student" / "results-by-hand.csv").read_text() == "mine"


def test_report_markdown_shows_html_from_prompts_and_replies_as_text():
    import pandas

    from safesteer_lens.report import comparison_markdown

    comparison = pandas.DataFrame([{"prompt": "<script>alert(1)</script> | x", "label": "harmful",
                                    "base: reply": "<img src=x onerror=alert(2)>", "base: refused": False}])
    text = "\n".join(comparison_markdown(comparison, ["base"]))
    assert "<script>" not in text and "<img" not in text
    assert "&lt;script&gt;" in text and "&lt;img src=x" in text and "\\|" in text


def test_a_student_trained_by_hand_in_a_run_makes_its_stage_stale(finished_run, tiny, tmp_path, capsys):
    """The report must not describe a hand-made student as the preset's: the run trains its own again."""
    from conftest import tiny_pipeline_config
    from safesteer_lens.pipeline import run_pipeline

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    config = tiny_pipeline_config()
    assert main(["train", "--run", str(run), "--overwrite", *TRAIN, "--lr", "3e-3"]) == 0
    capsys.readouterr()
    run_pipeline(run, config=config, model=tiny, until="train")
    assert "train: training" in capsys.readouterr().out
    (run / "comparison.csv").unlink()  # the report's per-prompt table reads it: the evaluation is not current without it
    run_pipeline(run, config=config, model=tiny)
    out = capsys.readouterr().out
    assert "train: SafeSteer student: current, skipped" in out and "evaluate: base" in out
    assert (run / "comparison.csv").is_file()
