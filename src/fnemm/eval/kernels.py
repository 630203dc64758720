"""A compiled CPU kernel for the order-similarity score matrix (paper Eq. 3), with
the torch code as the fallback.

S_OE(c, i) = -||max(0, c - i)||^2 has no matrix-product form, so evaluation on a CPU
spends its time in elementwise torch ops that each pass over a (tile, dim) temporary.
A short C loop that keeps a register block of 4 images x 4 captions, compiled for
this CPU, does it many times faster (bench/eval_speed.py measures it). It is built on first use with the system's C compiler (``$CC``, else
``cc``/``gcc``; 0.2 s) into the user's cache folder and loaded with ctypes; the work
is split over threads by rows (ctypes releases the GIL).

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


/* One pass over a tile of scores S (nr x nc, float32) against each column's threshold
   (pos) and each row's (best): t2i[c] += #rows with S >= pos[c], i2t[r] += #columns with
   S >= best[r]. Counters in int32: a tile has fewer than 2^31 rows or columns. */
void fnemm_count(const float *S, long nr, long nc, const float *pos, const float *best, int *t2i, int *i2t) {
  for (long r = 0; r < nr; r++) {
    const float *row = S + r * nc;
    const float b = best[r];
    int above = 0;
    for (long c = 0; c < nc; c++) {
      const float s = row[c];
      t2i[c] += s >= pos[c];
      above += s >= b;
    }
    i2t[r] += above;
  }
}
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
    lib.fnemm_order_rows.restype = None
    lib.fnemm_order_rows.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 4
    lib.fnemm_count.restype = None
    lib.fnemm_count.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long] + [ctypes.c_void_p] * 4
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


def count_at_or_above(scores: torch.Tensor, positive: torch.Tensor, best: torch.Tensor,
                      t2i: torch.Tensor, i2t: torch.Tensor) -> bool:
    """Add to ``t2i`` (per column) how many rows of ``scores`` reach each column's
    ``positive``, and to ``i2t`` (per row) how many columns reach each row's ``best``, in
    one compiled pass; False (nothing done) where the kernel does not apply (not CPU
    float32, or no kernel), and the caller counts with torch."""
    if not (scores.device.type == "cpu" and scores.dtype == torch.float32 and positive.dtype == torch.float32
            and best.dtype == torch.float32 and scores.dim() == 2 and available()):
        return False
    scores, positive, best = scores.contiguous(), positive.contiguous(), best.contiguous()
    nr, nc = scores.shape
    cols = torch.zeros(nc, dtype=torch.int32)
    rows = torch.zeros(nr, dtype=torch.int32)
    if nr and nc:
        _lib.fnemm_count(scores.data_ptr(), nr, nc, positive.data_ptr(), best.data_ptr(), cols.data_ptr(),
                         rows.data_ptr())
    t2i += cols.to(t2i.dtype)
    i2t += rows.to(i2t.dtype)
    return True
