"""Fault injection for tests: die at a named point of a job exactly as ``kill -9`` would.

``FNEMM_DIE_AT=chunk-1`` kills an extraction right after it commits chunk 1,
``epoch-3`` a training run after epoch 3's metrics (``seed-1/epoch-3``: only the run
in a folder named seed-1), ``assemble-stats`` and ``assemble-arrays`` an assembly
between its writes. Tests use it instead of racing a running process with a timer.
"""

from __future__ import annotations

import os
import signal

ENV = "FNEMM_DIE_AT"


def die_at(*points: str) -> None:
    """Die here when FNEMM_DIE_AT names one of ``points``."""
    if os.environ.get(ENV) in points:
        os.kill(os.getpid(), signal.SIGKILL)
