"""Shared test helpers: a cheap stand-in operator and a small recorded dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from lerobot.utils.constants import ACTION

from fedbot.recording import RecordingReport, record_session
from fedbot.session_plan import SessionPlan
from hardware.pusht_sim import PushTSim, PushTSimConfig


class WanderOperator:
    """A person fidgeting near the agent: deterministic small random steps (cheap, no planning)."""

    realtime = False

    def __init__(self, seed: int = 0):
        self._rng = np.random.default_rng(seed)
        self._robot: PushTSim | None = None

    def connect(self) -> None:
        pass

    def disconnect(self) -> None:
        pass

    def attach(self, robot: PushTSim) -> None:
        self._robot = robot

    def start_episode(self) -> None:
        pass

    def get_action(self) -> dict:
        target = np.asarray(self._robot.env.agent.position) + self._rng.normal(0.0, 15.0, 2)
        return {ACTION: np.clip(target, 0, 512).astype(np.float32)}


def record_wander(root: Path, episodes: int, steps: int = 20, seed_start: int = 0) -> int:
    """Record `episodes` short kept episodes into `root`; returns the dataset's episode count."""
    return wander_session(root, SessionPlan(episodes, seed_start, keep_failed=True), steps).total_episodes


def wander_session(root: Path, plan: SessionPlan, steps: int = 20) -> RecordingReport:
    """A recording session of `plan` (new or resumed) with the wander operator, `steps` frames an episode."""
    robot = PushTSim(PushTSimConfig(id="test", max_episode_steps=steps))
    robot.connect()
    try:
        return record_session(robot, WanderOperator(plan.next_seed), root, plan)
    finally:
        robot.disconnect()


def deliver_model(
    policy_dir: Path,
    inbox: Path,
    name: str,
    key: Path,
    round_number: int = 1,
    edit=None,
    tamper=None,
    run: str | None = None,
) -> Path:
    """Put a copy of a saved policy into a model inbox the way a deploy does: signed with the private
    key at `key` (a manifest of every file's sha256), written under a hidden name and renamed into
    place. `edit(directory)` changes the copy before it is signed (a bad model its signer vouches
    for); `tamper(directory)` after (an attacker's change on the way). `run`: the coordinator run it
    comes from (with the round, its global version)."""
    import os
    import shutil

    from fedbot.model_manifest import load_private_key, sign_model_dir

    inbox.mkdir(parents=True, exist_ok=True)
    staging = inbox / f".incoming-{name}"
    shutil.copytree(policy_dir, staging)
    if edit is not None:
        edit(staging)
    fields = {"round": round_number, "created": "2026-01-01T00:00:00", **({"run": run} if run else {})}
    sign_model_dir(staging, load_private_key(key), fields)
    if tamper is not None:
        tamper(staging)
    os.rename(staging, inbox / name)
    return inbox / name


def public_key_line(key: Path) -> str:
    """The trusted-keys line of the private key at `key` (its .pub file, as the key was made)."""
    return key.with_name(key.name + ".pub").read_text().strip()


def assert_replies_hold_no_data(run_dir: Path, dataset_root: Path, evaluation: bool) -> None:
    """Every reply, as the coordinator received it (replies.jsonl), holds only weights, summaries
    and metrics: never observations or actions. `evaluation`: robots were asked to evaluate."""
    import json

    from fedbot.presets import get_preset
    from fedbot.training import new_policy, open_dataset
    from fedbot.transfer import update_key

    dataset = open_dataset(dataset_root)
    policy = new_policy(get_preset("pusht-state"), dataset, device="cpu").policy
    update = {update_key(policy): [sum(p.numel() for p in policy.parameters() if p.requires_grad)]}
    kinds = {}
    for line in (run_dir / "replies.jsonl").read_text().splitlines():
        reply = json.loads(line)
        what, content = reply["what"].split(" ")[-1], reply["content"]
        kinds.setdefault(what, set()).add(tuple(sorted(content)))
        for name, record in content.items():
            if record["kind"] == "arrays" and name == "arrays":
                assert {k: a["shape"] for k, a in record["arrays"].items()} == update
            elif record["kind"] == "arrays":
                assert name == "stats"
                for key, array in record["arrays"].items():
                    feature, stat = key.split("::")
                    assert stat in ("count", "mean", "std", "min", "max")
                    shape = dataset.meta.features[feature]["shape"]
                    assert array["shape"] == ([1] if stat == "count" else list(shape))
            else:
                assert record["kind"] in ("MetricRecord", "ConfigRecord")
                assert set(record["values"].values()) <= {"int", "float", "str"}
    expected = {"statistics": {("info", "stats")}, "training": {("arrays", "metrics")}, "deploy": {("deployed",)}}
    assert kinds == ({**expected, "evaluation": {("metrics",)}} if evaluation else expected)
