"""`fnemm serve` in a child process on 127.0.0.1 (tests and bench/search_speed.py).

The server binds port 0 and prints the port it got before it serves; the socket
listens from then on, so the first request simply waits for the app: no free-port
guess (bind-and-release races other processes) and no polling on the clock."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import threading
from pathlib import Path


class Url(str):
    """The base URL, with the server's process id (``.pid``)."""
    pid: int


@contextlib.contextmanager
def serving(index: Path, log: Path, *args: str, timeout: float = 120):
    """Yields the base URL (a str; ``.pid`` the server's process) once /healthz answers;
    stops the server on exit. Its output goes to ``log``, which a start-up failure quotes."""
    import httpx
    proc = subprocess.Popen([sys.executable, "-m", "fnemm.cli", "serve", "--index", str(index), "--port", "0",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = open(log, "w")
    try:
        first = ""
        for line in proc.stdout:                  # until the line that names the address
            out.write(line)
            if m := re.search(r"http://127\.0\.0\.1:(\d+)/", line):
                first = m.group(1)
                break
        if not first:
            proc.wait()
            out.flush()
            raise RuntimeError(f"fnemm serve did not start:\n{Path(log).read_text()}")
        # keep draining its output into the log, so that it never blocks on a full pipe
        drain = threading.Thread(target=lambda: [out.write(line) for line in proc.stdout], daemon=True)
        drain.start()
        url = Url(f"http://127.0.0.1:{first}")
        url.pid = proc.pid
        if httpx.get(url + "/healthz", timeout=timeout).status_code != 200:
            raise RuntimeError(f"fnemm serve is not healthy:\n{Path(log).read_text()}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out.close()
