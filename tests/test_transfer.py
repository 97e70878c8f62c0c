"""Weights and statistics as Flower records: precision, strictness, lerobot's stats aggregation."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedbot.transfer import (
    aggregate_node_stats,
    apply_update,
    cast_record,
    load_weights,
    record_to_stats,
    stats_to_record,
    update_to_record,
    weights_to_record,
    weights_vector,
)


def make_module() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GroupNorm(4, 16), torch.nn.Linear(16, 2))


@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 0.0), ("float16", 1e-3)])
def test_weights_round_trip(dtype, tolerance):
    source, target = (
        make_module(),
        torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GroupNorm(4, 16), torch.nn.Linear(16, 2)),
    )
    record = weights_to_record(source, dtype)
    assert {a.dtype for a in record.values()} == {np.dtype(dtype).name}
    load_weights(target, record)
    for (name, a), (_, b) in zip(source.named_parameters(), target.named_parameters(), strict=True):
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


def train_a_little(module: torch.nn.Module, change: float) -> None:
    with torch.no_grad():
        for param in module.parameters():
            param.add_(change * torch.sign(torch.randn_like(param)))


def test_a_float16_update_keeps_changes_that_float16_weights_lose():
    module = make_module()
    global_fp32 = weights_to_record(module)
    load_weights(module, cast_record(global_fp32, "float16"))  # what a robot receives in float16
    received = weights_vector(module)
    train_a_little(module, 1e-5)  # smaller than half a float16 step of most weights
    trained = weights_vector(module)
    change = trained - received
    reconstructed = torch.from_numpy(
        apply_update(global_fp32, update_to_record(module, received, "float16")).popitem()[1].numpy()
    )
    # the coordinator's float32 weights move by the robot's change, rounded relative to the change itself
    # (float16 keeps 11 bits; below 2**-14 its steps are 2**-24, hence the absolute 2**-25)
    moved = reconstructed - torch.from_numpy(global_fp32.popitem()[1].numpy())
    assert torch.allclose(moved, change, rtol=2**-11, atol=2**-25)
    # sending the trained weights themselves in float16 loses the change almost everywhere
    sent_back = torch.from_numpy(weights_to_record(module, "float16").popitem()[1].numpy().astype(np.float32))
    assert (sent_back == received).float().mean() > 0.75  # all but the smallest weights


def test_float32_updates_give_back_the_trained_weights():
    module = make_module()
    global_fp32 = weights_to_record(module)
    received = weights_vector(module)
    train_a_little(module, 1e-2)
    weights = apply_update(global_fp32, update_to_record(module, received))
    target = make_module()
    load_weights(target, weights)
    for a, b in zip(module.parameters(), target.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_an_update_for_another_model_is_refused():
    update = update_to_record(torch.nn.Linear(3, 3), weights_vector(torch.nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="is not for the weights"):
        apply_update(weights_to_record(make_module()), update)
    module = make_module()
    short = update_to_record(module, weights_vector(module))
    (key,) = short
    short = ArrayRecord({key: Array(short[key].numpy()[:-1])})
    with pytest.raises(ValueError, match="the weights have"):
        apply_update(weights_to_record(module), short)


def test_stats_round_trip_and_aggregate_like_pooled_data():
    rng = np.random.default_rng(0)
    parts = [rng.normal(i, 1 + i, size=(50 * (i + 1), 2)) for i in range(3)]

    def summary(x):
        return {
            "state": {
                "count": np.array([len(x)]),
                "mean": x.mean(0),
                "std": x.std(0),
                "min": x.min(0),
                "max": x.max(0),
                "q50": np.median(x, 0),
            }
        }

    shared = [record_to_stats(stats_to_record(summary(p), ["state"])) for p in parts]
    assert set(shared[0]["state"]) == {"count", "mean", "std", "min", "max"}  # no quantiles, no frames
    pooled, merged = np.concatenate(parts), aggregate_node_stats(shared)["state"]
    np.testing.assert_allclose(merged["mean"], pooled.mean(0))
    np.testing.assert_allclose(merged["std"], pooled.std(0))
    np.testing.assert_allclose(merged["min"], pooled.min(0))
    assert merged["count"].item() == len(pooled)
