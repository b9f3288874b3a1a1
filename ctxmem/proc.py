"""Child processes that a SIGINT can stop (standard library only)."""
from __future__ import annotations

import signal


def default_sigint() -> None:
    """``preexec_fn`` for a child that will be stopped with SIGINT (Ctrl-C, ``killpg(pid, SIGINT)``).

    A shell starts a background job (``cmd &`` in a script, a CI step's runner) with SIGINT ignored, and
    an ignored signal stays ignored across exec: Python then installs no KeyboardInterrupt handler, the
    child never sees the SIGINT sent to stop it, and the parent waits out its timeout before killing it
    (no clean shutdown). The child gets the default disposition back, as a terminal would give it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
