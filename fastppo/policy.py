"""Actor-critic networks: Nature CNN for image observations, MLP for vector observations.

Both follow CleanRL (orthogonal init, gain sqrt(2) on hidden layers, 0.01 on the policy head,
1.0 on the value head, zero biases). ``forward(obs) -> (logits, value)``; sampling lives in
:func:`act` so the update path and the acting path share one network call. :class:`Actor` is the
acting path of the collectors: Gumbel-max sampling on the learner, or on a frozen copy of its
weights with ``--overlap``, optionally captured in a CUDA graph per batch size (``--cudagraphs``).
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
        hidden = self.network(obs.to(self.actor.weight.dtype) / 255.0)  # float32 (or the model's dtype)
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
        obs = obs.to(self.critic[1].weight.dtype)
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


class Actor:
    """Chooses actions for a batch of observations: (action, log-prob, value, logits), no gradients.

    ``policy`` is the module that acts: the learner itself (on-policy) or a frozen copy of its
    weights (``--overlap``). ``forward`` (default: policy) is the callable that evaluates it, e.g.
    :func:`learner_forward`'s bf16/compiled wrapper. With ``cudagraphs`` (CUDA only) the sampling
    step for each batch size in ``graph_batch_sizes`` is captured once in a CUDA graph and replayed
    afterwards: one launch instead of ~20. The graph reads the weights at fixed addresses, so they
    must be updated in place (``copy_weights`` or the optimizer, never by reassigning parameters).
    The graph's uniforms are a static input that each call fills before the replay, outside the
    graph, with the same ``torch.rand`` call and ``generator`` as the eager path: a graphed step
    draws exactly what the eager one would, and capturing draws nothing, so the random streams
    (and an exact resume, and the overlap thread's own generator) are the same with or without
    ``cudagraphs``.
    """

    def __init__(
        self,
        policy: nn.Module,
        forward: nn.Module | None = None,
        generator: torch.Generator | None = None,
        cudagraphs: bool = False,
        graph_batch_sizes: tuple[int, ...] = (),
    ):
        self.policy = policy
        self.forward = forward if forward is not None else policy
        self.generator = generator
        self.cudagraphs = cudagraphs
        self.graph_batch_sizes = set(graph_batch_sizes)
        self.graphs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]] = {}

    def __call__(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """obs (B, ...) -> action (B,) int64, log-prob (B,), value (B,), logits (B, A).

        Graphed outputs are static buffers, overwritten by the next call of the same batch size:
        copy them (into the rollout) before calling again, as the collectors do.
        """
        if self.cudagraphs and obs.is_cuda and obs.shape[0] in self.graph_batch_sizes:
            static_obs, static_u, graph, outputs = self.graphs.get(obs.shape[0]) or self._capture(obs)
            static_obs.copy_(obs)
            torch.rand(static_u.shape, device=static_u.device, generator=self.generator, out=static_u)
            graph.replay()
            return outputs
        return act(self.forward, obs, self.generator)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        """V(obs) (B,) float32, no gradients."""
        with torch.no_grad():
            return self.forward(obs)[1].float()

    def _capture(self, obs: torch.Tensor):
        static_obs = obs.clone()
        side = torch.cuda.Stream(obs.device)
        side.wait_stream(torch.cuda.current_stream(obs.device))
        with torch.cuda.stream(side):  # warm-up outside the capture (cuBLAS/cuDNN workspaces, compile)
            # the first draws from a throwaway generator, so that capturing leaves the real ones alone
            logits = act(self.forward, static_obs, torch.Generator(obs.device))[3]
            static_u = torch.full_like(logits, 0.5)
            for _ in range(2):
                act(self.forward, static_obs, uniform=static_u)
        torch.cuda.current_stream(obs.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = act(self.forward, static_obs, uniform=static_u)
        self.graphs[obs.shape[0]] = (static_obs, static_u, graph, outputs)
        return self.graphs[obs.shape[0]]

