"""Files that are either wholly written or not there: write a temporary file, fsync, rename.

Manifests, registries, state files, keys and the optimizer state a robot keeps between rounds go
through here, so a crash at any moment leaves the previous version readable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_bytes_atomic(path: Path, data: bytes, private: bool = False) -> None:
    """Replace `path` with `data` (mode 0600 when `private`, else 0644)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: dict) -> None:
    write_bytes_atomic(path, json.dumps(data, indent=2).encode())
