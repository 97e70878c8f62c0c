"""The control socket of fedbot-agent, as a real process, against bad clients: a seeded random
fuzzer (random bytes, a huge line, invalid JSON, wrong types, out-of-range numbers, unknown commands
and arguments), clients that never finish their line, and more clients than the agent serves at
once; each gets a clear error or is disconnected, and the agent keeps serving and controlling.
And a rollback asked for while a model is being swapped in, which waits for that swap."""

from __future__ import annotations

import json
import random
import re
import resource
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from agent.config import ChecksSection
from agent.control_api import MAX_CLIENTS, MAX_REQUEST, READ_TIMEOUT
from agent.control_requests import MAX_EPISODES, MAX_SEED, MAX_TASK
from fedbot.control_client import request
from fedbot.recording import EVAL_SEED_START

from agent_bench import start_agent, status_until, stop, write_config
from helpers import deliver_model
from processes import NotifySocket

REPLY_BOUND = 10.0  # seconds within which any client gets its answer (a bad request is answered at once)


def exchange(path: Path, data: bytes, finish: bool = True) -> dict:
    """Send `data` as one client (then close our side if `finish`) and read the agent's one-line reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(REPLY_BOUND)
        client.connect(str(path))
        try:
            client.sendall(data)
            if finish:
                client.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):  # the agent stopped reading a line that is too long
            pass
        line = client.makefile("rb").readline()
    assert line.endswith(b"\n"), f"no reply line to {data[:80]!r}"
    return json.loads(line)


def acting(path: Path, more_than: int, timeout: float = 60.0) -> int:
    """Until the agent's control loop has sent more than `more_than` actions to the robot; returns the count."""
    return status_until(path, lambda status: status["control"]["actions"] > more_than, timeout)["control"]["actions"]


def disconnected(client: socket.socket) -> bool:
    """The agent closed this connection (a reset: it closed with our bytes unread)."""
    try:
        return client.recv(1) == b""
    except ConnectionResetError:
        return True


def bad_requests(rng: random.Random) -> list[tuple[bytes, str]]:
    """Requests the agent must refuse, each with a piece of the error it must give."""
    bad_counts = [0, -1, MAX_EPISODES + 1, 10**9, 1.5, True, False, "3", [], {}, None]
    bad_seeds = [EVAL_SEED_START - 1, -1, 0, MAX_SEED, 2**63, 1.5, True, "100000", [100000]]
    cases: list[tuple[bytes, str]] = []
    for _ in range(40):
        noise = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        cases.append((noise.replace(b"\n", b"") + b"\n", ""))  # whatever it is, a refusal
    cases += [
        (b"x" * (MAX_REQUEST + 10) + b"\n", "longer than"),
        (b'{"command": "status", "pad": "' + b"a" * (3 * MAX_REQUEST) + b'"}\n', "longer than"),
        (b"[" * 30_000 + b"]" * 30_000 + b"\n", "not a JSON request"),  # nesting deeper than the parser goes
        (b"\n", "not a JSON request"),
        (b"", "not a JSON request"),
        (b'{"command": "status"', "not a JSON request"),
        (b"\xff\xfe{}\n", "not a JSON request"),
    ]
    for value in ([1, 2], "status", 42, None, {"cmd": "status"}, {"command": 5}, {"command": None}):
        cases.append((json.dumps(value).encode() + b"\n", '"command" string'))
    for _ in range(20):
        name = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz-_ ") for _ in range(rng.randrange(1, 30)))
        if name not in ("status", "models", "record", "run", "stop", "rollback"):
            cases.append((json.dumps({"command": name}).encode() + b"\n", "unknown command"))
    for count in bad_counts:
        cases.append((json.dumps({"command": "record", "episodes": count}).encode() + b"\n", "'episodes' must be"))
        if count is not None:
            cases.append((json.dumps({"command": "run", "episodes": count}).encode() + b"\n", "'episodes' must be"))
    for seed in bad_seeds:
        cases.append((json.dumps({"command": "run", "seed": seed}).encode() + b"\n", "'seed' must be"))
    cases += [
        (b'{"command": "run", "seed": NaN}\n', "'seed' must be"),
        (b'{"command": "run", "episodes": Infinity}\n', "'episodes' must be"),
        (json.dumps({"command": "run", "episodes": 2, "seed": MAX_SEED - 1}).encode() + b"\n", "'seed' must be"),
        (json.dumps({"command": "record", "episodes": 1, "task": 5}).encode() + b"\n", "'task' must be"),
        (json.dumps({"command": "record", "episodes": 1, "task": ""}).encode() + b"\n", "'task' must be"),
        (
            json.dumps({"command": "record", "episodes": 1, "task": "x" * (MAX_TASK + 1)}).encode() + b"\n",
            "'task' must be",
        ),
    ]
    for command in ("status", "models", "stop", "rollback", "record", "run"):
        cases.append((json.dumps({"command": command, "force": True}).encode() + b"\n", "unknown argument 'force'"))
    rng.shuffle(cases)
    return cases


def test_bad_clients_get_clear_errors_and_the_agent_keeps_serving_and_controlling(tmp_path, untrained_policy, lab_key):
    write_config(tmp_path, trusted=lab_key)
    sock = tmp_path / "agent.sock"
    notify = NotifySocket(tmp_path / "notify")
    agent = start_agent(tmp_path, notify.path, "agent.log")
    try:
        notify.wait_for("READY", "1")
        deliver_model(untrained_policy, tmp_path / "data" / "models" / "inbox", "round_0001-a", lab_key, 1)
        agent.wait_for(r"model round_0001-a is live", timeout=120)
        assert request(sock, "run") == {"running": True}
        before = acting(sock, more_than=0)

        # A seeded fuzzer, 8 clients at a time, a valid status request between every few bad ones.
        cases = bad_requests(random.Random(20240611))
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda case: exchange(sock, case[0]), cases))
        for (data, expected), reply in zip(cases, replies, strict=True):
            assert reply["ok"] is False and isinstance(reply["error"], str) and reply["error"], (data[:80], reply)
            assert expected in reply["error"], (data[:80], reply)
        status = request(sock, "status")
        assert status["state"] == "running-policy" and status["faults"] == []
        acting(sock, more_than=before)  # the policy still drives the robot
        assert request(sock, "status")["control"]["policy-error"] is None

        # Clients that never finish their line, more than the agent serves at once: those beyond the
        # limit are told at once; the others are answered and disconnected after the read timeout.
        idle = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(MAX_CLIENTS + 4)]
        started = time.monotonic()
        for client in idle:
            client.settimeout(READ_TIMEOUT + REPLY_BOUND)
            client.connect(str(sock))
            try:
                client.sendall(b'{"command": "sta')  # ... and nothing more
            except BrokenPipeError:  # told "busy" and closed before this line went: the answer is still there
                pass
        answers = [json.loads(client.makefile("rb").readline()) for client in idle]
        took = time.monotonic() - started
        busy = [a for a in answers if "busy" in a["error"]]
        timed_out = [a for a in answers if f"no complete request line within {READ_TIMEOUT:.0f} s" in a["error"]]
        assert len(busy) >= 4 and len(busy) + len(timed_out) == len(idle) and len(timed_out) >= 1
        assert READ_TIMEOUT <= took < READ_TIMEOUT + REPLY_BOUND
        for client in idle:
            assert disconnected(client)
            client.close()

        status = request(sock, "status")  # still serving, still controlling, still fed
        assert status["state"] == "running-policy" and status["faults"] == []
        assert status["control"]["mode"] == "run" and status["live-model"]["name"] == "round_0001-a"
        notify.drain()
        notify.wait_for("WATCHDOG", "1")

        # The agent has no file descriptor left: accepting a client fails, a fault of the control-api
        # thread, tried again with back-off; with descriptors again, the waiting client is served.
        limits = resource.prlimit(agent.process.pid, resource.RLIMIT_NOFILE)
        with ThreadPoolExecutor(1) as pool:
            resource.prlimit(agent.process.pid, resource.RLIMIT_NOFILE, (3, limits[1]))
            try:
                waiting = pool.submit(request, sock, "status", timeout=60)
                agent.wait_for(r"FAULT in the control-api thread \(accept\): OSError: \[Errno 24\]", timeout=30)
            finally:
                resource.prlimit(agent.process.pid, resource.RLIMIT_NOFILE, limits)
            assert waiting.result(timeout=60)["control"]["mode"] == "run"
        agent.wait_for(r"the control-api thread \(accept\) recovered", timeout=30)
        faulted = set(re.findall(r"FAULT in the (\S+ thread \([^)]*\))", agent.text()))
        for fault in faulted:  # others that needed a descriptor meanwhile (reading the dataset's info, ...)
            if f"the {fault} recovered" not in agent.text():
                agent.wait_for(re.escape(f"the {fault} recovered"), timeout=60)
        status = request(sock, "status")
        assert status["faults"] == [] and status["state"] == "running-policy"
        stop(agent)
    finally:
        if agent.process.poll() is None:
            agent.kill_group()
        notify.close()


def test_a_rollback_asked_for_during_a_swap_waits_for_it_and_leaves_a_consistent_live_model(
    tmp_path, untrained_policy, lab_key
):
    """Model c is being checked (its sim gate takes seconds) when the operator asks for a rollback: the
    rollback happens after c went live, so it goes back to b; the control loop, the history and the
    answer agree."""
    write_config(tmp_path, trusted=lab_key, checks=ChecksSection(sim_gate_episodes=1))
    sock, inbox = tmp_path / "agent.sock", tmp_path / "data" / "models" / "inbox"
    store = tmp_path / "data" / "models" / "store"
    notify = NotifySocket(tmp_path / "notify")
    agent = start_agent(tmp_path, notify.path, "agent.log")
    try:
        notify.wait_for("READY", "1")
        deliver_model(untrained_policy, inbox, "round_0002-b", lab_key, 2)
        agent.wait_for(r"model round_0002-b is live", timeout=120)
        with ThreadPoolExecutor(1) as pool:
            deliver_model(untrained_policy, inbox, "round_0003-c", lab_key, 3)
            agent.wait_for(r"new model round_0003-c: checking", timeout=60)
            rollback = pool.submit(request, sock, "rollback")
            assert rollback.result(timeout=120) == {"live": "round_0002-b"}
        agent.wait_for(r"rolled back to round_0002-b", timeout=30)  # logged by the worker after it answered
        text = agent.text()
        assert text.index("model round_0003-c is live") < text.index("rolled back to round_0002-b")
        status = request(sock, "status")
        assert status["live-model"]["name"] == status["control"]["model"] == "round_0002-b"
        assert json.loads((store / "history.json").read_text()) == ["round_0002-b"]
        assert [p.name for p in store.iterdir() if p.is_dir()] == ["round_0002-b"]
        assert [(m["name"], m["live"]) for m in request(sock, "models")["models"]] == [("round_0002-b", True)]
        stop(agent)
    finally:
        if agent.process.poll() is None:
            agent.kill_group()
        notify.close()
