"""The model card (README.md, the Hub's format, written with huggingface_hub's ModelCard) that best/ and final/
carry: what the weights are (base model, objective, tau, adapter or full model), what they were trained from (the
cache's teacher, k and log-prob dtype, data fingerprints), how they score (S, DG, DG/S and both perplexities, the
base model's and this checkpoint's), and how to make them again (the command line, the options, the version).
Every string a user typed or a file held is escaped or fenced, so none can end a code block or add Markdown; a model
given as a local folder is shown by its folder name, never by its path.

The numbers are also in the card's metadata under `mft:` (ModelCard.load(path).data.mft)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from mft_cache import __version__
from mft_cache.config import command_line
from mft_cache.provenance import FORMAT as PROVENANCE_FORMAT, clean, describe, read_provenance
from mft_cache.storage import Manifest

_NUMBERS = ("step", "S", "DG", "ratio", "ppl_specialized", "ppl_general")


def card_metadata(resolved: dict, manifest: Manifest | None, record: dict, base: dict, adapter: bool) -> dict:
    """The `mft:` block of the card's metadata: every number and fingerprint the card states (`manifest`: the
    cache's, None with the online teacher)."""
    m = manifest
    names = model_names(resolved, manifest)
    teacher = m.model.id if m else resolved["model"] or None
    return {
        "objective": resolved["objective"], "tau": resolved["tau"], "adapter": resolved["peft"] if adapter else None,
        **{k: record.get(k) for k in _NUMBERS},
        "base_ppl_specialized": base.get("ppl_specialized"), "base_ppl_general": base.get("ppl_general"),
        "teacher": names.get(teacher, teacher),
        "teacher_weights_fingerprint": m.model.weights_fingerprint if m else None,
        "cache_top_k": resolved.get("cache_top_k"), "cache_logprob_dtype": m.config.get("logprob_dtype") if m else None,
        "cache_manifest_sha256": resolved.get("cache_manifest_sha256"),
        "data_fingerprint": m.data.fingerprint if m else None,
        "data_source": (m.data.source if m else None) or resolved["data"] or None,
        "command": _shown_command(command_line(), names), "mft_cache_version": __version__,
        "best_by": resolved.get("best_by", "specialized"),
        "trained_from": starting_point(resolved, manifest),
    }


def starting_point(resolved: dict, manifest: Manifest | None) -> dict | None:
    """The provenance of the model the run started from: the cache's record of its teacher (the student is that
    teacher unless --model differs), else the student folder's own mft_checkpoint.json."""
    if manifest is not None and not resolved.get("model"):
        return clean(manifest.model.trained_from)
    return read_provenance(resolved.get("resolved_model"))


def provenance_record(cfg, resolved: dict, manifest: Manifest | None, record: dict, base: dict, checkpoint: str) -> dict:
    """mft_checkpoint.json of best/ or final/ (mft_cache.provenance): what the weights are and how they scored, so that
    a cache or a run that starts from this folder can say where its model came from. Paths appear by file name only."""
    m = manifest
    source = (m.data.source if m else None) or resolved.get("data") or None
    return {"format": PROVENANCE_FORMAT, "checkpoint": checkpoint, "objective": resolved["objective"],
            "tau": resolved["tau"], "lr": cfg.lr, "steps": cfg.steps, "best_by": cfg.best_by,
            "step": record.get("step"), **{k: record.get(k) for k in ("ppl_specialized", "ppl_general")},
            "base_ppl_specialized": base.get("ppl_specialized"), "base_ppl_general": base.get("ppl_general"),
            "base_model": shown_model(resolved["resolved_model"]), "data_source": source and Path(source).name,
            "data_fingerprint": m.data.fingerprint if m else None,
            "eval_specialized": Path(cfg.eval_specialized).name if cfg.eval_specialized else None,
            "eval_general": Path(cfg.eval_general).name if cfg.eval_general else None,
            "mft_cache_version": __version__}


def model_names(resolved: dict, manifest: Manifest | None) -> dict[str, str]:
    """Each local model folder the run names (the student as given and as resolved, the cache's teacher) -> the
    folder name a card shows for it."""
    names = {name: shown_model(name, True) for name in (resolved.get("model"), resolved.get("resolved_model"))
             if name and _is_local(name)}
    if manifest is not None and manifest.model.path:  # the teacher was a local folder when the cache was made
        names.update({name: shown_model(name, True) for name in (manifest.model.id, manifest.model.path)})
    return names


def _hub_id(name: str | None) -> str | None:
    """A Hub repo id for the card's base_model, or None for a local folder (the Hub would refuse a path)."""
    return name if name and not os.path.exists(name) and name.count("/") == 1 else None


def _is_local(name: str) -> bool:
    """Whether a model named so is a local folder (models.py's rule: a folder that exists, or a path-like name)."""
    return os.path.isdir(os.path.expanduser(name)) or name.startswith((".", "/", "~")) or name.count("/") > 1


def shown_model(name: str | None, local: bool | None = None) -> str | None:
    """A model as a card shows it: a Hub id as it is, a local folder by its folder name (never its path, which
    would tell where it lives on the machine that trained it). `local`: known from elsewhere (the manifest)."""
    if not name:
        return name
    if not (_is_local(name) if local is None else local):
        return name
    return Path(os.path.normpath(os.path.expanduser(name))).name or name


def _shown_command(command: str, paths: dict[str, str]) -> str:
    """The command line with each argument that is one of `paths` (a local model folder as typed) replaced by what
    the card shows for it."""
    import shlex

    def one(arg: str) -> str:
        key, eq, value = arg.partition("=")
        if eq and arg.startswith("--") and value in paths:
            return f"{key}={paths[value]}"
        return paths.get(arg, arg)

    return shlex.join(one(a) for a in shlex.split(command))


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_MARKDOWN = re.compile(r"([\\`*_{}\[\]()<>#+\-.!|~&])")


def _printable(text) -> str:
    """`text` on one line: every control character (a newline among them) written as its escape (\\n, \\x1b)."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], str(text))


def md_text(text) -> str:
    """Plain text in Markdown: on one line, every character Markdown or HTML would read escaped with a backslash."""
    return _MARKDOWN.sub(r"\\\1", _printable(text))


def _ticks(text: str) -> int:
    """The longest run of backticks in `text`."""
    return max((len(r) for r in re.findall(r"`+", text)), default=0)


def md_code(text) -> str:
    """`text` as inline code on one line, between more backticks than any run of them inside it."""
    text = _printable(text)
    fence = "`" * (_ticks(text) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def md_block(text: str, lang: str = "") -> list[str]:
    """`text` as a fenced code block, its fence longer than any run of backticks inside it, so that no line of
    the text closes it."""
    fence = "`" * max(3, _ticks(text) + 1)
    return [f"{fence}{lang}", text, fence]


def _cell(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def card_text(name: str, m: dict, resolved: dict) -> str:
    """The card's Markdown: every string from the user or a file (names, paths, the command) escaped or fenced."""
    what = f"A {md_text(m['adapter'])} adapter of" if m["adapter"] else "A minifinetuned"
    tau = "" if m["tau"] is None else f", tau {m['tau']:g}"
    teacher = (f"targets from a cache of {md_code(m['teacher'])}'s top-{m['cache_top_k']} log-probs "
               f"({md_text(m['cache_logprob_dtype'])}; cache manifest sha256 {md_code(m['cache_manifest_sha256'])})"
               if m["cache_manifest_sha256"] else
               "targets from the teacher online" if resolved["teacher"] == "online" and m["objective"] != "ft" else
               "plain cross-entropy")
    return "\n".join([
        f"# {md_text(name)}", "",
        f"{what} {md_code(resolved['resolved_model'])}, trained with mft-cache {md_text(m['mft_cache_version'])}: "
        f"objective {md_code(m['objective'])}{tau}; {teacher}.", "",
        f"## Evaluation (step {m['step']})", "",
        "| | base model | this checkpoint |", "|---|---|---|",
        f"| perplexity, specialized domain | {_cell(m['base_ppl_specialized'])} | {_cell(m['ppl_specialized'])} |",
        f"| perplexity, general domain | {_cell(m['base_ppl_general'])} | {_cell(m['ppl_general'])} |", "",
        f"S (specialization) {_cell(m['S'])}, DG (degeneralization) {_cell(m['DG'])}, DG/S {_cell(m['ratio'])}.", "",
        "## Training data", "",
        f"- documents: {md_code(m['data_source'])} (fingerprint {md_code(m['data_fingerprint'])})",
        f"- evaluation: specialized {md_code(resolved['eval_specialized'] or 'none')}, general "
        f"{md_code(resolved['eval_general'] or 'none')}",
        f"- teacher: {md_code(m['teacher'])} (weights fingerprint {md_code(m['teacher_weights_fingerprint'])})",
        *([f"- starting model: {md_text(describe(m['trained_from']))}"] if m["trained_from"] else []),
        f"- this checkpoint: {checkpoint_line(name, m['best_by'])}", "",
        "## Reproduce", "", *md_block(m["command"], "bash"), "",
        "The run's options (its config.json; `mft train --config config.json --out NEW` reruns it):", "",
        *md_block(json.dumps(resolved, indent=1), "json"), ""])


def checkpoint_line(name: str, best_by: str) -> str:
    if name.endswith("/best"):
        return f"best/, the evaluation with the least {md_text(best_by)}-domain validation perplexity (--best-by)"
    return "final/, the weights after the last step"


def write_model_card(folder: Path, resolved: dict, manifest: Manifest | None, record: dict, base: dict,
                     adapter: bool) -> None:
    """folder/README.md: the card of the checkpoint in `folder`, evaluated as `record` (base: the first evaluation)."""
    from huggingface_hub import ModelCard, ModelCardData

    m = card_metadata(resolved, manifest, record, base, adapter)
    names = model_names(resolved, manifest)
    shown = {**resolved, **{k: names.get(resolved[k], resolved[k]) for k in ("model", "resolved_model")}}
    data = ModelCardData(base_model=_hub_id(resolved["resolved_model"]), library_name="peft" if adapter else
                         "transformers", tags=["mft-cache", "minifinetuning", resolved["objective"]], mft=m)
    name = f"{Path(resolved['out']).name}/{folder.name.removesuffix('.tmp')}"
    from .samples import card_section  # samples.py renders with this module's helpers

    text = card_text(name, m, shown) + "\n".join(card_section(base, record))
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}").save(folder / "README.md")
