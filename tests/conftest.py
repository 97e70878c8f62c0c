"""Test-wide settings: offline, quiet video encoder, a small thread pool."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("SVT_LOG", "1")
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """Three 40-frame episodes recorded with the wander operator (cheap, not successful)."""
    from helpers import record_wander

    root = tmp_path_factory.mktemp("data") / "robot0"
    record_wander(root, 3, steps=40)
    return root


@pytest.fixture(scope="session")
def untrained_policy(small_dataset, tmp_path_factory):
    """A `pusht-state` policy saved after 0 training steps, with the small dataset's statistics."""
    from fedbot.presets import get_preset
    from fedbot.training import train

    out = tmp_path_factory.mktemp("runs") / "untrained"
    return train(small_dataset, get_preset("pusht-state"), 0, out, show_progress=False)


@pytest.fixture(scope="session")
def lab_key(tmp_path_factory):
    """The private key the tests' models are signed with (the robots' configs trust its public half)."""
    from fedbot.model_manifest import generate_key

    path = tmp_path_factory.mktemp("keys") / "lab.key"
    generate_key(path, "lab")
    return path
