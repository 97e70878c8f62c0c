"""fedbot-agent driving an SO-101 arm as a real process: lerobot's Feetech bus code on emulated servo
buses (pseudo-terminals) for the follower and the leader, a camera fed from a video file. Teleop
recording into a LeRobot dataset, a pulled cable mid-episode, reconnection, a trained policy checked,
swapped in and run on the follower, a policy too slow for the loop (the arm holds), stop and SIGTERM
turning the torque off joint by joint."""

from __future__ import annotations

import json
import os
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from agent.config import (
    AgentConfig,
    ChecksSection,
    ControlSection,
    CoordinatorSection,
    IdleSection,
    RobotSection,
    TeleopSection,
)
from fedbot.control_client import request
from fedbot.episode_store import committed_episodes
from fedbot.flower_processes import BIN, free_port
from fedbot.process_group import signal_group
from fedbot.typed_config import write_toml
from hardware.cameras import CameraSettings
from hardware.feetech_emulator import EmulatedBus
from hardware.so_arm import MOTOR_NAMES

from arm_bench import RANGE, READ_RETRIES, waving_hand, write_calibration, write_video
from helpers import deliver_model, public_key_line
from processes import Followed, NotifySocket

TORQUE_OFF = [(6, 0), (5, 0), (4, 0), (3, 0), (2, 0), (1, 0)]  # gripper first, shoulder_pan last


def write_config(directory, trusted_key: str, rate_hz: float = 15.0) -> None:
    camera = CameraSettings("front.mp4", width=64, height=48, fps=30)
    write_toml(
        directory / "agent.toml",
        AgentConfig(
            robot_id="arm",
            data_dir=Path("data"),
            socket=Path("agent.sock"),
            robot=RobotSection(
                type="so101_follower",
                port=str(directory / "follower"),
                calibration_dir=Path("calibration"),
                episode_seconds=1.0,
                reset_seconds=0.0,
                cameras={"front": camera},
                read_retries=READ_RETRIES,
            ),
            teleop=TeleopSection(type="so101_leader", port=str(directory / "leader"), read_retries=READ_RETRIES),
            coordinator=CoordinatorSection(superlink=f"127.0.0.1:{free_port()}", supernode_port=free_port()),
            idle=IdleSection(min_new_episodes=1000),
            control=ControlSection(rate_hz=rate_hz),
            checks=ChecksSection(trusted_keys=[trusted_key]),
        ),
    )


def test_agent_on_an_arm(tmp_path, lab_key):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from fedbot.presets import get_preset
    from fedbot.training import train

    write_config(tmp_path, public_key_line(lab_key))
    write_calibration(tmp_path / "calibration", "arm")
    write_calibration(tmp_path / "calibration", "arm-leader")
    write_video(tmp_path / "front.mp4", seconds=2.0)
    sock, dataset_root = tmp_path / "agent.sock", tmp_path / "data" / "dataset"
    notify = NotifySocket(tmp_path / "notify")
    follower = EmulatedBus(tmp_path / "follower").plug()
    leader = EmulatedBus(tmp_path / "leader", hand=waving_hand).plug()
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), "SVT_LOG": "1"}
    env.pop("JOURNAL_STREAM", None)
    agent = Followed([str(BIN / "fedbot-agent"), "--config", str(tmp_path / "agent.toml")], tmp_path / "agent.log", env)
    try:
        assert notify.wait_for("READY", "1")["STATUS"] == "idle; live model none"

        # Teleop: the leader, moved by a hand, drives the follower; episodes land in the dataset.
        assert request(sock, "record", episodes=2) == {"attempted": 2, "kept": 2, "episodes": 2}
        dataset = LeRobotDataset("fedbot/dataset", root=dataset_root)
        assert dataset.meta.total_episodes == 2 and dataset.meta.total_frames == 30  # 1 s at 15 Hz each
        assert dataset.meta.features["observation.state"]["names"] == MOTOR_NAMES
        assert dataset.meta.features["observation.images.front"]["dtype"] == "video"
        frame = dataset[10]
        assert frame["observation.images.front"].shape == (3, 48, 64)
        actions = np.stack([dataset[i]["action"].numpy() for i in range(dataset.meta.total_frames)])
        states = np.stack([dataset[i]["observation.state"].numpy() for i in range(dataset.meta.total_frames)])
        assert np.ptp(actions, axis=0).min() > 1.0 and np.ptp(states, axis=0).min() > 1.0  # all joints moved

        # The follower's cable is pulled mid-session: the episode in progress is lost, the completed
        # ones stay, the agent keeps running, shows the fault and reconnects once the port is back.
        with ThreadPoolExecutor(1) as pool:
            recording = pool.submit(request, sock, "record", episodes=3)
            agent.wait_for(r"recorded scene 2: kept", timeout=60)  # the first of this session
            follower.unplug()
            with pytest.raises(RuntimeError, match=r"hardware fault, recording stopped after 1 of 3 episodes \(1 kept"):
                recording.result(timeout=60)
        status = request(sock, "status")
        assert status["robot-connected"] is False and "arm on" in status["hardware-fault"]
        assert status["episodes"] == committed_episodes(dataset_root) == 3
        with pytest.raises(RuntimeError, match="the robot is not connected"):
            request(sock, "record", episodes=1)
        follower.plug()
        agent.wait_for(r"robot reconnected", timeout=60)
        assert request(sock, "status")["hardware-fault"] is None

        # A policy trained on this arm's data is checked against the arm's features, swapped in and run.
        policy = train(dataset_root, get_preset("so-arm-image"), 1, tmp_path / "train", show_progress=False)
        inbox = tmp_path / "data" / "models" / "inbox"
        deliver_model(policy, inbox, "round_0001-arm", lab_key, 1)
        agent.wait_for(r"model round_0001-arm is live", timeout=120)
        start = len(follower.goals)
        result = request(sock, "run", episodes=1)
        assert result["episodes"] == 1 and result["success-rate"] is None  # nobody judges a real bench
        assert result["error"] is None and len(follower.goals) > start
        assert all(RANGE[0] <= goal <= RANGE[1] for _, goal, _ in follower.goals[start:])

        # The cable is pulled while the policy drives the arm: the control loop ends the run with the
        # fault (the agent keeps running), and the robot is reconnected once the port is back.
        assert request(sock, "run") == {"running": True}  # until stopped
        follower.unplug()
        agent.wait_for(r"the policy run ended: hardware fault: arm on", timeout=60)
        status = request(sock, "status")
        assert status["state"] == "idle" and status["robot-connected"] is False
        assert status["control"]["policy-error"].startswith("hardware fault: arm on")
        assert "arm on" in status["hardware-fault"]
        follower.plug()
        agent.wait_for(r"robot reconnected", timeout=60)

        # A policy that cannot keep up (ten times the denoising steps: each chunk comes after the last
        # tick it was computed for): whenever no action is ready, the arm holds where it is.
        slow = tmp_path / "slow"
        shutil.copytree(policy, slow)
        config = json.loads((slow / "config.json").read_text())
        (slow / "config.json").write_text(json.dumps({**config, "num_inference_steps": 100}))
        deliver_model(slow, inbox, "round_0002-slow", lab_key, 2)
        agent.wait_for(r"model round_0002-slow is live", timeout=120)
        before = request(sock, "status")["control"]
        assert request(sock, "run", episodes=1)["error"] is None
        after = request(sock, "status")["control"]
        # one hold while the first chunk is computed (as for any model), then one per late chunk
        assert after["holds"] >= before["holds"] + 2 and after["starved-ticks"] > before["starved-ticks"]

        # Stop turns the torque off joint by joint; SIGTERM does too, and the agent exits cleanly.
        request(sock, "stop")
        assert follower.torque_writes[-6:] == TORQUE_OFF
        request(sock, "run")  # torque on again, the policy drives the arm until SIGTERM
        agent.process.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=90) == 0, agent.text()
        assert follower.torque_writes[-6:] == TORQUE_OFF
    finally:
        if agent.process.poll() is None:
            agent.kill_group()
        signal_group(agent.process.pid, signal.SIGKILL)
        notify.close()
        follower.unplug()
        leader.unplug()
