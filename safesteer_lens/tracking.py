"""Experiment tracking: every training step's metrics, and the run's settings, to TensorBoard or W&B.

``metrics.jsonl`` stays the run's own record (resume and the report read it); a tracker is a
second copy for the tools researchers already watch runs in. Only rank 0 opens one under
torchrun, so a data-parallel run is one run in the tracker, not one per process.

* ``none``: nothing beyond ``metrics.jsonl``.
* ``tensorboard``: event files in ``RUN/tensorboard/`` (``tensorboard --logdir RUN``); needs
  the ``tensorboard`` extra.
* ``wandb``: a Weights & Biases run in ``RUN/wandb/``. Offline machines set
  ``WANDB_MODE=offline`` and upload later with ``wandb sync``; ``WANDB_PROJECT`` names the
  project (default ``safesteer-lens``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

from safesteer_lens.errors import SafeSteerError


class Tracker(Protocol):
    """Where per-step metrics go besides ``metrics.jsonl``."""

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Record one step's numeric metrics (others are skipped)."""

    def close(self) -> None:
        """Flush and finish the run."""


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The metrics a tracker can plot: finite ints and floats, not the step counter itself."""
    return {k: float(v) for k, v in metrics.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class NoTracker:
    """``--report-to none``."""

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker:
    """Scalars under ``train/<metric>`` and the settings as text, in ``<run>/tensorboard``."""

    def __init__(self, run_dir: Path, config: Mapping[str, Any], name: str, start_step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise SafeSteerError("--report-to tensorboard needs the tensorboard package: "
                                 "pip install 'safesteer-lens[tensorboard]'") from exc
        # purge_step: events at or after it from earlier writers are dropped, so a resumed run loses
        # what a crashed one wrote past its checkpoint and a fresh run (0) replaces an old run's curves
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard" / name), purge_step=start_step)
        table = "\n".join(f"| {k} | {v} |" for k, v in config.items())
        self.writer.add_text("config", "| setting | value |\n|---|---|\n" + table, global_step=start_step)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        for key, value in _numbers(metrics).items():
            self.writer.add_scalar(f"train/{key}", value, global_step=step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run in ``<run>/wandb`` with the settings as its config."""

    def __init__(self, run_dir: Path, config: Mapping[str, Any], name: str, start_step: int) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise SafeSteerError("--report-to wandb needs the wandb package: pip install 'safesteer-lens[wandb]'") from exc

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "safesteer-lens"), dir=str(run_dir), name=name,
                              config=dict(config), reinit="create_new")

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        self.run.log(_numbers(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


TRACKERS: dict[str, Callable[[Path, Mapping[str, Any], str, int], Tracker]] = {
    "none": lambda run_dir, config, name, start_step: NoTracker(),
    "tensorboard": TensorBoardTracker,
    "wandb": WandbTracker,
}


def check_report_to(report_to: str) -> None:
    """Reject an unknown tracker name before anything runs."""
    if report_to not in TRACKERS:
        raise SafeSteerError(f"unknown --report-to {report_to!r}: use one of {', '.join(TRACKERS)}")


def open_tracker(report_to: str, run_dir: str | Path, config: Mapping[str, Any], name: str = "train",
                 start_step: int = 0, is_main: bool = True) -> Tracker:
    """The tracker for one training run (a :class:`NoTracker` on every rank but 0).

    Args:
        report_to: ``none``, ``tensorboard`` or ``wandb``.
        run_dir: The run directory the tracker's files go under.
        config: The run's settings, logged once.
        name: The run's name in the tracker (a student's label, a sweep trial's name).
        start_step: The first step this call trains (above 0 on resume).
        is_main: Whether this process is rank 0.
    """
    check_report_to(report_to)
    if not is_main:
        return NoTracker()
    return TRACKERS[report_to](Path(run_dir), config, name, start_step)
