"""Actor-critic networks: Nature CNN for image observations, MLP for vector observations.

Both follow CleanRL (orthogonal init, gain sqrt(2) on hidden layers, 0.01 on the policy head,
1.0 on the value head, zero biases). ``forward(obs) -> (logits, value)``; sampling lives in
:func:`act` so the update path and the acting path share one network call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastppo.envs import EnvInfo


def layer_init(layer: nn.Module, std: float = math.sqrt(2), bias_const: float = 0.0) -> nn.Module:
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


class NatureCNN(nn.Module):
    """Mnih et al. 2015 torso shared by actor and critic; uint8 frames are scaled here."""

    def __init__(self, obs_shape: tuple[int, ...], num_actions: int):
        super().__init__()
        c, h, w = obs_shape
        self.network = nn.Sequential(
            layer_init(nn.Conv2d(c, 32, 8, stride=4)),
            nn.ReLU(),
            layer_init(nn.Conv2d(32, 64, 4, stride=2)),
            nn.ReLU(),
            layer_init(nn.Conv2d(64, 64, 3, stride=1)),
            nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            n_flat = self.network(torch.zeros(1, c, h, w)).shape[1]  # 3136 for 4x84x84
        self.network.append(layer_init(nn.Linear(n_flat, 512)))
        self.network.append(nn.ReLU())
        self.actor = layer_init(nn.Linear(512, num_actions), std=0.01)
        self.critic = layer_init(nn.Linear(512, 1), std=1.0)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """obs (B, C, H, W) uint8 -> logits (B, A), value (B,)."""
        hidden = self.network(obs.float() / 255.0)
        return self.actor(hidden), self.critic(hidden).squeeze(-1)


class MLP(nn.Module):
    """CleanRL ppo.py: separate 64-64 tanh actor and critic."""

    def __init__(self, obs_shape: tuple[int, ...], num_actions: int, hidden: int = 64):
        super().__init__()
        n_in = math.prod(obs_shape)

        def torso() -> list[nn.Module]:
            return [
                nn.Flatten(),
                layer_init(nn.Linear(n_in, hidden)),
                nn.Tanh(),
                layer_init(nn.Linear(hidden, hidden)),
                nn.Tanh(),
            ]

        self.critic = nn.Sequential(*torso(), layer_init(nn.Linear(hidden, 1), std=1.0))
        self.actor = nn.Sequential(*torso(), layer_init(nn.Linear(hidden, num_actions), std=0.01))

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """obs (B, *obs_shape) -> logits (B, A), value (B,)."""
        obs = obs.float()
        return self.actor(obs), self.critic(obs).squeeze(-1)


def make_policy(info: EnvInfo) -> nn.Module:
    """Nature CNN for (C, H, W) image observations, MLP otherwise."""
    if len(info.obs_shape) == 3:
        return NatureCNN(info.obs_shape, info.num_actions)
    return MLP(info.obs_shape, info.num_actions)


def act(
    policy: nn.Module, obs: torch.Tensor, generator: torch.Generator | None = None,
    uniform: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample actions for a batch of observations, without gradients.

    Gumbel-max sampling: argmax(logits + Gumbel noise) is an exact sample of softmax(logits) in two
    elementwise kernels and one reduction, with no host sync. The noise comes from `uniform` (B, A)
    in [0, 1) when given (a CUDA graph's static input), else from torch.rand with `generator`.

    Returns action (B,) int64, log-prob (B,), value (B,), logits (B, A).
    """
    with torch.no_grad():
        logits, value = policy(obs)
        logits = logits.float()
        u = torch.rand(logits.shape, device=logits.device, generator=generator) if uniform is None else uniform
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))
        action = (logits + gumbel).argmax(-1)
        logprob = F.log_softmax(logits, -1).gather(-1, action.unsqueeze(-1)).squeeze(-1)
    return action, logprob, value.float(), logits
