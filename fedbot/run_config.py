"""The federation's run configuration: defaults in pyproject `[tool.flwr.app.config]`, typed here."""

from __future__ import annotations

from dataclasses import dataclass

from fedbot.presets import PRESETS
from fedbot.transfer import WEIGHT_DTYPES
from fedbot.typed_config import ConfigError, from_mapping

STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam")
# The server learning rate each server optimizer takes when the run config says 0.
DEFAULT_SERVER_LR = {"fedavgm": 1.0, "fedadam": 0.01}
SOURCE = "pyproject.toml [tool.flwr.app.config] or --run-config"


@dataclass(frozen=True)
class RunConfig:
    """One federated run. Field names are the run-config keys with '-' for '_'."""

    num_server_rounds: int = 3
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_nodes: int = 2
    local_steps: int = 100
    batch_size: int = 0  # 0: the preset's
    lr: float = 0.0  # peak of the preset's warmup + cosine schedule, which spans the run's rounds; 0: the preset's
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    server_lr: float = 0.0  # fedavgm, fedadam; 0: DEFAULT_SERVER_LR
    server_momentum: float = 0.0  # fedavgm
    dp_noise_multiplier: float = 0.0  # > 0: differential privacy, robots clip their updates, the coordinator adds noise
    dp_clipping_norm: float = 1.0  # the L2 norm every robot's update is clipped to (with dp-noise-multiplier > 0)
    preset: str = "pusht-state"
    eval_every: int = 1
    eval_episodes: int = 10
    save_every: int = 1
    output_dir: str = "outputs"
    weights_dtype: str = "float16"
    seed: int = 0
    round_timeout: float = 600.0
    robot_wait_seconds: float = 3600.0  # a (re)started run waits this long for min-nodes robots, then goes on
    sim_data_dir: str = "data/fleet"
    signing_key: str = ""  # the coordinator's Ed25519 key for published models; "": <output-dir>/signing.key
    warm_start: bool = True  # start from the fleet's latest published model (same preset and features)
    min_new_episodes: int = 0  # train only if the robots recorded this many episodes since that model's run

    @property
    def server_learning_rate(self) -> float:
        """The server optimizer's learning rate: the run config's, or the strategy's default."""
        return self.server_lr or DEFAULT_SERVER_LR.get(self.strategy, 1.0)

    @property
    def total_steps(self) -> int:
        """Optimizer steps each robot takes over the whole run: what its learning-rate schedule spans."""
        return self.num_server_rounds * self.local_steps

    def first_step(self, server_round: int) -> int:
        """Each robot's step count when round `server_round` (from 1) starts."""
        return (server_round - 1) * self.local_steps

    @classmethod
    def from_run_config(cls, run_config: dict) -> RunConfig:
        """Parse Flower's run config; unknown keys and wrong types name the key and its source."""
        config = from_mapping(cls, dict(run_config), SOURCE)
        config.validate()
        return config

    def validate(self) -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"{SOURCE}: key {key!r} {why}")

        if self.strategy not in STRATEGIES:
            raise bad("strategy", f"must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.preset not in PRESETS:
            raise bad("preset", f"must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.weights_dtype not in WEIGHT_DTYPES:
            raise bad("weights-dtype", f"must be one of {sorted(WEIGHT_DTYPES)}, got {self.weights_dtype!r}")
        for key in ("num-server-rounds", "min-nodes", "local-steps", "eval-every", "save-every"):
            if getattr(self, key.replace("-", "_")) < 1:
                raise bad(key, "must be >= 1")
        for key in ("batch-size", "lr", "eval-episodes", "dp-noise-multiplier", "min-new-episodes"):
            if getattr(self, key.replace("-", "_")) < 0:
                raise bad(key, "must be >= 0")
        if not 0.0 < self.dp_clipping_norm <= 1e6:
            raise bad("dp-clipping-norm", "must lie in (0, 1e6]")
        for key in ("round-timeout", "robot-wait-seconds"):
            if not 0.0 < getattr(self, key.replace("-", "_")) <= 7 * 24 * 3600:
                raise bad(key, "must lie in (0, one week]")
        if not 0.0 <= self.server_lr <= 100.0:
            raise bad("server-lr", "must lie in [0, 100]")
        if not 0.0 <= self.server_momentum < 1.0:
            raise bad("server-momentum", "must lie in [0, 1)")
        if not 0.0 <= self.proximal_mu <= 100.0:
            raise bad("proximal-mu", "must lie in [0, 100]")
        for key in ("fraction-train", "fraction-evaluate"):
            if not 0.0 <= getattr(self, key.replace("-", "_")) <= 1.0:
                raise bad(key, "must lie in [0, 1]")
