"""What happens to a document longer than a row where documents are packed whole (--long-rows).

A conversation or a prompt-completion row that renders to more tokens than --seq-len cannot be packed whole. The
policy decides:

- "drop": it is left out and counted; the rest goes on (axolotl's behaviour).
- "truncate": a conversation keeps its longest prefix of whole turns that fits and ends after a complete assistant
  turn (chat.fit_conversation), so no answer is trained without its end; one whose first exchange does not fit is
  dropped. A prompt-completion row is dropped (cutting it would cut its completion).
- "refuse": the whole source is refused, naming the row.

Under --packing concat nothing is too long (a document continues in the next row), and the policy does not apply;
nor does it to plain text under --packing document, whose long documents are cut into row-sized windows, every
token kept (SPLIT, rows/windows.py).
`LongRows` counts what a policy did to one source; `record()` is what a cache's manifest keeps of it
(data.long_rows, docs/FORMAT.md).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

LONG_ROWS = ("drop", "truncate", "refuse")
DEFAULT_LONG_ROWS = "drop"
SPLIT = "split"  # what becomes of a text document longer than a row under --packing document: windows (rows/windows.py)
FIRST = 5  # the rows dropped (or cut) whose indices are kept and named: the first FIRST of each


@dataclass
class LongRows:
    """What `policy` did to the documents of one source that were longer than a row: how many were dropped and how
    many cut, with the index (from 0, in reading order, among the source's non-empty documents) and the place of the
    first FIRST of each."""

    policy: str
    dropped: int = 0
    truncated: int = 0
    first_dropped: list[int] = field(default_factory=list)
    first_truncated: list[int] = field(default_factory=list)
    places: list[str] = field(default_factory=list)  # where the first ones were read, for the warning

    def __post_init__(self):
        if self.policy not in LONG_ROWS:
            raise ValueError(f"--long-rows must be one of {LONG_ROWS}; got {self.policy!r}")

    def drop(self, index: int, where: str) -> None:
        self.dropped += 1
        if len(self.first_dropped) < FIRST:
            self.first_dropped.append(index)
            self.places.append(f"{where} (dropped)")

    def cut(self, index: int, where: str) -> None:
        self.truncated += 1
        if len(self.first_truncated) < FIRST:
            self.first_truncated.append(index)
            self.places.append(f"{where} (cut)")

    def record(self) -> dict:
        """The manifest's data.long_rows."""
        return {"policy": self.policy, "dropped": self.dropped, "first_dropped": list(self.first_dropped),
                "truncated": self.truncated, "first_truncated": list(self.first_truncated)}

    def warn(self, source: str, seq_len: int) -> None:
        """A warning naming the source, the counts and the first rows, where any row was dropped or cut."""
        if not (self.dropped or self.truncated):
            return
        done = " and ".join(f"{n:,} {what}" for n, what in ((self.dropped, "dropped"), (self.truncated, "cut"))
                            if n)
        log.warning("%s: %s rows longer than a row (--seq-len %d): %s (--long-rows %s); the first: %s", source,
                    f"{self.dropped + self.truncated:,}", seq_len, done, self.policy, "; ".join(self.places))
