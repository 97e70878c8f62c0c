"""The agent's configuration: one TOML file per robot (`fedbot-agent --config /etc/fedbot/agent.toml`).

Example (every key but robot-id has a default):

    robot-id = "robot1"
    data-dir = "/var/lib/fedbot"          # dataset/, federation/ and the agent's own state
    socket = "/run/fedbot/agent.sock"     # the local control API (`fedbot status`, ...)

    [robot]                               # the hardware the agent owns
    type = "pusht_sim"                    # pusht_sim | so100_follower | so101_follower
    scene-part = 0                        # pusht_sim: this robot's part of the scenes (the T's
    scene-parts = 1                       # starting angle in sector scene-part of scene-parts)
    [teleop]                              # who demonstrates in `fedbot record`
    type = "pusht_expert"                 # pusht_expert | pusht_mouse | so100_leader | so101_leader
    style = "default"

An SO-100/SO-101 arm (README, "Bringing up a real arm"):

    [robot]
    type = "so101_follower"
    port = "/dev/serial/by-id/usb-1a86_USB_Single_Serial_5A46081234-if00"
    calibration-dir = "/var/lib/fedbot/calibration"   # <robot-id>.json, made by lerobot-calibrate
    max-relative-target = 10.0            # degrees per action (gripper: percent)
    episode-seconds = 20.0
    reset-seconds = 10.0                  # between recorded episodes, unrecorded: put the scene back
    [robot.cameras.front]
    index-or-path = "/dev/video0"         # a device index, a device path or a video file
    width = 640
    height = 480
    fps = 30
    [teleop]
    type = "so101_leader"
    port = "/dev/serial/by-id/usb-1a86_USB_Single_Serial_5A46085678-if00"
    [coordinator]                         # the lab's SuperLink
    superlink = "lab-server:9092"
    root-certificates = "/etc/fedbot/tls/ca.crt"   # omit for an insecure (development) SuperLink
    auth-key = "/var/lib/fedbot/keys/supernode"    # made on the robot (`fedbot-agent keygen`); omit
                                                   # when the SuperLink does not authenticate robots
    [idle]                                # when the robot may join the federation
    min-new-episodes = 1
    hours = [0, 24]
    cooldown-seconds = 30.0
    [control]
    rate-hz = 10.0
    inference-threads = 1
    [checks]                              # what a new model must pass before it goes live
    trusted-keys = ["ssh-ed25519 AAAAC3Nza... fedbot-coordinator"]   # who may sign models
    keep-models = 5
    sim-gate-episodes = 0
    sim-gate-tolerance = 0.1
    [retention]                           # what grows while the agent runs stays bounded
    log-max-mb = 10.0                     # the SuperNode's log is rotated at this size,
    log-backups = 5                       # and this many rotated files are kept
    rounds = 1000                         # lines of federation/rounds.jsonl kept
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

from fedbot.control_client import DEFAULT_SOCKET
from fedbot.model_manifest import parse_public_key
from fedbot.retention import MAX_LOG_BACKUPS, MAX_LOG_MB, MIN_LOG_MB
from fedbot.scenes import DEFAULT_TASK
from fedbot.typed_config import ConfigError, from_mapping
from hardware.cameras import CameraSettings
from hardware.so_arm import FOLLOWER_TYPES, JOINTS, LEADER_TYPES, TORQUE_OFF_ORDER

ROBOT_TYPES = ("pusht_sim", *FOLLOWER_TYPES)
TELEOP_TYPES = ("pusht_expert", "pusht_mouse", *LEADER_TYPES)
MAX_READ_RETRIES = 20  # 21 tries of ~50 ms: a read that blocks the control loop for a second is a fault


@dataclass(frozen=True)
class RobotSection:
    type: str = "pusht_sim"
    scene_part: int = 0  # pusht_sim only: its scenes are part scene-part of scene-parts (hardware/pusht_sim.py)
    scene_parts: int = 1
    # SO arms only (hardware/so_arm.py); the calibration file is <calibration-dir>/<robot-id>.json
    port: str | None = None
    calibration_dir: Path | None = None  # default: <data-dir>/calibration
    max_relative_target: float = 10.0
    read_retries: int = 2  # lerobot's num_read_retries: again after ~50 ms without a status packet
    torque_off_order: list[str] = field(default_factory=lambda: list(TORQUE_OFF_ORDER))
    episode_seconds: float = 20.0
    reset_seconds: float = 10.0
    cameras: dict[str, CameraSettings] = field(default_factory=dict)


@dataclass(frozen=True)
class TeleopSection:
    type: str = "pusht_expert"
    style: str = "default"  # the scripted operator's style (hardware/pusht_expert.py STYLES)
    task: str = DEFAULT_TASK
    # SO leader arms only; the calibration file is <calibration-dir>/<robot-id>-leader.json
    port: str | None = None
    calibration_dir: Path | None = None  # default: the robot's
    read_retries: int = 2  # as the robot's


@dataclass(frozen=True)
class CoordinatorSection:
    superlink: str = "127.0.0.1:9092"
    root_certificates: Path | None = None
    auth_key: Path | None = None
    supernode_port: int = 9094  # the SuperNode's local ClientAppIo port; one per SuperNode on a host
    retry_max_seconds: float = 300.0  # back-off ceiling between SuperNode restarts


@dataclass(frozen=True)
class IdleSection:
    min_new_episodes: int = 1  # recorded since the robot last trained in a round
    hours: list[int] = field(default_factory=lambda: [0, 24])  # local hours [start, end) it may federate
    cooldown_seconds: float = 30.0  # after recording or running a policy
    check_in_hours: float = 24.0  # joins without new episodes when its last round is older (models it missed)


@dataclass(frozen=True)
class ControlSection:
    rate_hz: float = 10.0
    device: str | None = None  # torch device for the live policy; default cuda if available
    # torch CPU threads for the policy (agent/controller.py: more threads spin against the loop).
    inference_threads: int = 1


@dataclass(frozen=True)
class ChecksSection:
    # Public keys ("ssh-ed25519 AAAA... name") whose signature a model must carry: the coordinator's
    # (<output-dir>/signing.key.pub) and any operator's who signs models by hand. None: no model is taken.
    trusted_keys: list[str] = field(default_factory=list)
    keep_models: int = 5
    sim_gate_episodes: int = 0  # 0: no simulator gate
    sim_gate_tolerance: float = 0.1  # how much lower the candidate's success rate may be


@dataclass(frozen=True)
class RetentionSection:
    """How much the agent keeps of what grows while it runs (models: [checks] keep-models)."""

    log_max_mb: float = 10.0  # the SuperNode's log is rotated at this size
    log_backups: int = 5  # rotated SuperNode logs kept
    rounds: int = 1000  # lines of rounds.jsonl kept (status' rounds-joined counts these)


@dataclass(frozen=True)
class AgentConfig:
    robot_id: str
    data_dir: Path = Path("/var/lib/fedbot")
    socket: Path = DEFAULT_SOCKET
    robot: RobotSection = RobotSection()
    teleop: TeleopSection = TeleopSection()
    coordinator: CoordinatorSection = CoordinatorSection()
    idle: IdleSection = IdleSection()
    control: ControlSection = ControlSection()
    checks: ChecksSection = ChecksSection()
    retention: RetentionSection = RetentionSection()

    @property
    def dataset_root(self) -> Path:
        return self.data_dir / "dataset"

    @property
    def model_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def calibration_dir(self) -> Path:
        return self.robot.calibration_dir or self.data_dir / "calibration"

    def robot_settings(self) -> dict:
        """Keyword settings for hardware.factory.make_robot."""
        if self.robot.type == "pusht_sim":
            return {"scene_part": self.robot.scene_part, "scene_parts": self.robot.scene_parts}
        robot = self.robot
        return {
            "port": robot.port,
            "calibration_dir": self.calibration_dir,
            "fps": round(self.control.rate_hz),
            "max_relative_target": robot.max_relative_target,
            "read_retries": robot.read_retries,
            "torque_off_order": tuple(robot.torque_off_order),
            "episode_seconds": robot.episode_seconds,
            "reset_seconds": robot.reset_seconds,
            "cameras": robot.cameras,
        }

    def teleop_settings(self) -> dict:
        """Keyword settings for hardware.factory.make_teleop."""
        teleop = self.teleop
        if teleop.type in LEADER_TYPES:
            return {
                "id": f"{self.robot_id}-leader",
                "port": teleop.port,
                "calibration_dir": teleop.calibration_dir or self.calibration_dir,
                "read_retries": teleop.read_retries,
            }
        return {"style": teleop.style}

    @property
    def federation_dir(self) -> Path:
        """The ClientApp's outputs (evaluation videos, rounds.jsonl) and the SuperNode's log."""
        return self.data_dir / "federation"


def load_config(path: Path, sim: bool = False) -> AgentConfig:
    """Read and check the agent TOML; `sim` forces the PushT simulator robot."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    if sim:
        data.setdefault("robot", {})
        if isinstance(data["robot"], dict):
            data["robot"] = {**data["robot"], "type": "pusht_sim"}
    config = _relative_to(from_mapping(AgentConfig, data, str(path)), path.resolve().parent)
    _validate(config, str(path))
    return config


def _relative_to(config: AgentConfig, base: Path) -> AgentConfig:
    """Relative paths in the file are relative to the file's directory."""

    def rel(path):
        return None if path is None else base / path

    coordinator, robot, teleop = config.coordinator, config.robot, config.teleop
    cameras = {
        name: camera
        if not isinstance(camera.index_or_path, str)
        else replace(camera, index_or_path=str(base / camera.index_or_path))
        for name, camera in robot.cameras.items()
    }
    return replace(
        config,
        data_dir=base / config.data_dir,
        socket=base / config.socket,
        coordinator=replace(
            coordinator, root_certificates=rel(coordinator.root_certificates), auth_key=rel(coordinator.auth_key)
        ),
        robot=replace(robot, calibration_dir=rel(robot.calibration_dir), cameras=cameras),
        teleop=replace(teleop, calibration_dir=rel(teleop.calibration_dir)),
    )


def _validate(config: AgentConfig, source: str) -> None:
    from hardware.pusht_expert import STYLES

    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"{source}: key {key!r} {why}")

    if not config.robot_id or "/" in config.robot_id or "'" in config.robot_id:
        raise bad("robot-id", f"must be a plain name, got {config.robot_id!r}")
    if config.robot.type not in ROBOT_TYPES:
        raise bad("robot.type", f"must be one of {ROBOT_TYPES}, got {config.robot.type!r}")
    if config.teleop.type not in TELEOP_TYPES:
        raise bad("teleop.type", f"must be one of {TELEOP_TYPES}, got {config.teleop.type!r}")
    if config.teleop.type == "pusht_expert" and config.teleop.style not in STYLES:
        raise bad("teleop.style", f"must be one of {sorted(STYLES)}, got {config.teleop.style!r}")
    if config.robot.scene_parts < 1 or not 0 <= config.robot.scene_part < config.robot.scene_parts:
        raise bad(
            "robot.scene-part",
            f"must lie in [0, scene-parts) with scene-parts >= 1, got "
            f"{config.robot.scene_part} of {config.robot.scene_parts}",
        )
    if config.robot.type in FOLLOWER_TYPES:
        _validate_arm(config, bad)
    if config.teleop.type in LEADER_TYPES and not config.teleop.port:
        raise bad("teleop.port", f"is needed for a {config.teleop.type} (its serial device)")
    if len(config.idle.hours) != 2 or not all(0 <= hour <= 24 for hour in config.idle.hours):
        raise bad("idle.hours", f"must be [start, end] with hours in 0..24, got {config.idle.hours!r}")
    if config.control.rate_hz <= 0:
        raise bad("control.rate-hz", "must be > 0")
    if config.control.inference_threads < 1:
        raise bad("control.inference-threads", "must be >= 1")
    for i, line in enumerate(config.checks.trusted_keys):
        try:
            parse_public_key(line)
        except ValueError as error:
            raise bad(f"checks.trusted-keys[{i}]", str(error)) from None
    if config.checks.keep_models < 2:
        raise bad("checks.keep-models", "must be >= 2 (the live model and one to roll back to)")
    if config.checks.sim_gate_episodes < 0:
        raise bad("checks.sim-gate-episodes", "must be >= 0")
    retention = config.retention
    if not MIN_LOG_MB <= retention.log_max_mb <= MAX_LOG_MB:
        raise bad("retention.log-max-mb", f"must lie in [{MIN_LOG_MB}, {MAX_LOG_MB}], got {retention.log_max_mb!r}")
    if not 1 <= retention.log_backups <= MAX_LOG_BACKUPS:
        raise bad("retention.log-backups", f"must lie in 1..{MAX_LOG_BACKUPS}, got {retention.log_backups!r}")
    if not 1 <= retention.rounds <= 1_000_000:
        raise bad("retention.rounds", f"must lie in 1..1000000, got {config.retention.rounds!r}")
    if not 0 < config.idle.check_in_hours <= 24 * 365:
        raise bad("idle.check-in-hours", f"must lie in (0, 8760], got {config.idle.check_in_hours!r}")
    if config.idle.min_new_episodes < 0 or config.idle.cooldown_seconds < 0:
        raise bad("idle", "min-new-episodes and cooldown-seconds must be >= 0")
    root_certificates = config.coordinator.root_certificates
    if root_certificates is not None and not root_certificates.is_file():
        raise bad("coordinator.root-certificates", f"names {root_certificates}, which does not exist")
    # coordinator.auth-key may not exist yet: `fedbot-agent keygen` or the agent's first start makes it.


def _validate_arm(config: AgentConfig, bad) -> None:
    robot = config.robot
    if not robot.port:
        raise bad("robot.port", f"is needed for a {robot.type} (its serial device)")
    if robot.max_relative_target <= 0:
        raise bad("robot.max-relative-target", "must be > 0")
    for key, retries in (
        ("robot.read-retries", robot.read_retries),
        ("teleop.read-retries", config.teleop.read_retries),
    ):
        if not 0 <= retries <= MAX_READ_RETRIES:
            raise bad(key, f"must lie in 0..{MAX_READ_RETRIES}, got {retries!r}")
    if robot.episode_seconds <= 0:
        raise bad("robot.episode-seconds", "must be > 0")
    if robot.reset_seconds < 0:
        raise bad("robot.reset-seconds", "must be >= 0")
    if config.checks.sim_gate_episodes:
        raise bad(
            "checks.sim-gate-episodes", f"must be 0 for a {robot.type}: the PushT simulator cannot run its policies"
        )
    if sorted(robot.torque_off_order) != sorted(JOINTS):
        raise bad("robot.torque-off-order", f"must name each joint once: {list(JOINTS)}")
    for name, camera in robot.cameras.items():
        if min(camera.width, camera.height, camera.fps) <= 0:
            raise bad(f"robot.cameras.{name}", "width, height and fps must be > 0")
