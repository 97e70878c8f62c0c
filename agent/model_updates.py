"""New models for the live controller: inbox watcher, checks, sim gate, swap, rollback, live model at start.

A model lands in `<model-dir>/inbox/` (agent/inbox.py, or by hand); a watchdog Observer notices it
and the model worker thread checks it (agent/model_store.py: manifest sha256, strict load, finite
weights, features that fit the robot), optionally runs the sim gate against the live model, then
accepts it into the store and hands it to the control loop, which installs it between two ticks.
Only once the loop acts on its weights does the model become live in the store's history. A model
that fails goes to `rejected/` with the reason. This happens in any state of the agent, off the
control thread. Rollbacks (`fedbot rollback`) run on the same worker thread, so that a rollback and
a swap never interleave: a rollback asked for during a swap happens after it.

Automatic rollback: when the live model fails at run time (agent/controller.py: its inference raised,
or it produced actions that are not finite or out of the robot's bounds), the control loop holds the
robot and signals this worker (`policy_failed`), which then, in order: records the model in the
ledger of failed models (agent/failed_models.py), moves it to `rejected/` with the reason "failed at
run time: ...", swaps the previous model in (checked like an operator's rollback) and commits the
history without it. The model is not taken again: a delivery with its name or content is rejected,
and it is neither made live at start nor chosen by a later rollback. The run that failed stays ended;
the next `fedbot run` uses the previous model. With no previous model that passes its checks, the
failing model stays live, nothing is marked, and a fault of the `models` thread (`auto-rollback`)
says so until a new model goes live.

Faults (agent/faults.py), and what the worker does about them:

- Anything but a rejection that fails an inbox pass (a full disk, a read-only or vanished directory)
  is a fault of the `models` thread: logged with its traceback, shown in `fedbot status`, and the
  pass is tried again after a back-off (1 s doubling to 60 s) until it succeeds. The files are
  changed in an order that keeps the live model live and the model in the inbox until it is either
  live or rejected: the next history is written beside the current one first, then the model is
  moved into the store, swapped in, and the history renamed into place (a rename needs no space).
- The inbox watch (the `observer` thread) is checked at every pass; if it stopped (the inbox was
  removed) it is a fault, the inbox is made again and watched anew. Meanwhile the worker looks at
  the inbox every INBOX_POLL seconds anyway, so no model waits for an event that never comes.
- A model the control loop does not take within SWAP_TIMEOUT is withdrawn from the loop (a fault;
  the model stays in the store and is tried again at the next pass).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer

from agent.controller import ControlLoop, SwapTicket
from agent.faults import Backoff, Faults
from agent.model_store import CheckRules, ModelRejected, ModelStore, check_model, read_manifest, sim_gate_success
from fedbot.policy_io import LoadedPolicy, load_policy

log = logging.getLogger("fedbot.agent")
SWAP_TIMEOUT = 60.0  # seconds the control loop may take to install a model (it does so at its next tick)
INBOX_POLL = 5.0  # seconds between looks at the inbox when no event comes
RETRY_FIRST, RETRY_MAX = 1.0, 60.0  # back-off of a failed inbox pass, seconds
ROLLBACK_TIMEOUT = 600.0  # seconds a rollback may wait for the worker (a sim gate in progress) and run


class _Stopping(Exception):
    """The agent is stopping: the pass ends without a verdict on the model at hand."""


class ModelUpdates:
    """Checks each model that lands in the inbox and swaps it into the control loop, or rejects it."""

    def __init__(
        self,
        models: ModelStore,
        control: ControlLoop,
        rules: CheckRules,
        robot_features: Callable[[], dict[str, tuple]],
        on_change: Callable[[], None],
        faults: Faults | None = None,
    ):
        """`robot_features`: the robot's observation and action features, which a model must fit;
        `on_change`: called after a model went live or was rejected (the agent reports its status)."""
        self.models = models
        self.control = control
        self.rules = rules
        self.robot_features = robot_features
        self.on_change = on_change
        self.faults = faults or Faults()
        self.last_swap: dict | None = None
        # ("landed", name, time) | ("rollback", Future) | ("failed", name, reason, time) | ("stop",)
        self._requests: queue.Queue[tuple] = queue.Queue()
        self._landed: dict[str, float] = {}  # model name -> when it landed (for the swap latency)
        self._gate_scores: dict[str, float] = {}
        self._observer: Observer | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._work, name="models", daemon=True)

    def load_live(self) -> None:
        """At start: load the newest model of the history that still passes its checks."""
        while (live := self.models.live()) is not None:
            try:
                loaded = check_model(live, self.robot_features(), self.rules)
                self._refuse_failed(live)
            except ModelRejected as why:
                log.error("live model %s fails its checks now (%s); falling back to the one before", live.name, why)
                self.models.rolled_back()
                continue
            self.control.swap(loaded, live.name, time.monotonic())
            return

    def start(self) -> None:
        """Watch the inbox; models that landed while the agent was down are processed first."""
        self._keep_watching()
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float) -> None:
        """Stop the worker: a check in progress finishes, nothing more is swapped in; a rollback waiting
        for the worker fails. Returns within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        self._stopping.set()
        self._requests.put(("stop",))
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the model worker did not end within %.0f s (a check in progress)", timeout)
        self._fail_waiting_rollbacks()
        observer = self._observer
        if observer is not None and observer.is_alive():
            observer.stop()
            observer.join(max(0.1, deadline - time.monotonic()))

    def rollback(self) -> dict:
        """Make the previously live model live again, checked and swapped like a new one, on the model
        worker (after a swap in progress)."""
        if self._stopping.is_set() or not self._thread.is_alive():
            raise RuntimeError("the model worker is not running (the agent is stopping)")
        future: Future[dict] = Future()
        self._requests.put(("rollback", future))
        try:
            return future.result(timeout=ROLLBACK_TIMEOUT)
        except TimeoutError:
            raise RuntimeError(f"the model worker did not do the rollback within {ROLLBACK_TIMEOUT:.0f} s") from None

    def policy_failed(self, name: str, reason: str) -> None:
        """Model `name` failed at run time (the control loop's signal, on its thread: never blocks); the
        worker rolls back after a swap or rollback in progress."""
        self._requests.put(("failed", name, reason, time.time()))

    def live_summary(self) -> dict | None:
        """The live model's name, global version (run, round), sha256 and time (None: no live model)."""
        live = self.models.live()
        if live is None:
            return None
        manifest = read_manifest(live)
        return {
            "name": live.name,
            **{key: manifest[key] for key in ("run", "round", "sha256", "created") if key in manifest},
        }

    # -- the worker thread ----------------------------------------------------------------------------
    def _work(self) -> None:
        backoff = Backoff(RETRY_FIRST, RETRY_MAX)
        wait = 0.0  # the first pass at once: models that landed while the agent was down
        while not self._stopping.is_set():
            self._take_requests(wait)
            if self._stopping.is_set():
                return
            try:
                self._keep_watching()
                for model in self.models.pending():
                    self._consider(model, self._landed.get(model.name, time.monotonic()))
            except _Stopping:
                return
            except Exception as error:  # noqa: BLE001  a fault: shown, and the pass tried again later
                wait = backoff.next()
                self.faults.report("models", error, "inbox", retry_in=wait)
                continue
            self.faults.clear("models", "inbox")
            backoff.reset()
            wait = INBOX_POLL

    def _take_requests(self, wait: float) -> None:
        """Wait up to `wait` seconds for a request; do the rollbacks asked for, note when models landed."""
        try:
            request = self._requests.get(timeout=wait) if wait > 0 else self._requests.get_nowait()
        except queue.Empty:
            return
        while True:
            if request[0] == "landed":
                self._landed[request[1]] = request[2]
            elif request[0] == "rollback":
                self._do_rollback(request[1])
            elif request[0] == "failed":
                self._do_auto_rollback(*request[1:])
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                return

    def _do_rollback(self, future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(self._rollback())
        except _Stopping:
            future.set_exception(RuntimeError("the agent is stopping: no rollback"))
        except Exception as error:  # noqa: BLE001  the client sees why; the worker goes on
            if not isinstance(error, RuntimeError):
                log.exception("rollback failed")
                error = RuntimeError(f"rollback failed: {type(error).__name__}: {error}")
            future.set_exception(error)

    def _rollback(self) -> dict:
        previous = self.models.previous()
        if previous is None:
            raise RuntimeError("no previous model to roll back to")
        try:
            loaded = check_model(previous, self.robot_features(), self.rules)
            self._refuse_failed(previous)
        except ModelRejected as why:
            raise RuntimeError(f"the previous model {previous.name} fails its checks now: {why}") from None
        staged = self.models.stage_rollback()
        self._swap(loaded, previous.name, time.monotonic())
        self._commit(staged)
        log.info("rolled back to %s", previous.name)
        self.on_change()
        return {"live": previous.name}

    def _do_auto_rollback(self, name: str, reason: str, when: float) -> None:
        try:
            self._auto_rollback(name, f"failed at run time: {reason}", when)
        except _Stopping:
            log.error("the agent is stopping: the rollback from model %s is done at the next start", name)
        except Exception as error:  # noqa: BLE001  shown as a fault; the worker goes on
            self.faults.report("models", error, "auto-rollback")

    def _auto_rollback(self, name: str, reason: str, when: float) -> None:
        """Mark model `name` failed and reject it; if it is live, make the previous model live again."""
        model = self.models.store / name
        manifest = read_manifest(model)  # {} if the store no longer keeps it
        if self.models.failed.find(name, manifest) is not None:
            return  # signalled again (a run restarted before the first signal was handled)
        live, previous = self.models.live(), self.models.previous()
        loaded = None
        if live is not None and live.name == name:
            try:
                if previous is None:
                    raise ModelRejected("there is no previous model")
                loaded = check_model(previous, self.robot_features(), self.rules)
                self._refuse_failed(previous)
            except ModelRejected as why:
                problem = f"model {name} {reason}; no rollback: {why}; it stays live, the robot holds"
                self.faults.report("models", RuntimeError(problem), "auto-rollback")
                return
        staged = self.models.stage_without(name)
        self.models.failed.record(name, manifest, reason, when, previous.name if loaded is not None else None)
        if model.is_dir():
            self.models.reject(model, reason)
        if loaded is not None:
            self._swap(loaded, previous.name, time.monotonic())
        self._commit(staged)
        if loaded is not None:
            log.error("automatic rollback: model %s %s; %s is live again", name, reason, previous.name)
        else:
            log.error("model %s %s; marked so that it is not taken again (it was no longer live)", name, reason)
        self.faults.clear("models", "auto-rollback")
        self.on_change()

    def _refuse_failed(self, model: Path) -> None:
        """Raise ModelRejected if `model` (verified) failed at run time here before, by name or content."""
        failed = self.models.failed.find(model.name, read_manifest(model))
        if failed is not None:
            raise ModelRejected(
                f"refused: model {failed['model']} with this name or content {failed['reason']} ({failed['time']})"
            )

    def _fail_waiting_rollbacks(self) -> None:
        while True:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                return
            if request[0] == "rollback" and request[1].set_running_or_notify_cancel():
                request[1].set_exception(RuntimeError("the agent is stopping: no rollback"))

    def _keep_watching(self) -> None:
        """(Re)start the inbox watch if it is not running; a failure is a fault of the observer (the
        inbox is polled meanwhile)."""
        observer = self._observer
        if observer is not None and observer.is_alive() and all(e.is_alive() for e in observer.emitters):
            return
        if observer is not None:
            log.error("the watch of %s stopped (was the inbox removed?): watching it again", self.models.inbox)
            observer.stop()
        try:
            self.models.inbox.mkdir(parents=True, exist_ok=True)
            observer = Observer()
            observer.name = "observer"
            observer.schedule(_InboxEvents(self._requests), str(self.models.inbox))
            observer.start()
        except Exception as error:  # noqa: BLE001  polling goes on; tried again at the next pass
            self.faults.report("observer", error, "watch", retry_in=INBOX_POLL)
            return
        self._observer = observer
        self.faults.clear("observer", "watch")

    def _consider(self, model: Path, landed_at: float) -> None:
        log.info("new model %s: checking", model.name)
        try:
            loaded = check_model(model, self.robot_features(), self.rules, live=self.models.live())
            self._refuse_failed(model)
            if self.rules.sim_gate_episodes > 0:
                self.sim_gate(model.name, loaded)
        except ModelRejected as why:
            log.warning("model %s rejected: %s", model.name, why)
            self.models.reject(model, str(why))
            self._landed.pop(model.name, None)
            self.on_change()
            return
        if self._stopping.is_set():
            raise _Stopping
        staged = self.models.stage_live(model.name)  # fails on a full or read-only disk: nothing changed yet
        stored = self.models.accept(model)
        try:
            ticket = self._swap(loaded, stored.name, landed_at)
        except BaseException:
            self.models.unaccept(stored)  # back into the inbox: checked again at the next pass or start
            raise
        self._commit(staged)
        self._landed.pop(model.name, None)
        self.last_swap = {
            "model": stored.name,
            "latency-ms": round(ticket.latency * 1e3, 1),
            "tick": ticket.installed_tick,
        }
        log.info(
            "model %s is live (%.1f ms from landing to the first tick on its weights)",
            stored.name,
            ticket.latency * 1e3,
        )
        self.faults.clear("models", "auto-rollback")
        self.on_change()

    def _commit(self, staged: Path) -> None:
        """Put the staged history in effect; if even that fails, the loop gets the history's live model
        back, so that what runs is what the history says."""
        try:
            self.models.commit_history(staged)
        except Exception:
            live = self.models.live()
            if live is not None:
                log.error("the history could not be written: swapping %s back in", live.name)
                self._swap(check_model(live, self.robot_features(), self.rules), live.name, time.monotonic())
            raise

    def _swap(self, loaded: LoadedPolicy, name: str, landed_at: float) -> SwapTicket:
        """Hand `loaded` to the control loop and wait until it acts on it; withdrawn if the loop does not
        take it within SWAP_TIMEOUT or the agent stops."""
        ticket = self.control.swap(loaded, name, landed_at)
        deadline = time.monotonic() + SWAP_TIMEOUT
        while not ticket.done.wait(0.5):
            stopping = self._stopping.is_set()
            if (stopping or time.monotonic() > deadline) and self.control.withdraw(ticket):
                if stopping:
                    raise _Stopping
                raise RuntimeError(f"the control loop did not take model {name} within {SWAP_TIMEOUT:.0f} s")
        return ticket

    def sim_gate(self, name: str, loaded: LoadedPolicy) -> None:
        """Raise ModelRejected if the candidate `loaded` succeeds in the sim less often than the live
        model, beyond the tolerance (the live model's score is computed once and kept)."""
        episodes, tolerance = self.rules.sim_gate_episodes, self.rules.sim_gate_tolerance
        candidate = sim_gate_success(loaded, episodes)
        live = self.models.live()
        if live is None:
            log.info("sim gate: %s succeeds on %.0f%% (no live model to compare)", name, candidate * 100)
            return
        if live.name not in self._gate_scores:
            self._gate_scores[live.name] = sim_gate_success(load_policy(live, self.rules.device), episodes)
        reference = self._gate_scores[live.name]
        log.info("sim gate: %s %.0f%%, live %s %.0f%%", name, candidate * 100, live.name, reference * 100)
        if candidate < reference - tolerance:
            raise ModelRejected(
                f"sim gate: success {candidate:.0%} on {episodes} scenes, the live model has "
                f"{reference:.0%} (tolerance {tolerance:.0%})"
            )
        self._gate_scores[name] = candidate


class _InboxEvents(FileSystemEventHandler):
    """Model directories appear in the inbox by rename (agent/inbox.py) or by a copy into it."""

    def __init__(self, requests: queue.Queue):
        self.requests = requests

    def on_any_event(self, event) -> None:
        path = Path(event.dest_path or event.src_path) if event.event_type == "moved" else Path(event.src_path)
        if event.event_type in ("created", "moved"):
            self.requests.put(("landed", path.name, time.monotonic()))
