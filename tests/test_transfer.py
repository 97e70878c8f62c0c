"""Weights and statistics as Flower records: precision, strictness, lerobot's stats aggregation."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedbot.transfer import (
    aggregate_node_stats, load_weights, record_to_stats, stats_to_record, weights_to_record,
)


def make_module() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GroupNorm(4, 16), torch.nn.Linear(16, 2))


@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 0.0), ("float16", 1e-3)])
def test_weights_round_trip(dtype, tolerance):
    source, target = make_module(), torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.GroupNorm(4, 16), torch.nn.Linear(16, 2)
    )
    record = weights_to_record(source, dtype)
    assert {a.dtype for a in record.values()} == {np.dtype(dtype).name}
    load_weights(target, record)
    for (name, a), (_, b) in zip(source.named_parameters(), target.named_parameters()):
        assert b.dtype == torch.float32
        assert torch.allclose(a, b, atol=tolerance, rtol=tolerance), name


def test_half_precision_halves_the_bytes():
    module = torch.nn.Linear(256, 256)  # large enough that the arrays' headers do not matter
    full, half = weights_to_record(module, "float32").count_bytes(), weights_to_record(module, "float16").count_bytes()
    params = sum(p.numel() for p in module.parameters())
    assert full > 4 * params and half < 0.6 * full


def test_weights_travel_as_one_vector():
    module = make_module()
    record = weights_to_record(module, "float16")
    (array,) = record.values()
    assert array.shape == (sum(p.numel() for p in module.parameters()),)


def test_loading_is_strict():
    record = weights_to_record(make_module())
    other = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GroupNorm(4, 16), torch.nn.Linear(16, 3))
    with pytest.raises(ValueError, match="do not match the model"):
        load_weights(other, record)
    (key,) = record
    truncated = ArrayRecord({key: Array(record[key].numpy()[:-1])})
    with pytest.raises(ValueError, match="the model has"):
        load_weights(make_module(), truncated)
    with pytest.raises(ValueError, match="not one of"):
        weights_to_record(make_module(), "bfloat16")


def test_stats_round_trip_and_aggregate_like_pooled_data():
    rng = np.random.default_rng(0)
    parts = [rng.normal(i, 1 + i, size=(50 * (i + 1), 2)) for i in range(3)]

    def summary(x):
        return {"state": {"count": np.array([len(x)]), "mean": x.mean(0), "std": x.std(0),
                          "min": x.min(0), "max": x.max(0), "q50": np.median(x, 0)}}

    shared = [record_to_stats(stats_to_record(summary(p), ["state"])) for p in parts]
    assert set(shared[0]["state"]) == {"count", "mean", "std", "min", "max"}  # no quantiles, no frames
    pooled, merged = np.concatenate(parts), aggregate_node_stats(shared)["state"]
    np.testing.assert_allclose(merged["mean"], pooled.mean(0))
    np.testing.assert_allclose(merged["std"], pooled.std(0))
    np.testing.assert_allclose(merged["min"], pooled.min(0))
    assert merged["count"].item() == len(pooled)
