"""The end-to-end job: direction -> teacher -> safety tokens -> training -> evaluation -> report.

The job is a table of stages (:class:`Stage`): each names the artifacts it reads and writes
and the function that makes them, and one runner treats them alike. A stage is skipped when
its outputs exist and its stamp records the same settings and the same content hashes of
what it read, so a hand-made change upstream (an edited ``safety_tokens.json``, a student
retrained by ``safesteer train``) makes every stage that reads it run again.
``rerun=("tokens",)`` redoes a stage, and every stage downstream of it, because what they
read was just rewritten.

Run directory layout::

    direction.safetensors  direction.json  probes.csv  direction_report.html   stage 1
    safety_tokens.json     token_views.json  tokens_report.html        stage 2
    metrics.jsonl  checkpoint.pt  student/  train.json                 stage 3 (the recipe's student)
    ablation-<name>/{metrics.jsonl, student/, train.json}              stage 4, one per comparison student
    results.csv  comparison.csv  mcq.csv  by_category.csv  examples.json  representation.safetensors  evaluate.json  evaluation
    report.md  report.html  figures/                                   report
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import save_file

from safesteer_lens.atomic import write_atomic, write_text_atomic
from safesteer_lens.data import EVALUATION_DATA, builtin_data_digest
from safesteer_lens.directions import DIRECTION_JSON, DIRECTION_TENSOR, DirectionConfig, find_direction, load_direction
from safesteer_lens.distill import PRESETS as TRAIN_PRESETS
from safesteer_lens.checkpoints import METRICS, STUDENT_DIR
from safesteer_lens.distill import TrainConfig, train
from safesteer_lens.errors import SafeSteerError
from safesteer_lens.evaluate import (
    DEMO_EVAL, REPRESENTATION, EvalConfig, Evaluation, Subject, evaluate_models, representation_states,
)
from safesteer_lens.model_card import build_model_card, write_model_card
from safesteer_lens.models import DEFAULT_MODEL, ChatModel, load_model, resolve_device
from safesteer_lens.pages import write_direction_report, write_tokens_report
from safesteer_lens.probes import PROBES_CSV, probe_accuracy, save_probes
from safesteer_lens.parallel import current_world, rank_device
from safesteer_lens.precision import compute_dtype, dtype_name
from safesteer_lens.sharding import check_sharding
from safesteer_lens.token_views import TOKEN_VIEWS, collect_token_views
from safesteer_lens.tokens import TOKENS_JSON, TokenConfig, load_safety_tokens, select_with_comparison
from safesteer_lens.rundir import locked, read_json
from safesteer_lens.tracking import check_report_to

STAGES = ("direction", "tokens", "train", "ablation", "evaluate", "report")
DIRECTION_FILES = (DIRECTION_JSON, DIRECTION_TENSOR)  # stage 1's artifact, which every later stage reads
TRAIN_INPUTS = (*DIRECTION_FILES, TOKENS_JSON)  # what a training directory needs from the run
EVALUATION_FILES = ("results.csv", "comparison.csv", "mcq.csv", "by_category.csv", "examples.json")  # what write_evaluation writes
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
    # 2 CPU cores, embedded 135M model. S gains the refusal's opener ("I"), the token where a
    # reply becomes a refusal, which the vote alone never picks (studies/recipe/).
    "demo": PipelineConfig(
        direction=DirectionConfig(n_train=48, n_val=16, n_test=24),
        tokens=TokenConfig(n_prompts=24, openers=1),
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


def settings_key(value: Any) -> str:
    """A stamp's key: a short hash of the settings (any JSON-able value) a stage or a sweep trial ran with."""
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


def _stamp_ok(path: Path, key: str, inputs: dict[str, str] | None = None, outputs: dict[str, str] | None = None) -> bool:
    """Whether a stage is current: same settings, and every input file as it was when the stage ran.

    ``inputs`` are the stage's input :func:`digests` now, taken once per stage (the stage does
    not change its inputs, so the same hashes go into its new stamp). They are what make a
    hand-made change upstream (a retrained ``student/``, an edited ``safety_tokens.json``, an
    imported direction) mark every stage after it stale.
    """
    if not path.is_file():
        return False
    stamp = read_json(path, "safesteer run --rerun <stage>")
    return (isinstance(stamp, dict) and stamp.get("key") == key and stamp.get("inputs", {}) == (inputs or {})
            and (outputs is None or stamp.get("outputs", outputs) == outputs))  # stamps from before outputs were hashed pass


def _write_stamp(path: Path, key: str, inputs: dict[str, str] | None = None, **extra: Any) -> None:
    write_text_atomic(path, json.dumps({"key": key, "inputs": inputs or {}, **extra}, indent=2))


def write_evaluation(out: Path, evaluation: Evaluation) -> None:
    """The evaluation stage's artifacts: ``results.csv``, ``comparison.csv``, ``mcq.csv``, ``by_category.csv``, ``examples.json``.

    Each is written beside its final name and moved into place, so a crash never leaves a
    half-written table that a later stage would read.
    """
    mcq = [scores.per_question.assign(model=model, set=name)
           for model, sets in evaluation.mcq.items() for name, scores in sets.items()]
    import pandas

    tables = {"results.csv": evaluation.table, "comparison.csv": evaluation.comparison,
              "mcq.csv": pandas.concat(mcq, ignore_index=True) if mcq else pandas.DataFrame(),
              "by_category.csv": evaluation.by_category if evaluation.by_category is not None else pandas.DataFrame()}
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
    until: str | None = None,
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
        until: The last stage to run (say ``tokens``, to look at S or sweep training settings
            before any student trains); None runs them all.

    Returns:
        The evaluation table (``results.csv``), or None when ``until`` stopped before the
        evaluation.
    """
    unknown = set(rerun) - set(STAGES)
    if unknown:
        raise SafeSteerError(f"unknown stage(s) {', '.join(sorted(unknown))}: use {', '.join(STAGES)}")
    if until is not None and until not in STAGES:
        raise SafeSteerError(f"unknown stage {until!r} to stop after: use one of {', '.join(STAGES)}")
    if config is None:
        if preset not in PIPELINE_PRESETS:
            raise SafeSteerError(f"unknown preset {preset!r}: use one of {', '.join(PIPELINE_PRESETS)}")
        config = PIPELINE_PRESETS[preset]
    check_report_to(report_to)
    for ablation in config.ablations:
        ablation.config(config.train)  # a comparison student's settings are checked as they are built
    if judge is not None:
        from safesteer_lens.judges import check_judge

        check_judge(judge)  # before any stage writes, not after training
    out = Path(out)
    world = current_world()  # under torchrun: rank 0 runs stages 1, 2, 5, 6; every rank trains
    check_sharding(shard, world)
    # locked() checks that out can be a run directory and creates it: every setting is checked by now
    with locked(out, "safesteer run", world.is_main):
        return _run_stages(out, model_name, rerun, config, model, progress, shard, low_memory_rollouts, judge,
                           report_to, world, until)


@dataclass(frozen=True)
class Stage:
    """One row of the pipeline's stage table: what a stage reads, writes and runs.

    The runner (:func:`_run_table`) treats every row alike: a stage is current when its stamp
    holds the same settings ``key`` and the same content hashes of its ``inputs``, and every
    one of its ``outputs`` exists. Otherwise it runs, and every later stage that reads one of
    its outputs runs too.

    Attributes:
        name: Its ``--rerun`` name (each comparison student is an ``ablation`` row).
        message: The progress line when it runs.
        key: Hash of the settings it runs with.
        inputs: Artifacts it reads (files, or model directories by their weight files).
        outputs: Artifacts it writes.
        run: Makes the outputs.
        stamp: Its stamp file; None runs it every time (the report, which is cheap).
        every_rank: Every process runs it (training); otherwise rank 0 alone.
        stamp_outputs: The stamp also holds its outputs' content hashes, so an output replaced
            by hand (a student retrained by ``safesteer train`` with other settings) makes the
            stage stale instead of being described as the stage's own.
        extra: More fields for its stamp.
        label: Which of several rows of one name it is (the student), for the progress line.
    """

    name: str
    message: str
    key: str
    inputs: tuple[Path, ...]
    outputs: tuple[Path, ...]
    run: Callable[[], None]
    stamp: Path | None
    every_rank: bool = False
    stamp_outputs: bool = False
    extra: tuple[tuple[str, Any], ...] = ()
    label: str = ""

    @property
    def number(self) -> int:
        return STAGES.index(self.name) + 1


@dataclass
class _Job:
    """What the stages of one run share: its settings, its directory and the base model.

    The base model loads on first use, so a run whose stages are all current loads none.
    ``students`` and ``trained`` (each student's directory and settings, by label) are filled
    as :meth:`stages` builds the table.
    """

    out: Path
    model_name: str
    config: PipelineConfig
    given: ChatModel | None
    progress: bool
    shard: str
    low_memory_rollouts: bool
    judge: str | None
    report_to: str
    world: Any
    students: dict[str, Path] = field(default_factory=dict)
    trained: dict[str, TrainConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._base = self.given

    @property
    def base(self) -> ChatModel:
        if self._base is None:
            self._base = load_model(self.model_name, device=rank_device(None, self.world))
        return self._base

    def release_base(self) -> None:
        """With ``shard="all"`` no rank holds the whole base model while training: let it go."""
        if self.given is None and self._base is not None:
            self._base = None
            _free_device_memory()

    # ---- the stages' run functions
    def direction(self) -> None:
        direction = find_direction(self.base, self.config.direction, progress=self.progress)
        probes = probe_accuracy(self.base)
        direction.save(self.out)
        save_probes(probes, self.out)
        write_direction_report(direction, self.out, probes)

    def tokens(self) -> None:
        direction = load_direction(self.out)
        tokens, h1 = select_with_comparison(self.base, direction, self.config.tokens, 1, progress=self.progress)
        tokens.save(self.out)
        collect_token_views(self.base, direction, tokens, h1).save(self.out)
        write_tokens_report(self.out, tokens)

    def train(self, label: str, config: TrainConfig, run_dir: Path) -> None:
        if self.world.is_main:
            _prepare_train_dir(self.out, run_dir)
        self.world.barrier()
        if self.shard == "all":
            self.release_base()  # train() loads its own sharded teacher
        train(run_dir, config, teacher=None if self.shard == "all" else self.base, progress=self.progress,
              shard=self.shard, low_memory_rollouts=self.low_memory_rollouts, report_to=self.report_to,
              tracker_name=label)

    def evaluate(self) -> None:
        base, direction = self.base, self.config.train.teacher_direction(load_direction(self.out))
        subjects = [
            Subject("base", base),
            Subject(f"teacher (layer {direction.layer}, coeff {direction.coeff:g})", base, direction.hooks(base)),
            *(Subject(label, load_model(str(path), device=base.device)) for label, path in self.students.items()),
        ]
        judge = None
        if self.judge:
            from safesteer_lens.judges import load_judge

            judge = load_judge(self.judge, device=str(base.device))
        evaluation = evaluate_models(subjects, base, self.config.evaluate, judge=judge)
        write_evaluation(self.out, evaluation)
        states = representation_states({s.name: (s.model, s.hooks) for s in subjects[:3]},
                                       split=self.config.evaluate.split)
        write_atomic(self.out / REPRESENTATION,
                     lambda tmp: save_file({k: v.contiguous() for k, v in states.items()}, str(tmp)))

    def report(self) -> None:
        import pandas

        from safesteer_lens.report import write_report

        table = pandas.read_csv(self.out / "results.csv", index_col="model")
        direction, tokens = load_direction(self.out), load_safety_tokens(self.out)
        for label, path in self.students.items():  # each student's card gains its evaluation
            config = self.trained[label]
            write_model_card(path, build_model_card(direction.model, config, config.teacher_direction(direction), tokens,
                                                    table, label, self.config.evaluate.split))
        write_report(self.out, direction.model, table, self.config)

    # ---- the table
    def stages(self) -> list[Stage]:
        """The stage table: each stage's settings key, the artifacts it reads and writes, and its run."""
        out, config = self.out, self.config
        name = self.given.name if self.given is not None else self.model_name
        data = builtin_data_digest()
        direction_key = settings_key([name, asdict(config.direction), data])
        tokens_key = settings_key([direction_key, asdict(config.tokens)])
        direction_files = tuple(out / f for f in DIRECTION_FILES)
        table = [
            Stage(name="direction", message="finding the refusal direction and the teacher's coefficient",
                  key=direction_key, inputs=(), outputs=(*direction_files, out / PROBES_CSV), run=self.direction,
                  stamp=out / "direction.stamp.json"),
            Stage(name="tokens", message="choosing the safety tokens S", key=tokens_key, inputs=direction_files,
                  outputs=(out / TOKENS_JSON, out / TOKEN_VIEWS), run=self.tokens, stamp=out / "tokens.stamp.json"),
        ]
        students = [(RECIPE_LABEL, "train", config.train, out),
                    *((a.label, "ablation", a.config(config.train), out / a.dir_name) for a in config.ablations)]
        for label, stage, train_config, run_dir in students:
            self.students[label], self.trained[label] = run_dir / STUDENT_DIR, train_config
            # what "auto" means on this machine, so a run moved to other hardware trains again
            matmuls = dtype_name(compute_dtype(train_config.precision, resolve_device(None)))
            table.append(Stage(
                name=stage, message=f"training the {label} ({train_config.loss} loss)", label=label,
                key=settings_key([tokens_key, asdict(train_config), matmuls]), inputs=tuple(out / f for f in TRAIN_INPUTS),
                outputs=(run_dir / STUDENT_DIR, run_dir / METRICS), run=partial(self.train, label, train_config, run_dir),
                stamp=run_dir / "train.json", every_rank=True, stamp_outputs=True, extra=(("loss", train_config.loss),),
            ))
        table += [
            Stage(name="evaluate", message="base, teacher and students on held-out prompts",
                  key=settings_key([list(self.students), asdict(config.evaluate), self.judge, data,
                             builtin_data_digest(EVALUATION_DATA)]),
                  inputs=(*direction_files, *self.students.values()),
                  outputs=tuple(out / name for name in (*EVALUATION_FILES, REPRESENTATION)),
                  run=self.evaluate, stamp=out / "evaluate.json"),
            Stage(name="report", message="report.md, report.html and figures/", key="",
                  inputs=tuple(out / name for name in EVALUATION_FILES), outputs=(out / "report.md", out / "report.html"),
                  run=self.report, stamp=None),
        ]
        return table


def _run_stages(out: Path, model_name: str, rerun: Sequence[str], config: PipelineConfig, model: ChatModel | None,
                progress: bool, shard: str, low_memory_rollouts: bool, judge: str | None, report_to: str,
                world: Any, until: str | None = None) -> Any:
    """The stage table of :func:`run_pipeline`, run in order on a locked run directory with checked settings."""
    job = _Job(out, model_name, config, model, progress, shard, low_memory_rollouts, judge, report_to, world)
    stages = job.stages()
    if until is not None:
        stages = [s for s in stages if STAGES.index(s.name) <= STAGES.index(until)]
    _run_table(stages, out, rerun, world, print if progress and world.is_main else (lambda *a, **k: None))
    world.barrier()  # the other ranks wait here for rank 0's evaluation and report
    if until is not None and STAGES.index(until) < STAGES.index("evaluate"):
        return None
    import pandas

    return pandas.read_csv(out / "results.csv", index_col="model")


def _run_table(stages: Sequence[Stage], out: Path, rerun: Sequence[str], world: Any, say: Callable[..., None]) -> None:
    """Run each stage that is stale, in order; one that runs makes every later reader of its outputs stale."""
    made: set[Path] = set()
    for stage in stages:
        if not (stage.every_rank or world.is_main):
            continue
        if stage.every_rank:
            world.barrier()  # every rank waits for rank 0's stages before it
        inputs = digests(stage.inputs, out)
        outputs = digests(stage.outputs, out) if stage.stamp_outputs else None
        stale = (stage.name in rerun or bool(made & set(stage.inputs)) or stage.stamp is None
                 or not _stamp_ok(stage.stamp, stage.key, inputs, outputs) or not all(p.exists() for p in stage.outputs))
        if stage.every_rank:
            stale = world.main_says(stale)
        if not stale:
            say(f"[{stage.number}/{len(STAGES)}] {stage.name}: {stage.label + ': ' if stage.label else ''}current, skipped")
            continue
        say(f"[{stage.number}/{len(STAGES)}] {stage.name}: {stage.message}")
        stage.run()
        if stage.stamp is not None and world.is_main:
            made_outputs = {"outputs": digests(stage.outputs, out)} if stage.stamp_outputs else {}
            _write_stamp(stage.stamp, stage.key, inputs, **dict(stage.extra), **made_outputs)
        made |= set(stage.outputs)


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
