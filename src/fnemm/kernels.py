"""A compiled CPU kernel for the order-similarity score matrix (paper Eq. 3), with
the torch code as the fallback.

S_OE(c, i) = -||max(0, c - i)||^2 has no matrix-product form, so evaluation on a CPU
spends its time in elementwise torch ops that each pass over a (tile, dim) temporary:
about 24 s for MSCOCO's 5,000 images x 25,000 captions on 2 cores. A 30-line C loop
that keeps a register block of four captions against one image, compiled for this
CPU, does it ~10x faster. It is built on first use with the system's C compiler
(``$CC``, else ``cc``/``gcc``; 0.2 s) into the user's cache folder and loaded with
ctypes; the work is split over threads by rows (ctypes releases the GIL).

A second function re-scores chosen pairs in float64: evaluation ranks with it the
few scores a float32 matrix cannot place with certainty (fnemm.metrics.
banded_order_ranks), so large CPU evaluations give the ranks of float64 scores.

Nothing depends on it: with no compiler, a failed build, ``FNEMM_KERNELS=0``, or
inputs it does not take (gradients, CUDA, not float32), callers use the torch code,
whose float32 scores agree with the kernel's to float32 rounding (it sums in another
order).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SOURCE = r"""
/* out[(i - i0) * nc + c] = -sum_k max(0, C[c,k] - I[i,k])^2 for i in [i0, i1) and every c.
   Captions go in blocks of 128 (512 KB at d = 1024: they stay in L2 while every image
   of the range passes), four at a time against one image row (the image's values are
   loaded once for four captions; the k loop vectorises). */
void fnemm_order_rows(const float *I, const float *C, float *out,
                      long i0, long i1, long nc, long d) {
  const long CB = 128;
  for (long cb = 0; cb < nc; cb += CB) {
    long ce = cb + CB < nc ? cb + CB : nc;
    for (long i = i0; i < i1; i++) {
      const float *x = I + i * d;
      float *o = out + (i - i0) * nc;
      long c = cb;
      for (; c + 4 <= ce; c += 4) {
        const float *y0 = C + c * d, *y1 = y0 + d, *y2 = y1 + d, *y3 = y2 + d;
        float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        for (long k = 0; k < d; k++) {
          float xk = x[k];
          float a0 = y0[k] - xk, a1 = y1[k] - xk, a2 = y2[k] - xk, a3 = y3[k] - xk;
          a0 = a0 > 0 ? a0 : 0; a1 = a1 > 0 ? a1 : 0; a2 = a2 > 0 ? a2 : 0; a3 = a3 > 0 ? a3 : 0;
          s0 += a0 * a0; s1 += a1 * a1; s2 += a2 * a2; s3 += a3 * a3;
        }
        o[c] = -s0; o[c + 1] = -s1; o[c + 2] = -s2; o[c + 3] = -s3;
      }
      for (; c < ce; c++) {
        const float *y = C + c * d;
        float s = 0;
        for (long k = 0; k < d; k++) { float a = y[k] - x[k]; a = a > 0 ? a : 0; s += a * a; }
        o[c] = -s;
      }
    }
  }
}

/* out[p] = -sum_k max(0, C[cols[p],k] - I[rows[p],k])^2 in float64, for n pairs: the
   exact re-scoring of the few pairs a float32 matrix cannot rank with certainty. */
void fnemm_order_pairs(const float *I, const float *C, const long *rows, const long *cols,
                       double *out, long n, long d) {
  for (long p = 0; p < n; p++) {
    const float *x = I + rows[p] * d, *y = C + cols[p] * d;
    double s = 0;
    for (long k = 0; k < d; k++) {
      double a = (double)y[k] - (double)x[k];
      s += a > 0 ? a * a : 0;
    }
    out[p] = -s;
  }
}
"""
# Reassociation lets the compiler vectorise the sums; nothing here depends on errno,
# traps or the sign of zero. Not -ffast-math: it would also assume no NaN.
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
         "-fno-trapping-math", "-fPIC", "-shared"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fnemm" / "kernels"


def _cpu_tag() -> str:
    """What -march=native compiled for: a library built on one CPU must not be loaded
    on another sharing the cache (a home folder on NFS)."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features", "model name")):
                flags += line
    except OSError:
        flags = platform.processor()
    return flags


def _build() -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or sys.platform == "win32":
        return None
    key = hashlib.sha256("\0".join([SOURCE, " ".join(FLAGS), compiler, platform.machine(), _cpu_tag()])
                         .encode()).hexdigest()[:16]
    target = _cache_dir() / f"order-{key}.so"
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                src = Path(tmp) / "order.c"
                src.write_text(SOURCE)
                built = Path(tmp) / "order.so"
                subprocess.run([compiler, *FLAGS, str(src), "-o", str(built)], check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
                os.replace(built, target)   # atomic: a concurrent builder's copy is as good
        except (OSError, subprocess.SubprocessError):
            return None
    try:
        lib = ctypes.CDLL(str(target))
    except OSError:
        return None
    for name, n_ptr in (("fnemm_order_rows", 3), ("fnemm_order_pairs", 5)):
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p] * n_ptr + [ctypes.c_long] * (7 - n_ptr)
    return lib


def available() -> bool:
    """Whether the compiled kernel can be used here (built on the first call)."""
    global _lib, _tried
    if os.environ.get("FNEMM_KERNELS", "1") == "0":
        return False
    with _lock:
        if not _tried:
            _lib, _tried = _build(), True
    return _lib is not None


def order_scores(images: torch.Tensor, captions: torch.Tensor, threads: int | None = None) -> torch.Tensor | None:
    """The (n_images, n_captions) order-similarity matrix by the compiled kernel, or
    None where it does not apply (see the module docstring): the caller falls back."""
    if not applies(images, captions):
        return None
    images, captions = images.contiguous(), captions.contiguous()
    n, nc, d = images.shape[0], captions.shape[0], images.shape[1]
    out = torch.empty(n, nc, dtype=torch.float32)
    if n == 0 or nc == 0:
        return out
    threads = max(1, min(threads or torch.get_num_threads(), n))
    # Row ranges of at least 8 images, a few per thread so that one slow core does not
    # hold the others back.
    step = max(8, -(-n // (4 * threads)))
    fn = _lib.fnemm_order_rows

    def rows(start: int) -> None:
        # i0/i1 are absolute rows of ``images``; ``out`` is written from its row start
        stop = min(start + step, n)
        fn(images.data_ptr(), captions.data_ptr(), out[start:stop].data_ptr(), start, stop, nc, d)

    if threads == 1:
        for s in range(0, n, step):
            rows(s)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(rows, range(0, n, step)))
    return out


def applies(images: torch.Tensor, captions: torch.Tensor) -> bool:
    """Whether the kernel takes these: CPU float32 matrices of one width, no
    gradients, and a kernel built here."""
    return (images.device.type == "cpu" and captions.device.type == "cpu"
            and images.dtype == torch.float32 and captions.dtype == torch.float32
            and not images.requires_grad and not captions.requires_grad and images.dim() == 2
            and captions.dim() == 2 and images.shape[1] == captions.shape[1] and available())


def order_pairs(images: torch.Tensor, captions: torch.Tensor, rows: torch.Tensor,
                cols: torch.Tensor) -> torch.Tensor | None:
    """Order similarity of the pairs (images[rows[j]], captions[cols[j]]) in float64,
    or None where the kernel does not apply."""
    if not applies(images, captions):
        return None
    images, captions = images.contiguous(), captions.contiguous()
    rows = rows.to(torch.long).contiguous()
    cols = cols.to(torch.long).contiguous()
    out = torch.empty(len(rows), dtype=torch.float64)
    if len(rows):
        _lib.fnemm_order_pairs(images.data_ptr(), captions.data_ptr(), rows.data_ptr(), cols.data_ptr(),
                               out.data_ptr(), len(rows), images.shape[1])
    return out
