"""Files, directories and links that are either wholly written or not there: write a temporary,
fsync it, rename it into place, fsync the directory.

Manifests, registries, state files, keys, saved policies, checkpoints, dataset versions and the
optimizer state a robot keeps between rounds go through here, so a crash at any moment leaves the
previous version readable.
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


def publish_dir(tmp: Path, directory: Path) -> None:
    """Make the complete directory `tmp` appear at the new path `directory`, fsynced."""
    fsync_tree(tmp)
    os.rename(tmp, directory)
    fsync_dir(Path(directory).parent)


def point_link(link: Path, target_name: str) -> None:
    """Make the symlink `link` point at `target_name` (a sibling) in one atomic step."""
    link = Path(link)
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target_name)
    os.replace(tmp, link)
    fsync_dir(link.parent)


def fsync_tree(top: Path) -> None:
    """fsync every file and directory under `top`."""
    for dirpath, _, filenames in os.walk(top):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
