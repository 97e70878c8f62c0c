"""Where a robot's federation work lives: its dataset, model inbox and outputs (Flower node config)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class NodeSettings:
    """Per-robot paths. A real SuperNode gets them with `--node-config "dataset-root='...' ..."`;
    the simulation engine gives virtual nodes only a partition id, so there robot i uses
    `<sim-data-dir>/robot<i>` and folders beside it."""

    name: str
    dataset_root: Path
    model_inbox: Path
    output_dir: Path

    @classmethod
    def from_configs(cls, node_config: dict, sim_data_dir: str) -> NodeSettings:
        if "dataset-root" in node_config:
            root = Path(str(node_config["dataset-root"]))
        elif "partition-id" in node_config:
            root = Path(sim_data_dir) / f"robot{node_config['partition-id']}"
        else:
            raise ValueError(
                "node config has no 'dataset-root' (flower-supernode --node-config \"dataset-root='DIR'\")"
            )
        name = str(node_config.get("robot-id", root.name))
        return cls(
            name=name,
            dataset_root=root,
            model_inbox=Path(str(node_config.get("model-inbox", root.parent / f"{root.name}-inbox"))),
            output_dir=Path(str(node_config.get("output-dir", root.parent / f"{root.name}-outputs"))),
        )
