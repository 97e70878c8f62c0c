"""A run's place in the fleet's history: what the robots hold and recorded, and what the run starts from.

Every run begins with a census of the robots connected (their answers to `query.stats`). With the
fleet's latest published model (coordinator/registry.py `latest_published`) it decides:
- which robots lack that model (they were off, recording or out of range when it was deployed):
  they are sent it at once, through the same signed, checked inbox path as any deploy;
- how many episodes the robots recorded since that model's run: a run with fewer than the run
  config's `min-new-episodes` ends without training;
- whether the run starts from that model (warm start: same preset and features) or fresh weights.
The registry keeps the lineage: the parent model, each robot's data at the start, the features.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from coordinator.registry import Published
from fedbot.model_manifest import model_version


@dataclass(frozen=True)
class RobotCensus:
    """One robot at a run's start, as its stats reply describes it."""

    node: int
    episodes: int
    frames: int
    newest_model: tuple[str, int] | None  # the newest global version it holds, in any state
    live_model: tuple[str, int] | None  # the version its controller runs (an agent's robot)

    @classmethod
    def of(cls, node: int, info) -> RobotCensus:
        """From a stats reply's info; the robot's claims about its models are bounded and typed here."""
        try:
            models = json.loads(str(info.get("models", "{}"))[:1000])
        except ValueError:
            models = {}
        models = models if isinstance(models, dict) else {}
        return cls(
            node,
            int(info["episodes"]),
            int(info["frames"]),
            _version(models.get("newest")),
            _version(models.get("live")),
        )


def _version(value) -> tuple[str, int] | None:
    if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int):
        return value[0][:64], value[1]
    return None


def lacking(robots: dict[str, RobotCensus], published: Published) -> list[int]:
    """The nodes of robots that hold nothing as new as the published model."""
    version = model_version(published.manifest)
    return [r.node for r in robots.values() if version is not None and (r.newest_model or ("", -1)) < version]


def new_episodes(robots: dict[str, RobotCensus], parent: Published | None) -> int:
    """Episodes the robots recorded since the parent model's run started (all of them without one;
    a robot that dropped episodes counts zero, not less)."""
    before = (parent.lineage.get("robots") or {}) if parent else {}
    return sum(max(0, robot.episodes - before.get(name, {}).get("episodes", 0)) for name, robot in robots.items())


def warm_start_from(parent: Published | None, features: dict) -> bool:
    """Whether a run with these features can start from the parent model: same features (the preset
    is already the same, see `latest_published`)."""
    return parent is not None and parent.lineage.get("features") == json.loads(json.dumps(features))


def lineage(parent: Published | None, started_from_parent: bool, robots: dict[str, RobotCensus], features: dict):
    """The registry's record of where a run comes from."""
    return {
        "parent": None
        if parent is None
        else {
            "run": parent.manifest.get("run"),
            "round": parent.manifest.get("round"),
            "sha256": parent.manifest.get("sha256"),
            "started-from": started_from_parent,
        },
        "robots": {name: asdict(robot) for name, robot in robots.items()},
        "features": json.loads(json.dumps(features)),
    }
