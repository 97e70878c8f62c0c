"""The client side of the agent's control API (agent/control_api.py): one JSON request per
connection over the agent's Unix socket, one JSON reply."""

from __future__ import annotations

import json
import socket
from pathlib import Path

DEFAULT_SOCKET = Path("/run/fedbot/agent.sock")


def request(path: Path, command: str, timeout: float | None = None, **arguments) -> dict:
    """Send one request to the agent at `path`; raises RuntimeError with the agent's error."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(timeout)
        try:
            client.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise RuntimeError(f"no agent is listening on {path} (is fedbot-agent running?)") from None
        except PermissionError:
            raise RuntimeError(f"no permission to open {path} (join the agent's group)") from None
        try:
            client.sendall(json.dumps({"command": command, **arguments}).encode() + b"\n")
            line = client.makefile("rb").readline()
        except ConnectionError:
            line = b""
        if not line:
            raise RuntimeError(f"the agent on {path} closed the connection without answering (did it stop?)")
        reply = json.loads(line)
    if not reply.pop("ok", False):
        raise RuntimeError(reply.get("error", "the agent refused the request"))
    return reply
