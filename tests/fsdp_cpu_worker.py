"""`mft <args>` under Accelerate's FSDP on CPU processes: the worker of tests/test_fsdp.py.

    ACCELERATE_USE_FSDP=true FSDP_VERSION=2 ... python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/fsdp_cpu_worker.py train --cache ... --out ...

torch shards on CPU with gloo (FSDP1 and FSDP2), but Accelerate (1.16) gives FSDP only to GPU-like launches: a CPU
launch that asks for it is DDP (DistributedType.MULTI_CPU), whatever the plugin or the environment says. This worker
lets the state Accelerate builds from the environment say FSDP instead, so that the suite runs `mft train`'s FSDP code
(preparing, clipping, evaluating, gathering best/ and final/, sharded checkpoints and --resume) without a GPU. It
changes only that decision, made once per process; everything after it is Accelerate's and torch's own.

FSDP1 also needs, on CPU:
- its device_id to be the plain "cpu" (Accelerate's CPU device is "cpu:0", and FSDP1 compares it with "cpu");
- full state dicts gathered without `offload_to_cpu`: with parameters already on the CPU, torch (2.13) frees the
  gathered copy it hands over (rank 0: "setStorage: ... out of bounds for storage of size 0", or SIGSEGV with
  use_orig_params), the same in a plain FSDP1 module without Accelerate; on a GPU the copy is a real one.
"""
from __future__ import annotations

import sys


def fsdp_on_cpu() -> None:
    import torch
    from accelerate import state
    from accelerate.utils import DistributedType

    original = state.AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            for shared in (self.__dict__, state.PartialState._shared_state):  # later AcceleratorState() copy the latter
                shared["distributed_type"] = DistributedType.FSDP
                shared["device"] = torch.device("cpu")
            self.fsdp_plugin = fsdp_plugin

    state.AcceleratorState.__init__ = init

    from torch.distributed import fsdp

    config = fsdp.FullStateDictConfig

    def full_state_dict_config(offload_to_cpu: bool = False, rank0_only: bool = False):  # torch checks the type
        return config(offload_to_cpu=False, rank0_only=rank0_only)

    fsdp.FullStateDictConfig = full_state_dict_config  # Accelerate's get_state_dict imports it when it gathers


if __name__ == "__main__":
    fsdp_on_cpu()
    from mft_cache.cli import main

    sys.exit(main())
