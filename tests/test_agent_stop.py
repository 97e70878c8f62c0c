"""SIGTERM (`systemctl stop`) ends fedbot-agent cleanly, with exit code 0 well within the unit's
TimeoutStopSec, in every state: idle, recording, running the policy, swapping a model in, and
federating with its SuperNode in a round of a real coordinator (several times, at different moments
of the round). Each activity ends the way an operator expects: a recording's client hears what was
kept, a policy run's client gets the episodes run so far, a model being checked is not lost, the
SuperNode's processes are gone. An arm's torque off on SIGTERM: tests/test_agent_faults.py (while
recording) and tests/test_agent_arm.py (while the policy runs)."""

from __future__ import annotations

import os
import select
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from agent.config import IdleSection
from fedbot.control_client import request
from fedbot.episode_store import VERSIONS_DIR, WORK_PREFIX, committed_episodes
from fedbot.flower_processes import BIN, free_port
from fedbot.run_config import RunConfig
from fedbot.typed_config import changed_keys

from agent_bench import STOP_BOUND, start_agent, stop, wait_for_text, wait_group_gone, write_config
from helpers import deliver_model, record_wander
from processes import Followed, NotifySocket


def wait_for_clientapp_cpu(pgid: int, seconds: float, timeout: float) -> None:
    """Until a ClientApp of the SuperNode's process group (forked from its fork server, the leader's
    child) has computed for `seconds` of CPU time: it is loading the robot's data or training."""
    deadline = time.monotonic() + timeout
    tick = os.sysconf("SC_CLK_TCK")
    while time.monotonic() < deadline:
        processes = {}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[2]) == pgid:  # state ppid pgrp ... utime(11) stime(12)
                processes[int(proc.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
        fork_servers = {pid for pid, (ppid, _) in processes.items() if ppid == pgid}
        if any(ppid in fork_servers and cpu >= seconds for ppid, cpu in processes.values()):
            return
        select.select([], [], [], 0.2)  # back off before looking again
    raise AssertionError(f"no ClientApp of process group {pgid} computed for {seconds} s within {timeout} s")


def test_sigterm_ends_each_local_activity_in_a_clean_stop(tmp_path, untrained_policy, lab_key):
    """One agent process per state: recording, running the policy, checking a model. (Idle: the
    tests of tests/test_agent_faults.py and tests/test_agent_control_api.py end with a SIGTERM while
    idle or running the policy, each checked by `stop` too.)"""
    write_config(tmp_path, trusted=lab_key)
    sock, inbox = tmp_path / "agent.sock", tmp_path / "data" / "models" / "inbox"
    dataset = tmp_path / "data" / "dataset"
    notify = NotifySocket(tmp_path / "notify")
    agents: list[Followed] = []

    def start(state: str) -> Followed:
        agents.append(start_agent(tmp_path, notify.path, f"agent-{state}.log"))
        notify.wait_for("READY", "1")
        return agents[-1]

    try:
        agent = start("recording")
        with ThreadPoolExecutor(1) as pool:
            session = pool.submit(request, sock, "record", episodes=20)
            agent.wait_for(r"recorded scene \d+: kept", timeout=300)
            stop(agent)
            with pytest.raises(RuntimeError, match=r"the agent is stopping: recording stopped after \d+ of 20"):
                session.result(timeout=STOP_BOUND)
        assert "the agent is stopping" in agent.text()
        assert committed_episodes(dataset) >= 1
        assert not [p for p in (dataset / VERSIONS_DIR).iterdir() if p.name.startswith(WORK_PREFIX)]

        deliver_model(untrained_policy, inbox, "round_0001-a", lab_key, 1)
        agent = start("running-policy")
        agent.wait_for(r"model round_0001-a is live", timeout=120)
        with ThreadPoolExecutor(1) as pool:
            run = pool.submit(request, sock, "run", episodes=1000, seed=100_000)
            agent.wait_for(r"policy episode 1: ", timeout=300)
            stop(agent)
            result = run.result(timeout=STOP_BOUND)  # the client gets the episodes run until the stop
        assert 1 <= result["episodes"] < 1000 and result["models"] == ["round_0001-a"]
        text = agent.text()
        assert text.index("the robot holds") < text.index("agent stopped")

        agent = start("swapping")
        deliver_model(untrained_policy, inbox, "round_0002-b", lab_key, 2)
        agent.wait_for(r"new model round_0002-b: checking", timeout=60)
        stop(agent)
        live = (tmp_path / "data" / "models" / "store" / "history.json").read_text()
        assert (inbox / "round_0002-b").is_dir() or '"round_0002-b"' in live  # not lost: live, or checked again
    finally:
        for agent in agents:
            if agent.process.poll() is None:
                agent.kill_group()
        notify.close()


def test_an_agent_that_cannot_start_exits_with_the_error_instead_of_hanging(tmp_path):
    """The control socket is open and the robot connected when the start fails (the store's history
    is damaged): the agent says why and exits with code 2, it does not wait for anything forever."""
    write_config(tmp_path)
    history = tmp_path / "data" / "models" / "store" / "history.json"
    history.parent.mkdir(parents=True)
    history.write_text('["round_0001-a"')  # cut short
    notify = NotifySocket(tmp_path / "notify")
    agent = start_agent(tmp_path, notify.path, "agent.log")
    try:
        assert agent.wait(timeout=STOP_BOUND + 60) == 2, agent.text()  # + the start: imports, the robot
        assert f"fedbot-agent: error: {history} is not a JSON list of model names" in agent.text()
        assert not (tmp_path / "agent.sock").exists()
    finally:
        if agent.process.poll() is None:
            agent.kill_group()
        notify.close()


def test_sigterm_ends_a_federating_agent_mid_round_in_a_clean_stop(tmp_path):
    """A real coordinator and three robots whose SuperNodes train in the same round. SIGTERM reaches
    each agent at another moment of the round: as the training message arrives, once the ClientApp
    is loaded, once it has computed for 3 s. Each agent stops cleanly and takes its SuperNode's whole
    process group with it."""
    port = free_port()
    robots = [tmp_path / f"robot{i}" for i in range(3)]
    for i, robot in enumerate(robots):
        record_wander(robot / "data" / "dataset", 2, steps=40, seed_start=10 * i)
        idle = IdleSection(min_new_episodes=0, cooldown_seconds=0.0)
        write_config(robot, superlink_port=port, robot_id=f"robot{i}", idle=idle)
    run_config = RunConfig(
        num_server_rounds=10,
        local_steps=2000,  # a round lasts longer than the test needs it to
        batch_size=8,
        min_nodes=len(robots),  # every robot trains in round 1
        fraction_evaluate=0.0,
        eval_every=1000,
    )
    coordinator = Followed(
        [
            str(BIN / "fedbot-coordinator"),
            "run",
            "--state-dir",
            str(tmp_path / "coordinator"),
            "--port",
            str(port),
            "--output-dir",
            str(tmp_path / "outputs"),
            "--run-config",
            changed_keys(run_config),
        ],
        tmp_path / "coordinator.log",
        {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{BIN}:{os.environ['PATH']}"},
    )
    notify = NotifySocket(tmp_path / "notify")
    agents: list[Followed] = []
    try:
        coordinator.wait_for(r"ready: robots can join", timeout=300)
        agents = [start_agent(robot, notify.path, "agent.log") for robot in robots]
        pgids = []
        for robot, agent in zip(robots, agents, strict=True):
            agent.wait_for(r"state: idle -> federating", timeout=300)
            pgids.append(request(robot / "agent.sock", "status")["federation"]["supernode-pid"])
        # as the training message arrives, once the ClientApp is loaded, once it has computed for 3 s
        moments = [None, "Loading ClientApp", 3.0]
        for robot, agent, pgid, moment in zip(robots, agents, pgids, moments, strict=True):
            log = robot / "data" / "supernode" / "supernode.log"
            offset = wait_for_text(log, r"Receiving: train message", timeout=300)
            if isinstance(moment, str):
                wait_for_text(log, moment, timeout=120, after=offset)
            elif moment is not None:
                wait_for_clientapp_cpu(pgid, moment, timeout=300)
            took = stop(agent)
            assert wait_group_gone(pgid, timeout=5.0) == [], f"{robot.name}'s SuperNode outlived its agent"
            assert "SuperNode stopped" in agent.text()
            print(f"SIGTERM in round 1 ({robot.name}, {moment!r}): the agent stopped in {took:.1f} s")
        assert "round 1: training on 3 robots" in coordinator.text()
    finally:
        for agent in agents:
            if agent.process.poll() is None:
                agent.kill_group()
        if coordinator.process.poll() is None:
            coordinator.kill_group(signal.SIGTERM)
        notify.close()
