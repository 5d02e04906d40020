"""Environments: validation of the env id, construction, and full-game score accounting.

EnvPool's envs are made here. An env id with a colon is the user's own env (``fastppo.gymenv``): a
Gymnasium vector env (``gym:<id>``) or an env that lives on the training device (``torch:<name>``,
``fastppo.devenv``); :func:`env_info` and :func:`make_envs` dispatch to them, and everything after
(the collectors, evaluation, resume) sees one kind of env.

EnvPool semantics that the rest of fastppo relies on (checked in tests/test_envs.py):

* Autoreset: the step *after* an episode ends ignores its action, returns reward 0, terminated =
  truncated = False and the first observation of the next episode. fastppo marks that transition
  invalid (``rollout.Rollout.valid``) so it trains neither the policy nor the value.
* Because of that, the final observation of an episode is the next row's observation: a truncated
  step bootstraps from ``values[t + 1]`` with no special handling (see ``kernels.reference.gae``).
* Atari with ``episodic_life``: a life loss returns terminated = True (a terminal state for
  learning) but the game goes on; ``info["terminated"]`` is 1 only on the real game over, and
  ``info["reward"]`` is the raw, unclipped reward.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


class EnvError(ValueError):
    """A bad env id or unsupported env; a one-line message for the CLI."""


# Keys of a dict observation that are not numeric features: MiniGrid's mission string, as bytes.
TEXT_KEYS = ("mission",)


@dataclass(frozen=True)
class EnvInfo:
    """What fastppo needs to know of an env, from EnvPool's spec (no env is created), or from the spaces of
    one env of the user's own (``source`` "gym" or "device"; ``maker`` makes them, see ``fastppo.gymenv``).

    Observations, as the policy sees them (after :class:`EnvAdapter`): ``obs_shape`` / ``obs_dtype``
    per env; ``obs_classes`` > 0 for a scalar discrete observation (Taxi, FrozenLake: the state index,
    one-hot in the network); a dict observation arrives flattened to one float32 vector
    (``dict_spec``). Actions: ``num_actions`` is the size of the policy's action head: the number of
    actions of a Discrete space, or the dimensions of a Box space (``continuous``, with its bounds).
    """

    env_id: str
    obs_shape: tuple[int, ...]
    obs_dtype: np.dtype
    num_actions: int
    is_atari: bool
    continuous: bool = False
    action_low: tuple[float, ...] = ()
    action_high: tuple[float, ...] = ()
    action_dtype: np.dtype = np.dtype(np.int64)
    obs_classes: int = 0
    dict_spec: tuple[tuple[str, int], ...] = ()  # (key, n): n > 0 one-hot of a Discrete key, 0 a Box key
    family: str = ""  # EnvPool's family: atari, classic_control, mujoco, box2d, toy_text, minigrid, ...
    env_kwargs: tuple[tuple[str, object], ...] = ()  # options passed to EnvPool (or the user's env) as they are
    source: str = "envpool"  # envpool, gym (a Gymnasium vector env) or device (fastppo.devenv.DeviceEnv)
    # gym: maker(num_envs, render_mode, max_episode_steps) -> a Gymnasium vector env; device: maker(num_envs,
    # device, max_episode_steps) -> a DeviceEnv. Not part of the env's identity (compare=False).
    maker: Callable | None = field(default=None, compare=False, repr=False)
    render_fps: int = 0  # frames per second of the env's own renderer (0: unknown)

    @property
    def obs_bytes(self) -> int:
        """Bytes of one env's observation."""
        return int(np.prod(self.obs_shape, dtype=np.int64)) * np.dtype(self.obs_dtype).itemsize

    @property
    def is_image(self) -> bool:
        """(C, H, W) uint8 frames: the Nature CNN's input."""
        return len(self.obs_shape) == 3 and self.obs_dtype == np.uint8

    @property
    def dist_size(self) -> int:
        """Width of the behaviour distribution's parameters kept per step: logits (A), or mean and
        log-std (2 D) of a diagonal Gaussian."""
        return 2 * self.num_actions if self.continuous else self.num_actions

    @property
    def action_shape(self) -> tuple[int, ...]:
        """One env's action: () for a discrete action, (D,) for a continuous one."""
        return (self.num_actions,) if self.continuous else ()


def _envpool():
    import envpool

    return envpool


@functools.cache
def expose_egl() -> str | None:
    """Load an EGL library once more with RTLD_GLOBAL, once per process, for EnvPool's MuJoCo renderer;
    the library loaded, or None when none loads.

    EnvPool renders MuJoCo in an EGL context made through the libEGL its wheel bundles, whatever
    MUJOCO_GL says, but MuJoCo looks its GL functions up among the process's global symbols, where a
    Python extension's libraries are not (they load RTLD_LOCAL). Without this every render fails with
    "an OpenGL platform library has not been loaded into this process" and EnvPool aborts the process.
    EnvPool's own libEGL comes first (the one its context is made in), else the system's libEGL.so.1.
    Whether a working EGL driver stands behind it shows only when a frame is rendered.
    """
    import ctypes
    import glob

    libs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(_envpool().__file__))), "envpool.libs")
    for name in (*sorted(glob.glob(os.path.join(libs, "libEGL*.so*"))), "libEGL.so.1"):
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        return name
    return None


@contextlib.contextmanager
def _quiet_spaces():
    """EnvPool builds gymnasium Boxes from float64 bounds; gymnasium warns on every one of them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*precision lowered by casting.*")
        yield


# EnvPool options that fastppo sets itself (or that have their own flag): not allowed in --env-kwargs.
OWN_OPTIONS = {
    "num_envs": "--num-envs", "batch_size": "--env-batch-size", "num_threads": "--env-threads", "seed": "--seed",
    "max_episode_steps": "--max-episode-steps", "repeat_action_probability": "--repeat-action-probability",
    "env_type": None, "render_mode": None, "base_path": None, "env_seed": None, "max_num_players": None,
    "thread_affinity_offset": None, "gym_reset_return_info": None, "episodic_life": None, "reward_clip": None,
}


# The real ranges of the Atari options fastppo sets (EnvPool's atari_env.h), and why: outside them the
# emulator crashes or never moves, or the network breaks. Their upper bound is a C++ int's. (mode and
# difficulty are checked by EnvPool itself, with an exception; the other options are bools.)
ATARI_MINIMUMS = {
    "stack_num": (1, "frames per observation: 0 leaves none for the network, fewer crash EnvPool"),
    "frame_skip": (1, "emulator frames per step: below 1 the game never moves"),
    "noop_max": (1, "EnvPool draws the no-op count from [0, noop_max - 1]: below 1 that range is empty and it "
                    "crashes"),
    "img_height": (1, "a frame's height: below 1 the resize aborts"),
    "img_width": (1, "a frame's width: below 1 the resize aborts"),
}
ATARI_CHECKED = set(ATARI_MINIMUMS) | {"task", "mode", "difficulty", "zero_discount_on_life_loss", "use_fire_reset",
                                      "full_action_space", "use_inter_area_resize", "gray_scale"}
INT32_MAX = 2**31 - 1  # EnvPool's (C++) ints: seeds, sizes, counts


def check_env_options(env_id: str, family: str, kwargs: tuple[tuple[str, object], ...],
                      fields: dict[str, object]) -> None:
    """EnvError (one line) for an --env-kwargs value outside its real range, before EnvPool sees it: some
    values crash the process (a segfault, an abort, the emulator's exit(1) on a missing ROM) where no
    exception could be caught.

    Atari's options have known ranges (ATARI_MINIMUMS, the ROMs for task). Any other option is tried
    first in a child process (EnvPool makes the env, resets and steps it): a crash there is a one-line
    EnvError here.
    """
    options = dict(kwargs)
    if family == "atari":
        for key, (low, why) in ATARI_MINIMUMS.items():
            if key in options and not low <= options[key] <= INT32_MAX:
                raise EnvError(f"--env-kwargs {key}={options[key]} must be in [{low}, 2^31): {why}")
        if "task" in options:
            import os

            roms = os.path.join(str(fields["base_path"]), "atari", "roms")
            tasks = sorted(f[:-4] for f in os.listdir(roms) if f.endswith(".bin")) if os.path.isdir(roms) else []
            if options["task"] not in tasks:
                close = difflib.get_close_matches(str(options["task"]), tasks, n=3)
                raise EnvError(f"--env-kwargs task={options['task']!r}: EnvPool has no such Atari ROM"
                               + (f"; close names: {', '.join(close)}" if close else ""))
        if set(options) <= ATARI_CHECKED:
            return
    if options:
        _probe(env_id, options)


# Makes the env, resets it and steps it with random actions: what fastppo's start does with it.
_PROBE = """
import json, sys, warnings
warnings.filterwarnings("ignore")
import envpool
env_id, kwargs = sys.argv[1], json.loads(sys.argv[2])
envs = envpool.make(env_id, env_type="gymnasium", num_envs=1, **kwargs)
envs.reset()
for _ in range(4):
    envs.step(envs.action_space.sample()[None])
envs.close()
"""


def _probe(env_id: str, options: dict[str, object]) -> None:
    """EnvError naming the options when EnvPool cannot make, reset and step env_id with them in a child process
    (one second or so: the child imports EnvPool)."""
    import signal
    import subprocess
    import sys

    shown = " ".join(f"{k}={v}" for k, v in options.items())
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE, env_id, json.dumps(options)], capture_output=True,
                              text=True, timeout=300)
    except subprocess.TimeoutExpired:
        raise EnvError(f"EnvPool did not make and step {env_id} with --env-kwargs {shown} within 300 s") from None
    if proc.returncode != 0:
        if proc.returncode < 0:
            why = f"it crashed ({signal.Signals(-proc.returncode).name})"
        else:
            lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
            why = lines[-1][:300] if lines else f"exit code {proc.returncode}"
        raise EnvError(f"EnvPool cannot make {env_id} with --env-kwargs {shown}: {why}")


def parse_env_kwargs(env_id: str, items: tuple[str, ...], fields: dict[str, object]) -> tuple[tuple[str, object], ...]:
    """--env-kwargs key=value ... -> ((key, value), ...), each value of the option's own type.

    fields: the env's EnvPool options and their defaults (make_spec(env_id).config). Raises EnvError
    (one line) for a malformed item, an unknown or reserved key, or a value of the wrong type.
    """
    out = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise EnvError(f"--env-kwargs {item!r}: expected key=value")
        if key in OWN_OPTIONS:
            own = OWN_OPTIONS[key]
            raise EnvError(f"--env-kwargs {key}: set by fastppo" + (f"; use {own}" if own else ""))
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=3, cutoff=0.5)
            hint = f"; close names: {', '.join(close)}" if close else f"; {env_id}'s options: {', '.join(fields)}"
            raise EnvError(f"--env-kwargs {key}: {env_id} has no such option{hint}")
        default = fields[key]
        try:
            if isinstance(default, bool):
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                value: object = text.lower() in ("true", "1")
            elif isinstance(default, int):
                value = int(text)
            elif isinstance(default, float):
                value = float(text)
            elif isinstance(default, str):
                value = text
            else:
                value = json.loads(text)
        except ValueError:
            raise EnvError(f"--env-kwargs {key}={text!r}: expected a {type(default).__name__} like "
                           f"its default {default!r}") from None
        out[key] = value
    return tuple(sorted(out.items()))


def env_family(env_id: str) -> str:
    """EnvPool's family of the env: atari, classic_control, mujoco, box2d, toy_text, minigrid, ..."""
    from envpool.registration import registry

    module = registry.specs[env_id][0]  # e.g. "envpool.mujoco.gym"
    return module.split(".")[1] if module.count(".") else module


def env_info(env_id: str, env_kwargs: tuple[str, ...] = (), *, env: Callable | None = None,
             device: object = "cpu") -> EnvInfo:
    """Look the env up in EnvPool's registry without creating any environment.

    env_kwargs: --env-kwargs items (key=value), EnvPool options passed through (they may change the
    spaces, e.g. VizDoom's use_combined_action). Raises EnvError (one line) for an unknown id (with
    close names), a bad option, or a space fastppo does not train on.

    An id with a colon (``gym:...``, ``torch:...``) or an ``env`` factory (``fastppo.train(cfg, env=...)``) is
    the user's own env: ``fastppo.gymenv.own_env_info`` makes one and checks it (a device env on `device`).
    """
    if env is not None or ":" in env_id:
        from fastppo.gymenv import own_env_info

        return own_env_info(env_id, env_kwargs, env, device)
    envpool = _envpool()
    known = envpool.list_all_envs()
    if env_id not in known:
        close = difflib.get_close_matches(env_id, known, n=4, cutoff=0.6)
        hint = f"; close names: {', '.join(close)}" if close else "; see envpool.list_all_envs()"
        raise EnvError(f"unknown --env-id {env_id!r}{hint}")
    family = env_family(env_id)
    try:
        with _quiet_spaces():  # the spaces are built lazily, on first access
            fields = envpool.make_spec(env_id).config._asdict()
            kwargs = parse_env_kwargs(env_id, env_kwargs, fields)
            check_env_options(env_id, family, kwargs, fields)
            spec = envpool.make_spec(env_id, **dict(kwargs))
            space, obs_space = spec.action_space, spec.observation_space
    except EnvError:
        raise
    except Exception as e:  # EnvPool's own checks (a missing scenario file, an option out of range, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EnvError(f"EnvPool cannot make {env_id} with these options: {first[:300]}") from None
    info = dict(env_id=env_id, is_atari="episodic_life" in spec.config._fields, family=family, env_kwargs=kwargs)
    return EnvInfo(**info, **space_fields(env_id, obs_space, space))


def space_fields(env_id: str, obs_space, space) -> dict:
    """EnvInfo's observation and action fields for one env's Gymnasium spaces (EnvPool's, a Gymnasium env's or a
    device env's). Raises EnvError (one line) for a space fastppo does not train on."""
    import gymnasium

    info: dict = {}
    if isinstance(space, gymnasium.spaces.Discrete):
        if int(space.start) != 0:
            raise EnvError(f"--env-id {env_id!r} has a {space} action space; fastppo's actions start at 0")
        info.update(num_actions=int(space.n))
    elif isinstance(space, gymnasium.spaces.Box) and len(space.shape) == 1:
        low, high = np.broadcast_to(space.low, space.shape), np.broadcast_to(space.high, space.shape)
        if not (np.isfinite(low).all() and np.isfinite(high).all()):
            raise EnvError(f"--env-id {env_id!r} has an unbounded Box action space; fastppo clips actions to "
                           f"finite bounds")
        info.update(num_actions=int(space.shape[0]), continuous=True, action_low=tuple(map(float, low)),
                    action_high=tuple(map(float, high)), action_dtype=np.dtype(space.dtype))
    else:
        raise EnvError(f"--env-id {env_id!r} has a {space} action space; fastppo trains on Discrete and "
                       f"1-D Box actions")
    if isinstance(obs_space, gymnasium.spaces.Discrete):
        if int(obs_space.start) != 0:
            raise EnvError(f"--env-id {env_id!r} observes a {obs_space}; fastppo one-hots state indices from 0")
        info.update(obs_shape=(), obs_dtype=np.dtype(np.int64), obs_classes=int(obs_space.n))
    elif isinstance(obs_space, gymnasium.spaces.Dict):
        dict_spec, size = [], 0
        for key, sub in obs_space.spaces.items():
            if key in TEXT_KEYS:
                continue
            if isinstance(sub, gymnasium.spaces.Discrete):
                dict_spec.append((key, int(sub.n)))
                size += int(sub.n)
            elif isinstance(sub, gymnasium.spaces.Box):
                dict_spec.append((key, 0))
                size += int(np.prod(sub.shape))
            else:
                raise EnvError(f"--env-id {env_id!r}: its observation key {key!r} is a {sub}; fastppo flattens "
                               f"Box and Discrete keys only")
        info.update(obs_shape=(size,), obs_dtype=np.dtype(np.float32), dict_spec=tuple(dict_spec))
    elif isinstance(obs_space, gymnasium.spaces.Box):
        shape, dtype = tuple(obs_space.shape), np.dtype(obs_space.dtype)
        if 0 in shape:
            raise EnvError(f"--env-id {env_id!r} with these options observes {shape}: an empty observation")
        if len(shape) == 3 and dtype == np.uint8:
            if shape[-1] <= 4 < shape[0]:
                raise EnvError(f"--env-id {env_id!r} observes (H, W, C) = {shape} frames; fastppo's Nature CNN "
                               f"takes (C, H, W) frames")
            if min(shape[1:]) < 36:
                raise EnvError(f"--env-id {env_id!r}: its {shape} frames are smaller than the Nature CNN's "
                               f"36 x 36 input")
            if info.get("continuous"):
                raise EnvError(f"--env-id {env_id!r} observes frames and has Box actions; fastppo's Gaussian "
                               f"policy is an MLP on vector observations")
        else:
            dtype = np.dtype(np.float32)  # vector observations reach the network as float32
        info.update(obs_shape=shape, obs_dtype=dtype)
    else:
        raise EnvError(f"--env-id {env_id!r} has a {obs_space} observation space; fastppo trains on Box, "
                       f"Discrete and Dict observations")
    return info


def adapt_obs(info: EnvInfo, obs):
    """A batch of the env's observations in the layout the policy takes (see EnvAdapter): numpy.
    Observations already in that layout pass through unchanged."""
    if info.dict_spec and isinstance(obs, dict):
        parts = []
        for key, n in info.dict_spec:
            x = np.asarray(obs[key])
            parts.append(np.eye(n, dtype=np.float32)[x] if n else x.reshape(len(x), -1).astype(np.float32))
        return np.concatenate(parts, axis=1)
    obs = np.asarray(obs)
    if info.obs_classes:
        return obs.astype(np.int64)
    return obs if obs.dtype == info.obs_dtype else obs.astype(info.obs_dtype)


class EnvAdapter:
    """An EnvPool pool as the policy sees it: observations in ``info``'s layout, actions to the env's.

    Observations: a dict is flattened to one float32 vector (Box keys as they are, Discrete keys
    one-hot, the text keys dropped), float64 becomes float32, a scalar discrete observation stays
    its int index. Actions: continuous ones are clipped to the space's bounds (the rollout keeps the
    unclipped sample, whose log-prob the loss uses) and cast to the space's dtype. Everything else is
    EnvPool's own (``send``/``recv``, ``render``, ``close``, ...).
    """

    def __init__(self, envs, info: EnvInfo):
        self.envs = envs
        self.info = info
        self.low = np.array(info.action_low, dtype=info.action_dtype)
        self.high = np.array(info.action_high, dtype=info.action_dtype)

    def __getattr__(self, name: str):
        return getattr(self.envs, name)

    def obs(self, obs):
        return adapt_obs(self.info, obs)

    def action(self, action: np.ndarray) -> np.ndarray:
        if not self.info.continuous:
            return action
        return np.clip(np.asarray(action).astype(self.info.action_dtype), self.low, self.high)

    def reset(self, *args, **kwargs):
        obs, info = self.envs.reset(*args, **kwargs)
        return self.obs(obs), info

    def step(self, action, env_id=None):
        args = (self.action(action),) if env_id is None else (self.action(action), env_id)
        obs, reward, terminated, truncated, info = self.envs.step(*args)
        return self.obs(obs), reward, terminated, truncated, info

    def send(self, action, env_id=None):
        return self.envs.send(self.action(action), env_id)

    def recv(self, *args, **kwargs):
        obs, reward, terminated, truncated, info = self.envs.recv(*args, **kwargs)
        return self.obs(obs), reward, terminated, truncated, info


def make_envs(
    info: EnvInfo,
    num_envs: int,
    seed: int,
    *,
    num_threads: int = 0,
    max_episode_steps: int | None = None,
    repeat_action_probability: float = 0.0,
    batch_size: int | None = None,
    episodic_life: bool = True,
    reward_clip: bool = True,
    render_mode: str | None = None,
    device: object = "cpu",
):
    """An EnvPool pool with the gymnasium API, seen through :class:`EnvAdapter`; Atari gets CleanRL's
    settings, and ``info.env_kwargs`` (--env-kwargs) go to EnvPool as they are. Env i gets seed + i
    (seed taken modulo 2^31, EnvPool's range).

    The user's own envs (``info.source``): a Gymnasium vector env behind ``gymenv.GymAdapter``, which
    looks like the pool above (sync only), or a device env made on `device` behind ``devenv.DeviceEnvs``
    (torch tensors in and out). Threads, batch size, sticky actions and the Atari settings are EnvPool's.

    Atari: episodic_life, reward_clip, 84x84 gray, 4-frame stack, frame skip 4, up to 30 no-op
    starts (all EnvPool's v5 defaults except the first two). ``episodic_life`` and ``reward_clip``
    are for training; evaluation plays full games on raw scores with both off. ``render_mode=
    "rgb_array"`` makes ``envs.render(env_ids=[i])`` return env i's screen, (1, H, W, 3) uint8.
    """
    if info.source == "gym":
        from fastppo.gymenv import GymAdapter

        return GymAdapter(info.maker(num_envs, render_mode, max_episode_steps), info, seed % 2**31)
    if info.source == "device":
        from fastppo.devenv import DeviceEnvs

        return DeviceEnvs(info.maker(num_envs, device, max_episode_steps), info, seed % 2**31, device)
    envpool = _envpool()
    kwargs: dict = dict(env_type="gymnasium", num_envs=num_envs, seed=seed % 2**31)  # EnvPool's seeds are int32
    if batch_size is not None:
        kwargs["batch_size"] = batch_size
    if num_threads:
        kwargs["num_threads"] = num_threads
    if render_mode is not None:
        kwargs["render_mode"] = render_mode
        if info.family == "mujoco":
            expose_egl()
    if max_episode_steps is not None:
        kwargs["max_episode_steps"] = max_episode_steps
    if info.is_atari:
        kwargs.update(
            episodic_life=episodic_life,
            reward_clip=reward_clip,
            repeat_action_probability=repeat_action_probability,
            img_height=84,
            img_width=84,
            stack_num=4,
            gray_scale=True,
            frame_skip=4,
            noop_max=30,
        )
    kwargs.update(info.env_kwargs)  # last: --env-kwargs may change CleanRL's Atari settings too
    with _quiet_spaces():
        envs = envpool.make(info.env_id, **kwargs)
        _ = envs.observation_space, envs.action_space  # built lazily on first access: build them quietly now
    return EnvAdapter(envs, info)


class EpisodeStats:
    """Full-game score accounting on the host, vectorised over envs.

    The score users see is the raw (unclipped) reward summed over all lives of a game, reported
    when the game really ends: game over (Atari's ``info["terminated"]``, or ``terminated`` for
    other envs) or a time-limit truncation. The running sum is reset at every game end, truncation
    included, so a truncated game never leaks into the next one.
    """

    def __init__(self, num_envs: int, is_atari: bool):
        self.is_atari = is_atari
        self.returns = np.zeros(num_envs, dtype=np.float64)
        self.finished_returns: list[float] = []
        self.finished_lengths: list[int] = []

    def update(
        self,
        reward: np.ndarray,
        terminated: np.ndarray,
        truncated: np.ndarray,
        info: dict,
        env_ids: np.ndarray | None = None,
    ) -> None:
        """Account one step of the envs in env_ids (all envs when None)."""
        idx = slice(None) if env_ids is None else env_ids
        raw = info["reward"] if self.is_atari else reward
        game_over = info["terminated"].astype(bool) if self.is_atari else terminated.astype(bool)
        game_end = game_over | truncated.astype(bool)
        self.returns[idx] += raw
        if game_end.any():
            ended = np.flatnonzero(game_end)
            rows = ended if env_ids is None else env_ids[ended]
            self.finished_returns.extend(self.returns[rows].tolist())
            # elapsed_step counts the agent steps of the game (all lives), as EnvPool reports it
            self.finished_lengths.extend(info["elapsed_step"][ended].tolist())
            self.returns[rows] = 0.0

    def pop(self) -> tuple[list[float], list[int]]:
        """The (returns, lengths) of the games that ended since the last pop."""
        out = (self.finished_returns, self.finished_lengths)
        self.finished_returns, self.finished_lengths = [], []
        return out
