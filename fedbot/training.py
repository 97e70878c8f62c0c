"""Local DiffusionPolicy training on one LeRobot dataset, with checkpoints and resume.

lerobot's `LeRobotDataset.__getitem__` reads parquet rows and decodes video frame by frame for
every sample, which dominates a CPU training step of the small presets. A robot's dataset fits in
memory at the policy's input resolution, so `InMemoryFrames` decodes it once (camera frames resized
to the config's `resize_shape` as they are decoded, which the policy would do to every batch anyway)
and builds batches by tensor indexing, reproducing lerobot's delta-timestamp windows, padding masks
and episode-aware sampling (`drop_n_last_frames`). Everything else (model, processors, optimizer and
scheduler presets, training-state files) is lerobot's.

Training reads a dataset through `open_dataset`, which leaves out the episodes the operator dropped
(fedbot/dataset_curation.py) and normalizes with the statistics of the kept ones.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel
from lerobot.common.train_utils import load_training_state, save_training_state
from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata
from lerobot.datasets.io_utils import load_info
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from lerobot.datasets.video_utils import decode_video_frames
from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
from lerobot.policies.factory import make_pre_post_processors
from lerobot.utils.constants import (
    ACTION,
    CHECKPOINTS_DIR,
    LAST_CHECKPOINT_LINK,
    PRETRAINED_MODEL_DIR,
    TRAINING_STATE_DIR,
)
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from safetensors.torch import load_file, save_file
from torchvision.transforms.functional import resize

from fedbot.atomic_files import point_link, publish_dir
from fedbot.dataset_curation import check_dataset, keep_episodes, kept_episodes
from fedbot.dataset_usage import note_use
from fedbot.policy_io import LoadedPolicy, load_policy, save_policy
from fedbot.presets import Preset

log = logging.getLogger(__name__)

RAW_WEIGHTS_FILE = "raw_model.safetensors"
RUN_FILE = "fedbot_train.json"
EMA_MAX_DECAY = 0.9999  # the Diffusion Policy paper's ceiling
DECODE_CHUNK = 64  # camera frames decoded at recorded resolution at a time


def open_dataset(root: Path) -> LeRobotDataset:
    """Load a recorded dataset from disk (never from a hub) for training: its kept episodes only
    (`dataset.episodes`, None when none is dropped), `meta.stats` theirs."""
    root = check_dataset(root)
    total = load_info(root).total_episodes  # an episode committed after this is left for the next time
    kept = kept_episodes(root, total)
    dataset = LeRobotDataset(f"fedbot/{root.name}", root=root, episodes=None if len(kept) == total else kept)
    keep_episodes(dataset.meta, training_episodes(dataset))
    return dataset


def open_metadata(root: Path) -> tuple[LeRobotDatasetMetadata, list[int]]:
    """A dataset's metadata as training sees it (`meta.stats` of the kept episodes) and its kept episodes."""
    root = check_dataset(root)
    meta = LeRobotDatasetMetadata(f"fedbot/{root.name}", root=root)
    kept = kept_episodes(root, meta.total_episodes)
    keep_episodes(meta, kept)
    return meta, kept


def training_episodes(dataset: LeRobotDataset) -> list[int]:
    """The episodes of an `open_dataset` dataset that training uses."""
    return list(range(dataset.meta.total_episodes)) if dataset.episodes is None else list(dataset.episodes)


class InMemoryFrames:
    """All frames of a dataset as tensors, sampled into training batches for one policy config."""

    def __init__(self, dataset: LeRobotDataset, config: DiffusionConfig):
        meta = dataset.meta
        self.fps = meta.fps
        self.stats = meta.stats
        self.keys = list(config.input_features)
        columns = dataset.hf_dataset.with_format(None).data.table
        self.tensors: dict[str, torch.Tensor] = {}
        for key in [*self.keys, ACTION]:
            if meta.features[key]["dtype"] == "video":
                self.tensors[key] = self._decode_video(dataset, key, config.resize_shape)
            else:
                self.tensors[key] = torch.as_tensor(columns.column(key).to_pylist(), dtype=torch.float32)
        episode = torch.as_tensor(columns.column("episode_index").to_numpy())
        lengths = torch.bincount(episode)
        ends = torch.cumsum(lengths, 0)
        self.episode_from = (ends - lengths)[episode]
        self.episode_to = ends[episode]
        self.num_frames = len(episode)
        # lerobot's EpisodeAwareSampler: no sample starts in the last `drop_n_last_frames` frames.
        self.sample_indices = torch.nonzero(
            torch.arange(self.num_frames) < self.episode_to - config.drop_n_last_frames
        ).squeeze(1)
        self.obs_deltas = torch.tensor(config.observation_delta_indices)
        self.action_deltas = torch.tensor(config.action_delta_indices)

    @staticmethod
    def _decode_video(dataset: LeRobotDataset, key: str, size: tuple[int, int] | None) -> torch.Tensor:
        """Every frame of camera `key`, (N, C, H, W) uint8, resized to `size` (H, W) when given.

        Frames are decoded `DECODE_CHUNK` at a time into one preallocated tensor, so memory holds the
        camera at the policy's resolution plus one chunk at the recorded one: 50 episodes of 20 s at
        30 fps from a 640x480 camera are 1.1 GB at 96x128 instead of 28 GB (BENCHMARKS.md). The
        resize is the policy's own (torchvision's bilinear, antialiased), which leaves an image already
        at `size` unchanged; done on uint8 it differs from the policy's by rounding (<= 0.5/255).
        """
        meta = dataset.meta
        episodes = {ep: meta.episodes[ep] for ep in training_episodes(dataset)}
        height, width, channels = meta.features[key]["shape"]
        height, width = size or (height, width)
        total = sum(e["length"] for e in episodes.values())
        frames = torch.empty((total, channels, height, width), dtype=torch.uint8)
        at = 0
        for ep, episode in episodes.items():
            start = episode[f"videos/{key}/from_timestamp"]
            path = dataset.root / meta.get_video_file_path(ep, key)
            for first in range(0, episode["length"], DECODE_CHUNK):
                count = min(DECODE_CHUNK, episode["length"] - first)
                timestamps = [start + (first + i) / meta.fps for i in range(count)]
                chunk = decode_video_frames(path, timestamps, dataset.tolerance_s, return_uint8=True)
                if size is not None:
                    chunk = resize(chunk, list(size), antialias=True)
                frames[at : at + count] = chunk
                at += count
        return frames

    def batch(self, size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        picks = torch.randint(len(self.sample_indices), (size,), generator=generator)
        index = self.sample_indices[picks]
        batch = {}
        for key, deltas in [(k, self.obs_deltas) for k in self.keys] + [(ACTION, self.action_deltas)]:
            window = index[:, None] + deltas[None, :]
            lo, hi = self.episode_from[index][:, None], self.episode_to[index][:, None] - 1
            batch[f"{key}_is_pad"] = (window < lo) | (window > hi)
            values = self.tensors[key][torch.maximum(torch.minimum(window, hi), lo)]
            batch[key] = values.float() / 255.0 if values.dtype == torch.uint8 else values
        return batch


@dataclass
class TrainState:
    """A policy being trained with its optimizer, learning-rate schedule, step counter and, when the
    recipe has one, an exponential moving average (EMA) of its weights.

    The schedule is lerobot's (the preset's warmup then cosine decay) over `total_steps`; a federated
    run spans it over all its rounds. With an EMA the averaged weights are the policy that is saved,
    evaluated and deployed (as in the Diffusion Policy paper); the raw weights are what the optimizer
    steps. diffusers' `EMAModel` with its warmup: decay 1 - (1 + step)^-power (BENCHMARKS.md).
    """

    loaded: LoadedPolicy
    optimizer: torch.optim.Optimizer
    scheduler: object
    ema: EMAModel | None = None
    step: int = 0

    @classmethod
    def create(
        cls,
        loaded: LoadedPolicy,
        total_steps: int,
        *,
        lr: float | None = None,
        ema_power: float = 0.0,
        start_step: int = 0,
    ) -> TrainState:
        """The preset's optimizer (learning rate `lr` if given) and schedule over `total_steps`,
        positioned at `start_step`; an EMA of the weights when `ema_power` > 0."""
        config = loaded.policy.config
        optimizer = config.get_optimizer_preset().build(loaded.policy.parameters())
        if lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr
        scheduler = config.get_scheduler_preset().build(optimizer, num_training_steps=total_steps)
        state = cls(loaded, optimizer, scheduler, ema=new_ema(loaded.policy, ema_power))
        state.seek(start_step)
        return state

    def seek(self, step: int) -> None:
        """Put the step counter, the schedule and the EMA's decay warmup at `step`."""
        self.step = step
        # The schedule is a LambdaLR (lerobot's presets build diffusers' schedules): the rate at
        # `step` is its base rate times its factor there.
        self.scheduler.last_epoch = step
        for group, base, factor in zip(
            self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas, strict=True
        ):
            group["lr"] = base * factor(step)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        if self.ema is not None:
            self.ema.optimization_step = step

    def train_steps(
        self, frames: InMemoryFrames, steps: int, batch_size: int, generator, progress=None, penalty=None
    ) -> float:
        """Run `steps` optimizer steps; returns the mean loss (without `penalty()`, if given)."""
        policy = self.loaded.policy
        policy.train()
        total = 0.0
        for _ in range(steps):
            batch = self.loaded.preprocessor(frames.batch(batch_size, generator))
            loss, _ = policy.forward(batch)
            self.optimizer.zero_grad(set_to_none=True)
            (loss + penalty() if penalty is not None else loss).backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm=10.0)
            self.optimizer.step()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.step(policy.parameters())
            self.step += 1
            total += loss.item()
            if progress is not None:
                progress(loss.item())
        policy.eval()
        return total / max(steps, 1)

    @contextmanager
    def averaged_weights(self):
        """Within the block the policy holds the weights to save, evaluate or deploy: the EMA's when
        there is one. The raw weights come back after it."""
        if self.ema is None:
            yield self.loaded
            return
        parameters = list(self.loaded.policy.parameters())
        self.ema.store(parameters)
        self.ema.copy_to(parameters)
        try:
            yield self.loaded
        finally:
            self.ema.restore(parameters)


def new_ema(policy: torch.nn.Module, power: float) -> EMAModel | None:
    """diffusers' EMA with the Diffusion Policy paper's warmup form; None when `power` is 0."""
    if power <= 0.0:
        return None
    return _ema(policy.parameters(), power)


def ema_decay_over(first_step: int, steps: int, power: float) -> float:
    """How much of its old value an EMA keeps over optimizer steps first_step+1 .. first_step+steps:
    the product of the per-step decays. A federated run moves its global model's EMA once a round
    by this factor (coordinator/server_app.py), as training with the EMA would over those steps."""
    schedule = _ema([], power)
    return math.prod(schedule.get_decay(step) for step in range(first_step + 1, first_step + steps + 1))


def _ema(parameters, power: float) -> EMAModel:
    return EMAModel(parameters, decay=EMA_MAX_DECAY, use_ema_warmup=True, inv_gamma=1.0, power=power)


def new_policy(preset: Preset, dataset: LeRobotDataset, device: str | None = None) -> LoadedPolicy:
    """A freshly initialised policy with processors normalizing by the dataset's statistics."""
    return policy_from_stats(preset, dataset.meta.features, dataset.meta.stats, device)


def policy_from_stats(preset: Preset, features: dict, stats: dict, device: str | None = None) -> LoadedPolicy:
    """A freshly initialised policy for dataset `features`, normalizing by `stats`."""
    config = preset.make_config(features, device)
    policy = DiffusionPolicy(config).to(config.device)
    pre, post = make_pre_post_processors(config, dataset_stats=stats)
    return LoadedPolicy(policy, pre, post)


def last_checkpoint(out: Path) -> Path | None:
    link = Path(out) / CHECKPOINTS_DIR / LAST_CHECKPOINT_LINK
    return link.resolve() if link.is_symlink() else None


def save_checkpoint(out: Path, state: TrainState, run: dict, keep: int = 3) -> Path:
    """Write checkpoints/<step>/ (policy + training state) atomically and point `last` at it."""
    checkpoints = Path(out) / CHECKPOINTS_DIR
    checkpoints.mkdir(parents=True, exist_ok=True)
    final = checkpoints / f"{state.step:06d}"
    if final.exists():
        return final
    tmp = checkpoints / f".tmp-{state.step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with state.averaged_weights() as averaged:
        save_policy(tmp / PRETRAINED_MODEL_DIR, averaged)
    save_training_state(tmp, state.step, state.optimizer, state.scheduler)
    if state.ema is not None:  # pretrained_model holds the EMA; these are the weights being trained
        save_file(state.loaded.policy.state_dict(), tmp / TRAINING_STATE_DIR / RAW_WEIGHTS_FILE)
    (tmp / RUN_FILE).write_text(json.dumps(run, indent=2))
    publish_dir(tmp, final)
    point_link(checkpoints / LAST_CHECKPOINT_LINK, final.name)
    for old in sorted(p for p in checkpoints.iterdir() if p.name.isdigit())[:-keep]:
        shutil.rmtree(old)
    return final


def train(
    dataset_root: Path,
    preset: Preset,
    steps: int,
    out: Path,
    *,
    save_every: int = 1000,
    keep_checkpoints: int = 3,
    seed: int = 0,
    lr: float | None = None,
    device: str | None = None,
    show_progress: bool = True,
    on_checkpoint=None,
) -> Path:
    """Train to `steps` total steps, resuming from `out`'s last checkpoint if there is one. The
    schedule's peak learning rate is `lr`, if given, else the preset's.

    `on_checkpoint(path)` is called after each checkpoint is written. Returns the directory of the
    final policy (`checkpoints/last/pretrained_model`).
    """
    dataset = open_dataset(dataset_root)
    run = {"dataset": str(Path(dataset_root).resolve()), "preset": preset.name, "steps": steps, "seed": seed}
    resume_from = last_checkpoint(out)
    if resume_from is not None:
        previous = json.loads((resume_from / RUN_FILE).read_text())
        if (previous["dataset"], previous["preset"]) != (run["dataset"], run["preset"]):
            raise ValueError(
                f"{out} holds a run on {previous['dataset']} with preset {previous['preset']}; "
                "use another --out for a different dataset or preset"
            )
        loaded = load_policy(resume_from / PRETRAINED_MODEL_DIR, device)  # the EMA's weights, if any
        state = TrainState.create(loaded, steps, lr=lr, ema_power=preset.ema_power)
        step, state.optimizer, state.scheduler = load_training_state(resume_from, state.optimizer, state.scheduler)
        state.seek(step)
        if state.ema is not None:
            raw = load_file(resume_from / TRAINING_STATE_DIR / RAW_WEIGHTS_FILE, device=str(loaded.device))
            loaded.policy.load_state_dict(raw, strict=True)
        log.info("resuming from step %d (%s)", state.step, resume_from)
    else:
        torch.manual_seed(seed)
        state = TrainState.create(new_policy(preset, dataset, device), steps, lr=lr, ema_power=preset.ema_power)
    frames = InMemoryFrames(dataset, state.loaded.policy.config)
    try:
        note_use(dataset_root, f"train {Path(out).resolve()}", training_episodes(dataset), from_step=state.step)
    except OSError as error:  # a dataset on a read-only disk still trains
        log.warning("the episodes used are not noted in %s's training log: %s", dataset_root, error)
    generator = torch.Generator().manual_seed(seed + state.step)
    with Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeRemainingColumn(),
        disable=not show_progress,
    ) as progress:
        task = progress.add_task("train", total=steps, completed=state.step, loss=float("nan"))
        while state.step < steps:
            chunk = min(save_every - state.step % save_every, steps - state.step)
            state.train_steps(
                frames,
                chunk,
                preset.batch_size,
                generator,
                progress=lambda loss: progress.update(task, advance=1, loss=loss),
            )
            saved = save_checkpoint(out, state, run, keep=keep_checkpoints)
            if on_checkpoint is not None:
                on_checkpoint(saved)
    if last_checkpoint(out) is None:  # steps == 0
        save_checkpoint(out, state, run, keep=keep_checkpoints)
    return last_checkpoint(out) / PRETRAINED_MODEL_DIR
