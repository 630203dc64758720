"""Progress a person can follow, on a terminal and in a log.

On a terminal (stderr is one) a long loop draws a tqdm bar. When stdout is not a
terminal (``fnemm ... > log``, a batch job), the same loop also writes whole lines to
it: one when another tenth is done (at most one every few seconds, and none in a loop's
last few seconds: a loop of a few seconds writes none) or when ``every`` seconds have
passed (default 30), each with done/total, the rate and the time left, never carriage
returns. ``fnemm ... --progress on|off`` forces bars on or off (so does
TQDM_DISABLE=1); FNEMM_PROGRESS_EVERY sets the seconds between log lines (0: every
tenth, however quick). Lines that are not progress go through :func:`say` (the
``fnemm`` logger), which keeps them off a bar being drawn.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
import time

from tqdm import tqdm

ENV = "FNEMM_PROGRESS"          # "on" | "off" | unset (auto: on when stderr is a terminal)
EVERY_ENV = "FNEMM_PROGRESS_EVERY"
EVERY = 30.0                    # seconds between two log lines at most
MIN_GAP = 5.0                   # and at least (a tenth done sooner waits for it)


def bars_on() -> bool:
    if os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes"):
        return False
    mode = os.environ.get(ENV, "auto")
    if mode in ("on", "off"):
        return mode == "on"
    return sys.stderr.isatty()


def lines_on() -> bool:
    """Whether loops also write whole progress lines to stdout (a log, not a terminal)."""
    return os.environ.get(ENV, "auto") != "off" and not sys.stdout.isatty()


# A function's ``quiet=True`` holds for everything it calls, in this thread (and the
# tasks it starts): set once at the edge, not passed down every signature.
_QUIET = contextvars.ContextVar("fnemm_quiet", default=False)


@contextlib.contextmanager
def quieted(on: bool = True):
    """Within the block: no bars, no progress lines and no :func:`say` lines, when ``on``
    (a quiet block inside stays quiet; ``on=False`` changes nothing)."""
    token = _QUIET.set(_QUIET.get() or bool(on))
    try:
        yield
    finally:
        _QUIET.reset(token)


def is_quiet() -> bool:
    """Whether the code running now was asked to be quiet (:func:`quieted`)."""
    return _QUIET.get()


def bar(iterable=None, quiet: bool = False, every: float | None = None, **kwargs):
    """A tqdm bar drawn when bars are on, and whole lines written to stdout when it is a
    log; neither when ``quiet`` or inside :func:`quieted`. Takes tqdm's arguments (total,
    initial, desc, unit...); ``every``: seconds between log lines, when not the default."""
    quiet = quiet or is_quiet()
    drawn = tqdm(iterable, disable=quiet or not bars_on(), **kwargs)
    if quiet or not lines_on():
        return drawn
    return Lines(drawn, kwargs.get("total"), kwargs.get("initial", 0), kwargs.get("desc") or "progress",
                 kwargs.get("unit", "it"), every=every)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Lines:
    """Wraps a (maybe disabled) tqdm bar: the same calls, and whole lines in a log."""

    def __init__(self, inner: tqdm, total: int | None, initial: int, desc: str, unit: str, every: float | None = None,
                 file=None, clock=None):
        self.inner = inner
        self.total = total if total is not None else (len(inner.iterable) if hasattr(inner.iterable, "__len__")
                                                      else None)
        self.n = self.start = self.said_n = initial
        self.desc, self.unit, self.file = desc, unit, file
        self.clock = clock or time.monotonic
        self.t0 = self.said_t = self.clock()
        self.every = float(os.environ.get(EVERY_ENV, every if every is not None else EVERY))
        self.postfix = ""

    def __iter__(self):
        for item in self.inner:
            yield item
            self.n += 1
            self._maybe_say()
        self.close()

    def __len__(self):
        return len(self.inner)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def update(self, n: int = 1) -> None:
        self.inner.update(n)
        self.n += n
        self._maybe_say()

    def set_postfix(self, **kwargs) -> None:
        self.inner.set_postfix(**kwargs)
        self.postfix = ", ".join(f"{k} {v}" for k, v in kwargs.items())

    def _maybe_say(self) -> None:
        now = self.clock()
        tenth = self.total and (self.n - self.said_n) * 10 >= self.total
        if tenth and self.every > 0:
            # a loop about to end says nothing more: its last line comes from close() if it
            # said one before, else from the caller (an epoch of a few seconds wrote a batch
            # line at 92% and at 100% before every epoch line of the demo's log)
            rate = self._rate(now)
            tenth = rate > 0 and (self.total - self.n) / rate >= MIN_GAP
        if (self.every > 0 and now - self.said_t >= self.every) or \
                (tenth and now - self.said_t >= min(MIN_GAP, self.every)):
            self._say(now)

    def _rate(self, now: float) -> float:
        return (self.n - self.start) / max(now - self.t0, 1e-9)

    def _say(self, now: float) -> None:
        self.said_t, self.said_n = now, self.n
        rate = self._rate(now)
        if self.total:
            left = f", {_duration((self.total - self.n) / rate)} left" if rate > 0 and self.n < self.total else ""
            where = f"{self.n:,}/{self.total:,} {self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            where, left = f"{self.n:,} {self.unit}", ""
        speed = f"{rate:.1f} {self.unit}/s" if rate >= 1 else f"{_duration(1 / rate) if rate > 0 else '-'}/{self.unit}"
        tail = f", {self.postfix}" if self.postfix else ""
        say(f"{self.desc}: {where}, {speed}{left}{tail}", self.file)

    def close(self) -> None:
        """The last line, for a loop long enough to have written one before."""
        if self.n != self.said_n and self.said_n != self.start:
            self._say(self.clock())
        self.inner.close()


# --- the one channel for messages ------------------------------------------------------
# Every line fnemm says goes through the ``fnemm`` logger (INFO; warnings go through
# ``warnings.warn``). It has its own handler, as a command-line tool's logger would: each
# message a whole line on the *current* sys.stdout (or the file given), written between
# bar redraws. Silence it, or send it elsewhere, the usual way:
# ``logging.getLogger("fnemm").setLevel(logging.WARNING)``, or replace its handlers. Its
# records (and the service's, ``fnemm.search.service``) also reach the root logger, so an
# application's own logging setup sees them.
log = logging.getLogger("fnemm")


class _Lines(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            file = getattr(record, "file", None) or sys.stdout
            tqdm.write(self.format(record), file=file)
            file.flush()
        except Exception:  # noqa: BLE001 - logging's contract: a handler never raises
            self.handleError(record)


if not any(isinstance(h, _Lines) for h in log.handlers):
    log.addHandler(_Lines())
    log.setLevel(logging.INFO)


def say(text: str, file=None) -> None:
    """A whole line through the ``fnemm`` logger (on stdout, or ``file``), between bar
    redraws when one is drawn; nothing inside :func:`quieted`."""
    if not is_quiet():
        log.info(text, extra={"file": file})
