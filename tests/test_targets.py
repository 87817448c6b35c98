"""correction_weight and corrected_targets against the formula written out per element."""
import math

import pytest
import torch

from mft_cache.trainer.targets import OBJECTIVES, correction_weight
from reference import corrected_targets

TAUS = (0.0, 0.05, 0.3, 0.9, 1.0)


def reference_weight(p_max, top1, label, p_l, objective, tau):
    """The MFT weight for one position, in plain Python floats (float64)."""
    wrong = top1 != label
    a = (p_max - p_l + tau) / (1 + p_max - p_l)
    b = 1.0 if p_l == 1.0 else (min(1.0, p_l + tau) - p_l) / (1 - p_l)
    if objective == "ft":
        return 1.0
    if objective == "corrective-ft":
        return 1.0 if wrong else 0.0
    if objective == "distill-partial":
        return a if wrong else 0.0
    return a if wrong else b


def make_teacher(seed, n=29, v=37):
    """Teacher log-probs (N, V) of mixed sharpness, labels that are the argmax about half the time."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.3, 1.0, 3.0, 10.0, 40.0]).repeat(n)[:n, None]  # (N, 1)
    logprobs = torch.log_softmax(torch.randn(n, v, generator=g) * scale, dim=-1)  # (N, V)
    top1_lp, top1_id = logprobs.topk(1, dim=-1)  # (N, 1)
    random_labels = torch.randint(0, v, (n,), generator=g)
    labels = torch.where(torch.rand(n, generator=g) < 0.5, top1_id[:, 0], random_labels)  # (N,)
    label_lp = logprobs.gather(1, labels[:, None])[:, 0]
    return logprobs, top1_lp[:, 0], top1_id[:, 0], labels, label_lp


def weights(logprobs_etc, objective, tau):
    _, top1_lp, top1_id, labels, label_lp = logprobs_etc
    return correction_weight(top1_lp, top1_id, labels, label_lp, objective=objective, tau=tau)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_weight_matches_formula(seed, objective):
    teacher = make_teacher(seed)
    _, top1_lp, top1_id, labels, label_lp = teacher
    assert (top1_id != labels).any() and (top1_id == labels).any()
    for tau in TAUS:
        w = weights(teacher, objective, tau)
        assert w.dtype == torch.float32 and w.shape == labels.shape
        expected = [
            reference_weight(math.exp(t), int(i), int(y), math.exp(ly), objective, tau)
            for t, i, y, ly in zip(top1_lp.tolist(), top1_id.tolist(), labels.tolist(), label_lp.tolist())
        ]
        torch.testing.assert_close(w, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)


def test_weight_at_label_prob_one_and_extremes():
    # label == top1 with p_l = 1 exactly, 1 - p_l below float32 resolution, tiny p_l, p_l = 0.
    label_lp = torch.tensor([0.0, -1e-9, -1e-7, -1e-3, -100.0, float("-inf")])
    n = label_lp.numel()
    labels = torch.arange(n)
    for tau in TAUS:
        w = correction_weight(label_lp, labels, labels, label_lp, objective="mft", tau=tau)
        assert torch.isfinite(w).all() and ((w >= 0) & (w <= 1)).all()
        expected = [reference_weight(math.exp(x), 0, 0, math.exp(x), "mft", tau) for x in label_lp.tolist()]
        torch.testing.assert_close(w, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)
        assert w[0] == 1.0  # p_l = 1: b = 1 by definition, even at tau = 0
    # Teacher wrong with p_max = 1 and p_l = 0: a = (1 + tau) / 2.
    w = correction_weight(torch.zeros(1), torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.long),
                          torch.full((1,), float("-inf")), objective="mft", tau=0.2)
    torch.testing.assert_close(w, torch.tensor([0.6]))


def test_weight_stays_in_unit_interval_on_inconsistent_cache_values():
    """Top-1 id != label but p_l > p_max (rounded cache values): the label already leads by 0.1,
    so tau <= 0.1 needs no correction (a < 0 is clamped to 0) and larger tau needs a < tau."""
    top1_lp, label_lp = torch.tensor([0.4]).log(), torch.tensor([0.5]).log()
    top1_id, labels = torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.long)
    for tau, expected in ((0.0, 0.0), (0.05, 0.0), (0.1, 0.0), (0.3, 0.2 / 0.9)):
        w = correction_weight(top1_lp, top1_id, labels, label_lp, objective="mft", tau=tau)
        torch.testing.assert_close(w, torch.tensor([expected]), rtol=1e-6, atol=1e-6)


def test_weight_is_one_at_tau_one():
    teacher = make_teacher(5)
    for objective in ("mft", "ft"):
        torch.testing.assert_close(weights(teacher, objective, 1.0), torch.ones(29))


@pytest.mark.parametrize("tau", [-0.1, 1.1, float("nan")])
def test_bad_tau(tau):
    with pytest.raises(ValueError, match="--tau.*\\[0, 1\\]"):
        weights(make_teacher(0), "mft", tau)


def test_bad_objective():
    with pytest.raises(ValueError, match="--objective.*mft.*corrective-ft"):
        weights(make_teacher(0), "x", 0.1)


def reference_targets(logprobs, labels, w):
    pc = logprobs.double().exp() * (1 - w.double()[:, None])
    for i, y in enumerate(labels.tolist()):
        pc[i, y] += float(w[i])
    return pc


def margin(pc, labels):
    """p^C_l - max_{j != l} p^C_j, per row."""
    label_p = pc.gather(1, labels[:, None])[:, 0]
    others = pc.scatter(1, labels[:, None], float("-inf"))
    return label_p - others.max(-1).values


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_corrected_targets(seed):
    teacher = make_teacher(seed)
    logprobs, top1_lp, top1_id, labels, label_lp = teacher
    wrong = top1_id != labels
    for tau in TAUS:
        w = weights(teacher, "mft", tau)
        pc = corrected_targets(logprobs, labels, w)
        assert pc.dtype == torch.float32
        torch.testing.assert_close(pc.double(), reference_targets(logprobs, labels, w), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pc.sum(-1), torch.ones(len(labels)), rtol=0, atol=1e-5)
        assert (pc >= 0).all()
        gap = margin(pc, labels)
        assert (gap >= tau - 1e-6).all()
        # Where the teacher is wrong the label leads the top-1 by exactly tau.
        gap_to_top1 = pc.gather(1, labels[:, None])[:, 0] - pc.gather(1, top1_id[:, None])[:, 0]
        torch.testing.assert_close(gap_to_top1[wrong], torch.full_like(gap_to_top1[wrong], tau), rtol=0, atol=1e-5)
        # Teacher right and p_l + tau > 1: the target is the one-hot label.
        full = ~wrong & (label_lp.exp() + tau > 1)
        if tau >= 0.3:
            assert full.any()
        onehot = torch.nn.functional.one_hot(labels, logprobs.shape[1]).float()
        torch.testing.assert_close(pc[full], onehot[full], rtol=0, atol=1e-6)
        if tau == 1.0:
            torch.testing.assert_close(pc, onehot, rtol=0, atol=1e-6)


def test_corrected_targets_other_objectives():
    teacher = make_teacher(7)
    logprobs, _, top1_id, labels, _ = teacher
    right = top1_id == labels
    # distill-partial and corrective-ft leave the teacher untouched where it is right.
    for objective in ("distill-partial", "corrective-ft"):
        pc = corrected_targets(logprobs, labels, weights(teacher, objective, 0.2))
        torch.testing.assert_close(pc[right], logprobs[right].exp())
    pc = corrected_targets(logprobs, labels, weights(teacher, "corrective-ft", 0.2))
    onehot = torch.nn.functional.one_hot(labels, logprobs.shape[1]).float()
    torch.testing.assert_close(pc[~right], onehot[~right])
