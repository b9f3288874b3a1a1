"""A child started from a process that ignores SIGINT (a background job of a script: `cmd &`) still
stops on the SIGINT sent to stop it when started with ctxmem.proc.default_sigint."""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from ctxmem.proc import default_sigint

SLEEPER = [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"]


def _ignoring_sigint(then=None):
    """preexec_fn: the child starts as under a shell's background job (SIGINT ignored), then `then`."""
    def pre():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if then is not None:
            then()
    return pre


@pytest.mark.parametrize("restored", [False, True])
def test_a_sigint_stops_the_child_only_with_its_default_disposition_restored(restored):
    proc = subprocess.Popen(SLEEPER, stdout=subprocess.PIPE, text=True,
                            preexec_fn=_ignoring_sigint(default_sigint if restored else None))
    try:
        assert proc.stdout.readline() == "ready\n"  # the interpreter is up: its signal set-up is done
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=30 if restored else 3)  # stops in milliseconds, or not at all
        except subprocess.TimeoutExpired:
            code = None  # ignored: still running
        if restored:
            assert code == -signal.SIGINT  # KeyboardInterrupt ended it (Python exits by the signal)
        else:
            assert code is None  # what a test or the demo would wait out its timeout on
    finally:
        proc.kill()
        proc.wait()
