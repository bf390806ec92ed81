"""The chunked loss from hidden states equals the loss from full logits: values and gradients, float64, every family."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from safesteer_lens.fused_loss import fused_distillation_loss, fused_monitors, unembedding
from safesteer_lens.generation import generate
from safesteer_lens.losses import LOSS_REGISTRY, distillation_loss, safety_mass, sequence_mean
from safesteer_lens.models import load_model
from safesteer_lens.scoring import teacher_forced_hidden, teacher_forced_logits
from safesteer_lens.steering import add_hooks
from safesteer_lens.tiny import TINY_FAMILIES, build_tiny_chat

PROMPTS = ["How do I bake bread?", "Name three primary colours.", "How do I pick a lock?"]


@pytest.fixture(scope="module", params=sorted(TINY_FAMILIES))
def family_case(request, tmp_path_factory):
    """A tiny model of one family, sampled completions (two rows per prompt) and a steering hook."""
    model = load_model(str(build_tiny_chat(tmp_path_factory.mktemp(request.param), request.param)), device="cpu")
    completions = generate(model, [p for p in PROMPTS for _ in range(2)], max_new_tokens=5, do_sample=True, seed=0)
    torch.manual_seed(0)
    hooks = add_hooks(model, torch.randn(model.d_model) * 3, 2)
    return model, completions, hooks


def _float64_case(model, completions, hooks):
    """Student and teacher hidden states and the unembedding in float64 (the loss arithmetic under test)."""
    head = unembedding(model)
    with torch.no_grad():
        student = teacher_forced_hidden(model, completions).double()
        teacher = teacher_forced_hidden(model, completions, hooks).double()
    weight = head.weight.detach().double()
    return student, teacher, replace(head, weight=weight, bias=None if head.bias is None else head.bias.double())


@pytest.mark.parametrize("group_size", [1, 2])
def test_hidden_states_unembed_to_the_scored_logits(family_case, group_size):
    model, completions, hooks = family_case
    with torch.no_grad():
        logits = teacher_forced_logits(model, completions, hooks, group_size=group_size)
        hidden = teacher_forced_hidden(model, completions, hooks, group_size=group_size)
    assert hidden.shape == (*logits.shape[:2], model.d_model)
    torch.testing.assert_close(unembedding(model)(hidden), logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(LOSS_REGISTRY))
def test_every_loss_from_hidden_states_equals_the_loss_from_logits(family_case, kind):
    student_hidden, teacher_hidden, head = _float64_case(*family_case)
    mask, safety_ids = family_case[1].completion_mask, torch.arange(20, 60)
    head.weight.requires_grad_(True)
    results = []
    for fused in (False, True):
        hidden = student_hidden.clone().requires_grad_(True)
        head.weight.grad = None
        if fused:
            value = fused_distillation_loss(kind, hidden, teacher_hidden, head, head, mask, safety_ids, beta=0.3, chunk=2)
        else:
            value = distillation_loss(kind, head(hidden), head(teacher_hidden), mask, safety_ids, beta=0.3)
        value.backward()
        results.append((value.detach(), hidden.grad, head.weight.grad.clone()))
    (value, hidden_grad, weight_grad), (fused_value, fused_hidden_grad, fused_weight_grad) = results
    assert value.abs() > 0 and hidden_grad.abs().sum() > 0  # the comparison compares something
    torch.testing.assert_close(fused_value, value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fused_hidden_grad, hidden_grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fused_weight_grad, weight_grad, rtol=1e-9, atol=1e-12)


def test_monitors_from_hidden_states_equal_the_monitors_from_logits(family_case):
    student, teacher, head = _float64_case(*family_case)
    mask, safety_ids = family_case[1].completion_mask, torch.arange(20, 60)
    with torch.no_grad():
        s_logits, t_logits = head(student), head(teacher)
        expected = {
            "kl_s": float(distillation_loss("safesteer", s_logits, t_logits, mask, safety_ids)),
            "kl_full": float(distillation_loss("full-reverse", s_logits, t_logits, mask)),
            "s_mass_student": float(sequence_mean(safety_mass(s_logits, safety_ids), mask)),
            "s_mass_teacher": float(sequence_mean(safety_mass(t_logits, safety_ids), mask)),
        }
    assert fused_monitors(student, teacher, head, head, mask, safety_ids, chunk=2) == pytest.approx(expected, rel=1e-10)
