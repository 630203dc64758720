"""Retrieval metrics: recall@K, median and mean rank, in both directions.

Pure, vectorised functions over a score matrix ``scores[i, c]`` (images x
captions) and ``caption_image[c]``, the index of the image caption ``c`` describes.
Each image may have any number of captions (5 in the standard protocol).

Ties are ranked pessimistically: a wrong item scoring exactly as high as the
right one is counted above it. A collapsed model (all scores equal) therefore
gets chance-level ranks instead of perfect ones.

``ranks`` is the entry point from embeddings: the score matrix is never held whole.
Its rows are computed a tile at a time (a matrix product for cosine; the compiled
kernel of fnemm.eval.kernels, or torch tiles, for order similarity) and compared
with every query's threshold, so memory is O(tile x captions) on a CPU or a GPU, and
MSCOCO's training split ranks in a few hundred MB. The ranks are the score matrix's,
exact ties included; only a score within float32 rounding of a threshold may fall on
either side of it (see ``ranks``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fnemm.eval import kernels
from fnemm.joint.losses import cosine_scores, order_scores

RECALL_KS = (1, 5, 10)
# Rows of a score tile compared at once. Small blocks keep the comparison's boolean
# temporary in cache (32 x 25,000 = 0.8 MB): 3-4x faster than 256 rows.
ROW_BLOCK = 32
# Scores held at once by ``ranks``: 2^24 float32 = 64 MB (about 670 images' rows
# against MSCOCO 5K's 25,000 captions, 134 against its training split's 566,000).
TILE_SCORES = 1 << 24
# Pairs scored at once in float64 for the thresholds.
PAIR_CHUNK = 8192


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
    # its correct captions tied with the best one are not "above" it
    correct_at_best = torch.zeros(n_images, dtype=torch.long, device=scores.device)
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


def metrics_from_scores(scores: torch.Tensor, caption_image: torch.Tensor) -> dict[str, float]:
    """All metrics of one score matrix; ``rsum`` is the sum of the six recalls."""
    caption_image = caption_image.to(scores.device)
    return metrics_from_ranks(i2t_ranks(scores, caption_image), t2i_ranks(scores, caption_image))


# --- from embeddings, a tile at a time -------------------------------------------------

def score_tile(images: torch.Tensor, captions: torch.Tensor, similarity: str) -> torch.Tensor:
    """Scores of some images against captions, without gradients: cosine by a matrix
    product; order similarity by the compiled kernel where it applies (CPU float32),
    else torch's tiles."""
    if similarity == "cosine":
        return cosine_scores(images, captions)
    if similarity == "order":
        fast = kernels.order_scores(images, captions)
        return fast if fast is not None else order_scores(images, captions)
    raise ValueError(f"unknown similarity {similarity!r}")


def pair_scores(image_emb: torch.Tensor, caption_emb: torch.Tensor, caption_image: torch.Tensor,
                similarity: str) -> torch.Tensor:
    """Each caption's score with its own image, in float64 (one dot product or order
    penalty a pair, a chunk of pairs at a time)."""
    out = torch.empty(len(caption_image), dtype=torch.float64, device=caption_emb.device)
    for start in range(0, len(caption_image), PAIR_CHUNK):
        stop = start + PAIR_CHUNK
        a, b = image_emb[caption_image[start:stop]].double(), caption_emb[start:stop].double()
        if similarity == "cosine":
            out[start:stop] = (a * b).sum(1)
        else:
            out[start:stop] = -(b - a).clamp(min=0).square().sum(1)
    return out


def duplicate_rows(x: torch.Tensor) -> list[torch.Tensor]:
    """Groups (of two or more) of identical rows of ``x``, each a tensor of row indices:
    rows are keyed by a random projection, and rows with equal keys compared exactly."""
    if len(x) < 2:
        return []
    g = torch.Generator(device="cpu").manual_seed(0)
    weights = torch.rand(x.shape[1], generator=g, dtype=torch.float64).to(x.device)
    key = torch.cat([(x[s:s + PAIR_CHUNK].double() @ weights).cpu() for s in range(0, len(x), PAIR_CHUNK)])
    order = torch.argsort(key, stable=True)
    same = (key[order][1:] == key[order][:-1]).nonzero().flatten().tolist()
    groups: list[list[int]] = []
    for k in same:                       # a run of equal keys: split it into truly equal rows
        a, b = int(order[k]), int(order[k + 1])
        for group in groups:
            if group[-1] == a and torch.equal(x[group[0]], x[b]):
                group.append(b)
                break
        else:
            if torch.equal(x[a], x[b]):
                groups.append([a, b])
    return [torch.tensor(sorted(group), device=x.device) for group in groups]


def ranks(image_emb: torch.Tensor, caption_emb: torch.Tensor, caption_image: torch.Tensor,
          similarity: str, tile_scores: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(i2t, t2i) ranks of embedded images and captions, as ``i2t_ranks`` and
    ``t2i_ranks`` rank the score matrix, computed a tile of image rows at a time
    (``tile_scores`` scores at once).

    An image's threshold (its best caption's score) comes from its own row of the
    tile, like the scores it is compared with. A caption's threshold (its image's
    score) is computed from the pair: the tile holding its image is not at hand when
    the others are. Images identical to a caption's own are counted as tied with it,
    as in the whole matrix; a rival scoring within float32 rounding of a threshold may
    rank on either side of it (as in any float32 ranking)."""
    image_emb, caption_emb = image_emb.detach(), caption_emb.detach()
    device = image_emb.device
    owner = torch.as_tensor(caption_image, dtype=torch.long, device=device)
    n, m = image_emb.shape[0], caption_emb.shape[0]
    with torch.no_grad():
        dtype = torch.promote_types(image_emb.dtype, caption_emb.dtype)
        positive = pair_scores(image_emb, caption_emb, owner, similarity).to(dtype)
        t2i = torch.ones(m, dtype=torch.long, device=device)
        i2t = torch.ones(n, dtype=torch.long, device=device)
        by_owner = torch.argsort(owner, stable=True)          # captions grouped by image
        starts = torch.searchsorted(owner[by_owner], torch.arange(n + 1, device=device))
        groups = duplicate_rows(image_emb)
        group_of = torch.full((n,), -1, dtype=torch.long, device=device)
        for k, rows in enumerate(groups):
            group_of[rows] = k
        rows_per_tile = max(1, (tile_scores or TILE_SCORES) // max(m, 1))
        for start in range(0, n, rows_per_tile):
            stop = min(start + rows_per_tile, n)
            tile = score_tile(image_emb[start:stop], caption_emb, similarity)
            own = by_owner[starts[start]:starts[stop]]        # the captions of this tile's images
            own_rows, own_scores = owner[own] - start, tile[owner[own] - start, own]
            best = torch.full((stop - start,), -math.inf, dtype=tile.dtype, device=device).scatter_reduce(
                0, own_rows, own_scores, reduce="amax")
            if not kernels.count_at_or_above(tile, positive, best, t2i, i2t[start:stop]):
                for a in range(0, stop - start, ROW_BLOCK):
                    block = tile[a:a + ROW_BLOCK]
                    t2i += (block >= positive).sum(0)
                    i2t[start + a:start + a + len(block)] += (block >= best[a:a + ROW_BLOCK, None]).sum(1)
            # a pair is not its own rival
            t2i.index_add_(0, own, -(own_scores >= positive[own]).long())
            i2t.index_add_(0, owner[own], -(own_scores >= best[own_rows]).long())
            for k in group_of[start:stop].unique().tolist():   # identical images: counted as ties below
                if k < 0:
                    continue
                rows = groups[k][(groups[k] >= start) & (groups[k] < stop)]
                cols = torch.cat([by_owner[starts[r]:starts[r + 1]] for r in groups[k].tolist()])
                rival = (tile[rows - start][:, cols] >= positive[cols]) & (owner[cols][None, :] != rows[:, None])
                t2i.index_add_(0, cols, -rival.sum(0))
        for rows in groups:
            cols = torch.cat([by_owner[starts[r]:starts[r + 1]] for r in rows.tolist()])
            t2i[cols] += len(rows) - 1
    return i2t, t2i


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


def chance_rsum(n_images: int, captions_per_image: int = 5, draws: int = 20, seed: int = 0) -> tuple[float, float]:
    """rsum (mean, std) of random embeddings on a split of this size: the level to beat."""
    g = torch.Generator().manual_seed(seed)
    owner = torch.from_numpy(np.repeat(np.arange(n_images), captions_per_image))
    values = []
    for _ in range(draws):
        img = torch.nn.functional.normalize(torch.randn(n_images, 64, generator=g), dim=1)
        cap = torch.nn.functional.normalize(torch.randn(len(owner), 64, generator=g), dim=1)
        values.append(evaluate_embeddings(img, cap, owner, "cosine")["rsum"])
    return float(np.mean(values)), float(np.std(values))


def format_metrics(m: dict[str, float]) -> str:
    """One line: 'i2t R@1 R@5 R@10 medr | t2i ... | rsum'."""
    def side(d: str) -> str:
        return " ".join(f"{m[f'{d}_r{k}']:.1f}" for k in RECALL_KS) + f" medr {m[f'{d}_medr']:.0f}"
    return f"i2t {side('i2t')} | t2i {side('t2i')} | rsum {m['rsum']:.1f}"


def at_chance(summary: dict, chance: tuple[float, float]) -> bool:
    """Whether a run's best validation rsum is within 2 std of chance's."""
    return summary.get("val") is not None and summary["val"]["rsum"] <= chance[0] + 2 * chance[1]
