"""What crosses the network in a federation: model weights, robots' updates, summary statistics.

Weights travel as a Flower `ArrayRecord` holding one flat vector of the policy's trainable
parameters, in float32 or float16 (numpy has no bfloat16; Flower serializes arrays with numpy).
One vector, not an array per parameter: Flower moves every array as objects of its own, and the
SuperLink stores each object in its database in several transactions. With the ~160 parameters of a
DiffusionPolicy that was ~12 s of SuperLink CPU each way per round on 2 cores; one vector is a
handful of 5 MB chunks (bench/bench_round_overhead.py, BENCHMARKS.md). The vector's key names the
parameter layout (names and shapes), so weights never load into a different model.

A robot answers a training round with its update (its weights after training minus the weights it
received), in the same dtype, and the coordinator adds it to its float32 global model before the
strategy aggregates (`apply_update`). The global model therefore stays float32 however the weights
travel: in float16 only the update is rounded, relative to its own size, instead of the whole model
being rounded to float16 every round, which drops any change smaller than half a float16 step of a
weight (mixed-precision training keeps float32 master weights for the same reason). FedAvg, FedProx
and FedAdam see full float32 weights and work element by element, as they would on the arrays.

Statistics travel as an `ArrayRecord` of lerobot's per-feature stats (count, mean, std, min, max):
summaries, never frames.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.supercore.differential_privacy import clip_inputs_inplace
from lerobot.datasets.compute_stats import aggregate_stats
from torch.nn.utils import parameters_to_vector

WEIGHT_DTYPES = {"float32": np.float32, "float16": np.float16}
# Summary statistics a node shares: enough for lerobot's aggregate_stats and the normalizers.
SHARED_STATS = ("count", "mean", "std", "min", "max")
STATS_SEPARATOR = "::"
WEIGHTS_PREFIX, UPDATE_PREFIX = "parameters-", "update-"


def trainable_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, param) for name, param in module.named_parameters() if param.requires_grad]


def _layout_digest(module: torch.nn.Module) -> str:
    layout = [(name, list(param.shape)) for name, param in trainable_parameters(module)]
    return hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:16]


def weights_key(module: torch.nn.Module) -> str:
    """The record key of the module's weights: "parameters-" and a digest of their names and shapes."""
    return WEIGHTS_PREFIX + _layout_digest(module)


def update_key(module: torch.nn.Module) -> str:
    """The record key of an update to the module's weights: "update-" and the same digest."""
    return UPDATE_PREFIX + _layout_digest(module)


def _numpy_dtype(dtype: str):
    try:
        return WEIGHT_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"weights dtype {dtype!r} is not one of {sorted(WEIGHT_DTYPES)}") from None


def weights_vector(module: torch.nn.Module) -> torch.Tensor:
    """A float32 copy of the module's trainable parameters as one flat vector on the CPU."""
    with torch.no_grad():
        return parameters_to_vector([param for _, param in trainable_parameters(module)]).float().cpu().clone()


def weights_to_record(module: torch.nn.Module, dtype: str = "float32") -> ArrayRecord:
    """The module's trainable parameters as one flat vector in the transfer dtype."""
    np_dtype = _numpy_dtype(dtype)
    return ArrayRecord({weights_key(module): Array(weights_vector(module).numpy().astype(np_dtype))})


def update_to_record(
    module: torch.nn.Module, received: torch.Tensor, dtype: str = "float32", clipping_norm: float | None = None
) -> ArrayRecord:
    """The module's change since it held the flat weights `received`, in the transfer dtype; with
    `clipping_norm`, first scaled to at most that L2 norm, in float32 (Flower's own flat clipping,
    as its DP mods apply it; the mods themselves expect full weights, not an update)."""
    update = (weights_vector(module) - received).numpy()
    if clipping_norm is not None:
        clip_inputs_inplace([update], clipping_norm)
    return ArrayRecord({update_key(module): Array(update.astype(_numpy_dtype(dtype)))})


def cast_record(record: ArrayRecord, dtype: str) -> ArrayRecord:
    """The same arrays in the transfer dtype."""
    np_dtype = _numpy_dtype(dtype)
    return ArrayRecord({key: Array(array.numpy().astype(np_dtype)) for key, array in record.items()})


def apply_update(weights: ArrayRecord, update: ArrayRecord) -> ArrayRecord:
    """float32 weights plus a robot's update to them: the robot's trained weights, as float32."""
    if len(weights) != 1 or len(update) != 1:
        raise ValueError(f"expected one weights vector and one update, got {list(weights)} and {list(update)}")
    (weights_name, base), (update_name, change) = *weights.items(), *update.items()
    if update_name != UPDATE_PREFIX + weights_name.removeprefix(WEIGHTS_PREFIX):
        raise ValueError(f"the update {update_name!r} is not for the weights {weights_name!r}")
    base, change = base.numpy(), change.numpy()
    if change.shape != base.shape:
        raise ValueError(f"{update_name}: {change.shape} values, the weights have {base.shape}")
    return ArrayRecord({weights_name: Array(np.add(base, change, dtype=np.float32))})


def load_weights(module: torch.nn.Module, record: ArrayRecord) -> None:
    """Copy a weights record into the module's parameters (cast back to their dtype and device).

    Strict: the record must hold exactly this module's parameter layout, every value of it.
    """
    key, params = weights_key(module), [param for _, param in trainable_parameters(module)]
    if list(record) != [key]:
        raise ValueError(
            f"weights do not match the model: the record holds {list(record)[:3]}, "
            f"this model's parameter layout is {key}"
        )
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


def files_to_record(directory: Path) -> ArrayRecord:
    """A published model directory's files, byte for byte, as arrays of uint8 (the signed manifest
    covers exactly these bytes, so nothing is re-serialized on the way)."""
    return ArrayRecord(
        {
            path.name: Array(np.frombuffer(path.read_bytes(), dtype=np.uint8))
            for path in sorted(Path(directory).iterdir())
            if path.is_file()
        }
    )


def record_to_files(record: ArrayRecord) -> dict[str, bytes]:
    return {name: array.numpy().astype(np.uint8, copy=False).tobytes() for name, array in record.items()}


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
