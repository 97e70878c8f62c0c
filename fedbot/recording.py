"""Teleoperated recording: robot + operator -> episodes committed to a crash-safe LeRobot dataset.

The loop knows only lerobot's Robot and Teleoperator interfaces plus two bench duties a person does
on real hardware and the sim does itself: placing the scene (`robot.reset(seed)`) and judging the
outcome (`robot.episode_status()`).

A session's plan is kept beside the dataset until it ends as planned, so that one interrupted by a
crash or a reboot can be resumed for its remaining episodes (fedbot/session_plan.py).

A session can be stopped from another thread (`stop`, an Event: the agent's SIGTERM): the episode in
progress is discarded at the next frame and `RecordingStopped` is raised.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from lerobot.robots.robot import Robot
from lerobot.teleoperators.teleoperator import Teleoperator
from lerobot.utils.robot_utils import precise_sleep

from fedbot.episode_store import EpisodeStore
from fedbot.scenes import DEFAULT_TASK, EVAL_SEED_START
from fedbot.session_plan import SessionPlan, clear_plan, interrupted_session, save_plan

log = logging.getLogger(__name__)


def dataset_features(robot: Robot) -> dict[str, dict]:
    """LeRobot dataset features for a robot whose features are named by dataset key."""
    features = {}
    names = getattr(robot, "feature_names", {})  # e.g. joint names of an arm's state and action
    for key, shape in {**robot.observation_features, **robot.action_features}.items():
        if len(shape) == 3:
            features[key] = {"dtype": "video", "shape": shape, "names": ["height", "width", "channels"]}
        else:
            features[key] = {"dtype": "float32", "shape": shape, "names": names.get(key)}
    return features


def open_store(root: Path, robot: Robot) -> EpisodeStore:
    return EpisodeStore(
        root,
        repo_id=f"fedbot/{Path(root).name}",
        fps=robot.config.fps,
        features=dataset_features(robot),
        robot_type=robot.name,
    )


class RecordingStopped(Exception):
    """The session was stopped (`stop` was set); the episode in progress was discarded."""


@dataclass
class RecordingReport:
    """What one recording session produced."""

    attempted: int = 0
    kept: int = 0
    successes: int = 0
    total_episodes: int = 0
    coverages: list[float] = field(default_factory=list)


def check_recording_seeds(seed_start: int, episodes: int) -> None:
    if seed_start < 0 or seed_start + episodes > EVAL_SEED_START:
        raise ValueError(
            f"recording seeds must lie in [0, {EVAL_SEED_START}) (seeds from {EVAL_SEED_START} on are "
            f"held out for evaluation); got {seed_start}..{seed_start + episodes - 1}"
        )


def record_episodes(
    robot: Robot,
    operator: Teleoperator,
    store: EpisodeStore,
    *,
    episodes: int,
    seed_start: int,
    task: str = DEFAULT_TASK,
    keep_failed: bool = False,
    realtime: bool = False,
    on_episode=None,
    stop: threading.Event | None = None,
) -> RecordingReport:
    """Record `episodes` attempts on seeds seed_start, seed_start+1, ...

    Each successful attempt (every attempt with `keep_failed`) is committed before the next starts,
    so a crash loses at most the attempt in progress. `realtime` paces the loop at the robot's fps
    (needed when a person operates); the scripted operator runs as fast as the CPU allows. Between
    attempts the operator keeps driving the robot, unrecorded, for the robot's `reset_seconds`, to
    put the scene back (as lerobot-record's reset phase; the simulator needs none).
    """
    check_recording_seeds(seed_start, episodes)
    stop = stop or threading.Event()
    report = RecordingReport(total_episodes=store.num_episodes)
    period = 1.0 / robot.config.fps
    for seed in range(seed_start, seed_start + episodes):
        if seed > seed_start and robot.config.reset_seconds > 0:
            _drive_unrecorded(robot, operator, robot.config.reset_seconds, period, stop)
        if stop.is_set():
            raise RecordingStopped(f"stopped after {report.attempted} of {episodes} episodes")
        robot.reset(seed)
        operator.start_episode()
        dataset = store.begin_episode()
        try:
            status = _record_episode(
                robot, operator, dataset, task, period if realtime else None, stop, store.check_frames
            )
        except BaseException:
            store.discard_episode()  # a device fault or an interrupt: the attempt in progress is lost
            raise
        report.attempted += 1
        report.successes += bool(status.success)
        report.coverages.append(status.coverage)
        if status.success is not False or keep_failed:  # None: nobody judged it (a real bench)
            report.total_episodes = store.commit_episode(seed=seed)
            report.kept += 1
        else:
            store.discard_episode()
            log.info("seed %d: demonstration failed (coverage %.2f), not kept", seed, status.coverage)
        if on_episode is not None:
            on_episode(seed, status)
    return report


def record_session(
    robot: Robot,
    operator: Teleoperator,
    root: Path,
    plan: SessionPlan,
    *,
    on_episode=None,
    stop: threading.Event | None = None,
) -> RecordingReport:
    """A teleop session on a connected robot, new or resumed (`plan.attempted` > 0): the operator
    connects (a sim operator also attaches to the robot whose scene it reads), the robot's dataset at
    `root` opens, the plan's remaining episodes are recorded (`record_episodes`), and dataset and
    operator are closed again however the session ends. The plan is kept beside the dataset until the
    session ends as planned (fedbot/session_plan.py), so one that does not can be resumed."""
    check_recording_seeds(plan.seed_start, plan.episodes)
    operator.connect()
    try:
        if hasattr(operator, "attach"):
            operator.attach(robot)
        store = open_store(root, robot)
        try:
            if plan.first_episode is None:
                if (interrupted := interrupted_session(root)) is not None:
                    log.warning("a new session replaces an interrupted one (%s)", interrupted.summary())
                plan.first_episode = store.num_episodes
            save_plan(root, plan)

            def attempted(seed: int, status) -> None:
                plan.attempted = seed - plan.seed_start + 1
                save_plan(root, plan)
                if on_episode is not None:
                    on_episode(seed, status)

            report = record_episodes(
                robot,
                operator,
                store,
                episodes=plan.remaining,
                seed_start=plan.next_seed,
                task=plan.task,
                keep_failed=plan.keep_failed,
                realtime=getattr(operator, "realtime", False),
                on_episode=attempted,
                stop=stop,
            )
            clear_plan(root)
            return report
        finally:
            store.close()
    finally:
        operator.disconnect()


def _drive_unrecorded(
    robot: Robot, operator: Teleoperator, seconds: float, period: float, stop: threading.Event
) -> None:
    """The reset phase: the operator drives the robot in real time for `seconds`; nothing is recorded."""
    log.info("reset: %.0f s to put the scene back before the next episode", seconds)
    end = time.monotonic() + seconds
    while time.monotonic() < end and not stop.is_set():
        tick = time.perf_counter()
        robot.send_action(operator.get_action())
        precise_sleep(max(0.0, period - (time.perf_counter() - tick)))


def _record_episode(
    robot: Robot,
    operator: Teleoperator,
    dataset,
    task: str,
    period: float | None,
    stop: threading.Event,
    check_frames,
):
    """Drive the robot from the operator until the episode is done; every frame goes to `dataset`
    (`check_frames` raises as soon as one could not be written)."""
    while True:
        if stop.is_set():
            raise RecordingStopped("stopped in the middle of an episode (discarded)")
        tick = time.perf_counter()
        observation = robot.get_observation()
        sent = robot.send_action(operator.get_action())
        dataset.add_frame({**observation, **sent, "task": task})
        check_frames()
        status = robot.episode_status()
        if status.done:
            return status
        if period is not None:
            precise_sleep(max(0.0, period - (time.perf_counter() - tick)))
