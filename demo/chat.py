"""``python -m demo chat --out assets``: the chat demo's conversations, from a real dialogue corpus on PyPI.

``chatterbot-corpus==1.3.3`` (BSD licence, per its package metadata; its dialogues were written by its
contributors): ``chatterbot_corpus/data/english/*.yml``, one file per topic, each a list of dialogues, each a
list of utterances. A dialogue becomes a conversation whose turns alternate user, assistant, user, ... from its
first utterance (a dialogue ending on a user turn keeps it: it is context, never trained). Exact repeats are
dropped (``tech_support.yml`` holds ten dialogues a hundred times over), and so are conversations that the model's
chat template renders to more than ``max_tokens`` tokens (``mft cache`` refuses them at that ``--seq-len``).

Specialized domain: the SPECIALIZED topics (computing and science), split into train and validation by a stable
hash of each conversation (one in VAL_EVERY to validation). General domain: every other topic, held out
(validation only: MFT never sees it).

Writes under ``out/data``: chat_train.jsonl, chat_val.jsonl, chat_general_val.jsonl (``{"messages": [...],
"topic": ...}``), then ``out/chat.json`` last (the wheel's sha256, the counts, sha256 of every file); when that
matches what is on disk, nothing is done.
"""

from __future__ import annotations

import json
from pathlib import Path

from .files import files_match, log, sha256_file, stable_int, write_jsonl_atomic, write_text_atomic
from .wheels import fetch_wheels

CHAT_PKG = ("chatterbot-corpus", "1.3.3")
SPECIALIZED = ("ai", "coding", "computers", "science", "tech_support")
VAL_EVERY = 5
PREFIX = "chatterbot_corpus/data/english/"
MANIFEST = "chat.json"


def read_dialogues(wheel: Path) -> dict[str, list[list[str]]]:
    """{topic (the file's stem): its dialogues, each a list of utterances as text}, topics in sorted order."""
    import zipfile

    import yaml

    out: dict[str, list[list[str]]] = {}
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(n for n in z.namelist() if n.startswith(PREFIX) and n.endswith(".yml")):
            data = yaml.safe_load(z.read(name).decode("utf-8")) or {}
            dialogues = [[str(u).strip() for u in d] for d in data.get("conversations") or [] if isinstance(d, list)]
            out[Path(name).stem] = [d for d in dialogues if len(d) >= 2 and all(d)]
    return out


def conversations(dialogues: dict[str, list[list[str]]]) -> list[dict]:
    """Every dialogue as a chat row, exact repeats (same turns, anywhere in the corpus) dropped, in corpus order."""
    seen, rows = set(), []
    for topic, items in dialogues.items():
        for d in items:
            messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": u} for i, u in enumerate(d)]
            key = json.dumps(messages, sort_keys=True)
            if key not in seen:
                seen.add(key)
                rows.append({"messages": messages, "topic": topic})
    return rows


def split(rows: list[dict]) -> dict[str, list[dict]]:
    """chat_train / chat_val (the SPECIALIZED topics, by a stable hash) and chat_general_val (the others)."""
    out: dict[str, list[dict]] = {"chat_train": [], "chat_val": [], "chat_general_val": []}
    for row in rows:
        if row["topic"] not in SPECIALIZED:
            out["chat_general_val"].append(row)
        elif stable_int("chat-demo", json.dumps(row["messages"], sort_keys=True)) % VAL_EVERY == 0:
            out["chat_val"].append(row)
        else:
            out["chat_train"].append(row)
    return out


def build_chat(out: Path, model_dir: Path, max_tokens: int = 256) -> dict:
    """Fetch the corpus, write the three files and chat.json (see the module docstring); returns chat.json."""
    out = Path(out)
    recorded = {}
    try:
        recorded = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        pass
    cache: dict = {}
    wheels = fetch_wheels(out, [CHAT_PKG], recorded.get("files", {}), cache)
    params = {"package": list(CHAT_PKG), "specialized": list(SPECIALIZED), "val_every": VAL_EVERY,
              "max_tokens": max_tokens, "model": str(model_dir)}
    if recorded.get("params") == params and files_match(out, recorded.get("files", {}), cache):
        log("chat data up to date")
        return recorded
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    rows = conversations(read_dialogues(out / wheels[CHAT_PKG[0]]["file"]))
    kept = [r for r in rows if len(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)
                                   ["input_ids"]) <= max_tokens]
    files, counts = {wheels[CHAT_PKG[0]]["file"]: wheels[CHAT_PKG[0]]["sha256"]}, {}
    for name, part in split(kept).items():
        path = out / "data" / f"{name}.jsonl"
        write_jsonl_atomic(path, part)
        files[path.relative_to(out).as_posix()] = sha256_file(path)
        counts[name] = {"conversations": len(part), "topics": sorted({r["topic"] for r in part})}
        log(f"{name:18s} {len(part):5d} conversations  {path}")
    manifest = {"params": params, "files": files, "counts": counts, "dialogues": len(rows),
                "too_long_dropped": len(rows) - len(kept), "licence": "BSD (chatterbot-corpus package metadata)"}
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest
