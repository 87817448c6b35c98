"""``python -m demo domains --out assets``: two more specialized domains whose text ships with Python itself.

* ``pydocs``: the language reference and library topics of ``pydoc_data.topics`` (what ``help("if")`` shows),
  one document per topic; family = the topic's name.
* ``pycode``: the standard library's ``*.py`` files (the folder ``sysconfig.get_paths()["stdlib"]``), walked in
  sorted order, without test folders (``test``, ``tests``, ``*_test`` such as ``idlelib/idle_test``, ``test_*``),
  without top-level folders that are no package (``site-packages``, ``lib-dynload``, ``config-*``), without
  ``pydoc_data`` (the pydocs text), without ``test_*.py`` files and without files over ``MAX_SOURCE_CHARS``
  characters or not in UTF-8; family = the top-level module or package (``email/mime/text.py`` -> ``email``), so a
  package's files never straddle train and validation.

Split (``SPLIT_RULE``): a family goes to validation iff ``int(sha256('mft-cache/domain-family/<domain>/<family>')
[:8], 16) % 10000 < 2500`` (a quarter of the families), to training otherwise: independent of the seed and of the
budgets, as the licence families are. A document longer than its split's cap, ``min(MAX_DOC_TOKENS, budget // 4)``
tokens, is cut at the last line boundary within the cap (a document whose first line alone is over it is
skipped); the demo-sized files are then picked by ``demo.splits.select_budget`` (round-robin over the families in
a seed-hashed order, one document per family per round, >= 32 tokens, never over the budget).

Writes ``out/data/<domain>_train.jsonl`` and ``<domain>_val.jsonl`` (``{"text", "id", "family"}`` per line) and
records them in ``out/assets.json`` under "domains": the inputs' fingerprint (the Python version, a sha256 of the
source texts, the tokenizer, budgets and seed), ``sys.version``, and per split its counts and its file's sha256.
Token counts come from the demo model's tokenizer (``out/model``), counted as for the licence splits. A rerun with
the same inputs rewrites nothing; a file is only replaced when its content changes, atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
import time
from bisect import bisect_left
from collections import Counter
from pathlib import Path
from typing import Callable, Mapping, Sequence

from .documents import CountTokens, Doc
from .files import files_match, locked, log, sha256_file, write_text_atomic
from .manifest import MANIFEST, read_manifest
from .splits import MIN_DOC_TOKENS, select_budget

DOMAINS = ("pydocs", "pycode")
DOMAIN_RULE_VERSION = 1  # bump when the reading / split / selection rule changes: forces a rebuild
VAL_FRACTION = 0.25
MAX_DOC_TOKENS = 4_000
MAX_SOURCE_CHARS = 60_000
TRAIN_TOKENS = 32_000
VAL_TOKENS = 12_000

SPLIT_RULE = (
    "pydocs: one document per topic of pydoc_data.topics, family = topic; pycode: the standard library's *.py "
    "files (sorted; no test folders, no test_*.py, no site-packages or other non-package top-level folders, no "
    f"pydoc_data, none over {MAX_SOURCE_CHARS} characters), family = top-level module/package. Validation iff "
    "int(sha256('mft-cache/domain-family/'+domain+'/'+family)[:8],16) % 10000 < "
    f"{int(VAL_FRACTION * 10000)}. Documents over min({MAX_DOC_TOKENS}, budget/4) tokens cut at the last line "
    "boundary within it (skipped if the first line is over it); then round-robin over families in a seed-hashed "
    f"order, docs >= {MIN_DOC_TOKENS} tokens, until the token budget."
)


# ---------------------------------------------------------------------------------------------
# Reading the sources


def read_pydocs(topics: Mapping[str, str] | None = None) -> list[Doc]:
    """One Doc per non-empty topic of ``pydoc_data.topics`` (or of ``topics``), sorted by name."""
    if topics is None:
        try:
            from pydoc_data.topics import topics as stdlib_topics
        except ImportError as e:
            raise RuntimeError(
                f"pydocs: pydoc_data.topics cannot be imported in this Python ({sys.executable}: {e}); "
                "some distributions ship it in a separate package (e.g. python3-doc)"
            ) from e
        topics = stdlib_topics
    docs = []
    for name in sorted(topics):
        text = str(topics[name]).replace("\r\n", "\n").strip()
        if text:
            docs.append(Doc(id=f"pydocs/{name}", text=text, family=name))
    if not docs:
        raise RuntimeError("pydocs: pydoc_data.topics holds no text")
    return docs


def stdlib_folder() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_test_name(name: str) -> bool:
    n = name.lower()
    return n in ("test", "tests") or n.startswith("test_") or n.endswith(("_test", "_tests"))


def _skip_top(name: str) -> bool:
    """Top-level folders that hold no stdlib package: site-packages, lib-dynload, config-3.x-..., pydoc_data."""
    return not name.isidentifier() or name in ("pydoc_data", "__pycache__") or _is_test_name(name)


def stdlib_files(root: Path) -> list[Path]:
    """The candidate ``*.py`` files under ``root``, relative to it, sorted (test folders pruned, no symlinks)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel = Path(dirpath).relative_to(root)
        keep = []
        for d in sorted(dirnames):
            if rel == Path(".") and _skip_top(d):
                continue
            if _is_test_name(d) or d == "__pycache__":
                continue
            keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            if not f.endswith(".py") or _is_test_name(f[:-3]):
                continue
            if rel == Path(".") and not f[:-3].isidentifier():
                continue
            p = Path(dirpath) / f
            if p.is_file() and not p.is_symlink():
                out.append(p.relative_to(root))
    return sorted(out, key=lambda p: p.as_posix())


def read_pycode(root: Path | None = None, max_chars: int = MAX_SOURCE_CHARS) -> tuple[list[Doc], dict]:
    """The standard library's source files as Docs (family = top-level module), and counts of what was skipped."""
    root = stdlib_folder() if root is None else Path(root)
    if not root.is_dir():
        raise RuntimeError(f"pycode: the Python standard library folder {root} does not exist")
    docs, skipped = [], Counter()
    for rel in stdlib_files(root):
        p = root / rel
        if p.stat().st_size > 4 * max_chars:  # utf-8: at most 4 bytes per character
            skipped["too_long"] += 1
            continue
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            skipped["not_utf8"] += 1
            continue
        text = text.replace("\r\n", "\n").strip()
        if len(text) > max_chars:
            skipped["too_long"] += 1
            continue
        if not text:
            skipped["empty"] += 1
            continue
        family = rel.parts[0][:-3] if len(rel.parts) == 1 else rel.parts[0]
        docs.append(Doc(id=f"pycode/{rel.as_posix()}", text=text, family=family))
    if not docs:
        raise RuntimeError(f"pycode: no Python source files (*.py, tests excluded) under {root}")
    return docs, {"files": len(docs), "skipped": dict(sorted(skipped.items()))}


def read_sources(
    stdlib: Path | None = None, topics: Mapping[str, str] | None = None
) -> tuple[dict[str, list[Doc]], dict[str, dict]]:
    """Both domains' documents, before any cut ({"pydocs": [...], "pycode": [...]}), and where they came from."""
    root = stdlib_folder() if stdlib is None else Path(stdlib)
    pydocs = read_pydocs(topics)
    pycode, info = read_pycode(root)
    log(f"pydocs: {len(pydocs)} topics; pycode: {info['files']} files under {root} (skipped: {info['skipped']})")
    where = {
        "pydocs": {"source": "pydoc_data.topics" if topics is None else "topics given"},
        "pycode": {"source": str(root), "skipped_files": info["skipped"]},
    }
    return {"pydocs": pydocs, "pycode": pycode}, where


def sources_sha256(docs: Sequence[Doc]) -> str:
    """sha256 over the documents' ids, families and texts, in order."""
    h = hashlib.sha256()
    for d in docs:
        for part in (d.id, d.family, d.text):
            b = part.encode("utf-8")
            h.update(len(b).to_bytes(8, "big") + b)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Cut, split, select


def cut_at_lines(
    text: str, count_tokens: CountTokens, max_tokens: int, n_tokens: int | None = None
) -> tuple[str, int] | None:
    """``text`` cut at the last line boundary within ``max_tokens`` tokens (trailing whitespace stripped), with its
    token count; ``None`` when even the first line is over. Searches by interpolation on the characters,
    with a bisection whenever a probe does not halve the interval; the returned count is the prefix's own.
    ``n_tokens``: the count of the whole (stripped) text, when already known."""
    ends = []  # ends[k-1] = character offset after line k
    pos = 0
    for line in text.splitlines(keepends=True):
        pos += len(line)
        ends.append(pos)

    def prefix(k: int) -> str:
        return text[: ends[k - 1]].rstrip() if k else ""

    lo, n_lo = 0, 0
    hi = len(ends)
    n_hi = int(count_tokens(prefix(hi))) if n_tokens is None or text != text.rstrip() else int(n_tokens)
    if n_hi <= max_tokens:
        return prefix(hi), n_hi
    halve = False
    while hi - lo > 1:
        if halve:
            k = (lo + hi) // 2
        else:
            c_lo = ends[lo - 1] if lo else 0
            target = c_lo + (ends[hi - 1] - c_lo) * (max_tokens - n_lo) / max(1, n_hi - n_lo)
            k = min(max(bisect_left(ends, target, lo, hi) + 1, lo + 1), hi - 1)
        width = hi - lo
        n = int(count_tokens(prefix(k)))
        if n <= max_tokens:
            lo, n_lo = k, n
        else:
            hi, n_hi = k, n
        halve = not halve and hi - lo > width // 2
    if lo == 0:
        return None
    return prefix(lo), n_lo


def doc_cap(budget: int) -> int:
    """The most tokens one document of a split with this budget may hold."""
    return min(MAX_DOC_TOKENS, max(MIN_DOC_TOKENS, budget // 4))


def capped(docs: Sequence[Doc], count_tokens: CountTokens, cap: int) -> tuple[list[Doc], int, int]:
    """Each doc with ``n_tokens`` set, those over ``cap`` cut at a line boundary; returns (docs, cut, skipped)."""
    out, cut, skipped = [], 0, 0
    for d in docs:
        n = int(count_tokens(d.text))
        if n <= cap:
            out.append(Doc(id=d.id, text=d.text, family=d.family, n_tokens=n))
            continue
        r = cut_at_lines(d.text, count_tokens, cap, n_tokens=n)
        if r is None:
            skipped += 1
            continue
        out.append(Doc(id=d.id, text=r[0], family=d.family, n_tokens=r[1]))
        cut += 1
    return out, cut, skipped


def is_validation_family(domain: str, family: str, fraction: float = VAL_FRACTION) -> bool:
    h = hashlib.sha256(f"mft-cache/domain-family/{domain}/{family}".encode("utf-8")).hexdigest()
    return int(h[:8], 16) % 10000 < int(fraction * 10000)


def split_domain(
    domain: str,
    docs: Sequence[Doc],
    count_tokens: CountTokens,
    *,
    train_tokens: int = TRAIN_TOKENS,
    val_tokens: int = VAL_TOKENS,
    seed: int = 0,
) -> tuple[dict[str, list[Doc]], dict]:
    """``{"<domain>_train": [...], "<domain>_val": [...]}`` split by family, and facts for the record."""
    if not docs:
        raise RuntimeError(f"{domain}: no documents")
    families = sorted({d.family for d in docs})
    val_fams = {f for f in families if is_validation_family(domain, f)}
    if not val_fams or len(val_fams) == len(families):
        raise RuntimeError(
            f"{domain}: degenerate split, {len(val_fams)} of {len(families)} families to validation"
        )
    splits, facts = {}, {"documents": len(docs), "families": len(families), "validation_families": len(val_fams)}
    for part, budget, in_val in (("train", train_tokens, False), ("val", val_tokens, True)):
        pool = [d for d in docs if (d.family in val_fams) == in_val]
        cap = doc_cap(budget)
        pool, cut, skipped = capped(pool, count_tokens, cap)
        name = f"{domain}_{part}"
        splits[name] = select_budget(pool, budget, seed=seed, max_doc_tokens=cap)
        facts[name] = {"pool_docs": len(pool), "pool_tokens": sum(d.n_tokens for d in pool),
                       "max_doc_tokens": cap, "cut": cut, "skipped_first_line_over": skipped}
    return splits, facts


# ---------------------------------------------------------------------------------------------
# The build (idempotent)


def domains_fingerprint(
    sources: Mapping[str, Sequence[Doc]], tokenizer_id: str, train_tokens: int, val_tokens: int, seed: int,
    python: str,
) -> str:
    blob = json.dumps(
        {
            "rule": DOMAIN_RULE_VERSION,
            "python": python,
            "sources": {k: sources_sha256(v) for k, v in sorted(sources.items())},
            "tokenizer": tokenizer_id,
            "train_tokens": train_tokens,
            "val_tokens": val_tokens,
            "seed": seed,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def recorded_files(record: Mapping | None) -> dict[str, str]:
    """{file relative to out: sha256} of a domains record."""
    return {s["file"]: s["sha256"] for s in ((record or {}).get("splits") or {}).values()}


def _write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` atomically unless the file already holds exactly it; True when written."""
    data = text.encode("utf-8")
    try:
        if path.read_bytes() == data:
            return False
    except OSError:
        pass
    write_text_atomic(path, text)
    return True


def build_domains(
    out: Path,
    count_tokens: CountTokens,
    *,
    tokenizer_id: str,
    train_tokens: int = TRAIN_TOKENS,
    val_tokens: int = VAL_TOKENS,
    seed: int = 0,
    sources: Mapping[str, Sequence[Doc]] | None = None,
    source_info: Mapping[str, dict] | None = None,
    previous: Mapping | None = None,
    python: str = sys.version,
) -> dict:
    """Write ``out/data/<domain>_{train,val}.jsonl`` for each domain of ``sources`` (default: ``read_sources()``;
    ``source_info`` is recorded with them) unless ``previous`` (what this returned last time) still matches;
    returns the "domains" record.

    ``count_tokens(text) -> int`` counts tokens (the model's tokenizer in the real build, any callable in tests);
    ``tokenizer_id`` identifies it.
    """
    if train_tokens <= 0 or val_tokens <= 0:
        raise ValueError("token budgets must be positive")
    out = Path(out)
    if sources is None:
        sources, source_info = read_sources()
    fp = domains_fingerprint(sources, tokenizer_id, train_tokens, val_tokens, seed, python)
    if previous and previous.get("fingerprint") == fp and files_match(out, recorded_files(previous)):
        log("domains up to date")
        return dict(previous)

    t0 = time.time()
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    record: dict = {
        "fingerprint": fp,
        "python": python,
        "tokenizer": tokenizer_id,
        "train_tokens": train_tokens,
        "val_tokens": val_tokens,
        "seed": seed,
        "split_rule": SPLIT_RULE,
        "sources": {},
        "splits": {},
    }
    for domain, docs in sources.items():
        for stale in data_dir.glob(f".partial-*-{domain}_*"):
            stale.unlink(missing_ok=True)  # our own leftovers of a crashed run (see files.partial_name)
        splits, facts = split_domain(
            domain, docs, count_tokens, train_tokens=train_tokens, val_tokens=val_tokens, seed=seed
        )
        record["sources"][domain] = {**(source_info or {}).get(domain, {}), "sha256": sources_sha256(docs), **facts}
        for name, part in splits.items():
            path = data_dir / f"{name}.jsonl"
            text = "".join(json.dumps(d.record(), ensure_ascii=False) + "\n" for d in part)
            _write_if_changed(path, text)
            record["splits"][name] = {
                "file": path.relative_to(out).as_posix(),
                "docs": len(part),
                "tokens": sum(d.n_tokens for d in part),
                "families": len({d.family for d in part}),
                "sha256": sha256_file(path),
            }
    for name, st in record["splits"].items():
        log(f"  {name}: {st['docs']} docs, {st['tokens']} tokens, {st['families']} families")
    log(f"  {time.time() - t0:.1f}s")
    return record


def model_tokenizer_id(model_dir: Path) -> str:
    """As ``demo.build.tokenizer_id``, from the tokenizer files on disk."""
    from .build import tokenizer_id

    names = [f for f in ("tokenizer.json", "tokenizer_config.json") if (model_dir / f).is_file()]
    return tokenizer_id({f"model/{f}": sha256_file(model_dir / f) for f in names}, model_dir)


def run_domains(
    out: Path,
    *,
    train_tokens: int = TRAIN_TOKENS,
    val_tokens: int = VAL_TOKENS,
    seed: int = 0,
    counter: Callable[[Path], CountTokens] | None = None,
    sources: Mapping[str, Sequence[Doc]] | None = None,
    source_info: Mapping[str, dict] | None = None,
) -> dict:
    """``python -m demo domains``: needs ``out/model`` and ``out/assets.json`` of ``python -m demo --out out``; builds
    the domain files and records them in assets.json under "domains" (rewritten only when that record changes).
    ``counter(model_dir)`` gives the token counter (default: the model's tokenizer, loaded only when needed);
    ``sources``/``source_info`` replace ``read_sources()`` (tests)."""
    out = Path(out)
    model_dir = out / "model"
    manifest = read_manifest(out / MANIFEST)
    if manifest is None or not (model_dir / "tokenizer.json").is_file():
        raise RuntimeError(
            f"no demo model and assets.json under {out} (its tokenizer counts the tokens): "
            f"run python -m demo --out {out} first"
        )
    if counter is None:
        from .build import _lazy_counter as counter
    with locked(out):
        manifest = read_manifest(out / MANIFEST) or manifest
        record = build_domains(
            out, counter(model_dir), tokenizer_id=model_tokenizer_id(model_dir),
            train_tokens=train_tokens, val_tokens=val_tokens, seed=seed, sources=sources,
            source_info=source_info, previous=manifest.get("domains"),
        )  # fmt: skip
        new = {k: v for k, v in manifest.items() if k not in ("domains", "files")}
        new["domains"] = record
        if "files" in manifest:
            new["files"] = manifest["files"]
        if new != manifest:
            write_text_atomic(out / MANIFEST, json.dumps(new, indent=2, sort_keys=False) + "\n")
            log(f"recorded the domains in {out / MANIFEST}")
        return record
