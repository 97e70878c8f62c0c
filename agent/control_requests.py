"""Control requests: the dispatch of each command of the control API, with the checks of its arguments.

agent/control_api.py carries the requests over the Unix socket; `handle` answers one of them,
{"command": ..., **arguments}, with a dict, or raises ValueError (a bad request) or RuntimeError
(the agent cannot do it now), which the client sees as the error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from agent.model_store import ModelStore
from fedbot.recording import EVAL_SEED_START


@dataclass(frozen=True)
class ControlRequests:
    """The agent's answers to each command (`fedbot status`, `models`, `record`, `run`, `stop`, `rollback`)."""

    status: Callable[[], dict]
    models: ModelStore
    record: Callable[[int, str | None], dict]  # episodes, task
    run: Callable[[int | None, int], dict]  # episodes (None: until stopped), first seed
    stop: Callable[[], dict]
    rollback: Callable[[], dict]

    def handle(self, request: dict) -> dict:
        """One control API request (agent/control_api.py)."""
        command = request["command"]
        if command == "status":
            return self.status()
        if command == "models":
            return {"models": self.models.models(), "rejected": self.models.rejections()}
        if command == "record":
            return self.record(_positive(request, "episodes"), request.get("task"))
        if command == "run":
            episodes = request.get("episodes")
            return self.run(
                None if episodes is None else _positive(request, "episodes"), int(request.get("seed", EVAL_SEED_START))
            )
        if command == "stop":
            return self.stop()
        if command == "rollback":
            return self.rollback()
        raise ValueError(f"unknown command {command!r}")


def _positive(request: dict, key: str) -> int:
    value = request.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{key!r} must be a positive integer, got {value!r}")
    return value
