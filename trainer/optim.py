"""The optimiser of `mft train` (--optimizer) and what its state costs in memory.

- adamw (default): torch.optim.AdamW(lr, weight_decay), torch's defaults otherwise (betas 0.9/0.999, eps 1e-8).
  Two float32 moments per trained parameter: 8 bytes each.
- adafactor: torch.optim.Adafactor(lr, weight_decay), torch's defaults otherwise (beta2_decay -0.8, eps (None,
  1e-3), d 1.0). No first moment, and the second moment of a matrix is factored into a row and a column vector,
  so its state is (rows + columns) floats per matrix instead of rows x columns. Its step is relative:
  min(lr, 1/sqrt(step)) times the root mean square of the weight, so --lr is a relative step size (torch's default
  is 1e-2; AdamW's 1e-4 is a very gentle Adafactor).
- sgd: torch.optim.SGD(lr, momentum 0.9, weight_decay): one float32 momentum buffer per trained parameter. Plain
  SGD needs a learning rate one to two orders of magnitude above AdamW's.
- adamw8bit: bitsandbytes' AdamW8bit(lr, weight_decay): both moments in 8 bits with a float32 scale per block of
  256 (tensors under 4,096 elements keep float32 moments). Needs the `8bit` extra and a CUDA GPU.

Every optimiser's state is saved with the checkpoint (Accelerate's save_state) and restored by --resume.
"""
from __future__ import annotations

import torch

OPTIMIZERS = ("adamw", "adafactor", "sgd", "adamw8bit")
SGD_MOMENTUM = 0.9
BNB_BLOCK = 256  # bitsandbytes' block size for 8-bit optimiser states
BNB_MIN_8BIT_SIZE = 4096  # tensors smaller than this keep 32-bit states (bitsandbytes' min_8bit_size default)


def check_optimizer(name: str, device: torch.device) -> None:
    """Refuse, before anything is loaded, an optimiser this machine cannot run (ValueError naming the flag)."""
    if name != "adamw8bit":
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError("--optimizer adamw8bit needs bitsandbytes: pip install 'mft-cache[8bit]' (and a CUDA GPU); "
                         "or choose --optimizer adafactor, whose state is smaller still") from None
    if device.type != "cuda":
        raise ValueError(f"--optimizer adamw8bit needs a CUDA GPU (bitsandbytes' 8-bit optimiser states); this run is "
                         f"on {device.type}. Choose --optimizer adafactor for a small optimiser state here")


def build_optimizer(name: str, params: list, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The optimiser `name` over `params` (the trained parameters)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM, weight_decay=weight_decay)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"--optimizer must be one of {OPTIMIZERS}; got {name!r}")


def state_bytes(name: str, shapes: list[tuple[int, ...]]) -> int:
    """Bytes of optimiser state for trained parameters of these shapes (float32 parameters)."""
    total = 0
    for shape in shapes:
        n = 1
        for s in shape:
            n *= s
        if name == "adamw":
            total += 8 * n
        elif name == "sgd":
            total += 4 * n
        elif name == "adafactor":
            total += 4 * (n // shape[-1] + n // shape[-2]) if len(shape) > 1 else 4 * n
        elif name == "adamw8bit":
            total += 8 * n if n < BNB_MIN_8BIT_SIZE else 2 * n + 2 * 4 * -(-n // BNB_BLOCK)
        else:
            raise ValueError(f"--optimizer must be one of {OPTIMIZERS}; got {name!r}")
    return total
