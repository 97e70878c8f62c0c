"""`fedbot-agent`: the robot daemon (`systemctl start fedbot-agent`).

    fedbot-agent --config /etc/fedbot/agent.toml [--sim] [-v]
    fedbot-agent --config /etc/fedbot/agent.toml --keygen    # the robot's SuperNode key, then exit

Runs until SIGTERM or SIGINT. A bad config, unreachable hardware or an unusable data directory is a
clear error on stderr (the journal under systemd) and exit code 2.
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

    agent = server = None
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
        from agent.control_api import ControlServer
        from agent.daemon import Agent

        agent = Agent(config)
        server = ControlServer(config.socket, agent.handle)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: stop.set())
        agent.start()  # the robot connected (or being reconnected), the live model loaded, the loops up
        server.start()  # then the control API: a client that reaches it finds a started agent
        log.info("control API on %s", config.socket)
        service.notify_ready(agent.status_line())
        stop.wait()
        log.info("stopping")
    except (ValueError, RuntimeError, OSError) as error:
        print(f"fedbot-agent: error: {error}", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            server.close()
        if agent is not None:
            agent.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
