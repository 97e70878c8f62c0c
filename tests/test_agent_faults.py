"""No silent faults: fedbot-agent as a real process whose threads meet real failures. The model
worker on a full and on a read-only disk (tmpfs, remounted), a robot reconnect that fails with a
camera that is not what the config says (an emulated SO-101 bus, a video file camera), and a
recording that fills its disk. Each fault shows in `fedbot status` and the journal, the agent keeps
controlling, and it recovers once the disk or the camera is right again."""

from __future__ import annotations

import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from agent.config import RobotSection, TeleopSection
from fedbot.control_client import request
from fedbot.episode_store import VERSIONS_DIR, WORK_PREFIX, committed_episodes
from fedbot.process_group import signal_group
from hardware.cameras import CameraSettings
from hardware.feetech_emulator import EmulatedBus

from agent_bench import bind, fill, set_read_only, start_agent, status_until, stop, tmpfs, write_config
from arm_bench import CAMERA, READ_RETRIES, waving_hand, write_calibration, write_video
from helpers import deliver_model
from processes import NotifySocket

TORQUE_OFF = [(6, 0), (5, 0), (4, 0), (3, 0), (2, 0), (1, 0)]  # gripper first, shoulder_pan last


def fault_of(status: dict, thread: str) -> dict:
    """The one fault of `thread` in a status."""
    (fault,) = [f for f in status["faults"] if f["thread"] == thread]
    return fault


def watchdog_fed_after_now(notify: NotifySocket) -> None:
    """A WATCHDOG=1 that systemd receives from now on (earlier ones are dropped)."""
    notify.drain()
    notify.wait_for("WATCHDOG", "1")


def test_model_updates_on_a_full_then_read_only_disk_are_a_fault_the_agent_recovers_from(
    tmp_path, untrained_policy, lab_key
):
    """The model store on its own small disk. A model lands while the disk is full, another while it
    is read-only: each time the model worker shows the fault, the live model stays live and the
    policy keeps driving the robot; once space or write access is back, the model goes live."""
    write_config(tmp_path, trusted=lab_key)
    disk = tmp_path / "disk"  # the models' disk as the test sees it (always writable)
    models = tmp_path / "data" / "models"  # the same disk where the agent sees it
    sock = tmp_path / "agent.sock"
    notify = NotifySocket(tmp_path / "notify")
    with tmpfs(disk, "80M"), bind(disk, models):
        staging = disk / ".staging"  # models wait here, off the inbox, to land at the chosen moment
        agent = start_agent(tmp_path, notify.path, "agent.log")
        try:
            notify.wait_for("READY", "1")
            deliver_model(untrained_policy, disk / "inbox", "round_0001-a", lab_key, 1)
            agent.wait_for(r"model round_0001-a is live", timeout=120)
            assert request(sock, "run") == {"running": True}  # the policy drives the robot until stopped

            # The disk is full when the next model lands: a fault of the model worker, nothing changed.
            deliver_model(untrained_policy, staging, "round_0002-b", lab_key, 2)
            filler = fill(disk)
            os.rename(staging / "round_0002-b", disk / "inbox" / "round_0002-b")
            agent.wait_for(r"FAULT in the models thread \(inbox\): OSError: \[Errno 28\] No space left", timeout=120)
            agent.wait_for(r"Traceback", timeout=10)  # the journal gets the traceback
            before = request(sock, "status")
            assert before["state"] == "fault" and before["activity"] == "running-policy"
            fault = fault_of(before, "models")
            assert fault["task"] == "inbox" and "No space left on device" in fault["error"]
            assert fault["retry-in-s"] > 0 and not fault["fatal"]
            assert before["live-model"]["name"] == before["control"]["model"] == "round_0001-a"
            assert (disk / "inbox" / "round_0002-b").is_dir()  # kept in the inbox for the next try
            watchdog_fed_after_now(notify)  # the agent is not restarted for this
            acted = before["control"]["actions"]
            during = status_until(sock, lambda status: status["control"]["actions"] > acted, timeout=60)
            assert during["control"]["mode"] == "run"  # still controlling, the fault notwithstanding

            # Space is back: the worker's next try puts the model live, and the fault clears.
            filler.unlink()
            agent.wait_for(r"model round_0002-b is live", timeout=120)
            agent.wait_for(r"the models thread \(inbox\) recovered", timeout=10)
            status = request(sock, "status")
            assert status["state"] == "running-policy" and status["faults"] == []
            assert status["live-model"]["name"] == status["control"]["model"] == "round_0002-b"

            # Read-only (the disk remounted so): the same, then write access is back.
            deliver_model(untrained_policy, staging, "round_0003-c", lab_key, 3)
            set_read_only(models, True)
            os.rename(staging / "round_0003-c", disk / "inbox" / "round_0003-c")
            agent.wait_for(r"FAULT in the models thread \(inbox\): OSError: \[Errno 30\] Read-only", timeout=120)
            status = request(sock, "status")
            assert status["state"] == "fault" and "Read-only file system" in fault_of(status, "models")["error"]
            assert status["live-model"]["name"] == status["control"]["model"] == "round_0002-b"
            set_read_only(models, False)
            agent.wait_for(r"model round_0003-c is live", timeout=120)
            agent.wait_for(r"the models thread \(inbox\) recovered", timeout=10)  # the pass ends after the swap
            status = request(sock, "status")
            assert status["state"] == "running-policy" and status["faults"] == []
            assert status["live-model"]["name"] == status["control"]["model"] == "round_0003-c"
            assert status["control"]["mode"] == "run" and status["control"]["policy-error"] is None

            stop(agent)  # SIGTERM while the policy runs
        finally:
            if agent.process.poll() is None:
                agent.kill_group()
            notify.close()


def test_recording_onto_a_full_disk_stops_with_a_clear_error_and_keeps_every_episode(tmp_path):
    """The dataset on its own small disk, filled by someone else mid-session: the session stops with
    the reason and what was kept, the agent is idle and healthy, every committed episode reads back
    with lerobot, and once there is space again recording goes on."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    write_config(tmp_path)
    dataset_root = tmp_path / "data" / "dataset"
    sock = tmp_path / "agent.sock"
    notify = NotifySocket(tmp_path / "notify")
    with tmpfs(dataset_root, "48M"):
        agent = start_agent(tmp_path, notify.path, "agent.log")
        try:
            notify.wait_for("READY", "1")
            with ThreadPoolExecutor(1) as pool:
                session = pool.submit(request, sock, "record", episodes=50)
                agent.wait_for(r"recorded scene \d+: kept", timeout=300)
                filler = fill(dataset_root)  # someone else fills the disk while the session goes on
                with pytest.raises(RuntimeError) as error:
                    session.result(timeout=300)
            match = re.search(
                r"disk full: recording stopped after (\d+) of 50 episodes \((\d+) kept, the dataset holds (\d+);"
                r" an unfinished episode is discarded\); free space in (\S+): ",
                str(error.value),
            )
            assert match, str(error.value)
            kept = int(match.group(3))
            assert kept >= 1 and int(match.group(2)) == kept and match.group(4) == str(dataset_root)
            status = request(sock, "status")
            assert status["state"] == "idle" and status["faults"] == [] and status["recording"] is None
            assert status["episodes"] == kept and status["robot-connected"]
            watchdog_fed_after_now(notify)

            # Every committed episode reads back, first and last frame (video decoded); no work left behind.
            assert not [p for p in (dataset_root / VERSIONS_DIR).iterdir() if p.name.startswith(WORK_PREFIX)]
            dataset = LeRobotDataset("fedbot/dataset", root=dataset_root)
            assert dataset.meta.total_episodes == kept
            for episode in range(kept):
                start = int(dataset.meta.episodes[episode]["dataset_from_index"])
                end = int(dataset.meta.episodes[episode]["dataset_to_index"])
                for index in (start, end - 1):
                    frame = dataset[index]
                    assert frame["episode_index"] == episode and frame["observation.image"].shape == (3, 96, 96)

            filler.unlink()  # space again: the dataset takes the next session
            assert request(sock, "record", episodes=1)["episodes"] == kept + 1
            assert committed_episodes(dataset_root) == kept + 1
            stop(agent)  # SIGTERM while idle
        finally:
            if agent.process.poll() is None:
                agent.kill_group()
            notify.close()


def test_a_reconnect_error_that_is_no_device_fault_is_shown_and_retried_until_the_camera_fits(tmp_path):
    """An SO-101 on an emulated bus whose camera comes back, after a pulled cable, with another frame
    size than the config says (the robot's connect raises ValueError): the supervisor shows the fault
    and keeps trying, the arm is not left half connected, the watchdog is still fed; with the right
    camera back the robot reconnects. Then SIGTERM mid-recording turns the torque off in order."""
    camera = CameraSettings("front.mp4", width=CAMERA[1], height=CAMERA[0], fps=30)
    robot = RobotSection(
        type="so101_follower",
        port=str(tmp_path / "follower"),
        calibration_dir=Path("calibration"),
        episode_seconds=1.0,
        reset_seconds=0.0,
        cameras={"front": camera},
        read_retries=READ_RETRIES,
    )
    write_config(
        tmp_path,
        robot=robot,
        teleop=TeleopSection(type="so101_leader", port=str(tmp_path / "leader"), read_retries=READ_RETRIES),
    )
    write_calibration(tmp_path / "calibration", "robot-test")
    write_calibration(tmp_path / "calibration", "robot-test-leader")
    video = write_video(tmp_path / "front.mp4", seconds=2.0)
    sock = tmp_path / "agent.sock"
    notify = NotifySocket(tmp_path / "notify")
    follower = EmulatedBus(tmp_path / "follower").plug()
    leader = EmulatedBus(tmp_path / "leader", hand=waving_hand).plug()
    agent = start_agent(tmp_path, notify.path, "agent.log", sim=False)
    try:
        notify.wait_for("READY", "1")
        with ThreadPoolExecutor(1) as pool:  # a cable pulled mid-session: the robot is disconnected
            session = pool.submit(request, sock, "record", episodes=3)
            agent.wait_for(r"recorded scene 0: kept", timeout=120)
            follower.unplug()
            with pytest.raises(RuntimeError, match="hardware fault"):
                session.result(timeout=60)

        shutil.copy(write_video(tmp_path / "other.mp4", seconds=2.0, size=(24, 32)), video)  # another camera
        torque_writes = len(follower.torque_writes)
        follower.plug()
        agent.wait_for(r"FAULT in the supervisor thread \(robot reconnect\): ValueError: .*front.mp4 is 32x24", 60)
        status = request(sock, "status")
        assert status["state"] == "fault" and status["activity"] == "idle"
        fault = fault_of(status, "supervisor")
        assert fault["task"] == "robot reconnect" and "asks for 64x48" in fault["error"] and fault["retry-in-s"] > 0
        assert status["robot-connected"] is False  # not half connected: the arm was let go again
        assert follower.torque_writes[torque_writes:][-6:] == TORQUE_OFF
        agent.wait_for(r"FAULT in the supervisor thread \(robot reconnect\) again \(2 times\)", 60)  # goes on trying
        watchdog_fed_after_now(notify)

        write_video(video, seconds=2.0)  # the right camera is back
        agent.wait_for(r"robot reconnected", timeout=120)
        agent.wait_for(r"the supervisor thread \(robot reconnect\) recovered", timeout=10)
        status = request(sock, "status")
        assert status["state"] == "idle" and status["faults"] == [] and status["robot-connected"]

        # SIGTERM mid-recording: the session ends (its episode in progress discarded), then the arm
        # holds and turns its torque off joint by joint, and nothing moves it afterwards.
        with ThreadPoolExecutor(1) as pool:
            session = pool.submit(request, sock, "record", episodes=5)
            agent.wait_for(r"recorded scene \d+: kept", timeout=120)
            stop(agent)
            with pytest.raises(RuntimeError, match=r"the agent is stopping: recording stopped after \d+ of 5"):
                session.result(timeout=30)
        assert follower.torque_writes[-6:] == TORQUE_OFF  # the last torque writes: off, in order
    finally:
        if agent.process.poll() is None:
            agent.kill_group()
        signal_group(agent.process.pid, 9)
        notify.close()
        follower.unplug()
        leader.unplug()
