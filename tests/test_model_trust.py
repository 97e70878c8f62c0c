"""Model directories tried as an attacker would: every way of getting a model past the signature
check (fedbot/model_manifest.py) is refused, naming the check that failed; and a model whose files
name code to run is refused by the loader (fedbot/policy_io.py) without running it."""

from __future__ import annotations

import contextlib
import json
import select
import shutil
import time

import numpy as np
import pytest
import torch
from lerobot.policies.factory import make_pre_post_processors
from lerobot.processor import DataProcessorPipeline

from fedbot.model_manifest import (
    MANIFEST,
    SIGNATURE,
    ModelNotTrusted,
    generate_key,
    load_private_key,
    parse_public_key,
    sign_model_dir,
    verify_model_dir,
)
from fedbot.policy_io import PolicyFormatError, load_policy


@pytest.fixture
def keys(tmp_path):
    lab = generate_key(tmp_path / "keys" / "lab", "lab")
    stranger = generate_key(tmp_path / "keys" / "stranger", "stranger")
    return {
        "lab": (tmp_path / "keys" / "lab", parse_public_key(lab)),
        "stranger": (tmp_path / "keys" / "stranger", parse_public_key(stranger)),
    }


@pytest.fixture
def signed(tmp_path, untrained_policy, keys):
    model = tmp_path / "model"
    shutil.copytree(untrained_policy, model)
    sign_model_dir(model, load_private_key(keys["lab"][0]), {"round": 3})
    return model


def test_a_model_signed_by_a_trusted_key_verifies_and_lists_every_file(signed, keys):
    manifest = verify_model_dir(signed, [keys["lab"][1]])
    assert manifest["round"] == 3
    assert set(manifest["files"]) == {p.name for p in signed.iterdir()} - {MANIFEST, SIGNATURE}
    assert {"config.json", "model.safetensors"} <= set(manifest["files"])
    assert any(name.startswith("policy_preprocessor") for name in manifest["files"])


def test_a_key_file_is_private_and_kept_when_generated_again(keys):
    path, public = keys["lab"]
    assert path.stat().st_mode & 0o777 == 0o600
    assert parse_public_key(generate_key(path, "lab")).public_bytes_raw() == public.public_bytes_raw()


def _append(name):
    def damage(model):
        with open(model / name, "ab") as f:
            f.write(b" ")

    damage.__name__ = f"append_to_{name}"
    return damage


def _replace_json(name, change):
    def damage(model):
        data = json.loads((model / name).read_text())
        (model / name).write_text(json.dumps(change(data)))

    damage.__name__ = f"edit_{name}"
    return damage


def _add_file(model):
    (model / "policy_preprocessor_step_9_evil.json").write_text("{}")


def _remove_signature(model):
    (model / SIGNATURE).unlink()


def _symlink_weights(model):
    target = model.parent / "elsewhere.safetensors"
    shutil.move(model / "model.safetensors", target)
    (model / "model.safetensors").symlink_to(target)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_append("model.safetensors"), "model.safetensors does not match its signed sha256"),
        (_append("config.json"), "config.json does not match its signed sha256"),
        (_append("policy_preprocessor.json"), "policy_preprocessor.json does not match"),
        (_replace_json(MANIFEST, lambda m: {**m, "round": 99}), "does not verify"),
        (_replace_json(SIGNATURE, lambda s: {**s, "key-id": "0123456789abcdef"}), "does not trust"),
        (_add_file, "extra: ['policy_preprocessor_step_9_evil.json']"),
        (_remove_signature, "not signed"),
        (_symlink_weights, "not a regular file"),
    ],
)
def test_an_altered_model_is_refused_with_the_reason(signed, keys, damage, reason):
    damage(signed)
    with pytest.raises(ModelNotTrusted, match=reason.replace("[", r"\[").replace("]", r"\]")):
        verify_model_dir(signed, [keys["lab"][1]])


def test_a_model_signed_by_a_key_the_robot_does_not_trust_is_refused(signed, keys, tmp_path):
    with pytest.raises(ModelNotTrusted, match="does not trust"):
        verify_model_dir(signed, [keys["stranger"][1]])
    resigned = tmp_path / "resigned"  # a stranger re-signs a copy with its own key
    shutil.copytree(signed, resigned)
    sign_model_dir(resigned, load_private_key(keys["stranger"][0]), {"round": 3})
    with pytest.raises(ModelNotTrusted, match="does not trust"):
        verify_model_dir(resigned, [keys["lab"][1]])


# -- nothing in a model directory is imported by name (fedbot/policy_io.py) -------------------------
def _observation():
    return {
        "observation.state": np.array([100.0, 200.0], np.float32),
        "observation.environment_state": np.linspace(50, 400, 16).astype(np.float32),
    }


def test_the_safe_loader_gives_lerobots_own_processors(untrained_policy):
    ours = load_policy(untrained_policy, "cpu")
    pre, post = make_pre_post_processors(ours.policy.config, pretrained_path=str(untrained_policy))
    batch = {key: torch.as_tensor(value)[None] for key, value in _observation().items()}
    theirs, mine = pre(dict(batch)), ours.preprocessor(dict(batch))
    assert theirs.keys() == mine.keys() and "observation.state" in mine
    for key, value in theirs.items():
        assert torch.equal(value, mine[key]) if isinstance(value, torch.Tensor) else value == mine[key], key
    action = torch.tensor([[0.3, -0.7]])
    assert torch.equal(post(action), ours.postprocessor(action))
    assert ours.preprocessor.get_config() == pre.get_config()


def _plant_step(name, entry):
    def damage(model):
        data = json.loads((model / name).read_text())
        data["steps"].insert(0, entry)
        (model / name).write_text(json.dumps(data))

    return damage


def test_a_processor_step_naming_code_is_refused_and_never_runs(tmp_path, untrained_policy):
    """The attack works on lerobot's own loader (the marker appears); fedbot's refuses it unrun."""
    marker = tmp_path / "pwned"
    model = tmp_path / "model"
    shutil.copytree(untrained_policy, model)
    _plant_step("policy_preprocessor.json", {"class": "subprocess.Popen", "config": {"args": ["touch", str(marker)]}})(
        model
    )
    with pytest.raises(PolicyFormatError, match="policy_preprocessor.json is not lerobot's diffusion pipeline"):
        load_policy(model, "cpu")
    assert not marker.exists()
    with contextlib.suppress(Exception):
        DataProcessorPipeline.from_pretrained(str(model), config_filename="policy_preprocessor.json")
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:  # Popen returns before touch has run
        select.select([], [], [], 0.05)
    assert marker.exists()


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (
            _plant_step("policy_postprocessor.json", {"registry_name": "tokenizer_processor", "config": {}}),
            "policy_postprocessor.json is not lerobot's diffusion pipeline",
        ),
        (
            _replace_json(
                "policy_preprocessor.json",
                lambda d: {
                    **d,
                    "steps": [
                        {**s, "state_file": "../../etc/passwd.safetensors"} if "state_file" in s else s
                        for s in d["steps"]
                    ],
                },
            ),
            "policy_preprocessor.json is not lerobot's diffusion pipeline",
        ),
        (_replace_json("config.json", lambda c: {**c, "type": "act"}), "not a diffusion policy"),
        (_replace_json("config.json", lambda c: {**c, "down_dims": [64, 128, 1_000_000]}), "out of bounds"),
        (_replace_json("config.json", lambda c: {**c, "no_such_field": 1}), "config.json: "),
        (lambda m: (m / "config.json").write_text("[]"), "not a diffusion policy"),
    ],
)
def test_a_model_directory_of_another_shape_is_refused(tmp_path, untrained_policy, damage, reason):
    model = tmp_path / "model"
    shutil.copytree(untrained_policy, model)
    damage(model)
    with pytest.raises(PolicyFormatError, match=reason):
        load_policy(model, "cpu")
