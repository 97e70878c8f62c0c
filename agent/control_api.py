"""The agent's local control API: JSON requests over a Unix socket that only the agent's user and
group may open (mode 0660). The `fedbot` CLI (status, record, run, stop, models, rollback) is its
client (fedbot/control_client.py). One request per connection: {"command": ..., **arguments} ->
{"ok": bool, ...}; agent/control_requests.py checks the arguments and dispatches.

Whatever a client sends, it gets a clear error and the agent goes on serving and controlling:

- A request is one line of at most MAX_REQUEST bytes, sent within READ_TIMEOUT seconds of
  connecting; a longer line, or a client that does not finish its line in time (or at all), gets
  an error reply and is disconnected. Bytes that are not a JSON object with a string `command` get
  an error naming what is wrong.
- At most MAX_CLIENTS connections are served at once (a `record` or `run --episodes` holds its
  connection until it is done); a client beyond that gets an error reply at once and is
  disconnected.

Faults (agent/faults.py): the `control-api` thread accepts connections and starts one thread per
client. If accepting fails (no file descriptors left, say) it is a fault of the control-api thread,
shown in `fedbot status` and tried again after a back-off (0.1 s doubling to 5 s) until it works.
An error while answering one client ends that client's connection only and is logged; a request
that raises an unexpected exception gets it as its error reply, with the traceback in the journal.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agent.faults import Backoff, Faults

log = logging.getLogger("fedbot.agent.api")
MAX_REQUEST = 1 << 16  # bytes in a request line
READ_TIMEOUT = 5.0  # seconds a client has to send its whole request line
WRITE_TIMEOUT = 5.0  # seconds a reply may take to leave (a client that does not read)
MAX_CLIENTS = 16  # connections served at once
ACCEPT_RETRY_FIRST, ACCEPT_RETRY_MAX = 0.1, 5.0  # back-off after a failed accept, seconds
POLL = 0.5  # seconds between looks at the stop flag while no client connects
CLIENTS_STOP = 5.0  # seconds `close` waits for replies in flight


class ControlServer:
    """Serves the control API on the Unix socket `path`; `handle(request) -> reply` answers each request
    (raising ValueError or RuntimeError for an error the client should see)."""

    def __init__(self, path: Path, handle: Callable[[dict], dict], faults: Faults | None = None):
        self.path = Path(path)
        self.handle = handle
        self.faults = faults or Faults()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_socket():
            _refuse_if_served(self.path)
            self.path.unlink()
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o117)  # the socket is created rw for owner and group only
        try:
            self._socket.bind(str(self.path))
        except OSError:
            self._socket.close()
            raise
        finally:
            os.umask(old_umask)
        self._socket.listen(64)
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self._clients: set[threading.Thread] = set()
        self._clients_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="control-api", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        """Stop accepting; requests in progress may still answer (`join_clients`)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(POLL + 1.0)
        self._socket.close()
        self.path.unlink(missing_ok=True)

    def join_clients(self, timeout: float = CLIENTS_STOP) -> None:
        """Wait up to `timeout` seconds for the replies in flight (after the agent stopped its activities)."""
        deadline = time.monotonic() + timeout
        with self._clients_lock:
            clients = list(self._clients)
        for client in clients:
            client.join(max(0.0, deadline - time.monotonic()))

    # -- the accepting thread -------------------------------------------------------------------------
    def _serve(self) -> None:
        backoff = Backoff(ACCEPT_RETRY_FIRST, ACCEPT_RETRY_MAX)
        with selectors.DefaultSelector() as selector:
            selector.register(self._socket, selectors.EVENT_READ)
            while not self._stop.is_set():
                try:
                    if not selector.select(POLL):
                        continue
                    connection, _ = self._socket.accept()
                except OSError as error:
                    if self._stop.is_set():
                        return
                    delay = backoff.next()
                    self.faults.report("control-api", error, "accept", retry_in=delay)
                    self._stop.wait(delay)
                    continue
                if backoff.failures:
                    backoff.reset()
                    self.faults.clear("control-api", "accept")
                self._start_client(connection)

    def _start_client(self, connection: socket.socket) -> None:
        if not self._slots.acquire(blocking=False):
            _refuse(connection, f"the agent is busy: {MAX_CLIENTS} clients are connected; try again")
            return
        thread = threading.Thread(target=self._client, args=(connection,), name="control-client", daemon=True)
        with self._clients_lock:
            self._clients.add(thread)
        try:
            thread.start()
        except RuntimeError as error:  # no thread can be started: this client is told, the next may fare better
            with self._clients_lock:
                self._clients.discard(thread)
            self._slots.release()
            _refuse(connection, f"the agent cannot serve this request now: {error}")

    # -- one client -------------------------------------------------------------------------------------
    def _client(self, connection: socket.socket) -> None:
        try:
            with connection:
                reply = self._answer(connection)
                connection.settimeout(WRITE_TIMEOUT)
                connection.sendall(json.dumps(reply).encode() + b"\n")
        except OSError as error:  # the client left or does not read: its loss
            log.info("control client: %s: %s", type(error).__name__, error)
        except Exception:  # noqa: BLE001  must not happen; this client only
            log.exception("control client failed")
        finally:
            with self._clients_lock:
                self._clients.discard(threading.current_thread())
            self._slots.release()

    def _answer(self, connection: socket.socket) -> dict:
        line, error = _read_line(connection)
        if error is not None:
            return {"ok": False, "error": error}
        try:
            request = json.loads(line)
        except (ValueError, RecursionError) as error:
            return {"ok": False, "error": f"not a JSON request: {str(error)[:200]}"}
        if not isinstance(request, dict) or not isinstance(request.get("command"), str):
            return {"ok": False, "error": 'a request is a JSON object with a "command" string'}
        try:
            return {"ok": True, **self.handle(request)}
        except (ValueError, RuntimeError) as error:
            return {"ok": False, "error": str(error)}
        except Exception as error:  # noqa: BLE001  the agent keeps serving; the client sees what failed
            log.exception("control request %r failed", line[:200])
            return {"ok": False, "error": f"{type(error).__name__}: {error}"}


def _read_line(connection: socket.socket) -> tuple[bytes, str | None]:
    """The request line (without its newline), or an error for the client."""
    deadline = time.monotonic() + READ_TIMEOUT
    data = bytearray()
    while True:
        end = data.find(b"\n")
        if end >= 0:
            return bytes(data[:end]), None
        if len(data) > MAX_REQUEST:
            return b"", f"the request is longer than {MAX_REQUEST} bytes"
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return b"", f"no complete request line within {READ_TIMEOUT:.0f} s"
        connection.settimeout(remaining)
        try:
            chunk = connection.recv(MAX_REQUEST + 1 - len(data))
        except TimeoutError:
            return b"", f"no complete request line within {READ_TIMEOUT:.0f} s"
        if not chunk:  # the client closed its side: what it sent is the request
            return bytes(data), None
        data += chunk


def _refuse(connection: socket.socket, error: str) -> None:
    """Tell a client we will not serve it, without waiting for it, and disconnect."""
    try:
        connection.setblocking(False)
        connection.send(json.dumps({"ok": False, "error": error}).encode() + b"\n")
    except OSError:
        pass
    finally:
        connection.close()
    log.warning("control client refused: %s", error)


def _refuse_if_served(path: Path) -> None:
    """Another agent answering on `path` means a second daemon for the same robot: refuse to start."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return
    raise RuntimeError(f"another agent is serving {path}")
