"""Several processes (torchrun, accelerate launch): what both stages need to agree on.

Shared by both stages, like models.py: how many processes a launch started, leaving the process
group cleanly at exit, and letting the first process decide something (check or wipe a folder)
while the others wait for its verdict, or its error.
"""
from __future__ import annotations

import atexit
import os
import time

import torch


def launched_processes() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def cpu_launch(device_type: str | None) -> bool:
    """Whether to pass cpu=True to Accelerate: on a machine without a GPU, Accelerate otherwise takes a
    torchrun launch of several processes for ONE process (each would work alone on the full batch)."""
    return launched_processes() > 1 and device_type in (None, "cpu", "mps")


_registered = False


def leave_process_group_at_exit() -> None:
    """Register (once per process: a sweep runs several trainings in one) the clean exit below."""
    global _registered
    if not _registered:
        atexit.register(_leave_process_group)
        _registered = True


def _leave_process_group() -> None:
    # Gloo's worker threads free a finished collective's tensors a moment after it completes, and need the
    # GIL for that; if the interpreter is already finalising, the process aborts (SIGABRT) and the launcher
    # reports a failure after a run that succeeded. Release the GIL for a moment, then leave the group.
    time.sleep(0.05)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def decide_on_main(state, decide):
    """Run `decide()` on the first process only; every process returns its result or raises its error.

    `state` is Accelerate's PartialState or Accelerator. A user error (ValueError, FileNotFoundError)
    on the first process is raised on all of them, so none waits forever at the next barrier.
    """
    result, problem = None, None
    if state.is_main_process:
        try:
            result = decide()
        except (ValueError, FileNotFoundError) as e:
            if state.num_processes == 1:
                raise
            problem = e
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        result, shared = broadcast_object_list([result, problem])
        if shared is not None:
            raise problem if problem is not None else shared
    return result
