"""The robot's model inbox: where deployed global models land, complete or not at all."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from fedbot.atomic_files import publish_dir
from fedbot.model_manifest import MANIFEST, WEIGHTS, sha256_file
from fedbot.policy_io import LoadedPolicy, save_policy


def write_to_inbox(inbox: Path, loaded: LoadedPolicy, manifest: dict) -> Path:
    """Save the policy and its manifest as `<inbox>/<name>/`: written in a hidden directory,
    checked against the manifest's sha256, fsynced, then renamed into place."""
    inbox.mkdir(parents=True, exist_ok=True)
    name = f"round_{manifest['round']:04d}-{manifest['sha256'][:12]}"
    final = inbox / name
    if final.exists():
        return final
    tmp = inbox / f".incoming-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_policy(tmp, loaded)
    digest = sha256_file(tmp / WEIGHTS)
    if digest != manifest["sha256"]:
        shutil.rmtree(tmp)
        raise ValueError(f"weights written for {name} hash to {digest}, manifest says {manifest['sha256']}")
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    publish_dir(tmp, final)
    return final
