"""The coordinator's run directory: versioned global models with manifests, metrics, resume state.

    <output-dir>/<date_time>/
        global_model/round_N/       a saved policy + manifest.json (every file's sha256, round, metrics,
                                    parent, time) + manifest.sig (the coordinator's Ed25519 signature)
        server_state/round_N.safetensors
                                    what a resumed run needs besides the model (FedAdam's moments; the
                                    aggregate robots train from, with an EMA); never leaves the server
        evaluate/round_N/server/    rollouts of the server-side evaluation
        registry.json               every saved model; which is the best and which the latest; the
                                    run's lineage (the model it started from, each robot's data)
        metrics.jsonl, metrics.png  one line per round; curves refreshed each round
        replies.jsonl               what every robot sent back: record kinds, array names/shapes, keys
        state.json                  the run config, whether the run finished (for resume) and whether
                                    it was skipped (too little new data)

Every JSON file is written atomically; a model directory appears complete or not at all. The
service keeps the newest runs and the ones it still needs (`prune_runs`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.numpy import load_file, save_file

from fedbot.atomic_files import fsync_dir, publish_dir, write_bytes_atomic, write_json_atomic
from fedbot.model_manifest import MANIFEST, generate_key, load_private_key, sign_model_dir
from fedbot.policy_io import LoadedPolicy, save_policy
from fedbot.run_config import RunConfig

log = logging.getLogger("fedbot.coordinator.registry")

PRUNED_DIR = ".pruned"  # in the output dir: runs being deleted

# Settings that must be equal for a restarted coordinator to continue a run rather than start anew.
RESUME_KEYS = ("preset", "strategy", "weights_dtype")


@dataclass(frozen=True)
class Published:
    """A global model a finished run published: its directory, signed manifest, and run's lineage."""

    path: Path
    manifest: dict
    lineage: dict


class RunDirectory:
    def __init__(self, root: Path, signing_key: Ed25519PrivateKey):
        self.root = root
        self.signing_key = signing_key
        self.models = root / "global_model"
        self.server_state = root / "server_state"
        self.models.mkdir(parents=True, exist_ok=True)
        self.server_state.mkdir(exist_ok=True)

    # -- resume -----------------------------------------------------------------------------
    @classmethod
    def open(cls, run: RunConfig) -> RunDirectory:
        """The latest unfinished run in the output dir with the same settings, or a new run."""
        output = Path(run.output_dir)
        key = signing_key(run)
        for candidate in sorted(output.glob("*/state.json"), reverse=True):
            state = json.loads(candidate.read_text())
            same = all(state["config"].get(k) == getattr(run, k) for k in RESUME_KEYS)
            if not state["finished"] and same:
                log.info("resuming the unfinished run in %s", candidate.parent)
                return cls(candidate.parent, key)
        name = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")  # names sort by time: a model's version
        while (output / name).exists():  # two runs in one second (a skipped one and the next)
            name += "+"
        directory = cls(output / name, key)
        directory.write_state(run, finished=False)
        return directory

    def write_state(self, run: RunConfig, finished: bool, skipped: bool = False) -> None:
        state = {"config": asdict(run), "finished": finished, "skipped": skipped}
        write_json_atomic(self.root / "state.json", state)

    def latest_published(self, preset: str) -> Published | None:
        """The model the fleet runs now: the last model of the newest other finished run of `preset`
        that published one (robots got it at that run's end)."""
        for candidate in sorted(self.root.parent.glob("*/state.json"), reverse=True):
            run_dir = candidate.parent
            if run_dir == self.root:
                continue
            state = json.loads(candidate.read_text())
            if not state["finished"] or state["config"].get("preset") != preset:
                continue
            registry = RunDirectory.read_registry(run_dir)
            if registry["latest"] is not None:
                path = run_dir / "global_model" / f"round_{registry['latest']}"
                return Published(path, json.loads((path / MANIFEST).read_text()), registry.get("lineage") or {})
        return None

    # -- models -----------------------------------------------------------------------------
    @property
    def registry(self) -> dict:
        return self.read_registry(self.root)

    @staticmethod
    def read_registry(root: Path) -> dict:
        path = root / "registry.json"
        empty = {"models": [], "best": None, "latest": None, "lineage": None}
        return json.loads(path.read_text()) if path.exists() else empty

    def write_lineage(self, lineage: dict) -> None:
        """Where the run comes from: the published model it started from (None: fresh weights), the
        robots of its first round with their data (name -> node, episodes, frames), its features."""
        registry = self.registry
        registry["lineage"] = lineage
        write_json_atomic(self.root / "registry.json", registry)

    def latest_model(self) -> tuple[int, Path] | None:
        latest = self.registry["latest"]
        return (latest, self.models / f"round_{latest}") if latest is not None else None

    def save_model(
        self,
        server_round: int,
        loaded: LoadedPolicy,
        metrics: dict,
        strategy_state: dict[str, np.ndarray] | None = None,
    ) -> dict:
        """Save the global model of a round, signed, with the server's state beside it, and update the
        registry. A model directory already there (saved just before a crash) is kept as it is."""
        registry = self.registry
        directory = self.models / f"round_{server_round}"
        if strategy_state:
            tmp = self.server_state / f".round_{server_round}.tmp-{os.getpid()}"
            save_file(strategy_state, str(tmp))
            os.replace(tmp, self.server_state / f"round_{server_round}.safetensors")
        fields = {
            "run": self.root.name,  # with the round, the model's version (fedbot.model_manifest.model_version)
            "round": server_round,
            "metrics": metrics,
            "parent": registry["latest"],
            "created": datetime.now().isoformat(timespec="seconds"),
        }
        if directory.exists():
            manifest = json.loads((directory / MANIFEST).read_text())
        else:
            staging = self.models / f".round_{server_round}.tmp-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            save_policy(staging, loaded)
            manifest = sign_model_dir(staging, self.signing_key, fields)
            publish_dir(staging, directory)
        registry["models"] = [m for m in registry["models"] if m["round"] != server_round] + [manifest]
        registry["latest"] = server_round
        registry["best"] = max(registry["models"], key=_score)["round"]
        write_json_atomic(self.root / "registry.json", registry)
        return manifest

    def strategy_state(self, server_round: int) -> dict[str, np.ndarray]:
        path = self.server_state / f"round_{server_round}.safetensors"
        return load_file(str(path)) if path.exists() else {}

    # -- metrics ----------------------------------------------------------------------------
    def append_metrics(self, row: dict) -> None:
        with open(self.root / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        self.plot()

    def forget_rounds_after(self, server_round: int) -> None:
        """Rewrite metrics.jsonl with the rows up to the model a resumed run continues from (later
        rounds are redone) and without a line a crash cut short, which the next row would extend."""
        rows = [row for row in self.metrics() if row["round"] <= server_round]
        write_bytes_atomic(self.root / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in rows).encode())

    def audit(self, what: str, node_id: int, content: dict) -> None:
        """Record what one robot's reply carried (see fedbot.transfer.describe_content)."""
        with open(self.root / "replies.jsonl", "a") as f:
            f.write(json.dumps({"what": what, "node": node_id, "content": content}) + "\n")

    def metrics(self) -> list[dict]:
        return self.read_metrics(self.root)

    @staticmethod
    def read_metrics(root: Path) -> list[dict]:
        """A run's rows, one per round; a line a crash cut short (the last one) is left out."""
        path = root / "metrics.jsonl"
        rows = []
        for number, line in enumerate(path.read_text().splitlines() if path.exists() else [], 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s line %d is not a whole row (cut short by a crash?); left out", path, number)
        return rows

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.metrics()
        fig, (loss_ax, success_ax) = plt.subplots(1, 2, figsize=(10, 4))
        loss_rows = [r for r in rows if r.get("train-loss") is not None]
        loss_ax.plot([r["round"] for r in loss_rows], [r["train-loss"] for r in loss_rows], marker="o", label="all")
        robots = sorted({robot["node"] for r in rows for robot in r.get("per-robot", [])})
        for node in robots:  # each robot's own loss: whose data the model fits, and whose not
            points = [
                (r["round"], robot["train-loss"])
                for r in rows
                for robot in r.get("per-robot", [])
                if robot["node"] == node and "train-loss" in robot
            ]
            loss_ax.plot(*zip(*points, strict=True), linestyle="--", linewidth=0.8, label=f"node {node}")
        loss_ax.set(xlabel="round", ylabel="train loss", title="training")
        loss_ax.legend(fontsize=7)
        for key, label in (("server-success-rate", "server (sim)"), ("client-success-rate", "robots")):
            points = [r for r in rows if r.get(key) is not None]
            success_ax.plot([r["round"] for r in points], [r[key] for r in points], marker="o", label=label)
        success_ax.set(xlabel="round", ylabel="success rate", ylim=(-0.05, 1.05), title="evaluation")
        success_ax.legend()
        fig.tight_layout()
        tmp = self.root / ".metrics.png.tmp"
        fig.savefig(tmp, format="png")
        plt.close(fig)
        tmp.replace(self.root / "metrics.png")


def _score(manifest: dict) -> tuple:
    metrics = manifest["metrics"]
    return (
        metrics.get("server-success-rate") or 0.0,
        metrics.get("server-mean-max-coverage") or 0.0,
        manifest["round"],
    )


def signing_key(run: RunConfig) -> Ed25519PrivateKey:
    """The coordinator's key that signs every published model: run-config signing-key, or one kept
    in the output dir (created on first use). Robots trust its public half (`<key>.pub`)."""
    path = Path(run.signing_key) if run.signing_key else Path(run.output_dir) / "signing.key"
    public = generate_key(path, "fedbot-coordinator")
    log.info("models are signed with %s (robots trust: %s)", path, public)
    return load_private_key(path)


def prune_runs(output_dir: Path, keep: int) -> list[str]:
    """Delete the run directories older than the newest `keep`, except those still needed: unfinished
    runs (a restarted coordinator resumes them) and, per preset, the newest finished run that published
    a model (the fleet's model, which warm starts and catch-ups read). A run is renamed out of the
    output dir before it is deleted, so a crash leaves no half-deleted run beside the others.
    Returns the names of the runs deleted."""
    output_dir = Path(output_dir)
    trash = output_dir / PRUNED_DIR
    shutil.rmtree(trash, ignore_errors=True)  # what a crash in the last pruning left
    runs = sorted(path.parent for path in output_dir.glob("*/state.json"))
    needed, published = set(), set()
    for run in reversed(runs):
        state = json.loads((run / "state.json").read_text())
        preset = state["config"].get("preset")
        if not state["finished"]:
            needed.add(run)
        elif preset not in published and RunDirectory.read_registry(run)["latest"] is not None:
            needed.add(run)
            published.add(preset)
    deleted = [run for run in runs[: max(len(runs) - keep, 0)] if run not in needed]
    if deleted:
        trash.mkdir(exist_ok=True)
        for run in deleted:
            os.replace(run, trash / run.name)
        fsync_dir(output_dir)
        shutil.rmtree(trash)
    return [run.name for run in deleted]
