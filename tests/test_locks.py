"""One writer per folder: a second one is refused at once, naming the first; the lock
dies with its process, kill -9 included."""

import os
import signal
import subprocess
import sys

import pytest

from fnemm.io.locks import Busy, folder_lock

HOLD = ("import sys, os, signal; from fnemm.io.locks import folder_lock\n"
        "with folder_lock(sys.argv[1]):\n"
        "    print('held', flush=True); sys.stdin.readline()\n"
        "    if sys.argv[2] == 'kill': os.kill(os.getpid(), signal.SIGKILL)\n")


def test_a_second_writer_is_refused_and_the_lock_dies_with_its_process(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "out"), "kill"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"            # the other process holds it now
    with pytest.raises(Busy, match=rf"out: the folder is being written by pid {proc.pid}: .*-c"):
        with folder_lock(tmp_path / "out", "the folder"):
            pass
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.wait() == -signal.SIGKILL
    with folder_lock(tmp_path / "out"):                          # a killed holder leaves no stale lock
        assert (tmp_path / "out" / ".lock").exists()
    with folder_lock(tmp_path / "out"):                          # and released on leaving the block
        pass


def test_waiting_for_a_lock(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "w"), "exit"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    proc.stdin.write("go\n")
    proc.stdin.flush()
    with folder_lock(tmp_path / "w", wait=True):               # blocks until the holder lets go
        assert proc.wait() == 0
    assert os.path.exists(tmp_path / "w" / ".lock")
