"""A GGUF file -> a plain transformers folder (float32 safetensors + tokenizer), checked.

transformers dequantizes a GGUF to float32 on load but cannot save a GGUF-loaded model, so the
weights are copied into a fresh model built from the same config (without its quantization
config) and that one is saved. The result is written into a ``.partial-*`` folder, reloaded from
there with ``local_files_only=True`` and checked (same tokenization and logits as the GGUF-loaded
model, a sane perplexity on an English paragraph) before it is renamed into place.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from .files import log, partial_name, replace_dir

MAX_SANITY_PERPLEXITY = 100.0
MAX_ABS_LOGIT_DIFF = 1e-3

SANITY_TEXT = (
    "The town council met on Tuesday evening to discuss the future of the old railway station. "
    "Several residents argued that the building should be turned into a library and a small "
    "museum, while others wanted it sold to pay for repairs to local roads. After two hours of "
    "debate, the council agreed to ask an engineer to inspect the roof and walls before making "
    "a final decision next month. The mayor said she was pleased that so many people had come "
    "to share their views."
)


def perplexity(model, tokenizer, text: str = SANITY_TEXT) -> float:
    """Perplexity of ``text`` tokenized with the tokenizer's defaults (a BOS where it adds one)."""
    import torch

    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    return float(torch.exp(loss))


def model_complete(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))


def _load_gguf(gguf_path: Path):
    """The GGUF-loaded model (dequantized to float32) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"loading {gguf_path.name} with transformers (dequantizing to float32)")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except ImportError as e:  # the gguf package is missing
        raise RuntimeError(
            f"loading {gguf_path.name} needs the 'gguf' package: pip install gguf ({e})"
        ) from e
    return model.eval(), tokenizer


def _plain_copy(gguf_model):
    """A freshly built float32 model holding the GGUF-loaded model's weights."""
    import torch
    from transformers import AutoModelForCausalLM

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(gguf_model.state_dict(), strict=True)
    if getattr(result, "missing_keys", None) or getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"state dict mismatch while converting: {result}")
    return model


def _check_reloaded(folder: Path, gguf_model, gguf_tokenizer) -> dict:
    """Reload ``folder`` offline and compare it with the GGUF-loaded model; returns its facts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log("reloading with local_files_only=True and checking it")
    reloaded = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if reloaded.dtype != torch.float32:
        raise RuntimeError(f"reloaded model has dtype {reloaded.dtype}, expected float32")
    ids = tokenizer(SANITY_TEXT, return_tensors="pt").input_ids
    if ids.tolist() != gguf_tokenizer(SANITY_TEXT, return_tensors="pt").input_ids.tolist():
        raise RuntimeError("the saved tokenizer does not tokenize like the GGUF tokenizer")
    with torch.no_grad():
        diff = float((reloaded(ids).logits - gguf_model(ids).logits).abs().max())
    if diff > MAX_ABS_LOGIT_DIFF:
        raise RuntimeError(f"reloaded model differs from the GGUF model: max |dlogit| {diff}")
    ppl = perplexity(reloaded, tokenizer)
    log(f"sanity perplexity on an English paragraph: {ppl:.2f} (max |dlogit| vs GGUF {diff:.1e})")
    if not ppl < MAX_SANITY_PERPLEXITY:
        raise RuntimeError(
            f"converted model looks broken: perplexity {ppl:.1f} >= {MAX_SANITY_PERPLEXITY}"
        )
    return {
        "dtype": "float32",
        "parameters": sum(p.numel() for p in reloaded.parameters()),
        "sanity_perplexity": round(ppl, 4),
        "max_abs_logit_diff_vs_gguf": diff,
    }


def convert_gguf(gguf_path: Path, model_dir: Path) -> dict:
    """Convert the GGUF file ``gguf_path`` into a checked float32 transformers folder ``model_dir``
    (replacing an old one only once the new one passed its checks).

    Returns facts for assets.json: dtype, parameters, sanity_perplexity, max_abs_logit_diff_vs_gguf.
    """
    t0 = time.time()
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = partial_name(model_dir)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    try:
        gguf_model, tokenizer = _load_gguf(gguf_path)
        model = _plain_copy(gguf_model)
        log(f"saving float32 safetensors to {model_dir}")
        model.save_pretrained(tmp_dir, safe_serialization=True)
        tokenizer.save_pretrained(tmp_dir)
        del model
        facts = _check_reloaded(tmp_dir, gguf_model, tokenizer)
        for f in tmp_dir.iterdir():  # safetensors writes 0600; make the folder uniformly readable
            if f.is_file():
                os.chmod(f, 0o644)
        replace_dir(tmp_dir, model_dir)
        log(f"model ready ({time.time() - t0:.1f}s)")
        return facts
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def recheck_model(model_dir: Path) -> dict | None:
    """Facts of an already converted folder if its sanity perplexity is fine, else None.

    A conversion is renamed into place only after its checks, so a complete folder without a
    record comes from a run that stopped before writing assets.json: it is kept after this check.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log("found a converted model without a record: checking it")
    m = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    ppl = perplexity(m, tok)
    log(f"sanity perplexity on an English paragraph: {ppl:.2f}")
    if not ppl < MAX_SANITY_PERPLEXITY:
        return None
    return {
        "dtype": str(m.dtype).replace("torch.", ""),
        "parameters": sum(p.numel() for p in m.parameters()),
        "sanity_perplexity": round(ppl, 4),
    }
