"""HTML pages that open offline: figures, views and tables with one shared plotly.js.

Every page the toolkit writes (the stage pages, ``report.html``, ``figures/*.html``, a sweep's
``sweep.html``) renders with no network, which is the default setting of the machines this
toolkit runs on. Plotly's library is written once, as ``plotly.min.js`` in the run directory
(the *assets* directory), and each page loads it by a relative path. Inlining it instead would
copy the same 4.8 MB into each of a run's ten or more pages; the cost of sharing is that a page
copied out of its run directory needs ``plotly.min.js`` copied beside the path it names.

A page is a list of items: a plotly figure, an :class:`~safesteer_lens.token_views.HtmlView`,
or either wrapped in :class:`Captioned` to put a sentence under it.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import plotly.graph_objects as go
import plotly.offline

from safesteer_lens.atomic import write_text_atomic
from safesteer_lens.token_views import HtmlView

PLOTLY_JS = "plotly.min.js"

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1180px;margin:24px auto;padding:0 18px;
     color:#1d2329;line-height:1.5}
h1{font-size:1.6em;margin-bottom:.2em}
h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #e3e6ea;padding-bottom:.2em}
.summary{background:#f5f7fa;border-left:4px solid #3b7dd8;padding:10px 16px;margin:14px 0}
.summary li{margin:.2em 0}
figure{margin:18px 0 26px 0}
figcaption{color:#4a5560;font-size:.92em;max-width:900px;margin-top:4px}
table.data{border-collapse:collapse;font-size:13px;margin:8px 0}
table.data th,table.data td{border:1px solid #dde1e6;padding:4px 8px;text-align:left;vertical-align:top}
table.data th{background:#eef1f5;position:sticky;top:0}
table.sortable th{cursor:pointer;user-select:none}
table.sortable th:after{content:" \\2195";color:#9aa4ae}
table.data tr:nth-child(even) td{background:#fafbfc}
details>summary{cursor:pointer;font-weight:600;margin:6px 0}
.ok{color:#1a7f37}.miss{color:#b42318}
"""

# Click a header of a `table.sortable` to sort by that column (numbers numerically), again to reverse.
SORT_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("thead th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var body = table.tBodies[0], rows = Array.from(body.rows), up = th.dataset.order !== "up";
      rows.sort(function (a, b) {
        var x = a.cells[col].innerText, y = b.cells[col].innerText, nx = parseFloat(x), ny = parseFloat(y);
        var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
        return up ? c : -c;
      });
      th.dataset.order = up ? "up" : "down";
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


@dataclass(frozen=True)
class Captioned:
    """An item with a caption under it, saying what to read in it.

    Attributes:
        item: A plotly figure or an HtmlView.
        caption: One or two plain sentences (escaped when written).
    """

    item: Union[go.Figure, HtmlView]
    caption: str


Item = Union[go.Figure, HtmlView, Captioned]


_checked: dict[Path, tuple[int, int]] = {}  # plotly.min.js files this process wrote or compared: (mtime, size)


def write_plotly_js(assets: str | Path) -> Path:
    """Write plotly's library as ``assets/plotly.min.js`` unless the same version is there already.

    A run writes ten or more pages into one directory; the 4.8 MB comparison is made once per
    file and process, and again only if its time or size changed since.
    """
    path = Path(assets) / PLOTLY_JS
    if path.is_file() and _checked.get(path.absolute()) == (path.stat().st_mtime_ns, path.stat().st_size):
        return path
    code = plotly.offline.get_plotlyjs()
    if not path.is_file() or path.stat().st_size != len(code.encode()) or path.read_text() != code:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, code)
    _checked[path.absolute()] = (path.stat().st_mtime_ns, path.stat().st_size)
    return path


def script_src(page: str | Path, assets: str | Path) -> str:
    """The relative URL from a page to the shared ``plotly.min.js`` (forward slashes on every OS)."""
    return Path(os.path.relpath(Path(assets) / PLOTLY_JS, Path(page).parent)).as_posix()


def _item_html(item: Item) -> str:
    caption = ""
    if isinstance(item, Captioned):
        caption = f"<figcaption>{html.escape(item.caption)}</figcaption>"
        item = item.item
    body = item.to_html(full_html=False, include_plotlyjs=False) if isinstance(item, go.Figure) else item._repr_html_()
    return f"<figure>{body}{caption}</figure>"


def page_html(items: Sequence[Item], title: str, plotly_src: str, intro: str = "") -> str:
    """A whole page as text: the stylesheet, a title, an optional intro (trusted HTML), the items."""
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style><script src='{html.escape(plotly_src)}'></script></head>"
        f"<body><h1>{html.escape(title)}</h1>{intro}{''.join(_item_html(i) for i in items)}"
        f"<script>{SORT_SCRIPT}</script></body></html>"
    )


def write_page(items: Sequence[Item], path: str | Path, title: str, assets: str | Path | None = None,
               intro: str = "") -> Path:
    """Write figures and views into one page that opens offline (atomically).

    Args:
        items: What the page shows, top to bottom.
        path: The page's file.
        title: Its ``<title>`` and heading.
        assets: The directory that holds the shared ``plotly.min.js`` (the run directory);
            default: the page's own directory.
        intro: HTML put under the heading (the caller escapes what it interpolates).
    """
    path = Path(path)
    assets = Path(assets) if assets is not None else path.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    write_plotly_js(assets)
    return write_text_atomic(path, page_html(items, title, script_src(path, assets), intro))


def write_figure(fig: go.Figure, path: str | Path, assets: str | Path) -> Path:
    """One figure as its own offline page (``figures/<name>.html``), titled by the figure's title."""
    title = fig.layout.title.text or Path(path).stem
    return write_page([fig], path, title, assets)


def data_table(frame: Any, sortable: bool = False, index: bool = False) -> str:
    """A pandas DataFrame as an HTML table in the pages' style, optionally sortable by header clicks."""
    return frame.to_html(index=index, classes="data sortable" if sortable else "data", border=0, escape=True)
