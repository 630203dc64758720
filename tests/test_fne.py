"""FNE numerics against brute-force references: crops, streaming statistics,
standardisation, discretisation."""

import numpy as np
import pytest
from PIL import Image

from fnemm.features.fne import RunningStats, crop_boxes, crops, discretise, l2_normalise, standardise


def test_ten_crop_boxes_are_corners_centre_and_mirrors():
    boxes = crop_boxes(256, 224, 10)
    assert boxes[:5] == [(0, 0), (0, 32), (32, 0), (32, 32), (16, 16)]
    assert boxes[5:] == boxes[:5]
    assert crop_boxes(256, 224, 1) == [(16, 16)]
    with pytest.raises(ValueError):
        crop_boxes(256, 224, 5)


def test_crops_cut_the_right_pixels():
    # A 256x256 image (no resampling) whose red channel is x and green is y.
    y, x = np.mgrid[0:256, 0:256]
    a = np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8)
    out = crops(Image.fromarray(a), 10)
    assert out.shape == (10, 224, 224, 3) and out.dtype == np.uint8
    for k, (top, left) in enumerate(crop_boxes(256, 224, 10)):
        expected = a[top:top + 224, left:left + 224]
        if k >= 5:
            expected = expected[:, ::-1]
        np.testing.assert_array_equal(out[k], expected)
    # the mirror of the centre crop starts at the centre box's right edge
    assert out[9, 0, 0, 0] == 16 + 223 and out[9, 0, 0, 1] == 16


def test_crops_resize_and_convert_to_rgb():
    grey = Image.fromarray(np.full((30, 50), 77, np.uint8), mode="L")
    out = crops(grey, 1)
    assert out.shape == (1, 224, 224, 3)
    assert (out == 77).all()


def test_running_stats_match_two_pass_float64():
    rng = np.random.default_rng(0)
    rows = rng.normal(1e4, 0.01, size=(1000, 7))       # large offset, tiny spread: naive sums lose it
    rows[:, 3] = 5.0                                     # a constant feature
    stats = RunningStats()
    for lo in range(0, 1000, 97):
        stats.update(rows[lo:lo + 97].astype(np.float32).astype(np.float64))
    ref = rows.astype(np.float32).astype(np.float64)
    assert stats.count == 1000
    np.testing.assert_allclose(stats.mean, ref.mean(0), rtol=0, atol=1e-9)
    np.testing.assert_allclose(stats.std, ref.std(0), rtol=1e-9, atol=1e-12)
    assert stats.std[3] == 0.0
    one = RunningStats()
    one.update(np.zeros((0, 7)))
    assert one.count == 0


def test_standardise_and_discretise_against_a_loop():
    rng = np.random.default_rng(1)
    raw = rng.normal(size=(20, 6)).astype(np.float16)
    mean = rng.normal(size=6)
    std = np.abs(rng.normal(size=6)) + 0.1
    std[2] = 0.0
    z = standardise(raw, mean, std)
    codes = discretise(z, -0.25, 0.15)
    for i in range(20):
        for j in range(6):
            ref = 0.0 if std[j] == 0 else (float(raw[i, j]) - mean[j]) / std[j]
            assert z[i, j] == pytest.approx(ref, abs=1e-5)
            assert codes[i, j] == (-1 if ref < -0.25 else 1 if ref > 0.15 else 0)
    assert codes.dtype == np.int8 and (codes[:, 2] == 0).all()


def test_discretise_boundaries_and_custom_thresholds():
    z = np.array([[-0.26, -0.25, 0.0, 0.15, 0.16, -1.0, 1.0]], np.float32)
    np.testing.assert_array_equal(discretise(z), [[-1, 0, 0, 0, 1, -1, 1]])
    np.testing.assert_array_equal(discretise(z, -0.5, 0.5), [[0, 0, 0, 0, 0, -1, 1]])
    with pytest.raises(ValueError):
        discretise(z, 0.2, 0.1)


def test_l2_normalise():
    x = np.array([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(l2_normalise(x), [[0.6, 0.8], [0.0, 0.0]])
