"""Layer selection and post-processing (fnemm.features.recipe) against plain numpy references."""

import numpy as np
import pytest

from fnemm.features.cnn import tap_groups
from fnemm.io.errors import FnemmError
from fnemm.features.fne import discretise, standardise
from fnemm.features import pca as pca_module
from fnemm.features.pca import fit_pca, fit_pca_streamed
from fnemm.features.recipe import Encoder, Recipe, columns, select_layers

# a toy CNN's taps: 8 layers of widths 2..9, the last the classifier
NAMES = ["stem", "b0/expand", "b0/project", "b1/expand", "b1/project", "b2/project", "head", "logits"]
WIDTHS = [2, 3, 4, 5, 6, 7, 8, 9]
GROUPS = tap_groups(NAMES, classifier="logits", blocks=["stem", "b0/project", "b1/project", "b2/project", "head"],
                    baseline="head")


def taps():
    out, start = [], 0
    for name, w in zip(NAMES, WIDTHS):
        out.append({"name": name, "kind": "conv", "channels": w, "start": start, "stop": start + w})
        start += w
    return out


@pytest.mark.parametrize("spec,expected", [
    ("all", list(range(8))),
    ("paper", list(range(7))),
    ("late", [5, 6]),                        # ceil(7 / 4) = 2 last of 'paper'
    ("last50%", [3, 4, 5, 6]),               # ceil(3.5) = 4
    ("last100%", list(range(7))),
    ("blocks", [0, 2, 4, 5, 6]),
    ("baseline", [6]),
    ("head", [6]),
    ("*/project", [2, 4, 5]),
    ("b?/expand", [1, 3]),
    ("2:5", [2, 3, 4]),
    ("-3:", [5, 6, 7]),
    (":2", [0, 1]),
    ("all,!*/expand,!logits", [0, 2, 4, 5, 6]),
    ("head,stem", [0, 6]),                   # network order whatever the order asked
    ("paper,!late", [0, 1, 2, 3, 4]),
    ("!*/expand", [0, 2, 4, 5, 6]),          # exclusions first: taken from 'paper'
])
def test_layer_specs(spec, expected):
    assert select_layers(spec, NAMES, GROUPS) == expected


@pytest.mark.parametrize("spec,message", [("", "name at least one"), ("nope", "matches no layer"),
                                          ("head,!head", "nothing is left"), ("last0%", "between 1% and 100%")])
def test_bad_layer_specs(spec, message):
    with pytest.raises(FnemmError, match=message):
        select_layers(spec, NAMES, GROUPS)


def test_columns_follow_the_taps():
    cols, blocks = columns(taps(), [1, 4])
    assert cols.tolist() == [2, 3, 4] + list(range(14, 20))
    assert blocks == [slice(0, 3), slice(3, 9)]


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    scale = np.repeat(10.0 ** rng.uniform(-2, 2, 8), WIDTHS)        # layers of very different sizes
    raw = (rng.gamma(2.0, size=(40, sum(WIDTHS))) * scale).astype(np.float16)
    raw[:, 3] = 1.0                                               # a constant feature (std 0)
    train = raw[:30].astype(np.float64)
    return raw, train.mean(0), train.std(0)


def _encode(recipe, raw, mean, std, pca=None):
    enc = Encoder.build(recipe, mean, std, taps(), GROUPS, "head", pca)
    return enc, enc(raw)


def test_every_post_processing_against_numpy(data):
    raw, mean, std = data
    x = raw.astype(np.float64)
    cols, blocks = columns(taps(), select_layers("paper", NAMES, GROUPS))
    sel, m, s = x[:, cols], mean[cols], std[cols]
    safe = np.where(s > 0, s, 1)
    z = np.where(s > 0, (sel - m) / safe, 0.0)
    per_layer = lambda a: np.concatenate([a[:, b] / np.maximum(np.linalg.norm(a[:, b], axis=1, keepdims=True), 1e-12)  # noqa: E731
                                          for b in blocks], 1)
    expected = {
        "fne": np.where(z < -0.25, -1, np.where(z > 0.15, 1, 0)),
        "zscore": np.clip(z, -3, 3),
        "zscore-layer-l2": per_layer(z),
        "center": sel - m,
        "center-layer": np.concatenate([(sel - m)[:, b] / np.sqrt(np.mean(s[b] ** 2)) for b in blocks], 1),
        "layer-l2": per_layer(sel),
        "l2": sel / np.linalg.norm(sel, axis=1, keepdims=True),
    }
    for post, ref in expected.items():
        _, out = _encode(Recipe(post=post), raw, mean, std)
        assert out["fne"].shape == (40, sum(WIDTHS[:7])), post
        np.testing.assert_allclose(out["fne"].astype(np.float64), ref, rtol=2e-5, atol=2e-5, err_msg=post)
    assert _encode(Recipe(), raw, mean, std)[1]["fne"].dtype == np.int8
    base = x[:, 27:35]
    np.testing.assert_allclose(_encode(Recipe(), raw, mean, std)[1]["fc7"],
                               base / np.linalg.norm(base, axis=1, keepdims=True), rtol=1e-6)


def test_fne_recipe_is_the_papers_codes_on_its_layers(data):
    raw, mean, std = data
    _, out = _encode(Recipe(layers="all", thresholds=(-0.5, 0.4)), raw, mean, std)
    np.testing.assert_array_equal(out["fne"], discretise(standardise(raw, mean, std), -0.5, 0.4))


def test_pca_against_numpy_svd_and_the_baseline_appended(data):
    raw, mean, std = data
    enc = Encoder.build(Recipe(post="zscore", pca=5, baseline=True), mean, std, taps(), GROUPS, "head")
    feats = enc.features(raw[:30]).astype(np.float64)
    pca_mean, comps = fit_pca(feats, 5)
    centred = feats - feats.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    for k in range(5):                        # the same directions as numpy's SVD, up to sign
        assert abs(abs(comps[k] @ vt[k]) - 1) < 1e-8
        assert comps[k][np.abs(comps[k]).argmax()] > 0
    enc.pca = (pca_mean, comps)
    out = enc(raw)["fne"]
    assert out.shape == (40, 5 + 8) and out.dtype == np.float32
    proj = (enc.features(raw).astype(np.float64) - pca_mean) @ comps.T
    np.testing.assert_allclose(out[:, :5], proj, rtol=1e-4, atol=1e-4)
    # the baseline block is the L2 baseline scaled to the norm of the part before it
    base = raw[:, 27:35].astype(np.float64)
    expected = base / np.linalg.norm(base, axis=1, keepdims=True) * np.linalg.norm(proj, axis=1, keepdims=True)
    np.testing.assert_allclose(out[:, 5:], expected, rtol=1e-4, atol=1e-4)
    # more rows than features: the covariance route gives SVD's components too
    tall = np.random.default_rng(1).normal(size=(50, 6)) * np.arange(1, 7)
    _, _, vt = np.linalg.svd(tall - tall.mean(0), full_matrices=False)
    np.testing.assert_allclose(np.abs(fit_pca(tall, 3)[1] @ vt[:3].T), np.eye(3), atol=1e-8)
    with pytest.raises(FnemmError, match="at most"):
        fit_pca(tall[:4], 5)


@pytest.mark.parametrize("shape", [(30, 80), (300, 12)])       # fewer images than features, and more
@pytest.mark.parametrize("block", [1, 7, 1000])
def test_streamed_pca_equals_the_dense_one_up_to_sign(shape, block):
    """Read a block at a time (the Gram matrix of the centred rows, or the covariance summed
    block by block): the dense PCA's mean and components, whatever the block size."""
    rows = np.random.default_rng(2).normal(size=shape) * np.linspace(3, 0.1, shape[1]) + 5
    mean, comps = fit_pca(rows, 6)
    got_mean, got = fit_pca_streamed(lambda: (rows[b:b + block] for b in range(0, len(rows), block)), 6)
    np.testing.assert_allclose(got_mean, mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.abs(np.sum(got * comps, 1)), 1.0, atol=1e-8)       # each up to sign
    np.testing.assert_allclose(got, comps, atol=1e-8)            # and the sign convention is the same
    with pytest.raises(FnemmError, match="at most"):
        fit_pca_streamed(lambda: iter([rows[:3]]), 6)


@pytest.mark.parametrize("shape", [(60, 200), (400, 30)])      # fewer images than features, and more
def test_subspace_pca_above_the_memory_bound_finds_the_dense_components(shape):
    """Above ``exact_bytes`` the components come from subspace iteration on the covariance,
    never formed: the dense PCA's components (up to rounding), the same on every call."""
    rng = np.random.default_rng(3)
    rows = rng.normal(size=shape) * np.geomspace(4, 0.05, shape[1]) + 1
    mean, comps = fit_pca(rows, 5)
    passes = []

    def blocks():
        passes.append(1)
        return (rows[b:b + 16] for b in range(0, len(rows), 16))

    got_mean, got = fit_pca_streamed(blocks, 5, exact_bytes=0)
    assert len(passes) > 2                                      # the mean, then one pass an iteration
    np.testing.assert_allclose(got_mean, mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got, comps, atol=1e-5)           # the same directions and signs
    np.testing.assert_array_equal(fit_pca_streamed(blocks, 5, exact_bytes=0)[1], got)     # seeded


def test_subspace_pca_that_does_not_converge_says_so(monkeypatch):
    rows = np.random.default_rng(4).normal(size=(80, 40))      # a flat spectrum: slow to converge
    monkeypatch.setattr(pca_module, "MAX_PASSES", 2)
    with pytest.warns(UserWarning, match="--pca 4: subspace iteration stopped after 2 passes"):
        _, comps = fit_pca_streamed(lambda: iter([rows]), 4, exact_bytes=0, tol=1e-12)
    np.testing.assert_allclose(comps @ comps.T, np.eye(4), atol=1e-10)      # still orthonormal


def test_recipe_validation_and_round_trip():
    r = Recipe(layers="late", post="zscore", thresholds=(-1.0, 1.0), clip=2.5, pca=7, baseline=True)
    assert Recipe.from_dict(r.to_dict()) == r
    for bad in ({"post": "nope"}, {"thresholds": (0.2, -0.2)}, {"clip": 0}, {"pca": -1}):
        with pytest.raises(FnemmError):
            Recipe(**bad)
