"""Control requests: the dispatch of each command of the control API, with the checks of its arguments.

agent/control_api.py carries the requests over the Unix socket; `handle` answers one of them,
{"command": ..., **arguments}, with a dict, or raises ValueError (a bad request) or RuntimeError
(the agent cannot do it now), which the client sees as the error.

Every argument is checked before anything happens; a request with an unknown command, an unknown
argument or a value out of its bounds is refused with the reason:

    status, models, stop, rollback   no arguments
    record   episodes  an integer in [1, MAX_EPISODES] (true, 1.5, "3" are not)
             task      optional, a string of 1 to MAX_TASK characters
             resume    optional, true or false; true (with neither of the above): the rest of the
                       interrupted session, as it was planned (fedbot/session_plan.py)
    run      episodes  optional (none: run until `stop`), an integer in [1, MAX_EPISODES]
             seed      optional, an integer in [EVAL_SEED_START, MAX_SEED - episodes]: runs use
                       held-out scenes only, never those demonstrations are recorded on
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from agent.model_store import ModelStore
from fedbot.recording import EVAL_SEED_START

MAX_EPISODES = 10_000  # episodes one record or run request may ask for
MAX_SEED = 2**31 - 1  # scene seeds are below this (numpy and gym take them as 32-bit seeds)
MAX_TASK = 1000  # characters of a task description
ARGUMENTS = {
    "status": (),
    "models": (),
    "record": ("episodes", "task", "resume"),
    "run": ("episodes", "seed"),
    "stop": (),
    "rollback": (),
}


@dataclass(frozen=True)
class ControlRequests:
    """The agent's answers to each command (`fedbot status`, `models`, `record`, `run`, `stop`, `rollback`)."""

    status: Callable[[], dict]
    models: ModelStore
    record: Callable[[int | None, str | None, bool], dict]  # episodes, task, resume
    run: Callable[[int | None, int], dict]  # episodes (None: until stopped), first seed
    stop: Callable[[], dict]
    rollback: Callable[[], dict]

    def handle(self, request: dict) -> dict:
        """One control API request (agent/control_api.py)."""
        command = request["command"]
        if command not in ARGUMENTS:
            raise ValueError(f"unknown command {command[:100]!r} (one of {', '.join(ARGUMENTS)})")
        unknown = sorted(str(key)[:100] for key in request if key != "command" and key not in ARGUMENTS[command])
        if unknown:
            takes = ", ".join(ARGUMENTS[command]) or "none"
            raise ValueError(f"unknown argument {', '.join(map(repr, unknown))} for {command!r} (it takes: {takes})")
        if command == "status":
            return self.status()
        if command == "models":
            return {"models": self.models.models(), "rejected": self.models.rejections()}
        if command == "record":
            if _resume(request):
                if request.get("episodes") is not None or request.get("task") is not None:
                    raise ValueError("'resume' continues the session as it was planned: no 'episodes' or 'task'")
                return self.record(None, None, True)
            return self.record(_integer(request, "episodes", 1, MAX_EPISODES), _task(request), False)
        if command == "run":
            episodes = None if request.get("episodes") is None else _integer(request, "episodes", 1, MAX_EPISODES)
            seed = EVAL_SEED_START
            if request.get("seed") is not None:
                seed = _integer(request, "seed", EVAL_SEED_START, MAX_SEED - (episodes or 1))
            return self.run(episodes, seed)
        if command == "stop":
            return self.stop()
        return self.rollback()


def _integer(request: dict, key: str, low: int, high: int) -> int:
    value = request.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{key!r} must be an integer in [{low}, {high}], got {_show(value)}")
    return value


def _task(request: dict) -> str | None:
    task = request.get("task")
    if task is not None and (not isinstance(task, str) or not 1 <= len(task) <= MAX_TASK):
        raise ValueError(f"'task' must be a string of 1 to {MAX_TASK} characters, got {_show(task)}")
    return task


def _resume(request: dict) -> bool:
    resume = request.get("resume", False)
    if not isinstance(resume, bool):
        raise ValueError(f"'resume' must be true or false, got {_show(resume)}")
    return resume


def _show(value) -> str:
    try:
        text = repr(value)
    except ValueError:  # an integer too long to print
        return "a huge number"
    return text if len(text) <= 60 else text[:57] + "..."
