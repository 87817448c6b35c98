"""``assets.json``: written last, it records versions, parameters and the sha256 of every file.
When it matches what is on disk, a build does nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

from .files import files_match, log, write_text_atomic

FORMAT_VERSION = 1
MANIFEST = "assets.json"


def read_manifest(path: Path) -> dict | None:
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("format") == FORMAT_VERSION else None


def manifest_up_to_date(
    out: Path, m: dict, params: dict | None, packages: Sequence[tuple[str, str]], cache: dict
) -> bool:
    """Same parameters, same wheel versions and every recorded file present with its sha256."""
    if m.get("params") != params:
        return False
    if {k: v.get("version") for k, v in m.get("wheels", {}).items()} != dict(packages):
        return False
    files = m.get("files") or {}
    return bool(files) and files_match(out, files, cache)


def previous_manifest(
    out: Path, params: dict | None, packages: Sequence[tuple[str, str]], cache: dict
) -> tuple[dict, bool]:
    """The previous assets.json under ``out`` ({} if none) and whether it is still up to date."""
    path = out / MANIFEST
    prev = read_manifest(path)
    if prev is None:
        return {}, False
    log(f"checking {path} ({len(prev.get('files', {}))} files, sha256)")
    if manifest_up_to_date(out, prev, params, packages, cache):
        return prev, True
    log("assets.json does not match: rebuilding what is missing or changed")
    return prev, False


def write_manifest(out: Path, prev: dict, sections: dict, files: dict[str, str]) -> dict:
    """Write ``out/assets.json``: format, created, the ``sections`` in order, then files.

    An unchanged manifest keeps its previous "created" time.
    """
    manifest = {
        "format": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **sections,
        "files": files,
    }
    if prev and {k: v for k, v in prev.items() if k != "created"} == {
        k: v for k, v in manifest.items() if k != "created"
    }:
        manifest["created"] = prev.get("created", manifest["created"])
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest
