"""The robot's models on disk: the checks a new model must pass, and the store of checked models.

    <model-dir>/inbox/<name>/      deployed models land here (agent/inbox.py writes them atomically)
    <model-dir>/store/<name>/      models that passed every check
    <model-dir>/store/history.json the models that went live, oldest first; the last one is live
    <model-dir>/rejected/<name>/   models that failed, with reason.txt
    <model-dir>/failed-at-run-time.json  models that failed at run time, never taken again (agent/failed_models.py)

A model becomes live only through `history.json`, written atomically after the model passed its
checks and was swapped in; a model half-written or half-checked when the agent dies is never in it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.failed_models import FailedModels
from fedbot.atomic_files import fsync_dir, write_bytes_atomic
from fedbot.evaluation import evaluate
from fedbot.model_manifest import (
    MANIFEST,
    ModelNotTrusted,
    claimed_version,
    model_version,
    parse_public_key,
    verify_model_dir,
)
from fedbot.policy_io import LoadedPolicy, load_policy
from fedbot.scenes import EVAL_SEED_START

log = logging.getLogger("fedbot.agent.models")
HISTORY = "history.json"
REASON = "reason.txt"
KEEP_REJECTED = 20
GATE_SEED_START = EVAL_SEED_START + 50_000  # the sim gate's own held-out scenes


class ModelRejected(Exception):
    """A model that must not go live; the message says why."""


@dataclass(frozen=True)
class CheckRules:
    trusted_keys: tuple[Ed25519PublicKey, ...] = ()  # whose signature a model must carry
    sim_gate_episodes: int = 0  # 0: no simulator gate
    sim_gate_tolerance: float = 0.1
    device: str | None = None

    @classmethod
    def of(cls, checks, device: str | None) -> CheckRules:
        """The rules of an agent config's [checks] section."""
        keys = tuple(parse_public_key(line) for line in checks.trusted_keys)
        return cls(keys, checks.sim_gate_episodes, checks.sim_gate_tolerance, device)


def read_manifest(model: Path) -> dict:
    """The manifest of a model the agent verified when it accepted it (for status and listings)."""
    try:
        manifest = json.loads((model / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def check_model(
    model: Path, robot_features: dict[str, tuple], rules: CheckRules, live: Path | None = None
) -> LoadedPolicy:
    """Load `model` if it passes every check, in this order: signed by a trusted key with every file
    as signed (before anything in it is parsed), not an older global version than the `live` model
    (going back is an operator's rollback, which passes no `live`), then loaded without importing
    anything it names, strictly, all weights finite, inputs and action matching this robot. Raises
    ModelRejected."""
    if not rules.trusted_keys:
        raise ModelRejected("this robot trusts no signing key ([checks] trusted-keys): no model can go live")
    try:
        manifest = verify_model_dir(model, list(rules.trusted_keys))
    except ModelNotTrusted as why:
        raise ModelRejected(f"not trusted: {why}") from None
    version, live_version = model_version(manifest), model_version(read_manifest(live)) if live else None
    if version is not None and live_version is not None and version <= live_version:
        raise ModelRejected(
            f"version {version[0]} round {version[1]} is not newer than the live model's "
            f"({live_version[0]} round {live_version[1]}); an operator goes back with `fedbot rollback`"
        )
    try:
        loaded = load_policy(model, rules.device)
    except Exception as error:  # noqa: BLE001  any failure to load is a reason to reject, with its text
        raise ModelRejected(f"does not load: {type(error).__name__}: {str(error)[:500]}") from None
    bad = [name for name, tensor in loaded.policy.state_dict().items() if not torch.isfinite(tensor).all()]
    if bad:
        raise ModelRejected(f"{len(bad)} weight tensors hold NaN or inf (first: {bad[0]})")
    mismatch = feature_mismatch(loaded, robot_features)
    if mismatch:
        raise ModelRejected(f"does not fit this robot: {mismatch}")
    return loaded


def feature_mismatch(loaded: LoadedPolicy, robot_features: dict[str, tuple]) -> str | None:
    """Why the policy's inputs or output do not match the robot's features (None if they do).
    Images are HWC on the robot and CHW in the policy."""
    config = loaded.policy.config
    wanted = {**config.input_features, **config.output_features}
    for key, feature in wanted.items():
        shape = tuple(feature.shape)
        have = robot_features.get(key)
        if have is None:
            return f"the policy needs {key!r}, the robot has no such feature"
        have = tuple(have)
        if len(have) == 3:
            have = (have[2], have[0], have[1])
        if have != shape:
            return f"{key!r} has shape {have} on the robot, {shape} in the policy"
    return None


def sim_gate_success(loaded: LoadedPolicy, episodes: int) -> float:
    return evaluate(loaded, episodes, seed_start=GATE_SEED_START, policy_name="sim gate").success_rate


def read_history(store: Path) -> list[str]:
    """The names of the models that went live, oldest first (<store>/history.json; none: [])."""
    path = Path(store) / HISTORY
    if not path.is_file():
        return []
    try:
        history = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a JSON list of model names ({error}); restore it or remove it") from None
    if not isinstance(history, list) or not all(isinstance(name, str) for name in history):
        raise ValueError(f"{path} is not a JSON list of model names; restore it or remove it")
    return history


def versions_held(inbox: Path) -> dict:
    """The global model versions a robot holds, from the manifests' claims: `newest` in any state
    (waiting in the inbox, kept, rejected), which the coordinator compares with its latest published
    model, and `live`, for its status. An agent's inbox is <model-dir>/inbox, beside its kept and
    rejected models; a bare SuperNode has its inbox only. Creates nothing."""
    inbox = Path(inbox)
    agent_layout = inbox.name == "inbox"
    areas = [inbox, *((inbox.parent / "store", inbox.parent / "rejected") if agent_layout else ())]
    directories = [p for area in areas if area.is_dir() for p in area.iterdir() if p.is_dir()]
    try:
        history = read_history(inbox.parent / "store") if agent_layout else []
    except (OSError, ValueError):
        history = []  # the agent reports a damaged history itself
    live = claimed_version(inbox.parent / "store" / history[-1]) if history else None
    return {"newest": max(filter(None, map(claimed_version, directories)), default=None), "live": live}


class ModelStore:
    """The inbox, the checked models, the live one and the rejected ones of one robot."""

    def __init__(self, model_dir: Path, keep: int):
        self.inbox = Path(model_dir) / "inbox"
        self.store = Path(model_dir) / "store"
        self.rejected = Path(model_dir) / "rejected"
        self.keep = keep
        self.failed = FailedModels(model_dir)
        for directory in (self.inbox, self.store, self.rejected):
            directory.mkdir(parents=True, exist_ok=True)
        for leftover in self.store.glob(".*"):  # an accept or history write cut short
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()

    # -- the inbox --------------------------------------------------------------------------------
    def pending(self) -> list[Path]:
        """Complete models waiting in the inbox, oldest first (hidden names are still being written)."""
        models = [p for p in self.inbox.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return sorted(models, key=lambda p: p.stat().st_mtime)

    def accept(self, model: Path) -> Path:
        """Move a checked model from the inbox into the store (not yet live)."""
        target = self.store / model.name
        if target.exists():
            shutil.rmtree(model)
            return target
        os.rename(model, target)
        return target

    def unaccept(self, model: Path) -> None:
        """Put a model accepted into the store but not made live back into the inbox."""
        if model.name not in self.history() and model.is_dir():
            os.rename(model, self.inbox / model.name)

    def reject(self, model: Path, reason: str) -> None:
        # The reason is written while the model is still in the inbox: if the disk is full or read-only,
        # the model stays there (and is checked again later) instead of being rejected without a reason.
        (model / REASON).write_text(reason + "\n")
        target = self.rejected / model.name
        shutil.rmtree(target, ignore_errors=True)
        os.rename(model, target)
        for old in self.rejections()[KEEP_REJECTED:]:
            shutil.rmtree(self.rejected / old["name"], ignore_errors=True)

    def rejections(self) -> list[dict]:
        """Rejected models, newest first, with the reason."""
        entries = sorted(self.rejected.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
        return [
            {"name": p.name, "reason": (p / REASON).read_text().strip() if (p / REASON).is_file() else "?"}
            for p in entries
            if p.is_dir()
        ]

    # -- live model and history -------------------------------------------------------------------
    def history(self) -> list[str]:
        return read_history(self.store)

    def live(self) -> Path | None:
        history = self.history()
        return self.store / history[-1] if history else None

    def previous(self) -> Path | None:
        """The model that was live before the live one (the target of a rollback)."""
        history = self.history()
        return self.store / history[-2] if len(history) >= 2 else None

    def went_live(self, model: Path) -> None:
        """Record that `model` (in the store) is now live; forget models beyond `keep`."""
        self.commit_history(self.stage_live(model.name))

    def rolled_back(self) -> None:
        """Record that the previous model is live again."""
        self.commit_history(self.stage_rollback())

    def stage_live(self, name: str) -> Path:
        """The history with model `name` live (the oldest beyond `keep` dropped), written beside the
        current one and not yet in effect (`commit_history`). A full disk or a read-only store fails
        here, before the model is moved or swapped in."""
        history = [entry for entry in self.history() if entry != name] + [name]
        return self._stage_history(history[-self.keep :])

    def stage_rollback(self) -> Path:
        """The history with the previous model live again, staged like `stage_live`."""
        return self._stage_history(self.history()[:-1])

    def stage_without(self, name: str) -> Path:
        """The history without model `name` (the one before it live again if it was live), staged like
        `stage_live`."""
        return self._stage_history([entry for entry in self.history() if entry != name])

    def _stage_history(self, history: list[str]) -> Path:
        staged = self.store / f".{HISTORY}.next"  # a leftover is removed at the next start
        write_bytes_atomic(staged, json.dumps(history, indent=2).encode())
        return staged

    def commit_history(self, staged: Path) -> None:
        """Put the staged history in effect (a rename: it needs no space), then forget the models
        it no longer lists."""
        os.replace(staged, self.store / HISTORY)
        fsync_dir(self.store)
        history = self.history()
        for model in self.store.iterdir():
            if model.is_dir() and model.name not in history and not model.name.startswith("."):
                shutil.rmtree(model)

    def models(self) -> list[dict]:
        """The kept models, newest first: name, round, sha256, and whether it is live."""
        history = self.history()
        rows = []
        for name in reversed(history):
            manifest = read_manifest(self.store / name)
            rows.append(
                {
                    "name": name,
                    "round": manifest.get("round"),
                    "sha256": manifest["sha256"],
                    "live": name == history[-1],
                }
            )
        return rows
