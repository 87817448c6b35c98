"""Evaluation as in the paper: perplexity on the specialized and the general domain; S, DG, DG/S."""
from __future__ import annotations

import math

import torch

from .data import Rows


@torch.no_grad()
def evaluate_perplexity(loss_module, rows: Rows, batch_size: int, accelerator) -> float | None:
    """exp(mean next-token NLL) over every trained position of `rows`; None when it holds none (see
    evaluate_perplexity_se)."""
    return evaluate_perplexity_se(loss_module, rows, batch_size, accelerator)[0]


@torch.no_grad()
def evaluate_perplexity_se(loss_module, rows: Rows, batch_size: int,
                           accelerator) -> tuple[float | None, float | None]:
    """(perplexity, its standard error over sequences) of `rows`, split across processes; (None, None) when `rows`
    hold no trained position.

    Perplexity is exp(mean next-token NLL) over every trained position. Process r takes rows r, r+P, r+2P, ...;
    every process runs the same number of forward passes (a process short of rows runs one on a row cut to a
    single token, which has no label), since DDP and FSDP forward passes hold collectives that must match across
    processes. The processes add up the moments of the per-sequence sums (sequence_moments), so the standard
    error needs no gather.
    """
    loss_module.eval()
    moments = torch.zeros(len(_MOMENTS), dtype=torch.float64, device=accelerator.device)
    mine = list(range(accelerator.process_index, len(rows), accelerator.num_processes))
    num_batches = math.ceil(math.ceil(len(rows) / accelerator.num_processes) / batch_size)  # the same everywhere
    for s in range(0, num_batches * batch_size, batch_size):
        part = mine[s:s + batch_size]
        batch = rows.batch(part or [0])
        if not part:
            batch["length"] = torch.ones_like(batch["length"])  # no label token: adds 0 to every sum
            batch["label_mask"] = torch.zeros_like(batch["label_mask"])
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            nll, n = loss_module(**batch, per_row=True)  # (B,) summed NLL and trained tokens of each row
        moments += sequence_moments(nll.double(), n.double())
    loss_module.train()
    return perplexity_se(accelerator.reduce(moments, "sum"))


_MOMENTS = ("sequences", "sum_nll", "sum_tokens", "sum_nll_sq", "sum_nll_tokens", "sum_tokens_sq")


def sequence_moments(nll: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(6,) the sums perplexity_se needs, from per-sequence sums: (B,) summed NLL x_i and (B,) trained tokens n_i.
    Sequences without a trained token do not count. Sums of moments add up across batches and processes."""
    live = tokens > 0  # (B,)
    x, n = nll[live], tokens[live]
    return torch.stack([live.sum().to(x.dtype), x.sum(), n.sum(), (x * x).sum(), (x * n).sum(), (n * n).sum()])


def perplexity_se(moments: torch.Tensor) -> tuple[float | None, float | None]:
    """(exp(R), its standard error) where R = Σx_i / Σn_i is the mean NLL per token over m sequences.

    The standard error treats sequences as the sampled units (tokens of one sequence are not independent): R is a
    ratio estimator, whose variance is Σ(x_i - R·n_i)² / (m (m-1) n̄²) with n̄ = Σn_i / m; by the delta method
    se(exp R) = exp(R)·se(R). With sequences of equal length it is exp(R)·std(x_i/n_i)/√m, the standard error of the
    mean per-sequence NLL. The standard error is None for fewer than 2 sequences; both are None when no token was
    evaluated (the mean of nothing is no number: not NLL 0, perplexity 1).
    """
    m, sx, sn, sxx, sxn, snn = moments.double().tolist()
    if sn <= 0:
        return None, None
    r = sx / sn
    ppl = math.exp(r)
    if m < 2:
        return ppl, None
    resid = max(sxx - 2 * r * sxn + r * r * snn, 0.0)  # Σ(x_i - R n_i)², clipped at 0 against rounding
    se_r = math.sqrt(resid / (m * (m - 1))) / (sn / m)
    return ppl, ppl * se_r


def specialization(base: float | None, now: float | None) -> float | None:
    """S: relative drop of specialized-domain perplexity from the start (higher is better); None without both."""
    if base is None or now is None:
        return None
    return (base - now) / base


def degeneralization(base: float | None, now: float | None) -> float | None:
    """DG: relative rise of general-domain perplexity from the start (lower is better); None without both."""
    if base is None or now is None:
        return None
    return (now - base) / base


def ratio(dg: float | None, s: float | None) -> float | None:
    """DG/S: how much generality each unit of specialization costs (lower is better)."""
    if dg is None or s is None or s == 0:
        return None
    return dg / s
