"""Rollout storage on the training device and the collection loop that fills it.

Storage is allocated once, time-major ``[T, N, ...]``; observations keep the env's dtype (uint8
for Atari, so 4096 envs x 128 steps of 4x84x84 frames is 14.8 GB rather than 59 GB in float32).

Row t of every buffer describes one transition of each env: the observation seen, the action
chosen for it (with its log-prob, value and logits under the behaviour policy, recorded when the
action was chosen), and what the env returned. ``values`` has a row T for the bootstrap value.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import nn

from fastppo.envs import EnvInfo, EpisodeStats
from fastppo.policy import act


@dataclass
class Rollout:
    obs: torch.Tensor  # (T, N, *obs_shape), env dtype
    actions: torch.Tensor  # (T, N) int64
    logprobs: torch.Tensor  # (T, N) log pi_old(a|s)
    logits: torch.Tensor  # (T, N, A) behaviour logits, for the exact KL
    values: torch.Tensor  # (T + 1, N) V_old(s); row T bootstraps
    rewards: torch.Tensor  # (T, N) training reward (clipped for Atari)
    terminated: torch.Tensor  # (T, N) bool
    truncated: torch.Tensor  # (T, N) bool
    valid: torch.Tensor  # (T, N) bool; False on EnvPool's autoreset step
    advantages: torch.Tensor  # (T, N), filled by advantage.compute_advantages
    returns: torch.Tensor  # (T, N)
    next_obs: torch.Tensor  # (N, *obs_shape), the observation after row T - 1 (for values[T])

    @classmethod
    def allocate(cls, info: EnvInfo, num_steps: int, num_envs: int, device: torch.device) -> Rollout:
        T, N = num_steps, num_envs
        obs_dtype = torch.from_numpy(np.zeros(0, dtype=info.obs_dtype)).dtype

        def f32(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.float32, device=device)

        def flag() -> torch.Tensor:
            return torch.zeros((T, N), dtype=torch.bool, device=device)

        return cls(
            obs=torch.zeros((T, N, *info.obs_shape), dtype=obs_dtype, device=device),
            actions=torch.zeros((T, N), dtype=torch.int64, device=device),
            logprobs=f32(T, N),
            logits=f32(T, N, info.num_actions),
            values=f32(T + 1, N),
            rewards=f32(T, N),
            terminated=flag(),
            truncated=flag(),
            valid=flag(),
            advantages=f32(T, N),
            returns=f32(T, N),
            next_obs=torch.zeros((N, *info.obs_shape), dtype=obs_dtype, device=device),
        )

    @property
    def num_steps(self) -> int:
        return self.obs.shape[0]

    def nbytes(self) -> int:
        return sum(getattr(self, f.name).nbytes for f in fields(self))


class Collector:
    """Steps a synchronous EnvPool pool and writes each step into a Rollout.

    Carries what must survive from one rollout to the next: the current observation (on the
    device) and whether each env's next step is EnvPool's reset step.

    ``action_log`` holds every action sent to the envs since their reset, one host array (T, N) per
    rollout (uint8 when the action space allows): EnvPool cannot save an env's state, so a resumed run
    rebuilds it by re-creating the envs with the same seed and replaying these actions (:meth:`replay`).
    """

    def __init__(self, envs, info: EnvInfo, device: torch.device, generator: torch.Generator | None = None):
        self.envs = envs
        self.info = info
        self.device = device
        self.generator = generator
        obs, _ = envs.reset()
        self.num_envs = len(obs)
        self.stats = EpisodeStats(self.num_envs, info.is_atari)
        self.next_obs = torch.from_numpy(obs).to(device)
        self.next_is_reset = torch.zeros(self.num_envs, dtype=torch.bool, device=device)
        self.action_dtype = np.uint8 if info.num_actions <= 256 else np.int32
        self.action_log: list[np.ndarray] = []

    def replay(self, actions: np.ndarray) -> None:
        """Step the freshly reset envs with actions (S, N), as collect() did, without a policy.

        Leaves the envs, the next observation, the reset flags and the running full-game scores as
        they were after those S steps; games that ended during the replay were reported then, and are
        dropped here.
        """
        obs = done = None
        for row in actions:
            obs, reward, terminated, truncated, info = self.envs.step(row.astype(np.int64))
            self.stats.update(reward, terminated, truncated, info)
            done = terminated | truncated
        if obs is not None:
            self.next_obs = torch.from_numpy(obs).to(self.device)
            self.next_is_reset = torch.from_numpy(done).to(self.device)
        self.stats.pop()
        self.action_log = [np.ascontiguousarray(actions, dtype=self.action_dtype)]

    def collect(self, policy: nn.Module, buf: Rollout) -> None:
        """Fill buf with num_steps steps of every env, acting with policy."""
        sent = np.empty((buf.num_steps, self.num_envs), dtype=self.action_dtype)
        self.action_log.append(sent)
        for t in range(buf.num_steps):
            buf.obs[t] = self.next_obs
            buf.valid[t] = ~self.next_is_reset
            action, logprob, value, logits = act(policy, self.next_obs, self.generator)
            buf.actions[t] = action
            buf.logprobs[t] = logprob
            buf.values[t] = value
            buf.logits[t] = logits
            # Host-device sync, deliberate: EnvPool needs the actions on the host.
            host_action = action.cpu().numpy()
            sent[t] = host_action
            obs, reward, terminated, truncated, info = self.envs.step(host_action)
            self.stats.update(reward, terminated, truncated, info)
            buf.rewards[t] = torch.from_numpy(reward).to(self.device)
            term = torch.from_numpy(terminated).to(self.device)
            trunc = torch.from_numpy(truncated).to(self.device)
            buf.terminated[t] = term
            buf.truncated[t] = trunc
            self.next_is_reset = term | trunc
            self.next_obs = torch.from_numpy(obs).to(self.device)
        buf.next_obs.copy_(self.next_obs)
        with torch.no_grad():
            buf.values[buf.num_steps] = policy(self.next_obs)[1].float()
