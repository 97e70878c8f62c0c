"""The robot's Flower ClientApp: dataset statistics, local training, sim evaluation, model deploy.

Every message is answered from the robot's own dataset (`NodeSettings`); replies carry a weight
update (trained minus received weights, fedbot/transfer.py), summary statistics and metrics, never
observations or actions. In deployment each message runs in a fresh process, so what must outlive
a round (the optimizer, the step counter) is kept on the robot's disk, under its output dir, for
the current run. Not in Flower's `context.state`: that lives in the SuperNode's memory (lost when
the agent restarts the SuperNode after a recording), and the Adam moments (twice the size of the
weights) went through the SuperNode's runtime API twice a round.
"""

from __future__ import annotations

import io
import json
import time
import zlib
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata
from lerobot.utils.constants import ACTION

from agent.inbox import write_to_inbox
from agent.model_store import versions_held
from agent.supernode import NodeSettings
from fedbot.atomic_files import write_bytes_atomic
from fedbot.dataset_usage import note_use
from fedbot.evaluation import evaluate
from fedbot.policy_io import LoadedPolicy
from fedbot.presets import get_preset
from fedbot.run_config import RunConfig
from fedbot.training import (
    InMemoryFrames,
    TrainState,
    open_dataset,
    open_metadata,
    policy_from_stats,
    training_episodes,
)
from fedbot.transfer import (
    load_weights,
    record_to_files,
    record_to_stats,
    stats_to_record,
    update_to_record,
    weights_vector,
)

app = ClientApp()
OPTIMIZER_DIR = "optimizer"  # under the robot's output dir: run-<run id>.pt


def _settings(context: Context) -> tuple[RunConfig, NodeSettings]:
    run = RunConfig.from_run_config(context.run_config)
    return run, NodeSettings.from_configs(context.node_config, run.sim_data_dir)


def _metadata(node: NodeSettings) -> tuple[LeRobotDatasetMetadata, list[int]]:
    """The robot's dataset metadata as training sees it, and the episodes training uses (not those dropped)."""
    if not (node.dataset_root / "meta" / "info.json").is_file():
        raise FileNotFoundError(f"robot {node.name}: no recorded dataset at {node.dataset_root}")
    return open_metadata(node.dataset_root)


def global_policy(content: RecordDict, run: RunConfig, features: dict) -> LoadedPolicy:
    """The global model of a message: its weights with processors on the global statistics."""
    loaded = policy_from_stats(get_preset(run.preset), features, record_to_stats(content["stats"]))
    load_weights(loaded.policy, content["arrays"])
    return loaded


@app.query("stats")
def dataset_stats(msg: Message, context: Context) -> Message:
    """Summary statistics and feature shapes of the policy's inputs and actions in the episodes this
    robot trains on, their count, and the global model versions it holds (newest, live)."""
    run, node = _settings(context)
    meta, kept = _metadata(node)
    lengths = list(meta.episodes["length"])
    keys = [*get_preset(run.preset).inputs(meta.features), ACTION]
    features = {key: meta.features[key] for key in keys}
    info = ConfigRecord(
        {
            "features": json.dumps(features),
            "frames": sum(lengths[index] for index in kept),
            "episodes": len(kept),
            "robot": node.name,
            "models": json.dumps(versions_held(node.model_inbox)),
        }
    )
    return Message(RecordDict({"stats": stats_to_record(meta.stats, keys), "info": info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    entered = time.time()
    run, node = _settings(context)
    config = msg.content["config"]
    dataset = open_dataset(node.dataset_root)
    loaded = global_policy(msg.content, run, dataset.meta.features)
    received = weights_vector(loaded.policy)
    server_round = int(config.get("server-round", 1))
    state = TrainState.create(loaded, run.total_steps, lr=run.lr or None)
    _restore_optimizer(state, _optimizer_file(node, context))
    state.seek(run.first_step(server_round))  # the run's schedule at this round, even after missed rounds
    frames = InMemoryFrames(dataset, loaded.policy.config)
    penalty = _proximal_term(loaded.policy, float(config.get("proximal-mu", 0.0)))
    seed = zlib.crc32(f"{run.seed}/{node.name}/{server_round}".encode())
    torch.manual_seed(seed)  # the diffusion noise; the generator below draws the batches
    started = time.time()
    loss = state.train_steps(
        frames,
        run.local_steps,
        run.batch_size or get_preset(run.preset).batch_size,
        torch.Generator().manual_seed(seed),
        penalty=penalty,
    )
    trained = time.time()
    _save_optimizer(state, _optimizer_file(node, context))
    # Differential privacy (run-config dp-noise-multiplier): the coordinator's strategy names the norm
    # every update is clipped to before it leaves the robot; the coordinator adds the noise.
    clipping_norm = float(config[KEY_CLIPPING_NORM]) if KEY_CLIPPING_NORM in config else None
    arrays = update_to_record(loaded.policy, received, run.weights_dtype, clipping_norm)
    note_use(node.dataset_root, f"flower run {context.run_id}", training_episodes(dataset), round=server_round)
    node.note_round(
        {
            "run": context.run_id,
            "round": server_round,
            "episodes": dataset.meta.total_episodes,
            "time": time.time(),
        },
    )
    # Where the round's time goes (bench/bench_round_overhead.py): the message's way here (created_at
    # is the coordinator's clock), setting up, training, and packing the reply.
    metrics = MetricRecord(
        {
            "num-examples": frames.num_frames,
            "train-loss": loss,
            "local-step": state.step,
            "inbound-seconds": entered - msg.metadata.created_at,
            "setup-seconds": started - entered,
            "train-seconds": trained - started,
            "pack-seconds": time.time() - trained,
        }
    )
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def _proximal_term(policy: torch.nn.Module, mu: float):
    """FedProx: mu/2 * ||w - w_global||^2 against the weights received this round."""
    if mu <= 0.0:
        return None
    anchors = [p.detach().clone() for p in policy.parameters()]

    def penalty() -> torch.Tensor:
        return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(policy.parameters(), anchors, strict=True))

    return penalty


def _optimizer_file(node: NodeSettings, context: Context) -> Path:
    return node.output_dir / OPTIMIZER_DIR / f"run-{context.run_id}.pt"


def _save_optimizer(state: TrainState, path: Path) -> None:
    """Keep the optimizer state (Adam's moments) of this run on the robot's disk; earlier runs' go."""
    buffer = io.BytesIO()
    torch.save({"optimizer": state.optimizer.state_dict()}, buffer)
    write_bytes_atomic(path, buffer.getvalue())
    for old in path.parent.glob("run-*.pt"):
        if old != path:
            old.unlink()


def _restore_optimizer(state: TrainState, path: Path) -> None:
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        state.optimizer.load_state_dict(saved["optimizer"])


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Success of the global model in the sim on held-out seeds; the first rollout as mp4."""
    run, node = _settings(context)
    loaded = global_policy(msg.content, run, _metadata(node)[0].features)
    server_round = msg.content["config"].get("server-round", 0)
    out = node.output_dir / "evaluate" / f"round_{server_round}"
    report = evaluate(loaded, run.eval_episodes, out, videos=1, policy_name=f"global round {server_round}")
    metrics = MetricRecord(
        {
            "num-examples": run.eval_episodes,
            "success-rate": report.success_rate,
            "mean-max-coverage": report.mean_max_coverage,
        }
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@app.query("deploy")
def deploy(msg: Message, context: Context) -> Message:
    """Write the published model's files (signed by the coordinator) into this robot's model inbox,
    as they are; the agent verifies them before anything goes live."""
    run, node = _settings(context)
    files = record_to_files(msg.content["files"])
    path = write_to_inbox(node.model_inbox, int(msg.content["config"]["round"]), files)
    return Message(RecordDict({"deployed": ConfigRecord({"path": str(path), "robot": node.name})}), reply_to=msg)
