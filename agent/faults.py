"""Faults of the agent's threads: no thread of the agent fails silently.

Every exception a thread of the agent does not expect ends up here: logged once with its traceback
(the journal under systemd), shown in `fedbot status` (`"state": "fault"` and the `faults` list:
thread, task, error, since, count, next retry) and in systemd's STATUS line, until the thread has
done its job again. What a thread does after a fault is its own policy, written in its module:

    recovers (retries with back-off, the fault stays shown until it succeeds)
        models      agent/model_updates.py: the inbox pass is retried; the live model stays live; an
                    automatic rollback with no model to go back to is shown until a new one goes live
        observer    agent/model_updates.py: a watch that stopped (the inbox removed) is set up again;
                    the inbox is polled meanwhile
        supervisor  agent/daemon.py: each task (robot reconnect, federation) is retried; the loop goes on
        control-api agent/control_api.py: accepting clients is retried
    fatal (the agent cannot go on safely by itself: systemd restarts it)
        control     agent/controller.py: the control loop ended
        watchdog    agent/daemon.py: the feeder itself failed
        any thread that ends with an exception (`threading.excepthook`), a library's included

A fatal fault, or a supervised thread that is no longer alive, makes the watchdog feeder stop
sending WATCHDOG=1: systemd then kills and restarts the agent after WatchdogSec.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("fedbot.agent.faults")
MAX_ERROR = 500  # characters of an error message kept in the status


@dataclass
class Fault:
    thread: str
    task: str
    error: str
    since: float  # wall-clock time of the first occurrence
    last: float  # wall-clock time of the latest occurrence
    count: int
    fatal: bool
    retry_in: float | None  # seconds until the thread tries again (None: it does not)

    def summary(self) -> dict:
        return {
            "thread": self.thread,
            "task": self.task,
            "error": self.error,
            "since": _iso(self.since),
            "last": _iso(self.last),
            "count": self.count,
            "fatal": self.fatal,
            "retry-in-s": None if self.retry_in is None else round(self.retry_in, 1),
        }


class Faults:
    """The agent's current faults, keyed by (thread, task); thread-safe."""

    def __init__(self, on_change: Callable[[], None] = lambda: None):
        self.on_change = on_change
        self._faults: dict[tuple[str, str], Fault] = {}
        self._lock = threading.Lock()

    def report(
        self, thread: str, error: BaseException, task: str = "", fatal: bool = False, retry_in: float | None = None
    ) -> None:
        """`thread` failed at `task` with `error`: log it (with the traceback when it is new) and show it."""
        text = describe(error)
        now = time.time()
        with self._lock:
            fault = self._faults.get((thread, task))
            new = fault is None or fault.error != text
            if fault is None:
                fault = self._faults[(thread, task)] = Fault(thread, task, text, now, now, 0, fatal, retry_in)
            fault.error, fault.last, fault.fatal, fault.retry_in = text, now, fault.fatal or fatal, retry_in
            fault.count += 1
            count = fault.count
        what = f"{thread} thread" + (f" ({task})" if task else "")
        then = "fatal: systemd restarts the agent" if fatal else _retry_text(retry_in)
        if new:
            trace = "".join(traceback.format_exception(error)).rstrip()
            log.error("FAULT in the %s: %s; %s\n%s", what, text, then, trace)
        else:
            log.warning("FAULT in the %s again (%d times): %s; %s", what, count, text, then)
        self.on_change()

    def clear(self, thread: str, task: str = "") -> None:
        """`thread` did `task` again without error."""
        with self._lock:
            fault = self._faults.pop((thread, task), None)
        if fault is not None:
            log.info(
                "the %s thread%s recovered after %d failures: %s",
                thread,
                f" ({task})" if task else "",
                fault.count,
                fault.error,
            )
            self.on_change()

    def active(self) -> list[dict]:
        with self._lock:
            return [fault.summary() for fault in self._faults.values()]

    def fatal(self) -> list[str]:
        """The threads with a fatal fault."""
        with self._lock:
            return [fault.thread for fault in self._faults.values() if fault.fatal]

    def line(self) -> str:
        """One line for systemd's STATUS: the first fault, and how many there are."""
        with self._lock:
            faults = list(self._faults.values())
        if not faults:
            return ""
        first = faults[0]
        more = f" (+{len(faults) - 1} more)" if len(faults) > 1 else ""
        return f"FAULT {first.thread}{f' ({first.task})' if first.task else ''}: {first.error[:200]}{more}"

    def excepthook(self, args: threading.ExceptHookArgs) -> None:
        """For `threading.excepthook`: a thread that ended with an exception is a fatal fault."""
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "unknown"
        self.report(name, args.exc_value, "ended", fatal=True)


class Backoff:
    """Exponential back-off: `first`, 2*`first`, ... up to `cap` seconds; `reset` after a success."""

    def __init__(self, first: float, cap: float):
        self.first, self.cap = first, cap
        self.failures = 0

    def next(self) -> float:
        delay = min(self.first * 2.0 ** min(self.failures, 30), self.cap)
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0


def describe(error: BaseException) -> str:
    """`Type: message`, bounded."""
    text = f"{type(error).__name__}: {error}".strip()
    return text if len(text) <= MAX_ERROR else text[: MAX_ERROR - 3] + "..."


def _retry_text(retry_in: float | None) -> str:
    return "no retry" if retry_in is None else f"trying again in {retry_in:.0f} s"


def _iso(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(when))
