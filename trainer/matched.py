"""Comparing runs at matched specialization, and over seeds: pure functions of numbers, no model, no files.

MFT's claim is less degeneralization (DG) at a given specialization (S). One run's S and DG are one point; its
evaluations over steps are a trajectory in the (S, DG) plane. `dg_at` reads plain finetuning's DG off FT's
trajectory at any S it reached; `match` compares an MFT point with it; `spread` sums a quantity up over seeds.
"""
from __future__ import annotations

import math
import statistics


def first_passage(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (S, DG) points of a trajectory, in step order, that reach a higher S than every earlier one.

    DG at a given S is then DG when the run FIRST reached that S, the path between evaluations taken as straight. A
    trajectory whose S falls back (and climbs again) has its later points at an S it already reached left out, so
    S is strictly increasing along what remains and DG is a function of S.
    """
    kept: list[tuple[float, float]] = []
    for s, dg in points:
        if not kept or s > kept[-1][0]:
            kept.append((s, dg))
    return kept


def dg_at(points: list[tuple[float, float]], s: float) -> float | None:
    """DG of the trajectory `points` ((S, DG) in step order) at specialization `s`: piecewise linear in S along
    first_passage(points); None when `s` is outside the S it reached (no extrapolation)."""
    path = first_passage(points)
    if not path or not path[0][0] <= s <= path[-1][0]:
        return None
    for (s0, d0), (s1, d1) in zip(path, path[1:]):
        if s <= s1:
            return d0 + (d1 - d0) * (s - s0) / (s1 - s0)
    return path[0][1]  # a single point, at s itself


def lowest_dg_at_or_above(points: list[tuple[float, float]], s: float) -> float | None:
    """The least DG of any evaluated point with S >= s (None if there is none): the most favourable reading of
    FT, its best checkpoint that specializes at least as much, with no interpolation."""
    dgs = [dg for si, dg in points if si >= s]
    return min(dgs) if dgs else None


def match(s: float, dg: float, ft_points: list[tuple[float, float]]) -> dict:
    """An MFT point (S = s, DG = dg) against FT's trajectory.

    Returns S, dg_mft, dg_ft (FT's DG at S by dg_at; None out of range), ft_s_min / ft_s_max (the S range FT's
    trajectory covers), in_range, difference = dg_ft - dg_mft (positive: MFT degeneralizes less), ratio =
    dg_ft / dg_mft (only where dg_mft > 0: a ratio of DGs of either sign, or near 0, says nothing), and
    dg_ft_lowest (lowest_dg_at_or_above) with difference_lowest = dg_ft_lowest - dg_mft.
    """
    path = first_passage(ft_points)
    dg_ft = dg_at(ft_points, s)
    lowest = lowest_dg_at_or_above(ft_points, s)
    return {
        "S": s,
        "dg_mft": dg,
        "dg_ft": dg_ft,
        "in_range": dg_ft is not None,
        "ft_s_min": path[0][0] if path else None,
        "ft_s_max": path[-1][0] if path else None,
        "difference": None if dg_ft is None else dg_ft - dg,
        "ratio": dg_ft / dg if dg_ft is not None and dg > 0 else None,
        "dg_ft_lowest": lowest,
        "difference_lowest": None if lowest is None else lowest - dg,
    }


def spread(values: list[float | None]) -> dict:
    """n, mean, sample standard deviation (n - 1 in the denominator; None for n < 2), min and max of the values
    that are not None (e.g. over seeds)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": len(xs), "mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else None,
            "min": min(xs), "max": max(xs)}


# -- frontiers: a method over all its settings and checkpoints -------------------------------------------------------
def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (S, DG) points no other point beats (at least as much S with at most as much DG, one of them strictly),
    sorted by S. Over every checkpoint of every run of a method, this is what the method can offer when its settings
    and its checkpoint are chosen after the fact: the best-tuned method, the way a sweep picks it."""
    front: list[tuple[float, float]] = []
    for s, dg in sorted({(float(s), float(dg)) for s, dg in points
                         if math.isfinite(s) and math.isfinite(dg)}, key=lambda p: (-p[0], p[1])):
        if not front or dg < front[-1][1]:
            front.append((s, dg))
    return front[::-1]


def best_s_within(points: list[tuple[float, float]], dg_max: float) -> float | None:
    """The largest S of any point whose DG is at most `dg_max` (None if none is): how far a method specializes
    while it forgets no more than dg_max."""
    ss = [s for s, dg in points if dg <= dg_max and math.isfinite(s)]
    return max(ss) if ss else None
