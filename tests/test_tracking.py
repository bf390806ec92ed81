"""Tracking: every step's metrics and the settings reach TensorBoard and W&B, read back from their files."""

from __future__ import annotations

import glob
import json
import struct

import pytest

from safesteer_lens.cli import main
from safesteer_lens.distill import TrainConfig, train
from safesteer_lens.errors import SafeSteerError
from safesteer_lens.tracking import NoTracker, open_tracker

TINY = TrainConfig(n_prompts=4, samples_per_prompt=2, max_new_tokens=3, sequences_per_step=4, micro_batch=2, lr=1e-3)


def test_tensorboard_events_hold_every_step_and_the_settings(tiny, run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(run_dir, TINY, teacher=tiny, progress=False, report_to="tensorboard", tracker_name="recipe")
    events = EventAccumulator(str(run_dir / "tensorboard" / "recipe"), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [m["step"] for m in result.metrics] == [0, 1]
    assert [e.value for e in losses] == pytest.approx([m["loss"] for m in result.metrics], rel=1e-6)
    assert "train/rollout_refusal" in events.Tags()["scalars"]
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| lr | 0.001 |" in config_text and "| direction_layer | 2 |" in config_text


def _wandb_records(path):
    """The records of an offline ``.wandb`` file (W&B's log format: 7-byte header, 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_holds_every_step_and_the_settings(tiny, run_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = train(run_dir, TINY, teacher=tiny, progress=False, report_to="wandb", tracker_name="recipe")
    [path] = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    history, config = [], {}
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
        elif kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            assert record.run.display_name == "recipe"
    assert [h["_step"] for h in history] == [0, 1]
    assert [h["loss"] for h in history] == pytest.approx([m["loss"] for m in result.metrics], rel=1e-6)
    assert config["lr"] == 1e-3 and config["loss"] == "safesteer" and config["direction_layer"] == 2


def test_only_rank_zero_tracks_and_unknown_trackers_are_refused(tmp_path):
    assert isinstance(open_tracker("tensorboard", tmp_path, {}, is_main=False), NoTracker)
    assert not (tmp_path / "tensorboard").exists()
    with pytest.raises(SafeSteerError, match="unknown --report-to 'mlflow'"):
        open_tracker("mlflow", tmp_path, {})


def test_cli_train_takes_report_to(run_dir):
    code = main(["train", "--run", str(run_dir), "--n-prompts", "2", "--samples", "2", "--max-new-tokens", "3",
                 "--sequences-per-step", "4", "--lora-rank", "0", "--anchor-weight", "0", "--epochs", "1",
                 "--task-prompts", "0", "--report-to", "tensorboard"])
    assert code == 0
    assert glob.glob(str(run_dir / "tensorboard" / "train" / "events.out.tfevents.*"))
