"""Small, dependency-free statistics for comparing models: Student's t distribution,
paired comparisons with intervals, and the bootstrap (pure functions).

The t distribution's CDF is the regularised incomplete beta function, evaluated by
its continued fraction (Lentz's method, as in Numerical Recipes §6.4); quantiles by
bisection on the CDF. Accurate to ~1e-10, far below what a study of a few runs needs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


def _betacf(a: float, b: float, x: float, eps: float = 1e-14, tiny: float = 1e-300) -> float:
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_ppf(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t (bisection on :func:`t_cdf`)."""
    if not 0 < q < 1:
        raise ValueError("q must be in (0, 1)")
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclass
class Comparison:
    """A paired difference (a - b): its mean, 95% interval and two-sided p-value."""
    mean: float
    low: float
    high: float
    p: float
    n: int                   # independent units (the pairs the test is over)
    method: str

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self, digits: int = 1) -> str:
        if self.n < 2:
            return f"{self.mean:+.{digits}f} (n={self.n}: no interval)"
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}], {format_p(self.p)}"


def format_p(p: float) -> str:
    """'p=0.123', or 'p<0.001' (never 'p=<0.001')."""
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def paired_t(differences, level: float = 0.95, method: str = "paired t-test") -> Comparison:
    """Paired t-test of differences whose mean should be 0 under the null: the mean,
    its ``level`` interval and the two-sided p-value, with n - 1 degrees of freedom."""
    d = np.asarray(differences, np.float64)
    n = len(d)
    mean = float(d.mean()) if n else math.nan
    if n < 2:
        return Comparison(mean, math.nan, math.nan, math.nan, n, method)
    se = float(d.std(ddof=1)) / math.sqrt(n)
    if se == 0:
        return Comparison(mean, mean, mean, 0.0 if mean else 1.0, n, method)
    t = mean / se
    half = t_ppf(0.5 + level / 2, n - 1) * se
    p = 2 * (1 - t_cdf(abs(t), n - 1))
    return Comparison(mean, mean - half, mean + half, p, n, method)


def paired_over_groups(pairs: list[tuple[object, float, float]], level: float = 0.95) -> Comparison:
    """Compare two arms measured in pairs ``(group, a, b)``: each group's differences
    (a - b) are first averaged (e.g. the seeds of one data split, which share its test
    images and so are not independent), then a paired t-test runs over the groups. With
    a single group it falls back to the pairs themselves and says so."""
    groups: dict[object, list[float]] = {}
    for g, a, b in pairs:
        groups.setdefault(g, []).append(a - b)
    if len(groups) >= 2:
        means = [float(np.mean(v)) for v in groups.values()]
        per = sorted({len(v) for v in groups.values()})
        each = "" if per == [1] else f" (each the mean of its {'/'.join(map(str, per))} seeds)"
        return paired_t(means, level, f"paired t-test over {len(groups)} splits{each}")
    only = next(iter(groups.values()), [])
    return paired_t(only, level, f"paired t-test over {len(only)} seeds of one split")


def bootstrap_ci(values, statistic=np.mean, draws: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over resamples of ``values``
    (rows of a 1-D or 2-D array), reproducible for a seed."""
    values = np.asarray(values)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(draws, len(values)))
    stats = np.array([statistic(values[i]) for i in idx])
    alpha = (1 - level) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))


# --- recalls from per-query ranks, and their bootstrap over test images ------------------

KS = (1, 5, 10)


def _per_image(ranks: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i2t hits (images x K), t2i hits summed per image (images x K), captions per image)."""
    i2t = np.asarray(ranks["i2t"])
    t2i = np.asarray(ranks["t2i"])
    owner = np.asarray(ranks["caption_image"])
    n = len(i2t)
    hits_i2t = np.stack([i2t <= k for k in KS], 1).astype(np.float64)
    hits_t2i = np.zeros((n, len(KS)))
    for j, k in enumerate(KS):
        np.add.at(hits_t2i[:, j], owner, (t2i <= k).astype(np.float64))
    return hits_i2t, hits_t2i, np.bincount(owner, minlength=n).astype(np.float64)


def rsum_of(ranks: dict, weights: np.ndarray | None = None) -> np.ndarray:
    """rsum of per-query ranks with images weighted by ``weights`` (draws x images: how
    often each image is drawn; None: once each): one value per row of weights."""
    hi, ht, caps = _per_image(ranks)
    w = np.ones((1, len(hi))) if weights is None else np.asarray(weights, np.float64)
    i2t = 100 * (w @ hi) / w.sum(1, keepdims=True)
    t2i = 100 * (w @ ht) / (w @ caps)[:, None]
    return i2t.sum(1) + t2i.sum(1)


def image_draws(n: int, draws: int = 2000, seed: int = 0) -> np.ndarray:
    """Bootstrap resamples of n test images: (draws x n) counts, each row summing to n."""
    return np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=draws).astype(np.float64)


def seed_means(per_seed: np.ndarray, seed: int = 1) -> np.ndarray:
    """For each draw (column), the mean of a resample of the seeds (rows) - or of the one
    seed: the second level of a two-level bootstrap over seeds and test images."""
    s, draws = per_seed.shape
    if s == 1:
        return per_seed[0]
    pick = np.random.default_rng(seed).integers(0, s, size=(draws, s))
    return per_seed[pick, np.arange(draws)[:, None]].mean(1)


def bootstrap_rsum(seeds: list[dict], draws: int = 2000, seed: int = 0, level: float = 0.95,
                   weights: np.ndarray | None = None) -> tuple[float, float, np.ndarray]:
    """(low, high, per-draw values) of the mean rsum over ``seeds`` (each a dict of per-query
    ranks on the same test images), resampling test images and, with several, seeds."""
    n = len(seeds[0]["i2t"])
    w = image_draws(n, draws, seed) if weights is None else weights
    values = seed_means(np.stack([rsum_of(r, w) for r in seeds]), seed + 1)
    alpha = (1 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha)), values


def paired_bootstrap(a: list[dict], b: list[dict], draws: int = 2000, seed: int = 0,
                     level: float = 0.95) -> Comparison:
    """Model ``a`` minus model ``b`` in mean rsum, both on the same test images (each a list
    of per-seed ranks): the same image resample for both in every draw. Two-sided p-value
    from the share of draws on the other side of 0."""
    if any(x["images"] != a[0]["images"] or len(x["t2i"]) != len(a[0]["t2i"]) for x in [*a, *b]):
        raise ValueError("the two models (every seed of each) were not evaluated on the same test images "
                         "and captions")
    w = image_draws(len(a[0]["i2t"]), draws, seed)
    _, _, va = bootstrap_rsum(a, draws, seed, level, w)
    _, _, vb = bootstrap_rsum(b, draws, seed + 2, level, w)
    diff = va - vb
    point = float(np.mean([rsum_of(r)[0] for r in a]) - np.mean([rsum_of(r)[0] for r in b]))
    alpha = (1 - level) / 2
    below, above = np.sum(diff <= 0), np.sum(diff >= 0)
    p = min(1.0, 2 * (min(below, above) + 1) / (draws + 1))
    return Comparison(point, float(np.quantile(diff, alpha)), float(np.quantile(diff, 1 - alpha)), p,
                      len(a[0]["i2t"]), f"paired bootstrap over {len(a[0]['i2t'])} test images, {draws} draws"
                      + (f", seeds resampled ({len(a)} vs {len(b)})" if len(a) > 1 or len(b) > 1 else ""))


# --- learning curves ---------------------------------------------------------------------

def crossings(gap: dict[int, float]) -> list[float]:
    """Training sizes where a gap (by size) changes sign between two measured sizes,
    interpolated linearly in log2(size)."""
    sizes = sorted(gap)
    out = []
    for a, b in zip(sizes, sizes[1:]):
        ga, gb = gap[a], gap[b]
        if ga * gb < 0:
            t = ga / (ga - gb)
            out.append(float(2 ** (np.log2(a) + t * (np.log2(b) - np.log2(a)))))
    return out


def bootstrap_slope(paired: dict[int, tuple[list[dict], list[dict]]], draws: int = 2000, seed: int = 0,
                    level: float = 0.95) -> Comparison:
    """The slope of (variant - baseline) rsum against log2(training images), with a paired
    bootstrap over the shared test images: every draw resamples the test images once for
    every size and both arms (and each arm's seeds), recomputes each size's gap and fits the
    slope. ``paired``: {size: (the variant's per-seed ranks, the baseline's)}."""
    sizes = sorted(paired)
    n = len(paired[sizes[0]][0][0]["i2t"])
    w = image_draws(n, draws, seed)
    x = np.log2(np.array(sizes, np.float64))
    x = x - x.mean()
    gaps, points = [], []
    for k, size in enumerate(sizes):
        mine, base = paired[size]
        va = seed_means(np.stack([rsum_of(r, w) for r in mine]), seed + 1 + 2 * k)
        vb = seed_means(np.stack([rsum_of(r, w) for r in base]), seed + 2 + 2 * k)
        gaps.append(va - vb)
        points.append(np.mean([rsum_of(r)[0] for r in mine]) - np.mean([rsum_of(r)[0] for r in base]))
    slopes = (x[:, None] * np.stack(gaps)).sum(0) / (x * x).sum()
    point = float((x * np.array(points)).sum() / (x * x).sum())
    alpha = (1 - level) / 2
    p = min(1.0, 2 * (min(np.sum(slopes <= 0), np.sum(slopes >= 0)) + 1) / (draws + 1))
    seeds = sorted({len(paired[s][0]) for s in sizes})
    return Comparison(point, float(np.quantile(slopes, alpha)), float(np.quantile(slopes, 1 - alpha)), p, n,
                      f"paired bootstrap of the slope over {n} test images, {draws} draws"
                      + (f", {'/'.join(map(str, seeds))} seeds a size resampled" if seeds != [1] else ""))
