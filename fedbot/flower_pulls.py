"""Prompt retries when a Flower process pulls message objects that are still on their way.

Flower 1.42 moves a message as content-addressed objects (one per array). A receiver that asks for
an object before the sender has uploaded it retries after 1, 2, 4, 8, then every 10 s
(`PULL_INITIAL_BACKOFF`, `PULL_BACKOFF_CAP`: constants, no setting). In fedbot's rounds that is the
rule, not the exception: a SuperNode stores a message before it has fetched the message's objects,
so the ClientApp it starts asks too early; a SuperNode fetches a message whose objects the ServerApp
is still uploading; the ServerApp asks for a reply the SuperNode is still uploading. Those waits were
most of a round's time outside training (bench/bench_round_overhead.py, BENCHMARKS.md). Here a
missing object is asked for again after 50 ms, then at most every 0.5 s: a few more local requests.

Flower's default also gives up on an object after 500 tries, which at 0.5 s would be ~4 minutes: a
robot on a slow link can take longer to upload a model, so only the total time limit stays.

    python -m fedbot.flower_pulls flower-supernode ARGS...   # a Flower command with prompt retries
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

import flwr.supercore.inflatable.inflatable_utils as flower_objects

INITIAL_RETRY_S = 0.05
MAX_RETRY_S = 0.5


def retry_pulls_promptly() -> None:
    """Make every object pull in this process retry promptly (flwr is pinned: pyproject.toml)."""
    for pull in (flower_objects.pull_objects, flower_objects.pull_and_inflate_object_from_tree):
        pull.__kwdefaults__.update(initial_backoff=INITIAL_RETRY_S, backoff_cap=MAX_RETRY_S,
                                   max_tries_per_object=None)


def main(argv: list[str] | None = None) -> None:
    """Run a Flower console script (`flower-supernode ...`) with prompt retries."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        sys.exit(__doc__)
    (script,) = entry_points(group="console_scripts", name=argv[0].rsplit("/", 1)[-1])
    retry_pulls_promptly()
    sys.argv = argv
    sys.exit(script.load()())


if __name__ == "__main__":
    main()
