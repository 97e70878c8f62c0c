"""SO-100/SO-101 arms as fedbot robots: lerobot's SOFollower and SOLeader with the agent's safety rules.

lerobot's classes do the motor work (Feetech bus, calibration files, `max_relative_target`); this
module adds what a daemon driving a real arm needs on top:

- Features named by dataset key, like the PushT sim: `observation.state` (6 joints),
  `observation.images.<camera>`, `action` (6 joint targets), so recording and control code are the
  same for every robot.
- Calibration never prompts: lerobot asks on stdin whether to trust the file when the motors
  disagree with it. The daemon writes the file to the motors (what pressing ENTER does) and, when
  there is no file, raises `CalibrationMissing` with the `lerobot-calibrate` command to run.
- Every action is clipped to the calibrated joint range, then limited to `max-relative-target`
  from the present position (lerobot's `ensure_safe_goal_position`).
- `hold()` makes the present position the goal; `torque_off()` disables torque joint by joint in a
  defined order (by default from the gripper to the base), also on disconnect.
- A serial port or camera that fails mid-session raises `HardwareFault`; the arm holds and turns
  its torque off if its bus still answers, closes what is left, and can be connected again when
  the device returns.
"""

from __future__ import annotations

import logging
import termios
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import serial
from lerobot.robots.config import RobotConfig
from lerobot.robots.robot import Robot
from lerobot.robots.so_follower import SOFollower, SOFollowerRobotConfig
from lerobot.teleoperators.config import TeleoperatorConfig
from lerobot.teleoperators.so_leader import SOLeader, SOLeaderTeleopConfig
from lerobot.teleoperators.teleoperator import Teleoperator
from lerobot.utils.constants import ACTION, OBS_STATE

from hardware.cameras import CameraSettings, make_camera
from hardware.errors import CalibrationMissing, HardwareFault
from hardware.pusht_sim import EpisodeStatus

log = logging.getLogger("fedbot.hardware")
FOLLOWER_TYPES = ("so100_follower", "so101_follower")
LEADER_TYPES = ("so100_leader", "so101_leader")
JOINTS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")
# Distal joints first: the light wrist and gripper go limp before the shoulder lets the arm down.
TORQUE_OFF_ORDER = ("gripper", "wrist_roll", "wrist_flex", "elbow_flex", "shoulder_lift", "shoulder_pan")
MOTOR_NAMES = [f"{joint}.pos" for joint in JOINTS]
# What a failing serial port or camera raises through lerobot (pyserial, its ioctls, the SDK, OpenCV's thread).
DEVICE_ERRORS = (ConnectionError, OSError, serial.SerialException, termios.error, TimeoutError, RuntimeError)
CONNECT_ATTEMPTS = 3  # a handshake ping can go unanswered once on a healthy bus
# What lerobot's ensure_safe_goal_position logs, through the root logger, for every action it limits.
STEP_LIMIT_WARNING = "Relative goal position magnitude had to be clamped"


class StepLimitCount(logging.Filter):
    """Counts lerobot's "goal position had to be clamped" warnings instead of passing them on.

    lerobot logs one (with every joint's goals) for each action max-relative-target limits: at 30 Hz
    a policy that asks for fast moves fills the journal with 30 a second. The arm reports a count per
    episode instead (SOArm.reset, SOArm.disconnect).
    """

    def __init__(self):
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith(STEP_LIMIT_WARNING):
            self.count += 1
            return False
        return True

    def report(self, arm_id: str, max_step: float) -> None:
        if self.count:
            log.info("%s: max-relative-target (%s) limited %d actions", arm_id, max_step, self.count)
        self.count = 0


def image_key(camera: str) -> str:
    return f"observation.images.{camera}"


def calibration_command(kind: str, device_type: str, port: str, device_id: str, calibration_dir) -> str:
    """The lerobot command that calibrates an arm (kind: robot or teleop) and writes its file."""
    return (
        f"lerobot-calibrate --{kind}.type={device_type} --{kind}.port={port} --{kind}.id={device_id} "
        f"--{kind}.calibration_dir={calibration_dir}"
    )


def _require_calibration(device, kind: str, device_type: str, port: str) -> None:
    """The daemon cannot calibrate (a person moves the joints through their range): name the command."""
    if not device.calibration:
        command = calibration_command(kind, device_type, port, device.id, device.calibration_dir)
        raise CalibrationMissing(
            f"{device_type} {device.id!r} has no calibration file ({device.calibration_fpath}). "
            f"Calibrate it once with the arm connected:\n  {command}"
        )


class _NoPromptCalibration:
    """Replaces lerobot's interactive `calibrate`, which `connect` calls when the motors disagree with
    the calibration file: the file wins, as when a person presses ENTER at lerobot's prompt."""

    def calibrate(self) -> None:
        log.info("writing calibration %s to the motors of %s", self.calibration_fpath, self.id)
        with self.bus.torque_disabled():
            self.bus.write_calibration(self.calibration)


class _Follower(_NoPromptCalibration, SOFollower):
    pass


class _Leader(_NoPromptCalibration, SOLeader):
    pass


@contextmanager
def _device_errors(device, what: str):
    """Turn a failing port or camera into HardwareFault after closing what is left of the device."""
    try:
        yield
    except HardwareFault:
        raise
    except DEVICE_ERRORS as error:
        detail = str(error).strip().splitlines()
        fault = f"{what}: {type(error).__name__}: {detail[0] if detail else ''}"
        if fault != device.fault:  # reconnect attempts fail the same way every second: say it once
            log.error("%s: %s", device.id, fault)
        device.fault = fault
        device.close_quietly()
        raise HardwareFault(device.fault) from error


class _ArmDevice:
    """What the follower and the leader share: lerobot's arm object while connected, the last fault."""

    arm: SOFollower | SOLeader | None
    fault: str | None

    @property
    def is_connected(self) -> bool:
        return self.arm is not None

    @property
    def is_calibrated(self) -> bool:
        return self.arm is not None and self.arm.is_calibrated

    def calibrate(self) -> None:
        """Calibration is lerobot-calibrate's job (see `_NoPromptCalibration`)."""

    def _connect_with_retries(self) -> None:
        """`_connect_arm`, again while the port is there, up to CONNECT_ATTEMPTS in all (a missed status packet)."""
        for attempt in range(1, CONNECT_ATTEMPTS + 1):
            try:
                self._connect_arm()
                return
            except HardwareFault:
                if attempt == CONNECT_ATTEMPTS or not Path(self.config.port).exists():
                    raise

    def _require_connected(self) -> None:
        if self.arm is None:
            raise HardwareFault(self.fault or f"{self.id} is not connected")

    def _close_port(self) -> None:
        try:
            self.arm.bus.port_handler.closePort()
        except Exception:  # noqa: BLE001  a port that failed may refuse even this
            pass
        self.arm = None


@RobotConfig.register_subclass("fedbot_so_arm")
@dataclass(kw_only=True)
class SOArmConfig(RobotConfig):
    arm_type: str = "so101_follower"
    port: str = "/dev/ttyACM0"
    fps: int = 30
    max_relative_target: float = 10.0  # degrees per action (gripper: percent of its range)
    read_retries: int = 2  # lerobot's num_read_retries: tries after a read without a status packet
    torque_off_order: tuple[str, ...] = TORQUE_OFF_ORDER
    episode_seconds: float = 20.0  # a recorded or policy episode on the bench
    reset_seconds: float = 10.0  # between recorded episodes: the operator puts the scene back, unrecorded
    cameras: dict[str, CameraSettings] = field(default_factory=dict)


class SOArm(_ArmDevice, Robot):
    """A follower arm with its cameras (see the module docstring)."""

    config_class = SOArmConfig
    name = "so_arm"

    def __init__(self, config: SOArmConfig):
        super().__init__(config)
        self.config = config
        self.robot_type = config.arm_type
        self.arm: _Follower | None = None
        self.cameras = {}
        self.fault: str | None = None
        self.limits: tuple[np.ndarray, np.ndarray] | None = None
        self.step_limits = StepLimitCount()
        self._frames = 0

    @cached_property
    def observation_features(self) -> dict:
        cameras = {image_key(name): (cam.height, cam.width, 3) for name, cam in self.config.cameras.items()}
        return {OBS_STATE: (len(JOINTS),), **cameras}

    @cached_property
    def action_features(self) -> dict:
        return {ACTION: (len(JOINTS),)}

    @property
    def feature_names(self) -> dict[str, list[str]]:
        return {OBS_STATE: MOTOR_NAMES, ACTION: MOTOR_NAMES}

    @property
    def action_bounds(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The calibrated range of each joint in action units (None until the arm was first connected)."""
        return self.limits

    def connect(self, calibrate: bool = True) -> None:
        """Open the port, check every motor, write the calibration, configure; then the cameras. All or
        nothing: if any part fails (a device, or a camera that is not what the config says), what was
        connected is closed again (the arm's torque off) and the error raised."""
        _require_calibration(self, "robot", self.config.arm_type, self.config.port)
        self._connect_with_retries()
        try:
            for name, settings in self.config.cameras.items():
                with _device_errors(self, f"camera {name} ({settings.index_or_path})"):
                    camera = make_camera(settings)
                    camera.connect()
                    self.cameras[name] = camera
        except HardwareFault:
            raise  # _device_errors closed the arm and the cameras
        except Exception:
            self.close_quietly()
            raise
        self.fault = None
        logging.getLogger().addFilter(self.step_limits)
        log.info("%s connected on %s with %d cameras", self.id, self.config.port, len(self.cameras))

    def _connect_arm(self) -> None:
        self.arm = _Follower(
            SOFollowerRobotConfig(
                id=self.id,
                calibration_dir=self.calibration_dir,
                port=self.config.port,
                max_relative_target=float(self.config.max_relative_target),
                num_read_retries=self.config.read_retries,
                disable_torque_on_disconnect=False,
            )
        )
        with _device_errors(self, f"arm on {self.config.port}"):
            if not Path(self.config.port).exists():
                raise FileNotFoundError(f"{self.config.port} does not exist (unplugged?)")
            self.arm.connect(calibrate=True)
            self.limits = _joint_limits(self.arm)

    def configure(self) -> None:
        """lerobot's SOFollower configures the motors in `connect`."""

    def get_observation(self) -> dict[str, np.ndarray]:
        self._require_connected()
        with _device_errors(self, f"arm on {self.config.port}"):
            joints = self.arm.bus.sync_read("Present_Position", num_retry=self.arm.config.num_read_retries)
        observation = {OBS_STATE: np.array([joints[j] for j in JOINTS], dtype=np.float32)}
        for name, camera in self.cameras.items():
            with _device_errors(self, f"camera {name}"):
                observation[image_key(name)] = camera.read_latest()
        return observation

    def send_action(self, action: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._require_connected()
        low, high = self.limits
        target = np.clip(np.asarray(action[ACTION], dtype=np.float64).reshape(len(JOINTS)), low, high)
        with _device_errors(self, f"arm on {self.config.port}"):
            sent = self.arm.send_action({f"{j}.pos": float(v) for j, v in zip(JOINTS, target, strict=True)})
        self._frames += 1
        return {ACTION: np.array([sent[f"{j}.pos"] for j in JOINTS], dtype=np.float32)}

    def hold(self) -> None:
        """Stop where the arm is: the present position becomes the goal."""
        self._require_connected()
        with _device_errors(self, f"arm on {self.config.port}"):
            self._hold()

    def torque_off(self) -> None:
        """Hold, then disable torque joint by joint in `torque_off_order`."""
        self._require_connected()
        with _device_errors(self, f"arm on {self.config.port}"):
            self._release()
        log.info("%s: torque off (%s)", self.id, ", ".join(self.config.torque_off_order))

    def reset(self, seed: int) -> None:
        """A new episode: the arm takes torque (if a stop turned it off) and the episode clock restarts."""
        self._require_connected()
        with _device_errors(self, f"arm on {self.config.port}"):
            self._hold()
            self.arm.bus.enable_torque(num_retry=2)
        self._frames = 0
        self.step_limits.report(self.id, self.config.max_relative_target)

    def _hold(self) -> None:
        bus = self.arm.bus
        bus.sync_write("Goal_Position", bus.sync_read("Present_Position", num_retry=self.arm.config.num_read_retries))

    def _release(self) -> None:
        self._hold()
        for joint in self.config.torque_off_order:
            self.arm.bus.disable_torque(joint, num_retry=2)

    def episode_status(self) -> EpisodeStatus:
        """On a bench an episode lasts `episode-seconds`; a person judges success, the arm does not."""
        return EpisodeStatus(
            done=self._frames >= self.config.episode_seconds * self.config.fps, success=None, coverage=float("nan")
        )

    def disconnect(self) -> None:
        """Hold, torque off joint by joint, close (SIGTERM and `systemctl stop` end here)."""
        if self.arm is not None:
            self.close_quietly()
            log.info("%s disconnected (torque off: %s)", self.id, ", ".join(self.config.torque_off_order))
        self.step_limits.report(self.id, self.config.max_relative_target)
        logging.getLogger().removeFilter(self.step_limits)

    def close_quietly(self) -> None:
        """After a fault: if the bus still answers (a camera failed, or the arm's port hiccuped), hold
        and turn the torque off in order; then close the port and the cameras, whatever fails."""
        if self.arm is not None:
            try:
                self.arm.bus.port_handler.is_using = False  # an interrupted transaction leaves it set
                self._release()
            except Exception:  # noqa: BLE001  the port is gone: the motors cannot be told anything
                pass
        for camera in self.cameras.values():
            try:
                camera.disconnect()
            except Exception:  # noqa: BLE001  a camera that failed may refuse even this
                pass
        self.cameras = {}
        if self.arm is not None:
            self._close_port()


def _joint_limits(arm: SOFollower) -> tuple[np.ndarray, np.ndarray]:
    """The calibrated range of each joint in the units actions use (lerobot's normalisation)."""
    low, high = [], []
    for joint in JOINTS:
        calibration = arm.bus.calibration[joint]
        if joint == "gripper":  # MotorNormMode.RANGE_0_100
            low.append(0.0)
            high.append(100.0)
            continue
        middle = (calibration.range_min + calibration.range_max) / 2  # MotorNormMode.DEGREES
        degrees_per_step = 360 / (arm.bus.model_resolution_table["sts3215"] - 1)
        low.append((calibration.range_min - middle) * degrees_per_step)
        high.append((calibration.range_max - middle) * degrees_per_step)
    return np.array(low), np.array(high)


@TeleoperatorConfig.register_subclass("fedbot_so_leader")
@dataclass(kw_only=True)
class SOLeaderArmConfig(TeleoperatorConfig):
    arm_type: str = "so101_leader"
    port: str = "/dev/ttyACM1"
    read_retries: int = 2  # as SOArmConfig's


class SOLeaderArm(_ArmDevice, Teleoperator):
    """A leader arm a person moves; its joint positions are the follower's action."""

    config_class = SOLeaderArmConfig
    name = "so_leader_arm"
    realtime = True  # a person operates: recording runs at the robot's rate

    def __init__(self, config: SOLeaderArmConfig):
        super().__init__(config)
        self.config = config
        self.arm: _Leader | None = None
        self.fault: str | None = None

    @property
    def action_features(self) -> dict:
        return {ACTION: (len(JOINTS),)}

    @property
    def feedback_features(self) -> dict:
        return {}

    def connect(self, calibrate: bool = True) -> None:
        _require_calibration(self, "teleop", self.config.arm_type, self.config.port)
        self._connect_with_retries()
        self.fault = None

    def _connect_arm(self) -> None:
        self.arm = _Leader(
            SOLeaderTeleopConfig(
                id=self.id,
                calibration_dir=self.calibration_dir,
                port=self.config.port,
                num_read_retries=self.config.read_retries,
            )
        )
        with _device_errors(self, f"leader arm on {self.config.port}"):
            self.arm.connect(calibrate=True)

    def configure(self) -> None:
        """lerobot's SOLeader configures the motors (torque off) in `connect`."""

    def start_episode(self) -> None:
        """Nothing to prepare: the person moves the leader."""

    def get_action(self) -> dict[str, np.ndarray]:
        self._require_connected()
        with _device_errors(self, f"leader arm on {self.config.port}"):
            joints = self.arm.get_action()
        return {ACTION: np.array([joints[name] for name in MOTOR_NAMES], dtype=np.float32)}

    def send_feedback(self, feedback: dict) -> None:
        """The leader takes no feedback."""

    def disconnect(self) -> None:
        self.close_quietly()

    def close_quietly(self) -> None:
        if self.arm is not None:
            self._close_port()
