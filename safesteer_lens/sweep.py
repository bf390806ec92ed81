"""Sweeps: train and evaluate a grid of training settings x seeds from one run's direction and S.

A recipe is only worth reporting if it holds across seeds, and the levers (loss, learning
rate, rollout length, steps) interact. :func:`run_sweep` trains one student per grid point,
one at a time, each from the same ``direction.*`` and ``safety_tokens.json``, and evaluates
it with :func:`~safesteer_lens.evaluate.evaluate_models` on the **validation** split by
default: settings are chosen on validation prompts and reported on test prompts. Layout::

    RUN/sweep/
      base.json                 the base model's row (evaluated once per evaluation setting)
      <trial>/trial.json        the trial's settings and its evaluation row (written last)
      <trial>/metrics.jsonl     its training curve (weights are deleted after evaluation
                                unless keep_students=True)
      sweep.csv  sweep.html     every trial's row; the trade-off figure

A trial whose ``trial.json`` holds the same settings and evaluation is skipped; one that was
interrupted resumes from its checkpoint.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import plotly.graph_objects as go

from safesteer_lens.atomic import write_atomic, write_text_atomic
from safesteer_lens.checkpoints import CHECKPOINT, STUDENT_DIR
from safesteer_lens.data import EVALUATION_DATA, builtin_data_digest
from safesteer_lens.distill import TrainConfig, train
from safesteer_lens.errors import SafeSteerError, first_line
from safesteer_lens.rundir import artifact_error, holds_lock, read_json
from safesteer_lens.tracking import check_report_to
from safesteer_lens.evaluate import DEMO_EVAL, EvalConfig, Subject, evaluate_models
from safesteer_lens.models import ChatModel, load_model
from safesteer_lens.pipeline import TRAIN_INPUTS, digests, settings_key

SWEEP_DIR = "sweep"
# A trial's settings may be any TrainConfig field that is a number or a name, typed like its default.
SWEEPABLE = {name: type(value) for name, value in asdict(TrainConfig()).items() if isinstance(value, (int, float, str))}


_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")
_SWEEP_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")
BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse_value(key: str, text: str) -> int | float | str:
    """One grid value, typed like the :class:`TrainConfig` field it sets."""
    kind = SWEEPABLE[key]
    if kind is bool:  # bool("false") is True, so a flag's values are read by name
        if text.lower() not in BOOLEANS:
            raise SafeSteerError(f"--grid {key}={text!r}: {key} takes true or false")
        return BOOLEANS[text.lower()]
    try:
        value = kind(text)
    except ValueError:
        raise SafeSteerError(f"--grid {key}={text!r}: {key} takes a {kind.__name__}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise SafeSteerError(f"--grid {key}={text!r}: values must be finite")
    return value


def parse_grid(specs: Sequence[str]) -> dict[str, list[Any]]:
    """``["lr=3e-5,1e-4", "seed=0,1,2"]`` -> ``{"lr": [3e-5, 1e-4], "seed": [0, 1, 2]}``."""
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        key, _, values = spec.partition("=")
        key = key.strip().replace("-", "_")
        if key not in SWEEPABLE:
            raise SafeSteerError(f"--grid {spec!r}: unknown setting {key!r}; use TrainConfig fields: {', '.join(SWEEPABLE)}")
        if key in grid or not values:
            raise SafeSteerError(f"--grid {spec!r}: give each setting once, as KEY=V1,V2,...")
        grid[key] = [parse_value(key, v.strip()) for v in values.split(",") if v.strip()]
        if not grid[key]:
            raise SafeSteerError(f"--grid {spec!r}: no values; give at least one, as KEY=V1,V2,...")
    if not grid:
        raise SafeSteerError("an empty grid: pass settings such as --grid lr=3e-5,1e-4 seed=0,1,2")
    return grid


def load_grid_file(path: str | Path) -> dict[str, list[Any]]:
    """A grid from a JSON file mapping each setting to a list of values (``{"lr": [3e-5, 1e-4]}``).

    Each value is one grid point as written: a string is never split again at commas, so
    ``"1e-4,5"`` is an error for ``lr``, not two learning rates.
    """
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise SafeSteerError(f"the grid file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8 JSON") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise SafeSteerError(f"cannot read the grid file {path} ({first_line(exc, 80)}); it must be JSON like "
                             '{"lr": [3e-5, 1e-4]}') from exc
    if not isinstance(data, dict) or not data or not all(isinstance(v, list) and v for v in data.values()):
        raise SafeSteerError(f"{path} must map each setting to a non-empty list of values, e.g. {{\"seed\": [0, 1, 2]}}")
    grid: dict[str, list[Any]] = {}
    for key, values in data.items():
        field = key.strip().replace("-", "_")
        if field not in SWEEPABLE:
            raise SafeSteerError(f"{path}: unknown setting {key!r}; use TrainConfig fields: {', '.join(SWEEPABLE)}")
        if field in grid:
            raise SafeSteerError(f"{path}: {field!r} is given twice; give each setting once")
        for value in values:
            if not isinstance(value, (str, int, float)) or (isinstance(value, bool) and SWEEPABLE[field] is not bool):
                raise SafeSteerError(f"{path}: {field} = {value!r} is not a {SWEEPABLE[field].__name__}")
        grid[field] = [parse_value(field, str(v)) for v in values]
    return grid


@dataclass(frozen=True)
class Trial:
    """One grid point: the :class:`TrainConfig` fields it overrides."""

    settings: tuple[tuple[str, Any], ...]

    @property
    def label(self) -> str:
        """The settings as they read (``loss=safesteer-bounded_lr=0.0001_seed=1``): the trial's row in tables."""
        return settings_label(dict(self.settings))

    @property
    def dir_name(self) -> str:
        """The trial's directory: its label made safe for a path, plus a short hash of the exact settings.

        Values come from grid files others write, so nothing in them may reach the file system
        as a path: every character but letters, digits and ``._=+-`` becomes ``-``, the slug is
        cut to 80 characters, and the hash keeps two trials whose slugs coincide apart.
        """
        slug = _UNSAFE.sub("-", self.label)[:80].strip(".-") or "trial"
        digest = hashlib.sha256(json.dumps(self.settings, default=repr).encode()).hexdigest()[:8]
        return f"{slug}-{digest}"

    def config(self, base: TrainConfig) -> TrainConfig:
        """The base settings with this trial's overrides (validated on construction)."""
        return replace(base, **dict(self.settings))


def settings_label(settings: dict[str, Any]) -> str:
    """``{"lr": 0.001, "seed": 0}`` -> ``lr=0.001_seed=0``."""
    return "_".join(f"{k}={v}" for k, v in settings.items())


def trials(grid: dict[str, list[Any]]) -> list[Trial]:
    """Every combination of the grid, in a stable order (the last setting varies fastest)."""
    keys = list(grid)
    return [Trial(tuple(zip(keys, values))) for values in itertools.product(*(grid[k] for k in keys))]




def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str))


def _row(evaluation: Any, name: str) -> dict[str, Any]:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in evaluation.table.loc[name].items()}


def check_sweep_name(name: str) -> None:
    """A sweep's name becomes a directory under the run: one plain name of letters, digits and ``._-``."""
    if not _SWEEP_NAME.fullmatch(name or "") or name in (".", ".."):
        raise SafeSteerError(f"sweep name {name!r} must be one plain directory name of letters, digits, '.', '_' and "
                             "'-', such as 'sweep' or 'lr-study'")


@holds_lock("safesteer sweep")
def run_sweep(
    run_dir: str | Path,
    grid: dict[str, list[Any]],
    train_config: TrainConfig | None = None,
    eval_config: EvalConfig | None = None,
    model: ChatModel | None = None,
    keep_students: bool = False,
    progress: bool = True,
    name: str = SWEEP_DIR,
    report_to: str = "none",
) -> Any:
    """Train and evaluate every grid point; return the sweep table (pandas, one row per trial + base).

    Args:
        run_dir: A run directory with ``direction.*`` and ``safety_tokens.json``.
        grid: Settings to vary (:func:`parse_grid`); ``seed`` among them for a seed study.
        train_config: The settings the grid overrides (default: the ``demo`` training preset).
        eval_config: How each student is evaluated (default: the demo evaluation on the
            validation split).
        model: The base model, already loaded (default: the model named in ``direction.json``).
        keep_students: Keep each trial's exported weights (540 MB each at 135M) and checkpoint.
        progress: Show progress bars and a line per trial.
        name: The sweep's directory under ``run_dir``: separate sweeps of one run (say, one
            per round of a study) keep separate tables.
        report_to: Where each trial's per-step metrics also go (``none``, ``tensorboard``,
            ``wandb``; :mod:`safesteer_lens.tracking`), one tracker run per trial.
    """
    import pandas

    from safesteer_lens.directions import load_direction
    from safesteer_lens.distill import PRESETS

    run_dir = Path(run_dir)
    check_sweep_name(name)
    check_report_to(report_to)
    missing = [artifact for artifact in TRAIN_INPUTS if not (run_dir / artifact).is_file()]
    if missing:
        raise SafeSteerError(f"{run_dir} lacks {', '.join(missing)}; run `safesteer direction` and `safesteer tokens` first")
    train_config = train_config or PRESETS["demo"]
    eval_config = eval_config or replace(DEMO_EVAL, split="val")
    points = trials(grid)
    configs = [t.config(train_config) for t in points]  # every trial validated before anything is written
    say = print if progress else (lambda *a, **k: None)
    base = model or load_model(load_direction(run_dir).model)
    out = run_dir / name
    out.mkdir(exist_ok=True)
    eval_key = settings_key([asdict(eval_config), builtin_data_digest(EVALUATION_DATA)])  # re-split prompts make every trial stale
    # a trial trains from the run's direction and S: a new direction or S makes every trial stale
    inputs = digests([run_dir / artifact for artifact in TRAIN_INPUTS], run_dir)

    base_path = out / "base.json"
    remake = f"safesteer sweep --run {run_dir} --name {name}"
    cached = _record(base_path, remake) if base_path.is_file() else {}
    if cached.get("key") != eval_key:
        say("sweep: evaluating the base model")
        cached = {"key": eval_key, "row": _row(evaluate_models([Subject("base", base)], base, eval_config), "base")}
        _write_json(base_path, cached)
    rows = [{"trial": "base", **cached["row"]}]

    for number, (trial, config) in enumerate(zip(points, configs), 1):
        trial_dir = out / trial.dir_name
        record_path = trial_dir / "trial.json"
        key = settings_key([asdict(config), eval_key, inputs])
        record = _record(record_path, remake) if record_path.is_file() else {}
        if record.get("key") != key:
            say(f"sweep [{number}/{len(points)}] {trial.label}: training")
            trial_dir.mkdir(exist_ok=True)
            for artifact in TRAIN_INPUTS:
                shutil.copy2(run_dir / artifact, trial_dir / artifact)
            if record:  # settings changed since this trial ran: start it again
                record_path.unlink()
                for stale in ("metrics.jsonl", CHECKPOINT):
                    (trial_dir / stale).unlink(missing_ok=True)
            result = train(trial_dir, config, teacher=base, resume=(trial_dir / CHECKPOINT).exists(), progress=progress,
                           report_to=report_to, tracker_name=f"{name}/{trial.dir_name}")
            evaluation = evaluate_models([Subject(trial.label, result.student)], base, eval_config)
            record = {"key": key, "settings": dict(trial.settings), "row": _row(evaluation, trial.label)}
            _write_json(record_path, record)
            if not keep_students:
                shutil.rmtree(trial_dir / STUDENT_DIR, ignore_errors=True)
                (trial_dir / CHECKPOINT).unlink(missing_ok=True)
        else:
            say(f"sweep [{number}/{len(points)}] {trial.label}: done, skipped")
        rows.append({"trial": trial.label, **record["settings"], **record["row"]})

    table = pandas.DataFrame(rows).set_index("trial")
    table["pareto"] = pareto_mask(table)
    write_atomic(out / "sweep.csv", table.to_csv)
    from safesteer_lens.report import save_figure

    save_figure(sweep_figure(table), out, "sweep", assets=run_dir)
    return table


def _record(path: Path, remake: str) -> dict[str, Any]:
    """A trial's (or the base's) ``trial.json``; a partial or foreign one is a one-line error."""
    record = read_json(path, remake)
    if not isinstance(record, dict) or not isinstance(record.get("row"), dict):
        raise artifact_error(path, "holds no result row (an interrupted trial?); delete it to rerun the trial", remake)
    return record


def load_trials(run_dir: str | Path, names: Sequence[str] = (SWEEP_DIR,)) -> Any:
    """Every finished trial of one or more sweeps of a run, as one table (plus each sweep's base row).

    For a study in rounds: each round is its own sweep (``name``), and the frontier is drawn
    over all of them. Reads only the small ``trial.json`` records, so it is instant and needs
    no model. Rows are indexed ``<sweep>/<trial>``; the base row (the same in every sweep
    evaluated the same way) appears once, as ``base``.
    """
    import pandas

    rows: list[dict[str, Any]] = []
    base: dict[str, Any] | None = None
    for name in names:
        out = Path(run_dir) / name
        if not out.is_dir():
            raise SafeSteerError(f"{out} does not exist; run `safesteer sweep --run {run_dir} --name {name}` first")
        remake = f"safesteer sweep --run {run_dir} --name {name}"
        if base is None and (out / "base.json").is_file():
            base = {"trial": "base", **_record(out / "base.json", remake)["row"]}
        for record_path in sorted(out.glob("*/trial.json")):
            record = _record(record_path, remake)
            settings = record.get("settings") if isinstance(record.get("settings"), dict) else {}
            label = settings_label(settings) or record_path.parent.name
            rows.append({"trial": f"{name}/{label}", "sweep": name, **settings, **record["row"]})
    if base is None and not rows:
        raise SafeSteerError(f"no sweep in {', '.join(names)} under {run_dir} has finished a trial or its base row yet; "
                             f"wait for `safesteer sweep` to get that far, or name a finished sweep")
    table = pandas.DataFrame(([base] if base else []) + rows).set_index("trial")
    table["pareto"] = pareto_mask(table)
    return table


def pareto_mask(table: Any, harmless: str = "harmless_refusal", harmful: str = "harmful_refusal") -> list[bool]:
    """Trials no other trial beats on both counts: more harmful prompts refused, fewer harmless ones.

    ``harmless`` and ``harmful`` name the two rates, e.g. ``lookalike_refusal`` and
    ``tasks_refusal`` for the look-alike study's frontier.
    """
    points = list(zip(table[harmful], table[harmless]))
    return [not any(h2 >= h and o2 <= o and (h2, o2) != (h, o) for h2, o2 in points) for h, o in points]


def sweep_figure(table: Any, harmless: str = "harmless_refusal", harmful: str = "harmful_refusal",
                 target: tuple[float, float] = (0.1, 0.9)) -> go.Figure:
    """Harmful refused against harmless refused per trial, with 95% intervals.

    Marker size is MCQ accuracy, colour the share of degenerate replies to harmless prompts;
    the Pareto frontier of these two rates is the dotted line, the base model a star, and the
    target region (at most ``target[0]`` harmless, at least ``target[1]`` harmful refused) a
    dotted box.

    Args:
        table: :func:`run_sweep`'s or :func:`load_trials`'s table.
        harmless: The harmless rate on the x axis, e.g. ``lookalike_refusal``.
        harmful: The harmful rate on the y axis, e.g. ``tasks_refusal``.
        target: The target box's corner: (harmless at most, harmful at least).
    """
    missing = [c for c in (harmless, harmful) if c not in table]
    if missing:
        raise SafeSteerError(f"the sweep table has no {missing[0]!r} column; evaluate with the sets it needs "
                             "(e.g. --n-lookalike, --n-tasks) or plot another rate")
    fig = go.Figure()
    trials_only = table.drop(index="base", errors="ignore").dropna(subset=[harmless, harmful])
    readable = {"lookalike": "look-alike harmless", "tasks": "benchmark-phrased harmful"}
    x_name, y_name = (readable.get(c.removesuffix("_refusal"), c.removesuffix("_refusal")) for c in (harmless, harmful))

    def bars(frame: Any, column: str) -> dict:
        return {"type": "data", "symmetric": False, "array": frame[f"{column}_high"] - frame[column],
                "arrayminus": frame[column] - frame[f"{column}_low"], "thickness": 1}

    size = 8 + 30 * trials_only["mcq_acc"].fillna(0) if "mcq_acc" in trials_only else 12
    fig.add_trace(go.Scatter(
        x=trials_only[harmless], y=trials_only[harmful], mode="markers", name="trials",
        text=list(trials_only.index), hovertemplate=f"%{{text}}<br>{x_name} %{{x:.1%}}<br>{y_name} %{{y:.1%}}<extra></extra>",
        marker={"size": size, "color": trials_only.get("harmless_degenerate"), "colorscale": "Reds", "cmin": 0, "cmax": 1,
                "showscale": True, "colorbar": {"title": "degenerate<br>(harmless)"}, "line": {"width": 1, "color": "black"}},
        error_x=bars(trials_only, harmless), error_y=bars(trials_only, harmful),
    ))
    front = trials_only.loc[pareto_mask(trials_only, harmless, harmful)].sort_values(harmless)
    fig.add_trace(go.Scatter(x=front[harmless], y=front[harmful], mode="lines", name="Pareto frontier",
                             line={"dash": "dot", "color": "black"}))
    if "base" in table.index:
        fig.add_trace(go.Scatter(x=[table.loc["base", harmless]], y=[table.loc["base", harmful]],
                                 mode="markers", name="base", marker={"symbol": "star", "size": 16, "color": "royalblue"}))
    fig.add_shape(type="rect", x0=0, x1=target[0], y0=target[1], y1=1.0, line={"dash": "dot", "color": "green"})
    fig.update_layout(title="Sweep: refusal trade-off (size: MCQ accuracy, colour: degenerate replies; 95% intervals)",
                      xaxis_title=f"{x_name} prompts refused", yaxis_title=f"{y_name} prompts refused",
                      xaxis_range=[-0.05, 1.05], yaxis_range=[-0.05, 1.1], height=560, width=780,
                      legend={"orientation": "h", "y": -0.18})
    return fig
