"""The unit of the demo corpora: one document with its family (licence family or BBC topic)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

CountTokens = Callable[[str], int]


@dataclass
class Doc:
    id: str
    text: str
    family: str
    n_tokens: int = 0
    english: bool = True

    def record(self) -> dict:
        """The jsonl line of the document (``family`` is the topic for BBC)."""
        return {"text": self.text, "id": self.id, "family": self.family}
