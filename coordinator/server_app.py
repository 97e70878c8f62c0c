"""The coordinator's Flower ServerApp: federated statistics, rounds, evaluation, registry, deploy.

`main` is the run as a sequence of steps: start (a census of the robots, the latest published model
sent to those that lack it, a warm start from it; coordinator/lineage.py) or resume, then for each
round train, evaluate and record, and finally deploy and mark the run finished. Talking to the robots
through Flower's Grid (waiting for them, exchanges, auditing replies) is coordinator/grid.py; the run
directory with its models, metrics and resume state is coordinator/registry.py.

The rounds are driven through the strategy's own configure/aggregate methods (rather than
`strategy.start`, which always begins at round 1) so that a restarted coordinator continues from its
last saved global model and round. The global model stays float32 here; robots get it in the run's
`weights-dtype` and answer with updates that are added to it before aggregation (fedbot/transfer.py).

When the preset trains with an EMA of the weights (fedbot/training.py), the strategy's aggregate
is the model the robots train from and its EMA is the global model that is evaluated, saved and
deployed: once a round the EMA moves towards the new aggregate by the decay that training with the
EMA would apply over the round's local steps. The aggregate is saved beside each model for resume.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    Strategy,
)

from coordinator.grid import base_strategy, exchange, fit_to_live_nodes, for_transfer, messages_to, wait_for_nodes
from coordinator.lineage import RobotCensus, lacking, lineage, new_episodes, warm_start_from
from coordinator.registry import RunDirectory
from fedbot.evaluation import evaluate, features_the_simulator_lacks
from fedbot.model_manifest import MANIFEST
from fedbot.policy_io import LoadedPolicy, load_policy
from fedbot.presets import get_preset
from fedbot.run_config import RunConfig
from fedbot.training import ema_decay_over, policy_from_stats
from fedbot.transfer import (
    aggregate_node_stats,
    apply_update,
    files_to_record,
    load_weights,
    record_to_stats,
    stats_to_record,
    weights_to_record,
    weights_vector,
)

log = logging.getLogger("fedbot.coordinator")
app = ServerApp()
AGGREGATE = "aggregate"  # saved-state key prefix of the aggregate robots train from (with an EMA)


@dataclass
class RunState:
    """A federated run's live state: what the steps of `main` read, and the global model they change."""

    run: RunConfig
    directory: RunDirectory
    loaded: LoadedPolicy  # the global model as a policy: evaluated, saved, deployed (with an EMA: the EMA)
    arrays: ArrayRecord  # the strategy's aggregate, which robots train from: float32 weights
    stats_record: ArrayRecord  # the global normalization statistics, sent with every model
    strategy: Strategy
    evaluated: bool  # whether the simulator can run the policy: rounds are evaluated
    refused: set[int] = field(default_factory=set)  # nodes whose features differ from the run's

    @classmethod
    def of(
        cls, run: RunConfig, directory: RunDirectory, loaded: LoadedPolicy, stats: dict, arrays: ArrayRecord | None
    ) -> RunState:
        evaluated = run.eval_episodes > 0 and not features_the_simulator_lacks(loaded)
        if run.eval_episodes > 0 and not evaluated:
            log.info("the PushT simulator cannot run %s policies: global models are not evaluated", run.preset)
        return cls(
            run=run,
            directory=directory,
            loaded=loaded,
            arrays=arrays or weights_to_record(loaded.policy),  # float32; sent in run.weights_dtype
            stats_record=stats_to_record(stats, list(stats)),
            strategy=make_strategy(run),
            evaluated=evaluated,
        )

    def due(self, server_round: int, every: int) -> bool:
        """Whether a step done every `every` rounds (and after the last one) is due this round."""
        return server_round % every == 0 or server_round == self.run.num_server_rounds

    @property
    def ema_power(self) -> float:
        return get_preset(self.run.preset).ema_power

    def published(self) -> ArrayRecord:
        """The global model's weights as robots evaluate and receive it (the EMA when there is one)."""
        return weights_to_record(self.loaded.policy)

    def follow(self, arrays: ArrayRecord, server_round: int) -> None:
        """A new aggregate: robots train from it; the global model becomes it or, with an EMA, moves
        towards it by the decay of this round's local steps."""
        self.arrays = arrays
        if self.ema_power <= 0.0:
            load_weights(self.loaded.policy, arrays)
            return
        keep = ema_decay_over(self.run.first_step(server_round), self.run.local_steps, self.ema_power)
        (key, aggregate), current = *arrays.items(), weights_vector(self.loaded.policy).numpy()
        moved = keep * current + (1.0 - keep) * aggregate.numpy()
        load_weights(self.loaded.policy, ArrayRecord({key: Array(moved.astype(np.float32))}))

    def saved_state(self) -> dict:
        """What a resumed run needs besides the global model: the strategy's state and, with an EMA,
        the aggregate robots train from."""
        state = strategy_state(self.strategy)
        if self.ema_power > 0.0:
            ((key, aggregate),) = self.arrays.items()
            state[f"{AGGREGATE}/{key}"] = aggregate.numpy()
        return state


@app.main()
def main(grid: Grid, context: Context) -> None:
    log_to_stdout()
    run = RunConfig.from_run_config(context.run_config)
    state, last_round = start_or_resume(grid, run, RunDirectory.open(run))
    if state is None:
        return  # skipped: too little new data
    for server_round in range(last_round + 1, run.num_server_rounds + 1):
        started = time.monotonic()
        # min-nodes robots when the rounds (re)start; after that, whoever is still there
        row = train(grid, state, server_round, run.min_nodes if server_round == last_round + 1 else 1)
        if state.evaluated and state.due(server_round, run.eval_every):
            row.update(evaluate_round(grid, state, server_round))
        record(state, row, started)
    deploy(grid, state)
    finish(state)


def log_to_stdout() -> None:
    """Our INFO lines to stdout, which Flower streams to `flwr run --stream` / `flwr log`; force:
    imports may have configured the root logger already. Other libraries' INFO (every HTTP request)
    stays out."""
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stdout, force=True, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("fedbot").setLevel(logging.INFO)


# -- start or resume ----------------------------------------------------------------------------


def start_or_resume(grid: Grid, run: RunConfig, directory: RunDirectory) -> tuple[RunState | None, int]:
    """The run's state and the last round done: a fresh run as `start` makes it (None: skipped); a
    resumed one from its latest saved model, with the statistics that model carries and the
    strategy's saved state."""
    resumed = directory.latest_model()
    if resumed is None:
        return start(grid, run, directory), 0
    last_round, path = resumed
    loaded = load_policy(path)
    log.info("continuing after round %d from %s", last_round, path)
    saved = directory.strategy_state(last_round)
    aggregate = {key.split("/", 1)[1]: Array(value) for key, value in saved.items() if key.startswith(f"{AGGREGATE}/")}
    state = RunState.of(run, directory, loaded, loaded_stats(loaded), ArrayRecord(aggregate) if aggregate else None)
    restore_strategy_state(state.strategy, saved)
    directory.forget_rounds_after(last_round)
    return state, last_round


def start(grid: Grid, run: RunConfig, directory: RunDirectory) -> RunState | None:
    """A new run: the robots' census; the fleet's latest published model sent to robots that lack
    it; then, unless the robots recorded fewer than min-new-episodes since that model's run (None:
    the run is skipped), the initial global model, saved as round 0. It is the published model
    (warm start) when the features allow, else seeded weights on federated statistics."""
    stats, features, refused, robots = federated_stats(grid, run, directory)
    parent = directory.latest_published(run.preset)
    if parent is not None:
        send_model(grid, run, directory, parent.path, lacking(robots, parent), "catch-up deploy")
    new = new_episodes(robots, parent)
    if new < run.min_new_episodes:
        directory.write_lineage(lineage(parent, False, robots, features))  # the census, for status
        log.info(
            "%d new episodes since the last published model (min-new-episodes %d): no training",
            new,
            run.min_new_episodes,
        )
        directory.write_state(run, finished=True, skipped=True)
        return None
    warm = run.warm_start and warm_start_from(parent, features)
    if warm:
        loaded = load_policy(parent.path)
        stats = loaded_stats(loaded)  # the weights were learned with these; the new data is trained on with them
        log.info("starting from the published model %s (%d new episodes since)", parent.path, new)
    else:
        torch.manual_seed(run.seed)  # the initial global weights
        loaded = policy_from_stats(get_preset(run.preset), features, stats)
    state = RunState.of(run, directory, loaded, stats, None)
    state.refused = refused
    directory.write_lineage(lineage(parent, warm, robots, features))
    directory.save_model(0, state.loaded, {})
    return state


def federated_stats(
    grid: Grid, run: RunConfig, directory: RunDirectory
) -> tuple[dict, dict, set[int], dict[str, RobotCensus]]:
    """Ask every robot for its dataset summary and aggregate them: the global stats, the run's
    features (those most robots have), the nodes refused because theirs differ (by name), and the
    census of the others."""
    nodes = wait_for_nodes(grid, run.min_nodes, run.robot_wait_seconds)
    config = RecordDict({"config": ConfigRecord({"preset": run.preset})})
    replies, _ = exchange(grid, messages_to(nodes, config, "query.stats"), run, "statistics", directory)
    if not replies:
        raise RuntimeError("no robot sent its statistics; the run cannot start")
    declared = [json.loads(reply.content["info"]["features"]) for reply in replies]
    features = max(declared, key=declared.count)
    refused = set()
    for reply, theirs in zip(replies, declared, strict=True):
        if theirs != features:
            refused.add(reply.metadata.src_node_id)
            log.error(
                "robot %s refused for this run: its features differ from the run's: %s",
                reply.content["info"]["robot"],
                feature_difference(features, theirs),
            )
    accepted = [reply for reply in replies if reply.metadata.src_node_id not in refused]
    stats = aggregate_node_stats([record_to_stats(r.content["stats"]) for r in accepted])
    robots = {r.content["info"]["robot"]: RobotCensus.of(r.metadata.src_node_id, r.content["info"]) for r in accepted}
    log.info("global statistics from %d robots (frames: %s)", len(accepted), {n: r.frames for n, r in robots.items()})
    for feature in features.values():
        feature["shape"] = tuple(feature["shape"])
    return stats, features, refused, robots


def feature_difference(run: dict, robot: dict) -> str:
    """What a robot's features have that the run's do not, and the other way round, by key."""
    parts = [
        f"{key}: run {run.get(key)}, robot {robot.get(key)}"
        for key in sorted(set(run) | set(robot))
        if run.get(key) != robot.get(key)
    ]
    return "; ".join(parts)


def loaded_stats(loaded: LoadedPolicy) -> dict:
    """The normalization statistics a saved global model carries in its preprocessor."""
    step = next(s for s in loaded.preprocessor.steps if getattr(s, "stats", None))
    return {
        key: {name: value.cpu().numpy() if hasattr(value, "cpu") else value for name, value in stats.items()}
        for key, stats in step.stats.items()
    }


def make_strategy(run: RunConfig) -> Strategy:
    common = dict(
        fraction_train=run.fraction_train,
        fraction_evaluate=run.fraction_evaluate,
        min_train_nodes=run.min_nodes,
        min_evaluate_nodes=run.min_nodes,
        min_available_nodes=run.min_nodes,
    )
    if run.strategy == "fedprox":
        strategy = FedProx(**common, proximal_mu=run.proximal_mu)
    elif run.strategy == "fedavgm":
        strategy = FedAvgM(**common, server_learning_rate=run.server_learning_rate, server_momentum=run.server_momentum)
    elif run.strategy == "fedadam":
        eta_l = run.lr or get_preset(run.preset).config["optimizer_lr"]
        strategy = FedAdam(**common, eta=run.server_learning_rate, eta_l=eta_l)
    else:
        strategy = FedAvg(**common)
    if run.dp_noise_multiplier <= 0.0:
        return strategy
    # Client-side fixed clipping: the wrapper sends the norm with every training message, robots clip
    # their update to it (agent/client_app.py), and the wrapper adds Gaussian noise to the aggregate.
    return DifferentialPrivacyClientSideFixedClipping(
        strategy, run.dp_noise_multiplier, run.dp_clipping_norm, num_sampled_clients=run.min_nodes
    )


def strategy_state(strategy: Strategy) -> dict:
    """Server-optimizer state that a resumed run needs (FedAdam's moments, FedAvgM's momentum, a list
    in the model's array order); empty for FedAvg/FedProx."""
    state, strategy = {}, base_strategy(strategy)
    for name in ("m_t", "v_t"):
        for key, value in (getattr(strategy, name, None) or {}).items():
            state[f"{name}/{key}"] = value
    for index, value in enumerate(getattr(strategy, "momentum_vector", None) or []):
        state[f"momentum_vector/{index:06d}"] = value
    return state


def restore_strategy_state(strategy: Strategy, state: dict) -> None:
    strategy = base_strategy(strategy)
    for name in ("m_t", "v_t"):
        moments = {key.split("/", 1)[1]: value for key, value in state.items() if key.startswith(f"{name}/")}
        if moments:
            setattr(strategy, name, moments)
            log.info("restored %s of %s (%d arrays)", name, type(strategy).__name__, len(moments))
    momentum = [value for key, value in sorted(state.items()) if key.startswith("momentum_vector/")]
    if momentum:
        strategy.momentum_vector = momentum
        log.info("restored momentum_vector of %s (%d arrays)", type(strategy).__name__, len(momentum))


# -- a round: train, evaluate, record -----------------------------------------------------------


def train(grid: Grid, state: RunState, server_round: int, min_robots: int) -> dict:
    """One training round once `min_robots` are connected: configure, send the global model in the
    transfer dtype, exchange, turn the robots' updates into weights and aggregate them into the new
    global model. Returns the round's metrics row so far."""
    run, strategy = state.run, state.strategy
    fit_to_live_nodes(strategy, run, wait_for_nodes(grid, min_robots, run.robot_wait_seconds))
    configured = strategy.configure_train(server_round, state.arrays, ConfigRecord(), grid)
    messages = for_transfer(
        [m for m in configured if m.metadata.dst_node_id not in state.refused], run, state.stats_record
    )
    sent = sum(m.content["arrays"].count_bytes() for m in messages)
    log.info("round %d: training on %d robots", server_round, len(messages))
    exchange_started = time.monotonic()
    replies, failed = exchange(grid, messages, run, f"round {server_round} training", state.directory)
    exchange_seconds, phases = time.monotonic() - exchange_started, round_phases(replies)
    received = sum(r.content["arrays"].count_bytes() for r in replies)  # the updates, as they travelled
    per_robot = [robot_row(reply) for reply in replies]
    usable = trained_weights(replies, state.arrays)
    failed += len(replies) - len(usable)
    train_metrics = aggregate(state, server_round, usable)
    return {
        "round": server_round,
        "robots": len(usable),
        "failed": failed,
        "train-loss": train_metrics.get("train-loss") if train_metrics else None,
        "bytes-sent": sent,
        "bytes-received": received,
        "train-round-seconds": exchange_seconds,
        **phases,
        "per-robot": per_robot,
    }


def robot_row(reply: Message) -> dict:
    """What one robot's training reply says about it: its node, examples, loss, time, and the L2 norm
    of its update (computed here, in float32, from what it sent). A reply without them says so."""
    row = {"node": reply.metadata.src_node_id}
    try:
        metrics = reply.content["metrics"]
        ((_, update),) = reply.content["arrays"].items()
        row.update(
            {
                "examples": int(metrics["num-examples"]),
                "train-loss": float(metrics["train-loss"]),
                "train-seconds": float(metrics["train-seconds"]),
                "update-norm": float(np.linalg.norm(update.numpy().astype(np.float32))),
            }
        )
    except (KeyError, ValueError, TypeError) as error:
        row["malformed"] = f"{type(error).__name__}: {error}"[:200]
    return row


def round_phases(replies: list[Message]) -> dict:
    """Where a training exchange's wall time went, slowest robot per phase: the message's way to the
    ClientApp, its setup, local training, packing the reply, and the reply's way back (its
    `created_at` is the robot's clock; the split is exact only where both clocks agree)."""
    if not replies:
        return {}
    phases = {
        f"{phase}-seconds": max(r.content["metrics"][f"{phase}-seconds"] for r in replies)
        for phase in ("inbound", "setup", "train", "pack")
    }
    phases["return-seconds"] = time.time() - max(r.metadata.created_at for r in replies)
    return phases


def trained_weights(replies: list[Message], arrays: ArrayRecord) -> list[Message]:
    """Replies with each robot's update turned into its float32 weights (global + update), which
    is what the strategies aggregate; a reply whose update does not fit the model is dropped."""
    usable = []
    for reply in replies:
        try:
            reply.content["arrays"] = apply_update(arrays, reply.content["arrays"])
        except ValueError as error:
            log.warning("a robot's update was dropped (node %s): %s", reply.metadata.src_node_id, error)
            continue
        usable.append(reply)
    return usable


def aggregate(state: RunState, server_round: int, replies: list[Message]) -> MetricRecord | None:
    """The strategy's aggregate of the robots' weights becomes the global model (unchanged when no
    reply was usable); returns the aggregated training metrics."""
    arrays, train_metrics = state.strategy.aggregate_train(server_round, replies)
    if arrays is None:
        log.warning("round %d: no usable replies; the global model is unchanged", server_round)
    else:
        state.follow(arrays, server_round)
    return train_metrics


def evaluate_round(grid: Grid, state: RunState, server_round: int) -> dict:
    """Server-side evaluation in the sim on held-out seeds, then the robots' own evaluation."""
    run, strategy = state.run, state.strategy
    report = evaluate(
        state.loaded,
        run.eval_episodes,
        state.directory.root / "evaluate" / f"round_{server_round}" / "server",
        videos=1,
        policy_name=f"global round {server_round}",
    )
    result = {"server-success-rate": report.success_rate, "server-mean-max-coverage": report.mean_max_coverage}
    fit_to_live_nodes(strategy, run, wait_for_nodes(grid, 1, run.robot_wait_seconds))
    configured = strategy.configure_evaluate(server_round, state.published(), ConfigRecord(), grid)
    messages = [m for m in configured if m.metadata.dst_node_id not in state.refused]
    if messages:
        messages = for_transfer(messages, run, state.stats_record)
        replies, _ = exchange(grid, messages, run, f"round {server_round} evaluation", state.directory)
        metrics = strategy.aggregate_evaluate(server_round, replies)
        if metrics:
            result["client-success-rate"] = metrics.get("success-rate")
            result["client-mean-max-coverage"] = metrics.get("mean-max-coverage")
    return result


def record(state: RunState, row: dict, started: float) -> None:
    """Complete the round's metrics row with its duration since `started`, save the global model when
    due (the row, less its round, in the manifest; the strategy's state beside it), append the row."""
    server_round = row["round"]
    row["seconds"] = time.monotonic() - started
    if state.due(server_round, state.run.save_every):
        metrics = {k: v for k, v in row.items() if k != "round"}
        state.directory.save_model(server_round, state.loaded, metrics, state.saved_state())
    state.directory.append_metrics(row)
    log.info("round %d: %s", server_round, row)


# -- the end ------------------------------------------------------------------------------------


def deploy(grid: Grid, state: RunState) -> None:
    """Send the final global model to every robot connected now (the others get it when they next
    join a run: `start`)."""
    _, path = state.directory.latest_model()
    nodes = [node for node in grid.get_node_ids() if node not in state.refused]
    send_model(grid, state.run, state.directory, path, nodes, "deploy")


def send_model(grid: Grid, run: RunConfig, directory: RunDirectory, model: Path, nodes: list[int], what: str) -> None:
    """Send a published model's files, as signed, to the model inbox of each of `nodes`."""
    if not nodes:
        return
    manifest = json.loads((model / MANIFEST).read_text())
    config = ConfigRecord({"round": int(manifest["round"])})
    content = RecordDict({"files": files_to_record(model), "config": config})
    replies, _ = exchange(grid, messages_to(nodes, content, "query.deploy"), run, what, directory)
    for reply in replies:
        log.info(
            "%s: %s round %s to %s", what, manifest.get("run"), manifest["round"], reply.content["deployed"]["robot"]
        )


def finish(state: RunState) -> None:
    """Mark the run finished: a restarted coordinator starts a new run rather than resuming this one."""
    state.directory.write_state(state.run, finished=True)
    log.info("run finished: %s", state.directory.root)
