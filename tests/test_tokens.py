from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from safesteer_lens.cli import main
from safesteer_lens.directions import Direction
from safesteer_lens.errors import SafeSteerError
from safesteer_lens.tokens import (
    SafetyTokens,
    TokenConfig,
    load_safety_tokens,
    opener_tokens,
    rank_tokens,
    safety_token_sets,
    select_safety_tokens,
    select_with_comparison,
    SaturationWarning,
    special_token_mask,
    valid_positions,
    vote,
    votes_per_position,
)


def test_voting_on_a_hand_made_delta_gives_the_expected_set():
    delta = torch.tensor(
        [
            [0.0, 5.0, 4.0, 1.0, 0.0, 0.0],
            [0.0, 3.0, 9.0, 0.0, 1.0, 0.0],
            [0.0, 2.0, 0.0, 0.0, 8.0, 0.0],
        ]
    )
    votes = vote(delta, top_k=2)
    assert votes.tolist() == [0, 3, 2, 0, 1, 0]
    allowed = torch.ones(6, dtype=torch.bool)
    assert rank_tokens(votes, delta.mean(0), 2, "vote", allowed) == [1, 2]
    # mean-delta picks the largest means instead: token 2 (4.33) then token 1 (3.33)
    assert rank_tokens(votes, delta.mean(0), 2, "mean-delta", allowed) == [2, 1]


def test_the_opener_is_the_largest_probability_gain_not_the_largest_log_ratio():
    base = torch.tensor([[0.50, 0.05, 1e-5, 0.445 - 1e-5], [0.40, 0.05, 1e-5, 0.55 - 1e-5]])
    teacher = torch.tensor([[0.05, 0.60, 1e-3, 0.349], [0.05, 0.50, 1e-3, 0.449]])
    delta = teacher.log() - base.log()
    allowed = torch.ones(4, dtype=torch.bool)
    assert int(delta.mean(0).argmax()) == 2  # the rare token has by far the largest log-ratio
    assert opener_tokens(delta, teacher, 1, allowed) == [1]  # token 1 gains 0.5 of probability mass
    assert opener_tokens(delta, teacher, 4, allowed) == [1, 2]  # tokens 0 and 3 lose mass: never openers
    assert opener_tokens(delta, teacher, 1, torch.tensor([True, False, True, True])) == [2]
    assert opener_tokens(delta[:0], teacher[:0], 1, allowed) == [] and opener_tokens(delta, teacher, 0, allowed) == []


def test_openers_join_the_voted_set_and_are_marked(tiny, tiny_direction):
    small = {**SMALL, "set_size": 2}
    plain = select_safety_tokens(tiny, tiny_direction, TokenConfig(**small), progress=False)
    joined = select_safety_tokens(tiny, tiny_direction, TokenConfig(**small, openers=3), progress=False)
    added = [t for t in joined.tokens if t.get("opener")]
    assert joined.tokens[: len(plain)] == plain.tokens  # the vote's S is untouched, in its order
    assert 1 <= len(added) <= 3 and joined.tokens[len(plain):] == added
    assert not {t["id"] for t in added} & set(plain.ids) and joined.settings["openers"] == 3
    from safesteer_lens.viz import safety_tokens_bar

    labels = safety_tokens_bar(joined).data[0].y
    assert sum("(opener)" in label for label in labels) == len(added)
    with pytest.raises(SafeSteerError, match="openers must be 0"):
        TokenConfig(openers=-1)


def test_banned_ids_never_get_votes_or_places():
    delta = torch.tensor([[0.0, 9.0, 1.0, 2.0], [0.0, 9.0, 3.0, 1.0]])
    allowed = torch.tensor([True, False, True, True])
    votes = vote(delta, top_k=2, allowed=allowed)
    assert votes[1] == 0
    assert 1 not in rank_tokens(votes, delta.mean(0), 3, "vote", allowed)
    assert 1 not in rank_tokens(votes, delta.mean(0), 3, "mean-delta", allowed)


def test_positions_after_the_base_ends_the_turn_cast_no_votes():
    completion_mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    base_argmax = torch.tensor([[5, 2, 5, 5], [5, 5, 5, 5]])  # row 0: base would end at position 1
    valid = valid_positions(completion_mask, base_argmax, [2])
    assert valid.tolist() == [[True, False, False, False], [True, True, False, False]]
    delta = torch.tensor([[[0.0, 1.0, 0.0]] * 4, [[0.0, 0.0, 1.0]] * 4])
    votes = vote(delta[valid], top_k=1)
    assert votes.tolist() == [0, 1, 2]


SMALL = dict(horizon=3, samples_per_prompt=2, n_prompts=4, top_k_votes=20, set_size=10, prob_floor=0.0)


def test_same_seed_same_set_and_special_tokens_banned(tiny, tiny_direction):
    a = select_safety_tokens(tiny, tiny_direction, TokenConfig(**SMALL, seed=1), progress=False)
    b = select_safety_tokens(tiny, tiny_direction, TokenConfig(**SMALL, seed=1), progress=False)
    assert a.ids == b.ids and len(a) == 10
    assert [t["votes"] for t in a.tokens] == sorted((t["votes"] for t in a.tokens), reverse=True)
    banned = set(torch.nonzero(special_token_mask(tiny)).flatten().tolist())
    assert banned and not banned & set(a.ids)
    assert a.settings["n_valid_positions"] > 0


def test_probability_floor_removes_rare_tokens(tiny, tiny_direction):
    loose = select_safety_tokens(tiny, tiny_direction, TokenConfig(**SMALL), progress=False)
    strict = select_safety_tokens(tiny, tiny_direction, TokenConfig(**{**SMALL, "prob_floor": 0.002}), progress=False)
    assert 0 < strict.settings["n_allowed"] < loose.settings["n_allowed"]


def test_bad_settings_are_rejected(tiny, tiny_direction):
    with pytest.raises(SafeSteerError, match="horizon"):
        select_safety_tokens(tiny, tiny_direction, TokenConfig(horizon=0))
    with pytest.raises(SafeSteerError, match="vocabulary size"):
        select_safety_tokens(tiny, tiny_direction, TokenConfig(set_size=tiny.d_vocab + 1))


def test_artifact_round_trips(tmp_path):
    s = SafetyTokens([{"id": 5, "text": " unable", "votes": 9, "mean_delta": 1.5}], {"horizon": 7})
    s.save(tmp_path)
    assert load_safety_tokens(tmp_path).tokens == s.tokens
    with pytest.raises(SafeSteerError, match="safesteer tokens"):
        load_safety_tokens(tmp_path / "nothing")


def test_cli_tokens_needs_a_direction(tmp_path, capsys):
    assert main(["tokens", "--run", str(tmp_path)]) == 2
    assert "safesteer direction" in capsys.readouterr().err


def test_cli_tokens_writes_artifact_and_report(tiny_dir, tiny_direction, tmp_path, capsys):
    Direction(tiny_direction.vector, str(tiny_dir), "diff-means", 2, -1, 1.0).save(tmp_path)
    code = main(["tokens", "--run", str(tmp_path), "--horizon", "3", "--samples", "2", "--n-prompts", "3",
                 "--top-k", "10", "--set-size", "8", "--prob-floor", "0", "--compare-horizon", "1"])
    assert code == 0
    assert len(load_safety_tokens(tmp_path)) == 8
    report = (tmp_path / "tokens_report.html").read_text()
    assert "H = 1" in report and "S mass" in report and "Teacher vs base" in report
    assert main(["tokens", "--run", str(tmp_path), "--horizon", "0"]) == 2
    assert main(["tokens", "--run", str(tmp_path), "--openers", "-1"]) == 2


def test_k_prime_as_a_share_of_the_eligible_tokens():
    assert votes_per_position(200, 520) == 200 and votes_per_position(200, 50) == 50
    assert votes_per_position(0.05, 520) == 26 and votes_per_position(0.001, 100) == 1


def test_a_floor_that_leaves_few_eligible_tokens_warns_and_a_share_does_not(tiny, tiny_direction):
    strict = {**SMALL, "prob_floor": 0.002, "top_k_votes": 200}  # a near-uniform 512-token model: few pass
    with pytest.warns(SaturationWarning, match="pass prob_floor.*share of the eligible tokens"):
        saturated = select_safety_tokens(tiny, tiny_direction, TokenConfig(**strict), progress=False)
    assert saturated.settings["saturated"] and saturated.settings["n_allowed"] < 4 * 200
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", SaturationWarning)
        shared = select_safety_tokens(tiny, tiny_direction, TokenConfig(**{**strict, "top_k_votes": 0.1}), progress=False)
    eligible = shared.settings["n_allowed"]
    assert shared.settings["top_k_votes_used"] == max(1, round(0.1 * eligible)) and not shared.settings["saturated"]


def test_vote_ties_are_broken_by_mean_delta_not_by_id():
    votes = torch.tensor([0, 3, 3, 3, 1])
    mean_delta = torch.tensor([0.0, 0.1, 0.9, 0.5, 2.0])
    allowed = torch.ones(5, dtype=torch.bool)
    assert rank_tokens(votes, mean_delta, 2, "vote", allowed) == [2, 3]


def test_a_floor_no_token_passes_and_a_bad_k_prime_are_clear_errors(tiny, tiny_direction):
    with pytest.raises(SafeSteerError, match="prob_floor is a probability below 1"):
        TokenConfig(**{**SMALL, "prob_floor": 2.0})  # refused before any compute
    with pytest.raises(SafeSteerError, match="no token passes prob_floor"):
        select_safety_tokens(tiny, tiny_direction, TokenConfig(**{**SMALL, "prob_floor": 0.999}), progress=False)
    for bad in (0, 1.5, 0.0, True):
        with pytest.raises(SafeSteerError, match="top_k_votes must be a count"):
            select_safety_tokens(tiny, tiny_direction, TokenConfig(**{**SMALL, "top_k_votes": bad}), progress=False)


def test_shorter_horizons_come_from_the_same_rollouts_and_match_a_run_of_their_own(tiny, tiny_direction):
    config = TokenConfig(**SMALL)
    sets = safety_token_sets(tiny, tiny_direction, config, (3, 1), progress=False)
    assert sets[3].tokens == select_safety_tokens(tiny, tiny_direction, config, progress=False).tokens
    alone = select_safety_tokens(tiny, tiny_direction, replace(config, horizon=1), progress=False)
    assert sets[1].tokens == alone.tokens  # the first position depends on the prompt alone
    assert sets[1].settings["horizon"] == 1 and sets[1].settings["n_valid_positions"] < sets[3].settings["n_valid_positions"]
    with pytest.raises(SafeSteerError, match="horizons must lie between 1 and"):
        safety_token_sets(tiny, tiny_direction, config, (4,), progress=False)


def test_the_comparison_set_is_skipped_shared_or_sampled_anew(tiny, tiny_direction):
    config = TokenConfig(**SMALL)
    tokens, none = select_with_comparison(tiny, tiny_direction, config, 3, progress=False)
    assert none is None and tokens.settings["horizon"] == 3
    _, longer = select_with_comparison(tiny, tiny_direction, config, 5, progress=False)
    assert longer.settings["horizon"] == 5
    with pytest.raises(SafeSteerError, match="compare_horizon must be 0"):
        select_with_comparison(tiny, tiny_direction, config, -1)
