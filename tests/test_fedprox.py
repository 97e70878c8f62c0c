"""FedProx: the ClientApp adds mu/2 * ||w - w_received||^2 to the local loss (`_proximal_term`), which
keeps a robot's local training near the global weights it received; mu = 0 (FedAvg) adds nothing."""

import pytest
import torch

from agent.client_app import _proximal_term
from fedbot.policy_io import load_policy
from fedbot.training import InMemoryFrames, TrainState, open_dataset
from fedbot.transfer import weights_vector


def test_mu_zero_adds_no_penalty(untrained_policy):
    assert _proximal_term(load_policy(untrained_policy, "cpu").policy, 0.0) is None


def test_the_penalty_is_half_mu_times_the_squared_distance_to_the_received_weights(untrained_policy):
    mu = 4.0
    policy = load_policy(untrained_policy, "cpu").policy
    penalty = _proximal_term(policy, mu)
    assert penalty().item() == 0.0  # at the received weights
    received = [p.detach().clone() for p in policy.parameters()]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 1e-3)
    shifts = [p.detach() - r for p, r in zip(policy.parameters(), received, strict=True)]
    value = penalty()
    assert value.item() == pytest.approx(0.5 * mu * sum(float((s.double() ** 2).sum()) for s in shifts), rel=1e-5)
    value.backward()  # its gradient pulls every weight back: mu * (w - w_received)
    for parameter, shift in zip(policy.parameters(), shifts, strict=True):
        torch.testing.assert_close(parameter.grad, mu * shift)


def train_from_received(policy_dir, dataset_root, mu: float, steps: int = 10) -> tuple[float, float]:
    """Train the saved policy as the ClientApp does (same seeds and batches whatever mu is); returns the
    distance of the trained weights from the received ones and the mean training loss."""
    loaded = load_policy(policy_dir, "cpu")
    received = weights_vector(loaded.policy)
    state = TrainState.create(loaded, total_steps=1000, lr=1e-3)
    state.scheduler = torch.optim.lr_scheduler.LambdaLR(state.optimizer, lambda _: 1.0)  # no warmup, short test
    frames = InMemoryFrames(open_dataset(dataset_root), loaded.policy.config)
    torch.manual_seed(0)
    loss = state.train_steps(
        frames, steps, 8, torch.Generator().manual_seed(1), penalty=_proximal_term(loaded.policy, mu)
    )
    return torch.linalg.vector_norm(weights_vector(loaded.policy) - received).item(), loss


def test_the_proximal_term_keeps_local_training_near_the_received_weights(untrained_policy, small_dataset):
    free, free_loss = train_from_received(untrained_policy, small_dataset, mu=0.0)
    held, held_loss = train_from_received(untrained_policy, small_dataset, mu=1.0)
    assert free > 0.0
    assert held < 0.5 * free, (held, free)  # measured: 1.4 against 9.3 after 10 steps
    # the reported training loss is the policy's alone: the penalty (about 1 here) is left out
    assert held_loss == pytest.approx(free_loss, rel=0.2)
