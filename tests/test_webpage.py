"""Offline pages: one shared plotly.min.js, relative script paths, no remote references anywhere."""

from __future__ import annotations

import re
from pathlib import Path

import pandas
import plotly.graph_objects as go

from safesteer_lens.token_views import HtmlView
from safesteer_lens.webpage import PLOTLY_JS, Captioned, data_table, script_src, write_figure, write_page

# A script, stylesheet or frame loaded from another host: a page with one opens blank offline.
REMOTE = re.compile(r"""<(?:script|link|iframe|img)[^>]+(?:src|href)\s*=\s*["']?(?:https?:)?//""", re.IGNORECASE)


def _figure() -> go.Figure:
    return go.Figure(go.Scatter(x=[0, 1], y=[1, 0])).update_layout(title="a line")


def test_pages_share_one_plotly_js_by_a_relative_path(tmp_path):
    page = write_page([Captioned(_figure(), "under <the> line"), HtmlView("view", "<b>x</b>")], tmp_path / "page.html", "T")
    figure = write_figure(_figure(), tmp_path / "figures" / "line.html", assets=tmp_path)
    text, figure_text = page.read_text(), figure.read_text()
    assert "<script src='plotly.min.js'>" in text and "<script src='../plotly.min.js'>" in figure_text
    assert sorted(p.name for p in tmp_path.rglob(PLOTLY_JS)) == [PLOTLY_JS]  # one copy, in the assets directory
    assert (tmp_path / PLOTLY_JS).stat().st_size > 1_000_000  # the whole library, not a loader stub
    assert "<figcaption>under &lt;the&gt; line</figcaption>" in text
    assert not REMOTE.search(text) and not REMOTE.search(figure_text)


def test_the_library_is_written_once_and_left_alone_while_current(tmp_path):
    write_page([_figure()], tmp_path / "a.html", "A")
    before = (tmp_path / PLOTLY_JS).stat().st_mtime_ns
    write_page([_figure()], tmp_path / "b.html", "B")
    assert (tmp_path / PLOTLY_JS).stat().st_mtime_ns == before
    (tmp_path / PLOTLY_JS).write_text("stale")
    write_page([_figure()], tmp_path / "b.html", "B")
    assert (tmp_path / PLOTLY_JS).stat().st_size > 1_000_000


def test_script_src_is_relative_from_any_depth(tmp_path):
    assert script_src(tmp_path / "x.html", tmp_path) == PLOTLY_JS
    assert script_src(tmp_path / "a" / "b" / "x.html", tmp_path) == f"../../{PLOTLY_JS}"


def test_data_tables_escape_cells_and_can_be_sortable():
    html = data_table(pandas.DataFrame({"reply": ["<script>x</script>"]}), sortable=True)
    assert "sortable" in html and "&lt;script&gt;" in html and "<script>" not in html


def test_no_page_of_a_finished_run_references_the_network(finished_run: Path):
    pages = sorted(finished_run.rglob("*.html"))
    names = {p.relative_to(finished_run).as_posix() for p in pages}
    assert {"report.html", "direction_report.html", "tokens_report.html", "figures/training_curves.html"} <= names
    for page in pages:
        text = page.read_text()
        assert not REMOTE.search(text), page
        for src in re.findall(r"<script src='([^']+)'>", text):
            assert (page.parent / src).resolve() == (finished_run / PLOTLY_JS).resolve(), (page, src)
