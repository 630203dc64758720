"""Principal components of a store's training features (``--pca N``), in bounded memory.

``fit_pca_streamed`` reads the rows a block at a time, twice (the mean, then the
second moments), so its memory does not grow with the number of training images:
with no more images than features it keeps the centred rows and diagonalises their
(n x n) Gram matrix, with more it sums the (d x d) covariance block by block; either
is at most d x d float64 (2.3 GB at MobileNetV2's 17,056 FNE features), never the
(n x d) training rows of MSCOCO (7.7 GB in float32 at 113,287 images). ``fit_pca`` is
the same computation on rows held in memory (the reference the tests compare with).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from fnemm.io.errors import FnemmError


def fit_pca(rows: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean (d,), components (n, d)) of the top ``n`` principal components of ``rows``
    (float64; signs fixed so each component's largest entry is positive)."""
    x = np.asarray(rows, np.float64)
    mean = x.mean(0)
    x = x - mean
    if n > min(x.shape):
        raise FnemmError(f"--pca {n}: at most {min(x.shape)} components from {x.shape[0]} training "
                         f"images of {x.shape[1]} features")
    if x.shape[0] <= x.shape[1]:                  # few images: the (n x n) Gram matrix
        values, vectors = np.linalg.eigh(x @ x.T)
        top = np.argsort(values)[::-1][:n]
        comps = (x.T @ vectors[:, top]) / np.sqrt(np.maximum(values[top], 1e-300))
        comps = comps.T
    else:                                         # many images: the (d x d) covariance
        values, vectors = np.linalg.eigh(x.T @ x)
        comps = vectors[:, np.argsort(values)[::-1][:n]].T
    signs = np.sign(comps[np.arange(n), np.abs(comps).argmax(1)])
    return mean, comps * signs[:, None]


def fit_pca_streamed(blocks: Callable[[], Iterable[np.ndarray]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """As :func:`fit_pca`, from ``blocks()``: each call a fresh pass over the rows, a block
    at a time (it is called twice)."""
    count, total = 0, None
    for block in blocks():
        block = np.asarray(block, np.float64)
        total = block.sum(0) if total is None else total + block.sum(0)
        count += len(block)
    if total is None or count == 0:
        raise FnemmError(f"--pca {n}: no training images to fit the components on")
    d = len(total)
    mean = total / count
    if n > min(count, d):
        raise FnemmError(f"--pca {n}: at most {min(count, d)} components from {count} training images of {d} features")
    if count <= d:                                # few images: their centred rows and (n x n) Gram matrix
        x = np.empty((count, d), np.float64)
        k = 0
        for block in blocks():
            x[k:k + len(block)] = np.asarray(block, np.float64) - mean
            k += len(block)
        values, vectors = np.linalg.eigh(x @ x.T)
        top = np.argsort(values)[::-1][:n]
        comps = ((x.T @ vectors[:, top]) / np.sqrt(np.maximum(values[top], 1e-300))).T
    else:                                         # many images: the (d x d) covariance, summed
        cov = np.zeros((d, d), np.float64)
        for block in blocks():
            centred = np.asarray(block, np.float64) - mean
            cov += centred.T @ centred
        values, vectors = np.linalg.eigh(cov)
        del cov
        comps = vectors[:, np.argsort(values)[::-1][:n]].T
    signs = np.sign(comps[np.arange(n), np.abs(comps).argmax(1)])
    return mean, comps * signs[:, None]
