"""Policies on disk in lerobot's own format, saved atomically and loaded offline, with nothing in
the directory imported by name.

A saved policy directory holds `config.json`, `model.safetensors` and the pre/post-processor
files (with their normalization statistics), so `DiffusionPolicy.from_pretrained`,
`make_pre_post_processors(pretrained_path=...)` and `lerobot-eval` all accept it.

Loading does not go through lerobot's processor loader: `DataProcessorPipeline.from_pretrained`
imports the module that a step's "class" names and calls it with the saved config, so a crafted
directory runs code (docs/lerobot-0.6.1-traps.md). `load_policy` instead reads config.json as data
(a diffusion config, decoded field by field, sizes bounded), builds the processor steps in code
(lerobot's own diffusion pipeline), requires each saved pipeline JSON to be exactly what that
pipeline writes, and loads the statistics from the two fixed state files with safetensors. Any
other file in the directory is never read.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import draccus
import torch
from lerobot.common.control_utils import predict_action
from lerobot.configs.types import FeatureType
from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
from lerobot.policies.diffusion.processor_diffusion import make_diffusion_pre_post_processors
from lerobot.processor import DeviceProcessorStep, NormalizerProcessorStep, UnnormalizerProcessorStep
from lerobot.utils.constants import POLICY_POSTPROCESSOR_DEFAULT_NAME, POLICY_PREPROCESSOR_DEFAULT_NAME
from safetensors.torch import load_file

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


CONFIG_FILE = "config.json"
# The statistics files lerobot's save_pretrained writes for the diffusion pipeline (fixed names:
# never taken from the JSON, whose "state_file" could name any path).
PRE_STATE = f"{POLICY_PREPROCESSOR_DEFAULT_NAME}_step_3_normalizer_processor.safetensors"
POST_STATE = f"{POLICY_POSTPROCESSOR_DEFAULT_NAME}_step_0_unnormalizer_processor.safetensors"
MAX_JSON_BYTES = 1 << 20
MAX_STATS_BYTES = 64 << 20
STAT_NAMES = {"min", "max", "mean", "std", "count", "q01", "q10", "q50", "q90", "q99"}
# Bounds on what a config may ask to build (far above every preset; a model this big would not
# fit a robot anyway).
MAX_DOWN_DIM, MAX_HORIZON, MAX_OBS_STEPS, MAX_DENOISING_STEPS, MAX_FEATURE_SIZE = 4096, 256, 16, 1000, 1 << 20


class PolicyFormatError(ValueError):
    """A directory that is not a saved fedbot DiffusionPolicy; the message says what is wrong."""


def load_policy(directory: Path, device: str | None = None) -> LoadedPolicy:
    """Load a saved DiffusionPolicy and its processors without touching the network or importing
    anything the directory names. Every weight the model has must be in the file with its shape,
    and nothing else (strict). Raises PolicyFormatError for a directory of another shape."""
    directory = Path(directory)
    config = read_config(directory)
    config.device = device or default_device()
    policy = DiffusionPolicy.from_pretrained(directory, config=config, strict=True)  # safetensors: no pickle
    policy.to(config.device).eval()
    preprocessor, postprocessor = make_diffusion_pre_post_processors(config, dataset_stats=None)
    for pipeline, state_file in ((preprocessor, PRE_STATE), (postprocessor, POST_STATE)):
        _require_saved_pipeline(directory, pipeline, state_file)
    # What from_pretrained does with the state files, on steps this code built.
    (normalizer,) = [step for step in preprocessor.steps if isinstance(step, NormalizerProcessorStep)]
    (unnormalizer,) = [step for step in postprocessor.steps if isinstance(step, UnnormalizerProcessorStep)]
    normalizer.load_state_dict(_read_stats(directory / PRE_STATE, config))
    unnormalizer.load_state_dict(_read_stats(directory / POST_STATE, config))
    postprocessor.steps = [
        DeviceProcessorStep(device="cpu") if isinstance(step, DeviceProcessorStep) else step
        for step in postprocessor.steps
    ]  # actions go to the robot from the CPU
    return LoadedPolicy(policy, preprocessor, postprocessor)


def read_config(directory: Path) -> DiffusionConfig:
    """config.json as data: a diffusion policy's fields, decoded without importing anything, with
    every size bounded and nothing that would download or compile."""
    raw = json.loads(_read_regular(Path(directory) / CONFIG_FILE, MAX_JSON_BYTES))
    if not isinstance(raw, dict) or raw.pop("type", None) != "diffusion":
        raise PolicyFormatError(f"{CONFIG_FILE} is not a diffusion policy's")
    try:
        config = draccus.decode(DiffusionConfig, raw)
    except Exception as error:  # noqa: BLE001  draccus raises several kinds; all mean a bad file
        raise PolicyFormatError(f"{CONFIG_FILE}: {type(error).__name__}: {str(error)[:300]}") from None
    config.pretrained_backbone_weights = None  # torchvision would download and unpickle them
    config.compile_model = False
    config.pretrained_path = None
    sizes = {
        "down_dims": max(config.down_dims, default=0) <= MAX_DOWN_DIM and len(config.down_dims) <= 8,
        "horizon": 0 < config.horizon <= MAX_HORIZON,
        "n_obs_steps": 0 < config.n_obs_steps <= MAX_OBS_STEPS,
        "num_inference_steps": 0 < (config.num_inference_steps or 0) <= MAX_DENOISING_STEPS,
        "features": all(
            0 < math.prod(f.shape) <= MAX_FEATURE_SIZE
            for f in (config.input_features | config.output_features).values()
        ),
    }
    if not all(sizes.values()):
        raise PolicyFormatError(f"{CONFIG_FILE}: out of bounds: {[k for k, ok in sizes.items() if not ok]}")
    return config


def _require_saved_pipeline(directory: Path, pipeline, state_file: str) -> None:
    """The saved pipeline JSON must be exactly what `pipeline` (built in code) writes, devices aside:
    the same steps by registry name, no "class" entries, the same configs, the fixed state file."""
    expected = pipeline.get_config()
    for step in expected["steps"]:
        if step["registry_name"] in ("normalizer_processor", "unnormalizer_processor"):
            step["state_file"] = state_file
    saved = json.loads(_read_regular(directory / f"{pipeline.name}.json", MAX_JSON_BYTES))
    if _without_devices(saved) != _without_devices(expected):
        raise PolicyFormatError(f"{pipeline.name}.json is not lerobot's diffusion pipeline for this config")


def _without_devices(pipeline_config) -> dict:
    """A pipeline JSON with device values left out: the loader chooses the devices, not the file."""
    if not isinstance(pipeline_config, dict) or not isinstance(pipeline_config.get("steps"), list):
        raise PolicyFormatError("a processor file is not a pipeline JSON object")
    copy = json.loads(json.dumps(pipeline_config))
    for step in copy["steps"]:
        if isinstance(step, dict) and step.get("registry_name") == "device_processor":
            if isinstance(step.get("config"), dict):
                step["config"].pop("device", None)
    return copy


def _read_stats(path: Path, config: DiffusionConfig) -> dict[str, torch.Tensor]:
    """Normalization statistics: float32, finite, known statistic names, shaped like the features."""
    _read_regular(path, MAX_STATS_BYTES, read=False)
    stats = load_file(str(path))  # safetensors: a JSON header and raw bytes, no pickle
    features = config.input_features | config.output_features
    shapes = {
        key: {(f.shape[0], 1, 1), (f.shape[0],)} if f.type is FeatureType.VISUAL else {tuple(f.shape)}
        for key, f in features.items()
    }
    seen = set()
    for name, tensor in stats.items():
        key, _, stat = name.rpartition(".")
        if stat not in STAT_NAMES or tensor.dtype != torch.float32 or not torch.isfinite(tensor).all():
            raise PolicyFormatError(f"{path.name}: bad statistic {name!r}")
        if key in shapes and stat != "count" and tuple(tensor.shape) not in shapes[key]:
            raise PolicyFormatError(f"{path.name}: {name} has shape {tuple(tensor.shape)}, expected {shapes[key]}")
        seen.add(key)
    if missing := set(shapes) - seen:
        raise PolicyFormatError(f"{path.name}: no statistics for {sorted(missing)}")
    return stats


def _read_regular(path: Path, max_bytes: int, read: bool = True) -> bytes:
    if path.is_symlink() or not path.is_file():
        raise PolicyFormatError(f"{path.name} is missing or not a regular file")
    if path.stat().st_size > max_bytes:
        raise PolicyFormatError(f"{path.name} is larger than {max_bytes} bytes")
    return path.read_bytes() if read else b""
