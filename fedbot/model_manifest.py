"""What identifies a published model directory: its manifest file and the sha256 of its files.

The coordinator writes `manifest.json` beside a saved policy (coordinator/registry.py); a robot's
inbox and model store check a delivered directory against it (agent/inbox.py, agent/model_store.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
