"""Parameter-efficient students (`--peft lora|dora|ia3`) through the peft library.

The MFT objective does not change: only which parameters train. The output layer is never adapted
(its weight stays the teacher's, so the loss's fused head sees a frozen matrix), and the default
targets are every attention and MLP projection of the decoder, as in the paper.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch.nn as nn

log = logging.getLogger(__name__)

PEFT_METHODS = ("none", "lora", "dora", "ia3")


def _linear_like(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D  # GPT-2's transposed linear

    return isinstance(module, (nn.Linear, Conv1D))


def _in_features(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.weight.shape[0]  # Conv1D: (in, out)


def projection_names(model: nn.Module) -> list[str]:
    """Leaf names of every linear layer of the model except its output layer (q_proj, ..., down_proj)."""
    head = model.get_output_embeddings()
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if _linear_like(m) and m is not head}
    if not names:
        raise ValueError(f"--peft: {type(model).__name__} has no linear layers to adapt")
    return sorted(names)


def feedforward_names(model: nn.Module, targets: list[str]) -> list[str]:
    """IA3 scales the INPUT of MLP output projections (their input is the wide intermediate layer)."""
    hidden = model.config.get_text_config().hidden_size
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if _linear_like(m) and name.rsplit(".", 1)[-1] in targets and _in_features(m) != hidden})


def add_adapter(model: nn.Module, method: str, rank: int, alpha: float, dropout: float, targets: str):
    """Wrap `model` in a peft model whose base weights are frozen; return it."""
    from peft import IA3Config, LoraConfig, get_peft_model

    names = [t.strip() for t in targets.split(",") if t.strip()] if targets else projection_names(model)
    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    unknown = [t for t in names if t not in present]
    if unknown:
        raise ValueError(f"--peft-targets: {type(model).__name__} has no modules named {unknown} "
                         f"(its projections: {projection_names(model)})")
    if method in ("lora", "dora"):
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names,
                            use_dora=method == "dora", bias="none")
    elif method == "ia3":
        config = IA3Config(target_modules=names, feedforward_modules=feedforward_names(model, names))
    else:
        raise ValueError(f"--peft must be one of {PEFT_METHODS}; got {method!r}")
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    log.info("--peft %s on %s: %d trainable parameters of %d (%.3f%%)", method, ",".join(names), trainable, total,
             100 * trainable / total)
    return peft_model


def is_adapted(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def save_adapted(model: nn.Module, path: Path, merged: bool, state_dict: dict | None = None) -> None:
    """best/ and final/: the adapter alone (adapter_config.json + weights), or the merged full model."""
    if merged:
        full = copy.deepcopy(model)
        if state_dict is not None:
            full.load_state_dict(state_dict)
        full.merge_and_unload().save_pretrained(path, safe_serialization=True)
    else:
        model.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
