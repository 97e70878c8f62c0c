"""Which episodes each training run used: a bounded, append-only log beside the dataset.

`fedbot train` notes one line each time it starts on a dataset, the ClientApp one line per federated
round, in `DIR/.fedbot/training-log.jsonl`: {"run": ..., "round": ..., "episodes": "0-41,43-50",
"time": ...}. Episodes are written as ranges, so a line stays short however many episodes there are
(a dropped episode is one gap). The log keeps its newest MAX_ENTRIES lines (fedbot/retention.py).
`fedbot dataset show` reads it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from fedbot.dataset_curation import CURATION_DIR, locked
from fedbot.retention import append_line

LOG_FILE = "training-log.jsonl"
MAX_ENTRIES = 1000  # lines kept (a line is ~100 bytes for one round)


def note_use(root: Path, run: str, episodes: list[int], **fields) -> None:
    """Append that `run` trained on `episodes` of the dataset at `root` (with `fields`, e.g. the round)."""
    entry = {"run": run, **fields, "episodes": to_ranges(episodes), "time": round(time.time(), 3)}
    with locked(root) as directory:
        append_line(directory / LOG_FILE, entry, MAX_ENTRIES)


def uses(root: Path) -> list[dict]:
    """The log's entries, oldest first, each with its episodes as a list of indices."""
    path = Path(root) / CURATION_DIR / LOG_FILE
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
            entry["episodes"] = from_ranges(entry["episodes"])
        except (ValueError, KeyError, TypeError):  # a line cut short by a crash while it was written
            continue
        entries.append(entry)
    return entries


def to_ranges(indices: list[int]) -> str:
    """[0, 1, 2, 4, 7, 8] -> "0-2,4,7-8"."""
    parts: list[str] = []
    ordered = sorted(set(indices))
    start = 0
    for i, index in enumerate(ordered):
        if i + 1 == len(ordered) or ordered[i + 1] != index + 1:
            first = ordered[start]
            parts.append(str(index) if first == index else f"{first}-{index}")
            start = i + 1
    return ",".join(parts)


def from_ranges(text: str) -> list[int]:
    """The indices of `to_ranges` text: "0-2,4,7-8" -> [0, 1, 2, 4, 7, 8]."""
    indices: list[int] = []
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        indices.extend(range(int(first), int(last or first) + 1))
    return indices
