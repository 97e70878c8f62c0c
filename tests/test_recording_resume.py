"""A recording session interrupted by SIGKILL (a crash, a power cut) is resumed for its remaining
episodes: the dataset ends with exactly the planned episodes, each scene once, all readable. Through
`fedbot record --sim` (a real recorder process killed mid-session), through recorders killed at
named points of the commit, and through the agent, which resumes only when asked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from test_episode_store import STEPS, assert_readable

from agent.control_requests import ControlRequests
from fedbot.control_client import request
from fedbot.episode_store import committed_episodes, episode_notes
from fedbot.flower_processes import BIN
from fedbot.process_group import signal_group
from fedbot.session_plan import interrupted_session, plan_path

from agent_bench import start_agent, write_config
from helpers import wander_session
from processes import NotifySocket, run_crash_recorders

ROOT = Path(__file__).resolve().parents[1]


def seeds(root: Path) -> list[int]:
    """The scene seed of each committed episode, in episode order."""
    notes = episode_notes(root)
    return [notes[index]["seed"] for index in sorted(notes)]


def assert_every_episode_decodes(root: Path, episodes: int) -> None:
    dataset = LeRobotDataset(f"fedbot/{root.name}", root=root)
    assert dataset.meta.total_episodes == episodes
    for episode in range(episodes):
        first, last = (
            dataset.meta.episodes[episode]["dataset_from_index"],
            dataset.meta.episodes[episode]["dataset_to_index"],
        )
        for index in (first, last - 1):
            item = dataset[index]
            assert int(item["episode_index"]) == episode and item["observation.image"].shape == (3, 96, 96)


def test_fedbot_record_killed_mid_session_resumes_for_the_remaining_episodes(tmp_path, capsys):
    from cli.main import main

    root, planned = tmp_path / "robot0", 5
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SVT_LOG": "1"}
    command = [sys.executable, "-m", "cli.main", "record", "--sim", "--root", str(root)]
    recorder = subprocess.Popen(
        [*command, "--episodes", str(planned), "--keep-failed", "--seed", "40", "--style", "swift"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while committed_episodes(root) < 2:
        assert recorder.poll() is None, recorder.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "the recorder committed fewer than 2 episodes in 300 s"
        time.sleep(0.05)
    recorder.kill()  # SIGKILL, wherever it is: between episodes, mid-episode or mid-commit
    assert recorder.wait(timeout=60) == -signal.SIGKILL
    recorder.stderr.close()
    done = committed_episodes(root)
    assert 2 <= done < planned, "the session ended before the kill: nothing left to resume"
    plan = interrupted_session(root)
    assert (plan.remaining, plan.next_seed, plan.sim.style) == (planned - done, 40 + done, "swift")

    assert main(["record", "--sim", "--root", str(root), "--resume"]) == 0
    assert f"{root} now holds {planned} episodes" in capsys.readouterr().out
    assert seeds(root) == list(range(40, 40 + planned))  # each planned scene once
    assert_every_episode_decodes(root, planned)
    assert not plan_path(root).exists()

    assert main(["record", "--sim", "--root", str(root), "--resume"]) == 2
    assert "has no interrupted recording session to resume" in capsys.readouterr().err
    assert main(["record", "--sim", "--root", str(root), "--resume", "--episodes", "3", "--seed", "9"]) == 2
    assert "takes no --episodes, --seed" in capsys.readouterr().err
    assert main(["record", "--sim", "--root", str(root)]) == 2
    assert "--episodes N" in capsys.readouterr().err


KILLS = [
    ("add_frame", STEPS + 5, 1),  # killed mid-episode 2
    ("save_plan", 3, 2),  # episode 2 committed, its attempt not yet noted in the plan
    ("replace", 3, 2),  # episode 3 in its version directory, not yet current
]
PLANNED = 4


@pytest.fixture(scope="module")
def killed_sessions(tmp_path_factory) -> dict:
    """One real recorder process per kill point, each planning PLANNED episodes into its own dataset
    and SIGKILLing itself before the `at_call`-th call of `point` (started together, as in
    tests/test_episode_store.py). Returns (dataset root, exit code, stderr) per (point, at_call)."""
    return run_crash_recorders(tmp_path_factory.mktemp("interrupted"), KILLS, PLANNED)


@pytest.mark.parametrize(("point", "at_call", "committed"), KILLS)
def test_a_session_killed_at_any_point_resumes_to_exactly_its_planned_episodes(
    killed_sessions, point, at_call, committed
):
    root, code, stderr = killed_sessions[point, at_call]
    assert code == -9, stderr[-2000:]
    assert committed_episodes(root) == committed
    plan = interrupted_session(root)
    assert (plan.remaining, plan.next_seed) == (PLANNED - committed, committed)
    report = wander_session(root, plan, STEPS)
    assert report.attempted == PLANNED - committed and report.total_episodes == PLANNED
    assert seeds(root) == list(range(PLANNED))
    assert_readable(root, PLANNED)
    assert interrupted_session(root) is None


def test_the_record_request_resumes_only_as_asked():
    calls = []
    requests = ControlRequests(
        status=dict,
        models=None,
        record=lambda *args: calls.append(args) or {},
        run=lambda *args: {},
        stop=dict,
        rollback=dict,
    )
    requests.handle({"command": "record", "resume": True})
    requests.handle({"command": "record", "resume": False, "episodes": 2, "task": "t"})
    assert calls == [(None, None, True), (2, "t", False)]
    for bad, reason in [
        ({"resume": True, "episodes": 2}, "no 'episodes' or 'task'"),
        ({"resume": True, "task": "t"}, "no 'episodes' or 'task'"),
        ({"resume": "yes"}, "'resume' must be true or false, got 'yes'"),
        ({"resume": 1}, "'resume' must be true or false, got 1"),
        ({"resume": False}, "'episodes' must be"),
    ]:
        with pytest.raises(ValueError, match=reason):
            requests.handle({"command": "record", **bad})


def test_the_agent_resumes_an_interrupted_session_only_when_asked(tmp_path):
    write_config(tmp_path)
    sock, dataset = tmp_path / "agent.sock", tmp_path / "data" / "dataset"
    notify = NotifySocket(tmp_path / "notify")
    agent = start_agent(tmp_path, notify.path, "agent1.log")
    try:
        notify.wait_for("READY", "1")
        with ThreadPoolExecutor(1) as pool:
            session = pool.submit(request, sock, "record", episodes=3)
            agent.wait_for(r"recorded scene 0: kept", timeout=300)
            os.kill(agent.process.pid, signal.SIGKILL)
            agent.wait(timeout=60)
            with pytest.raises(RuntimeError, match="without answering"):
                session.result(timeout=60)
        done = committed_episodes(dataset)
        assert 1 <= done < 3

        agent = start_agent(tmp_path, notify.path, "agent2.log")
        notify.wait_for("READY", "1")
        status = request(sock, "status")
        assert status["interrupted-recording"]["left"] == 3 - done
        assert "`fedbot record --resume` continues it" in agent.text()
        time.sleep(2.0)  # the restarted agent does not record, or move the robot, by itself
        status = request(sock, "status")
        assert status["state"] == "idle" and status["recording"] is None and status["episodes"] == done
        assert status["control"]["mode"] == "hold"  # the robot holds where it is

        result = subprocess.run(
            [str(BIN / "fedbot"), "record", "--resume", "--socket", str(sock)],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert result.returncode == 0, result.stdout + result.stderr
        reply = json.loads(result.stdout)
        assert reply["attempted"] == 3 - done and reply["episodes"] == 3
        assert seeds(dataset) == [0, 1, 2]
        status = request(sock, "status")
        assert status["interrupted-recording"] is None and status["episodes"] == 3
        with pytest.raises(RuntimeError, match="no interrupted recording session to resume"):
            request(sock, "record", resume=True)
    finally:
        if agent.process.poll() is None:
            agent.kill_group()
        signal_group(agent.process.pid, signal.SIGKILL)
