"""Crash-safe, append-only LeRobot v3.0 datasets: one committed episode at a time.

lerobot writes parquet footers only at `finalize()` and `LeRobotDataset` globs every parquet file
under `data/`, so a recorder killed mid-episode or mid-save leaves a dataset that no longer loads.
lerobot has no commit protocol of its own, hence this module. The dataset root is laid out so that
plain `LeRobotDataset(repo_id, root=DIR)` (and `lerobot-train`) read it, while each episode becomes
visible through one atomic rename:

    DIR/meta   -> .versions/current/meta        (relative symlinks, made once)
    DIR/data   -> .versions/current/data
    DIR/videos -> .versions/current/videos
    DIR/.versions/current -> 000007             (the commit point: replaced atomically)
    DIR/.versions/000007/{meta,data,videos}     (a complete, finalized dataset)
    DIR/.versions/work-<pid>-<n>/               (the episode being recorded, never read)

To append, the current version is cloned into a work directory (data and video files hard-linked,
metadata copied, since lerobot rewrites `info.json` and `stats.json` in place), lerobot's own writer
resumes there, and on `commit` the finalized work directory is fsynced, renamed to the next version
and `current` is switched to it. lerobot starts new data, video and episode-metadata files when it
resumes, so the hard-linked files of committed episodes are never written again. A kill at any
moment leaves `current` pointing at a complete version; leftovers are removed at the next open.

A full disk (ENOSPC) or any other error while an episode is written fails that episode only: its
work directory is removed (the space comes back) and the error is raised; the committed versions
are untouched. lerobot logs, and otherwise ignores, a camera frame it could not write (its
`write_image`), which would leave an episode whose video misses frames: the store watches for those
errors and refuses to commit such an episode (`FrameWriteError`, an OSError with the frame's errno).

lerobot's episode metadata has no date. Each commit also notes, in `meta/fedbot_episodes.json` of the
new version (so atomically with the episode), when the episode was committed and what the recorder
passed along (the scene seed): {"<episode index>": {"recorded": ISO time, "seed": 12}}.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import logging
import os
import shutil
import threading
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from lerobot.datasets.io_utils import load_info
from lerobot.datasets.lerobot_dataset import LeRobotDataset

from fedbot.atomic_files import point_link, publish_dir

VERSIONS_DIR = ".versions"
CURRENT_LINK = "current"
LINKED_SUBDIRS = ("meta", "data", "videos")
WORK_PREFIX = "work-"
LOCK_FILE = "lock"
NOTES_FILE = "fedbot_episodes.json"  # under meta/: per-episode notes lerobot has no place for
_work_counter = itertools.count()
IMAGE_WRITER_LOGGER = "lerobot.datasets.image_writer"  # where lerobot's write_image reports a failed frame
log = logging.getLogger(__name__)


class FrameWriteError(OSError):
    """A camera frame of the episode could not be written (lerobot only logged it)."""


class _FrameErrors(logging.Handler):
    """Collects lerobot's "Error writing image <path>: <error>" records for files under `directory`."""

    def __init__(self, directory: Path):
        super().__init__(logging.ERROR)
        self.directory = str(directory)
        self.errors: list[tuple[str, BaseException | str]] = []
        self._lock_errors = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        if len(args) == 2 and str(args[0]).startswith(self.directory):
            with self._lock_errors:
                self.errors.append((str(args[0]), args[1]))

    def first(self) -> FrameWriteError | None:
        with self._lock_errors:
            if not self.errors:
                return None
            path, error = self.errors[0]
            count = len(self.errors)
        code = getattr(error, "errno", None) or errno.EIO
        return FrameWriteError(code, f"{count} camera frames could not be written (first {path}: {error})")


class EpisodeStore:
    """Appends episodes to the dataset at `root`, each committed atomically or not at all."""

    def __init__(self, root: Path, repo_id: str, fps: int, features: dict, robot_type: str):
        self.root = Path(root)
        self.repo_id = repo_id
        self.fps = fps
        self.features = features
        self.robot_type = robot_type
        self._versions = self.root / VERSIONS_DIR
        self._work: Path | None = None
        self._frame_errors: _FrameErrors | None = None
        self.dataset: LeRobotDataset | None = None
        self._prepare_root()
        self._lock_fd = os.open(self._versions / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise RuntimeError(f"{self.root} is being recorded into by another process") from None
        self.recover()

    def close(self) -> None:
        """Discard an open episode and release the dataset for other recorders."""
        try:
            if self._work is not None:
                self.discard_episode()
        finally:
            os.close(self._lock_fd)

    # -- layout -------------------------------------------------------------------------------
    def _prepare_root(self) -> None:
        if self.root.exists() and not (self.root / VERSIONS_DIR).exists() and any(self.root.iterdir()):
            raise FileExistsError(
                f"{self.root} exists and is not a fedbot dataset (no {VERSIONS_DIR}/): record into a new directory"
            )
        self._versions.mkdir(parents=True, exist_ok=True)
        for sub in LINKED_SUBDIRS:
            link = self.root / sub
            if not link.is_symlink():
                link.symlink_to(Path(VERSIONS_DIR) / CURRENT_LINK / sub)

    @property
    def current_version(self) -> Path | None:
        """The directory of the last committed version, or None before the first episode."""
        link = self._versions / CURRENT_LINK
        return self._versions / os.readlink(link) if link.is_symlink() else None

    @property
    def num_episodes(self) -> int:
        return committed_episodes(self.root)

    def recover(self) -> None:
        """Remove what a killed recorder left: work directories and superseded versions."""
        current = self.current_version
        for entry in self._versions.iterdir():
            if entry.name in (CURRENT_LINK, LOCK_FILE) or entry == current:
                continue
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()

    # -- one episode ---------------------------------------------------------------------------
    def begin_episode(self) -> LeRobotDataset:
        """Open a writable clone of the current version for one new episode."""
        if self._work is not None:
            raise RuntimeError("an episode is already open; commit or discard it first")
        self._work = self._versions / f"{WORK_PREFIX}{os.getpid()}-{next(_work_counter)}"
        self._frame_errors = _FrameErrors(self._work)
        logging.getLogger(IMAGE_WRITER_LOGGER).addHandler(self._frame_errors)
        current = self.current_version
        try:
            if current is None:
                self.dataset = LeRobotDataset.create(
                    self.repo_id,
                    fps=self.fps,
                    features=self.features,
                    root=self._work,
                    robot_type=self.robot_type,
                    use_videos=True,
                )
            else:
                _clone_version(current, self._work)
                self.dataset = LeRobotDataset.resume(self.repo_id, root=self._work)
        except BaseException:
            self.discard_episode()
            raise
        return self.dataset

    def discard_episode(self) -> None:
        """Drop the open episode; the committed dataset is untouched and the episode's space freed,
        whatever fails on the way (a full disk makes lerobot's own clean-up fail too)."""
        try:
            if self.dataset is not None:
                self.dataset.clear_episode_buffer()
                self.dataset.finalize()  # closes lerobot's writers: their files' space is freed with them
        except Exception as error:  # noqa: BLE001  the work directory goes anyway
            log.warning("discarding the episode: lerobot's clean-up failed (%s: %s)", type(error).__name__, error)
        finally:
            if self._work is not None and self._work != self.current_version:
                shutil.rmtree(self._work, ignore_errors=True)
            self._stop_watching_frames()
            self._work, self.dataset = None, None

    def commit_episode(self, **notes) -> int:
        """Save the open episode and make it visible atomically, noting its commit time and `notes`
        (JSON values) in meta/fedbot_episodes.json. Returns the new episode count. If anything fails
        (a camera frame that was not written, a full disk), the episode is discarded and the error
        raised; the committed dataset is untouched."""
        if self.dataset is None or self._work is None:
            raise RuntimeError("no episode is open")
        try:
            self.check_frames()
            with keep_scheduling_policy():
                self.dataset.save_episode()
                self.dataset.finalize()
            self.check_frames()
            total = self.dataset.meta.total_episodes
            _note_episode(self._work, total - 1, {"recorded": datetime.now().isoformat(timespec="seconds"), **notes})
            version = self._versions / f"{total:06d}"
            publish_dir(self._work, version)
            self._work = version  # a failure from here on removes it, unless it became current
            point_link(self._versions / CURRENT_LINK, version.name)  # the commit point
        except BaseException:
            self.discard_episode()
            raise
        self._stop_watching_frames()
        self._work, self.dataset = None, None
        self.recover()
        return total

    def check_frames(self) -> None:
        """Raise FrameWriteError if a camera frame of the open episode could not be written (a full
        disk): the recorder stops the episode at once instead of recording on into a lost episode."""
        if self._frame_errors is not None and (error := self._frame_errors.first()) is not None:
            raise error

    def _stop_watching_frames(self) -> None:
        if self._frame_errors is not None:
            logging.getLogger(IMAGE_WRITER_LOGGER).removeHandler(self._frame_errors)
            self._frame_errors = None


def committed_episodes(root: Path) -> int:
    """Episodes committed to the dataset at `root` (0 if there is none yet); needs no lock."""
    link = Path(root) / VERSIONS_DIR / CURRENT_LINK
    if not link.is_symlink():
        return 0
    return load_info(link.parent / os.readlink(link)).total_episodes


def episode_notes(root: Path) -> dict[int, dict]:
    """The notes of each committed episode of the dataset at `root` (episode index -> notes); empty
    for a dataset fedbot did not record. Needs no lock."""
    path = Path(root) / "meta" / NOTES_FILE
    if not path.is_file():
        return {}
    try:
        return {int(index): notes for index, notes in json.loads(path.read_text()).items()}
    except (ValueError, AttributeError) as error:
        raise ValueError(f"{path} is damaged ({error}); move it away to read the dataset without its notes") from None


def _note_episode(version: Path, index: int, notes: dict) -> None:
    """Add episode `index`'s notes to the notes of an uncommitted version (published with it)."""
    path = version / "meta" / NOTES_FILE
    everything = json.loads(path.read_text()) if path.is_file() else {}
    everything[str(index)] = notes
    path.write_text(json.dumps(everything))


@contextmanager
def keep_scheduling_policy():
    """Undo what the video encoder does to the calling thread's CPU scheduling.

    libSvtAv1Enc (the AV1 encoder lerobot uses through PyAV) switches the thread that encodes to
    SCHED_FIFO priority 99 when it may (as root). Everything that thread does afterwards (training,
    the control loop) and every process it starts then runs real-time and starves the machine.
    """
    policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
    try:
        yield
    finally:
        if (os.sched_getscheduler(0), os.sched_getparam(0)) != (policy, param):
            os.sched_setscheduler(0, policy, param)


def _clone_version(src: Path, dst: Path) -> None:
    """Hard-link data and videos of `src` into `dst`; copy its metadata (rewritten in place)."""
    for sub in ("data", "videos"):
        if (src / sub).is_dir():
            shutil.copytree(src / sub, dst / sub, copy_function=os.link)
    shutil.copytree(src / "meta", dst / "meta")
