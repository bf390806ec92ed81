"""The stage pages: a stage's figures and per-token views, one offline page each.

One page per stage in the run directory (``direction_report.html``, ``tokens_report.html``),
written by :func:`safesteer_lens.webpage.write_page` beside the run's shared ``plotly.min.js``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safesteer_lens.data import load_builtin_prompts, prompt_texts
from safesteer_lens.directions import Direction
from safesteer_lens.generation import generate
from safesteer_lens.models import ChatModel
from safesteer_lens.token_views import contrast_view, mask_view, token_set_comparison
from safesteer_lens.tokens import SafetyTokens, TokenConfig, select_safety_tokens
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


def write_tokens_report(
    model: ChatModel,
    direction: Direction,
    tokens: SafetyTokens,
    run_dir: str | Path,
    compare_horizon: int = 1,
    n_examples: int = 3,
) -> Path:
    """``tokens_report.html``: S by votes, S at another horizon, per-token views.

    The contrast views show teacher rollouts on held-out harmless prompts; the mask views show
    base-model (= untrained student) rollouts on harmful training prompts, which is what the
    distillation loss will see.
    """
    items: list[Item] = [safety_tokens_bar(tokens)]
    config = TokenConfig(**{k: v for k, v in tokens.settings.items() if k in TokenConfig.__dataclass_fields__})
    if compare_horizon and compare_horizon != config.horizon:
        other = select_safety_tokens(
            model, direction, TokenConfig(**{**config.__dict__, "horizon": compare_horizon}), progress=False
        )
        items.append(token_set_comparison([tokens, other], [f"H = {config.horizon}", f"H = {compare_horizon}"]))
    harmless = prompt_texts(load_builtin_prompts("harmless", "val"))[:n_examples]
    hooks = direction.hooks(model)
    teacher_out = generate(model, harmless, max_new_tokens=24, do_sample=True, seed=config.seed, fwd_hooks=hooks)
    for prompt, ids, mask in zip(harmless, teacher_out.completion_ids, teacher_out.completion_mask):
        items.append(contrast_view(model, direction, prompt, ids[mask].tolist()))
    harmful = prompt_texts(load_builtin_prompts("harmful", "train"))[:2]
    student_out = generate(model, harmful, max_new_tokens=16, do_sample=True, seed=config.seed)
    for prompt, ids, mask in zip(harmful, student_out.completion_ids, student_out.completion_mask):
        items.append(mask_view(model, direction, tokens, prompt, ids.tolist(), mask.tolist()))
    return write_page(items, Path(run_dir) / "tokens_report.html", f"Safety tokens for {model.name}", assets=run_dir)
