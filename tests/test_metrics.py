"""Recall@K / median rank against the per-query argsort loop of the reference code."""

import numpy as np
import pytest
import torch

from fnemm.metrics import evaluate_embeddings, i2t_ranks, metrics_from_scores, t2i_ranks
from fnemm.losses import scores
from fnemm.model import l2_normalize


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
    import fnemm.metrics as ev
    rng = np.random.default_rng(5)
    owner = np.repeat(np.arange(30), 5)
    s = rng.normal(size=(30, 150))
    st, ot = torch.from_numpy(s), torch.from_numpy(owner)
    monkeypatch.setattr(ev, "ROW_BLOCK", 7)
    assert ev.i2t_ranks(st, ot).tolist() == reference_i2t(s, owner).tolist()
    assert ev.t2i_ranks(st, ot).tolist() == reference_t2i(s, owner).tolist()


def _float64_ranks(img: torch.Tensor, cap: torch.Tensor, owner: torch.Tensor):
    s = img.double() @ cap.double().t()
    return i2t_ranks(s, owner).tolist(), t2i_ranks(s, owner).tolist()


@pytest.mark.parametrize("kernel", ["1", "0"])
@pytest.mark.parametrize("noise,seed", [(9.0, 0), (3.0, 1), (30.0, 2)])
def test_screened_cosine_ranks_equal_the_float64_matrix_ranks(noise, seed, kernel, monkeypatch):
    """The bfloat16 screen with float64 recomputation gives exactly the ranks of the
    float64 score matrix, on models from good to near chance (every threshold with
    many scores inside the screen's error band), with duplicated images and captions
    (exact ties), uneven caption counts, an image without captions and rows of
    different norms. (The give-up share is lifted: near chance most pairs are candidates.)
    With the compiled kernel (two cuts, one pass in C) and without (torch only)."""
    import fnemm.metrics as ev
    from fnemm.metrics import screened_cosine_ranks
    monkeypatch.setattr(ev, "SCREEN_MAX_SHARE", 1.0)
    monkeypatch.setenv("FNEMM_KERNELS", kernel)
    g = torch.Generator().manual_seed(seed)
    n, d = 300, 96
    img = l2_normalize(torch.randn(n, d, generator=g))
    img[7] = img[3]                                     # a duplicated image
    owner = torch.arange(n).repeat_interleave(5)
    owner = owner[owner != 11]                          # image 11 has no caption
    owner = torch.cat([owner, torch.tensor([5, 5])])    # image 5 has seven
    cap = l2_normalize(img[owner] + noise / d ** 0.5 * torch.randn(len(owner), d, generator=g))
    cap[20] = cap[21]                                   # a duplicated caption
    cap = cap * (0.5 + torch.rand(len(owner), 1, generator=g))   # not unit norm
    got = screened_cosine_ranks(img, cap, owner)
    assert got is not None
    assert (got[0].tolist(), got[1].tolist()) == _float64_ranks(img, cap, owner)


def test_screening_gives_up_on_a_collapsed_model_and_ranks_still_pessimistic(monkeypatch):
    import fnemm.metrics as ev
    from fnemm.metrics import screened_cosine_ranks
    img = torch.ones(60, 16) / 4
    cap = torch.ones(300, 16) / 4
    owner = torch.arange(60).repeat_interleave(5)
    assert screened_cosine_ranks(img, cap, owner) is None     # every score is at every threshold
    monkeypatch.setattr(ev, "SCREEN_MIN_PAIRS", 1)
    monkeypatch.setattr(ev, "_screenable", lambda a, b: True)
    i2t, t2i = ev.ranks(img, cap, owner, "cosine")            # the plain path takes over
    assert t2i.unique().tolist() == [60] and i2t.unique().tolist() == [296]


def test_evaluate_embeddings_takes_the_screen_when_it_applies(monkeypatch):
    import fnemm.metrics as ev
    calls = []
    real = ev.screened_cosine_ranks
    monkeypatch.setattr(ev, "screened_cosine_ranks", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(ev, "SCREEN_MIN_PAIRS", 1)
    monkeypatch.setattr(ev, "_screenable", lambda a, b: True)
    g = torch.Generator().manual_seed(4)
    img = l2_normalize(torch.randn(80, 32, generator=g))
    owner = torch.arange(80).repeat_interleave(5)
    cap = l2_normalize(img[owner] + 0.8 * torch.randn(400, 32, generator=g))
    screened = evaluate_embeddings(img, cap, owner, "cosine")
    assert calls
    assert screened == metrics_from_scores(img.double() @ cap.double().t(), owner)
