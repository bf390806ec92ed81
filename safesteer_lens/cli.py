"""The ``safesteer`` command line.

Each subcommand is a thin shell over the Python API. Problems the user can fix raise
:class:`~safesteer_lens.errors.SafeSteerError`; :func:`main` prints them as one line and
exits with status 2 (argparse's own usage errors use 2 as well).
"""

from __future__ import annotations

import argparse
import errno
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, NoReturn, Sequence

from safesteer_lens.errors import SafeSteerError
from safesteer_lens.directions import DIRECTION_METHODS
from safesteer_lens.config_flags import add_config_flags, config_overrides
from safesteer_lens.distill import PRESETS, ROLLOUT_ENGINES, RunInputs, TrainConfig, TrainResult
from safesteer_lens.evaluate import DEMO_EVAL
from safesteer_lens.losses import LOSS_REGISTRY
from safesteer_lens.pipeline import STAGES
from safesteer_lens.models import DEFAULT_MODEL, DTYPES
from safesteer_lens.precision import PRECISIONS
from safesteer_lens.sharding import SHARDING
from safesteer_lens.tracking import TRACKERS


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"embedded name, local HF directory, .gguf file or hub id (default: {DEFAULT_MODEL})",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on cuda)")


def cmd_info(args: argparse.Namespace) -> None:
    """Print the model's shape and how long it took to load."""
    from safesteer_lens.models import load_model
    from safesteer_lens.precision import compute_dtype, dtype_name

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    matmuls = dtype_name(compute_dtype("auto", model.device))
    rows = [
        ("model", model.name),
        ("source", model.source),
        ("architecture", type(model.hf_model).__name__),
        ("layers", model.n_layers),
        ("d_model", model.d_model),
        ("vocab", model.d_vocab),
        ("post-instruction tokens", " ".join(repr(t) for t in model.post_instruction_tokens)),
        ("end-of-turn ids", model.eot_token_ids),
        ("device", model.device),
        ("dtype", dtype_name(model.dtype)),
        ("training matmuls", f"{matmuls} (--precision auto on this device)"),
        ("load time", f"{model.load_seconds:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def cmd_chat(args: argparse.Namespace) -> None:
    """Greedy replies to prompts given on the command line."""
    from safesteer_lens.generation import generate
    from safesteer_lens.models import load_model

    from safesteer_lens.data import check_prompt_lengths, prompts_from_texts

    if args.max_new_tokens < 1:
        raise SafeSteerError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    check_prompt_lengths(model, prompts_from_texts(args.prompts, "the command line"), args.max_new_tokens)
    out = generate(model, args.prompts, max_new_tokens=args.max_new_tokens)
    for prompt, text in zip(args.prompts, out.texts):
        print(f"user: {prompt}\nassistant: {text.strip()}\n")


def _count_or_share(text: str) -> int | float:
    """``--top-k``: an integer count, or a share strictly between 0 and 1 written with a point."""
    try:
        return float(text) if "." in text or "e" in text.lower() else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count such as 200 or a share such as 0.05, got {text!r}") from None


def parse_layers(text: str | None) -> list[int] | None:
    """``"8-20"``, ``"10,11,12"`` or ``"4,8-12"`` to a list of layer indices."""
    if not text:
        return None
    layers: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            layers.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError as exc:
        raise SafeSteerError(f"cannot read layers {text!r}: use e.g. 8-20 or 10,11,12") from exc
    return layers


def cmd_direction(args: argparse.Namespace) -> None:
    """Stage 1: find, score and save the refusal direction and the teacher's coefficient."""
    from safesteer_lens.directions import DirectionConfig, check_layers, find_direction
    from safesteer_lens.models import load_model
    from safesteer_lens.pages import write_direction_report
    from safesteer_lens.probes import probe_accuracy, save_probes

    config = DirectionConfig(
        method=args.method, layers=parse_layers(args.layers), n_train=args.n_train,
        n_val=args.n_val, n_test=args.n_test,
    )
    from safesteer_lens.rundir import check_out_dir, locked

    check_out_dir(args.out)
    from safesteer_lens.data import check_prompt_lengths, load_prompt_file, split_by_position

    harmful_file = load_prompt_file(args.harmful, "harmful") if args.harmful else None
    harmless_file = load_prompt_file(args.harmless, "harmless") if args.harmless else None
    harmful = split_by_position(harmful_file) if harmful_file else None
    harmless = split_by_position(harmless_file) if harmless_file else None
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    for prompts, path in ((harmful_file, args.harmful), (harmless_file, args.harmless)):
        check_prompt_lengths(model, prompts or [], config.max_new_tokens, path)
    check_layers(model, config.layers)  # before the lock creates the run directory
    with locked(args.out, "safesteer direction"):
        direction = find_direction(model, config, harmful=harmful, harmless=harmless)
        probes = probe_accuracy(model, train=(harmful["train"], harmless["train"]) if harmful and harmless else None,
                                test=(harmful["val"], harmless["val"]) if harmful and harmless else None)
        direction.save(args.out)
        save_probes(probes, args.out)
        page = write_direction_report(direction, args.out, probes)
    ev = direction.evaluation
    print(f"method {direction.method}, layer {direction.layer}, position {direction.position}, coeff {direction.coeff:g}")
    print("held-out greedy replies that open as refusals:")
    print(f"  harmful : base {ev['test_harmful_refusal_base']:.0%}  teacher {ev['test_harmful_refusal_teacher']:.0%}")
    print(f"  harmless: base {ev['test_harmless_refusal_base']:.0%}  teacher {ev['test_harmless_refusal_teacher']:.0%}")
    print(f"wrote {args.out}/direction.safetensors, direction.json and {page.name} ({ev['seconds']:.0f} s)")


def cmd_tokens(args: argparse.Namespace) -> None:
    """Stage 2: choose the safety tokens S from teacher rollouts on harmless prompts."""
    from safesteer_lens.directions import load_direction
    from safesteer_lens.models import load_model
    from safesteer_lens.pages import write_tokens_report
    from safesteer_lens.token_views import collect_token_views
    from safesteer_lens.tokens import TokenConfig, select_with_comparison

    from safesteer_lens.rundir import locked, require_run_dir

    config = TokenConfig(
        horizon=args.horizon, samples_per_prompt=args.samples, n_prompts=args.n_prompts,
        top_k_votes=args.top_k, set_size=args.set_size, prob_floor=args.prob_floor,
        method=args.method, seed=args.seed, openers=args.openers,
    )
    if args.compare_horizon < 0:
        raise SafeSteerError(f"--compare-horizon must be 0 (skip) or a horizon >= 1, got {args.compare_horizon}")
    require_run_dir(args.run)
    with locked(args.run, "safesteer tokens"):
        _import_direction(args)
        direction = load_direction(args.run)
        model = load_model(args.model or direction.model, device=args.device, dtype=args.dtype)
        tokens, compared = select_with_comparison(model, direction, config, args.compare_horizon)
        tokens.save(args.run)
        collect_token_views(model, direction, tokens, compared).save(args.run)
        report = write_tokens_report(args.run, tokens)
    print(f"|S| = {len(tokens)} from {tokens.settings['n_valid_positions']} voting positions:")
    print("  " + " ".join(repr(t) for t in tokens.texts[:25]) + (" ..." if len(tokens) > 25 else ""))
    print(f"wrote {args.run}/safety_tokens.json and {report.name}")


def cmd_train(args: argparse.Namespace) -> None:
    """Stage 3: localized on-policy distillation of the student from the steered teacher."""
    from safesteer_lens.checkpoints import CHECKPOINT, check_fresh_start
    from safesteer_lens.distill import preflight, preset
    from safesteer_lens.parallel import current_world, shutdown
    from safesteer_lens.rundir import locked, require_run_dir

    overrides = config_overrides(args, TrainConfig)
    config = preset(args.preset, **overrides)  # validated on construction
    require_run_dir(args.run)
    if args.resume and args.overwrite:
        raise SafeSteerError("--resume continues the run in place and --overwrite starts a new one; pass one of them")
    world = current_world()  # under torchrun: joins the process group; one process: World()
    try:
        with locked(args.run, "safesteer train", world.is_main):
            if not (args.resume or args.overwrite):
                check_fresh_start(args.run)
            _import_direction(args)
            inputs = preflight(args.run, config, args.resume)  # a damaged run directory fails before any model loads
            if args.resume and inputs.checkpoint is None and world.is_main:
                print(f"no {CHECKPOINT} in {args.run} yet: training starts at step 0")
            result = _train_command(args, config, world, inputs)
    finally:
        shutdown()
    if not world.is_main:
        return
    last = result.metrics[-1] if result.metrics else {}
    print(f"trained {len(result.metrics)} steps ({config.loss}); last step: loss {last.get('loss')}, "
          f"rollout refusal {last.get('rollout_refusal')}, projection {last.get('projection')}")
    ranks = f" on {world.size} processes" if world.size > 1 else ""
    print(f"wrote {args.run}/metrics.jsonl, checkpoint.pt and student/{ranks}")


def _train_command(args: argparse.Namespace, config: TrainConfig, world: Any, inputs: RunInputs) -> TrainResult:
    """Load the teacher as the flags say and train (the part of ``cmd_train`` after the checks)."""
    from safesteer_lens.distill import train
    from safesteer_lens.models import load_model
    from safesteer_lens.parallel import rank_device
    from safesteer_lens.sharding import check_sharding

    direction = inputs.direction
    device = rank_device(args.device, world)
    check_sharding(args.shard, world)
    if args.shard == "all" and (args.teacher_device or args.dtype or (args.model and args.model != direction.model)):
        raise SafeSteerError("--shard all loads and shards the direction's model itself, gathered in the training "
                             "precision; drop --teacher-device, --dtype and --model")
    # with --shard all, train() loads the sharded teacher, the same way `safesteer run --shard all` does
    teacher = None if args.shard == "all" else load_model(args.model or direction.model,
                                                          device=args.teacher_device or device, dtype=args.dtype)
    return train(args.run, config, teacher=teacher, resume=args.resume, device=device, shard=args.shard,
                 low_memory_rollouts=args.low_memory_rollouts, report_to=args.report_to, inputs=inputs)


def cmd_run(args: argparse.Namespace) -> None:
    """The whole job: direction -> teacher -> tokens -> training -> evaluation -> report."""
    from dataclasses import replace

    from safesteer_lens.parallel import current_world, shutdown
    from safesteer_lens.pipeline import PIPELINE_PRESETS, run_pipeline

    config = PIPELINE_PRESETS[args.preset]
    if args.precision:
        config = replace(config, train=replace(config.train, precision=args.precision))
    world = current_world()  # under torchrun: joins the process group; one process: World()
    try:
        table = run_pipeline(args.out, args.model, config=config, rerun=args.rerun or (), shard=args.shard,
                             low_memory_rollouts=args.low_memory_rollouts, judge=args.judge,
                             report_to=args.report_to, until=args.until)
    finally:
        shutdown()
    if not world.is_main:
        return
    if table is None:
        print(f"stopped after the {args.until} stage; run the same command without --until to go on")
        return
    _print_table(table)
    print(f"report: {args.out}/report.md and {args.out}/report.html")


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Evaluate the base model, the teacher of a run and any student directories given.

    Writes the evaluation stage's artifacts into the run directory (``results.csv``,
    ``comparison.csv``, ``mcq.csv``, ``examples.json``) and drops the pipeline's evaluation stamp,
    so a later ``safesteer run`` evaluates its own students again instead of reporting these.
    """
    from safesteer_lens.evaluate import EvalConfig
    from safesteer_lens.rundir import check_out_file, locked, require_run_dir

    config = EvalConfig(n_harmful=args.n, n_harmless=args.n, max_new_tokens=args.max_new_tokens,
                        n_mcq=args.n_mcq, split=args.split, n_lookalike=args.n_lookalike, n_tasks=args.n_tasks)
    if not (math.isfinite(args.teacher_coeff) and args.teacher_coeff >= 0):
        raise SafeSteerError(f"--teacher-coeff must be 0 (the direction's own) or positive, got {args.teacher_coeff}")
    require_run_dir(args.run)
    if args.csv:
        check_out_file(args.csv)
    inputs = _evaluate_inputs(args, config)  # every input read and checked before the run is locked or written
    with locked(args.run, "safesteer evaluate"):
        _evaluate_command(args, config, inputs)


@dataclass
class _EvaluateInputs:
    """What ``evaluate`` reads besides the models, read and checked before anything is written."""

    direction: Any
    imported: Any  # the --direction to write into the run once the models load, or None
    students: list[tuple[str, str]]  # (table name, directory)
    extra: dict[str, Any]
    extra_files: dict[str, str]  # each benchmark's file, for messages
    mcq_sets: dict[str, Any]


def _evaluate_inputs(args: argparse.Namespace, config: Any) -> _EvaluateInputs:
    """What ``evaluate`` reads besides the models: the direction (imported or the run's), students, benchmarks, MCQ sets."""
    from pathlib import Path

    from safesteer_lens.capability import parse_mcq_specs
    from safesteer_lens.data import load_public_prompts
    from safesteer_lens.directions import load_direction
    from safesteer_lens.evaluate import check_counts
    from safesteer_lens.judges import check_judge

    imported = _checked_import(args)  # written into the run only once the models have loaded too
    direction = imported or load_direction(args.run)
    students = list(args.students or [])
    if not students and (Path(args.run) / "student").is_dir():
        students = [str(Path(args.run) / "student")]
    names = [Path(path).parent.name + "/" + Path(path).name for path in students]
    if len(set(names)) != len(names):
        raise SafeSteerError(f"two students would share a name ({', '.join(names)}); pass directories whose "
                             "parent/name differ, e.g. copy one elsewhere")
    extra, extra_files = {}, {}
    for spec in args.benchmark or []:
        name, _, path = spec.partition("=")
        if not path:
            raise SafeSteerError(f"--benchmark takes NAME=FILE (e.g. advbench=advbench.csv), got {spec!r}")
        extra[name], extra_files[name] = load_public_prompts(name, source=path), path
    mcq_sets = parse_mcq_specs(args.mcq or [], args.mcq_limit)
    if args.judge:
        check_judge(args.judge)
    check_counts(config)
    return _EvaluateInputs(direction, imported, list(zip(names, students)), extra, extra_files, mcq_sets)


def _evaluate_command(args: argparse.Namespace, config: Any, inputs: _EvaluateInputs) -> None:
    """``cmd_evaluate`` on the locked run directory, with its inputs checked: load, evaluate, then write."""
    from pathlib import Path

    from safesteer_lens.atomic import write_atomic
    from safesteer_lens.data import check_prompt_lengths
    from safesteer_lens.evaluate import Subject, evaluate_models
    from safesteer_lens.judges import load_judge
    from safesteer_lens.models import load_model
    from safesteer_lens.pipeline import write_evaluation

    direction = inputs.direction
    base = load_model(args.model or direction.model, device=args.device, dtype=args.dtype)
    for name, prompts in inputs.extra.items():
        check_prompt_lengths(base, prompts, config.max_new_tokens, inputs.extra_files[name])
    teacher_hooks = direction.hooks(base, coeff=args.teacher_coeff or None)  # checks the direction fits the model
    if inputs.imported is not None:
        _save_import(args, inputs.imported)
    subjects = [Subject("base", base), Subject("teacher", base, teacher_hooks)]
    for name, path in inputs.students:
        subjects.append(Subject(name, load_model(path, device=base.device)))
    judge = load_judge(args.judge, device=str(base.device)) if args.judge else None
    evaluation = evaluate_models(subjects, base, config, extra_sets=inputs.extra, judge=judge, mcq_sets=inputs.mcq_sets)
    _print_table(evaluation.table)
    out = Path(args.run)
    (out / "evaluate.json").unlink(missing_ok=True)  # first: a crash mid-write must not leave a valid stamp
    write_evaluation(out, evaluation)
    print(f"wrote {out}/results.csv, comparison.csv (one row per held-out prompt), mcq.csv and examples.json")
    if args.csv:
        write_atomic(args.csv, evaluation.table.to_csv)


def cmd_sweep(args: argparse.Namespace) -> None:
    """Train and evaluate a grid of settings x seeds from the run's direction and S."""
    from dataclasses import replace

    from safesteer_lens.distill import PRESETS
    from safesteer_lens.evaluate import DEMO_EVAL, check_counts
    from safesteer_lens.rundir import locked, require_run_dir
    from safesteer_lens.sweep import check_sweep_name, load_grid_file, parse_grid, run_sweep, trials

    check_sweep_name(args.name)
    if bool(args.grid) == bool(args.grid_file):
        raise SafeSteerError("give the grid either as --grid KEY=V1,V2 ... or as --grid-file FILE.json")
    grid = parse_grid(args.grid) if args.grid else load_grid_file(args.grid_file)
    eval_config = replace(DEMO_EVAL, n_harmful=args.n, n_harmless=args.n, max_new_tokens=args.max_new_tokens,
                          n_mcq=args.n_mcq, split=args.split, n_lookalike=args.n_lookalike, n_tasks=args.n_tasks)
    train_config = PRESETS[args.preset]
    if args.precision:
        train_config = replace(train_config, precision=args.precision)
    for trial in trials(grid):
        trial.config(train_config)  # every trial's settings checked before the import writes anything
    check_counts(eval_config)
    require_run_dir(args.run)
    with locked(args.run, "safesteer sweep"):
        _import_direction(args)
        table = run_sweep(args.run, grid, train_config, eval_config, keep_students=args.keep_students, name=args.name,
                          report_to=args.report_to)
    shown = [c for c in ("harmful_refusal", "tasks_refusal", "harmless_refusal", "lookalike_refusal", "lookalike_apology",
                         "harmless_degenerate", "mcq_acc", "pareto") if c in table]
    _print_table(table[[*grid, *shown]])
    print(f"wrote {args.run}/{args.name}/sweep.csv and sweep.html ({len(table) - 1} trials, evaluated on the {args.split} split)")


def _print_table(table: "object") -> None:
    """The results table without its interval columns (they are in results.csv and the report)."""
    import pandas

    shown = table[[c for c in table.columns if not c.endswith(("_low", "_high", "_n"))]]
    with pandas.option_context("display.width", 200, "display.max_columns", 30, "display.float_format", "{:.3f}".format):
        print(shown)


SHARD_HELP = (
    "under torchrun: none (data parallel, whole models), student (FSDP-shard the student's weights, "
    "gradients and AdamW states), all (shard the teacher too)"
)
LOW_MEMORY_HELP = (
    "with --shard: gather each layer at every sampled token instead of holding the whole student "
    "while sampling (several times slower, 4 bytes per parameter less)"
)
PRECISION_HELP = (
    "matmul dtype of sampling and scoring: auto (default: bfloat16 autocast where the device has native "
    "bf16, else float32), float32 or bfloat16; weights and AdamW stay float32"
)


LOSS_HELP = "the preset's by default; " + "; ".join(f"{loss.name}: {loss.help}" for loss in LOSS_REGISTRY.values())
REPORT_TO_HELP = (
    "also log every training step's metrics and the settings to: none (default; metrics.jsonl only), tensorboard "
    "(RUN/tensorboard) or wandb (RUN/wandb; set WANDB_MODE=offline on machines without network)"
)


def _add_study_set_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n-lookalike", type=int, default=DEMO_EVAL.n_lookalike,
                        help="also read this many look-alike harmless prompts of the split (kinds of trap in turn; "
                             f"each split has 100; default {DEMO_EVAL.n_lookalike}, 4 per kind; 0: none)")
    parser.add_argument("--n-tasks", type=int, default=DEMO_EVAL.n_tasks,
                        help="also read this many harmful prompts in public benchmarks' phrasing (categories in turn; "
                             f"each split has 52; default {DEMO_EVAL.n_tasks}, 2 per category; 0: none)")


def _add_direction_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--direction", default=None, metavar="FILE.gguf",
                        help="use this llama.cpp control vector as the run's direction (written into the run "
                             "directory as direction.safetensors/.json first)")


def _import_direction(args: argparse.Namespace) -> None:
    """With ``--direction FILE.gguf`` or ``--direction RUN``: check the direction, then make it the run's."""
    direction = _checked_import(args)
    if direction is not None:
        _save_import(args, direction)


def _checked_import(args: argparse.Namespace) -> Any:
    """The ``--direction`` to import, checked, or None without the flag; nothing is written.

    The direction is checked against the model it will steer (its width, its layer range,
    finite and non-zero) from the model's config alone, so a bad file fails before the run's
    own direction is touched.
    """
    if not getattr(args, "direction", None):
        return None
    from pathlib import Path

    from safesteer_lens.control_vectors import load_control_vector
    from safesteer_lens.directions import load_direction
    from safesteer_lens.models import model_shape

    source = Path(args.direction)
    direction = load_direction(source) if source.is_dir() else load_control_vector(source)
    if getattr(args, "model", None):
        direction.model = args.model  # the model the user steers, not the file's hint
    elif direction.model == "unknown":
        raise SafeSteerError(f"{args.direction} does not name its model; pass --model")
    try:
        direction.check_fits(*model_shape(direction.model), direction.model)
    except SafeSteerError as exc:
        raise SafeSteerError(f"{args.direction} cannot steer this run's model: {exc}") from None
    return direction


def _save_import(args: argparse.Namespace, direction: Any) -> None:
    direction.save(args.run)
    print(f"direction: {args.direction} -> {args.run}/direction.safetensors (layer {direction.layer}, "
          f"coeff {direction.coeff:g})")


def cmd_export_direction(args: argparse.Namespace) -> None:
    """Write the run's direction as a llama.cpp control vector."""
    from safesteer_lens.control_vectors import export_control_vector, tensor_name
    from safesteer_lens.directions import load_direction
    from safesteer_lens.steering import hook_name

    from safesteer_lens.rundir import check_out_file, locked, require_run_dir

    require_run_dir(args.run)
    check_out_file(args.out)
    with locked(args.run, "safesteer export-direction"):
        direction = load_direction(args.run)
        path = export_control_vector(direction, args.out, scale=args.scale, architecture=args.architecture)
    print(f"wrote {path}: {tensor_name(direction.layer)} = {args.scale * direction.coeff:g} x the direction "
          f"({hook_name(direction.layer)}); use it with llama.cpp's --control-vector {path}")


class _OneLineParser(argparse.ArgumentParser):
    """argparse with the toolkit's error form: ``error: ...`` on one line and exit status 2, no usage text.

    ``--help`` still prints the full usage; a mistyped flag says what is wrong and where to look.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message.splitlines()[0] if message else 'bad arguments'}; "
                     f"see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = _OneLineParser(
        prog="safesteer",
        description="SafeSteer on TransformerLens: steering directions, safety tokens and "
        "localized on-policy distillation.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="load a model and print its shape, device and load time")
    _add_model_args(info)
    info.set_defaults(func=cmd_info)

    chat = sub.add_parser("chat", help="greedy replies to prompts (a quick look at a model)")
    _add_model_args(chat)
    chat.add_argument("prompts", nargs="+", help="user messages")
    chat.add_argument("--max-new-tokens", type=int, default=48)
    chat.set_defaults(func=cmd_chat)

    direction = sub.add_parser("direction", help="stage 1: find the refusal direction and the teacher")
    _add_model_args(direction)
    direction.add_argument("--out", required=True, help="run directory to write the artifact into")
    direction.add_argument(
        "--method", choices=["auto", *DIRECTION_METHODS], default="auto",
        help="auto: contrastive when the model does not refuse yet, else diff-means; "
        + "; ".join(f"{m.name}: {m.help}" for m in DIRECTION_METHODS.values()),
    )
    direction.add_argument("--layers", default=None, help="layers to consider, e.g. 8-20 (default: all)")
    direction.add_argument("--n-train", type=int, default=64, help="prompts per class for the means")
    direction.add_argument("--n-val", type=int, default=24, help="prompts per class for scoring")
    direction.add_argument("--n-test", type=int, default=40, help="held-out prompts per class")
    direction.add_argument("--harmful", default=None, help="harmful prompts file (json/jsonl/csv/parquet; default: built-in)")
    direction.add_argument("--harmless", default=None, help="harmless prompts file (default: built-in)")
    direction.set_defaults(func=cmd_direction)

    tokens = sub.add_parser("tokens", help="stage 2: choose the safety tokens S (reads the direction)")
    tokens.add_argument("--run", "--run-dir", dest="run", required=True, help="run directory holding direction.safetensors/.json")
    tokens.add_argument("--model", default=None, help="default: the model named in direction.json")
    tokens.add_argument("--device", default=None)
    tokens.add_argument("--dtype", default=None)
    tokens.add_argument("--horizon", type=int, default=7, help="H: tokens per teacher rollout")
    tokens.add_argument("--samples", type=int, default=8, help="M: rollouts per prompt")
    tokens.add_argument("--n-prompts", type=int, default=32, help="harmless prompts (built-in train split)")
    tokens.add_argument("--top-k", type=_count_or_share, default=200,
                        help="K': tokens each position votes for, a count (200) or a share of the eligible tokens (0.05)")
    tokens.add_argument("--set-size", type=int, default=50, help="|S|")
    tokens.add_argument("--prob-floor", type=float, default=1e-4, help="minimum mean teacher probability")
    tokens.add_argument("--method", choices=["vote", "mean-delta"], default="vote")
    tokens.add_argument("--openers", type=int, default=0,
                        help="also add the N tokens the teacher makes likeliest at the reply's first position, "
                             "where a reply becomes a refusal ('I'); 0: the paper's S")
    tokens.add_argument("--seed", type=int, default=0)
    tokens.add_argument("--compare-horizon", type=int, default=1, help="H of the side-by-side set (0: skip)")
    _add_direction_arg(tokens)
    tokens.set_defaults(func=cmd_tokens)

    train = sub.add_parser("train", help="stage 3: distil the steered teacher into a student on S")
    train.add_argument("--run", "--run-dir", dest="run", required=True, help="run directory with the direction and safety tokens")
    train.add_argument("--preset", choices=list(PRESETS), default="demo")
    train.add_argument("--model", default=None, help="default: the model named in direction.json")
    train.add_argument("--device", default=None, help="where the student trains (default: cuda if available)")
    train.add_argument("--dtype", default=None)
    add_config_flags(train, TrainConfig, aliases={"samples_per_prompt": ["--samples"]},
                     choices={"loss": LOSS_REGISTRY, "anchor_loss": LOSS_REGISTRY, "precision": PRECISIONS,
                              "rollouts": ROLLOUT_ENGINES, "student_dtype": DTYPES},
                     helps={"loss": LOSS_HELP, "precision": PRECISION_HELP})
    train.add_argument("--resume", action="store_true",
                       help="continue from checkpoint.pt (with none yet, start again at step 0)")
    train.add_argument("--overwrite", action="store_true",
                       help="start a new run in a directory that holds one (its metrics and checkpoint are replaced; "
                            "student/ is replaced when the new run finishes)")
    train.add_argument("--teacher-device", default=None, help="put the frozen teacher on another device (e.g. cuda:1)")
    train.add_argument("--shard", choices=SHARDING, default="none", help=SHARD_HELP)
    train.add_argument("--low-memory-rollouts", action="store_true", help=LOW_MEMORY_HELP)
    train.add_argument("--report-to", choices=list(TRACKERS), default="none", help=REPORT_TO_HELP)
    _add_direction_arg(train)
    train.set_defaults(func=cmd_train)

    run = sub.add_parser("run", help="the whole job, stage by stage, skipping stages that are current")
    run.add_argument("--out", required=True, help="run directory")
    run.add_argument("--model", default=DEFAULT_MODEL)
    run.add_argument("--preset", choices=list(PRESETS), default="demo")
    run.add_argument("--rerun", nargs="*", choices=list(STAGES),
                     help="redo these stages (and what depends on them)")
    run.add_argument("--until", choices=list(STAGES), default=None,
                     help="stop after this stage (e.g. tokens: look at S, or sweep training settings, before training)")
    run.add_argument("--shard", choices=SHARDING, default="none", help=SHARD_HELP)
    run.add_argument("--low-memory-rollouts", action="store_true", help=LOW_MEMORY_HELP)
    run.add_argument("--precision", choices=PRECISIONS, default=None, help=PRECISION_HELP)
    run.add_argument("--judge", default=None, help="judge for the evaluation stage: NAME=PATH_OR_ID, e.g. llama-guard=DIR or qwen3guard=DIR")
    run.add_argument("--report-to", choices=list(TRACKERS), default="none", help=REPORT_TO_HELP)
    run.set_defaults(func=cmd_run)

    evaluate = sub.add_parser("evaluate", help="refusal, judge, coherence and capability table with 95%% intervals")
    evaluate.add_argument("--run", "--run-dir", dest="run", required=True, help="run directory (for the teacher)")
    evaluate.add_argument("--model", default=None)
    evaluate.add_argument("--device", default=None)
    evaluate.add_argument("--dtype", default=None)
    evaluate.add_argument("--students", nargs="*", help="student directories (default: RUN/student)")
    evaluate.add_argument("--benchmark", action="append", help="NAME=FILE, e.g. advbench=advbench.csv (repeatable)")
    evaluate.add_argument("--n", type=int, default=65, help="held-out prompts per class")
    evaluate.add_argument("--max-new-tokens", type=int, default=48, help="greedy reply length")
    _add_study_set_args(evaluate)
    evaluate.add_argument("--n-mcq", type=int, default=60,
                          help="shipped multiple-choice questions, subjects in turn (0: none; the test split has 180)")
    evaluate.add_argument("--split", choices=["val", "test"], default="test",
                          help="split of the held-out prompts and shipped questions (choose settings on val, report test)")
    evaluate.add_argument("--mcq", action="append",
                          help="public multiple-choice set NAME=FILE_OR_HUB_ID, NAME one of mmlu, mmlu-continuation, "
                               "arc-easy, arc-challenge, hellaswag (repeatable)")
    evaluate.add_argument("--mcq-limit", type=int, default=1000,
                          help="questions per public set, subjects in turn (MMLU has 14,042; default 1000)")
    evaluate.add_argument("--judge", default=None,
                          help="NAME=PATH_OR_ID, e.g. llama-guard=meta-llama/Llama-Guard-3-1B (also llama-guard-1b=, "
                               "llama-guard-8b=) or qwen3guard=Qwen/Qwen3Guard-Gen-0.6B (runs on a CPU; also judges "
                               "refusals; qwen3guard-loose= counts Controversial as safe)")
    evaluate.add_argument("--teacher-coeff", type=float, default=0.0,
                          help="the teacher row's coefficient: the one the students distilled (train --teacher-coeff; "
                               f"the demo preset's is {PRESETS['demo'].teacher_coeff:g}); 0: the direction's own")
    evaluate.add_argument("--csv", default=None, help="also write the table here")
    _add_direction_arg(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    sweep = sub.add_parser("sweep", help="train and evaluate a grid of training settings x seeds (resumable)")
    sweep.add_argument("--run", "--run-dir", dest="run", required=True, help="run directory with the direction and safety tokens")
    sweep.add_argument("--grid", nargs="+", help="KEY=V1,V2 ... over TrainConfig fields, e.g. lr=3e-5,1e-4 "
                                                 "loss=safesteer,safesteer-bounded seed=0,1,2")
    sweep.add_argument("--grid-file", default=None, help='the grid as JSON, e.g. {"lr": [3e-5, 1e-4], "seed": [0, 1, 2]}')
    sweep.add_argument("--preset", choices=list(PRESETS), default="demo", help="the training settings the grid overrides")
    sweep.add_argument("--precision", choices=PRECISIONS, default=None, help=PRECISION_HELP)
    sweep.add_argument("--split", choices=["val", "test"], default="val",
                       help="evaluation split: val (default) to choose settings; report the chosen ones on test")
    sweep.add_argument("--n", type=int, default=40, help="held-out prompts per class")
    _add_study_set_args(sweep)
    sweep.add_argument("--n-mcq", type=int, default=60, help="shipped questions (the val split has 60)")
    sweep.add_argument("--max-new-tokens", type=int, default=48)
    sweep.add_argument("--keep-students", action="store_true", help="keep each trial's weights and checkpoint")
    sweep.add_argument("--name", default="sweep", help="the sweep's directory under the run (one per study round)")
    sweep.add_argument("--report-to", choices=list(TRACKERS), default="none", help=REPORT_TO_HELP)
    _add_direction_arg(sweep)
    sweep.set_defaults(func=cmd_sweep)

    export = sub.add_parser("export-direction", help="write the run's direction for other tools (llama.cpp control vector)")
    export.add_argument("--run", "--run-dir", dest="run", required=True, help="run directory with direction.safetensors/.json")
    export.add_argument("--format", choices=["gguf"], default="gguf",
                        help="gguf: a llama.cpp control vector (direction.{L-1} holds coeff x vector; see control_vectors)")
    export.add_argument("--out", required=True, help="the file to write, e.g. refusal.gguf")
    export.add_argument("--scale", type=float, default=1.0,
                        help="factor on top of the teacher's coefficient (1: the teacher; llama.cpp can scale again "
                             "with --control-vector-scaled)")
    export.add_argument("--architecture", default=None,
                        help="the control vector's model_hint, llama.cpp's architecture name (default: read from the "
                             "config of the direction's model)")
    export.set_defaults(func=cmd_export_direction)
    return parser


def cli_reference() -> str:
    """Every command's help as Markdown: the text of ``docs/cli-reference.md``.

    Rendered at a fixed width, so the file only changes when a flag or its help does;
    ``tests/test_cli.py`` fails when the committed file is out of date. Regenerate it with
    ``python -m safesteer_lens.cli --reference > docs/cli-reference.md``.
    """
    import os
    from unittest import mock

    with mock.patch.dict(os.environ, {"COLUMNS": "100"}):
        parser = build_parser()
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        lines = ["# Command-line reference", "",
                 "Generated from the parser (`python -m safesteer_lens.cli --reference > docs/cli-reference.md`); "
                 "[cli.md](cli.md) is the guide.", "", "```", parser.format_help().rstrip(), "```"]
        for name, sub in commands.choices.items():
            lines += ["", f"## safesteer {name}", "", "```", sub.format_help().rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``safesteer`` console script."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed as one line)
        return exc.code if isinstance(exc.code, int) else 2
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except SafeSteerError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # the machine's, not the input's: a full or read-only disk while writing
        print(f"error: {disk_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def one_line(text: str) -> str:
    """A message as one line (a library's text quoted inside a message may carry newlines)."""
    return " ".join(text.split())


def disk_error(exc: OSError) -> str:
    """One line for an operating-system error while reading or writing: what happened, to which file, what to do."""
    where = f" {exc.filename}" if exc.filename else ""
    if exc.errno == errno.ENOSPC or exc.errno == errno.EDQUOT:
        return f"the disk is full (writing{where}); free some space and run the command again (training resumes with --resume)"
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write{where} ({exc.strerror}); choose a writable directory or fix its permissions"
    return f"{exc.strerror or type(exc).__name__}{':' + where if where else ''}; check the path and the disk"


if __name__ == "__main__":
    if sys.argv[1:] == ["--reference"]:
        print(cli_reference(), end="")
        sys.exit(0)
    sys.exit(main())
