"""The systemd units in deploy/systemd: `systemd-analyze verify` accepts them, they have the settings the
deployment relies on, and `fedbot-coordinator` speaks the notify protocol (READY=1, STATUS=, STOPPING=1)
to a real datagram socket."""

import configparser
import os
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from coordinator.main import robot_keys
from fedbot.flower_processes import free_port
from fedbot.process_group import signal_group

from processes import Followed, NotifySocket

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "deploy" / "systemd"
BIN = Path(sys.executable).parent
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def unit(name: str) -> configparser.ConfigParser:
    """The unit's settings; of a repeated key only the last value (the units keep one Environment= line)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read(UNITS / f"fedbot-{name}.service")
    return parser


@pytest.mark.parametrize("name", ["agent", "coordinator"])
def test_systemd_analyze_verify_accepts_the_unit(name, tmp_path):
    # scripts/setup.sh installs systemd: without systemd-analyze the check fails rather than skips.
    assert shutil.which("systemd-analyze"), "systemd-analyze is missing: run `make setup` (scripts/setup.sh)"
    assert f"fedbot-{name}" in SCRIPTS, f"ExecStart runs fedbot-{name}, which pyproject.toml does not install"
    # verify checks that ExecStart's binary exists: point /opt/fedbot/.venv at the venv running the tests
    # (this checkout's .venv under make) and the rest of /opt/fedbot at this checkout.
    assert (BIN / f"fedbot-{name}").exists(), "run `make setup` to install the console script"
    copy = tmp_path / f"fedbot-{name}.service"
    text = (UNITS / copy.name).read_text()
    assert "/opt/fedbot/.venv/bin/" in text
    copy.write_text(text.replace("/opt/fedbot/.venv/bin", str(BIN)).replace("/opt/fedbot", str(ROOT)))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60
    )
    # Unknown keys or sections and unparsable values are only warnings (exit 0) naming the file.
    problems = [line for line in (result.stdout + result.stderr).splitlines() if copy.name in line]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr


BOTH = {
    ("Unit", "StartLimitBurst"): "5",
    ("Service", "Type"): "notify",
    ("Service", "NotifyAccess"): "main",
    ("Service", "Restart"): "on-failure",
    ("Service", "KillMode"): "mixed",
    ("Service", "TimeoutStopSec"): "60s",
    ("Service", "StandardOutput"): "journal",
    ("Service", "StandardError"): "journal",
    ("Service", "Environment"): "HF_HUB_OFFLINE=1",
    ("Service", "User"): "fedbot",
    ("Service", "ProtectSystem"): "strict",
    ("Service", "ProtectHome"): "yes",
    ("Service", "PrivateTmp"): "yes",
    ("Service", "NoNewPrivileges"): "yes",
    ("Service", "ConfigurationDirectory"): "fedbot",
    ("Install", "WantedBy"): "multi-user.target",
}
EXPECTED = {
    "agent": {
        **BOTH,
        ("Service", "WatchdogSec"): "10s",
        ("Service", "SupplementaryGroups"): "dialout",
        ("Service", "StateDirectory"): "fedbot",
        ("Service", "RuntimeDirectory"): "fedbot",
        ("Service", "RuntimeDirectoryMode"): "0750",
        ("Service", "ExecStart"): "/opt/fedbot/.venv/bin/fedbot-agent --config /etc/fedbot/agent.toml",
    },
    "coordinator": {
        **BOTH,
        ("Service", "StateDirectory"): "fedbot-coordinator",
        ("Service", "ExecStart"): "/opt/fedbot/.venv/bin/fedbot-coordinator serve --tls /etc/fedbot/tls --auth "
        "--register-dir /etc/fedbot/robots",
    },
}


@pytest.mark.parametrize(
    "name, section, key, words",
    [(name, section, key, words) for name, table in EXPECTED.items() for (section, key), words in table.items()],
)
def test_unit_has_the_setting(name, section, key, words):
    value = unit(name).get(section, key, fallback="")
    assert set(words.split()) <= set(value.split()), f"fedbot-{name}.service [{section}] {key}={value!r}"


def test_only_the_agent_has_a_watchdog_and_serial_ports():
    coordinator = unit("coordinator")["Service"]
    assert "WatchdogSec" not in coordinator and "dialout" not in coordinator.get("SupplementaryGroups", "")


def test_register_dir_takes_every_public_key_in_it(tmp_path):
    robots = tmp_path / "robots"
    robots.mkdir()
    for name in ("robot1.pub", "robot0.pub", "robot0", "notes.txt"):
        (robots / name).write_text("")
    one = tmp_path / "extra.pub"
    one.write_text("")
    assert robot_keys([one], [robots]) == [one, robots / "robot0.pub", robots / "robot1.pub"]
    with pytest.raises(ValueError, match="nope"):
        robot_keys([], [tmp_path / "nope"])


def test_coordinator_notifies_ready_and_stopping(tmp_path):
    notify = tmp_path / "notify"
    sock = NotifySocket(notify)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NOTIFY_SOCKET": str(notify), "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("JOURNAL_STREAM", None)  # plain lines on stderr, as in a terminal
    command = [
        str(BIN / "fedbot-coordinator"),
        "serve",  # as the unit starts it
        "--state-dir",
        str(tmp_path / "state"),
        "--port",
        str(free_port()),
        "--output-dir",
        str(tmp_path / "outputs"),
    ]
    coordinator = Followed(command, tmp_path / "coordinator.log", env)
    superlink_pid = None

    try:
        message = sock.wait_for("READY", "1")
        assert message["STATUS"].startswith("robots can join at 127.0.0.1:")
        superlink_pid = int(coordinator.wait_for(r"SuperLink up at .*, pid (\d+)", timeout=60).group(1))
        coordinator.wait_for(r"ready: robots can join at", timeout=60)

        # As systemd with KillMode=mixed: SIGTERM to the main process only.
        coordinator.process.send_signal(signal.SIGTERM)
        sock.wait_for("STOPPING", "1")
        assert coordinator.wait(timeout=90) == 0, coordinator.text()
        assert "stopping (SIGTERM)" in coordinator.text()
    finally:
        if coordinator.process.poll() is None:
            coordinator.kill_group(signal.SIGTERM)
        signal_group(coordinator.process.pid, signal.SIGKILL)
        if superlink_pid is not None:
            signal_group(superlink_pid, signal.SIGKILL)
        sock.close()
