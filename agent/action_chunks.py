"""Action chunks computed ahead of need, so that a slow policy never stalls the control loop.

lerobot's `select_action` computes a diffusion policy's next chunk of actions inside the tick that
runs out of actions: ~80 ms for the pusht-state preset on one CPU core, more than two periods at
30 Hz. lerobot's own remedy (async inference) runs the policy in a separate gRPC server process.
Here a worker thread of the agent does it: the control thread keeps the last `n_obs_steps`
observations and, when the queued actions cover fewer ticks than an inference takes, hands a
snapshot to the worker, which calls the policy's public `predict_action_chunk`. Action i of a chunk
belongs to the tick of the newest observation + i; actions for ticks already past are dropped.

Each chunk passes agent/action_checks.py before it is queued. A chunk that fails it, or an exception
of the policy, is raised in the control thread at its next tick as `PolicyFailed`, naming the model:
nothing of that chunk is executed.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor

import numpy as np
import torch
from lerobot.policies.utils import prepare_observation_for_inference

from agent.action_checks import UnsafeActions, safe_actions
from agent.faults import describe
from fedbot.policy_io import LoadedPolicy

Bounds = tuple[np.ndarray, np.ndarray] | None


class PolicyFailed(Exception):
    """The model `model` failed at run time: its inference raised, or its actions are unsafe (`reason`)."""

    def __init__(self, model: str, reason: str):
        super().__init__(f"model {model} failed at run time: {reason}")
        self.model, self.reason = model, reason


class ChunkedInference:
    """Feeds one action per tick from chunks computed by a worker thread."""

    def __init__(self, period: float, bounds: Callable[[], Bounds] = lambda: None):
        """`bounds`: the robot's action bounds now (agent/action_checks.py)."""
        self.period = period
        self.bounds = bounds
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._loaded: LoadedPolicy | None = None
        self._name = ""  # the model name of `_loaded`
        self._generation = 0  # bumped at a new episode; chunks of older generations are discarded
        self._history: deque[dict] = deque()
        self._queue: deque[tuple[int, np.ndarray]] = deque()  # (tick, action)
        self._future: Future | None = None
        self._source: LoadedPolicy | None = None  # the policy that computed the queued actions
        self._lock = threading.Lock()
        self.inference_seconds = 0.0  # a slowly decaying maximum of recent chunk inferences
        self.starved = 0  # ticks with a policy but no action ready
        self.late_chunks = 0  # chunks that arrived after all their ticks had passed
        self._tick = 0  # the control loop's current tick

    @property
    def policy(self) -> LoadedPolicy | None:
        return self._loaded

    def set_policy(self, loaded: LoadedPolicy, name: str) -> None:
        """Use `loaded` (model `name`) for the next chunks. Queued actions and a chunk in flight from the previous
        policy are still executed until the new policy's first chunk is ready, so that a swap never
        leaves the robot without an action."""
        with self._lock:
            self._loaded, self._name = loaded, name
            loaded.reset()
            self._history = deque(self._history, maxlen=loaded.policy.config.n_obs_steps)

    def reset(self) -> None:
        """A new episode: forget observations and queued actions."""
        with self._lock:
            self._generation += 1
            self._future = None
            self._history.clear()
            self._queue.clear()
            if self._loaded is not None:
                self._loaded.reset()

    def step(self, tick: int, observation: dict) -> tuple[np.ndarray | None, LoadedPolicy | None]:
        """The action for `tick` and the policy that computed it; (None, None) if none is ready.
        A failure of the policy (`PolicyFailed`) is raised here, in the control thread."""
        loaded = self._loaded
        self._tick = tick
        if loaded is None:
            return None, None
        self._history.append(prepare_observation_for_inference(dict(observation), loaded.device))
        while len(self._history) < self._history.maxlen:
            self._history.appendleft(self._history[0])
        with self._lock:
            future, self._future = self._future, (None if self._future and self._future.done() else self._future)
            if future is not None and future.done() and future.exception() is not None:
                raise future.exception()
            ahead = sum(1 for t, _ in self._queue if t > tick)
            lookahead = math.ceil(self.inference_seconds / self.period) + 1  # +1: the tick it lands in
            if self._future is None and ahead < lookahead:
                self._future = self._worker.submit(
                    self._infer, loaded, self._name, list(self._history), tick, self._generation
                )
            while self._queue and self._queue[0][0] < tick:
                self._queue.popleft()
            if self._queue and self._queue[0][0] == tick:
                return self._queue.popleft()[1], self._source
        self.starved += 1
        return None, None

    def _infer(self, loaded: LoadedPolicy, name: str, history: list[dict], tick: int, generation: int) -> None:
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                frames = [loaded.preprocessor(dict(observation)) for observation in history]
                batch = {
                    key: torch.stack([frame[key] for frame in frames], dim=1)
                    for key in loaded.policy.config.input_features
                }
                chunk = loaded.postprocessor(loaded.policy.predict_action_chunk(batch))
            actions = safe_actions(chunk.squeeze(0).cpu().numpy(), self.bounds())
        except UnsafeActions as unsafe:
            raise PolicyFailed(name, str(unsafe)) from unsafe
        except Exception as error:  # noqa: BLE001  any exception of the policy is a failure of the model
            raise PolicyFailed(name, f"inference raised {describe(error)}") from error
        with self._lock:
            self.inference_seconds = max(time.perf_counter() - started, 0.9 * self.inference_seconds)
            if generation == self._generation:
                # A chunk that arrives after its last tick would leave nothing to do, every time, if the
                # policy is slower than a chunk's span: then its last action goes to the next tick (the
                # control thread has served tick `self._tick` already).
                late = max(0, self._tick + 1 - tick - (len(actions) - 1))
                self.late_chunks += late > 0
                self._queue = deque((tick + late + i, action) for i, action in enumerate(actions))
                self._source = loaded

    def close(self, timeout: float) -> None:
        """Stop the worker: a chunk in flight may take up to `timeout` seconds to finish."""
        self._worker.shutdown(wait=False, cancel_futures=True)
        future = self._future
        if future is not None:
            try:
                future.exception(timeout=timeout)
            except (TimeoutError, CancelledError):
                pass
