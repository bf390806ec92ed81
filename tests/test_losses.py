from __future__ import annotations

import math

import pytest
import torch

from safesteer_lens.errors import SafeSteerError
from safesteer_lens.losses import distillation_loss, sequence_mean

# One sequence, two positions, vocabulary of 4; second position masked out in some tests.
STUDENT = torch.tensor([[[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]]])
TEACHER = torch.tensor([[[0.0, 2.0, 1.0, 0.0], [1.0, 0.0, -1.0, 0.0]]])
MASK = torch.tensor([[True, True]])
S = [1, 2]


def _reference(kind, s_logits, t_logits, ids=None, beta=0.5):
    """Direct per-token formulas with plain Python floats."""
    total = 0.0
    for pos in range(s_logits.shape[1]):
        ps = torch.softmax(s_logits[0, pos], -1).tolist()
        pt = torch.softmax(t_logits[0, pos], -1).tolist()
        if kind == "safesteer":
            v = sum(ps[i] * (math.log(ps[i]) - math.log(pt[i])) for i in ids)
        elif kind == "safesteer-bounded":
            rs, rt = 1 - sum(ps[i] for i in ids), 1 - sum(pt[i] for i in ids)
            v = sum(ps[i] * math.log(ps[i] / pt[i]) for i in ids) + rs * math.log(rs / rt)
        elif kind == "renorm":
            zs, zt = sum(ps[i] for i in ids), sum(pt[i] for i in ids)
            v = sum(ps[i] / zs * (math.log(ps[i] / zs) - math.log(pt[i] / zt)) for i in ids)
        elif kind == "full-reverse":
            v = sum(a * (math.log(a) - math.log(b)) for a, b in zip(ps, pt))
        elif kind == "forward":
            v = sum(b * (math.log(b) - math.log(a)) for a, b in zip(ps, pt))
        elif kind == "jsd":
            m = [beta * b + (1 - beta) * a for a, b in zip(ps, pt)]
            v = beta * sum(b * math.log(b / c) for b, c in zip(pt, m)) + (1 - beta) * sum(
                a * math.log(a / c) for a, c in zip(ps, m)
            )
        else:
            raise KeyError(f"no reference formula for the {kind!r} loss: write one here and pin its value")
        total += v
    return total / s_logits.shape[1]


# Pinned values, computed once from the reference formulas above (not from the implementation).
PINNED = {
    "safesteer": 0.031731,
    "safesteer-bounded": 0.413004,
    "renorm": 0.060057,
    "full-reverse": 0.612797,
    "forward": 0.460241,
    "jsd": 0.121328,
}


def test_every_registered_loss_has_a_reference_formula_and_a_pinned_value():
    from safesteer_lens.losses import LOSS_REGISTRY

    assert set(PINNED) == set(LOSS_REGISTRY), "pin every registered loss against a formula written out in this file"


@pytest.mark.parametrize("kind", list(PINNED))
def test_each_loss_matches_reference_and_pinned_value(kind):
    got = distillation_loss(kind, STUDENT, TEACHER, MASK, safety_ids=S).item()
    assert got == pytest.approx(_reference(kind, STUDENT, TEACHER, S), abs=1e-5)
    assert got == pytest.approx(PINNED[kind], abs=1e-5)


def test_sequence_mean_weights_sequences_equally():
    per_token = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, True], [True, False, False, False]])
    assert sequence_mean(per_token, mask).item() == pytest.approx(2.0)


def test_masked_positions_do_not_count():
    mask = torch.tensor([[True, False]])
    changed = TEACHER.clone()
    changed[0, 1] = torch.tensor([9.0, -9.0, 3.0, 0.0])
    a = distillation_loss("full-reverse", STUDENT, TEACHER, mask)
    b = distillation_loss("full-reverse", STUDENT, changed, mask)
    assert a.item() == pytest.approx(b.item())


def test_safesteer_gradient_reaches_logits_outside_s_only_through_the_normaliser():
    torch.manual_seed(0)
    student = torch.randn(1, 3, 6, requires_grad=True)
    teacher = torch.randn(1, 3, 6)
    ids = [1, 4]
    distillation_loss("safesteer", student, teacher, torch.ones(1, 3, dtype=torch.bool), ids).backward()
    grad = student.grad[0]
    p = torch.softmax(student.detach()[0], -1)
    # d L / d z_u for u outside S equals -p_u * sum_{v in S} dL/dlogp_v  (a multiple of p_u)
    outside = [0, 2, 3, 5]
    ratio = grad[:, outside] / p[:, outside]
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-6)
    assert grad[:, outside].abs().max() > 0  # nonzero: the normaliser does pass gradient
    # and gradient never reaches the teacher
    assert teacher.grad is None


def test_full_reverse_is_nonnegative_and_zero_for_identical_models():
    torch.manual_seed(1)
    a, b = torch.randn(3, 5, 50), torch.randn(3, 5, 50)
    mask = torch.ones(3, 5, dtype=torch.bool)
    assert distillation_loss("full-reverse", a, b, mask).item() >= 0
    assert distillation_loss("full-reverse", a, a, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss("full-reverse", a, b, mask, chunk=2).item() == pytest.approx(
        distillation_loss("full-reverse", a, b, mask, chunk=64).item(), abs=1e-6
    )


def test_bad_inputs_are_rejected():
    with pytest.raises(SafeSteerError, match="outside the vocabulary"):
        distillation_loss("safesteer", STUDENT, TEACHER, MASK, safety_ids=[1, 99])
    with pytest.raises(SafeSteerError, match="unknown loss"):
        distillation_loss("kl", STUDENT, TEACHER, MASK)
    with pytest.raises(SafeSteerError, match="needs the safety token ids"):
        distillation_loss("safesteer", STUDENT, TEACHER, MASK)
    with pytest.raises(SafeSteerError, match="beta"):
        distillation_loss("jsd", STUDENT, TEACHER, MASK, beta=1.0)


def test_safety_mass_sums_softmax_over_s_from_logits_or_log_probs():
    from safesteer_lens.losses import safety_mass

    expected = torch.softmax(STUDENT, -1)[..., S].sum(-1)
    assert torch.allclose(safety_mass(STUDENT, S), expected, atol=1e-6)
    assert torch.allclose(safety_mass(torch.log_softmax(STUDENT, -1), S), expected, atol=1e-6)


def test_the_bounded_loss_is_a_kl_with_its_minimum_where_the_student_matches_the_teacher_on_s():
    torch.manual_seed(0)
    teacher = torch.randn(2, 3, 16)
    ids = [1, 4, 9]
    assert distillation_loss("safesteer-bounded", teacher.clone(), teacher, torch.ones(2, 3, dtype=torch.bool),
                             safety_ids=ids).item() == pytest.approx(0.0, abs=1e-6)
    for _ in range(5):
        student = torch.randn(2, 3, 16)
        assert distillation_loss("safesteer-bounded", student, teacher, torch.ones(2, 3, dtype=torch.bool), safety_ids=ids) >= 0
    # matching the teacher on S (and so on the rest's total) is a stationary point, whatever happens inside the rest
    student = teacher.clone()
    student[..., [0, 2]] += torch.tensor([0.5, -0.5]).log1p()  # move mass between two tokens outside S ...
    rest = [i for i in range(16) if i not in ids]
    keep = torch.logsumexp(teacher[..., rest], -1) - torch.logsumexp(student[..., rest], -1)
    student[..., rest] += keep.unsqueeze(-1)  # ... keeping the rest's total, so p_s = p_t on S
    student.requires_grad_(True)
    loss = distillation_loss("safesteer-bounded", student, teacher, torch.ones(2, 3, dtype=torch.bool), safety_ids=ids)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and student.grad.abs().max() < 1e-6


def test_the_bounded_loss_stays_exact_when_s_holds_nearly_all_the_mass():
    student = torch.tensor([[[30.0, 30.0, 0.0, 0.0]]])  # rest mass ~ 2e-13: log(1 - P(S)) would round to log(0)
    teacher = torch.tensor([[[0.0, 0.0, 0.0, 0.0]]])
    got = distillation_loss("safesteer-bounded", student, teacher, torch.ones(1, 1, dtype=torch.bool), safety_ids=[0, 1]).item()
    ps = torch.softmax(student[0, 0].double(), -1)
    rs = float(ps[2:].sum())
    expected = 2 * float(ps[0]) * math.log(float(ps[0]) / 0.25) + rs * math.log(rs / 0.5)
    assert math.isfinite(got) and got == pytest.approx(expected, rel=1e-5)


def test_a_registered_loss_is_usable_everywhere_by_name():
    from safesteer_lens.cli import build_parser
    from safesteer_lens.distill import TrainConfig
    from safesteer_lens.losses import LOSS_REGISTRY, register_loss

    @register_loss("test-l2", "squared logit distance (a test of the registry)")
    def l2_terms(student, teacher, options):
        return (student.float() - teacher.float()).square().mean(-1)

    try:
        mask = torch.ones(STUDENT.shape[:2], dtype=torch.bool)
        expected = (STUDENT - TEACHER).square().mean(-1).mean()
        assert distillation_loss("test-l2", STUDENT, TEACHER, mask).item() == pytest.approx(expected.item(), rel=1e-6)
        TrainConfig(loss="test-l2")
        train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
        assert "test-l2" in next(a for a in train_parser._actions if a.dest == "loss").choices
        with pytest.raises(ValueError, match="registered already"):
            register_loss("test-l2", "again")(l2_terms)
    finally:
        LOSS_REGISTRY.pop("test-l2")
