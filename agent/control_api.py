"""The agent's local control API: JSON requests over a Unix socket that only the agent's user and
group may open (mode 0660). The `fedbot` CLI (status, record, run, stop, models, rollback) is its
client (fedbot/control_client.py). One request per connection: {"command": ..., **arguments} ->
{"ok": bool, ...}.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("fedbot.agent.api")
MAX_REQUEST = 1 << 16


class ControlServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: Path, handle: Callable[[dict], dict]):
        self.path = Path(path)
        self.handle = handle
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_socket():
            _refuse_if_served(self.path)
            self.path.unlink()
        old_umask = os.umask(0o117)  # the socket is created rw for owner and group only
        try:
            super().__init__(str(self.path), _Handler)
        finally:
            os.umask(old_umask)
        self._thread = threading.Thread(target=self.serve_forever, name="control-api", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.path.unlink(missing_ok=True)


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline(MAX_REQUEST)
        try:
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("command"), str):
                raise ValueError("a request is a JSON object with a 'command'")
            reply = {"ok": True, **self.server.handle(request)}
        except (ValueError, RuntimeError) as error:
            reply = {"ok": False, "error": str(error)}
        except Exception as error:  # noqa: BLE001  the agent keeps serving; the client sees what failed
            log.exception("control request %r failed", line[:200])
            reply = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        self.wfile.write(json.dumps(reply).encode() + b"\n")


def _refuse_if_served(path: Path) -> None:
    """Another agent answering on `path` means a second daemon for the same robot: refuse to start."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return
    raise RuntimeError(f"another agent is serving {path}")
