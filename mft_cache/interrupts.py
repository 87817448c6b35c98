"""Ctrl-C (SIGINT) and SIGTERM (what schedulers, `kill` and `docker stop` send): both stop a command cleanly.

The CLI installs `handled()`: SIGINT raises KeyboardInterrupt, SIGTERM raises `Terminated` (a
KeyboardInterrupt, so every `except KeyboardInterrupt` treats them alike; the CLI exits 130 or 143). Code that can
stop better at a point of its own choosing (the training loop: after a step, with a checkpoint) runs inside
`deferred()`: there the first signal is only remembered, `pending()` says so, and `raise_pending()` stops; a
second signal stops at once. Files are only ever renamed into place complete, so stopping anywhere is safe.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM: handled like Ctrl-C; the CLI exits 143 (128 + 15) instead of 130."""


_defer = False
_pending: int | None = None


def _exception(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _handler(signum, frame) -> None:
    global _pending
    if _defer and _pending is None:
        _pending = signum
        log.warning("%s received: stopping after this step (send it again to stop at once)",
                    signal.Signals(signum).name)
        return
    raise _exception(signum)


@contextlib.contextmanager
def handled():
    """SIGINT and SIGTERM both raise (or, inside `deferred()`, are remembered); the old handlers come back after."""
    if threading.current_thread() is not threading.main_thread():  # signal.signal works in the main thread only
        yield
        return
    old = {s: signal.signal(s, _handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def deferred(enabled: bool = True):
    """Within: the first signal waits for `raise_pending()`. `enabled=False` (several processes, which could
    each get it at another step and then disagree about saving) keeps signals raising at once."""
    global _defer, _pending
    _defer, _pending = enabled, None
    try:
        yield
    finally:
        _defer, _pending = False, None


def pending() -> int | None:
    """The signal waiting inside `deferred()`, or None."""
    return _pending


def raise_pending() -> None:
    """Stop now if a signal is waiting: raise what it would have raised."""
    global _pending
    if _pending is not None:
        signum, _pending = _pending, None
        raise _exception(signum)
