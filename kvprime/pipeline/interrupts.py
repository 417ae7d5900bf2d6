"""Stopping a run cleanly on SIGINT (Ctrl-C), SIGTERM (``kill``, ``scancel``, Slurm pre-emption) or SIGUSR2
(the warning submitit asks Slurm to send ahead of a job's time limit).

The first signal stops the run at once, except while a score line is being written: there it waits until
the line is whole, so the score log always ends at a record boundary. The command then says how many records
were written and how to continue (exit status 128 + the signal number: 130, 143, 140).
"""

from __future__ import annotations

import signal
from contextlib import contextmanager

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


class StopSignal(BaseException):
    """Raised from the signal handler; a BaseException so that no ``except Exception`` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_state = {"critical": 0, "pending": None}


def _handler(signum, frame):
    if _state["critical"]:
        _state["pending"] = signum
        return
    raise StopSignal(signum)


@contextmanager
def stop_on_signals():
    """Turn the ``HANDLED`` signals into ``StopSignal`` for the duration (main thread only; elsewhere a no-op)."""
    previous = {}
    try:
        for sig in HANDLED:
            previous[sig] = signal.signal(sig, _handler)
    except ValueError:  # not the main thread: leave the process's handlers alone
        for sig, old in previous.items():
            signal.signal(sig, old)
        previous = {}
    _state.update(critical=0, pending=None)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        _state.update(critical=0, pending=None)


@contextmanager
def record_boundary():
    """A signal arriving inside this block takes effect when the block ends (one whole record written)."""
    _state["critical"] += 1
    try:
        yield
    finally:
        _state["critical"] -= 1
        pending = _state["pending"]
        if pending is not None and not _state["critical"]:
            _state["pending"] = None
            raise StopSignal(pending)
