"""`fedbot hardware check`: is every device of a robot's agent config there and answering?

Lists the serial ports the system sees, pings every motor of the follower and leader arms on their
ports (lerobot's Feetech bus, no calibration needed), checks the calibration files, and reads one
frame from each camera. Each row says what is missing and what to do. Run it while the agent is
stopped: two processes on one serial port corrupt each other's packets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from serial.tools import list_ports

from hardware.so_arm import FOLLOWER_TYPES, JOINTS, LEADER_TYPES, calibration_command


@dataclass(frozen=True)
class Finding:
    part: str
    ok: bool
    detail: str
    fix: str = ""


def check_hardware(config) -> list[Finding]:
    """Findings for the robot and teleop of an agent config (agent/config.py AgentConfig)."""
    findings = [
        Finding(f"serial port {port.device}", True, port.description or "")
        for port in sorted(list_ports.comports(), key=lambda p: p.device)
    ]
    if config.robot.type in FOLLOWER_TYPES:
        findings += _check_arm("robot", config.robot.type, config.robot.port, config.robot_id, config.calibration_dir)
        for name, camera in config.robot.cameras.items():
            findings.append(_check_camera(name, camera))
    if config.teleop.type in LEADER_TYPES:
        settings = config.teleop_settings()
        findings += _check_arm(
            "teleop", config.teleop.type, settings["port"], settings["id"], settings["calibration_dir"]
        )
    return findings


def _check_arm(kind: str, arm_type: str, port: str, arm_id: str, calibration_dir: Path) -> list[Finding]:
    from lerobot.motors import Motor, MotorNormMode
    from lerobot.motors.feetech import FeetechMotorsBus

    part = f"{arm_type} {arm_id!r}"
    calibration = Path(calibration_dir) / f"{arm_id}.json"
    findings = [
        Finding(
            f"{part} calibration",
            calibration.is_file(),
            str(calibration),
            "" if calibration.is_file() else calibration_command(kind, arm_type, port, arm_id, calibration_dir),
        )
    ]
    if not Path(port).exists():
        return [
            Finding(
                f"{part} port",
                False,
                f"{port} does not exist",
                "plug in the arm's USB adapter; `lerobot-find-port` tells which device it is",
            ),
            *findings,
        ]
    motors = {joint: Motor(i + 1, "sts3215", MotorNormMode.DEGREES) for i, joint in enumerate(JOINTS)}
    bus = FeetechMotorsBus(port, motors)
    try:
        bus.connect(handshake=False)
    except ConnectionError as error:
        return [
            Finding(
                f"{part} port",
                False,
                f"{port}: {str(error).strip().splitlines()[0]}",
                "check permissions (the dialout group) and that nothing else has the port open",
            ),
            *findings,
        ]
    findings.insert(0, Finding(f"{part} port", True, port))
    try:
        for joint, motor in motors.items():
            model = bus.ping(joint, num_retry=2)
            expected = bus.model_number_table[motor.model]
            ok = model == expected
            detail = f"id {motor.id}: " + ("no answer" if model is None else f"model {model}, expected {expected}")
            fix = (
                ""
                if ok
                else (f"check the cable to motor {motor.id} and its power; `lerobot-setup-motors` sets motor ids")
            )
            findings.append(Finding(f"{part} motor {joint}", ok, "model sts3215" if ok else detail, fix))
    finally:
        bus.port_handler.closePort()
    return findings


def _check_camera(name: str, settings) -> Finding:
    from hardware.cameras import make_camera

    part = f"camera {name}"
    try:
        camera = make_camera(settings)
        camera.connect()
        try:
            frame = camera.async_read(timeout_ms=2000)
        finally:
            camera.disconnect()
    except Exception as error:  # noqa: BLE001  any failure of the camera is a finding, not a crash
        return Finding(
            part,
            False,
            f"{settings.index_or_path}: {type(error).__name__}: {error}",
            "check the index or path; `lerobot-find-cameras opencv` lists the cameras it finds",
        )
    return Finding(part, True, f"{settings.index_or_path}: frame {frame.shape[1]}x{frame.shape[0]}")
