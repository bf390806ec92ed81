from __future__ import annotations

import pytest
import torch

from safesteer_lens.errors import SafeSteerError
from safesteer_lens.generation import generate, last_token_logits
from safesteer_lens.rollouts import RolloutSampler, sampling_twin

PROMPTS = ["How do I bake bread?", "Hi", "Write a short poem about rain and wind."]


def _binned(ids: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Frequencies of the ``top`` token ids, plus one bin for everything else."""
    hits = (ids[:, None] == top[None, :]).float().mean(0)
    return torch.cat([hits, 1 - hits.sum(0, keepdim=True)])


def _total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    """A tiny model with large weights: its outputs depend on token positions and order,
    so a wrong position id or cache shows up in what it samples."""
    from safesteer_lens.models import load_model
    from safesteer_lens.tiny import build_tiny_llama

    return load_model(str(build_tiny_llama(tmp_path_factory.mktemp("sharp"), init_std=0.2)), device="cpu")


@pytest.fixture(scope="module")
def sampler(sharp):
    return RolloutSampler(sharp, compile=False)


def test_twin_shares_the_students_storage(tiny):
    assert not any(p.requires_grad for p in tiny.hf_model.parameters())
    twin = sampling_twin(tiny)
    assert not any(p.requires_grad for p in tiny.hf_model.parameters())  # still frozen
    embed = tiny.hf_model.get_input_embeddings().weight
    assert twin.get_input_embeddings().weight.data_ptr() == embed.data_ptr()
    assert twin.config._attn_implementation == "sdpa"
    assert not any(t.is_meta for t in list(twin.parameters()) + list(twin.buffers()))


def test_greedy_tokens_equal_the_plain_path(sharp, sampler):
    plain = generate(sharp, PROMPTS, max_new_tokens=8)
    fast = sampler.sample(PROMPTS, max_new_tokens=8, do_sample=False)
    assert torch.equal(fast.prompt_ids, plain.prompt_ids)
    assert torch.equal(fast.completion_ids, plain.completion_ids)
    assert torch.equal(fast.completion_mask, plain.completion_mask)
    assert fast.texts == plain.texts


def test_samples_per_prompt_share_a_prefill_and_keep_the_plain_layout(sharp, sampler):
    plain = generate(sharp, [p for p in PROMPTS for _ in range(3)], max_new_tokens=6)
    fast = sampler.sample(PROMPTS, 3, max_new_tokens=6, do_sample=False)
    assert torch.equal(fast.sequences, plain.sequences)
    assert torch.equal(fast.attention_mask, plain.attention_mask)


def test_the_twin_follows_in_place_updates_of_the_student(tiny_dir):
    from safesteer_lens.models import load_model

    student = load_model(str(tiny_dir), device="cpu")
    sampler = RolloutSampler(student, compile=False)
    with torch.no_grad():
        for p in student.hf_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    plain = generate(student, PROMPTS, max_new_tokens=6)
    fast = sampler.sample(PROMPTS, max_new_tokens=6, do_sample=False)
    assert torch.equal(fast.completion_ids, plain.completion_ids)


def test_sampling_is_repeatable_for_a_seed(sampler):
    a = sampler.sample(PROMPTS, 2, max_new_tokens=6, seed=5)
    b = sampler.sample(PROMPTS, 2, max_new_tokens=6, seed=5)
    c = sampler.sample(PROMPTS, 2, max_new_tokens=6, seed=6)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert not torch.equal(a.completion_ids, c.completion_ids)


def test_a_rows_sample_does_not_depend_on_the_rest_of_its_batch(sampler):
    whole = sampler.sample(PROMPTS, 2, max_new_tokens=6, seed=9)
    first = sampler.sample(PROMPTS[:1], 2, max_new_tokens=6, seed=9)
    rest = sampler.sample(PROMPTS[1:], 2, max_new_tokens=6, seed=9, first_row=2)
    assert first.texts + rest.texts == whole.texts
    for part, offset in ((first, 0), (rest, 2)):
        for i in range(len(part)):
            row = whole.completion_ids[offset + i][whole.completion_mask[offset + i]]
            assert torch.equal(part.completion_ids[i][part.completion_mask[i]], row)


def test_sampled_token_frequencies_match_the_plain_path_and_the_model(sharp, sampler):
    # Frequencies are compared on the most likely tokens plus an "other" bin. A wrong
    # position id, mask or repeated cache moves them by far more than the tolerance
    # (sampling noise is about 0.02). The measured prompt shares its batch with a longer
    # one, so its rows are left-padded.
    tiny = sharp
    n, temperature, prompt = 2000, 0.5, "Tell me a story about the sea"
    longer = "Write a long and careful essay about the history of bread in three parts"
    fast = sampler.sample([prompt, longer], n, max_new_tokens=2, temperature=temperature, seed=0)[:n]
    plain = generate(tiny, [prompt] * n + [longer] * n, max_new_tokens=2, do_sample=True, temperature=temperature,
                     seed=1, batch_size=2 * n)[:n]
    assert fast.prompt_mask[:, 0].sum() == 0  # padded
    exact = torch.softmax(last_token_logits(tiny, [prompt])[0] / temperature, -1)
    top = exact.topk(6).indices
    expected = torch.cat([exact[top], 1 - exact[top].sum(0, keepdim=True)])
    assert 0.2 < expected[:-1].sum() < 0.9 and expected.max() < 0.8  # a spread the test can see
    first_fast = _binned(fast.completion_ids[:, 0], top)
    first_plain = _binned(plain.completion_ids[:, 0], top)
    assert _total_variation(first_fast, expected) < 0.05
    assert _total_variation(first_plain, expected) < 0.05
    assert _total_variation(first_fast, first_plain) < 0.05
    # second tokens: compare the two paths on the plain path's most frequent ones
    second_top = torch.bincount(plain.completion_ids[:, 1], minlength=tiny.d_vocab).topk(6).indices
    second_fast = _binned(fast.completion_ids[:, 1], second_top)
    second_plain = _binned(plain.completion_ids[:, 1], second_top)
    assert second_plain[:-1].sum() > 0.2
    assert _total_variation(second_fast, second_plain) < 0.06


def test_bfloat16_sampling_computes_in_bfloat16_and_follows_the_policy(sharp):
    from safesteer_lens.precision import autocast

    sampler = RolloutSampler(sharp, compile=False, dtype=torch.bfloat16)
    seen = []
    handle = sampler.twin.lm_head.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    n, temperature, prompt = 2000, 0.5, "Tell me a story about the sea"
    longer = "Write a long and careful essay about the history of bread in three parts"
    fast = sampler.sample([prompt, longer], n, max_new_tokens=1, temperature=temperature, seed=0)[:n]
    handle.remove()
    assert seen and set(seen) == {torch.bfloat16}
    assert fast.prompt_mask[:, 0].sum() == 0  # left-padded rows (NaN logits would fail the check below)
    with autocast(torch.bfloat16, sharp.device):
        policy = last_token_logits(sharp, [prompt])[0].float()
    exact = torch.softmax(policy / temperature, -1)
    top = exact.topk(6).indices
    expected = torch.cat([exact[top], 1 - exact[top].sum(0, keepdim=True)])
    assert 0.2 < expected[:-1].sum() < 0.9
    assert _total_variation(_binned(fast.completion_ids[:, 0], top), expected) < 0.05


def test_compiled_static_cache_path_gives_the_same_greedy_tokens(sharp):
    compiled = RolloutSampler(sharp, compile=True)
    plain = generate(sharp, PROMPTS, max_new_tokens=5)
    fast = compiled.sample(PROMPTS, 2, max_new_tokens=5, do_sample=False)
    assert compiled.compile, "compilation fell back to the dynamic cache"
    assert torch.equal(fast.completion_ids[::2], plain.completion_ids)
    assert torch.equal(fast.completion_mask[::2], plain.completion_mask)


def test_compiled_decoding_under_bfloat16_autocast_gives_the_eager_greedy_tokens(sharp):
    # the CUDA default (compiled decode step, bfloat16 autocast), checked with inductor on CPU
    eager = RolloutSampler(sharp, compile=False, dtype=torch.bfloat16).sample(PROMPTS, 2, max_new_tokens=5, do_sample=False)
    compiled = RolloutSampler(sharp, compile=True, dtype=torch.bfloat16)
    fast = compiled.sample(PROMPTS, 2, max_new_tokens=5, do_sample=False)
    assert compiled.compile, "compilation fell back to the dynamic cache"
    assert torch.equal(fast.completion_ids, eager.completion_ids)


def test_bad_settings_are_rejected(sampler):
    with pytest.raises(SafeSteerError, match="samples_per_prompt"):
        sampler.sample(PROMPTS, 0)
    with pytest.raises(SafeSteerError, match="temperature"):
        sampler.sample(PROMPTS, temperature=0.0)
    with pytest.raises(SafeSteerError, match="max_new_tokens"):
        sampler.sample(PROMPTS, max_new_tokens=0)
