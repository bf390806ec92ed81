from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from safesteer_lens.cli import main


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
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
