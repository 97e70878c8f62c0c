"""The models that failed at run time on this robot, kept in a ledger so that none is taken again.

`<model-dir>/failed-at-run-time.json` lists them, oldest first: the model's name, its content (a sha256
over the signed manifest's file digests: weights, config and processor statistics, since a model whose
weights are fine can still fail by its statistics), the reason, when, and the model rolled back to.
A model that arrives with the same name or the same content is refused, and none in the ledger goes
live again (agent/model_updates.py). The ledger is written, atomically, before the model is moved or
the history changed, so the mark holds whatever happens after it. It keeps the newest KEEP_FAILED.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from fedbot.atomic_files import write_bytes_atomic

LEDGER = "failed-at-run-time.json"
KEEP_FAILED = 1000  # entries; each is a few hundred bytes


def content_id(manifest: dict) -> str | None:
    """The sha256 of a verified manifest's file list (None for a manifest without one)."""
    files = manifest.get("files")
    if not isinstance(files, dict):
        return None
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


class FailedModels:
    """The ledger of models that failed at run time (see the module docstring)."""

    def __init__(self, model_dir: Path):
        self.path = Path(model_dir) / LEDGER

    def entries(self) -> list[dict]:
        """The failed models, oldest first."""
        if not self.path.is_file():
            return []
        try:
            entries = json.loads(self.path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{self.path} is not a JSON list ({error}); restore it or remove it") from None
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "model" in e for e in entries):
            raise ValueError(f"{self.path} is not a JSON list of failed models; restore it or remove it")
        return entries

    def record(self, name: str, manifest: dict, reason: str, when: float, rolled_back_to: str | None) -> dict:
        """Add model `name` (with its verified `manifest`, or {} if it is gone), failed at `when`
        (time.time()), to the ledger."""
        entry = {
            "model": name,
            "content": content_id(manifest),
            "reason": reason,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(when)),
            "rolled-back-to": rolled_back_to,
        }
        entries = (self.entries() + [entry])[-KEEP_FAILED:]
        write_bytes_atomic(self.path, json.dumps(entries, indent=2).encode())
        return entry

    def find(self, name: str, manifest: dict) -> dict | None:
        """The newest entry for a model of this name or this content (None: it never failed here)."""
        content = content_id(manifest)
        for entry in reversed(self.entries()):
            if entry["model"] == name or (content is not None and entry.get("content") == content):
                return entry
        return None

    def last(self) -> dict | None:
        entries = self.entries()
        return entries[-1] if entries else None
