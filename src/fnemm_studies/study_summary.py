"""The numbers of ``fnemm study``: per CNN x training size x variant, the test rsum over
the finished runs, every recall, how the runs trained, the paired comparisons with the
baseline and with the paper's FNE, and the learning-curve trends."""

from __future__ import annotations

import numpy as np

from fnemm_studies.stats import (Comparison, bootstrap_rsum, bootstrap_slope, crossings, paired_bootstrap,
                                 paired_over_groups)


RECALLS = ("i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr")


def compare(mine: dict, theirs: dict, ranks: dict) -> Comparison | None:
    """Variant ``mine`` minus ``theirs`` in test rsum ({(split, seed): metrics} each, keys
    into ``ranks``: {(split, seed): (their ranks, mine)}): over several splits, a paired
    t-test over the splits (each split's difference averaged over its seeds); on one
    split, a paired bootstrap over its test images (and the seeds of each side), which
    the per-query ranks allow; without them, a t-test over the seeds."""
    common = [k for k in mine if k in theirs]
    if not common:
        return None
    if len({k[0] for k in common}) >= 2 or not all(k in ranks for k in common):
        return paired_over_groups([(k[0], mine[k]["rsum"], theirs[k]["rsum"]) for k in common])
    return paired_bootstrap([ranks[k][1] for k in common], [ranks[k][0] for k in common])


def summarise(rows: dict, grid, full: int, ranks: dict | None = None, training: dict | None = None) -> dict:
    """Per CNN x training size x variant: test rsum over the finished runs, its recalls,
    how the runs trained, and paired comparisons with the baseline and with the paper's
    FNE (same split and seeds; see :func:`compare`). ``rows``, ``ranks`` and ``training``
    are keyed by (cnn, size, variant, split, seed)."""
    ranks, training = ranks or {}, training or {}
    out = []
    for cnn in grid.cnns:
        for size in sorted({k[1] for k in rows if k[0] == cnn}, reverse=True):
            cell = {k[2:]: v for k, v in rows.items() if k[0] == cnn and k[1] == size}
            for name in [v for v in grid.variants if any(k[0] == v for k in cell)]:
                mine = {k[1:]: v for k, v in cell.items() if k[0] == name}
                rsums = np.array([m["rsum"] for m in mine.values()])
                entry = {"cnn": cnn, "train_images": size, "variant": name, "runs": len(mine),
                         "splits": len({k[0] for k in mine}),
                         "rsum_mean": float(rsums.mean()), "rsum_std": float(rsums.std(ddof=1)) if len(rsums) > 1 else 0.0,
                         **{key: float(np.mean([m[key] for m in mine.values()])) for key in RECALLS}}
                mine_ranks = [ranks.get((cnn, size, name, *k)) for k in mine]
                if entry["splits"] == 1 and all(r is not None for r in mine_ranks):
                    low, high, _ = bootstrap_rsum(mine_ranks)
                    entry["rsum_interval"] = [low, high]
                trained = [training[(cnn, size, name, *k)] for k in mine if (cnn, size, name, *k) in training]
                if trained:
                    entry["training"] = {"epochs": [t["epochs"] for t in trained],
                                         "best_epoch": [t["best_epoch"] for t in trained],
                                         "stage_epochs": [t["stage_epochs"] for t in trained],
                                         "plateau_epochs": [t.get("plateau_epochs") for t in trained],
                                         "median_epoch_s": [t.get("median_epoch_s") for t in trained],
                                         "ended_on_plateau": [t.get("ended_on_plateau") for t in trained],
                                         "hours": float(sum(t["seconds"] for t in trained) / 3600),
                                         "code": [t.get("code") for t in trained]}
                for other in ("baseline", "fne"):
                    theirs = {k[1:]: v for k, v in cell.items() if k[0] == other}
                    pair_ranks = {k: (ranks[(cnn, size, other, *k)], ranks[(cnn, size, name, *k)]) for k in mine
                                  if (cnn, size, other, *k) in ranks and (cnn, size, name, *k) in ranks}
                    if other != name and (c := compare(mine, theirs, pair_ranks)) is not None:
                        entry[f"vs_{other}"] = c.to_dict()
                out.append(entry)
    return {"results": out, "full_train_images": full, "trends": trends(rows, grid, ranks)}


def trends(rows: dict, grid, ranks: dict | None = None) -> list[dict]:
    """How each variant's gap to the baseline moves with the training set: the least-squares
    slope of (variant - baseline) test rsum against log2(training images), in rsum per
    doubling. Over several splits, a t-test of the per-split slopes; on one split (the same
    test images at every size), a paired bootstrap of the slope over those test images
    (and the seeds), from the per-query ranks. Also where the gap changes sign between two
    sizes (the curves cross), interpolated in log size."""
    from fnemm_studies.stats import paired_t
    ranks = ranks or {}
    out = []
    for cnn in grid.cnns:
        sizes = sorted({k[1] for k in rows if k[0] == cnn})
        if len(sizes) < 2:
            continue
        splits = sorted({k[3] for k in rows if k[0] == cnn})
        for name in grid.variants:
            if name == "baseline":
                continue
            slopes, gaps, paired = [], {}, {}
            for split in splits:
                xs, ys = [], []
                for size in sizes:
                    keys = [k for k in rows if k[:4] == (cnn, size, name, split)
                            and (cnn, size, "baseline", split, k[4]) in rows]
                    diffs = [rows[k]["rsum"] - rows[(cnn, size, "baseline", split, k[4])]["rsum"] for k in keys]
                    if diffs:
                        xs.append(np.log2(size))
                        ys.append(float(np.mean(diffs)))
                        gaps.setdefault(size, []).append(ys[-1])
                        paired[size] = ([ranks.get(k) for k in keys],
                                        [ranks.get((cnn, size, "baseline", split, k[4])) for k in keys])
                if len(xs) >= 2:
                    slopes.append(float(np.polyfit(xs, ys, 1)[0]))
            if not slopes or len(gaps) < 2:
                continue
            if len(splits) == 1 and all(r is not None for a, b in paired.values() for r in a + b):
                c = bootstrap_slope(paired)
            else:
                c = paired_t(slopes, method=f"t-test of per-split slopes over {len(slopes)} splits")
            gap = {size: float(np.mean(v)) for size, v in sorted(gaps.items())}
            out.append({"cnn": cnn, "variant": name, "per_doubling": c.to_dict(),
                        "gap": {str(size): g for size, g in gap.items()}, "crossings": crossings(gap)})
    return out
