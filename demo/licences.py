"""Software licence texts (``scancode-toolkit-mini==32.5.0``), the specialized domain, and the
licence families that decide the train/validation split.

Each ``licensedcode/data/licenses/*.LICENSE`` file is a YAML header between ``---`` lines, then
the text; only the text goes into the corpus.

Licence families (the train/validation split rule)
--------------------------------------------------
Scancode holds many near-duplicate texts under different keys (GPL variants with exceptions,
dozens of BSD/MIT clones under vendor names, deprecated keys replaced by a new key), so the split
is made by *family*, never by document. Families are the connected components of a graph over
normalised key stems:

1. *stem* of a key: its first ``-``-separated token, lower-cased (``gpl-2.0``, ``gpl-2.0-plus``,
   ``gpl-3.0`` -> ``gpl``; ``bsd-new``, ``bsd-simplified`` -> ``bsd``; ``cc-by-4.0`` -> ``cc``;
   ``ms-pl`` -> ``ms``), with the GNU aliases ``lgpl`` and ``agpl`` -> ``gpl`` (AGPL-3.0 is the
   GPL-3.0 text with one section changed, LGPL-3.0 is an addendum to it). Keys sharing a stem
   share a family (coarse on purpose: a vendor's licences often reuse each other's wording).
2. a deprecated key joins the family of every key in its ``replaced_by`` header list;
3. two keys whose texts are near-duplicates join the same family: estimated Jaccard similarity
   of their word 5-gram shingle sets >= 0.8 (128-permutation MinHash with fixed constants
   derived from sha256, so the result never depends on a random state or PYTHONHASHSEED).

A family is named by its most common stem (ties: alphabetical). It goes to validation when
``int(sha256("mft-cache/licence-family/" + name)[:8], 16) % 10000 < 1250`` (12.5 % of families),
to training otherwise: deterministic, independent of the seed and of the token budgets. How
documents are then picked from the families is in ``demo.splits``.
"""

from __future__ import annotations

import hashlib
import re
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .files import stable_int

LICENSE_PREFIX = "licensedcode/data/licenses/"
LICENSE_SUFFIX = ".LICENSE"

STEM_ALIASES = {"lgpl": "gpl", "agpl": "gpl"}
SIMILARITY_THRESHOLD = 0.8
SHINGLE_WORDS = 5
MINHASH_PERMUTATIONS = 128
VAL_FRACTION = 0.125


# ---------------------------------------------------------------------------------------------
# Parsing


def _unquote(v: str) -> str:
    v = v.strip()
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
        v = v[1:-1]
    return v


def parse_header(lines: Sequence[str]) -> dict:
    """Parse the simple YAML of a scancode licence header (stdlib only).

    Handles top-level ``key: value`` lines, block lists (``key:`` then ``    - item`` lines) and
    indented continuation lines of a scalar (joined with a space). Good enough for the fields we
    read (key, language, is_deprecated, replaced_by); not a general YAML parser.
    """
    out: dict = {}
    current: str | None = None
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            m = re.match(r"^([A-Za-z0-9_]+)\s*:\s*(.*)$", line)
            if m is None:  # e.g. a stray top-level line: ignore it
                current = None
                continue
            current, value = m.group(1), m.group(2).strip()
            out[current] = _unquote(value) if value else []
        elif current is not None:
            s = line.strip()
            prev = out[current]
            if s.startswith("- "):
                item = _unquote(s[2:])
                out[current] = (prev if isinstance(prev, list) else ([prev] if prev else [])) + [item]
            elif isinstance(prev, list) and not prev:
                out[current] = s
            elif isinstance(prev, str):
                out[current] = f"{prev} {s}"
    return out


def parse_license_file(raw: str) -> tuple[dict, str]:
    """Split a ``.LICENSE`` file into (header dict, licence text without the header).

    The header is the block between the first line ``---`` and the next ``---`` line; a file
    without a header is all text. Leading blank lines and trailing whitespace are removed from the
    text; its inner layout (indentation, blank lines) is kept.
    """
    raw = raw.lstrip("\ufeff")
    lines = raw.splitlines()
    header: dict = {}
    body = lines
    if lines and lines[0].strip() == "---":
        end = next((i for i in range(1, len(lines)) if lines[i].strip() == "---"), None)
        if end is None:  # unterminated header: everything is header, no text
            return parse_header(lines[1:]), ""
        header = parse_header(lines[1:end])
        body = lines[end + 1 :]
    while body and not body[0].strip():
        body = body[1:]
    return header, "\n".join(body).rstrip()


def strip_header(raw: str) -> str:
    """The licence text of a ``.LICENSE`` file, without its YAML header."""
    return parse_license_file(raw)[1]


@dataclass
class LicenseText:
    key: str
    text: str
    header: dict

    @property
    def english(self) -> bool:
        lang = self.header.get("language")
        return not lang or (isinstance(lang, str) and lang.lower().startswith("en"))

    @property
    def replaced_by(self) -> list[str]:
        v = self.header.get("replaced_by") or []
        return [v] if isinstance(v, str) else list(v)


def read_licenses(license_wheel: Path) -> list[LicenseText]:
    """Every non-empty licence text in the scancode wheel, sorted by key."""
    out = []
    with zipfile.ZipFile(license_wheel) as z:
        for name in sorted(z.namelist()):
            if not (name.startswith(LICENSE_PREFIX) and name.endswith(LICENSE_SUFFIX)):
                continue
            if "/" in name[len(LICENSE_PREFIX) :]:
                continue
            raw = z.read(name).decode("utf-8", errors="replace")
            header, text = parse_license_file(raw)
            if not text.strip():
                continue
            key = name[len(LICENSE_PREFIX) : -len(LICENSE_SUFFIX)]
            out.append(LicenseText(key=key, text=text, header=header))
    if not out:
        raise RuntimeError(f"no licence texts under {LICENSE_PREFIX} in {license_wheel}")
    out.sort(key=lambda lic: lic.key)
    return out


# ---------------------------------------------------------------------------------------------
# Near duplicates (MinHash)


def _shingle_hashes(text: str, n: int = SHINGLE_WORDS):
    import zlib

    import numpy as np

    words = re.findall(r"\w+", text.lower())
    if len(words) < n:
        shingles = {" ".join(words)}
    else:
        shingles = {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}
    return np.fromiter((zlib.crc32(s.encode("utf-8")) for s in shingles), dtype=np.uint64)


def minhash_signatures(texts: Sequence[str], permutations: int = MINHASH_PERMUTATIONS):
    """MinHash signatures (len(texts) x permutations, uint64) of word-shingle sets.

    The hash family is fixed: constants come from sha256, so signatures are identical across
    processes, machines and numpy versions.
    """
    import numpy as np

    a = np.array([stable_int("minhash-a", i) | 1 for i in range(permutations)], dtype=np.uint64)
    b = np.array([stable_int("minhash-b", i) for i in range(permutations)], dtype=np.uint64)
    c = np.uint64(0xBF58476D1CE4E5B9)
    sig = np.empty((len(texts), permutations), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i, t in enumerate(texts):
            x = _shingle_hashes(t)
            h = (x[:, None] ^ b[None, :]) * a[None, :]  # wraps mod 2**64
            h ^= h >> np.uint64(31)
            h *= c
            h ^= h >> np.uint64(29)
            sig[i] = h.min(axis=0)
    return sig


def near_duplicate_pairs(
    texts: Sequence[str], threshold: float = SIMILARITY_THRESHOLD
) -> list[tuple[int, int, float]]:
    """Index pairs (i < j) whose estimated Jaccard similarity is >= threshold."""
    import numpy as np

    if len(texts) < 2:
        return []
    sig = minhash_signatures(texts)
    pairs = []
    for i in range(len(texts) - 1):
        est = (sig[i + 1 :] == sig[i]).mean(axis=1)
        for j in np.nonzero(est >= threshold)[0]:
            pairs.append((i, i + 1 + int(j), float(est[j])))
    return pairs


# ---------------------------------------------------------------------------------------------
# Families


def license_stem(key: str) -> str:
    """Normalised stem of a licence key: first '-'-token, lower-cased, with the GNU aliases."""
    stem = key.strip().lower().split("-", 1)[0] or key.strip().lower()
    return STEM_ALIASES.get(stem, stem)


class _UnionFind:
    """Connected components; the root of a component is its smallest member."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        parent = self.parent
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, x: str, y: str) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            self.parent[max(rx, ry)] = min(rx, ry)


def license_families(
    licenses: Sequence[LicenseText], threshold: float = SIMILARITY_THRESHOLD
) -> dict[str, str]:
    """Map every licence key to its family name (see the module docstring for the rule)."""
    uf = _UnionFind()
    stems = [license_stem(lic.key) for lic in licenses]
    for s in stems:
        uf.find(s)
    for lic, s in zip(licenses, stems):
        for rep in lic.replaced_by:
            uf.union(s, license_stem(rep))
    for i, j, _ in near_duplicate_pairs([lic.text for lic in licenses], threshold):
        uf.union(stems[i], stems[j])

    members: dict[str, Counter] = defaultdict(Counter)
    for s in stems:
        members[uf.find(s)][s] += 1
    name = {root: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for root, c in members.items()}
    return {lic.key: name[uf.find(s)] for lic, s in zip(licenses, stems)}


def is_validation_family(family: str, val_fraction: float = VAL_FRACTION) -> bool:
    """Deterministic family -> split assignment from a hash of the family name."""
    h = int(hashlib.sha256(f"mft-cache/licence-family/{family}".encode("utf-8")).hexdigest()[:8], 16)
    return h % 10000 < int(round(val_fraction * 10000))
