"""A real recorder process that SIGKILLs itself at a chosen point (for the crash-safety tests).

usage: crash_recorder.py ROOT EPISODES KILL_POINT KILL_AT_CALL

KILL_POINT names the function before whose KILL_AT_CALL-th call (1-based) the process kills
itself with SIGKILL: the kill lands exactly there, with no timing involved. "none" never kills.
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lerobot.datasets.dataset_writer import DatasetWriter  # noqa: E402
from lerobot.datasets.lerobot_dataset import LeRobotDataset  # noqa: E402

import fedbot.episode_store as episode_store  # noqa: E402
import fedbot.recording as recording  # noqa: E402

from helpers import record_wander  # noqa: E402


def _any_call(*args) -> bool:
    return True


def _commit_link(*args) -> bool:
    return ".versions" in str(args[0])


# name -> (owner, attribute, which calls count)
KILL_POINTS = {
    "add_frame": (LeRobotDataset, "add_frame", _any_call),  # mid-episode
    "save_episode_video": (DatasetWriter, "_save_episode_video", _any_call),  # data written, video not
    "finalize": (LeRobotDataset, "finalize", _any_call),  # episode saved, parquet footers not written
    "publish_dir": (episode_store, "publish_dir", _any_call),  # work dir complete, not yet renamed
    "replace": (episode_store.os, "replace", _commit_link),  # version renamed, `current` not switched
    "recover": (episode_store.EpisodeStore, "recover", _any_call),  # committed, leftovers not removed
    "save_plan": (recording, "save_plan", _any_call),  # the session's plan (1st call) or an attempt noted
}


def arm(point: str, at_call: int) -> None:
    owner, name, counts = KILL_POINTS[point]
    original = getattr(owner, name)
    calls = 0

    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += counts(*args)
        if calls == at_call:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


if __name__ == "__main__":
    root, episodes, point, at_call = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    if point != "none":
        arm(point, at_call)
    print(record_wander(root, episodes), flush=True)
