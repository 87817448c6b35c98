"""Attention for rows of packed documents (rows/doc_packing.py): what a transformers model needs so that each
document in a row attends only to itself, causally, from position 0. Used for the teacher in stage one and the
student in stage two alike, so both see the same documents the same way.

From segment ids (B, T) (1..n per document, 0 for the padding run; a run of equal ids is one sequence):
- sdpa / eager: a 4-D mask (B, 1, T, T) passed as `attention_mask`, which transformers uses as it is (a 4-D
  mask skips its own mask building: masking_utils._preprocess_mask_arguments), plus `position_ids`. sdpa takes
  it as booleans (True: attend), eager as an additive float mask (0 or the dtype's minimum). Because a 4-D mask
  replaces the one transformers would build for *every* layer, a model with sliding-window layers gets that
  window in the mask too: one mask when all layers are of one type, else a dict {layer type: mask}, which
  models with mixed layers (Gemma 2/3, Qwen2/3, Cohere2, gpt-oss, ...) accept in place of a mask.
- flash attention (flash_attention_2/3 and the kernels variants): `position_ids` and the cumulative sequence
  lengths (`cu_seq_lens_q/k`, `max_length_q/k`) of every run over the flattened batch, which transformers
  passes to flash_attn_varlen_func; with them it never reads a mask, and the kernel applies a sliding window
  within each sequence itself. (Position ids alone are only read as packed sequences for a batch of one row.)
Position ids restart at 0 in every document, so rotary and absolute (GPT-2) position embeddings see each
document as if it were alone. Verified against transformers 5.24; `check_packed_attention` proves it for a model.
"""
from __future__ import annotations

import torch

FULL, SLIDING = "full_attention", "sliding_attention"


def run_starts(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: True where a run of equal segment ids starts (every row's first position included)."""
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return starts


def position_ids_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) int64 positions that restart at 0 at the start of every run (document or padding)."""
    t = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)  # (B, T)
    start = torch.where(run_starts(segment_ids), t, 0).cummax(dim=1).values  # (B, T) where the run began
    return (t - start).long()


def block_causal_mask(segment_ids: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """(B, 1, T, T) bool, True where query q may attend to key k: same segment, k <= q, and, with a sliding
    window w, q - k < w (transformers' convention: a window of w keys, the query's own included)."""
    t = segment_ids.shape[1]
    i = torch.arange(t, device=segment_ids.device)
    allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (i[:, None] >= i[None, :])  # (B, T, T)
    if sliding_window:
        allowed &= (i[:, None] - i[None, :]) < sliding_window
    return allowed[:, None]


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as the additive float mask eager attention adds to its scores: 0 or dtype's minimum."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def varlen_kwargs(segment_ids: torch.Tensor) -> dict:
    """flash attention's varlen arguments: every run of the flattened (B*T) batch is one sequence."""
    starts = run_starts(segment_ids).reshape(-1).nonzero().squeeze(1)  # (S,)
    total = torch.tensor([segment_ids.numel()], device=segment_ids.device)
    cu = torch.cat([starts, total]).to(torch.int32)  # (S + 1,)
    longest = int(cu.diff().max())  # one host sync per forward
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def attn_implementation(model) -> str:
    return getattr(model.config, "_attn_implementation", None) or "eager"


def layer_windows(config) -> dict[str, int | None]:
    """{layer type: sliding window or None} over the model's layers: `layer_types` where the config has them,
    else every layer sliding where it sets `sliding_window` (Mistral, Phi-3, ...), else every layer full."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None) or None
    types = getattr(text, "layer_types", None)
    if not types:
        types = [SLIDING if window and getattr(text, "use_sliding_window", True) else FULL]
    out = {}
    for typ in dict.fromkeys(types):
        if typ == FULL:
            out[typ] = None
        elif typ == SLIDING:
            if not window:
                raise ValueError(f"{type(config).__name__}: sliding-window layers but no `sliding_window` in config")
            out[typ] = int(window)
        else:
            raise ValueError(f"{type(config).__name__}: layers of type {typ!r} cannot be given packed documents "
                             f"with sdpa or eager attention (only {FULL} and {SLIDING}); use flash attention")
    return out


def packed_forward_kwargs(model, segment_ids: torch.Tensor, dtype: torch.dtype | None = None) -> dict:
    """Keyword arguments for `model(input_ids=..., use_cache=False, **kwargs)` (or its decoder's forward) that make
    every document of a packed row (segment ids (B, T), see the module docstring) attend only to itself.

    Chosen by `model.config._attn_implementation`: sdpa and eager get `attention_mask` (a 4-D mask, or a dict of
    them per layer type) and `position_ids`; flash attention gets `position_ids` and the varlen lengths. `dtype`
    (eager only): the additive mask's dtype, by default the model's parameters'. Any other implementation raises
    ValueError. Memory: one (B, T, T) mask per layer type (bool for sdpa)."""
    impl = attn_implementation(model)
    segment_ids = segment_ids.long()
    kwargs = {"position_ids": position_ids_from_segments(segment_ids)}
    if "flash" in impl:
        return {**kwargs, **varlen_kwargs(segment_ids)}
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"attn_implementation {impl!r}: packed documents need sdpa, eager or flash attention")
    masks = {typ: block_causal_mask(segment_ids, window) for typ, window in layer_windows(model.config).items()}
    if impl == "eager":
        dtype = dtype or next(model.parameters()).dtype
        masks = {typ: additive_mask(m, dtype) for typ, m in masks.items()}
    kwargs["attention_mask"] = next(iter(masks.values())) if len(masks) == 1 else masks
    return kwargs


@torch.no_grad()
def check_packed_attention(model, max_length: int = 64) -> float:
    """Refuse (ValueError) a model for which two documents packed in one row, with padding, do not give the
    logits each gives alone; returns the largest difference. The first document is longer than the sliding
    window where the window is under `max_length` tokens, so that the window is checked too."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    try:
        windows = [w for w in layer_windows(model.config).values() if w]
    except ValueError:  # layer types only flash attention serves
        windows = []
    lengths = (min(max(8, max(windows, default=0) + 3), max_length - 8), 5)
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, vocab, (n,), generator=g).to(device) for n in lengths]
    row = torch.cat(docs + [torch.zeros(3, dtype=torch.long, device=device)])[None]  # (1, T), 3 padding tokens
    seg = torch.tensor([1] * lengths[0] + [2] * lengths[1] + [0] * 3, device=device)[None]  # (1, T)
    was_training = model.training
    model.eval()
    try:
        packed = model(input_ids=row, use_cache=False, **packed_forward_kwargs(model, seg)).logits[0].float()
        err, scale, p = 0.0, 1e-6, 0
        for d in docs:
            alone = model(input_ids=d[None], use_cache=False).logits[0].float()
            err = max(err, (packed[p:p + len(d)] - alone).abs().max().item())
            scale = max(scale, alone.abs().max().item())
            p += len(d)
    finally:
        model.train(was_training)
    fp32 = next(model.parameters()).dtype == torch.float32
    if not err <= (1e-4 if fp32 else 2e-2) * scale:
        raise ValueError(f"{type(model).__name__} with attn_implementation={attn_implementation(model)!r}: documents "
                         f"packed in one row do not give the logits they give alone (max difference {err:.3g}); "
                         "this model cannot be trained on packed documents")
    return err

