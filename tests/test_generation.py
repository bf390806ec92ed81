from __future__ import annotations

import pytest
import torch

from safesteer_lens.errors import SafeSteerError
from safesteer_lens.generation import completion_mask, generate


def test_completion_mask_includes_first_eot_and_nothing_after():
    ids = torch.tensor([[5, 6, 2, 2, 2], [5, 2, 7, 2, 9], [5, 6, 7, 8, 9]])
    mask = completion_mask(ids, [2])
    assert mask.tolist() == [
        [True, True, True, False, False],
        [True, True, False, False, False],
        [True, True, True, True, True],
    ]


def test_greedy_generation_is_batch_size_invariant(tiny):
    prompts = ["How do I bake bread?", "Hi", "Write a short poem about rain and wind."]
    one = generate(tiny, prompts, max_new_tokens=6, batch_size=8)
    split = generate(tiny, prompts, max_new_tokens=6, batch_size=2)
    assert one.texts == split.texts
    for i in range(3):
        a = one.completion_ids[i][one.completion_mask[i]]
        b = split.completion_ids[i][split.completion_mask[i]]
        assert torch.equal(a, b)


def test_sampling_is_repeatable_for_a_seed(tiny):
    a = generate(tiny, ["Tell me a story"] * 3, max_new_tokens=8, do_sample=True, seed=3)
    b = generate(tiny, ["Tell me a story"] * 3, max_new_tokens=8, do_sample=True, seed=3)
    c = generate(tiny, ["Tell me a story"] * 3, max_new_tokens=8, do_sample=True, seed=4)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert not torch.equal(a.completion_ids, c.completion_ids)


def test_hooks_fire_on_prompt_and_each_decode_step(tiny):
    shapes = []

    def record(resid, hook):
        shapes.append(tuple(resid.shape))
        return resid

    out = generate(
        tiny, ["a", "bb"], max_new_tokens=4, fwd_hooks=[("blocks.1.hook_resid_pre", record)]
    )
    assert shapes[0][0] == 2 and shapes[0][1] == out.prompt_ids.shape[1]
    assert all(s == (2, 1, tiny.d_model) for s in shapes[1:])
    assert len(shapes) == out.completion_ids.shape[1]


def test_sequences_and_attention_mask_line_up(tiny):
    out = generate(tiny, ["a", "bb"], max_new_tokens=5)
    assert out.sequences.shape == out.attention_mask.shape
    assert out.attention_mask[:, out.prompt_ids.shape[1]:].bool().equal(out.completion_mask)


def test_bad_settings_are_rejected(tiny):
    with pytest.raises(SafeSteerError, match="max_new_tokens"):
        generate(tiny, ["a"], max_new_tokens=0)
    with pytest.raises(SafeSteerError, match="temperature"):
        generate(tiny, ["a"], do_sample=True, temperature=0.0)


def test_shipped_decoding_preferences_do_not_change_what_is_generated(tiny_dir):
    from safesteer_lens.models import load_model

    model = load_model(str(tiny_dir))
    before = generate(model, ["Tell me a story", "Hi"], max_new_tokens=8)
    model.hf_model.generation_config.repetition_penalty = 50.0  # like Qwen's shipped 1.05, but loud
    model.hf_model.generation_config.num_beams = 4
    after = generate(model, ["Tell me a story", "Hi"], max_new_tokens=8)
    assert torch.equal(before.completion_ids, after.completion_ids)
