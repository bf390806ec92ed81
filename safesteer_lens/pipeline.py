"""The end-to-end job: direction -> teacher -> safety tokens -> training -> evaluation -> report.

Each stage reads the previous stage's artifact from the run directory and writes its own, and
is skipped when its artifact exists and was made from the same settings and the same upstream
artifact (a stamp records both). ``rerun=("tokens",)`` redoes a stage, and everything
downstream of it, because their inputs change.

Run directory layout::

    direction.safetensors  direction.json  probes.csv  direction_report.html   stage 1
    safety_tokens.json     tokens_report.html                          stage 2
    metrics.jsonl  checkpoint.pt  student/  train.json                 stage 3 (the recipe's student)
    ablation-<name>/{metrics.jsonl, student/, train.json}              stage 4, one per comparison student
    results.csv  comparison.csv  mcq.csv  examples.json  evaluate.json  evaluation
    report.md  report.html  figures/                                   report
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import save_file

from safesteer_lens.atomic import write_atomic, write_text_atomic
from safesteer_lens.directions import DIRECTION_JSON, DIRECTION_TENSOR, DirectionConfig, find_direction, load_direction
from safesteer_lens.distill import PRESETS as TRAIN_PRESETS
from safesteer_lens.checkpoints import STUDENT_DIR
from safesteer_lens.distill import TrainConfig, train
from safesteer_lens.errors import SafeSteerError
from safesteer_lens.evaluate import (
    DEMO_EVAL, REPRESENTATION, EvalConfig, Evaluation, Subject, evaluate_models, representation_states,
)
from safesteer_lens.model_card import build_model_card, write_model_card
from safesteer_lens.models import DEFAULT_MODEL, ChatModel, load_model, resolve_device
from safesteer_lens.pages import write_direction_report, write_tokens_report
from safesteer_lens.probes import probe_accuracy, save_probes
from safesteer_lens.parallel import current_world, rank_device
from safesteer_lens.precision import compute_dtype, dtype_name
from safesteer_lens.sharding import check_sharding
from safesteer_lens.tokens import TOKENS_JSON, TokenConfig, load_safety_tokens, select_safety_tokens
from safesteer_lens.rundir import locked, read_json
from safesteer_lens.tracking import check_report_to

STAGES = ("direction", "tokens", "train", "ablation", "evaluate", "report")
DIRECTION_FILES = (DIRECTION_JSON, DIRECTION_TENSOR)  # stage 1's artifact, which every later stage reads
TRAIN_INPUTS = (*DIRECTION_FILES, TOKENS_JSON)  # what a training directory needs from the run
RECIPE_LABEL = "SafeSteer student"  # the row of the recipe's own student in the results table


@dataclass(frozen=True)
class Ablation:
    """A comparison student, trained beside the recipe's from the same direction and S.

    It takes the run's training settings with ``overrides`` (say, another loss, no anchor),
    so it has the same steps, prompts and rollouts: the table then shows what the changed
    settings do, and nothing else.

    Attributes:
        name: Directory suffix (``ablation-<name>``) and stamp name.
        label: Its row in the results table (ends in "student", which the report keys on).
        overrides: The :class:`TrainConfig` fields it changes, as ``(field, value)`` pairs.
    """

    name: str
    label: str
    overrides: tuple[tuple[str, Any], ...]

    @property
    def dir_name(self) -> str:
        return f"ablation-{self.name}"

    def config(self, train: TrainConfig) -> TrainConfig:
        return replace(train, **dict(self.overrides))


FULL_REVERSE = Ablation("full-reverse", "full-reverse OPD student", (("loss", "full-reverse"), ("anchor_weight", 0.0)))
PAPER_LOSS = Ablation("paper-loss", "paper-loss SafeSteer student", (("loss", "safesteer"), ("anchor_weight", 0.0)))
BOUNDED = Ablation("bounded", "bounded-loss student (no anchor)", (("loss", "safesteer-bounded"), ("anchor_weight", 0.0)))


@dataclass
class PipelineConfig:
    """All settings of one end-to-end run.

    Attributes:
        direction: Stage 1.
        tokens: Stage 2.
        train: Stage 3: the recipe's student, reported as "SafeSteer student".
        evaluate: The evaluation of base, teacher and every student.
        ablations: Comparison students on the same budget (stage 4), each a row of the table.
    """

    direction: DirectionConfig = field(default_factory=DirectionConfig)
    tokens: TokenConfig = field(default_factory=TokenConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    ablations: tuple[Ablation, ...] = (FULL_REVERSE,)

    def __post_init__(self) -> None:
        names = [a.name for a in self.ablations]
        if len(set(names)) != len(names) or len({a.label for a in self.ablations}) != len(names):
            raise SafeSteerError(f"ablation names and labels must be unique, got {names}")


PIPELINE_PRESETS: dict[str, PipelineConfig] = {
    # 2 CPU cores, embedded 135M model: under 20 minutes end to end.
    "demo": PipelineConfig(
        direction=DirectionConfig(n_train=48, n_val=16, n_test=24),
        tokens=TokenConfig(n_prompts=24),
        train=TRAIN_PRESETS["demo"],
        evaluate=DEMO_EVAL,
        ablations=(PAPER_LOSS, FULL_REVERSE, BOUNDED),
    ),
    # The paper's settings (docs/ARCHITECTURE.md, "The method"), for GPU users with hub models.
    "paper": PipelineConfig(
        direction=DirectionConfig(n_train=128, n_val=32, n_test=65),
        tokens=TokenConfig(n_prompts=100, prob_floor=1e-7),
        train=TRAIN_PRESETS["paper"],
        evaluate=EvalConfig(max_new_tokens=64, n_mcq=None),
    ),
}


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def digests(paths: Sequence[Path], root: Path | None = None) -> dict[str, str]:
    """Content hashes of a stage's input files (a directory: its weight files), by path under ``root``.

    Keyed relative to the run directory, so the same run reached by another path (absolute,
    from a notebook's folder, moved) has the same stamps.
    """
    out = {}
    for path in paths:
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        name = Path(os.path.relpath(path, root)).as_posix() if root is not None else str(path)
        if not files or not all(f.is_file() for f in files):
            out[name] = "missing"
            continue
        sha = hashlib.sha256()
        for file in files:
            with open(file, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 22), b""):
                    sha.update(chunk)
        out[name] = sha.hexdigest()[:16]
    return out


def _stamp_ok(path: Path, key: str, inputs: dict[str, str] | None = None) -> bool:
    """Whether a stage is current: same settings, and every input file as it was when the stage ran.

    ``inputs`` are the stage's input :func:`digests` now, taken once per stage (the stage does
    not change its inputs, so the same hashes go into its new stamp). They are what make a
    hand-made change upstream (a retrained ``student/``, an edited ``safety_tokens.json``, an
    imported direction) mark every stage after it stale.
    """
    if not path.is_file():
        return False
    stamp = read_json(path, "safesteer run --rerun <stage>")
    return isinstance(stamp, dict) and stamp.get("key") == key and stamp.get("inputs", {}) == (inputs or {})


def _write_stamp(path: Path, key: str, inputs: dict[str, str] | None = None, **extra: Any) -> None:
    write_text_atomic(path, json.dumps({"key": key, "inputs": inputs or {}, **extra}, indent=2))


def write_evaluation(out: Path, evaluation: Evaluation) -> None:
    """The evaluation stage's artifacts: ``results.csv``, ``comparison.csv``, ``mcq.csv``, ``examples.json``.

    Each is written beside its final name and moved into place, so a crash never leaves a
    half-written table that a later stage would read.
    """
    mcq = [scores.per_question.assign(model=model, set=name)
           for model, sets in evaluation.mcq.items() for name, scores in sets.items()]
    import pandas

    tables = {"results.csv": evaluation.table, "comparison.csv": evaluation.comparison,
              "mcq.csv": pandas.concat(mcq, ignore_index=True) if mcq else pandas.DataFrame()}
    for name, table in tables.items():
        write_atomic(out / name, lambda tmp, table=table, name=name: table.to_csv(tmp, index=name == "results.csv"))
    write_text_atomic(out / "examples.json", json.dumps(evaluation.examples, indent=2))


def run_pipeline(
    out: str | Path,
    model_name: str = DEFAULT_MODEL,
    preset: str = "demo",
    rerun: Sequence[str] = (),
    config: PipelineConfig | None = None,
    model: ChatModel | None = None,
    progress: bool = True,
    shard: str = "none",
    low_memory_rollouts: bool = False,
    judge: str | None = None,
    report_to: str = "none",
) -> "Any":
    """Run every stage that is missing or stale; return the evaluation table.

    Args:
        out: The run directory.
        model_name: Embedded name, local directory, .gguf or hub id.
        preset: ``demo`` or ``paper`` (ignored when ``config`` is given).
        rerun: Stages to redo even if current (downstream stages follow).
        config: Full settings instead of a preset.
        model: An already loaded base model (skips loading).
        progress: Show progress bars and stage messages.
        shard: Under torchrun, how training shards the models (``train``'s ``shard``). The
            other stages run on rank 0 with the whole base model, which must fit one device
            for inference; with ``"all"`` training loads its own sharded teacher.
        low_memory_rollouts: ``train``'s option of the same name.
        judge: A judge for the evaluation, as ``NAME=PATH_OR_ID``
            (:func:`~safesteer_lens.judges.load_judge`, e.g. ``llama-guard=meta-llama/Llama-Guard-3-1B``).
        report_to: Where each student's per-step metrics also go: ``none``, ``tensorboard`` or
            ``wandb`` (:mod:`safesteer_lens.tracking`), one tracker run per student.
    """
    unknown = set(rerun) - set(STAGES)
    if unknown:
        raise SafeSteerError(f"unknown stage(s) {', '.join(sorted(unknown))}: use {', '.join(STAGES)}")
    if config is None:
        if preset not in PIPELINE_PRESETS:
            raise SafeSteerError(f"unknown preset {preset!r}: use one of {', '.join(PIPELINE_PRESETS)}")
        config = PIPELINE_PRESETS[preset]
    config.train.validate()
    check_report_to(report_to)
    for ablation in config.ablations:
        ablation.config(config.train).validate()
    if judge is not None:
        from safesteer_lens.judges import check_judge

        check_judge(judge)  # before any stage writes, not after training
    out = Path(out)
    world = current_world()  # under torchrun: rank 0 runs stages 1, 2, 5, 6; every rank trains
    check_sharding(shard, world)
    # locked() checks that out can be a run directory and creates it: every setting is checked by now
    with locked(out, "safesteer run", world.is_main):
        return _run_stages(out, model_name, rerun, config, model, progress, shard, low_memory_rollouts, judge,
                           report_to, world)


def _run_stages(out: Path, model_name: str, rerun: Sequence[str], config: PipelineConfig, model: ChatModel | None,
                progress: bool, shard: str, low_memory_rollouts: bool, judge: str | None, report_to: str,
                world: Any) -> Any:
    """The stages of :func:`run_pipeline` in order, on a locked run directory with checked settings."""
    say = print if progress and world.is_main else (lambda *a, **k: None)
    # with shard="all" no rank holds the whole base model while training: rank 0 loads it for
    # stages 1-2, lets it go, and loads it again for evaluation
    hold_base = model is not None or shard != "all"
    base = model or (load_model(model_name, device=rank_device(None, world)) if hold_base or world.is_main else None)

    direction_key = _hash([model.name if model is not None else model_name, asdict(config.direction)])
    tokens_key = _hash([direction_key, asdict(config.tokens)])
    if world.is_main:
        rerun = _direction_and_tokens(out, base, config, direction_key, tokens_key, rerun, say, progress)
    world.barrier()  # the other ranks wait here for stages 1 and 2
    direction = load_direction(out)
    if not hold_base:
        base = None
        _free_device_memory()

    # ---- stages 3 and 4: the recipe's student, and the comparison students on the same budget
    students: dict[str, Path] = {}
    trained: dict[str, TrainConfig] = {}
    for number, stage, label, train_config, run_dir in (
        (3, "train", RECIPE_LABEL, config.train, out),
        *((4, "ablation", a.label, a.config(config.train), out / a.dir_name) for a in config.ablations),
    ):
        loss = train_config.loss
        # what "auto" means on this machine, so a run moved to other hardware trains again
        matmuls = dtype_name(compute_dtype(train_config.precision, resolve_device(None)))
        key = _hash([tokens_key, asdict(train_config), matmuls])
        stamp = run_dir / "train.json"
        inputs = digests([out / name for name in TRAIN_INPUTS], stamp.parent)
        stale = stage in rerun or not _stamp_ok(stamp, key, inputs) or not (run_dir / STUDENT_DIR).exists()
        if world.main_says(stale):
            say(f"[{number}/6] {stage}: training the {label} ({loss} loss)")
            if world.is_main:
                _prepare_train_dir(out, run_dir)
            world.barrier()
            train(run_dir, train_config, teacher=None if shard == "all" else base, progress=progress, shard=shard,
                  low_memory_rollouts=low_memory_rollouts, report_to=report_to, tracker_name=label)
            if world.is_main:
                _write_stamp(stamp, key, inputs, loss=loss)
            rerun = (*rerun, "evaluate")
        else:
            say(f"[{number}/6] {stage}: {label}: current, skipped")
        students[label] = run_dir / STUDENT_DIR
        trained[label] = train_config
    if not world.is_main:  # evaluation and the report are rank 0's
        world.barrier()
        import pandas

        return pandas.read_csv(out / "results.csv", index_col="model")

    # ---- evaluation
    base = base or load_model(model_name, device=rank_device(None, world))
    key = _hash([list(students), asdict(config.evaluate), judge])
    stamp = out / "evaluate.json"
    inputs = digests([*(out / name for name in DIRECTION_FILES), *students.values()], stamp.parent)
    if "evaluate" in rerun or not _stamp_ok(stamp, key, inputs) or not (out / "results.csv").exists():
        say("[5/6] evaluate: base, teacher and students on held-out prompts")
        subjects = [
            Subject("base", base),
            Subject(f"teacher (layer {direction.layer}, coeff {direction.coeff:g})", base,
                    direction.hooks(base)),
            *(Subject(label, load_model(str(path), device=base.device)) for label, path in students.items()),
        ]
        from safesteer_lens.judges import load_judge

        evaluation = evaluate_models(subjects, base, config.evaluate, judge=load_judge(judge, device=str(base.device))
                                     if judge else None)
        write_evaluation(out, evaluation)
        states = representation_states({s.name: (s.model, s.hooks) for s in subjects[:3]}, split=config.evaluate.split)
        write_atomic(out / REPRESENTATION, lambda tmp: save_file({k: v.contiguous() for k, v in states.items()}, str(tmp)))
        _write_stamp(stamp, key, inputs)
        rerun = (*rerun, "report")
    else:
        say("[5/6] evaluate: current, skipped")

    import pandas

    table = pandas.read_csv(out / "results.csv", index_col="model")
    tokens = load_safety_tokens(out)
    for label, path in students.items():  # each student's card gains its evaluation
        write_model_card(path, build_model_card(base.name, trained[label], direction, tokens, table, label,
                                                config.evaluate.split))
    from safesteer_lens.report import write_report

    say("[6/6] report: report.md, report.html and figures/")
    write_report(out, base, table, config)
    world.barrier()
    return table


def _direction_and_tokens(
    out: Path,
    base: ChatModel,
    config: PipelineConfig,
    direction_key: str,
    tokens_key: str,
    rerun: Sequence[str],
    say: Any,
    progress: bool,
) -> Sequence[str]:
    """Stages 1 and 2 (rank 0's alone); returns ``rerun`` with the stages they made stale."""
    # ---- stage 1: direction and teacher
    stamp = out / "direction.stamp.json"
    if "direction" in rerun or not _stamp_ok(stamp, direction_key) or not (out / "direction.json").exists():
        say("[1/6] direction: finding the refusal direction and the teacher's coefficient")
        direction = find_direction(base, config.direction, progress=progress)
        probes = probe_accuracy(base)
        direction.save(out)
        save_probes(probes, out)
        write_direction_report(direction, out, probes)
        _write_stamp(stamp, direction_key)
        rerun = (*rerun, "tokens")
    else:
        say("[1/6] direction: current, skipped")
    direction = load_direction(out)

    # ---- stage 2: safety tokens
    stamp = out / "tokens.stamp.json"
    inputs = digests([out / name for name in DIRECTION_FILES], stamp.parent)
    if "tokens" in rerun or not _stamp_ok(stamp, tokens_key, inputs) or not (out / "safety_tokens.json").exists():
        say("[2/6] tokens: choosing the safety tokens S")
        tokens = select_safety_tokens(base, direction, config.tokens, progress=progress)
        tokens.save(out)
        write_tokens_report(base, direction, tokens, out, compare_horizon=1)
        _write_stamp(stamp, tokens_key, inputs)
        rerun = (*rerun, "train", "ablation")
    else:
        say("[2/6] tokens: current, skipped")
    return rerun


def _free_device_memory() -> None:
    """Collect models nothing refers to any more and give their device memory back."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _prepare_train_dir(out: Path, run_dir: Path) -> None:
    """Give a training directory the stage-1/2 artifacts and clear a stale run's progress."""
    if run_dir != out:
        run_dir.mkdir(exist_ok=True)
        for name in TRAIN_INPUTS:
            shutil.copy2(out / name, run_dir / name)
    for stale in ("metrics.jsonl", "checkpoint.pt"):
        (run_dir / stale).unlink(missing_ok=True)
