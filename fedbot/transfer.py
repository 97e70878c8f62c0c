"""What crosses the network in a federation: model weights and dataset summary statistics.

Weights travel as a Flower `ArrayRecord` holding one flat vector of the policy's trainable
parameters, in float32 or float16 (numpy has no bfloat16; Flower serializes arrays with numpy).
One vector, not an array per parameter: Flower moves every array as objects of its own, and the
SuperLink stores each object in its database in several transactions. With the ~160 parameters of a
DiffusionPolicy that was ~12 s of SuperLink CPU each way per round on 2 cores; one vector is a
handful of 5 MB chunks (bench/bench_round_overhead.py, BENCHMARKS.md). FedAvg, FedProx and FedAdam
work element by element, so they aggregate the vector as they would the arrays. The vector's key
names the parameter layout (names and shapes), so weights never load into a different model.

Statistics travel as an `ArrayRecord` of lerobot's per-feature stats (count, mean, std, min, max):
summaries, never frames.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from lerobot.datasets.compute_stats import aggregate_stats
from torch.nn.utils import parameters_to_vector

WEIGHT_DTYPES = {"float32": np.float32, "float16": np.float16}
# Summary statistics a node shares: enough for lerobot's aggregate_stats and the normalizers.
SHARED_STATS = ("count", "mean", "std", "min", "max")
STATS_SEPARATOR = "::"


def trainable_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, param) for name, param in module.named_parameters() if param.requires_grad]


def weights_key(module: torch.nn.Module) -> str:
    """The record key of the module's weights: "parameters-" and a digest of their names and shapes."""
    layout = [(name, list(param.shape)) for name, param in trainable_parameters(module)]
    return "parameters-" + hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:16]


def weights_to_record(module: torch.nn.Module, dtype: str = "float32") -> ArrayRecord:
    """The module's trainable parameters as one flat vector in the transfer dtype."""
    try:
        np_dtype = WEIGHT_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"weights dtype {dtype!r} is not one of {sorted(WEIGHT_DTYPES)}") from None
    with torch.no_grad():
        flat = parameters_to_vector([param for _, param in trainable_parameters(module)])
    return ArrayRecord({weights_key(module): Array(flat.float().cpu().numpy().astype(np_dtype))})


def load_weights(module: torch.nn.Module, record: ArrayRecord) -> None:
    """Copy a weights record into the module's parameters (cast back to their dtype and device).

    Strict: the record must hold exactly this module's parameter layout, every value of it.
    """
    key, params = weights_key(module), [param for _, param in trainable_parameters(module)]
    if list(record) != [key]:
        raise ValueError(f"weights do not match the model: the record holds {list(record)[:3]}, "
                         f"this model's parameter layout is {key}")
    flat = torch.from_numpy(np.asarray(record[key].numpy(), dtype=np.float32))
    total = sum(param.numel() for param in params)
    if flat.shape != (total,):
        raise ValueError(f"{key}: {tuple(flat.shape)} values, the model has {total} parameters")
    with torch.no_grad():  # copied in, not torch's vector_to_parameters: that makes the record's buffer the weights
        for param, values in zip(params, flat.split([param.numel() for param in params]), strict=True):
            param.copy_(values.view_as(param))


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
