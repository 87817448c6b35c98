"""Whole documents packed into rows without cross-talk: the packing against a plain reference, the attention
masks against brute force, a packed row's logits against each document run alone (Llama, GPT-2, Gemma 3 with
sliding-window layers; sdpa, eager, and flash attention's varlen path), and the loss over a packed row against
the dense reference summed over the documents alone."""
import random

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.modeling_utils import AttentionInterface

from mft_cache import attention as A
from helpers import pack_documents
from mft_cache.rows.doc_packing import DocumentTooLong, iter_rows
from mft_cache.rows.documents import DocumentError
from mft_cache.testing import model_config
from mft_cache.trainer.loss import fused_linear_mft_loss
from mft_cache.trainer.targets import TeacherTargets
from reference import sparse_mft_loss

VOCAB = 300


def random_docs(seed, n, max_len, p_trained=0.7):
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        length = rng.randint(1, max_len)
        docs.append(([rng.randrange(3, VOCAB) for _ in range(length)], [rng.random() < p_trained for _ in range(length)]))
    return docs


def reference_pack(docs, seq_len, pad_id):
    """Greedy whole-document packing written out token by token."""
    rows, cur = [], []
    for d, (ids, trained) in enumerate(docs):
        if sum(len(x[1]) for x in cur) + len(ids) > seq_len:
            rows.append(cur)
            cur = []
        cur.append((d, ids, trained))
    if cur:
        rows.append(cur)
    out = []
    for row in rows:
        ids, seg, pos, tr = [], [], [], []
        for s, (_, d_ids, d_tr) in enumerate(row, start=1):
            ids += d_ids
            seg += [s] * len(d_ids)
            pos += list(range(len(d_ids)))
            tr += d_tr
        n = len(ids)
        pad = seq_len - n
        ids += [pad_id] * pad
        seg += [0] * pad
        pos += list(range(pad))
        tr += [False] * pad
        mask = [seg[t] == seg[t + 1] and seg[t] != 0 and tr[t + 1] for t in range(seq_len - 1)]
        out.append((ids, seg, pos, mask, n, [d for d, _, _ in row]))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("seq_len", [2, 7, 16])
def test_pack_equals_reference(seed, seq_len):
    docs = random_docs(seed, 30, seq_len)
    packed = pack_documents(docs, seq_len, pad_id=0)
    ref = reference_pack(docs, seq_len, 0)
    assert packed.num_rows == len(ref)
    for r, (ids, seg, pos, mask, n, members) in enumerate(ref):
        assert packed.input_ids[r].tolist() == ids
        assert packed.segment_ids[r].tolist() == seg
        assert packed.position_ids[r].tolist() == pos
        assert packed.label_mask[r].tolist() == mask
        assert packed.lengths[r] == n
        assert np.flatnonzero(packed.doc_row == r).tolist() == members
    # every document is found whole where doc_row/doc_start say, and its own trained labels are the row's
    for d, (ids, trained) in enumerate(docs):
        r, s, n = packed.doc_row[d], packed.doc_start[d], packed.doc_length[d]
        assert n == len(ids) and packed.input_ids[r, s:s + n].tolist() == ids
        assert packed.label_mask[r, s:s + n - 1].tolist() == trained[1:]
    assert packed.num_predictions == sum(sum(t[1:]) for _, t in docs)


def test_no_label_crosses_a_document_boundary():
    docs = [([5, 6, 7], [True] * 3), ([8, 9], [True] * 2), ([10], [True])]
    packed = pack_documents(docs, 8, pad_id=0)
    assert packed.num_rows == 1
    # positions 0,1 (labels 6,7) are trained; 2 (label 8, the next document's first token) is not; 3 (label 9) is;
    # 4 (label 10, the third document) is not; nothing after the last real token
    assert packed.label_mask[0].tolist() == [True, True, False, True, False, False, False]
    assert packed.position_ids[0].tolist() == [0, 1, 2, 0, 1, 0, 0, 1]
    assert packed.segment_ids[0].tolist() == [1, 1, 1, 2, 2, 3, 0, 0]


def test_deterministic_bytes():
    docs = random_docs(5, 40, 12)
    a, b = pack_documents(docs, 12, pad_id=2), pack_documents([(list(i), list(t)) for i, t in docs], 12, pad_id=2)
    for name in ("input_ids", "lengths", "segment_ids", "position_ids", "label_mask", "doc_row", "doc_start"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), name


def test_streaming_rows_equal_the_batch():
    docs = random_docs(3, 25, 10)
    rows = list(iter_rows(iter(docs), 10, pad_id=0))  # a generator of documents
    packed = pack_documents(docs, 10, pad_id=0)
    assert np.array_equal(np.stack([r.input_ids for r in rows]), packed.input_ids)
    assert np.array_equal(np.stack([r.label_mask for r in rows]), packed.label_mask)


def test_too_long_is_refused_naming_the_document_or_truncated():
    docs = [([3] * 4, [True] * 4), ([4] * 9, [True] * 9), ([5] * 2, [True] * 2)]
    with pytest.raises(DocumentTooLong, match=r"document 1 has 9 tokens.*--seq-len 8") as e:
        pack_documents(docs, 8)
    assert e.value.index == 1 and e.value.length == 9 and isinstance(e.value, ValueError)
    packed = pack_documents(docs, 8, too_long="truncate")
    assert packed.num_truncated == 1
    assert packed.input_ids.tolist() == [[3, 3, 3, 3, 0, 0, 0, 0], [4] * 8, [5, 5, 0, 0, 0, 0, 0, 0]]
    assert packed.doc_length.tolist() == [4, 8, 2]


def test_bad_documents_and_arguments():
    with pytest.raises(DocumentError, match="document 1 has no tokens"):
        pack_documents([([3], [True]), ([], [])], 8)
    with pytest.raises(DocumentError, match="document 0"):
        pack_documents([([3, 4], [True])], 8)
    with pytest.raises(ValueError, match="--seq-len must be at least 2"):
        pack_documents([([3], [True])], 1)
    with pytest.raises(ValueError, match="too_long"):
        pack_documents([([3], [True])], 8, too_long="drop")
    assert pack_documents([], 8).num_rows == 0


# -- attention masks -------------------------------------------------------------------------------

def test_masks_and_positions_against_brute_force():
    seg = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1], [1, 2, 2, 2, 2, 2, 0, 0]])
    for window in (None, 2, 3):
        mask = A.block_causal_mask(seg, window)
        assert mask.shape == (3, 1, 8, 8)
        for b in range(3):
            for q in range(8):
                for k in range(8):
                    want = seg[b, q] == seg[b, k] and k <= q and (window is None or q - k < window)
                    assert bool(mask[b, 0, q, k]) == bool(want)
    assert A.position_ids_from_segments(seg).tolist() == [
        [0, 1, 2, 0, 1, 0, 0, 1], list(range(8)), [0, 0, 1, 2, 3, 4, 0, 1]]
    flash = A.varlen_kwargs(seg)
    assert flash["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 8, 16, 17, 22, 24]
    assert flash["max_length_q"] == 8 and flash["cu_seq_lens_q"].dtype == torch.int32
    add = A.additive_mask(A.block_causal_mask(seg), torch.float32)
    assert set(add.unique().tolist()) == {0.0, torch.finfo(torch.float32).min}


# -- packed logits equal each document alone --------------------------------------------------------

def tiny_model(kind, impl, sliding_window=None, seed=0):
    """A tiny random model; Gemma 3 with one sliding-window layer and one full one, and a window shorter than
    the documents so that it matters."""
    extra = {"layer_types": ["sliding_attention", "full_attention"]} if kind == "gemma3" else {}
    cfg = model_config(kind, VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)
    if kind == "gemma3":
        cfg.sliding_window = sliding_window or 4
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).eval()


def packed_case(seed=0, seq_len=32):
    docs = random_docs(seed, 6, 14)
    docs[0] = (list(range(40, 52)), [True] * 12)  # longer than Gemma's window
    packed = pack_documents(docs, seq_len, pad_id=0)
    assert packed.num_rows >= 2 and (packed.segment_ids.max(1) >= 2).any()  # several documents in a row
    return docs, packed


def logits_alone(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma3"])
def test_packed_logits_equal_each_document_alone(kind, impl):
    model = tiny_model(kind, impl)
    docs, packed = packed_case()
    seg = torch.from_numpy(packed.segment_ids)
    kwargs = A.packed_forward_kwargs(model, seg)
    if kind == "gemma3":  # one mask per layer type, the sliding one with Gemma's window
        assert set(kwargs["attention_mask"]) == {"full_attention", "sliding_attention"}
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(packed.input_ids), use_cache=False, **kwargs).logits
    for d, (ids, _) in enumerate(docs):
        r, s, n = packed.doc_row[d], packed.doc_start[d], packed.doc_length[d]
        err = (out[r, s:s + n] - logits_alone(model, ids)).abs().max().item()
        assert err < 1e-5, (kind, impl, d, err)
    assert A.check_packed_attention(model) < 1e-5


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_gemma_sliding_window_is_kept(impl):
    """A 4-D mask replaces every layer's own, the sliding ones' too: without the window in it the logits of a
    document longer than the window differ from those it gets alone, and check_packed_attention says so."""
    model = tiny_model("gemma3", impl, sliding_window=3)
    docs, packed = packed_case()
    seg = torch.from_numpy(packed.segment_ids)
    full = A.block_causal_mask(seg)
    wrong = {"attention_mask": full if impl == "sdpa" else A.additive_mask(full, torch.float32),
             "position_ids": A.position_ids_from_segments(seg)}
    right = A.packed_forward_kwargs(model, seg)
    ids = torch.from_numpy(packed.input_ids)
    r, s, n = packed.doc_row[0], packed.doc_start[0], packed.doc_length[0]
    alone = logits_alone(model, docs[0][0])
    with torch.no_grad():
        good = model(input_ids=ids, use_cache=False, **right).logits[r, s:s + n]
        bad = model(input_ids=ids, use_cache=False, **wrong).logits[r, s:s + n]
    assert (good - alone).abs().max() < 1e-5
    assert (bad - alone).abs().max() > 1e-3


def test_gpt2_needs_the_restarted_positions():
    """GPT-2 adds absolute position embeddings: the block mask alone is not enough."""
    model = tiny_model("gpt2", "sdpa")
    docs, packed = packed_case()
    seg = torch.from_numpy(packed.segment_ids)
    kwargs = A.packed_forward_kwargs(model, seg)
    del kwargs["position_ids"]
    d = next(d for d in range(len(docs)) if packed.doc_start[d] > 0)
    r, s, n = packed.doc_row[d], packed.doc_start[d], packed.doc_length[d]
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(packed.input_ids), use_cache=False, **kwargs).logits[r, s:s + n]
    assert (out - logits_alone(model, docs[d][0])).abs().max() > 1e-3


def test_check_refuses_a_model_whose_documents_talk(monkeypatch):
    model = tiny_model("llama", "sdpa")
    monkeypatch.setattr(A, "packed_forward_kwargs", lambda model, seg: {})  # plain causal attention over the row
    with pytest.raises(ValueError, match="do not give the logits they give alone"):
        A.check_packed_attention(model)


def varlen_reference_attention(module, query, key, value, attention_mask, scaling=None, sliding_window=None,
                               cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, **kwargs):
    """What flash_attn_varlen_func computes, in plain torch: causal attention within each sequence of the
    flattened batch (without them, each row is one sequence). Registered in place of flash_attention_2, whose
    kernel is not on this machine."""
    assert attention_mask is None
    b, h, t, d = query.shape  # (B, H, T, D); keys and values may have fewer heads (GQA)
    if cu_seq_lens_q is None:
        cu_seq_lens_q = cu_seq_lens_k = torch.arange(0, b * t + 1, t)
    assert torch.equal(cu_seq_lens_q, cu_seq_lens_k)
    q, k, v = (x.repeat_interleave(h // x.shape[1], 1).transpose(0, 1).reshape(h, b * t, d)
               for x in (query, key, value))
    out = torch.empty_like(q)  # (H, B*T, D)
    cu = cu_seq_lens_q.tolist()
    for s, e in zip(cu[:-1], cu[1:]):
        mask = A.block_causal_mask(torch.zeros(1, e - s, dtype=torch.long), sliding_window)[0, 0]
        out[:, s:e] = torch.nn.functional.scaled_dot_product_attention(q[:, s:e], k[:, s:e], v[:, s:e],
                                                                       attn_mask=mask, scale=scaling)
    return out.reshape(h, b, t, d).permute(1, 2, 0, 3), None  # (B, T, H, D)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma3"])
def test_flash_varlen_arguments_reach_attention(kind, monkeypatch):
    """The flash path hands the kernel every document as its own sequence (cu_seq_lens over the flattened batch),
    through each model's own plumbing; with a plain-torch stand-in for the kernel, packed equals alone."""
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("cu_seq_lens_q") is not None)
        return varlen_reference_attention(*args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "flash_attention_2", spy)
    model = tiny_model(kind, "sdpa")
    model.config._attn_implementation = "flash_attention_2"
    docs, packed = packed_case()
    kwargs = A.packed_forward_kwargs(model, torch.from_numpy(packed.segment_ids))
    assert "attention_mask" not in kwargs and "cu_seq_lens_q" in kwargs
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(packed.input_ids), use_cache=False, **kwargs).logits
    assert seen == [True] * model.config.num_hidden_layers  # every layer got the sequences
    for d, (ids, _) in enumerate(docs):
        r, s, n = packed.doc_row[d], packed.doc_start[d], packed.doc_length[d]
        assert (out[r, s:s + n] - logits_alone(model, ids)).abs().max() < 1e-5


def test_unsupported_implementation_is_refused():
    model = tiny_model("llama", "sdpa")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="flex_attention"):
        A.packed_forward_kwargs(model, torch.ones(1, 4, dtype=torch.long))


# -- the loss over a packed row ---------------------------------------------------------------------

def teacher_targets(logits, labels, weight, k=4):
    """Top-k targets of a teacher's logits (..., V) at labels (...,)."""
    lp = torch.log_softmax(logits.float(), -1)
    top, ids = lp.topk(k, -1)
    return top, ids, lp.gather(-1, labels[..., None])[..., 0], weight


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_packed_loss_equals_documents_alone(kind):
    """Teacher and student both run on the packed rows with the same masks; the summed MFT loss over the trained
    positions and its gradients equal the dense reference summed over each document run alone; masked positions
    (document boundaries, untrained labels, padding) get no loss and no gradient, whatever their targets hold."""
    student, teacher = tiny_model(kind, "sdpa", seed=0), tiny_model(kind, "sdpa", seed=1)
    docs, packed = packed_case(seed=2)
    ids = torch.from_numpy(packed.input_ids)  # (R, T)
    mask = torch.from_numpy(packed.label_mask)  # (R, T-1)
    labels = ids[:, 1:]  # (R, T-1)
    weight = torch.rand(labels.shape, generator=torch.Generator().manual_seed(0))  # (R, T-1) any w in [0, 1]
    kwargs = A.packed_forward_kwargs(student, torch.from_numpy(packed.segment_ids))
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, use_cache=False, **kwargs).logits[:, :-1]
    top, top_ids, label_lp, _ = teacher_targets(t_logits, labels, weight)
    nan = torch.tensor(float("nan"))
    garbage = ~mask[..., None]  # what a cache holds at untrained positions must not matter
    targets = TeacherTargets(torch.where(mask, weight, nan), torch.where(garbage, -5, top_ids),
                             torch.where(garbage, nan, top), torch.where(mask, label_lp, nan)).flatten()

    hidden = student.get_decoder()(input_ids=ids, use_cache=False, **kwargs).last_hidden_state[:, :-1]  # (R, T-1, H)
    leaf = hidden.detach().reshape(-1, hidden.shape[-1]).requires_grad_()  # (N, H)
    head = student.get_output_embeddings().weight
    loss = fused_linear_mft_loss(leaf, head, None, labels.reshape(-1), mask.reshape(-1), targets,
                                 softcap=getattr(student.config, "final_logit_softcapping", None))
    loss.backward()
    assert torch.isfinite(loss)
    assert (leaf.grad[~mask.reshape(-1)] == 0).all() and (leaf.grad[mask.reshape(-1)] != 0).any()
    hidden.backward(leaf.grad.view_as(hidden))
    packed_grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()

    total = 0.0
    for d, (d_ids, trained) in enumerate(docs):
        x = torch.tensor([d_ids])
        s_logits = student(input_ids=x, use_cache=False).logits[0, :-1]  # (n-1, V)
        with torch.no_grad():
            t_alone = teacher(input_ids=x, use_cache=False).logits[0, :-1]
        r, s, n = packed.doc_row[d], packed.doc_start[d], packed.doc_length[d]
        d_labels = x[0, 1:]
        a_top, a_ids, a_label, _ = teacher_targets(t_alone, d_labels, None)
        assert torch.allclose(a_top, top[r, s:s + n - 1], atol=1e-5)  # the teacher saw each document alone
        d_mask = torch.tensor(trained[1:], dtype=torch.bool)
        total = total + sparse_mft_loss(s_logits, d_labels, weight[r, s:s + n - 1], d_mask, a_ids, a_top,
                                        a_label).sum()
    total.backward()
    assert abs(loss.item() - total.item()) <= 1e-5 * max(1.0, abs(total.item()))
    for name, p in student.named_parameters():
        if p.grad is None:
            continue
        err = (packed_grads[name] - p.grad).abs().max().item()
        assert err <= 1e-5 * max(1.0, p.grad.abs().max().item()), (name, err)
