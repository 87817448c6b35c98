"""Evaluation as in the paper: perplexity on the specialized and the general domain; S, DG, DG/S."""
from __future__ import annotations

import math

import torch

from .data import PackedRows


@torch.no_grad()
def evaluate_perplexity(loss_module, rows: PackedRows, batch_size: int, accelerator) -> float:
    """exp(mean next-token NLL) over every trained position of `rows`, split across processes.

    Process r takes rows r, r+P, r+2P, ...; every process runs the same number of forward passes
    (a process short of rows runs one on a row cut to a single token, which has no label), since
    DDP and FSDP forward passes hold collectives that must match across processes.
    """
    loss_module.eval()
    total = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    mine = list(range(accelerator.process_index, len(rows), accelerator.num_processes))
    num_batches = math.ceil(math.ceil(len(rows) / accelerator.num_processes) / batch_size)  # the same everywhere
    for s in range(0, num_batches * batch_size, batch_size):
        part = mine[s:s + batch_size]
        batch = rows.batch(part or [0])
        if not part:
            batch["length"] = torch.ones_like(batch["length"])  # no label token: adds 0 to both sums
            batch["mask"] = torch.zeros_like(batch["mask"])
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            loss, n = loss_module(**batch)
        total += loss.double()
        count += n.double()
    loss_module.train()
    total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
    return math.exp(total.item() / max(count.item(), 1.0))


def specialization(base: float, now: float) -> float:
    """S: relative drop of specialized-domain perplexity from the start (higher is better)."""
    return (base - now) / base


def degeneralization(base: float, now: float) -> float:
    """DG: relative rise of general-domain perplexity from the start (lower is better)."""
    return (now - base) / base


def ratio(dg: float | None, s: float | None) -> float | None:
    """DG/S: how much generality each unit of specialization costs (lower is better)."""
    if dg is None or s is None or s == 0:
        return None
    return dg / s
