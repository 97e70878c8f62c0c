"""Policies on disk in lerobot's own format, saved atomically and loaded offline.

A saved policy directory holds `config.json`, `model.safetensors` and the pre/post-processor
files (with their normalization statistics), so `DiffusionPolicy.from_pretrained`,
`make_pre_post_processors(pretrained_path=...)` and `lerobot-eval` all accept it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from lerobot.common.control_utils import predict_action
from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
from lerobot.policies.factory import make_pre_post_processors

from fedbot.atomic_files import publish_dir
from fedbot.cpu_inference import prepare_for_inference
from fedbot.presets import default_device


@dataclass
class LoadedPolicy:
    """A policy with the processors that normalize its inputs and unnormalize its actions."""

    policy: DiffusionPolicy
    preprocessor: object
    postprocessor: object

    def __post_init__(self) -> None:
        prepare_for_inference(self.policy)  # faster CPU inference; training is unaffected

    @property
    def device(self) -> torch.device:
        return torch.device(self.policy.config.device)

    def reset(self) -> None:
        """Forget queued observations and actions (start of an episode, after a weight swap)."""
        self.policy.reset()

    def select_action(self, observation: dict) -> torch.Tensor:
        """One control tick: observation (numpy, HWC images) -> action tensor on the CPU."""
        action = predict_action(
            observation, self.policy, self.device, self.preprocessor, self.postprocessor, use_amp=False
        )
        return action.squeeze(0).cpu()


def save_policy(directory: Path, loaded: LoadedPolicy) -> None:
    """Write the policy and its processors to the new `directory` atomically (write, fsync, rename)."""
    directory = Path(directory)
    if directory.exists():
        raise FileExistsError(f"{directory} exists; saved policies are never overwritten")
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    loaded.policy.save_pretrained(tmp)
    loaded.preprocessor.save_pretrained(tmp)
    loaded.postprocessor.save_pretrained(tmp)
    publish_dir(tmp, directory)


def load_policy(directory: Path, device: str | None = None) -> LoadedPolicy:
    """Load a saved policy and its processors without touching the network. Every weight the
    model has must be in the file with its shape, and nothing else (strict)."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} is not a saved policy (no config.json)")
    config = DiffusionConfig.from_pretrained(directory)
    config.pretrained_backbone_weights = None  # from_pretrained rebuilds the model from config first
    config.device = device or default_device()
    policy = DiffusionPolicy.from_pretrained(directory, config=config, strict=True)
    policy.to(config.device).eval()
    device_override = {"device_processor": {"device": config.device}}
    preprocessor, postprocessor = make_pre_post_processors(
        config,
        pretrained_path=str(directory),
        preprocessor_overrides=device_override,
        postprocessor_overrides={"device_processor": {"device": "cpu"}},
    )
    return LoadedPolicy(policy, preprocessor, postprocessor)
