"""Per-token HTML views: where the teacher and the base model disagree, token by token.

Each view is an :class:`HtmlView`: it renders inline in Jupyter (``_repr_html_``) and saves
as a standalone HTML file. Hovering a token shows the numbers behind its colour.

* :func:`contrast_view`: a prompt + completion, each token coloured by the contrastive
  log-probability ``log p_teacher - log p_base`` of the token that was actually written.
* :func:`mask_view`: for one rollout, which positions the distillation loss covers and how
  much probability mass the safety tokens S hold there under student, teacher and base.
* :func:`token_set_comparison`: two choices of S side by side (e.g. H = 1 versus H = 7).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from safesteer_lens.directions import Direction
from safesteer_lens.losses import safety_mass
from safesteer_lens.models import ChatModel
from safesteer_lens.tokens import SafetyTokens

_STYLE = """
<style>
.ssl-view{font-family:ui-monospace,Menlo,monospace;font-size:13px;line-height:1.9}
.ssl-view .tok{padding:1px 0;border-radius:2px;white-space:pre-wrap}
.ssl-view .prompt{opacity:.75}
.ssl-view .sep{display:inline-block;border-left:2px solid #444;height:1.2em;margin:0 4px;vertical-align:middle}
.ssl-view table{border-collapse:collapse;font-size:12px}
.ssl-view td,.ssl-view th{border:1px solid #ddd;padding:2px 5px;text-align:center;white-space:pre}
.ssl-view .legend{font-size:12px;color:#555;margin-bottom:6px}
.ssl-view.prose{font-family:inherit;font-size:14px;line-height:1.5}
.ssl-view .scroll{overflow-x:auto}
</style>
"""


@dataclass
class HtmlView:
    """A piece of HTML that shows in Jupyter and saves as a page."""

    title: str
    body: str
    prose: bool = False  # text and tables rather than tokens: the page's font, not monospace

    def _repr_html_(self) -> str:
        kind = "ssl-view prose" if self.prose else "ssl-view"
        return f"{_STYLE}<div class='{kind}'><h4>{html.escape(self.title)}</h4>{self.body}</div>"


def _colour(value: float, scale: float) -> str:
    """Red for positive, blue for negative, transparent at 0."""
    alpha = min(abs(value) / scale, 1.0) * 0.85
    rgb = "220,50,47" if value > 0 else "38,139,210"
    return f"rgba({rgb},{alpha:.2f})"


def _show(token: str) -> str:
    return html.escape(token.replace("\n", "⏎\n"))


@torch.no_grad()
def _sequence_log_probs(model: ChatModel, ids: Tensor, hooks: list) -> Float[Tensor, "pos vocab"]:
    with model.bridge.hooks(fwd_hooks=hooks):
        logits = model.bridge(ids.unsqueeze(0).to(model.device))
    return torch.log_softmax(logits[0].float(), -1).cpu()


def contrast_view(
    model: ChatModel,
    direction: Direction,
    prompt: str,
    completion: str | Sequence[int],
    top_n: int = 5,
) -> HtmlView:
    """Colour each token of prompt + completion by ``log p_teacher - log p_base`` of that token.

    Args:
        model: The base model (the teacher is it plus the direction's hook).
        direction: The stage-1 artifact.
        prompt: The user message.
        completion: The assistant's text, or its token ids.
        top_n: How many top tokens of each model the hover text lists.
    """
    prompt_ids = model.tokenizer(model.format_chat(prompt), add_special_tokens=False)["input_ids"]
    if isinstance(completion, str):
        completion_ids = model.tokenizer(completion, add_special_tokens=False)["input_ids"]
    else:
        completion_ids = [int(i) for i in completion]
    ids = torch.tensor(prompt_ids + completion_ids)
    teacher = _sequence_log_probs(model, ids, direction.hooks(model))
    base = _sequence_log_probs(model, ids, [])
    # position i is predicted by the logits at i - 1
    realised = ids[1:]
    t_lp = teacher[:-1].gather(1, realised[:, None])[:, 0]
    b_lp = base[:-1].gather(1, realised[:, None])[:, 0]
    delta = t_lp - b_lp
    scale = max(float(delta.abs().max()), 1e-6)
    decode = model.tokenizer.decode
    spans = [f"<span class='tok prompt' title='first token'>{_show(decode([int(ids[0])]))}</span>"]
    for i in range(1, len(ids)):
        j = i - 1
        top_t = ", ".join(repr(decode([int(k)])) for k in teacher[j].topk(top_n).indices)
        top_b = ", ".join(repr(decode([int(k)])) for k in base[j].topk(top_n).indices)
        tip = (
            f"delta {float(delta[j]):+.2f} nats\np_teacher {float(t_lp[j].exp()):.4f}   "
            f"p_base {float(b_lp[j].exp()):.4f}\nteacher top: {top_t}\nbase top: {top_b}"
        )
        if i == len(prompt_ids):
            spans.append("<span class='sep' title='completion starts'></span>")
        cls = "tok prompt" if i < len(prompt_ids) else "tok"
        spans.append(
            f"<span class='{cls}' style='background:{_colour(float(delta[j]), scale)}' "
            f"title='{html.escape(tip, quote=True)}'>{_show(decode([int(ids[i])]))}</span>"
        )
    legend = (
        f"<div class='legend'>red: the teacher makes this token more likely than the base; blue: "
        f"less likely (full colour = {scale:.2f} nats). Hover a token for probabilities and top tokens.</div>"
    )
    return HtmlView(f"Teacher vs base, token by token: {prompt[:60]}", legend + "".join(spans))


def mask_view(
    model: ChatModel,
    direction: Direction,
    tokens: SafetyTokens,
    prompt: str,
    completion_ids: Sequence[int],
    loss_mask: Sequence[bool],
    student: ChatModel | None = None,
) -> HtmlView:
    """Which completion positions the loss covers, and S's probability mass at each.

    Args:
        model: The base model (frozen; the teacher is it plus the hook).
        direction: The stage-1 artifact.
        tokens: The safety tokens S.
        prompt: The user message.
        completion_ids: The rollout's tokens.
        loss_mask: True where the loss counts (up to and including end of turn).
        student: The model being trained; None shows the base in its place (before training
            the student is the base).
    """
    prompt_ids = model.tokenizer(model.format_chat(prompt), add_special_tokens=False)["input_ids"]
    ids = torch.tensor(prompt_ids + [int(i) for i in completion_ids])
    p = len(prompt_ids)
    span = slice(p - 1, p - 1 + len(completion_ids))
    rows = {
        "student" + ("" if student is not None else " (= base)"): safety_mass(_sequence_log_probs(student or model, ids, [])[span], tokens.ids),
        "teacher": safety_mass(_sequence_log_probs(model, ids, direction.hooks(model))[span], tokens.ids),
        "base": safety_mass(_sequence_log_probs(model, ids, [])[span], tokens.ids),
    }
    decode = model.tokenizer.decode
    head = "".join(f"<th>{_show(decode([int(t)]))}</th>" for t in completion_ids)
    covered = "".join(
        f"<td style='background:{'#c8e6c9' if m else '#eee'}'>{'✓' if m else '·'}</td>" for m in loss_mask
    )
    body = [f"<tr><th>token</th>{head}</tr>", f"<tr><th>in loss</th>{covered}</tr>"]
    for name, mass in rows.items():
        cells = "".join(
            f"<td style='background:rgba(220,50,47,{min(float(v), 1.0) * 0.85:.2f})' title='{float(v):.4f}'>{float(v):.2f}</td>"
            for v in mass
        )
        body.append(f"<tr><th>S mass, {name}</th>{cells}</tr>")
    legend = f"<div class='legend'>|S| = {len(tokens)}. Cells: total probability of S at that position (darker = more).</div>"
    return HtmlView(f"Loss mask and S mass: {prompt[:60]}", legend + f"<table>{''.join(body)}</table>")


def token_set_comparison(
    sets: Sequence[SafetyTokens], labels: Sequence[str], limit: int = 50
) -> HtmlView:
    """Two or more choices of S side by side; tokens in every set are bold."""
    shared = set.intersection(*(set(s.ids) for s in sets)) if sets else set()
    head = "".join(f"<th>{html.escape(label)} (|S|={len(s)})</th>" for s, label in zip(sets, labels))
    rows = []
    for rank in range(min(limit, max((len(s) for s in sets), default=0))):
        cells = []
        for s in sets:
            if rank < len(s):
                t = s.tokens[rank]
                text = f"{_show(repr(t['text']))} <small>({t['votes']})</small>"
                cells.append(f"<td style='text-align:left'>{'<b>' + text + '</b>' if t['id'] in shared else text}</td>")
            else:
                cells.append("<td></td>")
        rows.append(f"<tr><td>{rank + 1}</td>{''.join(cells)}</tr>")
    legend = f"<div class='legend'>Rank, token and votes. Bold: in every set ({len(shared)} shared).</div>"
    return HtmlView("Safety tokens under different settings", legend + f"<table><tr><th>#</th>{head}</tr>{''.join(rows)}</table>")
