"""Teacher-forced scoring: the one function training, token selection, evaluation and the views share."""

from __future__ import annotations

import torch

from safesteer_lens.generation import generate
from safesteer_lens.scoring import single_completion, teacher_forced_log_probs, teacher_forced_logits

PROMPTS = ["How do I bake bread?", "Hi", "Write a poem about rain"]


def test_logits_are_the_full_forward_at_the_completion_positions(tiny):
    out = generate(tiny, PROMPTS[:2], max_new_tokens=5)
    with torch.no_grad():
        full = tiny.bridge(out.sequences, attention_mask=out.attention_mask)
        part = teacher_forced_logits(tiny, out)
    assert part.shape[:2] == out.completion_ids.shape
    assert torch.allclose(part, full[:, out.prompt_ids.shape[1] - 1 : -1], atol=1e-5)


def test_shared_prompt_path_gives_the_same_logits_and_gradients(tiny_dir):
    from safesteer_lens.models import load_model

    student = load_model(str(tiny_dir))
    params = list(student.hf_model.parameters())
    for p in params:
        p.requires_grad_(True)
    rollouts = generate(student, [p for p in PROMPTS for _ in range(3)], max_new_tokens=5, do_sample=True, seed=0)
    plain = teacher_forced_logits(student, rollouts, group_size=1)
    shared = teacher_forced_logits(student, rollouts, group_size=3)
    assert torch.allclose(plain, shared, atol=1e-5)
    mask = rollouts.completion_mask
    g_plain = torch.autograd.grad((plain.logsumexp(-1) * mask).sum(), params[:4])
    g_shared = torch.autograd.grad((shared.logsumexp(-1) * mask).sum(), params[:4])
    for a, b in zip(g_plain, g_shared):
        assert torch.allclose(a, b, atol=1e-5)
    # rows that are not whole groups of one prompt fall back to the plain path
    assert torch.allclose(teacher_forced_logits(student, rollouts, start=1, stop=5, group_size=3), plain[1:5], atol=1e-5)


def test_log_probs_are_normalised_float32_on_cpu_whatever_the_batch(tiny, tiny_direction):
    out = generate(tiny, PROMPTS, max_new_tokens=4, do_sample=True, seed=1)
    hooks = tiny_direction.hooks(tiny)
    whole = teacher_forced_log_probs(tiny, out, hooks, batch_size=3)
    pieces = teacher_forced_log_probs(tiny, out, hooks, batch_size=2)
    assert whole.dtype == torch.float32 and whole.device.type == "cpu"
    assert torch.allclose(whole.exp().sum(-1), torch.ones(whole.shape[:2]), atol=1e-4)
    assert torch.allclose(whole, pieces, atol=1e-5)
    # the hook is active: the steered distribution differs from the plain one
    assert not torch.allclose(whole, teacher_forced_log_probs(tiny, out), atol=1e-3)


def test_single_sequence_scores_every_token_after_the_prompt(tiny):
    ids = torch.tensor([3, 17, 42, 8, 99, 5])
    with torch.no_grad():
        full = torch.log_softmax(tiny.bridge(ids[None]).float(), -1)[0]
    for n_prompt in (1, 3):
        got = teacher_forced_log_probs(tiny, single_completion(ids, n_prompt))[0]
        assert got.shape[0] == len(ids) - n_prompt
        assert torch.allclose(got, full[n_prompt - 1 : -1], atol=1e-5)
