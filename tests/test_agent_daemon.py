"""fedbot-agent as a real process: systemd notify protocol, recording through the control API, the
SuperNode while the coordinator is unreachable, checked hot-swaps and rejections through the inbox,
rollback, policy runs preempting federation, and SIGKILL at bad moments."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_agent_models import _flip_bytes, _nan, _truncate, _unsign, _wrong_shape

from agent.config import AgentConfig, ChecksSection, ControlSection, CoordinatorSection, IdleSection
from agent.federation import data_blocker, within_hours
from agent.main import main as agent_main
from fedbot.control_client import request
from fedbot.episode_store import committed_episodes
from fedbot.flower_processes import BIN, free_port
from fedbot.process_group import signal_group
from fedbot.typed_config import write_toml

from helpers import deliver_model, public_key_line
from processes import Followed, NotifySocket, group_alive


def write_config(directory: Path, superlink_port: int, trusted_key: str) -> Path:
    config = AgentConfig(
        robot_id="robot-test",
        data_dir=Path("data"),
        socket=Path("agent.sock"),
        coordinator=CoordinatorSection(superlink=f"127.0.0.1:{superlink_port}", supernode_port=free_port()),
        idle=IdleSection(cooldown_seconds=0.0),
        control=ControlSection(rate_hz=30.0),
        checks=ChecksSection(trusted_keys=[trusted_key]),
    )
    write_toml(directory / "agent.toml", config)
    return directory / "agent.toml"


def start_agent(directory: Path, notify: Path, log_name: str) -> Followed:
    env = {**os.environ, "NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": "1000000", "SVT_LOG": "1"}
    env.pop("JOURNAL_STREAM", None)
    return Followed(
        [str(BIN / "fedbot-agent"), "--config", str(directory / "agent.toml"), "--sim"], directory / log_name, env
    )


def fedbot(directory: Path, *args: str) -> str:
    result = subprocess.run(
        [str(BIN / "fedbot"), *args, "--socket", str(directory / "agent.sock")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.parametrize(
    ("hours", "inside", "outside"),
    [
        ([0, 24], range(24), []),
        ([9, 17], range(9, 17), [8, 17, 23, 0]),
        ([22, 6], [22, 23, 0, 5], [6, 12, 21]),  # across midnight
        ([5, 5], [], [4, 5, 6]),
    ],
)
def test_allowed_hours(hours, inside, outside):
    assert all(within_hours(hour, hours) for hour in inside)
    assert not any(within_hours(hour, hours) for hour in outside)


HOUR = 3600.0


@pytest.mark.parametrize(
    ("episodes", "last_round", "blocker"),
    [
        (0, None, "no episodes recorded"),
        (3, None, None),  # never federated: all its episodes are new
        (5, (3, 1 * HOUR), "2 new episodes since the last round, 3 needed"),
        (6, (3, 1 * HOUR), None),
        (3, (3, 23 * HOUR), "0 new episodes since the last round, 3 needed"),
        (3, (3, 25 * HOUR), None),  # a check-in: counted by the coordinator, sent a model it missed
    ],
)
def test_the_data_rule_for_joining_the_federation(episodes, last_round, blocker):
    rules = IdleSection(min_new_episodes=3, check_in_hours=24.0)
    now = 1_000_000.0
    rounds = [] if last_round is None else [{"episodes": last_round[0], "time": now - last_round[1]}]
    assert data_blocker(episodes, rounds, rules, now) == blocker


@pytest.mark.parametrize(
    "text,message",
    [
        ('robot-id = "r1"\n[idle]\ncooldown = 3\n', "unknown key 'idle.cooldown'"),
        (
            'robot-id = "r1"\n[robot]\ntype = "so101_follower"\nport = "/dev/ttyACM0"\nreset-seconds = -1.0\n',
            "key 'robot.reset-seconds' must be >= 0",
        ),
        (
            'robot-id = "r1"\n[robot]\ntype = "so101_follower"\nport = "/dev/ttyACM0"\n'
            "[checks]\nsim-gate-episodes = 5\n",
            "key 'checks.sim-gate-episodes' must be 0 for a so101_follower",
        ),
        (
            'robot-id = "r1"\n[robot]\ntype = "so101_follower"\nport = "/dev/ttyACM0"\n'
            '[teleop]\ntype = "so101_leader"\nport = "/dev/ttyACM1"\nread-retries = 1000\n',
            "key 'teleop.read-retries' must lie in 0..20, got 1000",
        ),
        (
            'robot-id = "r1"\n[robot]\nscene-part = 4\nscene-parts = 4\n',
            "key 'robot.scene-part' must lie in [0, scene-parts)",
        ),
        ('robot-id = "r1"\n[retention]\nlog-max-mb = 0.0\n', "key 'retention.log-max-mb' must lie in"),
        ('robot-id = "r1"\n[retention]\nrounds = 0\n', "key 'retention.rounds' must lie in 1..1000000"),
    ],
)
def test_bad_config_names_the_key_and_the_file(tmp_path, capsys, text, message):
    config = tmp_path / "agent.toml"
    config.write_text(text)
    assert agent_main(["--config", str(config)]) == 2  # what the fedbot-agent console script runs
    assert f"{config}: {message}" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_unusable_data_dir_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "occupied").write_text("a file where the data directory should be")
    config = tmp_path / "agent.toml"
    config.write_text('robot-id = "r1"\ndata-dir = "occupied/data"\nsocket = "agent.sock"\n')
    assert agent_main(["--config", str(config), "--sim"]) == 2
    error = capsys.readouterr().err
    assert "fedbot-agent: error:" in error and "occupied/data" in error
    assert not (tmp_path / "agent.sock").exists()


def test_agent_life(tmp_path, untrained_policy, lab_key):
    # nothing listens on the SuperLink port: the coordinator is unreachable
    write_config(tmp_path, superlink_port=free_port(), trusted_key=public_key_line(lab_key))
    sock = tmp_path / "agent.sock"
    inbox = tmp_path / "data" / "models" / "inbox"
    notify = NotifySocket(tmp_path / "notify")
    agent = start_agent(tmp_path, notify.path, "agent1.log")
    try:
        ready = notify.wait_for("READY", "1")
        assert ready["STATUS"] == "idle; live model none"
        notify.wait_for("WATCHDOG", "1")  # the control loop ticks, so the watchdog is fed
        assert (sock.stat().st_mode & 0o777) == 0o660

        # A teleop session on the daemon; then the robot is idle with new episodes and joins.
        out = json.loads(fedbot(tmp_path, "record", "--episodes", "2"))  # the CLI, a real process
        assert out["episodes"] == out["kept"] == 2
        agent.wait_for(r"state: idle -> federating", timeout=60)
        status = request(sock, "status")
        assert status["federation"]["supernode-pid"] is not None and status["episodes"] == 2

        # Checked hot-swaps through the inbox; damaged models are rejected, the live one stays.
        deliver_model(untrained_policy, inbox, "round_0001-a", lab_key, 1)
        agent.wait_for(r"model round_0001-a is live", timeout=120)
        for damage in (_flip_bytes, _unsign):  # changed on the way: the signature check refuses them
            deliver_model(untrained_policy, inbox, f"bad{damage.__name__}", lab_key, 2, tamper=damage)
            agent.wait_for(rf"model bad{damage.__name__} rejected: not trusted", timeout=120)
        for damage in (_truncate, _nan, _wrong_shape):  # broken before signing: the later checks refuse them
            deliver_model(untrained_policy, inbox, f"bad{damage.__name__}", lab_key, 2, edit=damage)
            agent.wait_for(rf"model bad{damage.__name__} rejected", timeout=120)
        deliver_model(untrained_policy, inbox, "round_0002-b", lab_key, 2)
        agent.wait_for(r"model round_0002-b is live", timeout=120)
        status = request(sock, "status")
        assert status["live-model"]["name"] == "round_0002-b"
        assert len(status["rejected"]) == 5 and status["last-swap"]["model"] == "round_0002-b"
        assert request(sock, "rollback") == {"live": "round_0001-a"}
        assert "round_0002-b" not in fedbot(tmp_path, "models")

        # Running the policy preempts federating: the SuperNode leaves; the episode is judged.
        result = request(sock, "run", episodes=1, seed=100_000)
        assert result["episodes"] == 1 and result["models"] == ["round_0001-a"]
        text = agent.text()
        assert "state: federating -> idle (running the policy preempts federating)" in text
        assert "state: idle -> running-policy" in text and "SuperNode stopped" in text

        # SIGKILL while a model is half-written and another is being checked.
        (inbox / ".incoming-round_0009-x").mkdir()
        (inbox / ".incoming-round_0009-x" / "model.safetensors").write_bytes(b"half")
        agent.wait_for(r"state: idle -> federating", timeout=60)
        old_supernode = request(sock, "status")["federation"]["supernode-pid"]
        deliver_model(untrained_policy, inbox, "round_0003-c", lab_key, 3)
        agent.wait_for(r"new model round_0003-c: checking", timeout=60)
        os.kill(agent.process.pid, signal.SIGKILL)
        agent.wait(timeout=60)

        agent = start_agent(tmp_path, notify.path, "agent2.log")
        notify.wait_for("READY", "1")
        status = request(sock, "status")
        assert status["live-model"]["name"] in ("round_0001-a", "round_0003-c")  # checked, whichever
        assert status["episodes"] == 2
        agent.wait_for(r"state: idle -> federating", timeout=60)  # rejoins
        assert not group_alive(old_supernode)  # the killed agent's SuperNode is gone

        # SIGKILL while recording: the committed episodes survive and recording continues.
        with ThreadPoolExecutor(1) as pool:
            recording = pool.submit(request, sock, "record", episodes=3)
            agent.wait_for(r"recorded scene \d+: kept", timeout=120)
            os.kill(agent.process.pid, signal.SIGKILL)
            agent.wait(timeout=60)
            with pytest.raises(RuntimeError, match="without answering"):  # the agent died mid-session
                recording.result(timeout=60)
        kept = committed_episodes(tmp_path / "data" / "dataset")
        assert kept >= 3

        agent = start_agent(tmp_path, notify.path, "agent3.log")
        notify.wait_for("READY", "1")
        assert request(sock, "record", episodes=1)["episodes"] == kept + 1

        # SIGTERM: the SuperNode leaves, the agent says STOPPING and exits 0.
        agent.wait_for(r"state: idle -> federating", timeout=60)
        agent.process.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING", "1")
        assert agent.wait(timeout=90) == 0, agent.text()
        assert "SuperNode stopped" in agent.text()
    finally:
        if agent.process.poll() is None:
            agent.kill_group()
        signal_group(agent.process.pid, signal.SIGKILL)
        notify.close()
