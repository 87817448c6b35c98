"""Compact encodings of the cached top-k log-probs, as pure numpy functions.

`q8` (`--logprob-dtype q8`) stores a position's K sorted log-probs as
- `top1_logprob` (float32): the teacher's max log-prob, exact (the trainer's p_max);
- `topk_logprobs` (uint8, K): the gap below it, g_j = lp_0 - lp_j >= 0, companded and quantised
  to an integer code c_j = round(scale * sqrt(min(g_j, gap_max))) in [0, levels], stored as
  increments along k: column 0 is c_0 = 0, column j is c_j - c_{j-1} >= 0 (the log-probs are
  sorted, so codes never decrease and the increments are small, which zstd compresses well).
Decoding: lp_j = top1 - (cumsum(increments)_j / scale)^2, so column 0 is top1 exactly.

Why sqrt companding rather than a uniform step: a cross-entropy target cares about absolute
probability error, p_j * |error of g_j|, which a uniform step makes largest next to the top-1
(p_j ~ p_max). sqrt spends the codes where the mass is: the error in g is at most
sqrt(g)/scale + 1/(4 scale^2), so |error of p_j| <= 0.0068 * p_max at any gap (uniform steps of
1/16 nat: up to 0.031 * p_max), in about as many bytes. Gaps beyond gap_max (16 nats: p_j below
1.1e-7 * p_max; -inf included) are stored as gap_max.
"""
from __future__ import annotations

import numpy as np

Q8 = "q8"
Q8_GAP_MAX = 16.0  # nats below the top-1 that the codes cover
Q8_LEVELS = 255  # largest code (uint8)


def q8_spec(gap_max: float = Q8_GAP_MAX) -> dict:
    """The manifest's description of the q8 encoding of `topk_logprobs`: everything a reader needs to decode."""
    return {
        "name": Q8,
        "top1_field": "top1_logprob",
        "gap_max": float(gap_max),
        "levels": Q8_LEVELS,
        "scale": Q8_LEVELS / float(np.sqrt(gap_max)),
        "decoded_dtype": "float32",
        "stored": "uint8 increments along k of code_j = round(scale * sqrt(min(top1 - lp_j, gap_max))); "
                  "column 0 is 0",
        "decode": "lp_j = top1_logprob - (cumsum_k(topk_logprobs)_j / scale)^2, computed in float32; column 0 is "
                  "top1_logprob exactly; gaps >= gap_max (and -inf) decode as gap_max",
        "error_bound": "|decoded gap - gap| <= sqrt(gap) / scale + 1 / (4 scale^2) for gaps < gap_max",
    }


def _scale(gap_max: float) -> float:
    return Q8_LEVELS / float(np.sqrt(gap_max))


def q8_gap_table(gap_max: float = Q8_GAP_MAX) -> np.ndarray:
    """(levels + 1,) float32: the decoded gap of each code, (code / scale)^2."""
    return np.square(np.arange(Q8_LEVELS + 1, dtype=np.float64) / _scale(gap_max)).astype(np.float32)


def q8_error_bound(gap: np.ndarray, gap_max: float = Q8_GAP_MAX) -> np.ndarray:
    """Largest |decoded gap - gap| the quantisation allows for gaps below gap_max (float rounding aside)."""
    scale = _scale(gap_max)
    return np.sqrt(np.asarray(gap, dtype=np.float64)) / scale + 1.0 / (4.0 * scale**2)


def encode_q8(topk_logprobs: np.ndarray, gap_max: float = Q8_GAP_MAX) -> tuple[np.ndarray, np.ndarray]:
    """Encode sorted top-k log-probs as (exact top-1, uint8 code increments).

    Args:
        topk_logprobs: (..., K) float log-probs sorted descending along the last axis (padding rows of
            zeros are fine; -inf is fine and stored as gap_max).
        gap_max: nats below the top-1 the codes cover.
    Returns:
        top1: (...,) float32, topk_logprobs[..., 0] exactly.
        increments: (..., K) uint8; column 0 is 0.
    Raises:
        ValueError for NaN values, a non-finite top-1, or values not sorted descending.
    """
    lp = np.asarray(topk_logprobs, dtype=np.float32)
    if np.isnan(lp).any():
        raise ValueError("q8 encoding: the top-k log-probs hold NaN")
    top1 = lp[..., 0]  # (...,)
    if not np.isfinite(top1).all():
        raise ValueError("q8 encoding: a top-1 log-prob is not finite")
    gap = top1[..., None].astype(np.float64) - lp  # (..., K), inf where lp is -inf
    if (gap < 0).any():
        raise ValueError("q8 encoding: the top-k log-probs are not sorted descending (a value exceeds column 0)")
    codes = np.rint(_scale(gap_max) * np.sqrt(np.minimum(gap, gap_max))).astype(np.int16)  # (..., K) in [0, levels]
    increments = np.diff(codes, axis=-1, prepend=0)  # (..., K); column 0 is codes[..., 0] = 0
    if (increments < 0).any():
        raise ValueError("q8 encoding: the top-k log-probs are not sorted descending")
    return top1.copy(), increments.astype(np.uint8)


def q8_codes(increments: np.ndarray) -> np.ndarray:
    """(..., K) int32 codes from stored increments (cumulative sum along k)."""
    return np.cumsum(increments, axis=-1, dtype=np.int32)


def decode_q8(top1: np.ndarray, increments: np.ndarray, gap_max: float = Q8_GAP_MAX) -> np.ndarray:
    """Decode (top-1, uint8 code increments) back to float32 log-probs.

    Args:
        top1: (...,) float top-1 log-probs.
        increments: (..., K) uint8 as written by encode_q8.
    Returns:
        (..., K) float32 log-probs; column 0 equals top1 exactly.
    Raises:
        ValueError if a code exceeds the levels or column 0 is not 0 (not written by encode_q8).
    """
    codes = q8_codes(increments)  # (..., K)
    if codes.size and (codes[..., 0].any() or codes[..., -1].max() > Q8_LEVELS):
        raise ValueError(f"q8 decoding: codes outside [0, {Q8_LEVELS}] or a non-zero first column")
    return np.asarray(top1, dtype=np.float32)[..., None] - q8_gap_table(gap_max)[codes]  # (..., K)


def q8_bad_rows(increments: np.ndarray) -> np.ndarray:
    """(R,) bool: rows of stored increments (R, ..., K) that encode_q8 cannot have written."""
    codes = q8_codes(increments)  # (R, ..., K)
    bad = (codes[..., 0] != 0) | (codes[..., -1] > Q8_LEVELS)  # (R, ...)
    return bad.reshape(len(increments), -1).any(1)
