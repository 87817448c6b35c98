"""The loss against brute-force dense references written out row by row: the plain autograd reference
(tests/reference.py) against them, then the library's fused and checkpointed engines against the reference."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mft_cache.trainer import loss as L
from mft_cache.trainer.targets import TeacherTargets
from buffers import ChunkBuffers
from reference import sparse_mft_loss


# The engines take TeacherTargets; these spell a case's teacher out positionally, as the reference does.
def targets_of(weight, ids, lp, label_lp, drop_tail=False):
    return None if lp is None else TeacherTargets(weight, ids, lp, label_lp, drop_tail)


def fused_linear_mft_loss(hidden, head_weight, head_bias, labels, weight, mask, ids=None, lp=None, label_lp=None,
                          chunk_size=1024, softcap=None, drop_tail=False):
    return L.fused_linear_mft_loss(hidden, head_weight, head_bias, labels, mask,
                                   targets_of(weight, ids, lp, label_lp, drop_tail), chunk_size=chunk_size,
                                   softcap=softcap)


def chunked_mft_loss(hidden, head, labels, weight, mask, ids=None, lp=None, label_lp=None, chunk_size=1024,
                     drop_tail=False):
    return L.chunked_mft_loss(hidden, head, labels, mask, targets_of(weight, ids, lp, label_lp, drop_tail),
                              chunk_size=chunk_size)


def token_nll_sum(hidden, head, labels, mask, chunk_size=1024):
    return L.chunked_mft_loss(hidden, head, labels, mask, None, chunk_size=chunk_size)

SEEDS = [0, 1, 2]


def make_case(seed, n=13, v=37, k=5, sharpness=3.0):
    """Random student logits, a full teacher, its top-k, labels (half the teacher's argmax), w, mask."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g) * 2  # (N, V)
    full = torch.log_softmax(torch.randn(n, v, generator=g) * sharpness, dim=-1)  # (N, V) teacher
    random_labels = torch.randint(0, v, (n,), generator=g)
    labels = torch.where(torch.rand(n, generator=g) < 0.5, full.argmax(-1), random_labels)  # (N,)
    weight = torch.rand(n, generator=g)  # (N,)
    mask = torch.rand(n, generator=g) > 0.25  # (N,)
    mask[0] = True
    lp, ids = full.topk(k, dim=-1)  # (N, K)
    label_lp = full.gather(1, labels[:, None])[:, 0]  # (N,)
    return SimpleNamespace(logits=logits, full=full, labels=labels, weight=weight, mask=mask, ids=ids, lp=lp,
                           label_lp=label_lp, n=n, v=v)


def support_sets(c):
    """S = top-k ids ∪ {label}, per row."""
    return [set(ids) | {y} for ids, y in zip(c.ids.tolist(), c.labels.tolist())]


def dense_reference(logits, pc, mask):
    """-Σ_j p^C_j log q_j per row, float64; 0 on masked rows."""
    logq = torch.log_softmax(logits.double(), dim=-1)
    return -(pc.double() * logq).sum(-1) * mask


def coarse_reference(logits, full, labels, weight, mask, s_sets):
    """(1-w)·CE(p, q) coarsened to S plus one tail bucket, + w·(-log q_l), row by row in float64.

    The tail bucket's teacher mass is summed from the full teacher, the student's from q directly.
    """
    rows = []
    for i in range(logits.shape[0]):
        z = logits[i].double()
        if not mask[i]:
            rows.append(z.sum() * 0)
            continue
        q = torch.softmax(z, -1)
        logq = torch.log_softmax(z, -1)
        p = full[i].double().exp()
        s = sorted(s_sets[i])
        tail = [j for j in range(len(z)) if j not in s_sets[i]]
        ce = -(p[s] * logq[s]).sum()
        if tail:
            ce = ce - p[tail].sum() * torch.log(q[tail].sum())
        w = float(weight[i])
        rows.append((1 - w) * ce - w * logq[labels[i]])
    return torch.stack(rows)


def loss_and_grad(fn, logits):
    x = logits.detach().clone().requires_grad_()
    loss = fn(x)
    loss.sum().backward()
    return loss.detach(), x.grad


def pc_dense(full, labels, weight):
    w = weight.double()[:, None]
    return (1 - w) * full.double().exp() + w * F.one_hot(labels, full.shape[1]).double()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_k_equals_dense_reference(seed, dtype):
    c = make_case(seed, k=37)  # teacher_ids: the whole vocabulary, sorted like topk
    logits = c.logits.to(dtype)
    loss, grad = loss_and_grad(
        lambda z: sparse_mft_loss(z, c.labels, c.weight, c.mask, c.ids, c.lp, c.label_lp), logits)
    ref, ref_grad = loss_and_grad(lambda z: dense_reference(z, pc_dense(c.full, c.labels, c.weight), c.mask),
                                  logits.double())
    assert loss.dtype == torch.float32
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)  # the loss itself is fp32 either way
    torch.testing.assert_close(grad.double(), ref_grad, **tol)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 3, 7])
def test_small_k_equals_coarsened_ce(seed, k):
    c = make_case(seed, k=k)
    s_sets = support_sets(c)
    label_in_topk = (c.ids == c.labels[:, None]).any(-1)
    assert label_in_topk.any() and (~label_in_topk).any()  # both ways of building S are exercised
    for weight in (torch.zeros(c.n), c.weight):
        loss, grad = loss_and_grad(
            lambda z: sparse_mft_loss(z, c.labels, weight, c.mask, c.ids, c.lp, c.label_lp), c.logits)
        ref, ref_grad = loss_and_grad(
            lambda z: coarse_reference(z, c.full, c.labels, weight, c.mask, s_sets), c.logits.double())
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)
    # Log-sum inequality: the coarsened CE is a lower bound on the dense CE (w = 0), strict here.
    zero = torch.zeros(c.n)
    loss = sparse_mft_loss(c.logits, c.labels, zero, c.mask, c.ids, c.lp, c.label_lp)
    dense = dense_reference(c.logits, c.full.exp(), c.mask)
    assert (loss.double() <= dense + 1e-5).all()
    assert (loss.double() < dense - 1e-3)[c.mask].any()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.float16])
def test_gradient_is_q_minus_t(seed, k, teacher_dtype):
    c = make_case(seed, k=k)
    lp, label_lp = c.lp.to(teacher_dtype), c.label_lp.to(teacher_dtype)  # as read from a fp16 cache
    _, grad = loss_and_grad(lambda z: sparse_mft_loss(z, c.labels, c.weight, c.mask, c.ids, lp, label_lp), c.logits)
    q = torch.softmax(c.logits.double(), -1)
    expected = torch.zeros(c.n, c.v, dtype=torch.float64)
    for i, s in enumerate(support_sets(c)):
        if not c.mask[i]:
            continue
        w, y = float(c.weight[i]), int(c.labels[i])
        p = {j: float(x) for j, x in zip(c.ids[i].tolist(), lp[i].double().exp())}
        p.setdefault(y, float(label_lp[i].double().exp()))
        m = max(0.0, 1 - sum(p.values()))
        tail = [j for j in range(c.v) if j not in s]
        t = torch.zeros(c.v, dtype=torch.float64)
        for j in s:
            t[j] = (1 - w) * p[j] + w * (j == y)
        for j in tail:
            t[j] = (1 - w) * m * q[i, j] / q[i, tail].sum()
        expected[i] = q[i] - t
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_stationary_at_target_whatever_the_tail_shape(seed):
    """q_S = t_S and Σ_tail q = (1-w)·m make the gradient 0 for any shape of q inside the tail."""
    c = make_case(seed, k=4)
    g = torch.Generator().manual_seed(100 + seed)
    z = torch.empty(c.n, c.v)
    for i, s in enumerate(support_sets(c)):
        w, y = float(c.weight[i]), int(c.labels[i])
        p = c.full[i].double().exp()
        s = sorted(s)
        tail = [j for j in range(c.v) if j not in s]
        q = torch.zeros(c.v, dtype=torch.float64)
        q[s] = (1 - w) * p[s]
        q[y] += w
        shape = torch.rand(len(tail), generator=g, dtype=torch.float64) + 0.01
        q[tail] = (1 - w) * p[tail].sum() * shape / shape.sum()
        z[i] = q.log().float()
    _, grad = loss_and_grad(lambda x: sparse_mft_loss(x, c.labels, c.weight, c.mask, c.ids, c.lp, c.label_lp), z)
    torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_nearly_all_mass_on_s(seed):
    """Teacher top-1 at 1 - 1e-7 (etc.) and very peaked students: finite and equal to a float64 reference."""
    n, v, k = 12, 37, 3
    g = torch.Generator().manual_seed(seed)
    eps = torch.tensor([1e-7, 1e-6, 1e-4, 1e-7] * 3, dtype=torch.float64)[:, None]  # (N, 1) teacher mass off top-1
    top = torch.randint(0, v, (n,), generator=g)
    full = (eps / (v - 1)).log().expand(n, v).clone()
    full.scatter_(1, top[:, None], torch.log1p(-eps))
    full = full.float()  # (N, V)
    logits = torch.randn(n, v, generator=g) * 5
    peak = torch.where(torch.arange(n) % 2 == 0, top, torch.randint(0, v, (n,), generator=g))
    logits.scatter_add_(1, peak[:, None], torch.full((n, 1), 60.0))  # right or confidently elsewhere
    labels = torch.where(torch.arange(n) % 3 == 0, torch.randint(0, v, (n,), generator=g), top)
    weight = torch.tensor([0.0, 0.3, 1.0, 0.0] * 3)
    mask = torch.ones(n, dtype=torch.bool)
    lp, ids = full.topk(k, -1)
    label_lp = full.gather(1, labels[:, None])[:, 0]
    s_sets = [set(a) | {b} for a, b in zip(ids.tolist(), labels.tolist())]
    loss, grad = loss_and_grad(lambda z: sparse_mft_loss(z, labels, weight, mask, ids, lp, label_lp), logits)
    ref, ref_grad = loss_and_grad(lambda z: coarse_reference(z, full, labels, weight, mask, s_sets), logits.double())
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_weight_one_is_cross_entropy(seed):
    c = make_case(seed)
    ones = torch.ones(c.n)
    expected = F.cross_entropy(c.logits, c.labels, reduction="none") * c.mask
    for ids, lp in ((c.ids, c.lp), (None, c.full), (None, None)):
        torch.testing.assert_close(sparse_mft_loss(c.logits, c.labels, ones, c.mask, ids, lp, c.label_lp), expected)
    # Without a teacher the weight is ignored, whatever it holds.
    no_teacher = sparse_mft_loss(c.logits, c.labels, torch.full((c.n,), float("nan")), c.mask)
    torch.testing.assert_close(no_teacher, expected)


@pytest.mark.parametrize("seed", SEEDS)
def test_dense_teacher_equals_full_k(seed):
    c = make_case(seed, k=37)
    dense, dense_grad = loss_and_grad(lambda z: sparse_mft_loss(z, c.labels, c.weight, c.mask, None, c.full), c.logits)
    sparse, sparse_grad = loss_and_grad(
        lambda z: sparse_mft_loss(z, c.labels, c.weight, c.mask, c.ids, c.lp, c.label_lp), c.logits)
    torch.testing.assert_close(dense, sparse, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dense_grad, sparse_grad, rtol=1e-6, atol=1e-7)


def teacher_variants(c):
    """(name, teacher_ids, teacher_logprobs, label_logprob) for the sparse, dense and no-teacher paths."""
    return [("sparse", c.ids, c.lp, c.label_lp), ("dense", None, c.full, None), ("none", None, None, None)]


@pytest.mark.parametrize("seed", SEEDS)
def test_all_masked_is_zero(seed):
    c = make_case(seed)
    none = torch.zeros(c.n, dtype=torch.bool)
    for _, ids, lp, label_lp in teacher_variants(c):
        loss, grad = loss_and_grad(lambda z: sparse_mft_loss(z, c.labels, c.weight, none, ids, lp, label_lp), c.logits)
        assert (loss == 0).all() and (grad == 0).all()


def with_masked_garbage(c):
    """The case's per-row inputs with masked rows replaced by ids out of range and NaN values."""
    off = ~c.mask
    nan = float("nan")
    huge = torch.arange(c.n) % 2 == 0
    labels = torch.where(off, torch.where(huge, 10**9, -100), c.labels)
    weight = torch.where(off, nan, c.weight)
    ids = torch.where(off[:, None], torch.where(huge, 10**9, -1)[:, None], c.ids)
    lp = torch.where(off[:, None], nan, c.lp)
    full = torch.where(off[:, None], nan, c.full)
    label_lp = torch.where(off, nan, c.label_lp)
    return labels, weight, ids, lp, full, label_lp


@pytest.mark.parametrize("seed", SEEDS)
def test_masked_garbage_does_not_leak(seed):
    c = make_case(seed)
    assert (~c.mask).sum() >= 2
    off = ~c.mask
    labels, weight, ids, lp, full, label_lp = with_masked_garbage(c)
    for (_, ids_c, lp_c, lbl_c), (_, ids_g, lp_g, lbl_g) in zip(
            teacher_variants(c), [("", ids, lp, label_lp), ("", None, full, None), ("", None, None, None)]):
        clean, clean_grad = loss_and_grad(
            lambda z: sparse_mft_loss(z, c.labels, c.weight, c.mask, ids_c, lp_c, lbl_c), c.logits)
        dirty, dirty_grad = loss_and_grad(lambda z: sparse_mft_loss(z, labels, weight, c.mask, ids_g, lp_g, lbl_g),
                                          c.logits)
        assert torch.isfinite(dirty).all() and torch.isfinite(dirty_grad).all()
        assert (dirty[off] == 0).all() and (dirty_grad[off] == 0).all()
        torch.testing.assert_close(dirty, clean, rtol=0, atol=0)
        torch.testing.assert_close(dirty_grad, clean_grad, rtol=0, atol=0)


def test_empty_tail_has_finite_gradient():
    """top-k = V - 1 plus a label outside it: S is the whole vocabulary, the tail term must vanish."""
    c = make_case(3, k=36)
    labels = c.full.argmin(-1)  # the one id outside the top-36
    label_lp = c.full.gather(1, labels[:, None])[:, 0]
    loss, grad = loss_and_grad(lambda z: sparse_mft_loss(z, labels, c.weight, c.mask, c.ids, c.lp, label_lp), c.logits)
    ref, ref_grad = loss_and_grad(lambda z: dense_reference(z, pc_dense(c.full, labels, c.weight), c.mask),
                                  c.logits.double())
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


def test_overfull_support_has_no_tail_term():
    """Rounded cache values can put more than 1 on S: m clamps to 0, so the tail is not pushed up."""
    c = make_case(4, k=3)
    in_topk = (c.ids == c.labels[:, None]).any(-1)
    mass_s = c.lp.exp().sum(-1) + torch.where(in_topk, 0.0, c.label_lp.exp())  # (N,) Σ_S p
    shift = 0.02 - mass_s.log()  # (N,) puts Σ_S p at e^0.02 > 1
    lp, label_lp = c.lp + shift[:, None], c.label_lp + shift
    loss = sparse_mft_loss(c.logits, c.labels, c.weight, c.mask, c.ids, lp, label_lp)
    expected = torch.zeros(c.n, dtype=torch.float64)
    for i, s in enumerate(support_sets(c)):
        if not c.mask[i]:
            continue
        p = {j: float(x) for j, x in zip(c.ids[i].tolist(), lp[i].double().exp())}
        p.setdefault(int(c.labels[i]), float(label_lp[i].double().exp()))
        assert sum(p.values()) > 1
        logq = torch.log_softmax(c.logits[i].double(), -1)
        w = float(c.weight[i])
        expected[i] = -(1 - w) * sum(p[j] * logq[j] for j in s) - w * logq[c.labels[i]]
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)


# ----- chunked -----

H = 8


class CountingHead(torch.nn.Module):
    """A head that counts its calls: checkpointing must call it again in the backward."""

    def __init__(self, head):
        super().__init__()
        self.head, self.calls = head, 0

    def forward(self, h):
        self.calls += 1
        return self.head(h)


def make_heads(seed, v):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(H, v)
    embedding = torch.nn.Embedding(v, H)  # tied: the output embedding is the input embedding
    return {"linear": (linear, linear), "tied": (lambda h: h @ embedding.weight.T, embedding)}


def sum_and_grads(fn, hidden, params):
    h = hidden.detach().clone().requires_grad_()
    for p in params:
        p.grad = None
    total = fn(h)
    total.backward()
    return total.detach(), h.grad, [p.grad.clone() for p in params]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("head_kind", ["linear", "tied"])
@pytest.mark.parametrize("chunk_size", [1, 7, 13, 20])
def test_chunked_equals_unchunked(seed, head_kind, chunk_size):
    c = make_case(seed)
    if seed == 1:
        c.mask[:7] = False  # a whole chunk masked: skipped
        c.mask[8] = True
    head, module = make_heads(seed, c.v)[head_kind]
    params = list(module.parameters())
    hidden = torch.randn(c.n, H, generator=torch.Generator().manual_seed(seed))
    for _, ids, lp, label_lp in teacher_variants(c):
        rows = (c.labels, c.weight, c.mask, ids, lp, label_lp)
        total, h_grad, p_grads = sum_and_grads(
            lambda h: chunked_mft_loss(h, head, *rows, chunk_size=chunk_size), hidden, params)
        ref, ref_h_grad, ref_p_grads = sum_and_grads(lambda h: sparse_mft_loss(head(h), *rows).sum(), hidden, params)
        assert total.shape == () and total.dtype == torch.float32
        torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h_grad, ref_h_grad, rtol=1e-5, atol=1e-6)
        for got, want in zip(p_grads, ref_p_grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # evaluation
        nll = token_nll_sum(hidden, head, c.labels, c.mask, chunk_size=chunk_size)
        expected = (F.cross_entropy(head(hidden), c.labels, reduction="none") * c.mask).sum()
    torch.testing.assert_close(nll, expected)


def test_chunked_recomputes_logits_in_backward():
    c = make_case(0)
    c.mask[:4] = False  # the first chunk of 4 is skipped
    head = CountingHead(torch.nn.Linear(H, c.v))
    hidden = torch.randn(c.n, H, requires_grad=True)
    total = chunked_mft_loss(hidden, head, c.labels, c.weight, c.mask, c.ids, c.lp, c.label_lp, chunk_size=4)
    live = -(-int(c.mask.sum()) // 4)  # chunks of 4 unmasked positions, as the fused loss makes them
    assert live >= 2
    assert head.calls == 1 + live  # the empty call, then one per live chunk
    total.backward()
    assert head.calls == 1 + 2 * live  # each live chunk's logits recomputed once in the backward


@pytest.mark.parametrize("head_kind", ["linear", "tied"])
def test_chunked_all_masked_is_zero(head_kind):
    c = make_case(0)
    head, module = make_heads(0, c.v)[head_kind]
    params = list(module.parameters())
    none = torch.zeros(c.n, dtype=torch.bool)
    for _, ids, lp, label_lp in teacher_variants(c):
        total, h_grad, p_grads = sum_and_grads(
            lambda h: chunked_mft_loss(h, head, c.labels, c.weight, none, ids, lp, label_lp, chunk_size=5),
            torch.randn(c.n, H), params)
        assert total.item() == 0.0 and (h_grad == 0).all()
        assert all((g == 0).all() for g in p_grads)  # present (every parameter gets a gradient), and zero


def test_chunked_bad_chunk_size():
    c = make_case(0)
    with pytest.raises(ValueError, match="--chunk-size"):
        chunked_mft_loss(torch.randn(c.n, H), torch.nn.Linear(H, c.v), c.labels, None, c.mask, chunk_size=0)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("head_kind", ["linear", "tied"])
def test_chunked_under_bf16_autocast(seed, head_kind):
    c = make_case(seed)
    head, module = make_heads(seed, c.v)[head_kind]
    params = list(module.parameters())
    hidden = torch.randn(c.n, H, generator=torch.Generator().manual_seed(seed))
    rows = (c.labels, c.weight, c.mask, c.ids, c.lp, c.label_lp)

    def chunked(h):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return chunked_mft_loss(h, head, *rows, chunk_size=4)

    def autocast_ref(h):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return sparse_mft_loss(head(h), *rows).sum()

    total, h_grad, p_grads = sum_and_grads(chunked, hidden, params)
    bf16, bf16_h_grad, _ = sum_and_grads(autocast_ref, hidden, params)
    fp32, fp32_h_grad, fp32_p_grads = sum_and_grads(lambda h: sparse_mft_loss(head(h), *rows).sum(), hidden, params)
    assert total.dtype == torch.float32
    torch.testing.assert_close(total, bf16, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(h_grad, bf16_h_grad, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(total, fp32, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(h_grad, fp32_h_grad, rtol=5e-2, atol=2e-2)
    for got, want in zip(p_grads, fp32_p_grads):
        torch.testing.assert_close(got, want, rtol=5e-2, atol=2e-2)


# ----- fused output layer + loss -----
# fused_linear_mft_loss against the float64 brute force (logits, then the row-by-row references
# above, autograd for the gradients) and against chunked_mft_loss, the checkpointed path it replaces.

def make_head(seed, v, bias, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 + seed)
    weight = (torch.randn(v, H, generator=g) * 0.7).to(dtype).requires_grad_()  # (V, H)
    b = (torch.randn(v, generator=g) * 0.5).to(dtype).requires_grad_() if bias else None  # (V,)
    return weight, b


def head_fn(weight, bias, softcap):
    """The head as backbone_and_head builds it: linear, then cap·tanh(z/cap)."""
    def head(h):
        z = torch.nn.functional.linear(h, weight, bias)
        return torch.tanh(z / softcap) * softcap if softcap else z
    return head


def brute_force(c, kind, labels, weight, mask, ids, lp, label_lp, logits):
    """Per-row float64 reference for one teacher kind, from float64 logits."""
    if kind == "sparse":
        s_sets = [set(a) | {y} for a, y in zip(ids.tolist(), labels.tolist())]
        return coarse_reference(logits, c.full, labels, weight, mask, s_sets)
    if kind == "dense":
        return dense_reference(logits, pc_dense(c.full, labels, weight), mask)
    return F.cross_entropy(logits, labels, reduction="none") * mask


def grads_of(fn, hidden, params, scale=1.0, grad_hidden=True):
    """(value, dL/dhidden, [dL/dp]) of fn(hidden) after backward of scale * value."""
    h = hidden.detach().clone().requires_grad_(grad_hidden)
    for p in params:
        p.grad = None
    total = fn(h)
    (total * scale).backward()
    return total.detach(), h.grad, [None if p.grad is None else p.grad.clone() for p in params]


def double_params(weight, bias):
    return [weight.detach().double().requires_grad_(), None if bias is None else bias.detach().double().requires_grad_()]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kind", ["sparse", "dense", "none"])
@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 5, 20])
def test_fused_equals_brute_force_and_chunked(seed, kind, softcap, bias, chunk_size):
    c = make_case(seed, k=1 if seed else 5)  # K = 1 too; labels in and out of the top-k
    if seed == 1:
        c.mask[:5] = False  # a whole chunk masked
    assert ((c.ids == c.labels[:, None]).any(-1) & c.mask).any() and (~(c.ids == c.labels[:, None]).any(-1)).any()
    _, ids, lp, label_lp = {v[0]: v for v in teacher_variants(c)}[kind]
    rows = (c.labels, c.weight, c.mask, ids, lp, label_lp)
    weight, b = make_head(seed, c.v, bias)
    params = [weight] + ([b] if bias else [])
    hidden = torch.randn(c.n, H, generator=torch.Generator().manual_seed(seed)).requires_grad_()

    total, h_grad, p_grads = grads_of(
        lambda h: fused_linear_mft_loss(h, weight, b, *rows, chunk_size=chunk_size, softcap=softcap), hidden, params)
    assert total.shape == () and total.dtype == torch.float32
    # brute force, float64
    w64, b64 = double_params(weight, b)
    ref, ref_h_grad, ref_p_grads = grads_of(
        lambda h: brute_force(c, kind, c.labels, c.weight, c.mask, ids, lp, label_lp,
                              head_fn(w64, b64, softcap)(h)).sum(), hidden.double(), [p for p in (w64, b64) if p is not None])
    torch.testing.assert_close(total.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_grad.double(), ref_h_grad, rtol=1e-4, atol=1e-5)
    for got, want in zip(p_grads, ref_p_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    # the checkpointed path, float32
    chunked, c_h_grad, c_p_grads = grads_of(
        lambda h: chunked_mft_loss(h, head_fn(weight, b, softcap), *rows, chunk_size=chunk_size), hidden, params)
    torch.testing.assert_close(total, chunked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_grad, c_h_grad, rtol=1e-5, atol=1e-6)
    for got, want in zip(p_grads, c_p_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # evaluation: the value alone, the same
        assert fused_linear_mft_loss(hidden, weight, b, *rows, chunk_size=chunk_size, softcap=softcap) == total


@pytest.mark.parametrize("softcap", [None, 4.0])
def test_fused_empty_tail_rows(softcap):
    """Rows whose top-k ∪ label is the whole vocabulary (no tail) beside rows with a one-id tail."""
    c = make_case(3, k=36)
    empty = torch.arange(c.n) % 2 == 0
    labels = torch.where(empty, c.full.argmin(-1), c.full.argmax(-1))  # even: the one id outside the top-36
    label_lp = c.full.gather(1, labels[:, None])[:, 0]
    has_tail = torch.tensor([len(set(a) | {y}) < c.v for a, y in zip(c.ids.tolist(), labels.tolist())])
    assert (has_tail == ~empty).all()
    rows = (labels, c.weight, c.mask, c.ids, c.lp, label_lp)
    weight, b = make_head(3, c.v, True)
    hidden = torch.randn(c.n, H, generator=torch.Generator().manual_seed(3))
    w64, b64 = double_params(weight, b)
    total, h_grad, p_grads = grads_of(
        lambda h: fused_linear_mft_loss(h, weight, b, *rows, chunk_size=4, softcap=softcap), hidden, [weight, b])
    ref, ref_h_grad, ref_p_grads = grads_of(
        lambda h: brute_force(c, "sparse", labels, c.weight, c.mask, c.ids, c.lp, label_lp,
                              head_fn(w64, b64, softcap)(h)).sum(), hidden.double(), [w64, b64])
    assert torch.isfinite(h_grad).all() and all(torch.isfinite(g).all() for g in p_grads)
    torch.testing.assert_close(total.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_grad.double(), ref_h_grad, rtol=1e-4, atol=1e-5)
    for got, want in zip(p_grads, ref_p_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_fused_peaked_student_keeps_tail_finite():
    """A student 200 nats sure of S: Σ_tail q underflows float32 if summed as q; the loss stays finite and right."""
    n, v, k = 6, 37, 3
    g = torch.Generator().manual_seed(7)
    full = torch.log_softmax(torch.randn(n, v, generator=g) * 3, -1)
    lp, ids = full.topk(k, -1)
    labels = ids[:, 0]
    label_lp = lp[:, 0]
    weight = torch.tensor([0.0, 0.2, 0.5, 0.0, 0.9, 0.3])
    mask = torch.ones(n, dtype=torch.bool)
    logits = torch.randn(n, v, generator=g)
    logits.scatter_add_(1, ids, torch.full((n, k), 200.0))  # (N, V) the tail 200 nats below S
    hidden = torch.eye(n)  # (N, H = N) one-hot rows, so that hidden @ W^T = logits
    head_w = logits.T.contiguous().requires_grad_()  # (V, H)
    total, _, (w_grad,) = grads_of(
        lambda h: fused_linear_mft_loss(h, head_w, None, labels, weight, mask, ids, lp, label_lp, chunk_size=4),
        hidden, [head_w])
    s_sets = [set(a) for a in ids.tolist()]
    w64 = head_w.detach().double().requires_grad_()
    ref, _, (ref_w_grad,) = grads_of(
        lambda h: coarse_reference(h @ w64.T, full, labels, weight, mask, s_sets).sum(), hidden.double(), [w64])
    assert torch.isfinite(total) and torch.isfinite(w_grad).all()
    torch.testing.assert_close(total.double(), ref, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(w_grad.double(), ref_w_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("softcap", [None, 4.0])
def test_fused_all_masked_is_zero(softcap):
    c = make_case(0)
    none = torch.zeros(c.n, dtype=torch.bool)
    weight, b = make_head(0, c.v, True)
    for _, ids, lp, label_lp in teacher_variants(c):
        total, h_grad, p_grads = grads_of(
            lambda h: fused_linear_mft_loss(h, weight, b, c.labels, c.weight, none, ids, lp, label_lp,
                                            chunk_size=5, softcap=softcap), torch.randn(c.n, H), [weight, b])
        assert total.item() == 0.0 and (h_grad == 0).all()
        assert all(g is not None and (g == 0).all() for g in p_grads)  # present and zero, not NaN


@pytest.mark.parametrize("seed", SEEDS)
def test_fused_masked_garbage_does_not_leak(seed):
    """Masked rows with ids out of range, NaN teacher values and weights, even NaN hidden states."""
    c = make_case(seed)
    off = ~c.mask
    labels, weight, ids, lp, full, label_lp = with_masked_garbage(c)
    head_w, b = make_head(seed, c.v, True)
    hidden = torch.randn(c.n, H, generator=torch.Generator().manual_seed(seed))
    dirty_hidden = torch.where(off[:, None], float("nan"), hidden)
    for (_, ids_c, lp_c, lbl_c), (ids_g, lp_g, lbl_g) in zip(
            teacher_variants(c), [(ids, lp, label_lp), (None, full, None), (None, None, None)]):
        clean = grads_of(lambda h: fused_linear_mft_loss(h, head_w, b, c.labels, c.weight, c.mask, ids_c, lp_c, lbl_c,
                                                         chunk_size=4), hidden, [head_w, b])
        dirty = grads_of(lambda h: fused_linear_mft_loss(h, head_w, b, labels, weight, c.mask, ids_g, lp_g, lbl_g,
                                                         chunk_size=4), dirty_hidden, [head_w, b])
        assert (dirty[1][off] == 0).all()
        for got, want in zip([dirty[0], dirty[1], *dirty[2]], [clean[0], clean[1], *clean[2]]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_fused_frozen_head_grads_only_hidden():
    """PEFT: the output layer is frozen; only hidden gets a gradient, equal to the trainable head's."""
    c = make_case(1)
    rows = (c.labels, c.weight, c.mask, c.ids, c.lp, c.label_lp)
    head_w, b = make_head(1, c.v, True)
    hidden = torch.randn(c.n, H, generator=torch.Generator().manual_seed(1)).requires_grad_()
    want, want_h_grad, _ = grads_of(lambda h: fused_linear_mft_loss(h, head_w, b, *rows, chunk_size=5), hidden,
                                    [head_w, b])
    frozen_w, frozen_b = head_w.detach(), b.detach()
    total, h_grad, _ = grads_of(lambda h: fused_linear_mft_loss(h, frozen_w, frozen_b, *rows, chunk_size=5), hidden, [])
    assert frozen_w.grad is None and frozen_b.grad is None
    assert total == want
    torch.testing.assert_close(h_grad, want_h_grad, rtol=0, atol=0)
    # and the other way round: a frozen backbone, a trainable head
    _, h_grad, (w_grad, b_grad) = grads_of(lambda h: fused_linear_mft_loss(h, head_w, b, *rows, chunk_size=5),
                                           hidden, [head_w, b], grad_hidden=False)
    assert h_grad is None and w_grad is not None and b_grad is not None


@pytest.mark.parametrize("kind", ["sparse", "dense", "none"])
def test_fused_scales_with_the_incoming_gradient(kind):
    c = make_case(2, k=3)
    _, ids, lp, label_lp = {v[0]: v for v in teacher_variants(c)}[kind]
    head_w, b = make_head(2, c.v, True)
    hidden = torch.randn(c.n, H, generator=torch.Generator().manual_seed(2)).requires_grad_()

    def fn(h):
        return fused_linear_mft_loss(h, head_w, b, c.labels, c.weight, c.mask, ids, lp, label_lp, chunk_size=4,
                                     softcap=4.0)

    _, h1, p1 = grads_of(fn, hidden, [head_w, b])
    _, h3, p3 = grads_of(fn, hidden, [head_w, b], scale=3.0)
    _, h0, p0 = grads_of(fn, hidden, [head_w, b], scale=0.0)
    torch.testing.assert_close(h3, 3 * h1)
    for got, want in zip(p3, p1):
        torch.testing.assert_close(got, 3 * want)
    assert (h0 == 0).all() and all((g == 0).all() for g in p0)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_fused_bf16(seed, softcap):
    """bf16 hidden and head (a bf16 model), and bf16 autocast over float32 ones: loss math in float32."""
    c = make_case(seed, k=3)
    rows = (c.labels, c.weight, c.mask, c.ids, c.lp, c.label_lp)
    head_w, b = make_head(seed, c.v, True)
    hidden = torch.randn(c.n, H, generator=torch.Generator().manual_seed(seed)).requires_grad_()
    fp32, fp32_h, fp32_p = grads_of(
        lambda h: fused_linear_mft_loss(h, head_w, b, *rows, chunk_size=4, softcap=softcap), hidden, [head_w, b])

    w16, b16 = head_w.detach().bfloat16().requires_grad_(), b.detach().bfloat16().requires_grad_()
    total, h_grad, p_grads = grads_of(
        lambda h: fused_linear_mft_loss(h, w16, b16, *rows, chunk_size=4, softcap=softcap),
        hidden.detach().bfloat16().requires_grad_(), [w16, b16])
    assert total.dtype == torch.float32 and h_grad.dtype == torch.bfloat16
    assert all(g.dtype == torch.bfloat16 for g in p_grads)
    torch.testing.assert_close(total, fp32, rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(h_grad.float(), fp32_h, rtol=5e-2, atol=3e-2)
    for got, want in zip(p_grads, fp32_p):
        torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=3e-2)

    def autocast(fn):
        def run(h):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(h)
        return run

    fused = autocast(lambda h: fused_linear_mft_loss(h, head_w, b, *rows, chunk_size=4, softcap=softcap))
    chunked = autocast(lambda h: chunked_mft_loss(h, head_fn(head_w, b, softcap), *rows, chunk_size=4))
    total, h_grad, p_grads = grads_of(fused, hidden, [head_w, b])
    ref, ref_h_grad, ref_p_grads = grads_of(chunked, hidden, [head_w, b])
    assert total.dtype == torch.float32 and h_grad.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in p_grads)
    torch.testing.assert_close(total, ref, rtol=1e-2, atol=2e-2)  # the chunked path caps in bf16, we in float32
    torch.testing.assert_close(h_grad, ref_h_grad, rtol=2e-2, atol=1e-2)
    for got, want in zip(p_grads, ref_p_grads):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(total, fp32, rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(h_grad, fp32_h, rtol=5e-2, atol=3e-2)


@pytest.mark.parametrize("kind", ["sparse", "dense", "none"])
@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_holds_one_chunk_at_a_time(kind, softcap, dtype):
    """The (c, V) buffers alive at once, forward and backward, are what `mft train --plan` counts for the loss:
    the next chunk's logits are never made while the previous chunk's are alive."""
    from mft_cache.trainer.plan import loss_chunk_bytes

    chunk, v = 16, 1000  # c·V = 16,000 elements: more than the head's V·H = 8,000
    c = make_case(0, n=64, v=v, k=5)
    _, ids, lp, label_lp = {x[0]: x for x in teacher_variants(c)}[kind]
    head_w, b = make_head(0, v, True)
    head_w, b = head_w.detach().to(dtype).requires_grad_(), b.detach().to(dtype).requires_grad_()
    hidden = torch.randn(c.n, H, dtype=dtype).requires_grad_()
    with ChunkBuffers(chunk * v) as seen:
        fused_linear_mft_loss(hidden, head_w, b, c.labels, c.weight, c.mask, ids, lp, label_lp, chunk_size=chunk,
                              softcap=softcap).backward()
    assert hidden.grad is not None and head_w.grad is not None
    assert seen.peak == loss_chunk_bytes(chunk, v, half=dtype == torch.bfloat16, softcap=bool(softcap),
                                         dense=kind == "dense")


def test_fused_bad_arguments():
    c = make_case(0)
    head_w, b = make_head(0, c.v, False)
    with pytest.raises(ValueError, match="--chunk-size"):
        fused_linear_mft_loss(torch.randn(c.n, H), head_w, b, c.labels, None, c.mask, chunk_size=0)
    with pytest.raises(ValueError, match="needs its correction weight"):
        fused_linear_mft_loss(torch.randn(c.n, H), head_w, b, c.labels, None, c.mask, None, c.full)
    with pytest.raises(ValueError, match="needs logprobs and label_logprob"):
        fused_linear_mft_loss(torch.randn(c.n, H), head_w, b, c.labels, c.weight, c.mask, c.ids, c.lp)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma_softcap"])
def test_student_loss_fused_equals_callable_head(arch, monkeypatch):
    """StudentLoss takes the fused path for a plain nn.Linear head (untied, tied, soft-capped) and it
    gives the same loss and parameter gradients as the callable head under checkpointing."""
    from mft_cache.models import output_linear
    from mft_cache.testing import build_model
    from mft_cache.trainer import loss_module

    v = 50
    kind, extra = ("gemma3", {"final_logit_softcapping": 3.0}) if arch == "gemma_softcap" else (arch, {})
    model = build_model(kind, v, seed=0, hidden=16, layers=1, max_positions=64, **extra).eval()  # eval: no dropout
    b, t, k = 3, 9, 4
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, v, (b, t), generator=g)
    length = torch.tensor([9, 5, 1])
    full = torch.log_softmax(torch.randn(b, t - 1, v, generator=g) * 3, -1)
    lp, ids = full.topk(k, -1)
    mask = torch.arange(t - 1)[None, :] < (length[:, None] - 1)
    batch = dict(input_ids=input_ids, length=length, label_mask=mask, weight=torch.rand(b, t - 1, generator=g), topk_ids=ids,
                 logprobs=lp, label_logprob=full.gather(-1, input_ids[:, 1:, None])[..., 0])
    linear, cap = output_linear(model)
    assert linear is model.get_output_embeddings() and cap == (3.0 if arch == "gemma_softcap" else None)

    def run(impl="fused", batch=batch):
        model.zero_grad(set_to_none=True)
        loss, count = loss_module.StudentLoss(model, chunk_size=4, impl=impl)(**batch)
        loss.backward()
        return loss.detach(), count, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    calls = []
    real = loss_module.fused_linear_mft_loss
    monkeypatch.setattr(loss_module, "fused_linear_mft_loss", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    fused = run()
    assert calls
    chunked = run("checkpointed")  # the head's own forward, as any head that is not a plain linear layer runs
    assert len(calls) == 1 and fused[1] == chunked[1] == 8 + 4
    torch.testing.assert_close(fused[0], chunked[0], rtol=1e-5, atol=1e-5)
    assert fused[2].keys() == chunked[2].keys()
    for name in fused[2]:
        torch.testing.assert_close(fused[2][name], chunked[2][name], rtol=1e-4, atol=1e-5, msg=name)
    # plain cross-entropy: transformers' own loss over full logits gives the same loss and gradients
    plain = {k: batch[k] for k in ("input_ids", "length", "label_mask")}
    ours, theirs = run("fused", plain), run("transformers", plain)
    assert ours[1] == theirs[1] == 8 + 4
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    for name in ours[2]:
        torch.testing.assert_close(ours[2][name], theirs[2][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("softcap", [None, 7.0])
def test_dropped_tail_matches_its_dense_reference_fused_and_chunked(softcap):
    """drop_tail: loss = (1-w)·Σ_{i∈S} p_i (-log q_i) + w·(-log q_l), no tail term; fused == chunked == brute force."""
    g = torch.Generator().manual_seed(3)
    n, h, v, k = 13, 6, 17, 4
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).float().requires_grad_()
    weight_m = torch.randn(v, h, generator=g).requires_grad_()
    lp = torch.log_softmax(torch.randn(n, v, generator=g) * 2, -1)
    vals, ids = lp.topk(k, -1)
    labels = torch.randint(0, v, (n,), generator=g)
    label_lp = lp.gather(1, labels[:, None])[:, 0]
    w = torch.rand(n, generator=g)
    mask = torch.rand(n, generator=g) > 0.2

    def head(x):
        z = x @ weight_m.T
        return z if softcap is None else softcap * torch.tanh(z / softcap)

    # brute force: dense target on S only
    log_q = torch.log_softmax(head(hidden), -1)
    in_s = torch.zeros(n, v, dtype=torch.bool).scatter_(1, ids, True).scatter_(1, labels[:, None], True)
    ce_s = -(torch.where(in_s, lp.exp(), 0.0) * log_q).sum(-1)
    nll = -log_q.gather(1, labels[:, None])[:, 0]
    ref = torch.where(mask, (1 - w) * ce_s + w * nll, 0.0).sum()
    ref_grads = torch.autograd.grad(ref, (hidden, weight_m))

    fused = fused_linear_mft_loss(hidden, weight_m, None, labels, w, mask, ids, vals, label_lp, chunk_size=5,
                                  softcap=softcap, drop_tail=True)
    chunked = chunked_mft_loss(hidden, head, labels, w, mask, ids, vals, label_lp, chunk_size=5, drop_tail=True)
    bucket = fused_linear_mft_loss(hidden, weight_m, None, labels, w, mask, ids, vals, label_lp, chunk_size=5,
                                   softcap=softcap)
    for got in (fused, chunked):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(torch.autograd.grad(got, (hidden, weight_m)), ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(bucket, ref)  # the tail bucket is a different objective
