"""Recording into crash-safe LeRobot datasets, including real recorder processes killed by SIGKILL."""

import os
from pathlib import Path

import pytest
from lerobot.datasets.lerobot_dataset import LeRobotDataset

from fedbot.episode_store import EpisodeStore
from fedbot.recording import (
    EVAL_SEED_START,
    check_recording_seeds,
    open_store,
    record_episodes,
)
from hardware.pusht_sim import PushTSim, PushTSimConfig

from helpers import WanderOperator, record_wander
from processes import run_crash_recorders

STEPS = 20  # frames per episode in these tests


def load(root: Path) -> LeRobotDataset:
    return LeRobotDataset(f"fedbot/{root.name}", root=root)


def assert_readable(root: Path, episodes: int) -> None:
    """The dataset loads with plain lerobot, holds `episodes` episodes and every frame decodes."""
    dataset = load(root)
    assert dataset.meta.total_episodes == episodes
    assert len(dataset) == episodes * STEPS
    assert sorted({int(e) for e in dataset.hf_dataset["episode_index"]}) == list(range(episodes))
    for index in range(0, len(dataset), 7):
        item = dataset[index]
        assert item["observation.image"].shape == (3, 96, 96)
        assert item["observation.environment_state"].shape == (16,)


def test_recorded_dataset_loads_offline_and_appends(tmp_path):
    root = tmp_path / "robot0"
    policy = os.sched_getscheduler(0), os.sched_getparam(0)
    assert record_wander(root, 2, STEPS) == 2
    # The AV1 encoder makes its thread real-time (as root); the recorder must not stay that way.
    assert (os.sched_getscheduler(0), os.sched_getparam(0)) == policy
    assert_readable(root, 2)
    dataset = load(root)
    assert dataset.meta.fps == 10
    assert dataset.meta.tasks.index.tolist() == ["Push the T-shaped block onto the T-shaped target."]
    assert dataset.meta.video_keys == ["observation.image"]
    # a second session appends
    assert record_wander(root, 1, STEPS, seed_start=2) == 3
    assert_readable(root, 3)


def test_failed_demonstrations_are_dropped_unless_kept(tmp_path):
    robot = PushTSim(PushTSimConfig(id="t", max_episode_steps=STEPS))
    robot.connect()
    operator = WanderOperator()
    operator.attach(robot)
    store = open_store(tmp_path / "d", robot)
    try:
        report = record_episodes(robot, operator, store, episodes=2, seed_start=0)
        assert (report.attempted, report.successes, report.kept) == (2, 0, 0)
        assert store.num_episodes == 0
        report = record_episodes(robot, operator, store, episodes=2, seed_start=2, keep_failed=True)
        assert (report.kept, report.total_episodes) == (2, 2)
    finally:
        store.close()
        robot.disconnect()
    assert_readable(tmp_path / "d", 2)


def test_one_recorder_per_dataset(tmp_path):
    robot = PushTSim(PushTSimConfig(id="t"))
    store = open_store(tmp_path / "d", robot)
    try:
        with pytest.raises(RuntimeError, match="another process"):
            open_store(tmp_path / "d", robot)
    finally:
        store.close()


def test_refuses_a_directory_that_is_not_a_fedbot_dataset(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a fedbot dataset"):
        EpisodeStore(tmp_path / "d", "fedbot/d", 10, {}, "pusht_sim")


def test_recording_seeds_stay_below_the_evaluation_seeds():
    check_recording_seeds(0, 10)
    with pytest.raises(ValueError, match="held out"):
        check_recording_seeds(EVAL_SEED_START - 2, 5)


KILLS = [
    ("add_frame", STEPS + 5, 1),  # killed mid-episode 2
    ("save_episode_video", 2, 1),  # killed inside lerobot's save of episode 2
    ("finalize", 2, 1),  # episode 2 saved, parquet footers not written
    ("publish_dir", 2, 1),  # episode 2 complete in its work dir
    ("replace", 2, 1),  # episode 2's version in place, not yet current
    ("recover", 3, 2),  # episode 2 committed, leftovers not yet cleaned
    ("add_frame", 5, 0),  # killed in the very first episode
]


@pytest.fixture(scope="module")
def killed_recorders(tmp_path_factory) -> dict:
    """One real recorder process per kill point, each recording 2 episodes into its own dataset and
    SIGKILLing itself before the `at_call`-th call of `point`. They start together: each spends
    seconds importing lerobot, and side by side they share the cores instead of queueing.
    Returns (dataset root, exit code, stderr) per (point, at_call)."""
    return run_crash_recorders(tmp_path_factory.mktemp("killed"), KILLS, 2)


@pytest.mark.parametrize(("point", "at_call", "survivors"), KILLS)
def test_sigkill_loses_at_most_the_episode_in_progress(killed_recorders, point, at_call, survivors):
    root, code, stderr = killed_recorders[point, at_call]
    assert code == -9, stderr[-2000:]
    if survivors:
        assert_readable(root, survivors)
    # recording continues into the same dataset
    assert record_wander(root, 1, STEPS, seed_start=10) == survivors + 1
    assert_readable(root, survivors + 1)
    leftovers = [p.name for p in (root / ".versions").iterdir() if p.name not in ("current", "lock")]
    assert leftovers == [f"{survivors + 1:06d}"]
