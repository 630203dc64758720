"""Recall@K / median rank against the per-query argsort loop of the reference code."""

import numpy as np
import pytest
import torch

from fnemm.eval.metrics import evaluate_embeddings, i2t_ranks, metrics_from_scores, t2i_ranks
from fnemm.joint.losses import scores
from fnemm.joint.model import l2_normalize


def reference_i2t(s: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """vsepp-style: per image, argsort all captions, take the best correct position."""
    ranks = []
    for i in range(s.shape[0]):
        order = np.argsort(s[i])[::-1]
        ranks.append(min(np.where(order == c)[0][0] for c in np.where(owner == i)[0]) + 1)
    return np.array(ranks)


def reference_t2i(s: np.ndarray, owner: np.ndarray) -> np.ndarray:
    ranks = []
    for c in range(s.shape[1]):
        order = np.argsort(s[:, c])[::-1]
        ranks.append(np.where(order == owner[c])[0][0] + 1)
    return np.array(ranks)


def reference_summary(ranks):
    r = {k: 100.0 * np.mean(ranks <= k) for k in (1, 5, 10)}
    return r, np.floor(np.median(ranks - 1)) + 1, ranks.mean()   # vsepp's medr formula


@pytest.mark.parametrize("n_images,per_image,seed", [(40, 5, 0), (33, 5, 1), (25, 7, 2)])
def test_ranks_and_metrics_match_reference(n_images, per_image, seed):
    rng = np.random.default_rng(seed)
    # A noisy "good" model: correct captions tend to score higher.
    owner = np.repeat(np.arange(n_images), per_image)
    s = rng.normal(size=(n_images, len(owner)))
    s[owner, np.arange(len(owner))] += 1.5
    st, ot = torch.from_numpy(s), torch.from_numpy(owner)
    ri, rt = reference_i2t(s, owner), reference_t2i(s, owner)
    assert i2t_ranks(st, ot).numpy().tolist() == ri.tolist()
    assert t2i_ranks(st, ot).numpy().tolist() == rt.tolist()
    m = metrics_from_scores(st, ot)
    for prefix, ranks in (("i2t", ri), ("t2i", rt)):
        rec, medr, meanr = reference_summary(ranks)
        for k in (1, 5, 10):
            assert m[f"{prefix}_r{k}"] == pytest.approx(rec[k])
        assert m[f"{prefix}_medr"] == medr
        assert m[f"{prefix}_meanr"] == pytest.approx(meanr)
    assert m["rsum"] == pytest.approx(sum(m[f"{p}_r{k}"] for p in ("i2t", "t2i") for k in (1, 5, 10)))


def test_uneven_caption_counts():
    owner = np.array([0, 0, 1, 2, 2, 2])
    s = np.random.default_rng(3).normal(size=(3, 6))
    st, ot = torch.from_numpy(s), torch.from_numpy(owner)
    assert i2t_ranks(st, ot).tolist() == reference_i2t(s, owner).tolist()
    assert t2i_ranks(st, ot).tolist() == reference_t2i(s, owner).tolist()


def test_ties_rank_pessimistically_so_a_collapsed_model_scores_chance():
    owner = torch.arange(50).repeat_interleave(5)
    flat = torch.zeros(50, 250)
    m = metrics_from_scores(flat, owner)
    assert m["i2t_r1"] == 0.0 and m["t2i_r1"] == 0.0
    assert t2i_ranks(flat, owner).unique().tolist() == [50]
    assert i2t_ranks(flat, owner).unique().tolist() == [246]   # 245 wrong captions above


def test_perfect_scores_give_rank_one():
    owner = torch.arange(20).repeat_interleave(5)
    s = (owner.unsqueeze(0) == torch.arange(20).unsqueeze(1)).double()
    m = metrics_from_scores(s, owner)
    assert m["rsum"] == 600.0 and m["i2t_medr"] == 1 and m["t2i_medr"] == 1


@pytest.mark.parametrize("similarity", ["cosine", "order"])
def test_evaluate_embeddings_and_five_folds(similarity):
    g = torch.Generator().manual_seed(0)
    img = l2_normalize(torch.randn(50, 8, generator=g, dtype=torch.float64)).abs()
    owner = torch.arange(50).repeat_interleave(5)
    cap = l2_normalize(img[owner] + 0.3 * torch.randn(250, 8, generator=g, dtype=torch.float64)).abs()
    whole = evaluate_embeddings(img, cap, owner, similarity)
    assert whole == metrics_from_scores(scores(img, cap, similarity), owner)
    folds = evaluate_embeddings(img, cap, owner, similarity, folds=5)
    per_fold = [metrics_from_scores(scores(img[f * 10:(f + 1) * 10], cap[f * 50:(f + 1) * 50], similarity),
                                    owner[f * 50:(f + 1) * 50] - f * 10) for f in range(5)]
    for key in whole:
        assert folds[key] == pytest.approx(np.mean([p[key] for p in per_fold]))
    with pytest.raises(ValueError, match="folds"):
        evaluate_embeddings(img[:49], cap[:245], owner[:245], similarity, folds=5)


def test_row_blocking_does_not_change_ranks(monkeypatch):
    import fnemm.eval.metrics as ev
    rng = np.random.default_rng(5)
    owner = np.repeat(np.arange(30), 5)
    s = rng.normal(size=(30, 150))
    st, ot = torch.from_numpy(s), torch.from_numpy(owner)
    monkeypatch.setattr(ev, "ROW_BLOCK", 7)
    assert ev.i2t_ranks(st, ot).tolist() == reference_i2t(s, owner).tolist()
    assert ev.t2i_ranks(st, ot).tolist() == reference_t2i(s, owner).tolist()


def _awkward_case(seed: int, noise: float, similarity: str, n: int = 300, d: int = 48, duplicates: bool = True):
    """Embeddings with what ranking must survive: duplicated images and captions (exact
    ties), an image without captions, one with seven, rows of different norms (cosine)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n, d, generator=g, dtype=torch.float64)
    img = l2_normalize(img) if similarity == "cosine" else img.abs()
    if duplicates:
        img[7] = img[3]
    owner = torch.arange(n).repeat_interleave(5)
    owner = torch.cat([owner[owner != 11], torch.tensor([5, 5])])
    cap = img[owner] + noise / d ** 0.5 * torch.randn(len(owner), d, generator=g, dtype=torch.float64)
    cap = l2_normalize(cap) * (0.5 + torch.rand(len(owner), 1, generator=g, dtype=torch.float64)) \
        if similarity == "cosine" else cap.abs()
    if duplicates:
        cap[20] = cap[21]
    return img, cap, owner


@pytest.mark.parametrize("similarity", ["cosine", "order"])
@pytest.mark.parametrize("noise,seed", [(9.0, 0), (3.0, 1), (30.0, 2)])
def test_tiled_ranks_equal_the_whole_matrix_ranks(similarity, noise, seed):
    """ranks() never holds the matrix: tiles of a few rows (here 1, 7 and 64 images'
    worth of scores) give the ranks of the whole float64 score matrix, ties and all, on
    models from good to near chance."""
    from fnemm.eval.metrics import ranks
    img, cap, owner = _awkward_case(seed, noise, similarity)
    matrix = scores(img, cap, similarity)
    want = (i2t_ranks(matrix, owner).tolist(), t2i_ranks(matrix, owner).tolist())
    assert want[0][11] == len(owner) + 1                 # the captionless image: below every caption
    for rows in (1, 7, 64):
        got = ranks(img, cap, owner, similarity, tile_scores=rows * len(owner))
        assert (got[0].tolist(), got[1].tolist()) == want


@pytest.mark.parametrize("similarity", ["cosine", "order"])
def test_float32_tiled_ranks_agree_with_the_loop_of_the_reference_code(similarity):
    """On float32 embeddings, the ranks of vsepp's per-query argsort loop over float32
    scores (ties aside: no duplicates here, whose order argsort leaves to chance),
    whatever the tile size."""
    from fnemm.eval.metrics import ranks
    img, cap, owner = _awkward_case(3, 5.0, similarity, n=120, d=64, duplicates=False)
    img, cap = img.float(), cap.float()
    s = scores(img.double(), cap.double(), similarity).numpy()
    keep = np.arange(len(img)) != 11                     # the loop has no answer for a captionless image
    for rows in (5, 120):
        i2t, t2i = ranks(img, cap, owner, similarity, tile_scores=rows * len(owner))
        assert t2i.tolist() == reference_t2i(s, owner.numpy()).tolist()
        assert i2t[torch.from_numpy(keep)].tolist() == reference_i2t(s[keep], np.searchsorted(
            np.flatnonzero(keep), owner.numpy())).tolist()


def test_a_collapsed_model_ranks_pessimistically_in_tiles():
    from fnemm.eval.metrics import ranks
    owner = torch.arange(60).repeat_interleave(5)
    for similarity, value in (("cosine", 0.25), ("order", 0.5)):
        img, cap = torch.full((60, 16), value), torch.full((300, 16), value)
        i2t, t2i = ranks(img, cap, owner, similarity, tile_scores=1000)
        assert t2i.unique().tolist() == [60] and i2t.unique().tolist() == [296]


def test_ranks_use_the_compiled_order_kernel_on_a_cpu(monkeypatch):
    import fnemm.eval.kernels as kernels
    import fnemm.eval.metrics as ev
    if not kernels.available():
        pytest.skip("no C compiler to build fnemm's kernel")
    calls = []
    real = kernels.order_scores
    monkeypatch.setattr(kernels, "order_scores", lambda *a, **k: calls.append(1) or real(*a, **k))
    img, cap, owner = _awkward_case(4, 3.0, "order", n=50, d=16)
    got = ev.evaluate_embeddings(img.float(), cap.float(), owner, "order")
    assert calls
    assert got == pytest.approx(metrics_from_scores(scores(img, cap, "order"), owner))


def test_chance_level_of_random_embeddings():
    from fnemm.eval.metrics import chance_rsum
    mean, std = chance_rsum(100, draws=30)
    # R@K of a random ranking is K/N in both directions (and a little more for i2t,
    # which takes the best of 5 captions): about 6 * 5.3% + i2t's extra
    assert 30 < mean < 60 and 2 < std < 15


def test_the_compiled_count_and_torchs_give_the_same_float32_ranks(monkeypatch):
    import fnemm.eval.kernels as kernels
    from fnemm.eval.metrics import ranks
    if not kernels.available():
        pytest.skip("no C compiler to build fnemm's kernel")
    img, cap, owner = _awkward_case(6, 6.0, "cosine", n=90, d=24)
    img, cap = img.float(), cap.float()
    fast = ranks(img, cap, owner, "cosine", tile_scores=20 * len(owner))
    monkeypatch.setenv("FNEMM_KERNELS", "0")
    plain = ranks(img, cap, owner, "cosine", tile_scores=20 * len(owner))
    assert fast[0].tolist() == plain[0].tolist() and fast[1].tolist() == plain[1].tolist()
