"""llama.cpp control vectors: the file llama.cpp expects, and a lossless way back."""

from __future__ import annotations

import shutil

import gguf
import numpy as np
import pytest
import torch

from safesteer_lens.cli import main
from safesteer_lens.control_vectors import export_control_vector, load_control_vector, tensor_name
from safesteer_lens.directions import Direction, load_direction
from safesteer_lens.errors import SafeSteerError


def _direction(layer: int = 11, coeff: float = 1.5) -> Direction:
    torch.manual_seed(0)
    return Direction(torch.randn(64), "some/model", "contrastive", layer, -1, coeff)


def test_the_file_is_a_control_vector_with_the_teachers_exact_addition(tmp_path):
    direction = _direction()
    path = export_control_vector(direction, tmp_path / "refusal.gguf", architecture="llama")
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == "controlvector"
    assert reader.fields["controlvector.model_hint"].contents() == "llama"  # llama.cpp-side tools compare architectures
    assert reader.fields["safesteer.model"].contents() == "some/model"
    # resid_pre of block 11 is the output of block 10, which llama.cpp's direction.10 is added to
    assert [t.name for t in reader.tensors] == ["direction.10"]
    tensor = reader.tensors[0]
    assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_allclose(np.asarray(tensor.data), (1.5 * direction.vector).numpy(), rtol=1e-6)


def test_round_trip_restores_vector_layer_coefficient_and_method(tmp_path):
    direction = _direction(layer=4, coeff=-2.0)
    back = load_control_vector(export_control_vector(direction, tmp_path / "d.gguf", architecture="llama"))
    assert (back.layer, back.coeff, back.method, back.model) == (4, -2.0, "contrastive", "some/model")
    torch.testing.assert_close(back.vector, direction.vector, rtol=1e-6, atol=1e-6)
    scaled = load_control_vector(export_control_vector(direction, tmp_path / "s.gguf", scale=0.5, architecture="llama"))
    assert scaled.coeff == -1.0
    torch.testing.assert_close(scaled.vector * scaled.coeff, direction.vector * -1.0, rtol=1e-6, atol=1e-6)


def test_layers_llama_cpp_cannot_steer_are_refused():
    assert tensor_name(2) == "direction.1"
    for layer in (0, 1):
        with pytest.raises(SafeSteerError, match="layer 2 or later"):
            tensor_name(layer)


def _foreign(path, names):
    writer = gguf.GGUFWriter(str(path), "controlvector")
    for name in names:
        writer.add_tensor(name, np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_another_tools_file_needs_a_layer_when_it_steers_several(tmp_path):
    path = _foreign(tmp_path / "repeng.gguf", ["direction.3", "direction.4"])
    with pytest.raises(SafeSteerError, match=r"steers layers \[4, 5\]"):
        load_control_vector(path)
    picked = load_control_vector(path, layer=5)
    assert (picked.layer, picked.coeff, picked.method) == (5, 1.0, "control-vector")
    with pytest.raises(SafeSteerError, match="no vector for layer 9"):
        load_control_vector(path, layer=9)


def test_truncated_or_foreign_files_are_one_line_errors(tmp_path):
    good = export_control_vector(_direction(), tmp_path / "good.gguf", architecture="llama")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(SafeSteerError, match="cannot be read"):
        load_control_vector(truncated)
    model = gguf.GGUFWriter(str(tmp_path / "model.gguf"), "llama")
    model.write_header_to_file()
    model.write_kv_data_to_file()
    model.write_tensors_to_file()
    model.close()
    with pytest.raises(SafeSteerError, match="not a control vector"):
        load_control_vector(tmp_path / "model.gguf")


def test_cli_exports_and_train_reads_a_gguf_direction(tiny, tiny_dir, run_dir, tmp_path, capsys):
    path = tmp_path / "cv.gguf"
    assert main(["export-direction", "--run", str(run_dir), "--out", str(path)]) == 0
    assert "direction.1" in capsys.readouterr().out  # the fixture's direction is at layer 2
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(run_dir / "safety_tokens.json", other)
    code = main(["train", "--run", str(other), "--direction", str(path), "--model", str(tiny_dir), "--loss", "safesteer",
                 "--n-prompts", "2", "--samples", "2", "--max-new-tokens", "3", "--sequences-per-step", "4",
                 "--lora-rank", "0", "--anchor-weight", "0", "--task-prompts", "0"])
    assert code == 0
    original, imported = load_direction(run_dir), load_direction(other)
    assert (imported.layer, imported.coeff) == (original.layer, original.coeff)
    torch.testing.assert_close(imported.vector, original.vector, rtol=1e-6, atol=1e-6)
    assert main(["export-direction", "--run", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.gguf")]) == 2
    assert not (tmp_path / "x.gguf").exists()
