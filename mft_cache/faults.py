"""Fault injection for the crash tests: `MFT_FAULT=<point>` makes the process SIGKILL itself there.

Points: `cache:ingest` (after each piece of ingested rows is written), `cache:shard-N` (after shard N is complete), `cache:shard-write` (inside a shard write,
before the rename), `train:step-N` (after optimiser step N), `train:checkpoint-N` (inside the
checkpoint save at step N, before it is marked complete). `train:nan-loss-N` is not a crash: the loss
of step N becomes NaN (fault_active). `MFT_FAULT=pause:<point>` does not crash either: the process writes
"mft fault: paused at <point> (pid N)" to stderr and waits there (up to MFT_PAUSE_S seconds, default 60, or
until a signal arrives), so a test can signal it, or try a second process on its folder, at a known moment.
Unset (always, outside tests): one dict lookup.
"""
from __future__ import annotations

import os
import signal
import sys
import time

from . import interrupts


def fault_point(name: str) -> None:
    fault = os.environ.get("MFT_FAULT")
    if fault == name:
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault == f"pause:{name}":
        _pause(name)


def _pause(name: str) -> None:
    print(f"mft fault: paused at {name} (pid {os.getpid()})", file=sys.stderr, flush=True)
    deadline = time.monotonic() + float(os.environ.get("MFT_PAUSE_S", "60"))
    while time.monotonic() < deadline and interrupts.pending() is None:
        time.sleep(0.02)  # a signal outside interrupts.deferred() raises out of here


def fault_active(name: str) -> bool:
    return os.environ.get("MFT_FAULT") == name
