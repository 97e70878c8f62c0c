"""A bench for SO arm tests: calibration files, a camera video, a hand that moves a leader arm."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from hardware.feetech_emulator import WavingHand
from hardware.so_arm import JOINTS

RANGE = (1000, 3000)  # calibrated range of every joint, in raw steps
CAMERA = (48, 64)  # height, width of the test camera
CAMERA_FPS = 30
# The emulated servos answer on a host the suite keeps busy: lerobot's 3 tries of ~50 ms per read
# (robot.read-retries 2) failed there now and then; 11 tries give a read half a second.
READ_RETRIES = 10


def write_calibration(directory: Path, device_id: str) -> Path:
    """A lerobot calibration file, as `lerobot-calibrate` writes it, for an arm with ids 1..6."""
    directory.mkdir(parents=True, exist_ok=True)
    calibration = {
        joint: {"id": i + 1, "drive_mode": 0, "homing_offset": 12, "range_min": RANGE[0], "range_max": RANGE[1]}
        for i, joint in enumerate(JOINTS)
    }
    path = directory / f"{device_id}.json"
    path.write_text(json.dumps(calibration, indent=2))
    return path


def write_video(path: Path, seconds: float, size: tuple[int, int] = CAMERA) -> Path:
    """A camera recording (`size`: height, width) whose frame k is uniformly grey at level 2k (so a
    frame shows its index)."""
    height, width = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), CAMERA_FPS, (width, height))
    for k in range(int(seconds * CAMERA_FPS)):
        writer.write(np.full((height, width, 3), min(2 * k, 255), np.uint8))
    writer.release()
    return path


def frame_index(frame: np.ndarray) -> int:
    return round(float(frame.mean()) / 2)


waving_hand = WavingHand(*RANGE)  # a person moving every joint of a leader arm inside the calibrated range


def record_arm_dataset(directory: Path, root: Path, episodes: int, camera_size: tuple[int, int] = CAMERA) -> int:
    """`episodes` teleop episodes of 0.5 s at 30 Hz (no reset pause) from an emulated follower and
    leader, with a video-file camera of `camera_size` (height, width), into a dataset at `root`; the
    bench lives in `directory`. Returns the dataset's episode count."""
    from fedbot.recording import record_session
    from fedbot.session_plan import SessionPlan
    from hardware.cameras import CameraSettings
    from hardware.factory import make_robot, make_teleop
    from hardware.feetech_emulator import EmulatedBus

    calibration = directory / "calibration"
    write_calibration(calibration, "arm")
    write_calibration(calibration, "arm-leader")
    video = write_video(directory / "front.mp4", seconds=2.0, size=camera_size)
    camera = CameraSettings(str(video), width=camera_size[1], height=camera_size[0], fps=CAMERA_FPS)
    with EmulatedBus(directory / "follower"), EmulatedBus(directory / "leader", hand=waving_hand):
        arm = make_robot(
            "so101_follower",
            "arm",
            port=str(directory / "follower"),
            fps=30,
            calibration_dir=calibration,
            episode_seconds=0.5,
            reset_seconds=0.0,
            cameras={"front": camera},
            read_retries=READ_RETRIES,
        )
        hand = make_teleop(
            "so101_leader",
            id="arm-leader",
            port=str(directory / "leader"),
            calibration_dir=calibration,
            read_retries=READ_RETRIES,
        )
        arm.connect()
        try:
            return record_session(arm, hand, root, SessionPlan(episodes, seed_start=0)).total_episodes
        finally:
            arm.disconnect()
