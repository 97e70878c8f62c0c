"""The coordinator's Flower ServerApp: federated statistics, rounds, evaluation, registry, deploy.

The rounds are driven through the strategy's own configure/aggregate methods (rather than
`strategy.start`, which always begins at round 1) so that a restarted coordinator continues from its
last saved global model and round. The global model stays float32 here; robots get it in the run's
`weights-dtype` and answer with updates that are added to it before aggregation (fedbot/transfer.py).
Talking to the robots through Flower's Grid (waiting for them, exchanges, auditing replies) is
coordinator/grid.py.
"""

from __future__ import annotations

import json
import logging
import sys
import time

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from coordinator.grid import exchange, fit_to_live_nodes, for_transfer, messages_to, wait_for_nodes
from coordinator.registry import RunDirectory
from fedbot.evaluation import evaluate, features_the_simulator_lacks
from fedbot.policy_io import LoadedPolicy, load_policy
from fedbot.presets import get_preset
from fedbot.run_config import RunConfig
from fedbot.training import policy_from_stats
from fedbot.transfer import (
    aggregate_node_stats,
    apply_update,
    load_weights,
    record_to_stats,
    stats_to_record,
    weights_to_record,
)

log = logging.getLogger("fedbot.coordinator")
app = ServerApp()


def make_strategy(run: RunConfig):
    common = dict(
        fraction_train=run.fraction_train,
        fraction_evaluate=run.fraction_evaluate,
        min_train_nodes=run.min_nodes,
        min_evaluate_nodes=run.min_nodes,
        min_available_nodes=run.min_nodes,
    )
    if run.strategy == "fedprox":
        return FedProx(**common, proximal_mu=run.proximal_mu)
    if run.strategy == "fedadam":
        return FedAdam(**common, eta=run.server_lr, eta_l=run.lr)
    return FedAvg(**common)


def federated_stats(grid: Grid, run: RunConfig, directory: RunDirectory) -> tuple[dict, dict]:
    """Ask every robot for its dataset summary and aggregate them: global stats and features."""
    nodes = wait_for_nodes(grid, run.min_nodes)
    config = RecordDict({"config": ConfigRecord({"preset": run.preset})})
    replies, _ = exchange(grid, messages_to(nodes, config, "query.stats"), run, "statistics", directory)
    if len(replies) < run.min_nodes:
        raise RuntimeError(f"only {len(replies)} robots sent statistics; min-nodes is {run.min_nodes}")
    features = json.loads(replies[0].content["info"]["features"])
    for feature in features.values():
        feature["shape"] = tuple(feature["shape"])
    stats = aggregate_node_stats([record_to_stats(r.content["stats"]) for r in replies])
    robots = {r.content["info"]["robot"]: r.content["info"]["frames"] for r in replies}
    log.info("global statistics from %d robots (frames: %s)", len(replies), robots)
    return stats, features


def trained_weights(replies: list[Message], arrays) -> list[Message]:
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


@app.main()
def main(grid: Grid, context: Context) -> None:
    # stdout, which Flower streams to `flwr run --stream` / `flwr log`; force: imports may have
    # configured the root logger already. Other libraries' INFO (every HTTP request) stays out.
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stdout, force=True, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("fedbot").setLevel(logging.INFO)
    run = RunConfig.from_run_config(context.run_config)
    directory = RunDirectory.open(run)
    resumed = directory.latest_model()
    if resumed is None:
        stats, features = federated_stats(grid, run, directory)
        torch.manual_seed(run.seed)  # the initial global weights
        loaded = policy_from_stats(get_preset(run.preset), features, stats)
        start_round = 0
    else:
        start_round, path = resumed
        loaded = load_policy(path)
        stats = loaded_stats(loaded)
        log.info("continuing after round %d from %s", start_round, path)
    stats_record = stats_to_record(stats, list(stats))
    arrays = weights_to_record(loaded.policy)  # the float32 global model; sent in run.weights_dtype
    strategy = make_strategy(run)
    evaluated = not features_the_simulator_lacks(loaded)
    if not evaluated:
        log.info("the PushT simulator cannot run %s policies: global models are not evaluated", run.preset)
    if start_round == 0:
        directory.save_model(0, loaded, {})
    else:
        restore_strategy_state(strategy, directory.strategy_state(start_round))
        directory.forget_rounds_after(start_round)

    for server_round in range(start_round + 1, run.num_server_rounds + 1):
        started = time.monotonic()
        first = server_round == start_round + 1
        fit_to_live_nodes(strategy, run, wait_for_nodes(grid, run.min_nodes if first else 1))
        messages = for_transfer(strategy.configure_train(server_round, arrays, ConfigRecord(), grid), run, stats_record)
        sent = sum(m.content["arrays"].count_bytes() for m in messages)
        log.info("round %d: training on %d robots", server_round, len(messages))
        exchange_started = time.monotonic()
        good, failed = exchange(grid, messages, run, f"round {server_round} training", directory)
        exchange_seconds, phases = time.monotonic() - exchange_started, round_phases(good)
        received = sum(r.content["arrays"].count_bytes() for r in good)
        usable = trained_weights(good, arrays)
        good, failed = usable, failed + len(good) - len(usable)
        new_arrays, train_metrics = strategy.aggregate_train(server_round, good)
        if new_arrays is None:
            log.warning("round %d: no usable replies; the global model is unchanged", server_round)
        else:
            arrays = new_arrays
            load_weights(loaded.policy, arrays)
        row = {
            "round": server_round,
            "robots": len(good),
            "failed": failed,
            "train-loss": train_metrics.get("train-loss") if train_metrics else None,
            "bytes-sent": sent,
            "bytes-received": received,
            "train-round-seconds": exchange_seconds,
            **phases,
        }
        if evaluated and (server_round % run.eval_every == 0 or server_round == run.num_server_rounds):
            row.update(evaluate_round(grid, run, strategy, server_round, arrays, stats_record, loaded, directory))
        row["seconds"] = time.monotonic() - started
        if server_round % run.save_every == 0 or server_round == run.num_server_rounds:
            directory.save_model(
                server_round, loaded, {k: v for k, v in row.items() if k != "round"}, strategy_state(strategy)
            )
        directory.append_metrics(row)
        log.info("round %d: %s", server_round, row)

    deploy(grid, run, directory, arrays, stats_record)
    directory.write_state(run, finished=True)
    log.info("run finished: %s", directory.root)


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


def evaluate_round(
    grid, run, strategy, server_round, arrays, stats_record, loaded: LoadedPolicy, directory: RunDirectory
) -> dict:
    """Server-side evaluation in the sim on held-out seeds, then the robots' own evaluation."""
    report = evaluate(
        loaded,
        run.eval_episodes,
        directory.root / "evaluate" / f"round_{server_round}" / "server",
        videos=1,
        policy_name=f"global round {server_round}",
    )
    result = {"server-success-rate": report.success_rate, "server-mean-max-coverage": report.mean_max_coverage}
    fit_to_live_nodes(strategy, run, wait_for_nodes(grid, 1))
    messages = strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid)
    if messages:
        messages = for_transfer(messages, run, stats_record)
        replies, _ = exchange(grid, messages, run, f"round {server_round} evaluation", directory)
        metrics = strategy.aggregate_evaluate(server_round, replies)
        if metrics:
            result["client-success-rate"] = metrics.get("success-rate")
            result["client-mean-max-coverage"] = metrics.get("mean-max-coverage")
    return result


def deploy(grid: Grid, run: RunConfig, directory: RunDirectory, arrays, stats_record) -> None:
    """Send the final global model with its manifest to every robot's model inbox."""
    final_round, path = directory.latest_model()
    manifest = json.loads((path / "manifest.json").read_text())
    content = RecordDict(
        {"arrays": arrays, "stats": stats_record, "manifest": ConfigRecord({"json": json.dumps(manifest)})}
    )
    messages = messages_to(list(grid.get_node_ids()), content, "query.deploy")
    replies, _ = exchange(grid, messages, run, "deploy", directory)
    for reply in replies:
        log.info("deployed round %d to %s", final_round, reply.content["deployed"]["robot"])


def strategy_state(strategy) -> dict:
    """Server-optimizer state that a resumed run needs (FedAdam's moments); empty for FedAvg/FedProx."""
    state = {}
    for name in ("m_t", "v_t"):
        for key, value in (getattr(strategy, name, None) or {}).items():
            state[f"{name}/{key}"] = value
    return state


def restore_strategy_state(strategy, state: dict) -> None:
    for name in ("m_t", "v_t"):
        moments = {key.split("/", 1)[1]: value for key, value in state.items() if key.startswith(f"{name}/")}
        if moments:
            setattr(strategy, name, moments)
            log.info("restored %s of %s (%d arrays)", name, type(strategy).__name__, len(moments))


def loaded_stats(loaded: LoadedPolicy) -> dict:
    """The normalization statistics a saved global model carries in its preprocessor."""
    step = next(s for s in loaded.preprocessor.steps if getattr(s, "stats", None))
    return {
        key: {name: value.cpu().numpy() if hasattr(value, "cpu") else value for name, value in stats.items()}
        for key, stats in step.stats.items()
    }
