"""New models for the live controller: inbox watcher, checks, sim gate, swap, rollback, live model at start.

A model lands in `<model-dir>/inbox/` (agent/inbox.py, or by hand); a watchdog Observer notices it
and a worker thread checks it (agent/model_store.py: manifest sha256, strict load, finite weights,
features that fit the robot), optionally runs the sim gate against the live model, then accepts it
into the store and hands it to the control loop, which installs it between two ticks. Only once the
loop acts on its weights does the model become live in the store's history. A model that fails goes
to `rejected/` with the reason. This happens in any state of the agent, off the control thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer

from agent.controller import ControlLoop
from agent.model_store import CheckRules, ModelRejected, ModelStore, check_model, read_manifest, sim_gate_success
from fedbot.policy_io import LoadedPolicy, load_policy

log = logging.getLogger("fedbot.agent")
SWAP_TIMEOUT = 60.0


class ModelUpdates:
    """Checks each model that lands in the inbox and swaps it into the control loop, or rejects it."""

    def __init__(
        self,
        models: ModelStore,
        control: ControlLoop,
        rules: CheckRules,
        robot_features: Callable[[], dict[str, tuple]],
        on_change: Callable[[], None],
    ):
        """`robot_features`: the robot's observation and action features, which a model must fit;
        `on_change`: called after a model went live or was rejected (the agent reports its status)."""
        self.models = models
        self.control = control
        self.rules = rules
        self.robot_features = robot_features
        self.on_change = on_change
        self.last_swap: dict | None = None
        self._landed: queue.Queue[tuple[str, float]] = queue.Queue()
        self._gate_scores: dict[str, float] = {}
        self._observer = Observer()
        self._stopping = threading.Event()

    def load_live(self) -> None:
        """At start: load the newest model of the history that still passes its checks."""
        while (live := self.models.live()) is not None:
            try:
                loaded = check_model(live, self.robot_features(), self.rules)
            except ModelRejected as why:
                log.error("live model %s fails its checks now (%s); falling back to the one before", live.name, why)
                self.models.rolled_back()
                continue
            self.control.swap(loaded, live.name, time.monotonic())
            return

    def start(self) -> None:
        """Watch the inbox; models that landed while the agent was down are processed first."""
        self._observer.schedule(_InboxEvents(self._landed), str(self.models.inbox))
        self._observer.start()
        self._landed.put(("", time.monotonic()))
        threading.Thread(target=self._process_inbox, name="models", daemon=True).start()

    def close(self) -> None:
        self._stopping.set()
        self._landed.put(("", 0.0))
        if self._observer.is_alive():
            self._observer.stop()

    def rollback(self) -> dict:
        """Make the previously live model live again, checked and swapped like a new one."""
        previous = self.models.previous()
        if previous is None:
            raise RuntimeError("no previous model to roll back to")
        try:
            loaded = check_model(previous, self.robot_features(), self.rules)
        except ModelRejected as why:
            raise RuntimeError(f"the previous model {previous.name} fails its checks now: {why}") from None
        ticket = self.control.swap(loaded, previous.name, time.monotonic())
        if not ticket.done.wait(SWAP_TIMEOUT):
            raise RuntimeError("the control loop did not take the model")
        self.models.rolled_back()
        log.info("rolled back to %s", previous.name)
        return {"live": previous.name}

    def live_summary(self) -> dict | None:
        """The live model's name, round, sha256 and time (None: no live model)."""
        live = self.models.live()
        if live is None:
            return None
        manifest = read_manifest(live)
        return {"name": live.name, **{key: manifest[key] for key in ("round", "sha256", "created") if key in manifest}}

    def _process_inbox(self) -> None:
        while not self._stopping.is_set():
            name, landed_at = self._landed.get()
            landed = {name: landed_at}
            while not self._landed.empty():
                name, at = self._landed.get()
                landed[name] = at
            if self._stopping.is_set():
                return
            for model in self.models.pending():
                self._consider(model, landed.get(model.name, time.monotonic()))

    def _consider(self, model: Path, landed_at: float) -> None:
        log.info("new model %s: checking", model.name)
        try:
            loaded = check_model(model, self.robot_features(), self.rules)
            if self.rules.sim_gate_episodes > 0:
                self.sim_gate(model.name, loaded)
        except ModelRejected as why:
            log.warning("model %s rejected: %s", model.name, why)
            self.models.reject(model, str(why))
            self.on_change()
            return
        stored = self.models.accept(model)
        ticket = self.control.swap(loaded, stored.name, landed_at)
        if not ticket.done.wait(SWAP_TIMEOUT):
            log.error("model %s was not taken by the control loop within %.0f s", stored.name, SWAP_TIMEOUT)
            return
        self.models.went_live(stored)
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
        self.on_change()

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

    def __init__(self, landed: queue.Queue):
        self.landed = landed

    def on_any_event(self, event) -> None:
        path = Path(event.dest_path or event.src_path) if event.event_type == "moved" else Path(event.src_path)
        if event.event_type in ("created", "moved"):
            self.landed.put((path.name, time.monotonic()))
