"""Stopping a service's process tree: what was started below it in sessions of its own (Flower's
simulation, Ray's workers) goes with it."""

from __future__ import annotations

import os
import select
import subprocess
import sys

from fedbot.process_group import groups_below, processes_with, stop_with_sessions_below

SPAWNER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
print(child.pid, flush=True)
time.sleep(600)
"""


def test_a_stopped_leader_takes_the_sessions_started_below_it():
    leader = subprocess.Popen(
        [sys.executable, "-c", SPAWNER], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    session = int(leader.stdout.readline())  # its own session: signalling the leader's group misses it
    exited = os.pidfd_open(session)  # readable once the process has ended
    try:
        assert groups_below(leader.pid) == {session}
        stop_with_sessions_below(leader, timeout=30)
        assert leader.returncode is not None
        assert select.select([exited], [], [], 30)[0] == [exited]
    finally:
        os.close(exited)
        leader.stdout.close()


def test_leftover_services_are_found_by_their_environment_and_program(tmp_path):
    service = tmp_path / "flwr-serverapp"  # a script of that name, as Flower's entry points are
    service.write_text("import sys; sys.stdin.read()\n")
    started = [
        subprocess.Popen([sys.executable, str(script), *args], stdin=subprocess.PIPE, env={**os.environ, **env})
        for script, args, env in (
            (service, [], {"FLWR_HOME": str(tmp_path / "home")}),  # the leftover
            (service, [], {"FLWR_HOME": str(tmp_path / "elsewhere")}),  # another coordinator's
            (tmp_path / "flwr-serverapp", ["--flag"], {}),  # no FLWR_HOME
        )
    ]
    try:
        found = processes_with("FLWR_HOME", str(tmp_path / "home"), {"flwr-serverapp"})
        assert found == [started[0].pid]
        assert processes_with("FLWR_HOME", str(tmp_path / "home"), {"flower-superlink"}) == []
    finally:
        for process in started:
            process.stdin.close()
            process.wait(timeout=30)
