"""Retrieval metrics: recall@K, median and mean rank, in both directions.

Pure, vectorised functions over a score matrix ``scores[i, c]`` (images x
captions) and ``caption_image[c]``, the index of the image caption ``c`` describes.
Each image may have any number of captions (5 in the standard protocol).

Ties are ranked pessimistically: a wrong item scoring exactly as high as the
right one is counted above it. A collapsed model (all scores equal) therefore
gets chance-level ranks instead of perfect ones.

``ranks`` is the entry point from embeddings. From MSCOCO-1K size up on a CPU it
avoids ranking a float32 matrix: cosine is screened with a bfloat16 product (where
the CPU has bfloat16 units), order similarity with the compiled kernel's float32
scores, and the comparisons within the screen's proven error are redone in float64.
Those ranks are the float64 scores' ranks; a float32 matrix's can differ from them
only on scores tied to within float32 rounding.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from fnemm import kernels
from fnemm.losses import scores as score_matrix

RECALL_KS = (1, 5, 10)
# Rows of the score matrix compared at once. Small blocks keep the comparison's
# boolean temporary in cache (32 x 25,000 = 0.8 MB): 3-4x faster than 256 rows.
ROW_BLOCK = 32


def _positive_scores(scores: torch.Tensor, caption_image: torch.Tensor) -> torch.Tensor:
    """scores[caption_image[c], c] for every caption c."""
    return scores[caption_image, torch.arange(scores.shape[1], device=scores.device)]


def i2t_ranks(scores: torch.Tensor, caption_image: torch.Tensor) -> torch.Tensor:
    """Image annotation: for each image, the 1-based rank of its best-ranked caption."""
    n_images = scores.shape[0]
    positive = _positive_scores(scores, caption_image)
    best = torch.full((n_images,), -math.inf, dtype=scores.dtype, device=scores.device)
    best = best.scatter_reduce(0, caption_image, positive, reduce="amax")
    at_or_above = torch.empty(n_images, dtype=torch.long, device=scores.device)
    for start in range(0, n_images, ROW_BLOCK):
        rows = slice(start, start + ROW_BLOCK)
        at_or_above[rows] = torch.count_nonzero(scores[rows] >= best[rows, None], dim=1)
    return _i2t_from_counts(at_or_above, positive, best, caption_image)


def _i2t_from_counts(at_or_above: torch.Tensor, positive: torch.Tensor, best: torch.Tensor,
                     caption_image: torch.Tensor) -> torch.Tensor:
    """i2t ranks from each image's count of scores at or above its best positive:
    its correct captions tied with the best one are not "above" it."""
    correct_at_best = torch.zeros(len(best), dtype=torch.long, device=best.device)
    correct_at_best.scatter_add_(0, caption_image, (positive >= best[caption_image]).long())
    return 1 + at_or_above - correct_at_best


def t2i_ranks(scores: torch.Tensor, caption_image: torch.Tensor) -> torch.Tensor:
    """Image retrieval: for each caption, the 1-based rank of its image."""
    positive = _positive_scores(scores, caption_image)
    # The true image itself satisfies >=, so the count is already 1-based.
    ranks = torch.zeros(scores.shape[1], dtype=torch.long, device=scores.device)
    for start in range(0, scores.shape[0], ROW_BLOCK):
        ranks += (scores[start:start + ROW_BLOCK] >= positive).sum(0)
    return ranks


def rank_summary(ranks: torch.Tensor, prefix: str) -> dict[str, float]:
    """R@1/5/10 (percent), median rank and mean rank of 1-based ``ranks``."""
    ranks = ranks.double()
    out = {f"{prefix}_r{k}": 100.0 * (ranks <= k).double().mean().item() for k in RECALL_KS}
    # Median as in the reference code: floor of the (possibly .5) median.
    out[f"{prefix}_medr"] = float(np.floor(np.median(ranks.cpu().numpy())))
    out[f"{prefix}_meanr"] = ranks.mean().item()
    return out


def metrics_from_ranks(i2t: torch.Tensor, t2i: torch.Tensor) -> dict[str, float]:
    """All metrics of per-query ranks; ``rsum`` is the sum of the six recalls."""
    out = rank_summary(i2t, "i2t")
    out.update(rank_summary(t2i, "t2i"))
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS)
    return out


def ranks(image_emb: torch.Tensor, caption_emb: torch.Tensor, caption_image: torch.Tensor,
          similarity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(i2t, t2i) ranks of embedded images and captions: i2t_ranks and t2i_ranks of
    their score matrix; from SCREEN_MIN_PAIRS pairs up on a CPU, without ranking a
    float32 matrix: screened_cosine_ranks (CPUs with bfloat16 units) and
    banded_order_ranks (where the C kernel is built)."""
    caption_image = torch.as_tensor(caption_image, dtype=torch.long, device=image_emb.device)
    image_emb, caption_emb = image_emb.detach(), caption_emb.detach()
    with torch.no_grad():
        if similarity == "cosine" and _screenable(image_emb, caption_emb):
            screened = screened_cosine_ranks(image_emb, caption_emb, caption_image)
            if screened is not None:
                return screened
        if (similarity == "order" and image_emb.shape[0] * caption_emb.shape[0] >= SCREEN_MIN_PAIRS
                and kernels.applies(image_emb, caption_emb)):
            banded = banded_order_ranks(image_emb, caption_emb, caption_image)
            if banded is not None:
                return banded
        matrix = score_matrix(image_emb, caption_emb, similarity)
        return i2t_ranks(matrix, caption_image), t2i_ranks(matrix, caption_image)


# Screening pays from about MSCOCO 1K (1,000 x 5,000) up; below, the float32 product
# takes milliseconds.
SCREEN_MIN_PAIRS = 1 << 22
# Give up screening (and take the plain path) when the candidates exceed this share of
# all pairs: a collapsed model, where every score sits at every threshold.
SCREEN_MAX_SHARE = 0.05
BF16_U = 2.0 ** -8       # unit roundoff of bfloat16 (8 significant bits)
F32_U = 2.0 ** -24


def _screenable(image_emb: torch.Tensor, caption_emb: torch.Tensor) -> bool:
    if image_emb.device.type != "cpu" or image_emb.dtype != torch.float32 or caption_emb.dtype != torch.float32:
        return False
    if image_emb.shape[0] * caption_emb.shape[0] < SCREEN_MIN_PAIRS:
        return False
    # Without AMX or AVX512-BF16 a bfloat16 product is no faster than float32.
    hw = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(f is not None and f() for f in hw)


def _exact_dots(image_emb: torch.Tensor, caption_emb: torch.Tensor, rows: torch.Tensor,
                cols: torch.Tensor) -> torch.Tensor:
    """image_emb[rows[j]] . caption_emb[cols[j]] for every j, ``rows`` sorted, in the
    inputs' dtype: one sampled product (each value a dot product in a fixed order,
    whatever else is sampled, so two calls agree bit for bit on a shared pair)."""
    n = image_emb.shape[0]
    crow = torch.zeros(n + 1, dtype=torch.long)
    crow[1:] = torch.bincount(rows, minlength=n).cumsum(0)
    with warnings.catch_warnings():     # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, cols, torch.zeros(len(cols), dtype=image_emb.dtype),
                                          size=(n, caption_emb.shape[0]), check_invariants=False)
    return torch.sparse.sampled_addmm(pattern, image_emb, caption_emb.t(), beta=0.0).values()


def _thresholds(exact, n: int, caption_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (positive, best): each caption's score with its image, and each image's
    best over its captions (-inf for an image without captions); ``exact(rows, cols)``
    scores pairs in float64 (rows sorted)."""
    owner_order = torch.argsort(caption_image, stable=True)
    positive = torch.empty(len(caption_image), dtype=torch.float64)
    positive[owner_order] = exact(caption_image[owner_order], owner_order)
    best = torch.full((n,), -math.inf, dtype=torch.float64)
    return positive, best.scatter_reduce(0, caption_image, positive, reduce="amax")


def _add_band_hits(band: list[torch.Tensor], thresholds: torch.Tensor, side: int, counts: torch.Tensor,
                   exact) -> None:
    """counts[q] += how many of the (row, column) pairs of query q (q their column for
    side 1, their row for side 0) score at least thresholds[q] in float64."""
    pairs = torch.cat(band)
    scores = exact(pairs[:, 0].contiguous(), pairs[:, 1].contiguous())
    counts.index_add_(0, pairs[:, side], (scores >= thresholds[pairs[:, side]]).long())


def _float32_cuts(threshold: torch.Tensor, err: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (low, high) cuts for bfloat16 screening scores (compared as float32,
    exactly): an exact score can reach ``threshold`` only if its screening score is at
    least low, and surely does if above high. Between the error ``err`` and the
    output's rounding (|s_bf16 - x| <= 2^-8 |s_bf16|): low = (t - err) - u|t - err|,
    high = (t + err) / (1 -+ u); each then moved outward past float32's rounding."""
    lo = threshold - err
    lo = lo - BF16_U * lo.abs()
    hi = threshold + err
    hi = torch.where(hi >= 0, hi / (1 - BF16_U), hi / (1 + BF16_U))
    return _outward_float32(lo, hi, threshold)


def _outward_float32(lo: torch.Tensor, hi: torch.Tensor, threshold: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 cuts as float32, moved outward past float32's rounding; a threshold of
    -inf (an image without captions: every score is above it) stays -inf."""
    lo, hi = lo - 2 * F32_U * lo.abs(), hi + 2 * F32_U * hi.abs()     # the cast rounds by <= 1u
    finite = torch.isfinite(threshold)
    return (torch.where(finite, lo, threshold).float().contiguous(),
            torch.where(finite, hi, threshold).float().contiguous())


def screened_cosine_ranks(image_emb: torch.Tensor, caption_emb: torch.Tensor, caption_image: torch.Tensor,
                          block: int = 256) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Exact (i2t, t2i) cosine ranks without the float32 score matrix.

    A rank only needs to know which scores reach its query's threshold (the positive
    caption's score for t2i, the image's best positive for i2t). The bfloat16 product
    (AMX: ~4x the float32 one) decides that for all but the scores within its proven
    error of a threshold; those (with the C kernel; without it, also every score
    above the lower cut) are recomputed in float64 one dot product each (a sampled
    product), as are the thresholds themselves. The ranks
    are those of the float64 scores: they can differ from a float32 matrix's only
    where two scores tie to within float32 rounding (about 1e-8), and are then right.

    The error bound, per pair, with a = a_hi + a_lo (a_hi = bf16(a)):
    |a.b - a_hi.b_hi| <= |a_lo||b| + |a_hi||b_lo|, plus float32 accumulation of the
    exact bfloat16 products (gamma_d |a_hi||b_hi|) and the float64 dot's own
    (gamma_d |a||b|, negligible), and the output's rounding to bfloat16 (relative 2^-8).
    It assumes float32 accumulation, which torch's bfloat16 CPU product has (oneDNN's
    default "strict" accumulation mode; the native fallback accumulates in float).
    It is taken with the norms' maximum on the other side, so each caption (column)
    and each image (row) has its own cuts.

    Returns None when too many scores sit near the thresholds to gain (a collapsed
    model): the caller computes the full matrix.
    """
    a, b = image_emb.contiguous(), caption_emb.contiguous()
    n, m, d = a.shape[0], b.shape[0], a.shape[1]
    if n == 0 or m == 0:
        return None
    a_hi, b_hi = a.to(torch.bfloat16), b.to(torch.bfloat16)

    def norms(x: torch.Tensor, x_hi: torch.Tensor):
        """Upper bounds of |x|, |x_hi|, |x - x_hi| per row: float32 norms (x - x_hi is
        exact in float32) raised by their own rounding error."""
        hi = x_hi.float()
        up = 1 + 2 * d * F32_U
        return (x.norm(dim=1).double() * up, hi.norm(dim=1).double() * up,
                (x - hi).norm(dim=1).double() * up + 2.0 ** -120)

    na, na_hi, na_lo = norms(a, a_hi)
    nb, nb_hi, nb_lo = norms(b, b_hi)
    gamma32 = d * F32_U / (1 - d * F32_U)
    gamma64 = d * 2.0 ** -53 / (1 - d * 2.0 ** -53)
    tiny = d * 2.0 ** -126 * 4      # bf16 units flush subnormal products to zero

    def bound(n_lo, n_other, n_hi, n_other_lo, n_other_hi, n_own, n_other_full):
        return (n_lo * n_other + n_hi * n_other_lo + gamma32 * n_hi * n_other_hi
                + gamma64 * n_own * n_other_full + tiny) * (1 + 1e-9)

    # Per caption: the worst image; per image: the worst caption.
    err_c = bound(na_lo.max(), nb, na_hi.max(), nb_lo, nb_hi, na.max(), nb)
    err_i = bound(na_lo, nb.max(), na_hi, nb_lo.max(), nb_hi.max(), na, nb.max())

    a64, b64 = a.double(), b.double()

    def exact(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return _exact_dots(a64, b64, rows, cols)

    positive, best = _thresholds(exact, n, caption_image)

    def cut(threshold: torch.Tensor, err: torch.Tensor) -> torch.Tensor:
        """A bfloat16 value at or below every bfloat16 score whose exact score can
        reach ``threshold``: below by the error, by the output's rounding (relative
        2^-8), and once more so that rounding the cut itself to bfloat16 cannot lift it."""
        low = threshold - err
        low = low - BF16_U * low.abs()
        low = low - 2 * BF16_U * low.abs()
        return low.to(torch.bfloat16)

    b_hi_t = b_hi.t()
    budget = SCREEN_MAX_SHARE * n * m
    t2i = torch.zeros(m, dtype=torch.long)
    at_or_above = torch.zeros(n, dtype=torch.long)
    if kernels.applies(a, b):
        # Two cuts a side, one pass in C: scores certainly above are counted, only the
        # band between the cuts is recomputed.
        low_c, high_c = _float32_cuts(positive, err_c)
        low_i, high_i = _float32_cuts(best, err_i)
        band_t, band_i, total = [], [], 0
        for start in range(0, n, block):
            approx = a_hi[start:start + block] @ b_hi_t
            t, i = kernels.bands(approx, start, low_c, high_c, low_i, high_i, t2i, at_or_above)
            total += len(t) + len(i)
            if total > budget:
                return None
            band_t.append(t)
            band_i.append(i)
        _add_band_hits(band_t, positive, 1, t2i, exact)
        _add_band_hits(band_i, best, 0, at_or_above, exact)
    else:
        # Torch only: every score that may reach a threshold is recomputed.
        cut_c, cut_i = cut(positive, err_c), cut(best, err_i)
        rows, cols, total = [], [], 0
        for start in range(0, n, block):
            approx = a_hi[start:start + block] @ b_hi_t
            near = (approx >= cut_c).logical_or_(approx >= cut_i[start:start + block, None])
            r, c = near.nonzero(as_tuple=True)
            total += len(r)
            if total > budget:
                return None
            rows.append(r + start)
            cols.append(c)
        rows, cols = torch.cat(rows), torch.cat(cols)
        scores = exact(rows, cols)
        t2i.index_add_(0, cols, (scores >= positive[cols]).long())
        at_or_above.index_add_(0, rows, (scores >= best[rows]).long())
    return _i2t_from_counts(at_or_above, positive, best, caption_image), t2i


def banded_order_ranks(image_emb: torch.Tensor, caption_emb: torch.Tensor, caption_image: torch.Tensor,
                       block: int = 512) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Exact (i2t, t2i) order-similarity ranks: those of the float64 scores.

    The compiled kernel's float32 scores (fnemm.kernels), a block of images at a time,
    settle every comparison with a threshold except those within their proven error:
    a score is a negated sum of d non-negative terms, each within 3u of its exact
    value (u = 2^-24: the subtraction and the square), summed in any order, so
    |s_float32 - s| <= gamma_(d+2) |s|; a threshold t <= 0 is certainly reached when
    s_float32 > t + gamma |t| and certainly not when s_float32 < t - gamma |t|. The
    scores in between (about one per query) and the thresholds themselves (the
    positive pairs) are recomputed in float64. None for an empty side (the caller's
    plain path handles it).
    """
    a, b = image_emb.contiguous(), caption_emb.contiguous()
    n, m, d = a.shape[0], b.shape[0], a.shape[1]
    if n == 0 or m == 0:
        return None
    gamma = (d + 2) * F32_U / (1 - (d + 2) * F32_U)

    def exact(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return kernels.order_pairs(a, b, rows, cols)

    positive, best = _thresholds(exact, n, caption_image)

    def cuts(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (low, high) around float64 thresholds: the error either side."""
        width = gamma * t.abs() * (1 + 1e-9) + 2.0 ** -140
        return _outward_float32(t - width, t + width, t)

    low_c, high_c = cuts(positive)
    low_i, high_i = cuts(best)
    t2i = torch.zeros(m, dtype=torch.long)
    at_or_above = torch.zeros(n, dtype=torch.long)
    band_t, band_i = [], []
    for start in range(0, n, block):
        approx = kernels.order_scores(a[start:start + block], b)
        t, i = kernels.bands(approx, start, low_c, high_c, low_i, high_i, t2i, at_or_above)
        band_t.append(t)
        band_i.append(i)
    _add_band_hits(band_t, positive, 1, t2i, exact)
    _add_band_hits(band_i, best, 0, at_or_above, exact)
    return _i2t_from_counts(at_or_above, positive, best, caption_image), t2i


def metrics_from_scores(scores: torch.Tensor, caption_image: torch.Tensor) -> dict[str, float]:
    """All metrics of one score matrix; ``rsum`` is the sum of the six recalls."""
    caption_image = caption_image.to(scores.device)
    return metrics_from_ranks(i2t_ranks(scores, caption_image), t2i_ranks(scores, caption_image))


def evaluate_embeddings(
    image_emb: torch.Tensor,
    caption_emb: torch.Tensor,
    caption_image: torch.Tensor,
    similarity: str,
    folds: int = 1,
) -> dict[str, float]:
    """Metrics of embedded images and captions; ``folds`` > 1 averages over that
    many equal consecutive image folds (MSCOCO's 5-fold 1K protocol)."""
    caption_image = torch.as_tensor(caption_image, dtype=torch.long)
    n_images = image_emb.shape[0]
    if folds == 1:
        return metrics_from_ranks(*ranks(image_emb, caption_emb, caption_image, similarity))
    if n_images % folds:
        raise ValueError(f"{n_images} images cannot be split into {folds} equal folds")
    size = n_images // folds
    per_fold = []
    for f in range(folds):
        lo, hi = f * size, (f + 1) * size
        mask = (caption_image >= lo) & (caption_image < hi)
        per_fold.append(evaluate_embeddings(image_emb[lo:hi], caption_emb[mask],
                                            caption_image[mask] - lo, similarity))
    return {key: sum(m[key] for m in per_fold) / folds for key in per_fold[0]}


def format_metrics(m: dict[str, float]) -> str:
    """One line: 'i2t R@1 R@5 R@10 medr | t2i ... | rsum'."""
    def side(d: str) -> str:
        return " ".join(f"{m[f'{d}_r{k}']:.1f}" for k in RECALL_KS) + f" medr {m[f'{d}_medr']:.0f}"
    return f"i2t {side('i2t')} | t2i {side('t2i')} | rsum {m['rsum']:.1f}"
