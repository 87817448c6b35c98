"""Fault injection for the crash tests: `MFT_FAULT=<point>` makes the process SIGKILL itself there.

Points: `cache:shard-N` (after shard N is complete), `cache:shard-write` (inside a shard write,
before the rename), `train:step-N` (after optimiser step N), `train:checkpoint-N` (inside the
checkpoint save at step N, before it is marked complete). `train:nan-loss-N` is not a crash: the loss
of step N becomes NaN (fault_active). Unset (always, outside tests): one dict lookup.
"""
from __future__ import annotations

import os
import signal


def fault_point(name: str) -> None:
    if os.environ.get("MFT_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def fault_active(name: str) -> bool:
    return os.environ.get("MFT_FAULT") == name
