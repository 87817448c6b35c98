"""The chat demo's data (demo/chat.py) on a wheel made here: dialogues read by topic, turns alternating from the
user, exact repeats dropped, the specialized topics split by a stable hash and the others held out."""
from __future__ import annotations

import json
import zipfile

from demo.chat import PREFIX, SPECIALIZED, conversations, read_dialogues, split
from mft_cache.rows.documents import DocumentStream


def fake_wheel(path):
    files = {
        "coding.yml": "categories:\n- coding\nconversations:\n- - What is Python?\n  - A language.\n  - Which one?\n"
                      "- - What is Python?\n  - A language.\n  - Which one?\n- - Say 42\n  - 42\n",
        "food.yml": "categories:\n- food\nconversations:\n- - Do you eat?\n  - I run on electricity.\n- - lonely\n",
    }
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(PREFIX + name, text)
        z.writestr("chatterbot_corpus/data/french/food.yml", "conversations:\n- - Bonjour\n  - Salut\n")
    return path


def test_dialogues_become_conversations_without_repeats(tmp_path):
    dialogues = read_dialogues(fake_wheel(tmp_path / "c.whl"))
    assert list(dialogues) == ["coding", "food"]  # english only, sorted; a one-utterance dialogue is no dialogue
    assert dialogues["coding"][2] == ["Say 42", "42"]  # numbers read as text
    rows = conversations(dialogues)
    assert len(rows) == 3  # the repeated coding dialogue once
    assert [m["role"] for m in rows[0]["messages"]] == ["user", "assistant", "user"]
    assert "coding" in SPECIALIZED and "food" not in SPECIALIZED
    parts = split(rows)
    assert [r["topic"] for r in parts["chat_general_val"]] == ["food"]
    assert len(parts["chat_train"]) + len(parts["chat_val"]) == 2
    assert split(rows) == parts  # stable
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stream = DocumentStream(path, data_format="auto")
    assert [r.fields for r in stream] == [{"messages": r["messages"]} for r in rows] and stream.format == "chat"
