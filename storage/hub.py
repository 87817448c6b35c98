"""Caches on the Hugging Face Hub, as dataset repositories: `mft cache --push-to-hub REPO` uploads a finished cache
folder with a dataset card; `--cache hf://REPO[@revision]` downloads one with snapshot_download and checks every
shard against the manifest's sha256s before training reads it. Also the upload of a trained model (final/).

Never needed offline: with HF_HUB_OFFLINE set, or the Hub unreachable, each path stops with a ValueError naming
its flag (the command exits 2), never a traceback. `huggingface_hub` reads its token as usual (HF_TOKEN,
`hf auth login`)."""
from __future__ import annotations

import os
from pathlib import Path

from mft_cache.names import REPO_ID_RULE, REVISION_RULE, check_repo_id, repo_id_problem, revision_problem, shown

HF_PREFIX = "hf://"


def is_hub_ref(source: str) -> bool:
    return str(source).startswith(HF_PREFIX)


def parse_hub_ref(ref: str, flag: str) -> tuple[str, str | None]:
    """hf://owner/name[@revision] -> (repo id, revision or None); a repo id or a revision the Hub would refuse (a
    path such as `@../../x` or `@/etc`, a control character) is refused naming `flag`, before anything is asked of
    the Hub."""
    body = ref[len(HF_PREFIX):]
    repo, at, revision = body.partition("@")
    form = "a Hub cache is hf://OWNER/NAME or hf://OWNER/NAME@REVISION"
    problem = repo_id_problem(repo)
    if problem is not None:
        raise ValueError(f"{flag} {shown(ref)}: {form} ({problem}); expected {REPO_ID_RULE}")
    problem = revision_problem(revision) if at else None
    if problem is not None:
        raise ValueError(f"{flag} {shown(ref)}: {form}; its REVISION {shown(revision)} is not a revision ({problem}); "
                         f"expected {REVISION_RULE}")
    return repo, revision or None


def hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return env or bool(getattr(constants, "HF_HUB_OFFLINE", False))


def check_online(flag: str, target: str) -> None:
    """Refuse a Hub repository up front, before any work is done: an id the Hub would refuse, or the Hub switched
    off here."""
    check_repo_id(target, flag)
    if hub_offline():
        raise ValueError(f"{flag} {target}: the Hugging Face Hub is switched off here (HF_HUB_OFFLINE is set); "
                         f"unset HF_HUB_OFFLINE and check the network, or leave out {flag}")


def _reason(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")


def download_cache(ref: str, flag: str = "--cache") -> Path:
    """The local folder of hf://REPO[@revision] (downloaded, or found in the local Hub cache offline), every shard
    checked against the manifest's sha256s."""
    from huggingface_hub import snapshot_download

    from .reader import open_cache

    repo, revision = parse_hub_ref(ref, flag)
    try:
        folder = Path(snapshot_download(repo_id=repo, repo_type="dataset", revision=revision))
    except Exception as e:  # the network's and the Hub's errors, offline mode among them
        off = " (HF_HUB_OFFLINE is set and it is not in the local Hub cache)" if hub_offline() else ""
        raise ValueError(f"{flag} {ref}: could not download the dataset repository {repo}{off}: {_reason(e)}") from None
    open_cache(folder, verify="full")  # a bad or missing shard raises CorruptShardError/ManifestError (exit 3)
    return folder


def push_folder(folder: Path, repo: str, repo_type: str, flag: str, card: str | None = None) -> str:
    """Upload `folder` to the Hub repository `repo` (created if missing); `card` becomes its README.md.
    Returns the repository's URL."""
    from huggingface_hub import HfApi

    check_online(flag, repo)
    api = HfApi()
    try:
        url = api.create_repo(repo, repo_type=repo_type, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type=repo_type,
                          ignore_patterns=[".mft-*", "*.tmp", "*.tmp-*"], commit_message=f"mft-cache: {folder.name}")
        if card is not None:
            api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=repo,
                             repo_type=repo_type, commit_message="mft-cache: dataset card")
    except Exception as e:  # authentication, network, permissions: the Hub's word
        raise ValueError(f"{flag} {repo}: the upload failed ({_reason(e)}); {folder} is complete here, so retry "
                         f"later, e.g. `hf upload {repo} {folder}{' --repo-type dataset' if repo_type == 'dataset' else ''}`")
    return str(url)


def dataset_card(manifest: dict, repo: str) -> str:
    """The Hub dataset card of a cache: teacher, k, dtype, size, data, and how to read it."""
    from huggingface_hub import DatasetCard, DatasetCardData

    m = manifest
    facts = {"teacher": m.model.id, "teacher_weights_fingerprint": m.model.weights_fingerprint,
             "top_k": m.top_k, "logprob_dtype": m.config.get("logprob_dtype"), "seq_len": m.seq_len,
             "num_sequences": m.num_sequences, "num_tokens": m.num_tokens, "bytes_per_token": m.bytes_per_token,
             "format": m.format, "data_fingerprint": m.data.fingerprint, "manifest_sha256": m.manifest_sha256}
    meta = DatasetCardData(tags=["mft-cache", "logit-distillation", "teacher-logprobs"], mft_cache=facts)
    rows = "\n".join(f"| {k} | `{v}` |" for k, v in facts.items())
    text = f"""# {repo}: a teacher's top-{facts['top_k']} log-probs, cached by mft-cache

The frozen teacher `{facts['teacher']}` read {facts['num_sequences']} packed sequences of {facts['seq_len']} tokens
({facts['num_tokens']} trained positions) once and kept, at every position, its top-{facts['top_k']} token ids and
log-probs ({facts['logprob_dtype']}) and the label's log-prob: {facts['bytes_per_token']} bytes per token.

| | |
|---|---|
{rows}

## How to read it

Train from it (the student must share the teacher's tokenizer):

```bash
mft train --cache hf://{repo} --out runs/from-hub --tau 0.25
```

In your own `transformers.Trainer` or loop:

```python
from huggingface_hub import snapshot_download
from mft_cache.hf import CacheDataset

rows = CacheDataset(snapshot_download("{repo}", repo_type="dataset"))
```

The files: manifest.json (schema, shards and their sha256s, the teacher and data fingerprints), documents.npy and the
shards ({facts['format']}); the layout is mft-cache's docs/FORMAT.md.
"""
    return str(DatasetCard(f"---\n{meta.to_yaml()}\n---\n\n{text}"))
