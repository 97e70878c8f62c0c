"""The live controller: a fixed-rate control loop that runs the live policy on the robot.

Each tick: observation -> preprocessor -> policy -> postprocessor -> robot (agent/action_chunks.py
computes the policy's action chunks off the control thread). New policies are handed over with
`swap`, prepared elsewhere, and installed between two ticks together with their processors.
The loop keeps ticking while it holds or while recording owns the robot (`pause`), so that tick
timing is always measured and the systemd watchdog sees a healthy loop.

Holding means sending nothing: the PushT sim then stands still. A robot with `hold()` (an arm) is
also told to stop where it is whenever the policy fails or has no action ready for a tick (its
chunk is late), so it never coasts on to the last goal it was sent. A robot whose port or camera
fails (`HardwareFault`) ends the run; the agent reconnects it.

A model that fails at run time (`PolicyFailed`: its inference raised, or a chunk of its actions is not
finite or out of the robot's bounds, agent/action_checks.py) ends the run: the robot holds, no action of
the failing chunk is sent, and `on_policy_failure` tells the model worker, which rolls back
(agent/model_updates.py); the loop only signals, so the tick never waits for it.

An exception that escapes a tick (not the policy's, which holds the robot) ends the loop: a fatal
fault (agent/faults.py), logged with its traceback; the loop then no longer ticks, so the agent stops
feeding the systemd watchdog and is restarted. `close` holds, ends a run in progress (its caller gets
its results) and stops the loop within CLOSE_TIMEOUT.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from lerobot.utils.robot_utils import precise_sleep

from agent.action_chunks import ChunkedInference, PolicyFailed
from agent.faults import Faults
from fedbot.policy_io import LoadedPolicy
from hardware.errors import HardwareFault

log = logging.getLogger("fedbot.agent.control")
HOLD, RUN, PAUSED = "hold", "run", "paused"
TIMING_WINDOW = 3000  # ticks over which jitter percentiles are reported
CLOSE_TIMEOUT = 10.0  # seconds `close` waits for the loop's last tick and the inference worker


@dataclass
class SwapTicket:
    """A policy waiting to be installed; `done` is set at the first tick that acts on its weights."""

    loaded: LoadedPolicy
    name: str
    landed_at: float  # time.monotonic() when the model file landed
    done: threading.Event = field(default_factory=threading.Event)
    installed_tick: int = -1
    latency: float | None = None  # landed -> first action computed by the new weights


@dataclass
class EpisodeRun:
    """Policy episodes requested with `run(episodes=K)` (sim robots judge their own episodes)."""

    episodes: int | None
    seed: int
    results: list[dict] = field(default_factory=list)
    finished: threading.Event = field(default_factory=threading.Event)


class ControlLoop:
    def __init__(self, robot, rate_hz: float, inference_threads: int = 1, faults: Faults | None = None):
        self.robot = robot
        self.faults = faults or Faults()
        self.inference_threads = inference_threads
        self.period = 1.0 / rate_hz
        self.inference = ChunkedInference(self.period, lambda: robot.action_bounds)
        # Called on the control thread with (model name, reason) when the live model fails: must not block.
        self.on_policy_failure: Callable[[str, str], None] | None = None
        self.mode = HOLD
        self.live_name: str | None = None
        self.error: str | None = None  # the last policy or hardware error (the loop then holds)
        self.holds = 0  # times the robot was told to hold where it is
        self._holding = False
        self.ticks = 0
        self.missed = 0
        self.actions = 0  # actions sent to the robot
        self.last_tick = time.monotonic()
        self._starts: deque[float] = deque(maxlen=TIMING_WINDOW)
        self._ticket: SwapTicket | None = None  # handed over, not yet installed
        self._swapped: SwapTicket | None = None  # installed, waiting for its first action
        self._run: EpisodeRun | None = None
        self._lock = threading.Lock()
        self._ticked = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="control", daemon=True)

    # -- commands (any thread) ---------------------------------------------------------------------
    def start(self) -> None:
        # Python hands the GIL to a waiting thread every switch interval (5 ms by default). Loading a
        # model or computing a chunk in other threads then delays ticks by up to that much each time.
        sys.setswitchinterval(0.001)
        # torch's intra-op threads are per process. Idle OpenMP workers spin on the cores the control
        # thread needs: at 50 Hz on 2 cores a chunk took 126 ms with 2 threads and 83 ms with 1, and
        # the loop needed 539 ticks against 108 for the same 50 actions.
        torch.set_num_threads(self.inference_threads)
        self._thread.start()

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Hold (a run in progress ends), stop the loop and the inference worker, within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        self.hold()
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("the control loop did not end within %.0f s", timeout)
        self.inference.close(max(0.0, deadline - time.monotonic()))
        log.info("control loop stopped after %d ticks (%d actions); the robot holds", self.ticks, self.actions)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def swap(self, loaded: LoadedPolicy, name: str, landed_at: float) -> SwapTicket:
        ticket = SwapTicket(loaded, name, landed_at)
        with self._lock:
            self._ticket = ticket
        return ticket

    def withdraw(self, ticket: SwapTicket) -> bool:
        """Take back a swap the loop has not installed yet (False: it was installed meanwhile)."""
        with self._lock:
            if self._ticket is ticket:
                self._ticket = None
                return True
            return False

    def run(self, episodes: int | None = None, seed: int = 0) -> EpisodeRun:
        """Run the live policy (for `episodes` sim episodes from scene `seed`, or until `hold`)."""
        if not self.has_policy:
            raise RuntimeError("no live model: nothing to run")
        with self._lock:
            self._run = EpisodeRun(episodes, seed)
            self._start_episode()
            self.error = None
            self._holding = False
            self.mode = RUN
            return self._run

    @property
    def has_policy(self) -> bool:
        return self.inference.policy is not None or self._ticket is not None

    def hold(self) -> None:
        with self._lock:
            self._end_run()

    def pause(self) -> None:
        """Leave the robot alone (recording drives it); returns once no tick uses it."""
        with self._lock:
            self._end_run(PAUSED)

    def _end_run(self, mode: str = HOLD) -> None:
        self.mode = mode
        if self._run is not None:
            self._run.finished.set()
        if self._swapped is not None:  # installed during the run, which ended before its first action
            self._swapped.latency = time.monotonic() - self._swapped.landed_at
            self._swapped.done.set()
            self._swapped = None

    def wait_ticks(self, count: int, timeout: float) -> bool:
        """Block until the loop has ticked `count` more times (False if `timeout` passes first)."""
        with self._ticked:
            target = self.ticks + count
            return self._ticked.wait_for(lambda: self.ticks >= target, timeout)

    def resume(self) -> None:
        with self._lock:
            self.mode = HOLD

    def healthy(self, now: float | None = None) -> bool:
        """The loop ticked within the last few periods."""
        return (now or time.monotonic()) - self.last_tick < max(1.0, 5 * self.period)

    def timing(self) -> dict:
        starts = list(self._starts)
        periods = np.diff(starts) if len(starts) > 2 else np.zeros(1)
        jitter = np.abs(periods - self.period) * 1e3
        return {
            "rate-hz": round(1.0 / self.period, 3),
            "ticks": self.ticks,
            "missed": self.missed,
            "actions": self.actions,
            "period-ms-mean": round(float(periods.mean()) * 1e3, 3),
            "jitter-ms-p50": round(float(np.percentile(jitter, 50)), 3),
            "jitter-ms-p99": round(float(np.percentile(jitter, 99)), 3),
            "jitter-ms-max": round(float(jitter.max()), 3),
            "starved-ticks": self.inference.starved,
            "holds": self.holds,
            "late-chunks": self.inference.late_chunks,
            "inference-ms": round(self.inference.inference_seconds * 1e3, 1),
        }

    # -- the loop ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._ticks()
        except Exception as error:  # noqa: BLE001  the loop ends: a fatal fault, the watchdog is no longer fed
            self.faults.report("control", error, "tick", fatal=True)

    def _ticks(self) -> None:
        deadline = time.perf_counter()
        while not self._stop.is_set():
            deadline += self.period
            now = time.perf_counter()
            if now - deadline >= self.period:  # a whole period slipped: those ticks are missed
                missed = int((now - deadline) / self.period)
                self.missed += missed
                deadline += missed * self.period
            if now < deadline:
                precise_sleep(deadline - now)
            self._starts.append(time.perf_counter())
            self.last_tick = time.monotonic()
            with self._lock:
                self._tick()
            with self._ticked:
                self.ticks += 1
                self._ticked.notify_all()

    def _tick(self) -> None:
        if self._ticket is not None:
            self._install(self._ticket)
        if self.mode != RUN:
            return
        try:
            action, source = self.inference.step(self.ticks, self.robot.get_observation())
            if action is None:  # the chunk is late: stop where we are until it comes
                self._hold_robot()
                return
            if self._swapped is not None and source is self._swapped.loaded:
                self._swapped.latency = time.monotonic() - self._swapped.landed_at
                self._swapped.done.set()
                self._swapped = None
            self.robot.send_action(_robot_action(self.robot, action))
            self._holding = False
            self.actions += 1
            if self._run is not None and hasattr(self.robot, "episode_status"):
                self._judge_episode()
        except HardwareFault as fault:
            self.error = f"hardware fault: {fault}"
            log.error("%s; the run ends", self.error)
            self._end_run()
        except PolicyFailed as failure:
            self.error = str(failure)
            log.error("%s; the run ends, holding", self.error)
            self._end_run()
            self._hold_robot()
            if self.on_policy_failure is not None:
                self.on_policy_failure(failure.model, failure.reason)
        except Exception as error:  # noqa: BLE001  a failing tick must not stop the loop: hold
            self.error = f"{type(error).__name__}: {error}"
            log.error("the tick failed, holding: %s", self.error)
            self._end_run()
            self._hold_robot()

    def _hold_robot(self) -> None:
        if self._holding or not hasattr(self.robot, "hold"):
            return
        self._holding = True
        self.holds += 1
        try:
            self.robot.hold()
        except HardwareFault as fault:
            self.error = f"hardware fault: {fault}"
            self._end_run()

    def _install(self, ticket: SwapTicket) -> None:
        self._ticket = None
        self.inference.set_policy(ticket.loaded, ticket.name)
        self.live_name = ticket.name
        ticket.installed_tick = self.ticks
        if self.mode == RUN:
            self._swapped = ticket  # done at the first action of the new weights
        else:
            ticket.latency = time.monotonic() - ticket.landed_at
            ticket.done.set()
        log.info("tick %d: live model is now %s", self.ticks, ticket.name)

    def _start_episode(self) -> None:
        if hasattr(self.robot, "reset"):
            self.robot.reset(self._run.seed + len(self._run.results))
        self.inference.reset()

    def _judge_episode(self) -> None:
        status = self.robot.episode_status()
        if not status.done:
            return
        run = self._run
        run.results.append(
            {
                "seed": run.seed + len(run.results),
                "success": status.success,
                "coverage": status.coverage,
                "model": self.live_name,
            }
        )
        outcome = {True: "success", False: "failed", None: "done (not judged)"}[status.success]
        log.info("policy episode %d: %s (coverage %.2f)", len(run.results), outcome, status.coverage)
        if run.episodes is not None and len(run.results) >= run.episodes:
            self._end_run()
        else:
            self._start_episode()


def _robot_action(robot, action: np.ndarray) -> dict:
    """The policy's action vector as the robot's action dict (one feature, or one value per name)."""
    names = list(robot.action_features)
    if len(names) == 1:
        return {names[0]: action}
    return {name: float(value) for name, value in zip(names, action, strict=True)}
