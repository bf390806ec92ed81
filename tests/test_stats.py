import pytest

from safesteer_lens.stats import Rate, format_rate, wilson_interval


def _score_test_bounds(k, n, z=1.959963984540054):
    """The interval's defining property, solved by bisection: the p where |p - k/n| = z sqrt(p(1-p)/n)."""
    p_hat = k / n
    outside = lambda p: (p - p_hat) ** 2 > z * z * p * (1 - p) / n  # noqa: E731
    lo, hi = 0.0, p_hat
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if outside(mid) else (lo, mid)
    low = hi
    lo, hi = p_hat, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if outside(mid) else (mid, hi)
    return low, lo


@pytest.mark.parametrize("k,n", [(1, 40), (7, 40), (33, 60), (3, 5)])
def test_wilson_inverts_the_score_test(k, n):
    low, high = wilson_interval(k, n)
    ref_low, ref_high = _score_test_bounds(k, n)
    assert low == pytest.approx(ref_low, abs=1e-9) and high == pytest.approx(ref_high, abs=1e-9)


def test_wilson_matches_published_values():
    # 1 of 40 -> [0.0044, 0.1288]
    low, high = wilson_interval(1, 40)
    assert low == pytest.approx(0.00443, abs=1e-5) and high == pytest.approx(0.12881, abs=1e-5)
    # 20 of 40 is symmetric about 0.5
    low, high = wilson_interval(20, 40)
    assert low + high == pytest.approx(1.0) and high - low == pytest.approx(0.2960, abs=1e-3)


def test_wilson_stays_inside_zero_one_and_is_wide_at_the_ends():
    assert wilson_interval(0, 40)[0] == 0.0 and wilson_interval(0, 40)[1] == pytest.approx(0.0876, abs=1e-3)
    assert wilson_interval(40, 40)[1] == 1.0 and wilson_interval(40, 40)[0] == pytest.approx(0.9124, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


def test_rate_columns_and_text():
    rate = Rate.of([True, False, False, False])
    assert rate.value == 0.25 and rate.n == 4 and rate.low < 0.25 < rate.high
    cols = rate.columns("harmful_refusal")
    assert set(cols) == {"harmful_refusal", "harmful_refusal_low", "harmful_refusal_high", "harmful_refusal_n"}
    assert str(rate).startswith("25.0% [") and str(rate).endswith("n=4")
    assert format_rate(0.5, 0.25, 0.75, 8) == "50.0% [25.0–75.0] n=8"
