"""Actor-critic networks, their action distributions, and the acting path.

Networks (CleanRL's; orthogonal init, gain sqrt(2) on hidden layers, 0.01 on the policy head, 1.0 on
the value head, zero biases). ``forward(obs) -> (dist, value)``, where ``dist`` holds the action
distribution's parameters, one row per observation:

* :class:`NatureCNN` (Atari frames, ``ppo_atari_envpool.py``) and :class:`MLP` (vector, one-hot or
  flattened-dict observations, ``ppo.py``): a categorical distribution, ``dist`` = logits (B, A).
* :class:`GaussianMLP` (Box actions, ``ppo_continuous_action.py``): a diagonal Gaussian with a
  state-independent log-std, ``dist`` = [mean, log-std] (B, 2 D).

The module-level functions :func:`log_prob`, :func:`entropy`, :func:`kl`, :func:`sample` and
:func:`greedy` work on such ``dist`` rows for either kind (``policy.dist_kind``). :func:`act` samples
a batch of actions with no host sync; :class:`Actor` is the collectors' acting path: the learner, or
a frozen copy of its weights with ``--overlap``, optionally captured in a CUDA graph per batch size
(``--cudagraphs``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastppo.envs import EnvInfo
from fastppo.kernels.reference import gaussian_entropy, gaussian_kl, gaussian_log_prob


def layer_init(layer: nn.Module, std: float = math.sqrt(2), bias_const: float = 0.0) -> nn.Module:
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


class NatureCNN(nn.Module):
    """Mnih et al. 2015 torso shared by actor and critic; uint8 frames are scaled here."""

    dist_kind = "categorical"

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

    def policy_parameters(self) -> list[nn.Parameter]:
        """What the policy's distribution depends on: the shared torso and the policy head."""
        return [*self.network.parameters(), *self.actor.parameters()]

    def value_parameters(self) -> list[nn.Parameter]:
        """What only the value depends on (the torso is the policy's: see policy_parameters)."""
        return list(self.critic.parameters())


class OneHot(nn.Module):
    """A scalar discrete observation (a state index) -> its one-hot vector, in the model's float dtype."""

    def __init__(self, classes: int):
        super().__init__()
        self.classes = classes
        self.register_buffer("like", torch.zeros(0), persistent=False)  # follows .to() / .double()

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return F.one_hot(obs.long(), self.classes).to(self.like.dtype)


def _mlp(info: EnvInfo, hidden: int, out: int, std: float) -> nn.Sequential:
    """input -> 64 tanh -> 64 tanh -> out; the input layer one-hots a state index, else flattens."""
    first, n_in = (OneHot(info.obs_classes), info.obs_classes) if info.obs_classes else (
        nn.Flatten(), math.prod(info.obs_shape))
    return nn.Sequential(first, layer_init(nn.Linear(n_in, hidden)), nn.Tanh(), layer_init(nn.Linear(hidden, hidden)),
                         nn.Tanh(), layer_init(nn.Linear(hidden, out), std=std))


def _run(mlp: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """mlp(x) (an :func:`_mlp`), the same ops without nn.Module's call on each of its six layers: a few us each,
    about 15% of acting for one env on the CPU."""
    first, hidden, _, hidden2, _, last = mlp
    x = x.flatten(1) if isinstance(first, nn.Flatten) else first(x)
    x = torch.tanh(F.linear(x, hidden.weight, hidden.bias))
    x = torch.tanh(F.linear(x, hidden2.weight, hidden2.bias))
    return F.linear(x, last.weight, last.bias)


def _input(obs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float observations in the model's dtype (float32, or float64 in tests); state indices as they are."""
    return obs.to(dtype) if obs.is_floating_point() else obs


class MLP(nn.Module):
    """CleanRL ppo.py: separate 64-64 tanh actor and critic, categorical actions."""

    dist_kind = "categorical"

    def __init__(self, info: EnvInfo, hidden: int = 64):
        super().__init__()
        self.critic = _mlp(info, hidden, 1, std=1.0)
        self.actor = _mlp(info, hidden, info.num_actions, std=0.01)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """obs (B, *obs_shape) -> logits (B, A), value (B,)."""
        obs = _input(obs, self.critic[1].weight.dtype)
        return _run(self.actor, obs), _run(self.critic, obs).squeeze(-1)

    def policy_parameters(self) -> list[nn.Parameter]:
        return list(self.actor.parameters())

    def value_parameters(self) -> list[nn.Parameter]:
        return list(self.critic.parameters())


class GaussianMLP(nn.Module):
    """CleanRL ppo_continuous_action.py: 64-64 tanh critic and actor mean, a state-independent log-std
    (initialised to 0); dist = [mean, log-std] (B, 2 D)."""

    dist_kind = "gaussian"

    def __init__(self, info: EnvInfo, hidden: int = 64):
        super().__init__()
        self.critic = _mlp(info, hidden, 1, std=1.0)
        self.actor_mean = _mlp(info, hidden, info.num_actions, std=0.01)
        self.actor_logstd = nn.Parameter(torch.zeros(1, info.num_actions))

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """obs (B, *obs_shape) -> [mean, log-std] (B, 2 D), value (B,)."""
        obs = _input(obs, self.critic[1].weight.dtype)
        mean = _run(self.actor_mean, obs)
        dist = torch.cat([mean, self.actor_logstd.expand_as(mean).to(mean.dtype)], dim=-1)
        return dist, _run(self.critic, obs).squeeze(-1)

    def policy_parameters(self) -> list[nn.Parameter]:
        return [*self.actor_mean.parameters(), self.actor_logstd]

    def value_parameters(self) -> list[nn.Parameter]:
        return list(self.critic.parameters())


def make_policy(info: EnvInfo) -> nn.Module:
    """Nature CNN for (C, H, W) frames; a Gaussian MLP for Box actions; the categorical MLP otherwise."""
    if info.is_image:  # never with Box actions (envs.env_info refuses them)
        return NatureCNN(info.obs_shape, info.num_actions)
    if info.continuous:
        return GaussianMLP(info)
    return MLP(info)


# --- action distributions, on rows of `dist` ------------------------------------------------------


def split_gaussian(dist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[mean, log-std] (..., 2 D) -> mean (..., D), log-std (..., D), as views."""
    return dist.chunk(2, dim=-1)


def log_prob(kind: str, dist: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """log pi(a|s) (B,) of actions (B,) int or (B, D) float."""
    if kind == "gaussian":
        return gaussian_log_prob(*split_gaussian(dist), actions)
    return F.log_softmax(dist, -1).gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)


def entropy(kind: str, dist: torch.Tensor) -> torch.Tensor:
    """H(pi(.|s)) (B,)."""
    if kind == "gaussian":
        return gaussian_entropy(split_gaussian(dist)[1])
    logp = F.log_softmax(dist, -1)
    return -(logp.exp() * logp).sum(-1)


def kl(kind: str, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Exact KL(pi_old(.|s) || pi_new(.|s)) (B,): a distance between the two action distributions."""
    if kind == "gaussian":
        return gaussian_kl(*split_gaussian(old), *split_gaussian(new))
    old_logp, new_logp = F.log_softmax(old, -1), F.log_softmax(new, -1)
    return (old_logp.exp() * (old_logp - new_logp)).sum(-1)


def forward_in_chunks(forward: nn.Module, obs: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """forward(obs) over a whole batch without gradients, `chunk` observations at a time (one chunk's
    activations in memory, not the batch's): the distributions (B, P) and values (B,), concatenated."""
    with torch.no_grad():
        outs = [forward(obs[i : i + chunk]) for i in range(0, obs.shape[0], chunk)]
    return torch.cat([dist for dist, _ in outs]), torch.cat([value for _, value in outs])


def noise_shape(kind: str, batch: int, dist_size: int) -> tuple[int, int]:
    """Shape of the noise one sampling step draws: Gumbel uniforms (B, A) or Gaussian normals (B, D)."""
    return (batch, dist_size // 2) if kind == "gaussian" else (batch, dist_size)


def draw_noise(kind: str, shape: tuple[int, int], device: torch.device, generator: torch.Generator | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """The noise of one sampling step: uniforms in [0, 1) (categorical) or standard normals (Gaussian)."""
    draw = torch.randn if kind == "gaussian" else torch.rand
    return draw(shape, device=device, generator=generator, out=out)


def sample(kind: str, dist: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(action, log-prob) sampled with the given noise, no host sync.

    Categorical: Gumbel-max, argmax(logits + Gumbel(u)) is an exact sample of softmax(logits) in two
    elementwise kernels and one reduction. Gaussian: mean + exp(log-std) * z; the action is the
    unclipped sample (the env adapter clips it to the action space's bounds).
    """
    if kind == "gaussian":
        mean, log_std = split_gaussian(dist)
        action = mean + log_std.exp() * noise
        return action, gaussian_log_prob(mean, log_std, action)
    gumbel = -torch.log(-torch.log(noise.clamp_min(1e-20)))
    action = (dist + gumbel).argmax(-1)
    return action, F.log_softmax(dist, -1).gather(-1, action.unsqueeze(-1)).squeeze(-1)


def greedy(kind: str, dist: torch.Tensor) -> torch.Tensor:
    """The most likely action: the argmax of the logits, or the Gaussian's mean."""
    return split_gaussian(dist)[0] if kind == "gaussian" else dist.argmax(-1)


def act(
    policy: nn.Module, obs: torch.Tensor, generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None, *, kind: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample actions for a batch of observations, without gradients and without a host sync.

    policy: the module (or a wrapper of it, then pass its `kind`). The noise comes from `noise` when
    given (a CUDA graph's static input), else it is drawn with `generator`.

    Returns action (B,) int64 or (B, D) float32, log-prob (B,), value (B,), dist (B, P) float32.
    """
    kind = kind or policy.dist_kind
    with torch.no_grad():
        dist, value = policy(obs)
        dist = dist.float()
        if noise is None:
            noise = draw_noise(kind, noise_shape(kind, dist.shape[0], dist.shape[1]), dist.device, generator)
        action, logprob = sample(kind, dist, noise)
    return action, logprob, value.float(), dist


def pack_acting(action: torch.Tensor, logprob: torch.Tensor, value: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """What acting records for each observation as one float32 row, (B, W): the action (an int64 action as
    its two 32-bit words, bit for bit; a Box action's D floats), log-prob, value, dist.

    It is the acting part of a rollout row (``rollout.RowLayout``), so a collector stores a whole acting
    step with one copy instead of four.
    """
    a = action if action.is_floating_point() else action.view(torch.float32).view(action.shape[0], -1)
    return torch.cat([a.view(action.shape[0], -1), logprob.unsqueeze(1), value.unsqueeze(1), dist], 1)


class Actor:
    """Chooses actions for a batch of observations: (action, log-prob, value, dist), no gradients.

    ``policy`` is the module that acts: the learner itself (on-policy) or a frozen copy of its
    weights (``--overlap``). ``forward`` (default: policy) is the callable that evaluates it, e.g.
    :func:`learner_forward`'s bf16/compiled wrapper. With ``cudagraphs`` (CUDA only) the sampling
    step for each batch size in ``graph_batch_sizes`` is captured once in a CUDA graph and replayed
    afterwards: one launch instead of ~20. The graph reads the weights at fixed addresses, so they
    must be updated in place (``copy_weights`` or the optimizer, never by reassigning parameters).
    The graph's noise is a static input that each call fills before the replay, outside the graph,
    with the same draw and ``generator`` as the eager path: a graphed step draws exactly what the
    eager one would, and capturing draws nothing, so the random streams (and an exact resume, and
    the overlap thread's own generator) are the same with or without ``cudagraphs``.

    The collectors call :meth:`row`, which also returns the four outputs packed into one row
    (:func:`pack_acting`, computed inside the graph when graphed).
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
        self.kind = policy.dist_kind
        self.forward = forward if forward is not None else policy
        self.generator = generator
        self.cudagraphs = cudagraphs
        self.graph_batch_sizes = set(graph_batch_sizes)
        # batch size -> (static obs, static noise, graph, (action, log-prob, value, dist, packed row))
        self.graphs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]] = {}

    def __call__(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """obs (B, ...) -> action, log-prob (B,), value (B,), dist (B, P) (see :func:`act`).

        Graphed outputs are static buffers, overwritten by the next call of the same batch size:
        copy them (into the rollout) before calling again, as the collectors do.
        """
        graphed = self._replay(obs)
        if graphed is not None:
            return graphed[:4]
        return act(self.forward, obs, self.generator, kind=self.kind)

    def row(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """obs (B, ...) -> (the acting row (B, W) float32 of :func:`pack_acting`, action); static buffers when
        graphed, as for ``__call__``."""
        graphed = self._replay(obs)
        if graphed is not None:
            return graphed[4], graphed[0]
        outputs = act(self.forward, obs, self.generator, kind=self.kind)
        return pack_acting(*outputs), outputs[0]

    def _replay(self, obs: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """The graphed step's outputs for obs, or None where this batch is not graphed."""
        if not (self.cudagraphs and obs.is_cuda and obs.shape[0] in self.graph_batch_sizes):
            return None
        static_obs, static_noise, graph, outputs = self.graphs.get(obs.shape[0]) or self._capture(obs)
        static_obs.copy_(obs)
        draw_noise(self.kind, static_noise.shape, static_noise.device, self.generator, out=static_noise)
        graph.replay()
        return outputs

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        """V(obs) (B,) float32, no gradients."""
        with torch.no_grad():
            return self.forward(obs)[1].float()

    def _capture(self, obs: torch.Tensor):
        static_obs = obs.clone(memory_format=torch.contiguous_format)  # obs may be a strided view of a rollout row
        side = torch.cuda.Stream(obs.device)
        side.wait_stream(torch.cuda.current_stream(obs.device))
        with torch.cuda.stream(side):  # warm-up outside the capture (cuBLAS/cuDNN workspaces, compile)
            # the first draws from a throwaway generator, so that capturing leaves the real ones alone
            dist = act(self.forward, static_obs, torch.Generator(obs.device), kind=self.kind)[3]
            static_noise = draw_noise(self.kind, noise_shape(self.kind, *dist.shape), obs.device,
                                      torch.Generator(obs.device))
            for _ in range(2):
                pack_acting(*act(self.forward, static_obs, noise=static_noise, kind=self.kind))
        torch.cuda.current_stream(obs.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = act(self.forward, static_obs, noise=static_noise, kind=self.kind)
            outputs = (*outputs, pack_acting(*outputs))
        self.graphs[obs.shape[0]] = (static_obs, static_noise, graph, outputs)
        return self.graphs[obs.shape[0]]
