"""A compiled CPU kernel for the order-similarity score matrix (paper Eq. 3), with
the torch code as the fallback.

S_OE(c, i) = -||max(0, c - i)||^2 has no matrix-product form, so evaluation on a CPU
spends its time in elementwise torch ops that each pass over a (tile, dim) temporary:
about 24 s for MSCOCO's 5,000 images x 25,000 captions on 2 cores. A short C loop
that keeps a register block of 4 images x 4 captions, compiled for this CPU, does it
in about 4 s. It is built on first use with the system's C compiler (``$CC``, else
``cc``/``gcc``; 0.2 s) into the user's cache folder and loaded with ctypes; the work
is split over threads by rows (ctypes releases the GIL).

Two more functions serve exact ranking (fnemm.metrics): ``order_pairs`` re-scores
chosen pairs in float64, and ``bands`` makes one pass over a block of float32 or
bfloat16 scores, counting those surely above each query's threshold and listing the
few within the error band, the only ones re-scored.

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
#define RB 4    /* images per register block */
#define CBK 4   /* captions per register block */

/* The scores of rows [i, i + nr) x captions [c, c + ncap) one by one: the blocks' edges. */
static void order_edge(const float *I, const float *C, float *out, long i, long c, long i0, long nc,
                       long d, long nr, long ncap) {
  for (long r = 0; r < nr; r++)
    for (long j = 0; j < ncap; j++) {
      const float *x = I + (i + r) * d, *y = C + (c + j) * d;
      float s = 0;
      for (long k = 0; k < d; k++) { float a = y[k] - x[k]; a = a > 0 ? a : 0; s += a * a; }
      out[(i + r - i0) * nc + c + j] = -s;
    }
}

/* out[(i - i0) * nc + c] = -sum_k max(0, C[c,k] - I[i,k])^2 for i in [i0, i1) and every c.
   Captions go in blocks of 128 (512 KB at d = 1024: they stay in L2 while the range's
   images pass); 4 images x 4 captions at a time, 16 sums in registers, so each value
   loaded serves four pairs and the k loop vectorises. */
void fnemm_order_rows(const float *I, const float *C, float *out,
                      long i0, long i1, long nc, long d) {
  const long CB = 128;
  for (long cb = 0; cb < nc; cb += CB) {
    long ce = cb + CB < nc ? cb + CB : nc;
    for (long i = i0; i < i1; i += RB) {
      long nr = i1 - i < RB ? i1 - i : RB;
      long c = cb;
      for (; nr == RB && c + CBK <= ce; c += CBK) {
        const float *x[RB], *y[CBK];
        float s[RB][CBK] = {{0}};
        for (long r = 0; r < RB; r++) x[r] = I + (i + r) * d;
        for (long j = 0; j < CBK; j++) y[j] = C + (c + j) * d;
        for (long k = 0; k < d; k++)
          for (long r = 0; r < RB; r++)
            for (long j = 0; j < CBK; j++) {
              float a = y[j][k] - x[r][k];
              a = a > 0 ? a : 0;
              s[r][j] += a * a;
            }
        for (long r = 0; r < RB; r++)
          for (long j = 0; j < CBK; j++) out[(i + r - i0) * nc + c + j] = -s[r][j];
      }
      if (c < ce) order_edge(I, C, out, i, c, i0, nc, d, nr, ce - c);
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

/* One pass over scores S (nr x nc; its rows are rows r0.. of the whole matrix) against
   each column's cuts (low_c, high_c) and each row's (low_r, high_r): scores above a
   high cut are counted (above_c[c], above_r[r0 + r]); those between the cuts are
   listed as (row, column) pairs, row-major, separately for columns (band_c) and rows
   (band_r). Returns 0, or -1 when a list would pass its capacity. Defined twice:
   for float32 scores and for bfloat16 ones (read as the float32 they equal). */
#include <string.h>
static inline float bf16_value(unsigned short h) {
  unsigned int bits = (unsigned int)h << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}
#define BANDS(NAME, TYPE, VALUE)                                                            \
long NAME(const TYPE *S, long nr, long nc, long r0,                                         \
          const float *low_c, const float *high_c, const float *low_r, const float *high_r, \
          long *above_c, long *above_r, long *band_c, long cap_c, long *n_c,                \
          long *band_r, long cap_r, long *n_r) {                                            \
  for (long r = 0; r < nr; r++) {                                                           \
    const TYPE *row = S + r * nc;                                                           \
    float lo = low_r[r0 + r], hi = high_r[r0 + r];                                          \
    long above = 0;                                                                         \
    for (long c = 0; c < nc; c++) {                                                         \
      float s = VALUE(row[c]);                                                              \
      if (s > high_c[c]) above_c[c]++;                                                      \
      else if (s >= low_c[c]) {                                                             \
        if (*n_c >= cap_c) return -1;                                                       \
        band_c[2 * *n_c] = r0 + r; band_c[2 * *n_c + 1] = c; (*n_c)++;                      \
      }                                                                                     \
      if (s > hi) above++;                                                                  \
      else if (s >= lo) {                                                                   \
        if (*n_r >= cap_r) return -1;                                                       \
        band_r[2 * *n_r] = r0 + r; band_r[2 * *n_r + 1] = c; (*n_r)++;                      \
      }                                                                                     \
    }                                                                                       \
    above_r[r0 + r] += above;                                                               \
  }                                                                                         \
  return 0;                                                                                 \
}
#define AS_IS(x) (x)
BANDS(fnemm_bands, float, AS_IS)
BANDS(fnemm_bands_bf16, unsigned short, bf16_value)
"""
# Reassociation lets the compiler vectorise the sums; nothing here depends on errno,
# traps or the sign of zero. Not -ffast-math: it would also assume no NaN.
# 512-bit vectors where the CPU has them (gcc prefers 256 by default): 15% faster here.
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
         "-fno-trapping-math", "-fPIC", "-shared"]
WIDE = ["-mprefer-vector-width=512"]

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
    key = hashlib.sha256("\0".join([SOURCE, " ".join(FLAGS + WIDE), compiler, platform.machine(), _cpu_tag()])
                         .encode()).hexdigest()[:16]
    target = _cache_dir() / f"order-{key}.so"
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                src = Path(tmp) / "order.c"
                src.write_text(SOURCE)
                built = Path(tmp) / "order.so"
                for flags in (FLAGS + WIDE, FLAGS):     # WIDE is x86-only
                    done = subprocess.run([compiler, *flags, str(src), "-o", str(built)], timeout=120,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    if done.returncode == 0:
                        break
                else:
                    return None
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
    p, n = ctypes.c_void_p, ctypes.c_long
    for name in ("fnemm_bands", "fnemm_bands_bf16"):
        getattr(lib, name).restype = n
        getattr(lib, name).argtypes = [p, n, n, n, p, p, p, p, p, p, p, n, p, p, n, p]
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
    # One row range per thread: every range streams all captions through the cache once.
    step = max(8, -(-n // threads))
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


def bands(scores: torch.Tensor, r0: int, low_c: torch.Tensor, high_c: torch.Tensor, low_r: torch.Tensor,
          high_r: torch.Tensor, above_c: torch.Tensor, above_r: torch.Tensor,
          threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over a float32 or bfloat16 block of scores (rows r0.. of the whole matrix) against
    per-column and per-row (low, high) float32 cuts: adds the counts of scores above
    the high cuts into the long tensors ``above_c`` (per column) and ``above_r`` (per
    row of the whole), and returns the (row, column) pairs between the cuts, for the
    columns' cuts and for the rows' (each an (k, 2) long tensor, row-major order).
    The kernel must be available (see ``applies``)."""
    scores = scores.contiguous()
    nr, nc = scores.shape
    if scores.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"bands takes float32 or bfloat16 scores, not {scores.dtype}")
    for tensor in (low_c, high_c, low_r, high_r):
        assert tensor.dtype == torch.float32 and tensor.is_contiguous()
    assert above_c.dtype == above_r.dtype == torch.long and above_c.is_contiguous() and above_r.is_contiguous()
    if nr == 0:
        return torch.empty(0, 2, dtype=torch.long), torch.empty(0, 2, dtype=torch.long)
    fn = _lib.fnemm_bands if scores.dtype == torch.float32 else _lib.fnemm_bands_bf16
    threads = max(1, min(threads or torch.get_num_threads(), nr))
    step = -(-nr // threads)
    parts = [(s, min(s + step, nr)) for s in range(0, nr, step)]
    results: list = [None] * len(parts)
    p = ctypes.c_void_p

    def run(k: int) -> None:
        lo, hi = parts[k]
        cap = max(4096, (hi - lo) * nc // 256)
        while True:
            counts = torch.zeros(nc, dtype=torch.long)
            saved = above_r[r0 + lo:r0 + hi].clone()
            band_c = torch.empty(cap, 2, dtype=torch.long)
            band_r = torch.empty(cap, 2, dtype=torch.long)
            n_c, n_r = ctypes.c_long(0), ctypes.c_long(0)
            status = fn(scores[lo:hi].data_ptr(), hi - lo, nc, r0 + lo,
                        low_c.data_ptr(), high_c.data_ptr(), low_r.data_ptr(), high_r.data_ptr(),
                        counts.data_ptr(), above_r.data_ptr(), band_c.data_ptr(), cap,
                        p(ctypes.addressof(n_c)), band_r.data_ptr(), cap, p(ctypes.addressof(n_r)))
            if status == 0:
                results[k] = counts, band_c[:n_c.value], band_r[:n_r.value]
                return
            above_r[r0 + lo:r0 + hi] = saved       # a list filled up: again, with room for all
            cap = max(cap * 4, (hi - lo) * nc)

    if len(parts) == 1:
        run(0)
    else:
        with ThreadPoolExecutor(len(parts)) as pool:
            list(pool.map(run, range(len(parts))))
    for counts, _, _ in results:
        above_c += counts
    return torch.cat([r[1] for r in results]), torch.cat([r[2] for r in results])
