"""Principal components of a store's training features (``--pca N``), in bounded memory.

``fit_pca_streamed`` reads the rows a block at a time (``blocks()`` is one pass), so its
memory does not grow with the number of training images. While the exact answer fits in
``exact_bytes`` it computes it: with no more images than features it keeps the centred
rows and diagonalises their (n x n) Gram matrix, with more it sums the (d x d) covariance
block by block. Above that (the centred rows of 6,000 images of MobileNetV2's 17,056 FNE
features are 0.8 GB in float64, the covariance 2.3 GB plus its eigensolver's workspace)
it runs subspace iteration on the covariance, which it never forms: each pass multiplies
the centred rows into a (d x l) basis, l = 2N + 16, until the top N Ritz pairs' residuals
are below ``tol`` of the largest eigenvalue. Memory is then a few d x l float64 arrays
(about 210 MB for N = 256 at 17,056 features) whatever the number of images. The passes
are seeded, so the same rows give the same components. ``fit_pca`` is the dense
computation on rows held in memory (the reference the tests compare with).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import numpy as np

from fnemm.io.errors import FnemmError

EXACT_BYTES = 256 << 20      # the exact routes while their main array is at most this
MAX_PASSES = 60


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
    return mean, _signed(comps)


def fit_pca_streamed(blocks: Callable[[], Iterable[np.ndarray]], n: int, *, exact_bytes: int = EXACT_BYTES,
                     tol: float = 1e-6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """As :func:`fit_pca`, from ``blocks()``: each call a fresh pass over the rows, a block
    at a time (called twice on the exact routes, once a pass of subspace iteration above
    ``exact_bytes``)."""
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
    width = min(count, d, 2 * n + 16)
    if min(count, d) * d * 8 > exact_bytes and width < min(count, d):
        return mean, _subspace(blocks, mean, n, width, tol, seed)
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
    return mean, _signed(comps)


def _subspace(blocks, mean: np.ndarray, n: int, width: int, tol: float, seed: int) -> np.ndarray:
    """Top ``n`` eigenvectors of the centred rows' covariance by subspace iteration with a
    ``width``-column basis and Rayleigh-Ritz, one pass over the rows per iteration."""
    d = len(mean)
    basis = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, width)))[0]
    residual = np.inf
    for _ in range(MAX_PASSES):
        image = np.zeros((d, width), np.float64)            # covariance @ basis, summed block by block
        for block in blocks():
            centred = np.asarray(block, np.float64) - mean
            image += centred.T @ (centred @ basis)
        values, vectors = np.linalg.eigh(basis.T @ image)   # Rayleigh-Ritz in the basis
        order = np.argsort(values)[::-1]
        values, vectors = values[order], vectors[:, order]
        ritz = basis @ vectors[:, :n]
        # ||C u - lambda u|| for each of the top n Ritz pairs, from C @ basis already at hand
        residual = np.linalg.norm(image @ vectors[:, :n] - ritz * values[:n], axis=0).max()
        if residual <= tol * max(values[0], 1e-300):
            return _signed(ritz.T)
        basis = np.linalg.qr(image)[0]
    warnings.warn(f"--pca {n}: subspace iteration stopped after {MAX_PASSES} passes with a residual of "
                  f"{residual / max(values[0], 1e-300):.1e} of the largest eigenvalue (asked {tol:.0e}); "
                  f"the components are approximate", stacklevel=3)
    return _signed(ritz.T)


def _signed(comps: np.ndarray) -> np.ndarray:
    """Each component's sign fixed so that its largest entry is positive."""
    signs = np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(1)])
    return comps * signs[:, None]
