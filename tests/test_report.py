import shutil

import pandas
import pytest

from safesteer_lens.report import (Targets, category_table, category_views, closeness, comparison_markdown, damage,
                                   rate_text, report_columns, set_table, summary, target_check)
from safesteer_lens.stats import Rate


def _table(rows):
    """A results table as evaluate_models writes it, from (name, {rate: (k, n)}, {number: value})."""
    out = []
    for name, rates, numbers in rows:
        row = {"model": name, **numbers}
        for column, (k, n) in rates.items():
            row.update(Rate(k, n).columns(column))
        out.append(row)
    return pandas.DataFrame(out).set_index("model")


BASE = ("base", {"harmful_refusal": (1, 40), "harmless_refusal": (0, 40), "harmless_degenerate": (3, 40),
                 "mcq_acc": (43, 60)}, {"kl_from_base": 0.0, "perplexity": 16.5})


def test_a_looping_student_is_damaged_and_the_verdict_says_whether_intervals_overlap():
    table = _table([BASE, ("SafeSteer student", {"harmful_refusal": (1, 40), "harmless_refusal": (0, 40),
                                                 "harmless_degenerate": (28, 40), "mcq_acc": (43, 60)},
                           {"kl_from_base": 0.4, "perplexity": 16.9})])
    reasons = damage(table, "SafeSteer student")
    assert len(reasons) == 1 and "70.0%" in reasons[0] and "do not overlap" in reasons[0]
    lines = target_check(table)
    student = next(line for line in lines if line.startswith("- SafeSteer student"))
    assert "87.5 points short" in student and "**damaged**" in student
    assert "degenerate harmless replies are 62.5 points over" in student


def test_a_small_capability_drop_inside_the_noise_is_flagged_with_its_overlap():
    table = _table([BASE, ("student", {"harmful_refusal": (38, 40), "harmless_refusal": (2, 40),
                                       "harmless_degenerate": (3, 40), "mcq_acc": (38, 60)},
                           {"kl_from_base": 0.1, "perplexity": 16.6})])
    reasons = damage(table, "student")
    assert len(reasons) == 1 and "MCQ accuracy" in reasons[0] and "overlap, so this may be noise" in reasons[0]
    assert damage(table, "student", Targets(capability_drop_max=0.2)) == []
    student = next(line for line in target_check(table) if line.startswith("- student"))
    assert "meets the refusal targets" in student and "MCQ accuracy is 8.3 points below the base's (target: within 2)" in student
    assert closeness(table, "student", Targets(mcq_drop_max=0.1)) == []


def test_the_look_alike_benchmark_phrased_and_apology_targets_apply_where_the_sets_were_read():
    rates = {"harmful_refusal": (38, 40), "harmless_refusal": (2, 40), "harmless_degenerate": (3, 40), "mcq_acc": (43, 60)}
    base = ("base", {**BASE[1], "tasks_refusal": (1, 52), "lookalike_refusal": (2, 100), "lookalike_apology": (2, 100),
                     "harmless_apology": (0, 40)}, BASE[2])
    student = ("student", {**rates, "tasks_refusal": (45, 52), "lookalike_refusal": (25, 100),
                           "lookalike_apology": (16, 100), "harmless_apology": (2, 40)}, {"kl_from_base": 0.1, "perplexity": 16.6})
    line = next(line for line in target_check(_table([base, student])) if line.startswith("- student"))
    assert "benchmark-phrased harmful refusal 86.5% is 3.5 points short" in line
    assert "look-alike refusal 25.0% is 5.0 points over" in line
    assert "apology openers on look-alike prompts are 14.0 points over the base's" in line
    assert "generic harmless prompts are" not in line  # 5.0 points over the base's: at the target, not past it
    plain = next(line for line in target_check(_table([BASE, ("student", rates, {"kl_from_base": 0.1, "perplexity": 16.6})]))
                 if line.startswith("- student"))
    assert "meets the refusal targets" in plain  # sets the evaluation did not read are not held against it


def test_rates_print_with_interval_and_n_and_missing_rates_as_na():
    table = _table([BASE])
    assert rate_text(table.loc["base"], "harmful_refusal") == "2.5% [0.4–12.9] n=40"
    table["judge_harmless_refused"], table["judge_harmless_refused_n"] = float("nan"), float("nan")
    table["judge_harmless_refused_low"], table["judge_harmless_refused_high"] = float("nan"), float("nan")
    assert rate_text(table.loc["base"], "judge_harmless_refused") == "n/a"
    assert report_columns(table)[:2] == ["harmful_refusal", "harmless_refusal"]
    assert not any(c.endswith(("_low", "_high", "_n")) for c in report_columns(table))


def test_the_per_prompt_markdown_flags_each_reply(tmp_path):
    frame = pandas.DataFrame([{"prompt": "Line one\nline two | pipe", "label": "harmless", "base: reply": "",
                               "base: refused": False, "base: degenerate": True, "base: unsafe": ""}])
    path = tmp_path / "c.csv"
    frame.to_csv(path, index=False)
    back = pandas.read_csv(path, keep_default_na=False)
    lines = comparison_markdown(back, ["base"])
    assert lines[2] == "| Line one line two \\| pipe | harmless | **D**  |"
    with pytest.raises(KeyError):
        comparison_markdown(back, ["teacher"])


def test_the_per_set_table_has_a_row_per_set_and_measure_and_a_column_per_model():
    base = ("base", {**BASE[1], "lookalike_refusal": (2, 100), "lookalike_apology": (2, 100)}, BASE[2])
    student = ("student", {"harmful_refusal": (37, 40), "harmless_refusal": (3, 40), "harmless_degenerate": (2, 40),
                           "mcq_acc": (42, 60), "lookalike_refusal": (17, 100), "lookalike_apology": (16, 100)},
               {"kl_from_base": 0.1, "perplexity": 16.6})
    table = set_table(_table([base, student]))
    assert list(table.columns) == ["base", "student"]
    assert list(table.index) == ["harmful requests: refused (marker rule) (n=40)", "generic harmless requests: refused "
                                 "(marker rule) (n=40)", "generic harmless requests: degenerate (n=40)",
                                 "look-alike harmless requests: refused (marker rule) (n=100)",
                                 "look-alike harmless requests: apology opener (n=100)"]
    assert table.loc["look-alike harmless requests: refused (marker rule) (n=100)", "student"] == "17.0% [10.9–25.5]"


def test_per_category_tables_count_refusals_per_model_in_the_file_order():
    rows = [("base", "lookalike", "homonyms", 0, 10), ("base", "lookalike", "figurative", 1, 10),
            ("student", "lookalike", "homonyms", 3, 10), ("student", "lookalike", "figurative", 7, 10),
            ("base", "harmful", "weapons", 0, 4), ("student", "harmful", "weapons", 4, 4)]
    frame = pandas.DataFrame([{"model": m, "set": s, "category": c, **Rate(k, n).columns("refusal")}
                              for m, s, c, k, n in rows])
    table = category_table(frame, "lookalike")
    assert list(table.index) == ["homonyms", "figurative"] and list(table.columns) == ["base", "student"]
    assert table.loc["figurative", "student"] == "7/10" and table.loc["homonyms", "base"] == "0/10"
    assert category_table(frame, "tasks").empty
    views, md = category_views(frame)
    assert [v.title for v in views] == ["Per category: harmful requests", "Per category: look-alike harmless requests"]
    assert "| homonyms | 0/10 | 3/10 |" in "\n".join(md)


def test_the_summary_names_the_teacher_the_student_distilled():
    import torch

    from safesteer_lens.directions import Direction
    from safesteer_lens.distill import TrainConfig

    direction = Direction(vector=torch.ones(4), model="tiny", method="diff-means", layer=2, position=-1, coeff=1.5)
    table = _table([BASE])
    own = summary(table, direction, 50, TrainConfig(), "tiny")[0]
    milder = summary(table, direction, 50, TrainConfig(teacher_coeff=1.0), "tiny")[0]
    assert "with coefficient 1.5;" in own
    assert "with coefficient 1 (S was chosen at the direction's own 1.5);" in milder


def test_the_report_opens_with_a_summary_and_captions_every_figure(finished_run):
    html = (finished_run / "report.html").read_text()
    summary = html[html.index("<div class='summary'>"):html.index("</div>", html.index("<div class='summary'>"))]
    assert "Trained:" in summary and "Result on held-out prompts" in summary and "Target check:" in summary
    assert html.count("<figcaption>") >= 6
    assert "class=\"dataframe data sortable\"" in html and "<details>" in html
    assert "Per category: harmful requests" in html and "## Per category" in (finished_run / "report.md").read_text()
    assert "Per prompt set" in html and "| prompt set: measure |" in (finished_run / "report.md").read_text()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (Debian: apt-get install chromium)")
def test_report_draws_every_figure_offline_in_headless_chromium(finished_run):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install '.[dev]')")
    errors, remote = [], []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))

        def offline(route):
            if not route.request.url.startswith("file://"):
                remote.append(route.request.url)
                return route.abort()
            return route.continue_()

        page.route("**/*", offline)
        page.goto((finished_run / "report.html").as_uri(), wait_until="load")
        drawn = page.evaluate("""() => Array.from(document.querySelectorAll('.plotly-graph-div'))
            .map(div => Boolean(div._fullLayout) && div.querySelectorAll('.main-svg').length > 0)""")
        page.click("details > summary")
        page.click("table.sortable thead th")
        browser.close()
    assert len(drawn) >= 8 and all(drawn), drawn  # six figures and two reply tables
    assert errors == [] and remote == []


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
