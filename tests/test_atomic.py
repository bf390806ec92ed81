import pytest

from safesteer_lens.atomic import write_atomic, write_text_atomic


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = write_text_atomic(tmp_path / "results.csv", "old")
    assert path.read_text() == "old"

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")  # torch.save raises RuntimeError, not OSError, on a full disk

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(path, half_then_fail)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]
    write_text_atomic(path, "new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]


def test_files_get_the_normal_mode_whatever_the_writer_chose(tmp_path):
    import os
    import stat

    import torch
    from safetensors.torch import save_file

    umask = os.umask(0o022)
    os.umask(umask)
    path = write_atomic(tmp_path / "direction.safetensors", lambda tmp: save_file({"v": torch.ones(2)}, str(tmp)))
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # safetensors alone writes 0o600
