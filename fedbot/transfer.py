"""What crosses the network in a federation: model weights and dataset summary statistics.

Weights travel as a Flower `ArrayRecord` of the policy's trainable parameters only, in float32 or
float16 (numpy has no bfloat16; Flower serializes arrays with numpy). Statistics travel as an
`ArrayRecord` of lerobot's per-feature stats (count, mean, std, min, max): summaries, never frames.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from lerobot.datasets.compute_stats import aggregate_stats

WEIGHT_DTYPES = {"float32": np.float32, "float16": np.float16}
# Summary statistics a node shares: enough for lerobot's aggregate_stats and the normalizers.
SHARED_STATS = ("count", "mean", "std", "min", "max")
STATS_SEPARATOR = "::"


def weights_to_record(module: torch.nn.Module, dtype: str = "float32") -> ArrayRecord:
    """The module's trainable parameters as an ArrayRecord in the transfer dtype."""
    try:
        np_dtype = WEIGHT_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"weights dtype {dtype!r} is not one of {sorted(WEIGHT_DTYPES)}") from None
    return ArrayRecord(
        {
            name: Array(param.detach().cpu().float().numpy().astype(np_dtype))
            for name, param in module.named_parameters()
            if param.requires_grad
        }
    )


def load_weights(module: torch.nn.Module, record: ArrayRecord) -> None:
    """Copy an ArrayRecord's arrays into the module's parameters (cast back to their dtype).

    Strict: every trainable parameter must be present with its shape, and nothing else.
    """
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    if set(record) != set(params):
        missing, extra = sorted(set(params) - set(record)), sorted(set(record) - set(params))
        raise ValueError(f"weights do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for name, param in params.items():
            value = torch.from_numpy(np.asarray(record[name].numpy(), dtype=np.float32))
            if value.shape != param.shape:
                raise ValueError(f"{name}: shape {tuple(value.shape)} != model {tuple(param.shape)}")
            param.copy_(value.to(param.dtype))


def stats_to_record(stats: dict[str, dict[str, np.ndarray]], keys: list[str]) -> ArrayRecord:
    """The shared summary statistics of `keys` as an ArrayRecord ("feature::stat" -> array)."""
    return ArrayRecord(
        {
            f"{key}{STATS_SEPARATOR}{name}": Array(np.asarray(stats[key][name], dtype=np.float64))
            for key in keys
            for name in SHARED_STATS
            if name in stats[key]
        }
    )


def record_to_stats(record: ArrayRecord) -> dict[str, dict[str, np.ndarray]]:
    stats: dict[str, dict[str, np.ndarray]] = {}
    for flat, array in record.items():
        key, name = flat.rsplit(STATS_SEPARATOR, 1)
        stats.setdefault(key, {})[name] = array.numpy()
    return stats


def aggregate_node_stats(per_node: list[dict[str, dict[str, np.ndarray]]]) -> dict[str, dict[str, np.ndarray]]:
    """Global statistics from the nodes' summaries, with lerobot's own aggregation."""
    return aggregate_stats(per_node)


def describe_content(content) -> dict:
    """What a message carries, without the values: record kinds, array names/dtypes/shapes, keys.

    The coordinator logs this for every reply, so that a lab can audit what left each robot.
    """
    described = {}
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            arrays = {key: {"dtype": array.dtype, "shape": list(array.shape)} for key, array in record.items()}
            described[name] = {"kind": "arrays", "arrays": arrays, "bytes": record.count_bytes()}
        else:
            values = {key: type(value).__name__ for key, value in record.items()}
            described[name] = {"kind": type(record).__name__, "values": values}
    return described
