"""The robot's model inbox: where deployed models land, complete or not at all.

The ClientApp's deploy handler writes the files it received here byte for byte, under a hidden
name, fsynced, then renamed into place. It parses none of them: whether the model is trusted
(signature, hashes) and fits the robot is decided by the agent before the model goes live.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

from fedbot.atomic_files import publish_dir
from fedbot.model_manifest import MANIFEST, MAX_FILES

SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")  # no paths, no hidden files


def write_to_inbox(inbox: Path, server_round: int, files: dict[str, bytes]) -> Path:
    """Write a delivered model's files as `<inbox>/round_<N>-<manifest digest>/`, atomically. Refuses
    file names that are not plain names (a path, a hidden file) before anything is written."""
    bad = [name for name in files if not SAFE_NAME.fullmatch(name) or ".." in name]
    if bad or not 0 < len(files) <= MAX_FILES or MANIFEST not in files:
        raise ValueError(
            f"a delivered model must be up to {MAX_FILES} plain file names with {MANIFEST}; got {bad or len(files)}"
        )
    inbox.mkdir(parents=True, exist_ok=True)
    name = f"round_{int(server_round):04d}-{hashlib.sha256(files[MANIFEST]).hexdigest()[:12]}"
    final = inbox / name
    if final.exists():
        return final
    tmp = inbox / f".incoming-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for file_name, data in files.items():
        (tmp / file_name).write_bytes(data)
    publish_dir(tmp, final)
    return final
