"""What fedbot keeps of what it writes over weeks: rotated logs of the Flower processes and bounded
jsonl logs.

A SuperLink or SuperNode writes to its stdout and stderr; `capture_output` copies those lines into
a log file that stdlib's `RotatingFileHandler` rotates by size. Flower 1.42 offers rotation only to
the SuperLink (`--log-file`, rotated by time), whose console handler keeps writing every record to
stderr besides, and nothing to the SuperNode; capturing the output bounds both the same way and
keeps what is not a log record (a traceback as a process dies).

`append_line` appends to a jsonl log that keeps its newest `keep` lines: once it holds twice that,
the older half is cut off in an atomic rewrite (a reader never sees a half-written file).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import BinaryIO

from fedbot.atomic_files import write_bytes_atomic

log = logging.getLogger(__name__)
MIB = 2**20
MIN_LOG_MB, MAX_LOG_MB, MAX_LOG_BACKUPS = 0.001, 10_000.0, 1000


@dataclass(frozen=True)
class LogRotation:
    """A log file is rotated once it reaches `max_mb`; `backups` rotated files are kept beside it."""

    max_mb: float = 10.0
    backups: int = 5

    def __post_init__(self):
        if not MIN_LOG_MB <= self.max_mb <= MAX_LOG_MB or not 1 <= self.backups <= MAX_LOG_BACKUPS:
            raise ValueError(
                f"log rotation needs a size in [{MIN_LOG_MB}, {MAX_LOG_MB}] MiB and 1..{MAX_LOG_BACKUPS} backups, "
                f"got {self.max_mb} MiB and {self.backups}"
            )


def capture_output(stream: BinaryIO, path: Path, rotation: LogRotation) -> threading.Thread:
    """Start a thread that copies `stream` (a child's stdout) line by line into `path`, rotated as
    `rotation` says, until the stream closes. A line that cannot be written (a full disk) is reported
    on stderr by the handler and the copying goes on, so the child never blocks on a full pipe."""
    handler = RotatingFileHandler(
        path, maxBytes=int(rotation.max_mb * MIB), backupCount=rotation.backups, encoding="utf-8"
    )
    handler.setFormatter(logging.Formatter("%(message)s"))

    def copy() -> None:
        try:
            for line in iter(stream.readline, b""):
                text = line.decode("utf-8", errors="replace").rstrip("\n")
                handler.emit(logging.makeLogRecord({"msg": text, "levelno": logging.INFO}))
        except Exception:  # the stream itself failed: say so, where the journal shows it
            log.exception("copying the output of a child process into %s stopped", path)
        finally:
            handler.close()
            stream.close()

    thread = threading.Thread(target=copy, name=f"log {path.name}", daemon=True)
    thread.start()
    return thread


def append_line(path: Path, entry: dict, keep: int) -> None:
    """Append `entry` as one JSON line to `path` (fsynced), keeping the newest `keep` lines."""
    path = Path(path)
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())
    lines = path.read_bytes().splitlines(keepends=True)
    if len(lines) >= 2 * keep:
        write_bytes_atomic(path, b"".join(lines[-keep:]))
