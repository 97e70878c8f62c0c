"""SO arms through lerobot's real Feetech bus code, on emulated STS3215 buses served on pseudo-terminals,
and a camera fed from a video file through OpenCV."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from lerobot.utils.constants import ACTION, OBS_STATE

from fedbot.recording import record_session
from fedbot.session_plan import SessionPlan
from hardware.cameras import CameraSettings
from hardware.errors import CalibrationMissing, HardwareFault
from hardware.factory import make_robot, make_teleop
from hardware.feetech_emulator import EmulatedBus
from hardware.so_arm import STEP_LIMIT_WARNING

from arm_bench import RANGE, READ_RETRIES, frame_index, waving_hand, write_calibration, write_video

MAX_STEP_DEGREES = 10.0
DEGREES_PER_STEP = 360 / 4095


@pytest.fixture
def bench(tmp_path):
    """A follower bus, a leader bus moved by a hand, calibration files for both."""
    calibration = tmp_path / "calibration"
    write_calibration(calibration, "arm")
    write_calibration(calibration, "arm-leader")
    with EmulatedBus(tmp_path / "follower") as follower, EmulatedBus(tmp_path / "leader", hand=waving_hand) as leader:
        yield tmp_path, follower, leader


@pytest.fixture
def still_follower(bench):
    """A second follower bus whose joints move only when the test calls `still_follower.advance`."""
    tmp_path, _, _ = bench
    with EmulatedBus(tmp_path / "still-follower", still=True) as follower:
        yield follower


def _arm(tmp_path, cameras=None, port=None, **settings):
    return make_robot(
        "so101_follower",
        "arm",
        port=port or str(tmp_path / "follower"),
        fps=30,
        calibration_dir=tmp_path / "calibration",
        max_relative_target=MAX_STEP_DEGREES,
        cameras=cameras or {},
        read_retries=READ_RETRIES,
        **settings,
    )


def test_connect_writes_the_calibration_file_to_the_motors_without_asking(bench):
    tmp_path, follower, _ = bench
    arm = _arm(tmp_path)
    arm.connect()  # lerobot would prompt on stdin here; pytest's captured stdin makes that an error
    for servo in range(1, 7):
        assert follower.register(servo, "Min_Position_Limit") == RANGE[0]
        assert follower.register(servo, "Max_Position_Limit") == RANGE[1]
        assert follower.register(servo, "Homing_Offset") == 12
    state = arm.get_observation()[OBS_STATE]
    assert state.shape == (6,) and np.isfinite(state).all()
    arm.disconnect()


def test_a_status_packet_lost_while_connecting_costs_one_more_try(bench):
    """A healthy bus drops a reply now and then; connecting the follower or the leader tries again."""
    tmp_path, follower, leader = bench
    follower.lose_replies(1)
    arm = _arm(tmp_path)
    arm.connect()
    leader.lose_replies(1)
    hand = make_teleop(
        "so101_leader",
        id="arm-leader",
        port=str(tmp_path / "leader"),
        calibration_dir=tmp_path / "calibration",
        read_retries=READ_RETRIES,
    )
    hand.connect()
    assert arm.is_connected and hand.is_connected
    hand.disconnect()
    arm.disconnect()


def test_a_missing_calibration_names_the_command_and_leaves_the_port_alone(bench):
    tmp_path, follower, _ = bench
    arm = make_robot(
        "so100_follower",
        "new-arm",
        port=str(tmp_path / "follower"),
        calibration_dir=tmp_path / "calibration",
        read_retries=READ_RETRIES,
    )
    with pytest.raises(CalibrationMissing) as error:
        arm.connect()
    assert (
        f"lerobot-calibrate --robot.type=so100_follower --robot.port={tmp_path / 'follower'} "
        f"--robot.id=new-arm --robot.calibration_dir={tmp_path / 'calibration'}"
    ) in str(error.value)
    assert follower.torque_writes == [] and follower.register(1, "Min_Position_Limit") == 0
    leader = make_teleop(
        "so101_leader",
        id="nobody",
        port=str(tmp_path / "leader"),
        calibration_dir=tmp_path / "calibration",
        read_retries=READ_RETRIES,
    )
    with pytest.raises(CalibrationMissing, match="--teleop.type=so101_leader"):
        leader.connect()


def test_actions_stay_within_the_joint_range_and_the_step_limit(bench, still_follower, caplog):
    tmp_path, _, _ = bench
    follower = still_follower
    caplog.set_level(logging.INFO)
    follower.place(RANGE[1] - 50)  # near the top of every joint's range
    arm = _arm(tmp_path, port=str(follower.link))
    arm.connect()
    arm.reset(0)
    start = len(follower.goals)
    for _ in range(5):  # far above the range: the joint limit binds
        arm.send_action({ACTION: np.full(6, 1000.0, np.float32)})
    arm.get_observation()  # answered after the writes before it: the emulator has them all
    assert [goal for _, goal, _ in follower.goals[start:]] == [RANGE[1]] * 30
    start = len(follower.goals)
    for _ in range(5):  # far below: the step limit binds (10 degrees from where the joint is)
        arm.send_action({ACTION: np.full(6, -1000.0, np.float32)})
    arm.get_observation()
    max_step = MAX_STEP_DEGREES / DEGREES_PER_STEP + 1  # lerobot limits in degrees, then rounds to steps
    for servo, goal, present in follower.goals[start:]:
        assert RANGE[0] <= goal < present
        if servo != 6:  # the gripper's limit is in percent of its range, not degrees
            assert present - goal <= max_step
    arm.disconnect()
    # lerobot's warning for each limited action is counted, not logged 10 times
    assert not [r for r in caplog.records if r.getMessage().startswith(STEP_LIMIT_WARNING)]
    assert "max-relative-target (10.0) limited 5 actions" in caplog.text  # the 5 steps down


def test_hold_and_an_ordered_torque_off(bench, still_follower):
    """Hold stops the joints where they are, short of the commanded target, and they stay there."""
    tmp_path, _, _ = bench
    follower = still_follower
    arm = _arm(
        tmp_path,
        port=str(follower.link),
        torque_off_order=("gripper", "wrist_roll", "wrist_flex", "elbow_flex", "shoulder_lift", "shoulder_pan"),
    )
    arm.connect()
    arm.reset(0)
    start = follower.present()
    arm.send_action({ACTION: np.full(6, 9.0, np.float32)})
    arm.get_observation()  # the goals have arrived (a sync write has no reply)
    target = {servo: goal for servo, goal, _ in follower.goals[-6:]}
    follower.advance(0.005)  # 15 steps on the way
    arm.hold()
    arm.get_observation()  # the hold's goals have arrived (a sync write has no reply)
    follower.advance(1.0)  # time enough to reach the old target
    present = follower.present()
    for servo, goal, _ in follower.goals[-6:]:
        assert goal == present[servo] != target[servo]  # held where it was, not at the commanded target
        assert abs(present[servo] - start[servo]) <= 15 < abs(target[servo] - start[servo])
    before = len(follower.torque_writes)
    arm.disconnect()  # torque writes are answered: all have arrived when it returns
    assert follower.torque_writes[before:] == [(6, 0), (5, 0), (4, 0), (3, 0), (2, 0), (1, 0)]


def test_a_pulled_cable_is_a_fault_until_the_port_returns(bench):
    tmp_path, follower, _ = bench
    arm = _arm(tmp_path)
    arm.connect()
    follower.unplug()
    with pytest.raises(HardwareFault, match="arm on"):
        arm.get_observation()
    assert not arm.is_connected and "arm on" in arm.fault
    with pytest.raises(HardwareFault, match="does not exist"):
        arm.connect()
    follower.plug()
    arm.connect()
    assert arm.fault is None and arm.get_observation()[OBS_STATE].shape == (6,)
    arm.disconnect()


def test_the_leader_drives_the_follower(bench):
    tmp_path, follower, leader = bench
    arm = _arm(tmp_path)
    hand = make_teleop(
        "so101_leader",
        id="arm-leader",
        port=str(tmp_path / "leader"),
        calibration_dir=tmp_path / "calibration",
        read_retries=READ_RETRIES,
    )
    arm.connect()
    hand.connect()
    arm.reset(0)
    actions = []
    for _ in range(30):
        action = hand.get_action()
        actions.append(action[ACTION])
        arm.send_action(action)
    assert all(leader.register(servo, "Torque_Enable") == 0 for servo in range(1, 7))  # the person moves it
    assert np.ptp(np.array(actions), axis=0).min() > 0  # every joint of the leader moved
    hand.disconnect()
    arm.disconnect()


def test_a_video_file_is_a_live_camera_until_it_ends(bench):
    tmp_path, follower, _ = bench
    video = write_video(tmp_path / "front.mp4", seconds=2.0)
    arm = _arm(tmp_path, cameras={"front": CameraSettings(str(video), width=64, height=48, fps=30, loop=False)})
    assert arm.observation_features["observation.images.front"] == (48, 64, 3)
    arm.connect()  # lerobot's connect reads frames for a 1 s warm-up
    frames = []
    while True:
        try:
            frames.append(frame_index(arm.get_observation()["observation.images.front"]))
        except HardwareFault as fault:
            assert "camera front" in str(fault)
            break
    # Frames came at the file's pace, in order, and the 2 s file lasted beyond the warm-up.
    assert frames == sorted(frames) and 0 < frames[0] < 59 and frames[-1] >= 55
    assert not arm.is_connected
    # The bus still answered: the fault left the arm holding, its torque off joint by joint.
    assert follower.torque_writes[-6:] == [(6, 0), (5, 0), (4, 0), (3, 0), (2, 0), (1, 0)]


def _stats(low: float, high: float, size: int) -> dict:
    return {
        "min": np.full(size, low),
        "max": np.full(size, high),
        "mean": np.zeros(size),
        "std": np.ones(size),
        "count": np.array([100]),
    }


def test_a_stalled_or_failing_policy_leaves_the_arm_holding(bench):
    import sys
    import threading
    import time

    import torch

    from agent.controller import ControlLoop
    from fedbot.presets import get_preset
    from fedbot.recording import dataset_features
    from fedbot.training import policy_from_stats

    tmp_path, follower, _ = bench
    video = write_video(tmp_path / "front.mp4", seconds=1.0)
    arm = _arm(tmp_path, cameras={"front": CameraSettings(str(video), width=64, height=48, fps=30)})
    arm.connect()
    image_stats = {
        "mean": np.full((3, 1, 1), 0.5),
        "std": np.full((3, 1, 1), 0.25),
        "min": np.zeros((3, 1, 1)),
        "max": np.ones((3, 1, 1)),
        "count": np.array([100]),
    }
    loaded = policy_from_stats(
        get_preset("so-arm-image"),
        dataset_features(arm),
        {OBS_STATE: _stats(-90, 90, 6), ACTION: _stats(-90, 90, 6), "observation.images.front": image_stats},
        device="cpu",
    )
    release = threading.Event()

    def stalled(batch):  # the policy hangs (a stuck accelerator, a deadlock), then fails
        release.wait(120)
        raise RuntimeError("the accelerator fell off the bus")

    loaded.policy.predict_action_chunk = stalled
    threads, switch = torch.get_num_threads(), sys.getswitchinterval()  # the loop sets both process-wide
    loop = ControlLoop(arm, 30.0)
    try:
        loop.start()
        loop.swap(loaded, "stalled", time.monotonic())
        start = len(follower.goals)
        loop.run()
        assert loop.wait_ticks(10, timeout=30)
        before = follower.present()
        assert loop.wait_ticks(30, timeout=30)  # a second of ticks without an action
        assert loop.actions == 0 and loop.holds == 1 and loop.error is None
        assert follower.present() == before
        held = follower.goals[start:]
        assert len(held) == 12  # the episode start holds, then the first tick without an action
        assert all(abs(goal - present) <= 1 for _, goal, present in held)
        release.set()
        while loop.error is None:  # the failure reaches the control thread at its next tick
            assert loop.wait_ticks(1, timeout=30)
        assert "fell off the bus" in loop.error and loop.mode == "hold" and loop.actions == 0
        assert len(follower.goals) == start + 12  # still holding: nothing was sent after the failure
    finally:
        release.set()
        loop.close()
        torch.set_num_threads(threads)
        sys.setswitchinterval(switch)
        arm.disconnect()


def test_hardware_check_says_what_is_missing_and_what_to_do(tmp_path, capsys):
    from agent.config import load_config
    from cli.main import main
    from hardware.check import check_hardware

    write_calibration(tmp_path / "calibration", "arm")  # the leader has none
    write_video(tmp_path / "front.mp4", seconds=2.0)
    config = tmp_path / "agent.toml"
    config.write_text(f"""robot-id = "arm"
[robot]
type = "so101_follower"
port = "{tmp_path / "follower"}"
calibration-dir = "calibration"
[robot.cameras.front]
index-or-path = "front.mp4"
width = 64
height = 48
[robot.cameras.wrist]
index-or-path = "{tmp_path / "no-such-camera"}"
[teleop]
type = "so100_leader"
port = "{tmp_path / "leader"}"
""")
    with EmulatedBus(tmp_path / "follower"), EmulatedBus(tmp_path / "leader", ids=[1, 2, 3, 5, 6]):
        findings = {f.part: f for f in check_hardware(load_config(config))}
        assert main(["hardware", "check", "--config", str(config)]) == 1  # prints them as a table
    assert "MISSING" in capsys.readouterr().out
    missing = {part for part, finding in findings.items() if not finding.ok}
    assert missing == {
        "so100_leader 'arm-leader' calibration",
        "so100_leader 'arm-leader' motor wrist_flex",
        "camera wrist",
    }
    assert findings["so100_leader 'arm-leader' motor wrist_flex"].detail == "id 4: no answer"
    assert "lerobot-calibrate --teleop.type=so100_leader" in findings["so100_leader 'arm-leader' calibration"].fix
    assert "lerobot-find-cameras" in findings["camera wrist"].fix
    assert findings["camera front"].detail.endswith("frame 64x48")
    assert len([part for part in findings if " motor " in part]) == 12


def test_between_recorded_episodes_the_operator_puts_the_scene_back_unrecorded(bench):
    tmp_path, follower, leader = bench
    arm = _arm(tmp_path, episode_seconds=0.5, reset_seconds=0.5)
    hand = make_teleop(
        "so101_leader",
        id="arm-leader",
        port=str(tmp_path / "leader"),
        calibration_dir=tmp_path / "calibration",
        read_retries=READ_RETRIES,
    )
    arm.connect()
    try:
        report = record_session(arm, hand, tmp_path / "dataset", SessionPlan(episodes=2, seed_start=0))
    finally:
        arm.disconnect()
    dataset = LeRobotDataset("fedbot/dataset", root=tmp_path / "dataset")
    assert report.kept == 2 and dataset.meta.total_frames == 30  # 2 x 0.5 s at 30 Hz: no reset frames
    states = np.stack([dataset[i][OBS_STATE].numpy() for i in range(30)])
    # the most a joint moved in one recorded tick, once the follower had caught up with the leader
    within = np.abs(np.diff(states[8:15], axis=0)).max()
    # the follower kept copying the leader for the 0.5 s between the episodes
    assert np.abs(states[15] - states[14]).max() > 3 * within
