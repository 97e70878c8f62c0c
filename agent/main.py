"""`fedbot-agent`: the robot daemon (`systemctl start fedbot-agent`).

    fedbot-agent --config /etc/fedbot/agent.toml [--sim] [-v]
    fedbot-agent --config /etc/fedbot/agent.toml --keygen    # the robot's SuperNode key, then exit

Runs until SIGTERM or SIGINT. A bad config, unreachable hardware or an unusable data directory is a
clear error on stderr (the journal under systemd) and exit code 2.

A stop (SIGTERM, `systemctl stop`) ends in exit code 0 well within the unit's TimeoutStopSec, in
every state (agent/daemon.py `close` bounds each step). The signal only writes a byte to a pipe
that the main thread waits on (`StopSignals`): it wakes the main thread whichever thread the kernel
hands it to, and the handler takes no lock. A signal during the start is kept and acted on as soon
as the agent is up. After the stop, threads that are still busy (a library's) cannot hold up the
exit: the process ends without waiting for them, its logs flushed.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from agent.config import load_config
from agent.supernode import ensure_auth_key
from fedbot import service

log = logging.getLogger("fedbot.agent")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# The agent's own threads (agent/daemon.py, controller.py, action_chunks.py, model_updates.py, control_api.py).
AGENT_THREADS = {
    "control",
    "inference",
    "models",
    "observer",
    "supervisor",
    "watchdog",
    "control-api",
    "control-client",
}


class StopSignals:
    """SIGTERM and SIGINT, for the main thread to wait on (`wait`), through `signal.set_wakeup_fd`."""

    def __init__(self):
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._old_wakeup = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self._old_handlers = {sig: signal.signal(sig, _noted) for sig in STOP_SIGNALS}

    def wait(self) -> signal.Signals:
        """Block until SIGTERM or SIGINT has come (at once if one came already)."""
        while True:
            for number in os.read(self._read, 64):
                if number in STOP_SIGNALS:
                    return signal.Signals(number)

    def close(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(self._old_wakeup)
        os.close(self._read)
        os.close(self._write)


def _noted(_signum, _frame) -> None:
    """The signal's number is already in the wakeup pipe; nothing else to do here."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedbot-agent", description="The fedbot robot daemon.")
    parser.add_argument("--config", type=Path, default=Path("/etc/fedbot/agent.toml"), help="the agent TOML")
    parser.add_argument("--sim", action="store_true", help="drive the PushT simulator instead of the hardware")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--keygen",
        action="store_true",
        help="make the robot's SuperNode key (coordinator.auth-key) if it does not exist, print its public "
        "half (to register on the coordinator) and exit; the agent also makes it at its first start",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    service.configure_logging(args.verbose)

    agent = server = signals = None
    code, started = 0, False
    try:
        config = load_config(args.config, sim=args.sim)
        if config.coordinator.auth_key is not None:
            public = ensure_auth_key(config.coordinator.auth_key)
            log.info("SuperNode key %s; register %s on the coordinator", config.coordinator.auth_key, public)
            if args.keygen:
                print(public.read_text(), end="")
                return 0
        elif args.keygen:
            raise ValueError(f"{args.config}: set coordinator.auth-key (where the robot's key goes) to make one")
        signals = StopSignals()  # from here on a SIGTERM stops the agent cleanly, once it is up
        from agent.control_api import ControlServer
        from agent.daemon import Agent

        agent = Agent(config)
        server = ControlServer(config.socket, agent.handle, agent.faults)
        agent.supervised["control-api"] = lambda: server.alive
        started = True
        agent.start()  # the robot connected (or being reconnected), the live model loaded, the loops up
        server.start()  # then the control API: a client that reaches it finds a started agent
        log.info("control API on %s", config.socket)
        service.notify_ready(agent.status_line())
        log.info("stopping (%s)", signals.wait().name)
    except (ValueError, RuntimeError, OSError) as error:
        print(f"fedbot-agent: error: {error}", file=sys.stderr)
        code = 2
    finally:
        if server is not None:
            server.close()  # no new requests
        if agent is not None:
            agent.close()  # every activity ends; requests in progress get their answer
        if server is not None:
            server.join_clients()
        if signals is not None:
            signals.close()
    if started:
        _exit_without_stragglers(code)
    return code


def _exit_without_stragglers(code: int) -> None:
    """After a stop: if one of the agent's threads is still busy past its bound (in a model check, say)
    or any thread would hold up the interpreter's exit (not a daemon thread), end the process now
    rather than let the exit wait for them or tear down what they use under their feet."""
    stragglers = [
        t.name
        for t in threading.enumerate()
        if t is not threading.main_thread() and t.is_alive() and (not t.daemon or t.name.split("_")[0] in AGENT_THREADS)
    ]
    if not stragglers:
        return
    log.info("exiting with %d threads still running (%s)", len(stragglers), ", ".join(sorted(set(stragglers))))
    for handler in logging.getLogger().handlers:
        if handler.lock is None or handler.lock.acquire(timeout=1.0):  # a straggler may be logging
            try:
                handler.flush()
            finally:
                if handler.lock is not None:
                    handler.lock.release()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
