"""Progress bars on a terminal, clean lines everywhere else.

A bar is drawn only when stderr is a terminal (``fnemm ... --progress on|off``
overrides, and so does TQDM_DISABLE=1): piped to a file, a job writes whole lines,
one per epoch or stage, never carriage returns. Lines go through :func:`say`, which
keeps them off a bar that is being drawn.
"""

from __future__ import annotations

import os
import sys

from tqdm import tqdm

ENV = "FNEMM_PROGRESS"          # "on" | "off" | unset (auto: on when stderr is a terminal)


def bars_on() -> bool:
    if os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes"):
        return False
    mode = os.environ.get(ENV, "auto")
    if mode in ("on", "off"):
        return mode == "on"
    return sys.stderr.isatty()


def bar(iterable=None, quiet: bool = False, **kwargs) -> tqdm:
    """A tqdm bar, drawn only when bars are on (and not ``quiet``)."""
    return tqdm(iterable, disable=quiet or not bars_on(), **kwargs)


def say(text: str, file=None) -> None:
    """A whole line (on stdout by default), between bar redraws when one is drawn."""
    tqdm.write(text, file=file or sys.stdout)
    (file or sys.stdout).flush()
