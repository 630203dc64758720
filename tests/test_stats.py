"""fnemm.stats against hand computations and published t-table values (no scipy)."""

import math

import numpy as np
import pytest

from fnemm.stats import betainc, bootstrap_ci, paired_over_groups, paired_t, t_cdf, t_ppf


@pytest.mark.parametrize("df,q975", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (14, 2.1448), (30, 2.0423)])
def test_t_quantiles_match_the_t_table(df, q975):
    assert t_ppf(0.975, df) == pytest.approx(q975, abs=1e-4)
    assert t_cdf(q975, df) == pytest.approx(0.975, abs=2e-5)
    assert t_cdf(-q975, df) == pytest.approx(0.025, abs=2e-5)


def test_t_cdf_against_closed_forms():
    # df = 1 is Cauchy: 1/2 + atan(t)/pi; df = 2: 1/2 + t / (2 sqrt(2 + t^2))
    for t in (-3.0, -0.7, 0.0, 0.4, 2.5, 10.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    assert betainc(2, 3, 0.4) == pytest.approx(0.5248, abs=1e-12)      # sum_{j>=2} C(4,j) .4^j .6^(4-j)
    assert t_cdf(200.0, 5) == pytest.approx(1.0) and 0 < t_cdf(-200.0, 5) < 1e-10


def test_paired_t_by_hand():
    # differences 1..5: mean 3, sd sqrt(2.5), se sqrt(0.5), t = 4.2426, df 4
    c = paired_t([1, 2, 3, 4, 5])
    se = math.sqrt(2.5) / math.sqrt(5)
    assert c.mean == 3 and c.n == 5
    assert c.low == pytest.approx(3 - 2.776445 * se, abs=1e-5) and c.high == pytest.approx(3 + 2.776445 * se, abs=1e-5)
    assert c.p == pytest.approx(2 * (1 - t_cdf(3 / se, 4)))
    assert c.p == pytest.approx(0.013236, abs=1e-6)
    assert "p=0.013" in c.format()
    # symmetric differences: no effect
    assert paired_t([-2, 2, -1, 1]).p == pytest.approx(1.0)
    one = paired_t([4.0])
    assert one.n == 1 and math.isnan(one.p) and "no interval" in one.format()


def test_paired_comparison_averages_seeds_within_a_split():
    # (split, a, b): split 0 differences 2 and 4 -> 3; split 1: 1; split 2: 5
    pairs = [(0, 12, 10), (0, 14, 10), (1, 11, 10), (2, 15, 10)]
    c = paired_over_groups(pairs)
    ref = paired_t([3, 1, 5])
    assert (c.mean, c.low, c.high, c.p, c.n) == (ref.mean, ref.low, ref.high, ref.p, 3)
    assert "over 3 splits" in c.method
    single = paired_over_groups([(0, 12, 10), (0, 11, 10), (0, 13, 10)])
    assert single.n == 3 and single.mean == 2 and "seeds of one split" in single.method


def test_bootstrap_interval_is_reproducible_and_covers_the_mean():
    values = np.random.default_rng(0).normal(10, 2, 200)
    a = bootstrap_ci(values, seed=3)
    assert a == bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)
    assert a[0] < values.mean() < a[1]
    # about mean +- 1.96 sd / sqrt(n)
    assert a[1] - a[0] == pytest.approx(2 * 1.96 * values.std() / np.sqrt(200), rel=0.15)
