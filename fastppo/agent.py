"""Use a trained policy from Python: load a run, act on the env's observations, make the env it trained on.

    import fastppo
    agent = fastppo.load("runs/HalfCheetah-v4__fastppo__1__1764000000")   # or a checkpoint file
    env = fastppo.make_env(agent)                                        # EnvPool, full games
    obs, _ = env.reset()
    action = agent.act(obs)                                               # numpy, ready for env.step

:class:`Agent` applies everything the run did between the env and the network: a dict observation
flattened, a state index one-hot (in the network), the run's observation normalisation with its
statistics frozen as they were saved, and for continuous actions the clip to the action space's
bounds. ``fastppo eval`` plays its games through the same object, so the API and ``fastppo eval``
give the same scores for the same seed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch import nn

from fastppo.envs import INT32_MAX, EnvInfo, adapt_obs, make_envs
from fastppo.normalize import ObsNormalizer, ValueNormalizer
from fastppo.policy import act, greedy


class Agent:
    """A trained policy, ready to act on batches of the env's observations.

    ``policy`` is the actor-critic network, ``info`` its env, ``obs_norm`` the run's observation
    normaliser (None without --norm-obs), ``value_norm`` its value normaliser (None without
    --norm-value) and ``config`` the run's resolved config (a dict, as in config.json). Sampling draws
    from the agent's own generator, seeded with `seed`.
    """

    def __init__(self, policy: nn.Module, info: EnvInfo, config: dict, obs_norm: ObsNormalizer | None = None,
                 seed: int = 0, checkpoint: str | None = None, global_step: int | None = None,
                 value_norm: ValueNormalizer | None = None):
        self.policy = policy
        self.info = info
        self.config = config
        self.obs_norm = obs_norm
        self.value_norm = value_norm
        self.checkpoint = checkpoint  # the file it was loaded from, and the agent steps it was trained for
        self.global_step = global_step
        self.device = next(policy.parameters()).device
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self._low = torch.tensor(info.action_low, device=self.device) if info.continuous else None
        self._high = torch.tensor(info.action_high, device=self.device) if info.continuous else None

    def observe(self, obs) -> torch.Tensor:
        """The env's observations (numpy batch, a dict of them, or a tensor in the policy's layout) as the
        network's input: adapted, on the device, normalised with the run's frozen statistics."""
        if not isinstance(obs, torch.Tensor):
            obs = torch.from_numpy(np.ascontiguousarray(adapt_obs(self.info, obs)))
        obs = obs.to(self.device)
        return self.obs_norm.normalize(obs) if self.obs_norm is not None else obs

    @torch.no_grad()
    def act(self, obs, deterministic: bool = False) -> np.ndarray:
        """Actions for a batch of observations, as the env takes them: (B,) ints, or (B, D) floats clipped
        to the action space's bounds. deterministic: the most likely action (the argmax, or the
        Gaussian's mean) instead of a sample."""
        if deterministic:
            action = greedy(self.policy.dist_kind, self.policy(self.observe(obs))[0].float())
        else:
            action = act(self.policy, self.observe(obs), self.generator)[0]  # the training loop's sampling
        if self.info.continuous:
            action = torch.minimum(torch.maximum(action, self._low), self._high)
            return action.cpu().numpy().astype(self.info.action_dtype)
        return action.cpu().numpy()

    @torch.no_grad()
    def value(self, obs) -> np.ndarray:
        """V(s) of a batch of observations, float32 (B,), in the units of the rewards the critic learned
        from (scaled with --norm-reward); with --norm-value the network's normalised value, de-normalised."""
        value = self.policy(self.observe(obs))[1].float()
        if self.value_norm is not None:
            value = self.value_norm.denormalize(value)
        return value.cpu().numpy()


def load(path: str | os.PathLike, device: Literal["auto", "cpu", "cuda"] | str = "auto", seed: int = 0,
         env: Callable | None = None) -> Agent:
    """An Agent from a run folder (its newest checkpoint) or a checkpoint file, on `device`.

    env: the factory a run trained on with ``fastppo.train(cfg, env=...)``, where its config.json names it
    ``python:<name>`` (one that imports by name is made from its id without it).
    Raises CheckpointError (a missing, damaged or non-finite checkpoint, or one of another run than its
    folder's), ConfigError (a device this machine does not have, a seed that is not an int) or EnvError
    (the env cannot be made with the run's options), each one line.
    """
    from fastppo.checkpoint import CheckpointError, check_belongs, load_checkpoint, run_folder
    from fastppo.config import check_device, read_config
    from fastppo.policy import make_policy

    torch_device = check_device(device, "device")
    check_seed(seed)
    state = load_checkpoint(os.fspath(path))  # refuses non-finite weights and statistics
    run = run_folder(state["path"])
    if os.path.isfile(os.path.join(run, "config.json")):  # a checkpoint in a run folder is that run's, best.pt too
        check_belongs(state, read_config(run), os.path.join(run, "config.json"))
    config = state["config"]
    info = _info(config, env, torch_device)
    policy = make_policy(info).to(torch_device)
    try:
        policy.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{state['path']!r} does not fit a {info.env_id} policy: "
                              f"{str(e).strip().splitlines()[0]}") from None
    saved = state.get("normalizer", {})
    obs_norm = ObsNormalizer(info.obs_shape, torch_device) if saved.get("obs") is not None else None
    value_norm = ValueNormalizer(torch_device) if config.get("norm_value") else None
    for name, what, norm in (("obs", "observation", obs_norm), ("value", "value", value_norm)):
        if norm is None:
            continue
        try:
            norm.rms.load_state_dict(saved[name])
        except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{state['path']!r} is damaged: its {what} statistics do not load ({e})") from None
    return Agent(policy.eval(), info, config, obs_norm, seed=seed, checkpoint=state["path"],
                 global_step=state["global_step"], value_norm=value_norm)


def make_env(run: Agent | str | os.PathLike, num_envs: int = 1, seed: int = 0, *, video: bool = False,
             env: Callable | None = None):
    """The EnvPool env a run trained on, for playing full games: the run's env id, options, time limit
    and sticky actions; Atari without episodic life and with raw (unclipped) rewards, so a game's
    summed rewards are its score. Observations and actions pass through the same adapter as in
    training (dict observations flattened, continuous actions clipped). video: frames from
    ``env.render(env_ids=[i])`` (where EnvPool renders the env). ConfigError (one line) for a num_envs
    outside [1, 2^31) or a seed that is not an int.

    A run on your own env gets the same API: a Gymnasium vector env behind ``gymenv.GymAdapter``, or a device
    env (made on the agent's device, else the CPU) with numpy in and out (``devenv.HostView``). env: the run's
    factory, as for :func:`load` (an Agent already holds it)."""
    from fastppo.config import ConfigError

    if isinstance(num_envs, bool) or not isinstance(num_envs, int) or not 0 < num_envs <= INT32_MAX:
        raise ConfigError(f"num_envs must be an int in [1, 2^31), got {num_envs!r}")
    check_seed(seed)
    agent = run if isinstance(run, Agent) else None
    config = agent.config if agent is not None else _run_config(os.fspath(run))
    info = agent.info if agent is not None else _info(config, env)
    device = agent.device if agent is not None else "cpu"
    envs = make_envs(info, num_envs, seed, max_episode_steps=config.get("max_episode_steps"),
                     repeat_action_probability=config.get("repeat_action_probability", 0.0), episodic_life=False,
                     reward_clip=False, render_mode="rgb_array" if video else None, device=device)
    if info.source == "device":
        from fastppo.devenv import HostView

        return HostView(envs)
    return envs


def check_seed(seed) -> None:
    """ConfigError unless seed is an int that torch's generators and EnvPool take (it is taken modulo 2^31 for
    the envs)."""
    from fastppo.config import ConfigError

    if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**63:
        raise ConfigError(f"seed must be an int in [-2^63, 2^63), got {seed!r}")


def _run_config(path: str) -> dict:
    from fastppo.checkpoint import load_checkpoint

    return load_checkpoint(path)["config"]


def _info(config: dict, env: Callable | None = None, device: object = "cpu") -> EnvInfo:
    """The run's env; with env (its factory), checked to be the one the run names."""
    from fastppo.envs import env_info
    from fastppo.gymenv import check_same_env

    if env is not None:
        check_same_env(env, config["env_id"])
    return env_info(config["env_id"], tuple(config.get("env_kwargs") or ()), env=env, device=device)
