"""Per-token HTML views: where the teacher and the base model disagree, token by token.

Each view is an :class:`HtmlView`: it renders inline in Jupyter (``_repr_html_``) and saves
as a standalone HTML file. Hovering a token shows the numbers behind its colour.

* :func:`contrast_view`: a prompt + completion, each token coloured by the contrastive
  log-probability ``log p_teacher - log p_base`` of the token that was actually written.
* :func:`mask_view`: for one rollout, which positions the distillation loss covers and how
  much probability mass the safety tokens S hold there under student, teacher and base.
* :func:`token_set_comparison`: two choices of S side by side (e.g. H = 1 versus H = 7).

Each view that needs a model is two steps: ``token_contrast`` / ``token_masses`` run the
models and return plain data, and ``render_contrast`` / ``render_masses`` draw it. The tokens
stage saves that data as :class:`TokenViews` (``token_views.json``), so the tokens page is
drawn from the run directory without loading a model.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from safesteer_lens.atomic import write_text_atomic
from safesteer_lens.data import load_builtin_prompts, prompt_texts
from safesteer_lens.directions import Direction
from safesteer_lens.generation import FwdHook, generate
from safesteer_lens.losses import safety_mass
from safesteer_lens.models import ChatModel
from safesteer_lens.rundir import artifact_error, read_json
from safesteer_lens.scoring import single_completion, teacher_forced_log_probs
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


def _chat_ids(model: ChatModel, prompt: str) -> list[int]:
    return model.tokenizer(model.format_chat(prompt), add_special_tokens=False)["input_ids"]


@dataclass
class TokenContrast:
    """What :func:`contrast_view` shows, without the model: computed once, saved, drawn later.

    Attributes:
        prompt: The user message.
        tokens: Decoded tokens of the chat-formatted prompt followed by the completion.
        n_prompt: How many of ``tokens`` are the prompt.
        teacher_lp: ``log p_teacher`` of each token after the first (``len(tokens) - 1``).
        base_lp: ``log p_base`` of the same tokens.
        teacher_top: The teacher's ``top_n`` tokens at each of those positions.
        base_top: The base's.
    """

    prompt: str
    tokens: list[str]
    n_prompt: int
    teacher_lp: list[float]
    base_lp: list[float]
    teacher_top: list[list[str]]
    base_top: list[list[str]]


@dataclass
class TokenMasses:
    """What :func:`mask_view` shows, without the model.

    Attributes:
        prompt: The user message.
        tokens: Decoded completion tokens.
        loss_mask: True where the distillation loss counts.
        masses: Row label -> S's probability mass at each completion position.
        set_size: |S|.
    """

    prompt: str
    tokens: list[str]
    loss_mask: list[bool]
    masses: dict[str, list[float]]
    set_size: int


def token_contrast(
    model: ChatModel,
    direction: Direction,
    prompt: str,
    completion: str | Sequence[int],
    top_n: int = 5,
) -> TokenContrast:
    """Teacher and base log-probs of each token of prompt + completion (see :func:`contrast_view`)."""
    prompt_ids = _chat_ids(model, prompt)
    if isinstance(completion, str):
        completion_ids = model.tokenizer(completion, add_special_tokens=False)["input_ids"]
    else:
        completion_ids = [int(i) for i in completion]
    ids = torch.tensor(prompt_ids + completion_ids)
    every_token = single_completion(ids, n_prompt=1)  # score every position, the prompt's too
    teacher = teacher_forced_log_probs(model, every_token, direction.hooks(model))[0]
    base = teacher_forced_log_probs(model, every_token)[0]
    realised = ids[1:, None]
    decode = model.tokenizer.decode

    def top(logp: Tensor) -> list[list[str]]:
        return [[decode([int(k)]) for k in row] for row in logp.topk(top_n, dim=-1).indices]

    return TokenContrast(
        prompt=prompt,
        tokens=[decode([int(i)]) for i in ids],
        n_prompt=len(prompt_ids),
        teacher_lp=teacher.gather(1, realised)[:, 0].tolist(),
        base_lp=base.gather(1, realised)[:, 0].tolist(),
        teacher_top=top(teacher),
        base_top=top(base),
    )


def token_masses(
    model: ChatModel,
    direction: Direction,
    tokens: SafetyTokens,
    prompt: str,
    completion_ids: Sequence[int],
    loss_mask: Sequence[bool],
    student: ChatModel | None = None,
) -> TokenMasses:
    """S's probability mass at each completion position under student, teacher and base (see :func:`mask_view`)."""
    prompt_ids = _chat_ids(model, prompt)
    completion = single_completion(torch.tensor(prompt_ids + [int(i) for i in completion_ids]), len(prompt_ids))

    def mass(scorer: ChatModel, hooks: Sequence[FwdHook] = ()) -> list[float]:
        return safety_mass(teacher_forced_log_probs(scorer, completion, hooks)[0], tokens.ids).tolist()

    masses = {
        "student" + ("" if student is not None else " (= base)"): mass(student or model),
        "teacher": mass(model, direction.hooks(model)),
        "base": mass(model),
    }
    decode = model.tokenizer.decode
    return TokenMasses(prompt, [decode([int(t)]) for t in completion_ids], [bool(m) for m in loss_mask], masses,
                       len(tokens))


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
    return render_contrast(token_contrast(model, direction, prompt, completion, top_n))


def render_contrast(contrast: TokenContrast) -> HtmlView:
    """Draw a :class:`TokenContrast` (no model needed)."""
    delta = [t - b for t, b in zip(contrast.teacher_lp, contrast.base_lp)]
    scale = max(max((abs(d) for d in delta), default=0.0), 1e-6)
    spans = [f"<span class='tok prompt' title='first token'>{_show(contrast.tokens[0])}</span>"]
    for i in range(1, len(contrast.tokens)):
        j = i - 1  # position i is predicted by the logits at i - 1
        tip = (
            f"delta {delta[j]:+.2f} nats\np_teacher {math.exp(contrast.teacher_lp[j]):.4f}   "
            f"p_base {math.exp(contrast.base_lp[j]):.4f}\nteacher top: {', '.join(map(repr, contrast.teacher_top[j]))}"
            f"\nbase top: {', '.join(map(repr, contrast.base_top[j]))}"
        )
        if i == contrast.n_prompt:
            spans.append("<span class='sep' title='completion starts'></span>")
        cls = "tok prompt" if i < contrast.n_prompt else "tok"
        spans.append(
            f"<span class='{cls}' style='background:{_colour(delta[j], scale)}' "
            f"title='{html.escape(tip, quote=True)}'>{_show(contrast.tokens[i])}</span>"
        )
    legend = (
        f"<div class='legend'>red: the teacher makes this token more likely than the base; blue: "
        f"less likely (full colour = {scale:.2f} nats). Hover a token for probabilities and top tokens.</div>"
    )
    return HtmlView(f"Teacher vs base, token by token: {contrast.prompt[:60]}", legend + "".join(spans))


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
    return render_masses(token_masses(model, direction, tokens, prompt, completion_ids, loss_mask, student))


def render_masses(masses: TokenMasses) -> HtmlView:
    """Draw a :class:`TokenMasses` (no model needed)."""
    head = "".join(f"<th>{_show(t)}</th>" for t in masses.tokens)
    covered = "".join(
        f"<td style='background:{'#c8e6c9' if m else '#eee'}'>{'✓' if m else '·'}</td>" for m in masses.loss_mask
    )
    body = [f"<tr><th>token</th>{head}</tr>", f"<tr><th>in loss</th>{covered}</tr>"]
    for name, mass in masses.masses.items():
        cells = "".join(
            f"<td style='background:rgba(220,50,47,{min(v, 1.0) * 0.85:.2f})' title='{v:.4f}'>{v:.2f}</td>"
            for v in mass
        )
        body.append(f"<tr><th>S mass, {name}</th>{cells}</tr>")
    legend = (f"<div class='legend'>|S| = {masses.set_size}. Cells: total probability of S at that position "
              "(darker = more).</div>")
    return HtmlView(f"Loss mask and S mass: {masses.prompt[:60]}", legend + f"<table>{''.join(body)}</table>")


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


TOKEN_VIEWS = "token_views.json"  # the tokens page's content, written by the tokens stage


@dataclass
class TokenViews:
    """Everything the tokens page shows, computed by the tokens stage so the page only draws.

    Attributes:
        compare_horizon: H of ``compared`` (0: no comparison).
        compared: The voted S at ``compare_horizon``, as ``SafetyTokens.tokens`` dicts.
        contrasts: Teacher rollouts on held-out harmless prompts, token by token.
        masses: Base-model (= untrained student) rollouts on harmful training prompts, which
            is what the distillation loss will see.
    """

    compare_horizon: int
    compared: list[dict] | None
    contrasts: list[TokenContrast]
    masses: list[TokenMasses]

    def save(self, run_dir: str | Path) -> Path:
        """Write ``token_views.json`` atomically."""
        return write_text_atomic(Path(run_dir) / TOKEN_VIEWS, json.dumps(asdict(self)))

    @classmethod
    def load(cls, run_dir: str | Path) -> "TokenViews":
        """Read ``token_views.json``; a partial or foreign file is a one-line error."""
        path = Path(run_dir) / TOKEN_VIEWS
        remake = f"safesteer tokens --run {run_dir}"
        data = read_json(path, remake)
        try:
            return cls(
                compare_horizon=int(data["compare_horizon"]),
                compared=data["compared"],
                contrasts=[TokenContrast(**c) for c in data["contrasts"]],
                masses=[TokenMasses(**m) for m in data["masses"]],
            )
        except (KeyError, TypeError) as exc:
            raise artifact_error(path, f"is not a token-views file ({type(exc).__name__}: {exc})", remake) from exc

    def items(self, tokens: SafetyTokens) -> list[HtmlView]:
        """The views in page order: the set comparison, then the contrasts, then the masses."""
        views = []
        if self.compared is not None:
            other = SafetyTokens(self.compared)
            horizon = tokens.settings.get("horizon", "?")
            views.append(token_set_comparison([tokens, other], [f"H = {horizon}", f"H = {self.compare_horizon}"]))
        return [*views, *map(render_contrast, self.contrasts), *map(render_masses, self.masses)]


def collect_token_views(
    model: ChatModel,
    direction: Direction,
    tokens: SafetyTokens,
    compared: SafetyTokens | None = None,
    n_examples: int = 3,
) -> TokenViews:
    """Run the models behind the tokens page: the per-token views, beside S at another horizon.

    Args:
        model: The base model (the teacher is it plus the direction's hook).
        direction: The stage-1 artifact.
        tokens: The chosen S (its seed seeds the rollouts shown).
        compared: S at another horizon, shown side by side
            (:func:`~safesteer_lens.tokens.select_with_comparison`); None shows none.
        n_examples: Harmless validation prompts shown as contrast views.
    """
    seed = int(tokens.settings.get("seed", 0))
    harmless = prompt_texts(load_builtin_prompts("harmless", "val"))[:n_examples]
    teacher_out = generate(model, harmless, max_new_tokens=24, do_sample=True, seed=seed,
                           fwd_hooks=direction.hooks(model))
    contrasts = [token_contrast(model, direction, prompt, ids[mask].tolist())
                 for prompt, ids, mask in zip(harmless, teacher_out.completion_ids, teacher_out.completion_mask)]
    harmful = prompt_texts(load_builtin_prompts("harmful", "train"))[:2]
    student_out = generate(model, harmful, max_new_tokens=16, do_sample=True, seed=seed)
    masses = [token_masses(model, direction, tokens, prompt, ids.tolist(), mask.tolist())
              for prompt, ids, mask in zip(harmful, student_out.completion_ids, student_out.completion_mask)]
    horizon = int(compared.settings.get("horizon", 0)) if compared is not None else 0
    return TokenViews(horizon, compared.tokens if compared is not None else None, contrasts, masses)
