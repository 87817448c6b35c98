"""The model card (README.md, the Hub's format, written with huggingface_hub's ModelCard) that best/ and final/
carry: what the weights are (base model, objective, tau, adapter or full model), what they were trained from (the
cache's teacher, k and log-prob dtype, data fingerprints), how they score (S, DG, DG/S and both perplexities, the
base model's and this checkpoint's), and how to make them again (the command line, the options, the version).

The numbers are also in the card's metadata under `mft:` (ModelCard.load(path).data.mft)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from mft_cache import __version__
from mft_cache.config import command_line
from mft_cache.storage import Manifest

_NUMBERS = ("step", "S", "DG", "ratio", "ppl_specialized", "ppl_general")


def card_metadata(resolved: dict, manifest: Manifest | None, record: dict, base: dict, adapter: bool) -> dict:
    """The `mft:` block of the card's metadata: every number and fingerprint the card states (`manifest`: the
    cache's, None with the online teacher)."""
    m = manifest
    return {
        "objective": resolved["objective"], "tau": resolved["tau"], "adapter": resolved["peft"] if adapter else None,
        **{k: record.get(k) for k in _NUMBERS},
        "base_ppl_specialized": base.get("ppl_specialized"), "base_ppl_general": base.get("ppl_general"),
        "teacher": m.model.id if m else resolved["model"] or None,
        "teacher_weights_fingerprint": m.model.weights_fingerprint if m else None,
        "cache_top_k": resolved.get("cache_top_k"), "cache_logprob_dtype": m.config.get("logprob_dtype") if m else None,
        "cache_manifest_sha256": resolved.get("cache_manifest_sha256"),
        "data_fingerprint": m.data.fingerprint if m else None,
        "data_source": (m.data.source if m else None) or resolved["data"] or None,
        "command": command_line(), "mft_cache_version": __version__,
    }


def _hub_id(name: str | None) -> str | None:
    """A Hub repo id for the card's base_model, or None for a local folder (the Hub would refuse a path)."""
    return name if name and not os.path.exists(name) and name.count("/") == 1 else None


def _cell(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def card_text(name: str, m: dict, resolved: dict) -> str:
    what = f"A {m['adapter']} adapter of" if m["adapter"] else "A minifinetuned"
    tau = "" if m["tau"] is None else f", tau {m['tau']:g}"
    teacher = (f"targets from a cache of `{m['teacher']}`'s top-{m['cache_top_k']} log-probs ({m['cache_logprob_dtype']}; "
               f"cache manifest sha256 `{m['cache_manifest_sha256']}`)" if m["cache_manifest_sha256"] else
               "targets from the teacher online" if resolved["teacher"] == "online" else "plain cross-entropy")
    return "\n".join([
        f"# {name}", "",
        f"{what} `{resolved['resolved_model']}`, trained with mft-cache {m['mft_cache_version']}: "
        f"objective `{m['objective']}`{tau}; {teacher}.", "",
        f"## Evaluation (step {m['step']})", "",
        "| | base model | this checkpoint |", "|---|---|---|",
        f"| perplexity, specialized domain | {_cell(m['base_ppl_specialized'])} | {_cell(m['ppl_specialized'])} |",
        f"| perplexity, general domain | {_cell(m['base_ppl_general'])} | {_cell(m['ppl_general'])} |", "",
        f"S (specialization) {_cell(m['S'])}, DG (degeneralization) {_cell(m['DG'])}, DG/S {_cell(m['ratio'])}.", "",
        "## Training data", "",
        f"- documents: `{m['data_source']}` (fingerprint `{m['data_fingerprint']}`)",
        f"- evaluation: specialized `{resolved['eval_specialized'] or 'none'}`, general "
        f"`{resolved['eval_general'] or 'none'}`",
        f"- teacher: `{m['teacher']}` (weights fingerprint `{m['teacher_weights_fingerprint']}`)", "",
        "## Reproduce", "", "```bash", m["command"], "```", "",
        "The run's options (its config.json; `mft train --config config.json --out NEW` reruns it):", "",
        "```json", json.dumps(resolved, indent=1), "```", ""])


def write_model_card(folder: Path, resolved: dict, manifest: Manifest | None, record: dict, base: dict,
                     adapter: bool) -> None:
    """folder/README.md: the card of the checkpoint in `folder`, evaluated as `record` (base: the first evaluation)."""
    from huggingface_hub import ModelCard, ModelCardData

    m = card_metadata(resolved, manifest, record, base, adapter)
    data = ModelCardData(base_model=_hub_id(resolved["resolved_model"]), library_name="peft" if adapter else
                         "transformers", tags=["mft-cache", "minifinetuning", resolved["objective"]], mft=m)
    name = f"{Path(resolved['out']).name}/{folder.name.removesuffix('.tmp')}"
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{card_text(name, m, resolved)}").save(folder / "README.md")
