"""Where the bundled real data lives: ``$FNEMM_DATA``, else ``../shared/data`` beside
the working directory or beside this source tree. Never downloaded, never copied in."""

from __future__ import annotations

import os
from pathlib import Path


def data_roots() -> list[Path]:
    roots = [Path(os.environ["FNEMM_DATA"])] if os.environ.get("FNEMM_DATA") else []
    return roots + [Path.cwd().parent / "shared" / "data", Path(__file__).resolve().parents[3] / "shared" / "data"]


def find_data(relative: str) -> Path | None:
    """The first ``root/relative`` that exists, else None."""
    for root in data_roots():
        if (root / relative).exists():
            return root / relative
    return None
