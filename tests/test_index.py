"""Retrieval indexes against brute force: exact search, approximate recall, and the
order-embedding re-rank."""

import numpy as np
import pytest
import torch

faiss = pytest.importorskip("faiss")

from fnemm.search.vector_index import VectorIndex, order_scores_np, recall_at, recall_bound, recall_per_query  # noqa: E402
from fnemm.joint.losses import order_scores  # noqa: E402


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n, d=32, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(2, n // 50), d))
    return unit(centres[rng.integers(0, len(centres), n)] + 0.3 * rng.normal(size=(n, d)))


def test_exact_index_matches_brute_force():
    items, queries = clustered(2000), clustered(50, seed=1)
    index = VectorIndex.build(items, "auto")
    assert index.method == "exact"
    scores, rows = index.search(queries, 10)
    ref = queries @ items.T
    for q in range(50):
        order = np.argsort(-ref[q], kind="stable")[:10]
        np.testing.assert_allclose(scores[q], ref[q][order], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ref[q][rows[q]], scores[q], rtol=1e-5, atol=1e-5)   # rows match scores


@pytest.mark.parametrize("method", ["hnsw", "ivf"])
def test_approximate_indexes_keep_recall(method):
    items, queries = clustered(20000), clustered(200, seed=2)
    exact = VectorIndex.build(items, "exact")
    approx = VectorIndex.build(items, method)
    assert approx.method == method and len(approx) == 20000
    _, a = approx.search(queries, 10)
    _, e = exact.search(queries, 10)
    assert recall_at(a, e, 10) >= 0.9


def test_auto_switches_to_approximate_above_the_threshold():
    assert VectorIndex.build(clustered(300), "auto", threshold=100).method == "hnsw"


def test_order_scores_np_matches_the_training_loss_definition():
    rng = np.random.default_rng(3)
    caps, imgs = np.abs(unit(rng.normal(size=(4, 8)))), np.abs(unit(rng.normal(size=(6, 8))))
    ref = order_scores(torch.from_numpy(imgs), torch.from_numpy(caps)).numpy()      # (images, captions)
    got_c = order_scores_np(caps, np.broadcast_to(imgs, (4, 6, 8)), query_is_caption=True)
    got_i = order_scores_np(imgs, np.broadcast_to(caps, (6, 4, 8)), query_is_caption=False)
    np.testing.assert_allclose(got_c, ref.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_i, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("query_is_caption", [True, False])
def test_order_rerank_of_cosine_candidates_vs_exhaustive(query_is_caption):
    items = np.abs(clustered(3000, seed=5))
    queries = np.abs(clustered(100, seed=6))
    index = VectorIndex.build(unit(items), "ivf")
    index.set_params(nprobe=index.params["nlist"])           # every list probed: exact cosine candidates
    _, exhaustive = index.exhaustive(unit(queries), 10, "order", query_is_caption)
    exact_scores, exact_rows = VectorIndex.build(unit(items), "exact").search(unit(queries), 10, "order",
                                                                              query_is_caption)
    np.testing.assert_array_equal(exact_rows, exhaustive)   # an exact index searches S_OE exhaustively
    scores, rows = index.search(unit(queries), 10, "order", query_is_caption, candidates=3000)
    assert recall_at(rows, exhaustive, 10) == 1.0           # every item a candidate: exact
    assert (np.diff(scores, axis=1) <= 1e-6).all()           # sorted best first
    _, few = index.search(unit(queries), 10, "order", query_is_caption, candidates=200)
    assert recall_at(few, exhaustive, 10) >= 0.8             # the recall the re-rank gives up


def test_save_and_load_round_trip(tmp_path):
    items = clustered(500)
    index = VectorIndex.build(items, "hnsw")
    index.save(tmp_path / "images.faiss")
    again = VectorIndex.load(tmp_path / "images.faiss", items, "hnsw")
    q = clustered(5, seed=9)
    np.testing.assert_array_equal(index.search(q, 5)[1], again.search(q, 5)[1])


@pytest.mark.parametrize("method, key, first", [("hnsw", "ef_search", 16), ("ivf", "nprobe", 1)])
def test_tune_picks_the_smallest_setting_that_reaches_the_target(method, key, first):
    items, queries = clustered(20000), clustered(200, seed=3)
    approx = VectorIndex.build(items, method)
    _, exact = VectorIndex.build(items, "exact").search(queries, 10)
    reached = approx.tune(queries, exact, 0.97)
    value = approx.params[key]
    hits = recall_per_query(approx.search(queries, 10)[1], exact, 10)
    assert reached == recall_at(approx.search(queries, 10)[1], exact, 10) == hits.mean()
    assert recall_bound(hits) >= 0.97 and reached > 0.97        # the mean clears the target with room
    if value > first:                   # the ladder doubles: half of it falls short
        approx.set_params(**{key: value // 2})
        assert recall_bound(recall_per_query(approx.search(queries, 10)[1], exact, 10)) < 0.97


def test_recall_bound_against_its_formula():
    hits = np.array([1.0, 0.9, 0.8, 1.0, 0.7])
    mean = sum(hits) / 5
    sd = (sum((h - mean) ** 2 for h in hits) / 4) ** 0.5
    assert recall_bound(hits) == pytest.approx(mean - 1.645 * sd / 5 ** 0.5)
    assert recall_bound(np.ones(50)) == 1.0 and recall_bound(np.array([0.6])) == 0.6
    # more queries with the same spread: a tighter bound
    assert recall_bound(np.tile(hits, 20)) > recall_bound(hits)
    assert recall_per_query(np.array([[1, 2, 3], [4, 5, 6]]), np.array([[3, 2, 9], [7, 8, 9]]), 3).tolist() == \
        pytest.approx([2 / 3, 0.0])


@pytest.mark.parametrize("similarity", ["cosine", "order"])
@pytest.mark.parametrize("query_is_caption", [True, False])
def test_exhaustive_search_in_item_blocks_from_a_mapped_file_equals_one_dense_pass(
        tmp_path, monkeypatch, similarity, query_is_caption):
    """Exact search reads its items ITEMS rows at a time (here 37, uneven against 1,000):
    the top-k of the blocks merged is the top-k of the whole score matrix, also when the
    items are a read-only file mapped into memory (how an index folder serves them)."""
    import fnemm.search.vector_index as vi
    items = np.abs(clustered(1000, seed=11))
    queries = np.abs(clustered(230, seed=12))                     # 3 query blocks, the last partial
    np.save(tmp_path / "items.npy", items)
    mapped = np.load(tmp_path / "items.npy", mmap_mode="r")
    monkeypatch.setattr(vi, "ITEMS", 37)
    index = VectorIndex.build(mapped, "exact")
    assert isinstance(index.vectors, np.memmap) or isinstance(index.vectors.base, np.memmap)   # not copied
    scores, rows = index.exhaustive(queries, 25, similarity, query_is_caption)
    if similarity == "cosine":
        ref = queries @ items.T
    else:
        ref = order_scores(torch.from_numpy(items), torch.from_numpy(queries)).numpy().T if query_is_caption \
            else order_scores(torch.from_numpy(queries), torch.from_numpy(items)).numpy()
    expected = -np.sort(-ref, axis=1)[:, :25]
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(ref, rows, 1), scores, rtol=1e-5, atol=1e-5)  # rows match
    assert all(len(set(r)) == 25 for r in rows)
    _, everything = index.exhaustive(queries[:3], 5000, similarity, query_is_caption)         # k above n: all
    assert everything.shape == (3, 1000) and all(sorted(r) == list(range(1000)) for r in everything)
