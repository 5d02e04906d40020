"""EnvPool environments: validation of the env id, construction, and full-game score accounting.

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
import warnings
from dataclasses import dataclass

import numpy as np


class EnvError(ValueError):
    """A bad env id or unsupported env; a one-line message for the CLI."""


@dataclass(frozen=True)
class EnvInfo:
    env_id: str
    obs_shape: tuple[int, ...]
    obs_dtype: np.dtype
    num_actions: int
    is_atari: bool

    @property
    def obs_bytes(self) -> int:
        """Bytes of one env's observation."""
        return int(np.prod(self.obs_shape, dtype=np.int64)) * np.dtype(self.obs_dtype).itemsize


def _envpool():
    import envpool

    return envpool


@contextlib.contextmanager
def _quiet_spaces():
    """EnvPool builds gymnasium Boxes from float64 bounds; gymnasium warns on every one of them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*precision lowered by casting.*")
        yield


def env_info(env_id: str) -> EnvInfo:
    """Look the env up in EnvPool's registry without creating any environment.

    Raises EnvError for an unknown id (listing close names) or a non-discrete action space.
    """
    import gymnasium

    envpool = _envpool()
    known = envpool.list_all_envs()
    if env_id not in known:
        close = difflib.get_close_matches(env_id, known, n=4, cutoff=0.6)
        hint = f"; close names: {', '.join(close)}" if close else "; see envpool.list_all_envs()"
        raise EnvError(f"unknown --env-id {env_id!r}{hint}")
    with _quiet_spaces():  # the spaces are built lazily, on first access
        spec = envpool.make_spec(env_id)
        space, obs_space = spec.action_space, spec.observation_space
    if not isinstance(space, gymnasium.spaces.Discrete):
        raise EnvError(
            f"--env-id {env_id!r} has a {type(space).__name__} action space; fastppo needs a discrete one"
        )
    return EnvInfo(
        env_id=env_id,
        obs_shape=tuple(obs_space.shape),
        obs_dtype=np.dtype(obs_space.dtype),
        num_actions=int(space.n),
        is_atari="episodic_life" in spec.config._fields,
    )


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
):
    """An EnvPool pool with the gymnasium API; Atari gets CleanRL's settings. Env i gets seed + i
    (seed taken modulo 2^31, EnvPool's range).

    Atari: episodic_life, reward_clip, 84x84 gray, 4-frame stack, frame skip 4, up to 30 no-op
    starts (all EnvPool's v5 defaults except the first two). ``episodic_life`` and ``reward_clip``
    are for training; evaluation plays full games on raw scores with both off. ``render_mode=
    "rgb_array"`` makes ``envs.render(env_ids=[i])`` return env i's screen, (1, H, W, 3) uint8.
    """
    envpool = _envpool()
    kwargs: dict = dict(env_type="gymnasium", num_envs=num_envs, seed=seed % 2**31)  # EnvPool's seeds are int32
    if batch_size is not None:
        kwargs["batch_size"] = batch_size
    if num_threads:
        kwargs["num_threads"] = num_threads
    if render_mode is not None:
        kwargs["render_mode"] = render_mode
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
    with _quiet_spaces():
        envs = envpool.make(info.env_id, **kwargs)
        _ = envs.observation_space, envs.action_space  # built lazily on first access: build them quietly now
    return envs


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
