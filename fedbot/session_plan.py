"""The plan of a recording session, kept beside the dataset so that a session interrupted by a crash or
a reboot can be resumed for its remaining episodes.

`record_session` (fedbot/recording.py) writes the plan atomically into `DIR/.fedbot/recording-session.json`
when a session starts (episodes asked, first scene seed, task, and for `fedbot record --sim` its
operator and scenes), notes after each attempt how many are done, and removes it when the session ends
as planned. A session that ends otherwise (SIGKILL, power cut, `systemctl stop`, a hardware fault)
leaves it behind. Nothing resumes by itself: a robot that moved on its own after a reboot would surprise
whoever stands next to it, so the operator asks (`fedbot record --resume`), and `fedbot status` shows
what is left meanwhile. A new session replaces the plan of an interrupted one.

Progress is counted in attempts, as `--episodes` is. The note of an attempt is written after its episode
is committed, so a kill in between would repeat it; the episode's own note (its scene seed, committed
with it by fedbot/episode_store.py) settles that: an attempt whose seed the dataset holds since the
session started is done.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fedbot.atomic_files import write_json_atomic
from fedbot.dataset_curation import CURATION_DIR
from fedbot.episode_store import episode_notes
from fedbot.scenes import DEFAULT_TASK
from fedbot.typed_config import from_mapping, to_mapping

PLAN_FILE = "recording-session.json"


@dataclass
class SimSettings:
    """How `fedbot record --sim` drives the simulator, so that a resumed session drives it alike."""

    operator: str = "expert"
    style: str = "default"
    scene_part: int = 0
    scene_parts: int = 1


@dataclass
class SessionPlan:
    """One recording session as asked, and how far it got."""

    episodes: int  # attempts asked for
    seed_start: int  # attempt i records scene seed_start + i
    task: str = DEFAULT_TASK
    keep_failed: bool = False
    first_episode: int | None = None  # the dataset's episode count when the session started
    attempted: int = 0  # attempts finished (kept or not)
    sim: SimSettings | None = None

    @property
    def remaining(self) -> int:
        return self.episodes - self.attempted

    @property
    def next_seed(self) -> int:
        return self.seed_start + self.attempted

    def summary(self) -> dict:
        """What `fedbot status` shows of an interrupted session."""
        return {"episodes": self.episodes, "done": self.attempted, "left": self.remaining, "task": self.task}


def plan_path(root: Path) -> Path:
    return Path(root) / CURATION_DIR / PLAN_FILE


def save_plan(root: Path, plan: SessionPlan) -> None:
    write_json_atomic(plan_path(root), to_mapping(plan))


def clear_plan(root: Path) -> None:
    plan_path(root).unlink(missing_ok=True)


def interrupted_session(root: Path) -> SessionPlan | None:
    """The plan of the session at `root` that ended before its last attempt, with its progress
    reconciled with the episodes committed; None if there is none. A damaged plan file is a
    ValueError naming it."""
    path = plan_path(root)
    if not path.is_file():
        return None
    try:
        plan = from_mapping(SessionPlan, json.loads(path.read_text()), str(path))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is damaged ({error}); remove it to start afresh") from None
    if plan.first_episode is not None:
        seeds = range(plan.next_seed, plan.seed_start + plan.episodes)
        committed = [
            note["seed"]
            for index, note in episode_notes(root).items()
            if index >= plan.first_episode and note.get("seed") in seeds
        ]
        if committed:
            plan.attempted = max(committed) - plan.seed_start + 1
    return plan if plan.remaining > 0 else None
