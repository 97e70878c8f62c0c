"""Running as a systemd service: the notify protocol and journald logging.

Both daemons (`fedbot-agent`, `fedbot-coordinator`) are `Type=notify` units. systemd-python's
`sd_notify` wrapper sends READY/STATUS/WATCHDOG datagrams to `$NOTIFY_SOCKET` and does nothing when
the process is not run by systemd, so the daemons call these helpers unconditionally.
"""

from __future__ import annotations

import logging
import os
import sys

from systemd import daemon, journal

log = logging.getLogger("fedbot.service")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _notify(message: str) -> None:
    try:
        daemon.notify(message)
    except OSError as error:  # systemd gone (shutdown) or a stale NOTIFY_SOCKET: not the daemon's problem
        log.debug("sd_notify failed: %s", error)


def notify_ready(status: str) -> None:
    _notify(f"READY=1\nSTATUS={status}")


def notify_status(status: str) -> None:
    _notify(f"STATUS={status}")


def notify_watchdog() -> None:
    _notify("WATCHDOG=1")


def notify_stopping() -> None:
    _notify("STOPPING=1")


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half of WatchdogSec), or None when no watchdog is armed."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6


def configure_logging(verbose: bool = False) -> None:
    """Log to the journal (with fields like CODE_FILE and PRIORITY) when systemd connected our output
    to it, otherwise plain lines on stderr."""
    level = logging.DEBUG if verbose else logging.INFO
    if os.environ.get("JOURNAL_STREAM"):
        handler: logging.Handler = journal.JournalHandler(SYSLOG_IDENTIFIER=os.path.basename(sys.argv[0]))
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)  # libraries (httpx, PIL, ...) only speak up when it matters
    logging.getLogger("fedbot").setLevel(level)
