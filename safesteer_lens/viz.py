"""Plotly figures for each stage, and a writer that bundles them into one HTML page.

Figures are plain ``plotly.graph_objects.Figure`` objects: they render inline in Jupyter;
:mod:`safesteer_lens.pages` bundles them into self-contained HTML pages.
"""

from __future__ import annotations

import html
from typing import Any, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from safesteer_lens.directions import Direction
from safesteer_lens.tokens import SafetyTokens


def direction_score_heatmaps(direction: Direction) -> go.Figure:
    """Layer x position heatmaps of the bypass, induce and KL scores of every candidate.

    The chosen candidate is outlined; candidates that failed the filters are still drawn, so
    the whole landscape is visible.
    """
    layers = sorted({row["layer"] for row in direction.scores})
    positions = sorted({row["position"] for row in direction.scores})
    labels = direction.settings.get("position_labels") or [str(p) for p in positions]
    x = [f"{p}: {label!r}" for p, label in zip(positions, labels)]
    lookup = {(r["layer"], r["position"]): r for r in direction.scores}
    titles = ("bypass (lower = ablation removes refusal)", "induce (higher = adding causes refusal)", "KL under ablation")
    fig = make_subplots(rows=1, cols=3, subplot_titles=titles, horizontal_spacing=0.08)
    for col, (key, scale) in enumerate((("bypass", "RdBu"), ("induce", "RdBu_r"), ("kl", "Viridis")), 1):
        z = [[lookup.get((layer, p), {}).get(key) for p in positions] for layer in layers]
        fig.add_trace(
            go.Heatmap(
                z=z, x=x, y=layers, colorscale=scale, showscale=False,
                hovertemplate=f"layer %{{y}}<br>position %{{x}}<br>{key} %{{z:.3f}}<extra></extra>",
            ),
            row=1, col=col,
        )
        fig.add_trace(
            go.Scatter(
                x=[x[positions.index(direction.position)]], y=[direction.layer], mode="markers",
                marker={"symbol": "square-open", "size": 16, "color": "black", "line": {"width": 3}},
                name="chosen", showlegend=col == 1,
            ),
            row=1, col=col,
        )
        fig.update_yaxes(title_text="layer" if col == 1 else None, row=1, col=col)
    fig.update_layout(
        title=f"Candidate refusal directions ({direction.method}) on {direction.model}: "
        f"chosen layer {direction.layer}, position {direction.position}",
        height=max(420, 18 * len(layers) + 160), width=1100,
    )
    return fig


def coefficient_sweep_figure(direction: Direction) -> go.Figure:
    """Refusal rates of greedy replies and next-token KL against the steering coefficient."""
    coeffs = [r["coeff"] for r in direction.sweep]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=coeffs, y=[r["harmful_refusal"] for r in direction.sweep], name="refusal, harmful prompts", mode="lines+markers"))
    fig.add_trace(go.Scatter(x=coeffs, y=[r["harmless_refusal"] for r in direction.sweep], name="refusal, harmless prompts", mode="lines+markers"))
    fig.add_trace(
        go.Scatter(x=coeffs, y=[r["kl"] for r in direction.sweep], name="KL on harmless (right)", mode="lines+markers", line={"dash": "dot"}),
        secondary_y=True,
    )
    fig.add_vline(x=direction.coeff, line_dash="dash", annotation_text=f"teacher coeff {direction.coeff:g}")
    fig.update_layout(title=f"Steering at layer {direction.layer}: refusal vs coefficient", xaxis_title="coefficient", height=420, width=800)
    fig.update_yaxes(title_text="refusal rate", range=[-0.02, 1.02], secondary_y=False)
    fig.update_yaxes(title_text="KL (nats)", secondary_y=True)
    return fig


def completions_table(rows: Sequence[dict[str, str]], columns: Sequence[str] = ("prompt", "base", "teacher")) -> go.Figure:
    """Side-by-side table of completions for the same prompts (e.g. unsteered vs steered)."""
    values = [[html.escape(str(row.get(c, ""))) for row in rows] for c in columns]
    fig = go.Figure(
        go.Table(
            columnwidth=[1.2] + [2] * (len(columns) - 1),
            header={"values": [f"<b>{c}</b>" for c in columns], "align": "left"},
            cells={"values": values, "align": "left", "height": 40},
        )
    )
    fig.update_layout(height=120 + 70 * len(rows), width=1100, margin={"t": 30, "b": 10})
    return fig


def direction_figures(direction: Direction) -> dict[str, go.Figure]:
    """All stage-1 figures, keyed by a short name."""
    figures = {"scores": direction_score_heatmaps(direction), "sweep": coefficient_sweep_figure(direction)}
    examples = direction.evaluation.get("examples", {})
    rows = [dict(r, prompt=f"[{kind}] {r['prompt']}") for kind in ("harmful", "harmless") for r in examples.get(kind, [])]
    if rows:
        figures["completions"] = completions_table(rows)
    return figures


def safety_tokens_bar(tokens: SafetyTokens, title: str | None = None) -> go.Figure:
    """Horizontal bar chart of the safety tokens by votes, most votes on top.

    Openers (``TokenConfig.openers``) joined S for the probability they gain at the reply's
    first position, not for votes, so their labels say so.
    """
    labels = [f"{i + 1}. {t['text']!r}" + (" (opener)" if t.get("opener") else "") for i, t in enumerate(tokens.tokens)]
    fig = go.Figure(
        go.Bar(
            x=[t["votes"] for t in tokens.tokens][::-1], y=labels[::-1], orientation="h",
            customdata=[[t["id"], t["mean_delta"]] for t in tokens.tokens][::-1],
            hovertemplate="%{y}<br>votes %{x}<br>id %{customdata[0]}<br>mean delta %{customdata[1]:.3f}<extra></extra>",
            marker={"color": [t["mean_delta"] for t in tokens.tokens][::-1], "colorscale": "Reds", "showscale": True,
                    "colorbar": {"title": "mean delta"}},
        )
    )
    settings = tokens.settings
    k_used = settings.get("top_k_votes_used", settings.get("top_k_votes"))
    eligible = f", {settings['n_allowed']} eligible" if "n_allowed" in settings else ""
    saturated = " <b>(saturated: votes cannot tell most eligible tokens apart)</b>" if settings.get("saturated") else ""
    fig.update_layout(
        title=title or f"Safety tokens S (|S| = {len(tokens)}, H = {settings.get('horizon')}, "
        f"K' = {k_used}{eligible}, {settings.get('n_valid_positions')} voting positions){saturated}",
        xaxis_title="votes", height=max(400, 16 * len(tokens) + 120), width=800,
        margin={"l": 160},
    )
    return fig


def probe_figure(probes: "Any", teacher_layer: int | None = None) -> go.Figure:
    """Held-out accuracy per layer of a linear probe and of the 1-D difference in means, with 95% bands."""
    fig = go.Figure()
    for column, name, colour in (("probe_acc", "linear probe", "#1f77b4"), ("diff_means_acc", "difference in means (1-D)", "#ff7f0e")):
        layers = list(probes.index)
        fig.add_trace(go.Scatter(x=layers + layers[::-1], y=list(probes[f"{column}_high"]) + list(probes[f"{column}_low"])[::-1],
                                 fill="toself", line={"width": 0}, fillcolor=colour, opacity=0.15, hoverinfo="skip",
                                 showlegend=False))
        fig.add_trace(go.Scatter(x=layers, y=probes[column], mode="lines+markers", name=name, line={"color": colour}))
    fig.add_hline(y=0.5, line={"dash": "dot", "color": "grey"}, annotation_text="chance")
    if teacher_layer is not None:
        fig.add_vline(x=teacher_layer, line={"dash": "dash", "color": "green"}, annotation_text="teacher's layer")
    fig.update_layout(title="Where the model tells harmful from harmless requests apart (held-out accuracy, 95% bands)",
                      xaxis_title="layer (resid_pre, last prompt token)", yaxis_title="accuracy", yaxis_range=[0.3, 1.02],
                      height=420, width=900)
    return fig
