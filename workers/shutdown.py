"""SIGTERM as a clean exit. uvicorn, once it has shut down, re-raises the signal that stopped it; with the
default SIGTERM action that kills the process before any `finally` runs, so a worker would never mark itself
offline and `conserve serve` would orphan its worker. A handler that raises SystemExit lets them run."""
from __future__ import annotations

import signal
import threading


def exit_cleanly_on_sigterm() -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread (tests run servers on others)

    def _exit(signum, frame):
        # Once is enough: a second SIGTERM (a process group signalled, then the parent passing it on) must not
        # interrupt the cleanup the first one started.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _exit)
