"""Envs that live on the training device: the protocol, its checks, and a host view for evaluation.

A device env steps a batch of envs with tensor ops on the training device (written in torch, or a
simulator that hands back device tensors), so collection never copies through the host:
``rollout.DeviceCollector`` writes each step into the rollout's rows with torch ops, and the only host
transfers are once per rollout (the finished games' scores, the action log).

The protocol (:class:`DeviceEnv`) is Gymnasium's vector env API with torch tensors on the device:

* ``num_envs``; ``single_observation_space`` (a Box: vectors, or (C, H, W) uint8 frames; or a
  Discrete state index) and ``single_action_space`` (Discrete, or a bounded 1-D Box), Gymnasium spaces of
  one env;
* ``metadata["autoreset_mode"] = gymnasium.vector.AutoresetMode.NEXT_STEP``, declared: the step after an
  episode ends (terminated or truncated) ignores that env's action and returns reward 0, terminated =
  truncated = False and the first observation of its next episode (EnvPool's and Gymnasium's semantics;
  fastppo marks that transition invalid);
* ``reset(seed=None) -> (obs, info)``: obs (N, *obs_shape) on the device; the same seed gives the same
  envs (a resume replays the run's actions on envs reset with its seed);
* ``step(actions) -> (obs, reward, terminated, truncated, info)``: actions (N,) int64, or (N, D) float32
  clipped to the Box's bounds; reward (N,) float, terminated and truncated (N,) bool, all on the device;
  info is not read;
* optional ``render(env_id) -> (H, W, 3) uint8`` numpy frame (videos) and ``close()``.

It is made by a factory ``make(num_envs, device, **env_kwargs)`` (a class is one), which also gets
``max_episode_steps`` when ``--max-episode-steps`` is given. :class:`DeviceEnvs` checks every output's
shape, dtype and device (tensor attributes: no host sync) and is what the device collector steps;
:class:`HostView` gives it numpy in and out for ``fastppo eval``, ``--eval-every`` and ``fastppo.make_env``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from fastppo.envs import EnvError, EnvInfo, adapt_obs, space_fields
from fastppo.gymenv import ElapsedSteps, check_autoreset, first_line

# The device envs fastppo ships, by their short id (torch:<name>).
BUILTIN = {"CartPole-v1": "fastppo.envs_torch:CartPole"}
PROBE_ENVS = 2  # envs of the check made before training: more than one, so that the batch dimension shows


@runtime_checkable
class DeviceEnv(Protocol):
    """A batch of envs stepped on the training device (see the module docstring for the semantics)."""

    num_envs: int
    single_observation_space: object  # gymnasium.spaces.Box or Discrete, of one env
    single_action_space: object  # gymnasium.spaces.Discrete or a bounded 1-D Box
    metadata: dict  # {"autoreset_mode": gymnasium.vector.AutoresetMode.NEXT_STEP, "render_fps": ...}

    def reset(self, *, seed: int | None = None) -> tuple[torch.Tensor, dict]:
        """(obs (N, *obs_shape), info); seed: the envs' seed (None: go on with their random stream)."""
        ...

    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """actions (N,) or (N, D) -> obs (N, ...), reward (N,) float, terminated, truncated (N,) bool, info."""
        ...


def device_env_info(env_id: str, factory: Callable, kwargs: dict[str, object], device: object) -> EnvInfo:
    """EnvInfo of a device env: PROBE_ENVS envs made on `device`, checked (the protocol, the autoreset mode, the
    spaces, the shape, dtype and device of a reset's and a step's tensors) and closed. EnvError (one line)."""
    from fastppo.config import check_device

    device = check_device(str(device))

    def maker(num_envs: int, device: object, max_episode_steps: int | None = None) -> DeviceEnv:
        extra = {} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}
        return factory(num_envs=num_envs, device=device, **kwargs, **extra)

    try:
        env = maker(PROBE_ENVS, device)
    except Exception as e:  # whatever the user's factory raises
        raise EnvError(f"--env-id {env_id!r} cannot be made on {device}: {first_line(e)}") from None
    try:
        if not isinstance(env, DeviceEnv):
            missing = next(a for a in ("num_envs", "single_observation_space", "single_action_space", "metadata",
                                       "reset", "step") if not hasattr(env, a))
            raise EnvError(f"--env-id {env_id!r}: its factory returned a {type(env).__name__} without {missing!r}; "
                           f"a device env follows fastppo.devenv.DeviceEnv")
        if env.num_envs != PROBE_ENVS:
            raise EnvError(f"--env-id {env_id!r}: asked for {PROBE_ENVS} envs, its factory made {env.num_envs!r}")
        check_autoreset(env_id, env.metadata)
        fields = space_fields(env_id, env.single_observation_space, env.single_action_space)
        if fields.get("dict_spec"):
            raise EnvError(f"--env-id {env_id!r} observes a Dict; a device env returns one observation tensor")
        info = EnvInfo(env_id=env_id, is_atari=False, family="device", env_kwargs=tuple(sorted(kwargs.items())),
                       source="device", maker=maker, render_fps=int(env.metadata.get("render_fps") or 0), **fields)
        envs = DeviceEnvs(env, info, 0, device)
        try:
            envs.reset()
            envs.step(random_actions(info, PROBE_ENVS, device))
        except EnvError:
            raise
        except Exception as e:
            raise EnvError(f"--env-id {env_id!r} fails its first reset and step: {first_line(e)}") from None
    finally:
        close_env(env)
    return info


def random_actions(info: EnvInfo, num_envs: int, device: object, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
    """Uniformly random actions of num_envs envs on the device: (N,) int64, or (N, D) float32 in the Box."""
    if not info.continuous:
        return torch.randint(0, info.num_actions, (num_envs,), device=device, generator=generator)
    low = torch.tensor(info.action_low, dtype=torch.float32, device=device)
    high = torch.tensor(info.action_high, dtype=torch.float32, device=device)
    return low + (high - low) * torch.rand((num_envs, info.num_actions), device=device, generator=generator)


def close_env(env: object) -> None:
    """env.close() where the env has one (it is optional)."""
    if callable(getattr(env, "close", None)):
        env.close()


def _describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"a {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')} tensor on {t.device}"
    return f"a {type(t).__name__}"


class DeviceEnvs:
    """A device env as the device collector steps it: seeded on its first reset, continuous actions clipped to
    the Box's bounds, and every output checked against the protocol (its shape, dtype and device: attributes of
    the tensors, read without a host sync), one line naming what is wrong.

    ``reset() -> obs`` and ``step(actions) -> (obs, reward, terminated, truncated)``, tensors on ``device``.
    """

    def __init__(self, env: DeviceEnv, info: EnvInfo, seed: int, device: object):
        self.env = env
        self.info = info
        self.seed: int | None = seed
        self.device = torch.device(device)
        self.num_envs = n = env.num_envs
        self.obs_shape = (n, *info.obs_shape)
        if info.continuous:
            self.low = torch.tensor(info.action_low, dtype=torch.float32, device=self.device)
            self.high = torch.tensor(info.action_high, dtype=torch.float32, device=self.device)

    def _check(self, name: str, t: object, shape: tuple[int, ...], dtype_ok: Callable[[torch.dtype], bool],
               want: str) -> None:
        if not (isinstance(t, torch.Tensor) and t.device == self.device and tuple(t.shape) == shape
                and dtype_ok(t.dtype)):
            raise EnvError(f"--env-id {self.info.env_id!r} returned {name} as {_describe(t)}; fastppo needs a "
                           f"{shape} {want} tensor on {self.device}")

    def _check_obs(self, obs: object) -> None:
        if self.info.obs_classes:
            self._check("observations", obs, self.obs_shape,
                        lambda d: not d.is_floating_point and not d.is_complex and d != torch.bool, "integer")
        elif self.info.is_image:
            self._check("observations", obs, self.obs_shape, lambda d: d == torch.uint8, "uint8")
        else:
            self._check("observations", obs, self.obs_shape, lambda d: d.is_floating_point, "float")

    def reset(self) -> torch.Tensor:
        seed, self.seed = self.seed, None  # later resets go on with the envs' own random stream
        out = self.env.reset(seed=seed)
        obs = out[0] if isinstance(out, tuple) else out
        self._check_obs(obs)
        return obs

    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.info.continuous:
            actions = torch.minimum(torch.maximum(actions, self.low), self.high)
        out = self.env.step(actions)
        if not (isinstance(out, tuple) and len(out) == 5):
            raise EnvError(f"--env-id {self.info.env_id!r}: step returned {_describe(out)}; fastppo needs "
                           f"(obs, reward, terminated, truncated, info)")
        obs, reward, terminated, truncated, _ = out
        n = (self.num_envs,)
        self._check_obs(obs)
        self._check("rewards", reward, n, lambda d: d.is_floating_point, "float")
        self._check("terminated", terminated, n, lambda d: d == torch.bool, "bool")
        self._check("truncated", truncated, n, lambda d: d == torch.bool, "bool")
        return obs, reward, terminated, truncated

    def render(self, env_ids=None) -> np.ndarray:
        """Frames of env_ids (all envs when None), (k, H, W, 3) uint8, from the env's render(env_id)."""
        if not callable(getattr(self.env, "render", None)):
            raise EnvError(f"--env-id {self.info.env_id!r} does not render (it has no render(env_id) method)")
        ids = range(self.num_envs) if env_ids is None else env_ids
        return np.stack([np.asarray(self.env.render(int(i))) for i in ids])

    def close(self) -> None:
        close_env(self.env)


class HostView:
    """A device env with numpy in and out, as EnvPool's pool and Gymnasium's vector envs are: what
    ``fastppo.make_env`` returns for a device env, and what evaluation plays (a few envs, where a copy per
    step costs nothing). ``info["elapsed_step"]`` and ``info["env_id"]`` as EnvPool reports them."""

    def __init__(self, envs: DeviceEnvs):
        self.envs = envs
        self.info = envs.info
        self.num_envs = envs.num_envs
        self.elapsed = ElapsedSteps(envs.num_envs)
        self.env_ids = np.arange(envs.num_envs, dtype=np.int32)

    def reset(self, *args, **kwargs):
        obs = self.envs.reset()
        self.elapsed.reset()
        return adapt_obs(self.info, obs.cpu().numpy()), {}

    def step(self, action, env_id=None):
        action = torch.as_tensor(np.asarray(action), device=self.envs.device)
        action = action.float() if self.info.continuous else action.long()
        obs, reward, terminated, truncated = (t.cpu().numpy() for t in self.envs.step(action))
        info = {"elapsed_step": self.elapsed.step(terminated, truncated), "env_id": self.env_ids}
        return adapt_obs(self.info, obs), reward, terminated, truncated, info

    def render(self, env_ids=None) -> np.ndarray:
        return self.envs.render(env_ids)

    def close(self) -> None:
        self.envs.close()
