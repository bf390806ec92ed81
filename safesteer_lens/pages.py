"""The stage pages: a stage's figures and per-token views, one offline page each.

One page per stage in the run directory (``direction_report.html``, ``tokens_report.html``),
written by :func:`safesteer_lens.webpage.write_page` beside the run's shared ``plotly.min.js``.
Pages only present: they draw artifacts a stage computed and saved, and load no model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safesteer_lens.directions import Direction
from safesteer_lens.token_views import TokenViews
from safesteer_lens.tokens import SafetyTokens
from safesteer_lens.viz import direction_figures, probe_figure, safety_tokens_bar
from safesteer_lens.webpage import Item, write_page


def write_direction_report(direction: Direction, run_dir: str | Path, probes: Any | None = None) -> Path:
    """``direction_report.html``: probes per layer, score heatmaps, coefficient sweep, steered vs unsteered replies."""
    figures = list(direction_figures(direction).values())
    if probes is not None:
        figures.insert(0, probe_figure(probes, direction.layer))
    return write_page(
        figures,
        Path(run_dir) / "direction_report.html",
        f"Refusal direction for {direction.model}",
        assets=run_dir,
    )


def write_tokens_report(run_dir: str | Path, tokens: SafetyTokens | None = None) -> Path:
    """``tokens_report.html``: S by votes, S at another horizon, per-token views.

    It draws what the tokens stage saved (``safety_tokens.json`` and ``token_views.json``,
    see :func:`safesteer_lens.token_views.collect_token_views`) and runs no model.
    """
    tokens = tokens or SafetyTokens.load(run_dir)
    views = TokenViews.load(run_dir)
    items: list[Item] = [safety_tokens_bar(tokens), *views.items(tokens)]
    model = tokens.settings.get("model") or "the base model"
    return write_page(items, Path(run_dir) / "tokens_report.html", f"Safety tokens for {model}", assets=run_dir)
