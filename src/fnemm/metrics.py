"""Retrieval metrics: recall@K, median and mean rank, in both directions.

Pure, vectorised functions over a score matrix ``scores[i, c]`` (images x
captions) and ``caption_image[c]``, the index of the image caption ``c`` describes.
Each image may have any number of captions (5 in the standard protocol).

Ties are ranked pessimistically: a wrong item scoring exactly as high as the
right one is counted above it. A collapsed model (all scores equal) therefore
gets chance-level ranks instead of perfect ones.
"""

from __future__ import annotations

import math

import numpy as np
import torch

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
    # Correct captions tied with the best one are not "above" it.
    correct_at_best = torch.zeros(n_images, dtype=torch.long, device=scores.device)
    correct_at_best.scatter_add_(0, caption_image, (positive >= best[caption_image]).long())
    at_or_above = torch.empty(n_images, dtype=torch.long, device=scores.device)
    for start in range(0, n_images, ROW_BLOCK):
        rows = slice(start, start + ROW_BLOCK)
        at_or_above[rows] = torch.count_nonzero(scores[rows] >= best[rows, None], dim=1)
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
        with torch.no_grad():
            return metrics_from_scores(score_matrix(image_emb, caption_emb, similarity), caption_image)
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
