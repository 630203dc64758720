"""Fault injection for tests: die or pause at a named point of a job.

``FNEMM_DIE_AT=POINT`` kills the process there exactly as ``kill -9`` would;
``FNEMM_PAUSE_AT=POINT`` prints ``fnemm: paused at POINT`` on stderr and waits for a
line on stdin (a test then acts while the job holds its folder, and lets it go on).
Points: ``chunk-1`` (an extraction right after it commits chunk 1), ``epoch-3`` (a
training run after epoch 3's metrics; ``seed-1/epoch-3``: only the run in a folder
named seed-1), ``batch-2`` (a training epoch after its second step; ``RUN/epoch-3/batch-2``:
only in epoch 3 of the run in a folder named RUN), ``assemble-stats`` and ``assemble-arrays`` (an assembly between its
writes), ``index-sides`` (an index build before its manifest). Tests use these
instead of racing a running process with a timer.
"""

from __future__ import annotations

import os
import signal
import sys

DIE, PAUSE = "FNEMM_DIE_AT", "FNEMM_PAUSE_AT"


def fault(*points: str) -> None:
    """Die or pause here when FNEMM_DIE_AT / FNEMM_PAUSE_AT names one of ``points``."""
    if os.environ.get(DIE) in points:
        os.kill(os.getpid(), signal.SIGKILL)
    if (point := os.environ.get(PAUSE)) in points:
        print(f"fnemm: paused at {point}", file=sys.stderr, flush=True)
        sys.stdin.readline()
