"""fnemm_studies.stats against hand computations and published t-table values (no scipy)."""

import math

import numpy as np
import pytest

from fnemm_studies.stats import betainc, bootstrap_ci, format_p, paired_over_groups, paired_t, t_cdf, t_ppf


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
    assert format_p(0.0004) == "p<0.001" and format_p(0.0126) == "p=0.013"      # never "p=<0.001"
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


def _ranks(i2t, t2i, owner):
    return {"images": [f"i{k}" for k in range(len(i2t))], "i2t": i2t, "t2i": t2i, "caption_image": owner}


def test_rsum_from_ranks_and_its_bootstrap_against_a_loop():
    from fnemm_studies.stats import bootstrap_rsum, image_draws, rsum_of
    r = _ranks([1, 3, 7, 20], [1, 2, 11, 6, 4, 30, 1, 9], [0, 0, 1, 1, 2, 2, 3, 3])
    # by hand: i2t R@1 = 1/4, R@5 = 2/4, R@10 = 3/4; t2i R@1 = 2/8, R@5 = 4/8, R@10 = 6/8
    assert rsum_of(r)[0] == pytest.approx(100 * (0.25 + 0.5 + 0.75 + 0.25 + 0.5 + 0.75))
    w = image_draws(4, draws=50, seed=7)
    assert (w.sum(1) == 4).all()
    loop = []
    for counts in w:                                  # each draw recomputed from its list of images
        picked = [k for k in range(4) for _ in range(int(counts[k]))]
        i2t = [r["i2t"][k] for k in picked]
        t2i = [t for k in picked for t, o in zip(r["t2i"], r["caption_image"]) if o == k]
        loop.append(sum(100 * np.mean([x <= k for x in ranks]) for ranks in (i2t, t2i) for k in (1, 5, 10)))
    np.testing.assert_allclose(rsum_of(r, w), loop)
    low, high, values = bootstrap_rsum([r], draws=50, seed=7)
    np.testing.assert_allclose(values, loop)
    assert low == pytest.approx(np.quantile(loop, 0.025)) and high == pytest.approx(np.quantile(loop, 0.975))


def _good_and_bad(n: int, seed: int) -> tuple[dict, dict]:
    """Per-query ranks of two models on the same n images (5 captions each): one ranks
    near the top, the other far below."""
    rng = np.random.default_rng(seed)
    owner = list(np.repeat(np.arange(n), 5))
    good = _ranks(list(rng.integers(1, 4, n)), list(rng.integers(1, 6, 5 * n)), owner)
    return good, _ranks(list(rng.integers(1, 30, n)), list(rng.integers(1, 40, 5 * n)), owner)


def test_paired_bootstrap_sees_a_real_difference_and_not_a_null_one():
    from fnemm_studies.stats import paired_bootstrap
    n = 120
    good, bad = _good_and_bad(n, 0)
    c = paired_bootstrap([good], [bad], draws=500)
    assert c.mean > 100 and c.low > 0 and c.p < 0.01 and "120 test images" in c.method
    same = paired_bootstrap([good], [good], draws=500)
    assert same.mean == 0 and same.low == 0 == same.high and same.p == 1.0
    # a second seed ranked on other test images is no pair: refused, not mispaired
    other = {**good, "images": [f"other{k}.jpg" for k in range(n)]}
    for a, b in (([good, other], [bad]), ([good], [bad, other])):
        with pytest.raises(ValueError, match="not evaluated on the same test images"):
            paired_bootstrap(a, b, draws=50)


def test_report_leaves_out_a_difference_whose_seeds_were_ranked_on_other_images():
    from pathlib import Path
    from fnemm_studies.report import RunSummary, compare
    n = 40
    one, two = _good_and_bad(n, 1)
    other = {**two, "images": [f"other{k}" for k in range(n)]}
    run = RunSummary("FNE-MH", Path("fne"), [{}, {}], ranks=[one, two])
    assert compare(run, RunSummary("FC7-MH", Path("fc7"), [{}], ranks=[two]), draws=50) is not None
    assert compare(run, RunSummary("FC7-MH", Path("fc7"), [{}, {}], ranks=[two, other]), draws=50) is None


def test_report_says_when_runs_were_scored_on_different_test_images():
    """Two runs scored on other test images (125 and 1,000: the small set gives far higher
    recalls) are not ranked against each other: the table says why their difference is
    missing and the verdict names no winner; on the same images it does."""
    from pathlib import Path
    import torch
    from fnemm.eval.metrics import metrics_from_ranks
    from fnemm_studies.report import RunSummary, markdown_table, verdict

    def summary(label: str, ranks: dict, with_ranks: bool = True) -> RunSummary:
        metrics = {**metrics_from_ranks(torch.tensor(ranks["i2t"]), torch.tensor(ranks["t2i"])),
                   "images": len(ranks["images"]), "captions": len(ranks["t2i"])}
        return RunSummary(label, Path(label), [metrics], ranks=[ranks] if with_ranks else [])

    small, _ = _good_and_bad(25, 2)
    big, worse = _good_and_bad(100, 3)
    fc7, fne = summary("FC7-MH", worse), summary("FNE-MH", small)
    table = markdown_table([fne, fc7], baseline=fc7)
    assert "not comparable: these runs were scored on different test images (FNE-MH: 25 images; FC7-MH: 100 " \
           "images)" in table, table
    assert "neither can be said to be better" in verdict([fne, fc7], fc7)
    same = summary("FNE-MH", big)
    assert "not comparable" not in markdown_table([same, fc7], baseline=fc7)
    assert verdict([same, fc7], fc7).startswith("FNE-MH has the highest mean rsum, +")
    other = summary("FNE-MH", {**big, "images": [f"other{k}" for k in range(100)]})   # as many, others
    assert "(100 images each, not the same ones)" in markdown_table([other, fc7], baseline=fc7)
    counted = summary("FNE-MH", small, with_ranks=False)      # metrics alone: their counts differ
    assert "FNE-MH: 25 images; FC7-MH: 100 images" in markdown_table([counted, fc7], baseline=fc7)
