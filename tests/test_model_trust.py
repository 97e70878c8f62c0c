"""Signed model directories (fedbot/model_manifest.py), tried as an attacker would: every way of
getting a model past the signature check is refused, naming the check that failed."""

from __future__ import annotations

import json
import shutil

import pytest

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
