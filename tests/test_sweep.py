import json

import pandas
import pytest

from safesteer_lens.distill import TrainConfig
from safesteer_lens.errors import SafeSteerError
from safesteer_lens.evaluate import EvalConfig
from safesteer_lens.sweep import load_grid_file, load_trials, pareto_mask, parse_grid, run_sweep, sweep_figure, trials

TINY_TRAIN = TrainConfig(n_prompts=2, samples_per_prompt=2, max_new_tokens=4, sequences_per_step=4, micro_batch=2,
                         lr=3e-3, checkpoint_every=1, warmup_fraction=0.0)
TINY_EVAL = EvalConfig(n_harmful=2, n_harmless=2, max_new_tokens=4, n_kl_prompts=2, n_general=2, n_examples=1,
                       n_mcq=6, split="val")


def test_grid_values_are_typed_like_the_train_config():
    grid = parse_grid(["lr=3e-5,1e-4", "loss=safesteer,safesteer-bounded", "seed=0,1,2", "max-new-tokens=12"])
    assert grid == {"lr": [3e-5, 1e-4], "loss": ["safesteer", "safesteer-bounded"], "seed": [0, 1, 2], "max_new_tokens": [12]}
    points = trials(grid)
    assert len(points) == 12 and points[0].label == "lr=3e-05_loss=safesteer_seed=0_max_new_tokens=12"
    assert points[1].label.endswith("seed=1_max_new_tokens=12")  # the last setting but one varies before it


def test_a_flag_is_read_by_name_not_by_bool():
    assert parse_grid(["mix_categories=false,true"]) == {"mix_categories": [False, True]}
    assert parse_grid(["mix-categories=0,Yes"]) == {"mix_categories": [False, True]}


@pytest.mark.parametrize("specs,message", [
    (["mix_categories=maybe"], "mix_categories takes true or false"),
    (["learning_rate=1e-4"], "unknown setting"),
    (["seed=zero"], "seed takes a int"),
    (["lr=inf"], "finite"),
    (["seed=0", "seed=1"], "give each setting once"),
    ([], "empty grid"),
])
def test_bad_grids_are_one_line_errors(specs, message):
    with pytest.raises(SafeSteerError, match=message):
        parse_grid(specs)


def test_a_trial_with_impossible_settings_is_rejected_before_anything_runs(tiny, run_dir):
    with pytest.raises(SafeSteerError, match="unknown loss"):
        run_sweep(run_dir, parse_grid(["loss=nope"]), TINY_TRAIN, TINY_EVAL, model=tiny, progress=False)
    assert not (run_dir / "sweep").exists()


def test_grid_file(tmp_path):
    path = tmp_path / "grid.json"
    path.write_text(json.dumps({"lr": [1e-4], "seed": [0, 1]}))
    assert load_grid_file(path) == {"lr": [1e-4], "seed": [0, 1]}
    path.write_text("[1, 2]")
    with pytest.raises(SafeSteerError, match="non-empty list"):
        load_grid_file(path)


def test_pareto_frontier():
    table = pandas.DataFrame({"harmful_refusal": [0.9, 0.8, 0.9, 0.5], "harmless_refusal": [0.2, 0.1, 0.3, 0.4]})
    assert pareto_mask(table) == [True, True, False, False]


def test_the_frontier_and_its_figure_take_any_pair_of_rates():
    rates = {"harmful_refusal": [0.0, 0.9, 0.9], "harmless_refusal": [0.0, 0.1, 0.1],
             "tasks_refusal": [0.0, 0.6, 0.8], "lookalike_refusal": [0.0, 0.3, 0.2]}
    table = pandas.DataFrame({**rates, **{f"{k}_{end}": v for k, v in rates.items() for end in ("low", "high")}},
                             index=["base", "a", "b"])
    assert pareto_mask(table.drop(index="base"), "lookalike_refusal", "tasks_refusal") == [False, True]
    figure = sweep_figure(table, "lookalike_refusal", "tasks_refusal", target=(0.2, 0.9))
    assert list(figure.data[1].x) == [0.2] and figure.layout.xaxis.title.text == "look-alike harmless prompts refused"
    assert figure.layout.shapes[0].x1 == 0.2
    with pytest.raises(SafeSteerError, match="no 'mcq_refusal' column"):
        sweep_figure(table, "mcq_refusal")


def test_a_sweep_trains_evaluates_and_skips_what_is_done(tiny, run_dir):
    grid = parse_grid(["lr=1e-3,3e-3", "loss=safesteer-bounded"])
    table = run_sweep(run_dir, grid, TINY_TRAIN, TINY_EVAL, model=tiny, progress=False)
    assert list(table.index) == ["base", "lr=0.001_loss=safesteer-bounded", "lr=0.003_loss=safesteer-bounded"]
    assert {"harmful_refusal_low", "harmless_degenerate", "mcq_acc", "pareto", "lr"} <= set(table.columns)
    assert table.loc["base", "harmful_refusal_n"] == 2
    sweep = run_dir / "sweep"
    assert (sweep / "sweep.csv").is_file() and (sweep / "sweep.html").is_file()
    (trial,) = sweep.glob("lr=0.001_loss=safesteer-bounded-*")  # the settings plus a hash of them
    assert (trial / "metrics.jsonl").is_file() and not (trial / "student").exists() and not (trial / "checkpoint.pt").exists()
    stamp = (trial / "trial.json").stat().st_mtime_ns
    again = run_sweep(run_dir, grid, TINY_TRAIN, TINY_EVAL, model=tiny, progress=False)
    assert (trial / "trial.json").stat().st_mtime_ns == stamp  # done: skipped, not retrained
    pandas.testing.assert_frame_equal(again, pandas.read_csv(sweep / "sweep.csv", index_col="trial"), check_dtype=False)
    figure = sweep_figure(again)
    assert [t.name for t in figure.data] == ["trials", "Pareto frontier", "base"]


def test_re_split_shipped_prompts_make_a_finished_trial_run_again(tiny, run_dir, monkeypatch):
    import safesteer_lens.sweep as sweep_module

    grid = parse_grid(["lr=1e-3"])
    run_sweep(run_dir, grid, TINY_TRAIN, TINY_EVAL, model=tiny, progress=False)
    (record,) = (run_dir / "sweep").glob("lr=0.001-*/trial.json")
    stamp = record.stat().st_mtime_ns
    monkeypatch.setattr(sweep_module, "builtin_data_digest", lambda *names: "re-split")
    run_sweep(run_dir, grid, TINY_TRAIN, TINY_EVAL, model=tiny, progress=False)
    assert record.stat().st_mtime_ns != stamp  # its validation prompts changed, so its row would be stale


def test_the_cli_sweep_needs_exactly_one_grid(run_dir, capsys):
    from safesteer_lens.cli import main

    assert main(["sweep", "--run", str(run_dir)]) == 2
    assert "--grid" in capsys.readouterr().err


def test_the_cli_sweep_trains_and_prints_the_grid(run_dir, capsys):
    from safesteer_lens.cli import main

    assert main(["sweep", "--run", str(run_dir), "--grid", "n_prompts=4", "max_new_tokens=3", "task_prompts=0", "--n", "2",
                 "--n-mcq", "6", "--max-new-tokens", "4", "--n-lookalike", "10", "--n-tasks", "13"]) == 0
    out = capsys.readouterr().out
    assert "n_prompts=4_max_new_tokens=3_task_prompts=0" in out and "1 trials, evaluated on the val split" in out
    assert (run_dir / "sweep" / "sweep.csv").is_file()


def test_named_sweeps_keep_their_own_tables_and_load_trials_joins_them(tiny, run_dir):
    run_sweep(run_dir, parse_grid(["lr=1e-3"]), TINY_TRAIN, TINY_EVAL, model=tiny, progress=False, name="round-1")
    run_sweep(run_dir, parse_grid(["anchor_weight=0.5"]), TINY_TRAIN, TINY_EVAL, model=tiny, progress=False, name="round-2")
    assert len(pandas.read_csv(run_dir / "round-1" / "sweep.csv")) == 2  # base and its own trial only
    table = load_trials(run_dir, ["round-1", "round-2"])
    assert list(table.index) == ["base", "round-1/lr=0.001", "round-2/anchor_weight=0.5"]
    assert table.loc["round-2/anchor_weight=0.5", "anchor_weight"] == 0.5 and pandas.isna(table.loc["round-1/lr=0.001", "anchor_weight"])
    assert table["pareto"].dtype == bool
    with pytest.raises(SafeSteerError, match="one plain directory name"):
        run_sweep(run_dir, parse_grid(["lr=1e-3"]), TINY_TRAIN, TINY_EVAL, model=tiny, progress=False, name="../elsewhere")
    with pytest.raises(SafeSteerError, match="does not exist"):
        load_trials(run_dir, ["round-3"])


def test_a_sweep_that_has_not_finished_anything_yet_is_a_one_line_error(tmp_path):
    (tmp_path / "started" / "lr=0.001_seed=0").mkdir(parents=True)  # a trial still training: no trial.json
    with pytest.raises(SafeSteerError, match="has finished a trial or its base row yet"):
        load_trials(tmp_path, ["started"])


@pytest.mark.parametrize("text", ['{"key": "abc", "row": {"harmful', '{"key": "abc"}', "[]"])
def test_a_damaged_trial_record_is_a_one_line_error(tmp_path, text):
    trial = tmp_path / "sweep" / "lr=0.001_seed=0"
    trial.mkdir(parents=True)
    (trial / "trial.json").write_text(text)
    with pytest.raises(SafeSteerError, match=r"trial.json .*safesteer sweep --run") as info:
        load_trials(tmp_path)
    assert "\n" not in str(info.value)


def test_a_new_safety_token_set_makes_a_finished_trial_run_again(tiny, run_dir):
    """A trial trains from the run's direction and S, so its stamp holds their digests, as the pipeline's stages do."""
    import json

    grid = parse_grid(["lr=1e-3"])
    run_sweep(run_dir, grid, TINY_TRAIN, TINY_EVAL, model=tiny, progress=False)
    (record,) = (run_dir / "sweep").glob("lr=0.001-*/trial.json")
    stamp = record.stat().st_mtime_ns
    run_sweep(run_dir, grid, TINY_TRAIN, TINY_EVAL, model=tiny, progress=False)
    assert record.stat().st_mtime_ns == stamp  # nothing changed: skipped
    tokens = json.loads((run_dir / "safety_tokens.json").read_text())
    tokens["tokens"] = tokens["tokens"][:-5]
    (run_dir / "safety_tokens.json").write_text(json.dumps(tokens))
    run_sweep(run_dir, grid, TINY_TRAIN, TINY_EVAL, model=tiny, progress=False)
    assert record.stat().st_mtime_ns != stamp
    assert json.loads((record.parent / "safety_tokens.json").read_text())["tokens"] == tokens["tokens"]  # trained on the new S
