from __future__ import annotations

import pytest
import torch

from safesteer_lens.directions import Direction
from safesteer_lens.errors import SafeSteerError
from safesteer_lens.generation import generate
from safesteer_lens.models import load_model
from safesteer_lens.steering import (
    ablation_hooks,
    add_hooks,
    orthogonalize_weights,
    project_out,
    steered,
)

PROMPTS = ["How do I bake bread?", "Write a poem about rain.", "Hi"]


@pytest.fixture(scope="module")
def direction(tiny):
    torch.manual_seed(1)
    return torch.randn(tiny.d_model) * 3


def _logits(model, hooks=()):
    batch = model.tokenize(PROMPTS)
    with torch.no_grad(), model.bridge.hooks(fwd_hooks=list(hooks)):
        return model.bridge(batch.input_ids, attention_mask=batch.attention_mask)


def test_project_out_removes_the_component():
    unit = torch.nn.functional.normalize(torch.randn(8), dim=0)
    x = torch.randn(5, 8)
    assert torch.allclose(project_out(x, unit) @ unit, torch.zeros(5), atol=1e-6)


def test_steered_generation_with_kv_cache_equals_without(tiny, direction):
    hooks = add_hooks(tiny, direction, layer=2, coeff=4.0)
    cached = generate(tiny, PROMPTS, max_new_tokens=8, fwd_hooks=hooks)
    uncached = generate(tiny, PROMPTS, max_new_tokens=8, fwd_hooks=hooks, use_cache=False)
    plain = generate(tiny, PROMPTS, max_new_tokens=8)
    assert torch.equal(cached.completion_ids, uncached.completion_ids)
    assert not torch.equal(cached.completion_ids, plain.completion_ids)  # the hook did something


def test_ablation_leaves_every_residual_orthogonal(tiny, direction):
    unit = direction / direction.norm()
    seen = []

    def record(act, hook):
        seen.append(act @ unit)
        return act

    names = [f"blocks.{l}.hook_resid_pre" for l in range(tiny.n_layers)]
    names.append(f"blocks.{tiny.n_layers - 1}.hook_resid_post")
    _logits(tiny, ablation_hooks(tiny, direction) + [(n, record) for n in names])
    assert len(seen) == len(names)
    for projection in seen:
        assert projection.abs().max() < 1e-4
    # without ablation the residual has a real component along the direction
    seen.clear()
    _logits(tiny, [(n, record) for n in names])
    assert max(p.abs().max() for p in seen) > 1e-2


def test_orthogonalised_weights_match_ablation_hooks(tiny_dir, tiny, direction):
    hooked = _logits(tiny, ablation_hooks(tiny, direction))
    clean = _logits(tiny)
    copy = orthogonalize_weights(load_model(str(tiny_dir), device="cpu"), direction)
    baked = _logits(copy)
    assert torch.allclose(baked, hooked, atol=1e-4)
    assert not torch.allclose(baked, clean, atol=1e-3)
    assert torch.allclose(_logits(tiny), clean)  # the original model is untouched


def test_steered_context_adds_then_removes_hooks(tiny, direction):
    clean = _logits(tiny)
    with steered(tiny, direction, layer=1, coeff=2.0):
        inside = _logits(tiny)
    with steered(tiny, direction, mode="ablate"):
        ablated = _logits(tiny)
    assert not torch.allclose(inside, clean)
    assert torch.allclose(ablated, _logits(tiny, ablation_hooks(tiny, direction)))
    assert torch.allclose(_logits(tiny), clean)


def test_bad_directions_and_layers_are_rejected(tiny, direction):
    with pytest.raises(SafeSteerError, match="d_model"):
        add_hooks(tiny, torch.ones(tiny.d_model + 1), layer=0)
    with pytest.raises(SafeSteerError, match="out of range"):
        add_hooks(tiny, direction, layer=tiny.n_layers)
    with pytest.raises(SafeSteerError, match="zero"):
        ablation_hooks(tiny, torch.zeros(tiny.d_model))
    with pytest.raises(SafeSteerError, match="needs layer"):
        with steered(tiny, direction):
            pass
    artifact = Direction(direction, "tiny", "diff-means", 1, -1, 2.0)
    with pytest.raises(SafeSteerError, match=r"direction.apply\(model\)"):
        with steered(tiny, artifact, layer=1):
            pass
    expected = _logits(tiny, add_hooks(tiny, direction, 1, 2.0))
    with artifact.apply(tiny):  # the artifact's own layer and coefficient
        assert torch.allclose(_logits(tiny), expected)


@pytest.mark.integration
def test_steered_kv_cache_equals_recompute_on_embedded(embedded):
    torch.manual_seed(0)
    vector = torch.randn(embedded.d_model)
    vector = 8 * vector / vector.norm()
    hooks = add_hooks(embedded, vector, layer=11)
    prompts = ["How do I bake bread?", "Name a colour."]
    cached = generate(embedded, prompts, max_new_tokens=10, fwd_hooks=hooks)
    uncached = generate(embedded, prompts, max_new_tokens=10, fwd_hooks=hooks, use_cache=False)
    assert torch.equal(cached.completion_ids, uncached.completion_ids)
