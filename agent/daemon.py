"""The agent of one robot: its life cycle, state machine, recording, policy runs, status and watchdog.

It owns one robot, its private dataset, its SuperNode and its live controller. States, each
transition logged and shown in `fedbot status` and systemd's STATUS:

    idle            the control loop holds; the SuperNode starts once the idle rules hold
    recording       a teleop session drives the robot and commits episodes to the dataset; one that
                    ended early (a crash, a reboot, a stop) is shown as `interrupted-recording` and
                    continues only when asked (`fedbot record --resume`): the robot never starts
                    moving by itself after a restart
    running-policy  the control loop runs the live policy
    federating      the robot's flower-supernode is up and trains when the coordinator asks

Recording and running the policy preempt federating: the SuperNode gets SIGTERM and leaves. New
models arriving in the inbox are checked and hot-swapped in any state. A live model that fails at run
time (its inference raises, or its actions are not finite or out of the robot's bounds) is rolled back
automatically (agent/model_updates.py); `last-auto-rollback` in the status says which, why and when.

A robot whose serial port or camera fails (`HardwareFault`) loses the episode in progress; the
fault shows in `fedbot status` and the agent reconnects the robot once the device is back.
Recording and policy runs are refused until then; federating does not need the robot and goes on.

No thread fails silently (agent/faults.py). `fedbot status` says `"state": "fault"` while any thread
has a fault (the `faults` list says which, since when and what it does next; `activity` keeps the
state above). The agent's own threads, and what each does on an exception it did not expect:

    supervisor  each task (robot reconnect, federation) is retried after a back-off (1 s doubling to
                30 s; a device that is simply gone is retried every RECONNECT_PERIOD as before);
                the loop goes on and the fault clears once the task succeeds
    watchdog    the feeder sends WATCHDOG=1 only while the control loop ticks, no fault is fatal and
                the supervisor, model worker and control API threads are alive; an exception in the
                feeder itself is fatal: it stops feeding, and systemd restarts the agent
    models, observer, control, control-api: see agent/model_updates.py, agent/controller.py and
                agent/control_api.py; any other thread that dies is fatal (`threading.excepthook`)

A stop (SIGTERM, agent/main.py) ends every activity in order, each step bounded (`close`): the
model worker, a recording (its episode in progress discarded), the SuperNode, the control loop
(the robot holds; a policy run ends) and the robot (an arm turns its torque off joint by joint).

It composes these parts, which get what they need from it as arguments and callbacks; its lock
(`_lock`) guards state changes:

    agent/controller.py        the control loop, ticking at a fixed rate, that runs the live policy
    agent/model_updates.py     new models: inbox, checks, sim gate, swap into the loop, rollback
    agent/federation.py        the idle rules and the SuperNode (agent/supernode.py), restarted with back-off
    agent/control_requests.py  the control API's commands (agent/control_api.py serves the socket)
"""

from __future__ import annotations

import errno
import gc
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agent.config import AgentConfig
from agent.control_requests import ControlRequests
from agent.controller import CLOSE_TIMEOUT, RUN, ControlLoop
from agent.faults import Backoff, Faults
from agent.federation import SUPERNODE_STOP, Federation
from agent.model_store import CheckRules, ModelStore
from agent.model_updates import ModelUpdates
from fedbot import service
from fedbot.atomic_files import write_json_atomic
from fedbot.episode_store import committed_episodes
from fedbot.recording import (
    EVAL_SEED_START,
    RecordingStopped,
    check_recording_seeds,
    record_session,
)
from fedbot.session_plan import SessionPlan, interrupted_session
from hardware.errors import HardwareFault
from hardware.factory import make_robot, make_teleop

log = logging.getLogger("fedbot.agent")
IDLE, RECORDING, RUNNING, FEDERATING, FAULT = "idle", "recording", "running-policy", "federating", "fault"
SUPERVISE_PERIOD = 0.5  # seconds between checks of the robot, the policy run, the SuperNode and the idle rules
RECONNECT_PERIOD = 1.0  # seconds between attempts to reconnect a robot whose device failed
TASK_RETRY_FIRST, TASK_RETRY_MAX = 1.0, 30.0  # back-off of a supervisor task that failed, seconds
# A stop (SIGTERM) takes at most STOP_BUDGET seconds before the robot disconnects, well within the
# unit's TimeoutStopSec=60s; each step waits at most its own bound, and never beyond the budget.
STOP_BUDGET = 40.0
MODEL_WORKER_STOP = 5.0  # a model check in progress finishes
RECORDING_STOP = 5.0  # the episode in progress is discarded, the dataset closed
LOCK_WAIT_STOP = SUPERNODE_STOP + 1.0  # a state change in progress finishes (a preemption stops the SuperNode)
THREAD_STOP = 2.0  # the supervisor and the watchdog feeder end


class Agent:
    def __init__(self, config: AgentConfig):
        self.config = config
        self.state = IDLE
        self.faults = Faults(on_change=self._report_status)
        self.robot = make_robot(config.robot.type, config.robot_id, **config.robot_settings())
        self.control = ControlLoop(
            self.robot, config.control.rate_hz, config.control.inference_threads, faults=self.faults
        )
        self.models = ModelStore(config.model_dir, config.checks.keep_models)
        rules = CheckRules.of(config.checks, config.control.device)
        self.updates = ModelUpdates(
            self.models, self.control, rules, self._robot_features, self._report_status, faults=self.faults
        )
        self.control.on_policy_failure = self.updates.policy_failed  # automatic rollback
        self.federation = Federation(config, self.models.inbox)
        self.requests = ControlRequests(
            status=self.status,
            models=self.models,
            record=self.record,
            run=self.run,
            stop=self.stop,
            rollback=self.updates.rollback,
        )
        self.last_run: dict | None = None
        self.recording: dict | None = None
        self.interrupted: SessionPlan | None = None  # a recording session that ended before its last episode
        self._lock = threading.RLock()  # guards state changes
        self._stopping = threading.Event()
        self._supervisor_done = threading.Event()  # set by `close` once the SuperNode has left
        self._stop_recording = threading.Event()  # set by `close`: a recording in progress ends
        self._recording_idle = threading.Event()  # cleared while a recording runs
        self._recording_idle.set()
        self._next_reconnect = 0.0
        self._task_retry: dict[str, tuple[Backoff, float]] = {}  # supervisor task -> back-off, next try
        self._threads: list[threading.Thread] = []
        # Threads whose death the watchdog feeder notices (name -> is it alive?); main adds the control API.
        self.supervised: dict[str, Callable[[], bool]] = {
            "control": lambda: self.control.alive,
            "models": lambda: self.updates.alive,
        }
        self._old_excepthook = None

    # -- life cycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Connect the hardware, load the live model, start the loops (agent/main.py then says READY)."""
        self.config.dataset_root.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.robot.connect()
        except HardwareFault as fault:
            log.error("robot not connected (%s); trying again every %.0f s", fault, RECONNECT_PERIOD)
        self.updates.load_live()
        self.interrupted = self._interrupted_session()
        if self.interrupted is not None:  # the robot does not move by itself after a restart
            log.warning(
                "an interrupted recording session has %d of %d episodes left: `fedbot record --resume` continues it",
                self.interrupted.remaining,
                self.interrupted.episodes,
            )
        # Python's cyclic garbage collector stops every thread while it walks all objects; with torch
        # and lerobot loaded a full pass took 260 ms (7 missed ticks at 30 Hz), triggered by loading a
        # model. Objects alive now (modules, the live model) are moved out of its reach.
        gc.collect()
        gc.freeze()
        self._old_excepthook, threading.excepthook = threading.excepthook, self.faults.excepthook
        self.control.start()
        self.updates.start()
        for target, name in (
            (self._supervise, "supervisor"),
            (self._feed_watchdog, "watchdog"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self.supervised["supervisor"] = self._threads[0].is_alive
        log.info(
            "agent for robot %s up: %s robot %s, live model %s, control at %.1f Hz",
            self.config.robot_id,
            self.config.robot.type,
            "connected" if self.robot.is_connected else "NOT connected",
            self.control.live_name,
            self.config.control.rate_hz,
        )

    def close(self) -> None:
        """Stop (SIGTERM, agent/main.py): every activity ends, in this order, each step within its bound
        and all within STOP_BUDGET: no new activity starts; a policy run ends (the robot holds); the model
        worker ends (a check in progress finishes, nothing more is swapped in); a recording ends (its
        episode in progress discarded); the SuperNode leaves; the control loop ends; the robot
        disconnects (an arm holds and turns its torque off joint by joint)."""
        deadline = time.monotonic() + STOP_BUDGET

        def left(bound: float) -> float:
            return max(0.0, min(bound, deadline - time.monotonic()))

        service.notify_stopping()
        self._stopping.set()
        self._stop_recording.set()
        self.control.hold()  # a policy run ends now: the robot holds from the next tick
        if self._lock.acquire(timeout=left(LOCK_WAIT_STOP)):  # a state change in progress ends; none starts now
            self._lock.release()
        self.updates.close(left(MODEL_WORKER_STOP))
        if not self._recording_idle.wait(left(RECORDING_STOP)):
            log.error("the recording did not end within %.0f s; stopping anyway", RECORDING_STOP)
        locked = self._lock.acquire(timeout=left(LOCK_WAIT_STOP))
        if not locked:
            log.error("a state change holds the agent's lock; stopping anyway")
        try:
            self.federation.leave(left(SUPERNODE_STOP))  # SIGTERM, SIGKILL once that is over
        finally:
            if locked:
                self._lock.release()
            self._supervisor_done.set()
        self.control.close(left(CLOSE_TIMEOUT))  # the last tick, the inference worker
        self.robot.disconnect()  # an arm holds, then turns its torque off joint by joint
        for thread in self._threads:
            thread.join(left(THREAD_STOP))
        if self._old_excepthook is not None:
            threading.excepthook = self._old_excepthook
        log.info("agent stopped")

    def _require_robot(self) -> None:
        if not self.robot.is_connected:
            raise RuntimeError(
                f"the robot is not connected ({getattr(self.robot, 'fault', None) or 'starting'}); "
                "the agent reconnects it when the device is back"
            )

    def _reconnect(self, now: float) -> None:
        """Try to connect a robot whose device failed. A device still gone (HardwareFault) is tried again
        every RECONNECT_PERIOD; any other error (a camera that is not what the config says) is raised:
        a fault of the supervisor, tried again with back-off."""
        if self.robot.is_connected or now < self._next_reconnect:
            return
        self._next_reconnect = now + RECONNECT_PERIOD
        try:
            self.robot.connect()
        except HardwareFault:
            return
        log.info("robot reconnected")
        self._report_status()

    def _robot_features(self) -> dict[str, tuple]:
        return {**self.robot.observation_features, **self.robot.action_features}

    # -- states -------------------------------------------------------------------------------------
    def _enter(self, state: str, why: str) -> None:
        if state != self.state:
            old, self.state = self.state, state  # before the log line: whoever reads it sees the new state
            log.info("state: %s -> %s (%s)", old, state, why)
        self._report_status()

    def _leave_federation(self, why: str) -> None:
        if self.state == FEDERATING:
            self.federation.leave()
            self._enter(IDLE, why)

    def record(self, episodes: int | None, task: str | None = None, resume: bool = False) -> dict:
        """A teleop session on this robot, or with `resume` the rest of the interrupted one; each
        successful episode is committed as it ends."""
        with self._lock:
            if self._stopping.is_set():
                raise RuntimeError("the agent is stopping")
            if self.state in (RECORDING, RUNNING):
                raise RuntimeError(f"the robot is {self.state}; `fedbot stop` first")
            self._require_robot()
            plan = self._session_plan(episodes, task, resume)
            self._leave_federation("recording preempts federating")
            self.control.pause()
            planned = plan.remaining  # the plan counts down as episodes are committed
            self._enter(RECORDING, f"{planned} episodes" + (" (resumed)" if resume else ""))
            self.recording = {"episodes": planned, "done": 0, "kept": 0}
            self.interrupted = None  # this session replaces or resumes it
            self._recording_idle.clear()
        try:
            report = self._record(plan)
        except Exception as error:  # noqa: BLE001  the operator is told why, and what was kept
            message = self._recording_error(error, planned)
            log.log(logging.WARNING if isinstance(error, RecordingStopped) else logging.ERROR, "%s", message)
            raise RuntimeError(message) from None
        finally:
            self.control.resume()
            with self._lock:
                self.federation.start_cooldown(time.monotonic())
                self.recording = None
                self.interrupted = self._interrupted_session()
                self._enter(IDLE, "recording finished")
            self._recording_idle.set()
        return {"attempted": report.attempted, "kept": report.kept, "episodes": report.total_episodes}

    def _session_plan(self, episodes: int | None, task: str | None, resume: bool) -> SessionPlan:
        """A new session from the next scene seed on, or the interrupted one."""
        if not resume:
            seed = self._next_seed()
            check_recording_seeds(seed, episodes)
            return SessionPlan(episodes, seed, task or self.config.teleop.task)
        plan = interrupted_session(self.config.dataset_root)
        if plan is None:
            raise RuntimeError("no interrupted recording session to resume")
        return plan

    def _interrupted_session(self) -> SessionPlan | None:
        """The robot's interrupted recording session; a damaged plan is logged and left for the operator."""
        try:
            return interrupted_session(self.config.dataset_root)
        except ValueError as error:
            log.error("%s", error)
            return None

    def _recording_error(self, error: Exception, episodes: int) -> str:
        """Why a recording session ended early, what it kept, and what to do."""
        done, kept = self.recording["done"], self.recording["kept"]
        so_far = (
            f"recording stopped after {done} of {episodes} episodes ({kept} kept, the dataset holds "
            f"{committed_episodes(self.config.dataset_root)}; an unfinished episode is discarded)"
        )
        if isinstance(error, HardwareFault):
            return f"hardware fault, {so_far}: {error}"
        if isinstance(error, RecordingStopped):
            return f"the agent is stopping: {so_far}"
        if _disk_full(error):
            return f"disk full: {so_far}; free space in {self.config.dataset_root}: {error}"
        log.error("recording failed: %s", so_far, exc_info=error)  # unexpected: the traceback too
        return f"{so_far}: {type(error).__name__}: {error}"

    def _record(self, plan: SessionPlan):
        teleop = make_teleop(self.config.teleop.type, plan.seed_start, **self.config.teleop_settings())

        def on_episode(scene: int, status) -> None:
            self._save_next_seed(scene + 1)
            self.recording["done"] += 1
            kept = status.success is not False
            self.recording["kept"] += kept
            log.info("recorded scene %d: %s", scene, "kept" if kept else "failed, not kept")

        return record_session(
            self.robot, teleop, self.config.dataset_root, plan, on_episode=on_episode, stop=self._stop_recording
        )

    def _next_seed(self) -> int:
        path = self.config.data_dir / "recording.json"
        return int(_read_json(path, {}).get("next-seed", 0))

    def _save_next_seed(self, seed: int) -> None:
        write_json_atomic(self.config.data_dir / "recording.json", {"next-seed": seed})

    def run(self, episodes: int | None = None, seed: int = EVAL_SEED_START) -> dict:
        """Run the live policy; with `episodes`, block until that many sim episodes are judged."""
        with self._lock:
            if self._stopping.is_set():
                raise RuntimeError("the agent is stopping")
            if self.state == RECORDING:
                raise RuntimeError("the robot is recording; wait for the session to end")
            if not self.control.has_policy:
                raise RuntimeError("no live model yet: nothing to run")
            self._require_robot()
            self._leave_federation("running the policy preempts federating")
            episode_run = self.control.run(episodes, seed)
            self._enter(RUNNING, "policy runs" + (f" for {episodes} episodes" if episodes else ""))
        if episodes is None:
            return {"running": True}
        episode_run.finished.wait()
        with self._lock:
            results = episode_run.results
            judged = [r["success"] for r in results if r["success"] is not None]  # a real bench judges none
            self.last_run = {
                "episodes": len(results),
                "seed-start": seed,
                "models": sorted({r["model"] for r in results}),
                "success-rate": sum(judged) / len(judged) if judged else None,
                "error": self.control.error,
                "results": results,
            }
            if self.state == RUNNING:
                self.federation.start_cooldown(time.monotonic())
                self._enter(IDLE, "policy episodes done")
        return self.last_run

    def stop(self) -> dict:
        """Hold; an arm then turns its torque off joint by joint (the next run or recording turns it on)."""
        with self._lock:
            self.control.hold()
            if hasattr(self.robot, "torque_off") and self.robot.is_connected:
                try:
                    self.robot.torque_off()
                except HardwareFault as fault:
                    log.error("torque off failed: %s", fault)
            if self.state == RUNNING:
                self.federation.start_cooldown(time.monotonic())
                self._enter(IDLE, "stopped")
        return {"state": self.state}

    # -- supervision ----------------------------------------------------------------------------------
    def _supervise(self) -> None:
        # This thread lives until the SuperNode it started has left (`close`): the SuperNode gets SIGTERM
        # when the thread that started it ends (PR_SET_PDEATHSIG), which would cut its clean exit short.
        while not self._supervisor_done.wait(SUPERVISE_PERIOD):
            with self._lock:
                if self._stopping.is_set():  # `close` may have held the lock: nothing starts after it
                    continue
                now = time.monotonic()
                self._task("robot reconnect", now, self._reconnect)
                self._task("policy run", now, self._follow_run)
                self._task("federation", now, self._follow_federation)

    def _task(self, name: str, now: float, step) -> None:
        """One supervision task; an exception is a fault of the supervisor, and the task is tried again
        after a back-off (TASK_RETRY_FIRST doubling to TASK_RETRY_MAX) while the others go on."""
        backoff, next_try = self._task_retry.get(name, (None, 0.0))
        if now < next_try:
            return
        try:
            step(now)
        except Exception as error:  # noqa: BLE001  shown as a fault; supervision goes on
            backoff = backoff or Backoff(TASK_RETRY_FIRST, TASK_RETRY_MAX)
            delay = backoff.next()
            self._task_retry[name] = (backoff, now + delay)
            self.faults.report("supervisor", error, name, retry_in=delay)
            return
        if name in self._task_retry:
            del self._task_retry[name]
            self.faults.clear("supervisor", name)

    def _follow_run(self, now: float) -> None:
        if self.state == RUNNING and self.control.mode != RUN:
            self.federation.start_cooldown(now)
            self._enter(IDLE, f"the policy run ended: {self.control.error or 'stopped'}")

    def _follow_federation(self, now: float) -> None:
        if self.state == FEDERATING:
            if self.federation.supernode_exited(now):
                self._enter(IDLE, "SuperNode exited")
        elif self.state == IDLE and self.federation.may_join(now):
            self.federation.join(now)
            self._enter(FEDERATING, "idle rules hold")

    def _feed_watchdog(self) -> None:
        """Ping systemd's watchdog while the agent is healthy (`unhealthy`); a stalled control loop, a
        fatal fault or a dead thread gets the agent restarted. An exception here ends the feeding: fatal."""
        interval = service.watchdog_interval()
        if interval is None:
            return
        said = None
        try:
            while not self._stopping.wait(interval):
                why = self.unhealthy()
                if why is None:
                    service.notify_watchdog()
                elif why != said:
                    log.error("%s: not feeding the watchdog (systemd restarts the agent)", why)
                said = why
        except Exception as error:  # noqa: BLE001  no more WATCHDOG=1: systemd restarts the agent
            self.faults.report("watchdog", error, "feed", fatal=True)

    def unhealthy(self) -> str | None:
        """Why the agent cannot go on by itself (None: it can, or it is stopping anyway)."""
        if self._stopping.is_set():
            return None
        if not self.control.healthy():
            return "control loop stalled"
        if fatal := self.faults.fatal():
            return f"fatal fault in the {', '.join(fatal)} thread"
        dead = [name for name, alive in self.supervised.items() if not alive()]
        if dead:
            for name in dead:  # a thread that ended without an exception is a fault too
                if not any(f["thread"] == name for f in self.faults.active()):
                    self.faults.report(name, RuntimeError(f"the {name} thread is not running"), "ended", fatal=True)
            return f"the {', '.join(dead)} thread ended"
        return None

    # -- reports ----------------------------------------------------------------------------------------
    def status_line(self) -> str:
        fault = getattr(self.robot, "fault", None) if not self.robot.is_connected else None
        line = f"{self.state}; live model {self.control.live_name or 'none'}" + (f"; FAULT {fault}" if fault else "")
        faults = self.faults.line() if hasattr(self, "faults") else ""
        return f"{faults}; {line}" if faults else line

    def _report_status(self) -> None:
        """The status line to systemd (`systemctl status`)."""
        service.notify_status(self.status_line())

    def status(self) -> dict:
        rounds = self.federation.rounds()
        faults = self.faults.active()
        return {
            "robot": self.config.robot_id,
            "state": FAULT if faults else self.state,
            "activity": self.state,
            "faults": faults,
            "live-model": self.updates.live_summary(),
            "episodes": committed_episodes(self.config.dataset_root),
            "robot-connected": self.robot.is_connected,
            "hardware-fault": None if self.robot.is_connected else getattr(self.robot, "fault", None),
            "recording": self.recording,
            "interrupted-recording": None if self.interrupted is None else self.interrupted.summary(),
            "rounds-joined": len(rounds),
            "last-round": rounds[-1] if rounds else None,
            "federation": self.federation.status(),
            "control": {
                **self.control.timing(),
                "mode": self.control.mode,
                "model": self.control.live_name,
                "policy-error": self.control.error,
            },
            "last-swap": self.updates.last_swap,
            "last-auto-rollback": self.models.failed.last(),
            "last-run": self.last_run,
            "rejected": self.models.rejections()[:5],
        }

    def handle(self, request: dict) -> dict:
        """One control API request (agent/control_api.py), dispatched by agent/control_requests.py."""
        return self.requests.handle(request)


def _disk_full(error: BaseException | None) -> bool:
    """Whether `error`, or an error it came from, says the disk is full (shutil's copies wrap theirs)."""
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if f"[Errno {errno.ENOSPC}]" in str(error):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def _read_json(path: Path, default):
    return json.loads(path.read_text()) if path.is_file() else default
