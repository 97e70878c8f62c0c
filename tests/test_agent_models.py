"""The checks a model must pass before it can go live, the store's history and rollback, and the ledger of
models that failed at run time."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from agent.model_store import CheckRules, ModelRejected, ModelStore, check_model
from fedbot.model_manifest import SIGNATURE, WEIGHTS, generate_key, parse_public_key
from hardware.pusht_sim import PushTSim, PushTSimConfig

from helpers import deliver_model, public_key_line

ROBOT = PushTSim(PushTSimConfig(id="check"))
FEATURES = {**ROBOT.observation_features, **ROBOT.action_features}


def rules(key) -> CheckRules:
    return CheckRules(trusted_keys=(parse_public_key(public_key_line(key)),), device="cpu")


def _flip_bytes(directory):
    data = bytearray((directory / WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (directory / WEIGHTS).write_bytes(bytes(data))


def _truncate(directory):
    data = (directory / WEIGHTS).read_bytes()
    (directory / WEIGHTS).write_bytes(data[: len(data) // 3])


def _nan(directory):
    weights = load_file(directory / WEIGHTS)
    name = sorted(weights)[0]
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, directory / WEIGHTS)


def _wrong_shape(directory):
    weights = load_file(directory / WEIGHTS)
    name = next(n for n, t in weights.items() if t.ndim == 2)
    weights[name] = torch.zeros(weights[name].shape[0] + 1, weights[name].shape[1])
    save_file(weights, directory / WEIGHTS)


def _unsign(directory):
    (directory / SIGNATURE).unlink()


def _code_in_processor(marker):
    def plant(directory):
        pipeline = json.loads((directory / "policy_preprocessor.json").read_text())
        pipeline["steps"].insert(0, {"class": "subprocess.Popen", "config": {"args": ["touch", str(marker)]}})
        (directory / "policy_preprocessor.json").write_text(json.dumps(pipeline))

    return plant


@pytest.mark.parametrize(
    "edit, tamper, reason",
    [
        (None, _flip_bytes, "not trusted: model.safetensors does not match its signed sha256"),
        (None, _unsign, "not trusted: no manifest.sig: the model is not signed"),
        (_truncate, None, "does not load"),  # a broken model its signer vouches for
        (_nan, None, "NaN or inf"),
        (_wrong_shape, None, "does not load"),
    ],
)
def test_damaged_models_are_rejected_with_the_reason(untrained_policy, tmp_path, lab_key, edit, tamper, reason):
    model = deliver_model(untrained_policy, tmp_path / "inbox", "bad", lab_key, edit=edit, tamper=tamper)
    with pytest.raises(ModelRejected, match=reason):
        check_model(model, FEATURES, rules(lab_key))


def test_a_model_naming_code_to_run_is_rejected_and_the_code_never_runs(untrained_policy, tmp_path, lab_key):
    """Signed by a trusted key or not, a processor step that names a callable is refused unrun."""
    marker = tmp_path / "marker"
    signed = deliver_model(untrained_policy, tmp_path / "inbox", "signed", lab_key, edit=_code_in_processor(marker))
    with pytest.raises(ModelRejected, match="does not load: PolicyFormatError: policy_preprocessor.json"):
        check_model(signed, FEATURES, rules(lab_key))
    unsigned = deliver_model(
        untrained_policy, tmp_path / "inbox", "unsigned", lab_key, tamper=_code_in_processor(marker)
    )
    with pytest.raises(ModelRejected, match="not trusted: policy_preprocessor.json does not match"):
        check_model(unsigned, FEATURES, rules(lab_key))
    assert not marker.exists()


def test_a_model_signed_by_a_key_the_robot_does_not_trust_is_rejected(untrained_policy, tmp_path, lab_key):
    stranger = tmp_path / "stranger.key"
    generate_key(stranger, "stranger")
    model = deliver_model(untrained_policy, tmp_path / "inbox", "strange", stranger)
    with pytest.raises(ModelRejected, match="not trusted: signed by key .* which this robot does not trust"):
        check_model(model, FEATURES, rules(lab_key))
    with pytest.raises(ModelRejected, match="trusts no signing key"):
        check_model(model, FEATURES, CheckRules(device="cpu"))


def test_a_sound_model_passes_and_loads(untrained_policy, tmp_path, lab_key):
    model = deliver_model(untrained_policy, tmp_path / "inbox", "good", lab_key)
    loaded = check_model(model, FEATURES, rules(lab_key))
    assert loaded.policy.config.input_features.keys() == {"observation.state", "observation.environment_state"}


def test_a_model_for_another_robot_is_rejected(untrained_policy, tmp_path, lab_key):
    model = deliver_model(untrained_policy, tmp_path / "inbox", "pusht", lab_key)
    arm = {**FEATURES, "observation.state": (6,)}  # six joints, not PushT's x, y
    with pytest.raises(ModelRejected, match="does not fit this robot: 'observation.state' has shape"):
        check_model(model, arm, rules(lab_key))
    no_keypoints = {k: v for k, v in FEATURES.items() if k != "observation.environment_state"}
    with pytest.raises(ModelRejected, match="needs 'observation.environment_state'"):
        check_model(model, no_keypoints, rules(lab_key))


def test_a_model_not_newer_than_the_live_one_is_rejected(untrained_policy, tmp_path, lab_key):
    """A robot never goes back to an older global model by a delivery (a late or replayed deploy);
    only the operator's rollback does. Hand-signed models without a version are not ordered."""
    live = deliver_model(untrained_policy, tmp_path / "store", "live", lab_key, 2, run="2026-03-01_10-00-00")
    for name, run, round_number in (("older-run", "2026-02-01_10-00-00", 9), ("same", "2026-03-01_10-00-00", 2)):
        model = deliver_model(untrained_policy, tmp_path / "inbox", name, lab_key, round_number, run=run)
        with pytest.raises(ModelRejected, match=r"is not newer than the live model's \(2026-03-01_10-00-00 round 2\)"):
            check_model(model, FEATURES, rules(lab_key), live=live)
    for name, run, round_number in (("next-round", "2026-03-01_10-00-00", 3), ("next-run", "2026-04-01_10-00-00", 0)):
        model = deliver_model(untrained_policy, tmp_path / "inbox", name, lab_key, round_number, run=run)
        check_model(model, FEATURES, rules(lab_key), live=live)
    by_hand = deliver_model(untrained_policy, tmp_path / "inbox", "by-hand", lab_key, 1)
    check_model(by_hand, FEATURES, rules(lab_key), live=live)


def test_store_history_rollback_and_pruning(untrained_policy, tmp_path, lab_key):
    store = ModelStore(tmp_path / "models", keep=2)
    names = []
    for i in range(3):
        names.append(f"round_{i}")
        model = deliver_model(untrained_policy, store.inbox, names[-1], lab_key, round_number=i)
        assert store.pending() == [model]
        store.went_live(store.accept(model))
    assert store.live().name == "round_2" and store.previous().name == "round_1"
    assert not (store.store / "round_0").exists()  # beyond keep=2
    assert [m["name"] for m in store.models()] == ["round_2", "round_1"]
    store.rolled_back()
    assert store.live().name == "round_1" and store.previous() is None
    assert not (store.store / "round_2").exists()

    bad = deliver_model(untrained_policy, store.inbox, "bad", lab_key, edit=_nan)
    store.reject(bad, "NaN")
    assert store.rejections() == [{"name": "bad", "reason": "NaN"}]
    assert store.pending() == []


def _other_statistics(directory):
    from fedbot.policy_io import POST_STATE

    stats = load_file(directory / POST_STATE)
    stats["action.max"] = stats["action.max"] * 1.01
    save_file(stats, directory / POST_STATE)


def test_a_model_that_failed_at_run_time_is_known_by_name_and_content_and_never_live_at_start(
    untrained_policy, tmp_path, lab_key
):
    """The ledger is written before the history changes: an agent that died in between starts on the
    model before the failed one."""
    import time

    from agent.config import AgentConfig, ChecksSection
    from agent.daemon import Agent
    from agent.model_store import read_manifest

    config = AgentConfig(
        robot_id="ledger",
        data_dir=tmp_path / "agent",
        socket=tmp_path / "agent.sock",
        checks=ChecksSection(trusted_keys=[public_key_line(lab_key)]),
    )
    agent = Agent(config)
    store = agent.models
    store.went_live(store.accept(deliver_model(untrained_policy, store.inbox, "good", lab_key, 1)))
    bad = store.accept(deliver_model(untrained_policy, store.inbox, "bad", lab_key, 2, edit=_other_statistics))
    store.went_live(bad)
    store.failed.record("bad", read_manifest(bad), "failed at run time: test", time.time(), "good")

    agent.updates.load_live()
    assert store.history() == ["good"] and agent.control._ticket.name == "good"
    again = deliver_model(untrained_policy, store.inbox, "renamed", lab_key, 3, edit=_other_statistics)
    assert store.failed.find("renamed", read_manifest(again))["model"] == "bad"  # the same files
    assert store.failed.find("bad", {})["reason"] == "failed at run time: test"  # the same name
    assert store.failed.find("good", read_manifest(store.store / "good")) is None  # same weights, other statistics


def test_models_being_written_are_not_pending(untrained_policy, tmp_path):
    store = ModelStore(tmp_path / "models", keep=3)
    (store.inbox / ".incoming-round_0009-abc").mkdir()
    assert store.pending() == []


def test_sim_gate_compares_with_the_live_model(untrained_policy, tmp_path, lab_key):
    """A negative tolerance demands that a candidate beat the live model: two equal untrained
    policies then fail the gate, with the reason; a gate with no live model passes."""
    from agent.config import AgentConfig, ChecksSection
    from agent.daemon import Agent
    from fedbot.policy_io import load_policy

    config = AgentConfig(
        robot_id="gate",
        data_dir=tmp_path / "agent",
        socket=tmp_path / "agent.sock",
        checks=ChecksSection(sim_gate_episodes=1, sim_gate_tolerance=-0.5),
    )
    agent = Agent(config)
    first = agent.models.accept(deliver_model(untrained_policy, agent.models.inbox, "first", lab_key))
    agent.updates.sim_gate("first", load_policy(first, "cpu"))  # nothing live yet: passes
    agent.models.went_live(first)
    with pytest.raises(ModelRejected, match=r"sim gate: success 0% on 1 scenes, the live model has 0%"):
        agent.updates.sim_gate("second", load_policy(untrained_policy, "cpu"))
