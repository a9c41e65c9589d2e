"""Child processes that die with their parent: `conserve serve` must not leave a worker or a Redis server
behind when it is killed (SIGKILL gives it no chance to clean up)."""
from __future__ import annotations

import ctypes
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux: the parent's own shutdown path still stops the child


def popen_tied_to_parent(cmd: list[str], **kwargs) -> subprocess.Popen:
    if sys.platform.startswith("linux"):
        kwargs["preexec_fn"] = _die_with_parent
    return subprocess.Popen(cmd, **kwargs)
