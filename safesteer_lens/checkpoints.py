"""A training run's files: metrics, checkpoints and the exported student.

``metrics.jsonl`` is one JSON row per optimizer step, appended as training goes and rewritten
(atomically) only once a run's inputs are checked. ``checkpoint.pt`` holds tensors and plain
data only: the student's weights under Hugging Face names (a LoRA student's adapters alone,
``"weights": "adapters"``, with a fingerprint of the frozen base they were trained on), the
AdamW state under parameter paths, the scheduler, the settings and the step; it is written beside its name and moved into
place, and read back with ``weights_only=True`` (:func:`safesteer_lens.rundir.read_checkpoint`).
``student/`` is a plain Hugging Face model directory with its model card.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from safesteer_lens.atomic import share, write_atomic, write_text_atomic
from safesteer_lens.errors import SafeSteerError, first_line
from safesteer_lens.model_card import write_model_card
from safesteer_lens.models import ChatModel
from safesteer_lens.rundir import artifact_error, read_checkpoint, read_jsonl

METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 2  # weights under Hugging Face names, optimizer state under parameter paths
STUDENT_DIR = "student"


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    """``run_dir/checkpoint.pt`` as tensors and plain data, or a one-line error saying how to go on."""
    remake = f"safesteer train --run {run_dir} --overwrite, without --resume"
    state = read_checkpoint(run_dir / CHECKPOINT, remake)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise SafeSteerError("checkpoint.pt was written by an older safesteer-lens; rerun this stage without --resume")
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise artifact_error(run_dir / CHECKPOINT, f"has step {step!r}, not a count of steps", remake)
    for key in ("student", "optimizer", "scheduler", "config"):
        if not isinstance(state.get(key), dict):
            raise artifact_error(run_dir / CHECKPOINT, f"lacks its {key!r} table", remake)
    if not all(isinstance(k, str) for k in state["config"]):
        raise artifact_error(run_dir / CHECKPOINT, "has settings that are not named", remake)
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state["student"].items()):
        raise artifact_error(run_dir / CHECKPOINT, "holds student weights that are not named tensors", remake)
    if "matmul_dtype" in state and not isinstance(state["matmul_dtype"], str):
        raise artifact_error(run_dir / CHECKPOINT, f"has matmul_dtype {state['matmul_dtype']!r}", remake)
    return state


def check_fresh_start(run_dir: str | Path) -> None:
    """Refuse to start a run over the results of an earlier one unless the user says so (``--overwrite``).

    A fresh start replaces ``metrics.jsonl`` and removes ``checkpoint.pt`` at its first step;
    if it then fails (a learning rate that diverges), the earlier run's curve and checkpoint
    would be gone with nothing in their place.
    """
    run_dir = Path(run_dir)
    found = [name for name in (METRICS, CHECKPOINT, STUDENT_DIR) if (run_dir / name).exists()]
    if found:
        raise SafeSteerError(f"{run_dir} already holds a training run ({', '.join(found)}); pass --resume to continue it "
                             "or --overwrite to start a new one in its place")


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
    check_student_dir(out_dir)
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
    for orphan in out_dir.parent.glob(f".{out_dir.name}-*"):  # left by an export that was killed; the caller holds the lock
        if orphan.is_dir() and not orphan.is_symlink():
            shutil.rmtree(orphan, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; an export is meant to be shared
        try:
            clean.save_pretrained(tmp)
            student.tokenizer.save_pretrained(tmp)
            if card is not None:
                write_model_card(tmp, card)
            written = sorted(p.name for p in tmp.iterdir())
            for name in written:
                share(tmp / name)
            write_text_atomic(tmp / EXPORT_MANIFEST, json.dumps({"files": written}, indent=1))
        except (OSError, RuntimeError) as exc:  # a full disk: OSError from Python, RuntimeError from safetensors' writer
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
            raise SafeSteerError(f"could not write {out_dir} ({reason}); free disk space and rerun with --resume, which "
                                 "exports the trained student from checkpoint.pt") from exc
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


EXPORT_MANIFEST = ".safesteer-export.json"  # the files an export wrote: what a later export may replace
# what an export wrote before it listed its files: save_pretrained's and the tokenizer's names, and the card
_EXPORT_NAMES = re.compile(r"(config|generation_config|tokenizer|tokenizer_config|special_tokens_map|added_tokens)\.json"
                           r"|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|chat_template\.jinja"
                           r"|vocab\.json|merges\.txt|tokenizer\.model|README\.md")


def check_student_dir(out_dir: str | Path) -> None:
    """Fail in one line when an export would replace files that it did not write.

    An export replaces ``student/`` whole; a user's own file put there (notes, an eval log)
    would go with it. Checked before training starts and again at the export.
    """
    out_dir = Path(out_dir)
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if out_dir.is_symlink() or not out_dir.is_dir():
        raise SafeSteerError(f"{out_dir} is not a directory the export wrote; move it away and train again")
    manifest = out_dir / EXPORT_MANIFEST
    ours: set[str] = {EXPORT_MANIFEST}
    try:
        listed = json.loads(manifest.read_text(encoding="utf-8")).get("files") if manifest.is_file() else None
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        listed = None
    if isinstance(listed, list):
        ours |= {name for name in listed if isinstance(name, str)}
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in ours and not (listed is None and _EXPORT_NAMES.fullmatch(p.name)))
    if foreign:
        raise SafeSteerError(f"{out_dir} holds files safesteer-lens did not write ({', '.join(foreign[:3])}"
                             f"{' ...' if len(foreign) > 3 else ''}); move them out of it, then run the command again")


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
