"""A training run's files: metrics, checkpoints and the exported student.

``metrics.jsonl`` is one JSON row per optimizer step, appended as training goes and rewritten
(atomically) only once a run's inputs are checked. ``checkpoint.pt`` holds tensors and plain
data only: the student's weights under Hugging Face names, the AdamW state under parameter
paths, the scheduler, the settings and the step; it is written beside its name and moved into
place, and read back with ``weights_only=True`` (:func:`safesteer_lens.rundir.read_checkpoint`).
``student/`` is a plain Hugging Face model directory with its model card.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from safesteer_lens.atomic import write_atomic, write_text_atomic
from safesteer_lens.errors import SafeSteerError, first_line
from safesteer_lens.model_card import write_model_card
from safesteer_lens.models import ChatModel
from safesteer_lens.rundir import read_checkpoint, read_jsonl

METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 2  # weights under Hugging Face names, optimizer state under parameter paths
STUDENT_DIR = "student"


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    """``run_dir/checkpoint.pt`` as tensors and plain data, or a one-line error saying how to go on."""
    state = read_checkpoint(run_dir / CHECKPOINT, f"safesteer train --run {run_dir}, without --resume")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise SafeSteerError("checkpoint.pt was written by an older safesteer-lens; rerun this stage without --resume")
    return state


def append_metrics(path: Path, row: dict[str, Any]) -> None:
    """Add one step's row to ``metrics.jsonl``."""
    with path.open("a") as handle:
        handle.write(json.dumps(row) + "\n")


def export_student(student: ChatModel, out_dir: str | Path, weights: dict[str, Tensor] | None = None,
                   card: Any | None = None) -> Path:
    """Save the student as a Hugging Face directory that plain ``transformers`` loads.

    Written under a temporary name and renamed, so a half-written export never looks done.

    Args:
        student: The trained model.
        out_dir: The directory to (re)create.
        weights: Whole weights under Hugging Face names, for a sharded student
            (:func:`~safesteer_lens.sharding.full_state`); default: the student's own.
        card: A ``huggingface_hub.ModelCard`` written as the export's ``README.md``.
    """
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    clean = AutoModelForCausalLM.from_config(student.hf_model.config)
    tied = bool(getattr(student.hf_model.config, "tie_word_embeddings", False))
    keys = clean.load_state_dict(student.hf_state_dict() if weights is None else weights, strict=False)
    missing = set(keys.missing_keys) - ({"lm_head.weight"} if tied else set())
    if missing or keys.unexpected_keys:  # a renamed weight would otherwise export as its random initialisation
        raise SafeSteerError(f"the student's weights do not map onto {type(clean).__name__}: missing "
                             f"{sorted(missing)[:3]}, unexpected {sorted(keys.unexpected_keys)[:3]}")
    if tied:
        clean.tie_weights()
    clean.generation_config = student.hf_model.generation_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; an export is meant to be shared
        clean.save_pretrained(tmp)
        student.tokenizer.save_pretrained(tmp)
        if card is not None:
            write_model_card(tmp, card)
        old = out_dir.with_name(f".{out_dir.name}-old")
        if out_dir.exists():  # moved aside first, so a crash in between leaves one complete student
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """Write ``checkpoint.pt`` atomically; on failure the previous checkpoint stays intact."""
    try:
        write_atomic(run_dir / CHECKPOINT, lambda tmp: torch.save(state, tmp))  # removes its temp file on any error
    except (OSError, RuntimeError) as exc:  # a full disk: RuntimeError from torch.save's zip writer, OSError from os
        last = "none"
        if (run_dir / CHECKPOINT).exists():
            last = f"step {read_checkpoint(run_dir / CHECKPOINT, 'safesteer train').get('step')}"
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
        raise SafeSteerError(
            f"could not write a checkpoint at step {state['step']} ({reason}); "
            f"the last good checkpoint is {last}; free disk space and rerun with --resume"
        ) from exc


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return read_jsonl(path, f"safesteer train --run {path.parent}, without --resume")


def write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def load_metrics(run_dir: str | Path) -> "Any":
    """``metrics.jsonl`` as a pandas table, one row per step."""
    import pandas

    return pandas.DataFrame(read_metrics(Path(run_dir) / METRICS))
