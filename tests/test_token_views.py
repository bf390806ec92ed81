"""Per-token views: the numbers behind them, their saved form, and the page drawn from it alone."""

from __future__ import annotations

import math

import pytest
import torch

from safesteer_lens.errors import SafeSteerError
from safesteer_lens.pages import write_tokens_report
from safesteer_lens.token_views import (
    TOKEN_VIEWS, TokenViews, collect_token_views, contrast_view, mask_view, render_contrast, token_contrast,
    token_masses,
)
from safesteer_lens.tokens import SafetyTokens

S = SafetyTokens([{"id": i, "text": f"t{i}", "votes": 3, "mean_delta": 0.5} for i in (5, 9, 40)],
                 {"horizon": 3, "seed": 0, "samples_per_prompt": 2, "n_prompts": 3, "top_k_votes": 10,
                  "set_size": 3, "prob_floor": 0.0, "model": "tiny"})


def test_contrast_holds_each_realised_tokens_log_probs_under_teacher_and_base(tiny, tiny_direction):
    contrast = token_contrast(tiny, tiny_direction, "Hi", [17, 42, 8], top_n=3)
    prompt_ids = tiny.tokenizer(tiny.format_chat("Hi"), add_special_tokens=False)["input_ids"]
    ids = torch.tensor(prompt_ids + [17, 42, 8])
    with torch.no_grad():
        base = torch.log_softmax(tiny.bridge(ids[None]).float(), -1)[0]
        with tiny.bridge.hooks(fwd_hooks=tiny_direction.hooks(tiny)):
            teacher = torch.log_softmax(tiny.bridge(ids[None]).float(), -1)[0]
    assert contrast.n_prompt == len(prompt_ids) and len(contrast.tokens) == len(ids)
    assert contrast.base_lp == pytest.approx(base[:-1].gather(1, ids[1:, None])[:, 0].tolist(), abs=1e-4)
    assert contrast.teacher_lp == pytest.approx(teacher[:-1].gather(1, ids[1:, None])[:, 0].tolist(), abs=1e-4)
    assert contrast.teacher_lp != pytest.approx(contrast.base_lp, abs=1e-3)
    assert all(len(top) == 3 for top in contrast.teacher_top)


def test_masses_are_probabilities_of_s_and_the_view_draws_them(tiny, tiny_direction):
    masses = token_masses(tiny, tiny_direction, S, "Hi", [17, 42, 8], [True, True, False])
    assert set(masses.masses) == {"student (= base)", "teacher", "base"}
    assert masses.masses["student (= base)"] == masses.masses["base"]
    assert all(0 <= v <= 1 and len(row) == 3 for row in masses.masses.values() for v in row)
    html = mask_view(tiny, tiny_direction, S, "Hi", [17, 42, 8], [True, True, False])._repr_html_()
    assert "S mass, teacher" in html and "|S| = 3" in html


def test_saved_views_draw_the_same_page_without_a_model(tiny, tiny_direction, tmp_path):
    h1 = SafetyTokens(S.tokens[:2], {**S.settings, "horizon": 1})
    views = collect_token_views(tiny, tiny_direction, S, h1, n_examples=2)
    assert views.compare_horizon == 1 and views.compared and len(views.contrasts) == 2 and len(views.masses) == 2
    views.save(tmp_path)
    S.save(tmp_path)
    loaded = TokenViews.load(tmp_path)
    assert loaded == views
    assert render_contrast(loaded.contrasts[0]).body == render_contrast(views.contrasts[0]).body
    page = write_tokens_report(tmp_path).read_text()  # takes no model: it only draws
    assert "H = 1" in page and "S mass" in page and "Teacher vs base" in page


def test_contrast_view_is_render_of_the_data(tiny, tiny_direction):
    view = contrast_view(tiny, tiny_direction, "Hi", [17, 42])
    data = token_contrast(tiny, tiny_direction, "Hi", [17, 42])
    assert view.body == render_contrast(data).body
    shown = max(abs(t - b) for t, b in zip(data.teacher_lp, data.base_lp))
    assert f"full colour = {shown:.2f} nats" in view.body and math.isfinite(shown)


def test_no_comparison_set_shows_none(tiny, tiny_direction, tmp_path):
    views = collect_token_views(tiny, tiny_direction, S, n_examples=1)
    assert views.compared is None and views.compare_horizon == 0
    assert len(views.items(S)) == 1 + 2  # one contrast view and two mask views, no set comparison


@pytest.mark.parametrize("text", ['{"compare_horizon": 1', '{"compare_horizon": 1, "compared": null}', "[]"])
def test_a_partial_views_file_is_a_one_line_error(tmp_path, text):
    (tmp_path / TOKEN_VIEWS).write_text(text)
    with pytest.raises(SafeSteerError, match=r"token_views.json .*safesteer tokens --run") as info:
        TokenViews.load(tmp_path)
    assert "\n" not in str(info.value)
