"""Local training: batches equal to lerobot's, checkpoints in lerobot's format, resume."""

import dataclasses
import json

import pytest
import torch
import torchvision
from lerobot.common.train_utils import load_training_step
from lerobot.datasets.factory import resolve_delta_timestamps
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
from lerobot.policies.factory import make_pre_post_processors
from lerobot.utils.constants import PRETRAINED_MODEL_DIR, SCHEDULER_STATE, TRAINING_STATE_DIR
from safetensors.torch import load_file

from fedbot.presets import Preset, get_preset
from fedbot.training import (
    RAW_WEIGHTS_FILE,
    InMemoryFrames,
    TrainState,
    last_checkpoint,
    new_policy,
    open_dataset,
    train,
)

from arm_bench import record_arm_dataset
from helpers import record_wander


@pytest.mark.parametrize("preset", ["pusht-state", "pusht-image"])
def test_in_memory_batches_equal_lerobot_samples(small_dataset, preset):
    dataset = open_dataset(small_dataset)
    config = get_preset(preset).make_config(dataset.meta.features, device="cpu")
    frames = InMemoryFrames(dataset, config)
    reference = LeRobotDataset(
        dataset.repo_id, root=small_dataset, delta_timestamps=resolve_delta_timestamps(config, dataset.meta)
    )
    # indices at episode starts and ends exercise the padding
    for index in [0, 1, 20, 39, 40, 41, 79, 119]:
        frames.sample_indices = torch.tensor([index])
        batch = frames.batch(1, torch.Generator())
        item = reference[index]
        for key in [*config.input_features, "action"]:
            assert torch.allclose(batch[key][0], item[key], atol=1e-6), (index, key)
            assert torch.equal(batch[f"{key}_is_pad"][0], item[f"{key}_is_pad"]), (index, key)


def test_camera_frames_are_held_at_the_policys_input_resolution(tmp_path):
    """so-arm-image resizes camera images to 96x128: training holds a 240x320 camera's frames at that
    size, and its batches equal lerobot's samples resized as the policy resizes them."""
    root = tmp_path / "arm"
    record_arm_dataset(tmp_path / "bench", root, 2, camera_size=(240, 320))
    dataset = open_dataset(root)
    config = get_preset("so-arm-image").make_config(dataset.meta.features, device="cpu")
    frames = InMemoryFrames(dataset, config)
    camera = "observation.images.front"
    assert frames.tensors[camera].shape == (dataset.meta.total_frames, 3, 96, 128)
    reference = LeRobotDataset(
        dataset.repo_id, root=root, delta_timestamps=resolve_delta_timestamps(config, dataset.meta)
    )
    resize = torchvision.transforms.Resize(config.resize_shape)  # what DiffusionRgbEncoder applies
    for index in [0, 1, dataset.meta.total_frames - 1]:
        frames.sample_indices = torch.tensor([index])
        batch = frames.batch(1, torch.Generator())
        item = reference[index]
        assert torch.allclose(batch[camera][0], resize(item[camera]), atol=0.5 / 255 + 1e-6), index
        assert torch.equal(batch[f"{camera}_is_pad"][0], item[f"{camera}_is_pad"]), index
        assert torch.allclose(batch["action"][0], item["action"], atol=1e-6), index


def test_sampling_skips_the_last_frames_of_each_episode(small_dataset):
    dataset = open_dataset(small_dataset)
    config = get_preset("pusht-state").make_config(dataset.meta.features, device="cpu")
    frames = InMemoryFrames(dataset, config)
    drop = config.drop_n_last_frames
    expected = [i for ep in range(3) for i in range(ep * 40, ep * 40 + 40 - drop)]
    assert frames.sample_indices.tolist() == expected


def small(name: str, **changes) -> Preset:
    """A preset with batches of 8, for short CPU runs; `changes` are Preset fields or config fields."""
    preset = get_preset(name)
    fields = {k: changes.pop(k) for k in list(changes) if k in preset.config}
    return dataclasses.replace(preset, batch_size=8, config={**preset.config, **fields}, **changes)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, different


def test_checkpoints_resume_and_load_with_lerobot(small_dataset, tmp_path):
    preset = small("pusht-state")
    out = tmp_path / "run"
    train(small_dataset, preset, 4, out, save_every=2, show_progress=False)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["000002", "000004", "last"]
    assert last_checkpoint(out).name == "000004"
    at_4 = load_file(out / "checkpoints" / "000004" / PRETRAINED_MODEL_DIR / "model.safetensors")

    policy_dir = train(small_dataset, preset, 6, out, save_every=2, show_progress=False)
    checkpoint = last_checkpoint(out)
    assert checkpoint.name == "000006"
    assert load_training_step(checkpoint / "training_state") == 6
    run = json.loads((checkpoint / "fedbot_train.json").read_text())
    assert (run["preset"], run["steps"]) == ("pusht-state", 6)
    saved = load_file(policy_dir / "model.safetensors")
    assert any(not torch.equal(saved[key], at_4[key]) for key in saved)  # the resumed steps trained

    # lerobot's own loaders, offline: every weight of the model comes from the checkpoint
    config = DiffusionConfig.from_pretrained(policy_dir)
    assert config.pretrained_backbone_weights is None
    assert (config.horizon, config.n_action_steps, config.n_obs_steps) == (16, 8, 2)
    policy = DiffusionPolicy.from_pretrained(policy_dir, config=config)
    assert_same_tensors(policy.state_dict(), saved)
    preprocessor, _ = make_pre_post_processors(config, pretrained_path=str(policy_dir))
    normalizer = next(s for s in preprocessor.steps if hasattr(s, "stats") and s.stats)
    dataset = open_dataset(small_dataset)
    for stat in ("min", "max"):
        assert torch.allclose(
            torch.as_tensor(normalizer.stats["observation.state"][stat]).float(),
            torch.as_tensor(dataset.meta.stats["observation.state"][stat]).float(),
        )


def test_a_given_learning_rate_is_the_peak_of_the_schedule_and_survives_a_resume(small_dataset, tmp_path):
    out = tmp_path / "run"
    for steps in (2, 4):
        train(small_dataset, small("pusht-state"), steps, out, save_every=2, lr=3e-4, show_progress=False)
        scheduler = json.loads((last_checkpoint(out) / TRAINING_STATE_DIR / SCHEDULER_STATE).read_text())
        assert scheduler["base_lrs"] == [3e-4]
    assert get_preset("pusht-state").config["optimizer_lr"] != 3e-4


@pytest.fixture(scope="module")
def one_window_dataset(tmp_path_factory):
    """One 8-frame episode: a single training window (drop_n_last_frames 7), so every batch is the same
    whichever generator draws it."""
    root = tmp_path_factory.mktemp("data") / "one-window"
    record_wander(root, 1, steps=8)
    return root


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("ema_power", [0.0, 0.75])
def test_an_interrupted_run_resumes_exactly_where_it_stopped(one_window_dataset, tmp_path, ema_power):
    """Weights, Adam's moments, the learning-rate schedule, the step counter, the noise generator and
    the EMA (raw weights in training_state, averaged ones in pretrained_model) all come back from a
    checkpoint: a run stopped at step 4 and resumed ends at step 6 as an uninterrupted run does.
    (A resumed run draws batches from seed + step, hence a dataset whose batches are all one.)"""
    preset = small("pusht-state", ema_power=ema_power, scheduler_warmup_steps=1)  # cosine decay from step 1
    dataset = open_dataset(one_window_dataset)
    assert InMemoryFrames(dataset, preset.make_config(dataset.meta.features, device="cpu")).sample_indices.tolist() == [
        0
    ]

    train(one_window_dataset, preset, 4, tmp_path / "whole", save_every=2, show_progress=False)

    def crash_at_2(checkpoint):
        if checkpoint.name == "000002":
            raise Interrupted

    with pytest.raises(Interrupted):
        train(
            one_window_dataset,
            preset,
            4,
            tmp_path / "resumed",
            save_every=2,
            show_progress=False,
            on_checkpoint=crash_at_2,
        )
    assert last_checkpoint(tmp_path / "resumed").name == "000002"
    torch.manual_seed(1234)  # whatever the process did in between: the checkpoint restores the generator
    train(one_window_dataset, preset, 4, tmp_path / "resumed", save_every=2, show_progress=False)

    whole, resumed = (tmp_path / run / "checkpoints" / "000004" for run in ("whole", "resumed"))
    files = [
        f"{PRETRAINED_MODEL_DIR}/model.safetensors",
        f"{TRAINING_STATE_DIR}/optimizer_state.safetensors",
        f"{TRAINING_STATE_DIR}/rng_state.safetensors",
    ]
    if ema_power:
        files.append(f"{TRAINING_STATE_DIR}/{RAW_WEIGHTS_FILE}")
    for name in files:
        assert_same_tensors(load_file(resumed / name), load_file(whole / name))

    def training_state(checkpoint, name):
        state = json.loads((checkpoint / TRAINING_STATE_DIR / name).read_text())
        if name == "scheduler_state.json":
            del state["_step_count"]  # how often step() was called in this process (for a warning)
        return state

    for name in ("optimizer_param_groups.json", "scheduler_state.json", "training_step.json"):
        assert training_state(resumed, name) == training_state(whole, name), name
    assert training_state(whole, "scheduler_state.json")["last_epoch"] == 4
    # and the run trained: step 4's weights are not step 2's
    at_2 = load_file(tmp_path / "whole" / "checkpoints" / "000002" / files[0])
    assert any(not torch.equal(value, at_2[key]) for key, value in load_file(whole / files[0]).items())


def test_an_ema_run_saves_the_averaged_weights_and_keeps_the_raw_ones_for_training(small_dataset, tmp_path):
    """pretrained_model (what is evaluated and deployed) holds the EMA; training_state the raw weights.
    diffusers' EMA with warmup: step 1 copies the weights, step 2 keeps decay 1 - 2^-power of them."""
    power = 0.75
    out = tmp_path / "run"
    preset = small("pusht-state", ema_power=power, scheduler_warmup_steps=1, optimizer_lr=1e-3)  # steps that count
    train(small_dataset, preset, 2, out, save_every=1, show_progress=False)
    checkpoints = out / "checkpoints"
    raw_1, raw_2 = (load_file(checkpoints / s / TRAINING_STATE_DIR / RAW_WEIGHTS_FILE) for s in ("000001", "000002"))
    averaged_1, averaged_2 = (
        load_file(checkpoints / s / PRETRAINED_MODEL_DIR / "model.safetensors") for s in ("000001", "000002")
    )
    policy = DiffusionPolicy.from_pretrained(checkpoints / "000002" / PRETRAINED_MODEL_DIR)
    trained = {name for name, p in policy.named_parameters() if p.requires_grad}
    assert trained and set(averaged_2) <= set(raw_2)
    assert_same_tensors(averaged_1, {key: raw_1[key] for key in averaged_1})
    decay = 1 - 2**-power
    for key, value in averaged_2.items():
        if key in trained:
            torch.testing.assert_close(value, decay * raw_1[key] + (1 - decay) * raw_2[key], rtol=1e-5, atol=1e-7)
        else:  # buffers are not averaged
            assert torch.equal(value, raw_2[key]), key
    assert any(not torch.equal(averaged_2[key], raw_2[key]) for key in trained)


def test_resume_refuses_another_preset(small_dataset, tmp_path):
    train(small_dataset, get_preset("pusht-state"), 1, tmp_path / "run", show_progress=False)
    with pytest.raises(ValueError, match="preset"):
        train(small_dataset, get_preset("pusht-image"), 2, tmp_path / "run", show_progress=False)


def test_training_reduces_the_loss_on_a_fixed_batch(small_dataset):
    dataset = open_dataset(small_dataset)
    torch.manual_seed(0)
    loaded = new_policy(get_preset("pusht-state"), dataset, device="cpu")
    frames = InMemoryFrames(dataset, loaded.policy.config)
    state = TrainState.create(loaded, total_steps=1000)
    for group in state.optimizer.param_groups:  # a constant rate instead of the warmup, for a short test
        group["lr"] = 1e-3
    state.scheduler = torch.optim.lr_scheduler.LambdaLR(state.optimizer, lambda _: 1.0)
    fixed = loaded.preprocessor(frames.batch(64, torch.Generator().manual_seed(1)))

    def fixed_loss() -> float:
        torch.manual_seed(2)  # same noise and timesteps each time
        with torch.no_grad():
            return loaded.policy.forward(fixed)[0].item()

    before = fixed_loss()
    state.train_steps(frames, 80, 32, torch.Generator().manual_seed(3))
    assert fixed_loss() < 0.5 * before
