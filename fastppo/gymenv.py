"""The user's own envs: Gymnasium vector envs (``gym:`` ids and factories), and how fastppo finds any own env.

An env id with a colon is not EnvPool's (EnvPool's ids have none):

* ``gym:<id>``: a registered Gymnasium id (``gym:CartPole-v1``), or ``gym:<module>:<id>``, Gymnasium's own
  form, which imports the module first (its import registers the id), or ``gym:<module>:<callable>``, a
  factory in the module (a class or function, as for ``env=`` below).
* ``torch:<name>``: an env on the training device (``fastppo.devenv``): ``torch:CartPole-v1`` (fastppo's
  own, ``fastppo.envs_torch``) or ``torch:<module>:<callable>``, the factory of one.
* ``python:<name>``: the label of a factory given to ``fastppo.train(cfg, env=...)`` that cannot be imported
  by name (a lambda, a class defined in a notebook); a run with it is made again only with ``env=``.

``fastppo.train(cfg, env=...)`` takes the factory itself. Which kind it makes follows from its parameters:

* one that takes ``device``: a device env factory, called ``env(num_envs=N, device=D, **env_kwargs)``;
* one that takes ``num_envs``: a Gymnasium vector env factory, ``env(num_envs=N, **env_kwargs)`` (for
  instance ``functools.partial(gymnasium.make_vec, "MyEnv-v0")``);
* any other callable makes one ``gymnasium.Env`` (a class, a function): fastppo calls it once per env,
  ``env(**env_kwargs)``, in a ``SyncVectorEnv`` (``--env-kwargs vectorization_mode=async``: an
  ``AsyncVectorEnv``, one process per env).

A Gymnasium vector env is stepped through :class:`GymAdapter`, which looks like the EnvPool pool that the
sync collector, evaluation, video and resume use: the semantics fastppo relies on (``fastppo.envs``) are
Gymnasium 1.x's default autoreset mode, NEXT_STEP (the step after an episode's end ignores its action and
returns reward 0 and the first observation of the next episode), checked when the env is made; other modes
are refused. A resume replays the run's actions on envs made again with the same seed, so an env must be
deterministic given its seed (``reset(seed=...)``) for a resumed run to go on where it stopped.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
from collections.abc import Callable

import numpy as np

from fastppo.envs import EnvAdapter, EnvError, EnvInfo, adapt_obs, space_fields

GYM, DEVICE, PYTHON = "gym:", "torch:", "python:"


def first_line(e: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def parse_env_kwargs(items: tuple[str, ...]) -> dict[str, object]:
    """--env-kwargs key=value ... for the user's own env: each value read as JSON (1, 0.5, true, null, [1, 2])
    where it reads, else kept as text; EnvError for an item without '='."""
    out: dict[str, object] = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise EnvError(f"--env-kwargs {item!r}: expected key=value")
        try:
            out[key] = json.loads(text)
        except ValueError:
            out[key] = text
    return out


def import_entry(spec: str, flag: str = "--env-id") -> object:
    """The object ``module:attr`` (attr may be dotted) names; EnvError (one line) when it does not import."""
    module_name, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # an ImportError, or any error the module raises as it is imported
        raise EnvError(f"{flag}: cannot import {module_name!r} ({first_line(e)})") from None
    for part in attr.split(".") if attr else ():
        if not hasattr(obj, part):
            raise EnvError(f"{flag}: {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    return obj


def takes(fn: Callable, name: str) -> bool:
    """Whether fn (a function or class) has a parameter called name."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a callable whose signature Python cannot read
        return False


def env_label(env: Callable) -> str:
    """The env id a run given ``env=`` saves in its config.json: ``gym:<module>:<name>`` or
    ``torch:<module>:<name>`` when the factory imports by that name (then ``fastppo eval`` and a resume make
    it again from the id), else ``python:<name>``."""
    kind = DEVICE if takes(env, "device") else GYM
    module, name = getattr(env, "__module__", None), getattr(env, "__qualname__", None)
    if module and name and module != "__main__" and "<" not in name:
        try:
            if import_entry(f"{module}:{name}") is env:
                return f"{kind}{module}:{name}"
        except EnvError:
            pass
    return f"{PYTHON}{name or type(env).__name__}"


def check_same_env(env: Callable, env_id: str) -> None:
    """EnvError unless the factory env is the one a run names (its env_id): a resume or a load with env= must
    not put another env under a run's weights."""
    if env_label(env) != env_id:
        raise EnvError(f"the run trained on --env-id {env_id!r}; env= is {env_label(env)!r}")


def own_env_info(env_id: str, env_kwargs: tuple[str, ...], env: Callable | None, device: object) -> EnvInfo:
    """EnvInfo of the user's own env, named by env_id (``gym:``, ``torch:``) or given as env (a factory): one env
    is made, checked (autoreset mode, spaces, a first reset and step) and closed. EnvError (one line) for an
    id that names nothing, a factory that raises, an env fastppo cannot train on."""
    kwargs = parse_env_kwargs(env_kwargs)
    if env is not None:
        if not callable(env):
            raise EnvError(f"env= must be a factory (a class or function) of a Gymnasium env, a Gymnasium vector "
                           f"env or a device env; got a {type(env).__name__}")
        target, device_env = env, takes(env, "device")
    elif env_id.startswith(DEVICE):
        from fastppo.devenv import BUILTIN

        name = env_id[len(DEVICE):]
        if ":" not in name and name not in BUILTIN:
            close = difflib.get_close_matches(name, list(BUILTIN), n=3)
            raise EnvError(f"unknown --env-id {env_id!r}: fastppo's device envs are {', '.join(BUILTIN)}"
                           + (f" (close: {', '.join(close)})" if close else "")
                           + "; a device env of your own is torch:<module>:<factory>")
        target, device_env = import_entry(BUILTIN.get(name, name)), True
    elif env_id.startswith(GYM):
        target, device_env = gym_target(env_id[len(GYM):]), False
    elif env_id.startswith(PYTHON):
        raise EnvError(f"--env-id {env_id!r}: this run trained on a Python object given to fastppo.train(env=...); "
                       f"make it from Python with the same env= (fastppo.load, fastppo.make_env, fastppo.train)")
    else:
        raise EnvError(f"--env-id {env_id!r}: an id with a colon is gym:<Gymnasium id> or torch:<device env>; "
                       f"EnvPool's ids have none")
    if device_env:
        from fastppo.devenv import device_env_info

        return device_env_info(env_id, target, kwargs, device)
    return gym_env_info(env_id, target, kwargs)


def gym_target(name: str) -> str | Callable:
    """What ``gym:<name>`` names: a registered Gymnasium id (after importing ``<module>:`` when given), or a
    factory in a module."""
    import gymnasium

    if ":" in name:
        module, _, rest = name.partition(":")
        import_entry(f"{module}:")  # its import registers its envs
        if rest in gymnasium.registry:
            return rest
        target = import_entry(name)
        if not callable(target):
            raise EnvError(f"--env-id {GYM + name!r}: {rest!r} is neither a Gymnasium id nor a factory in {module!r}")
        return target
    if name not in gymnasium.registry:
        close = difflib.get_close_matches(name, list(gymnasium.registry), n=3)
        raise EnvError(f"unknown --env-id {GYM + name!r}: Gymnasium has no such id"
                       + (f"; close names: {', '.join(close)}" if close else "")
                       + "; an env of your own: gym:<module>:<id or factory>")
    return name


def vector_maker(target: str | Callable, kwargs: dict[str, object]) -> Callable:
    """maker(num_envs, render_mode, max_episode_steps) -> a Gymnasium vector env, for a registered id, a vector
    env factory (it takes num_envs) or a one-env factory; render_mode and max_episode_steps go to the env only
    when set (a video; --max-episode-steps)."""
    import gymnasium

    options = dict(kwargs)
    mode = options.pop("vectorization_mode", "sync")

    def extra(render_mode: str | None, max_episode_steps: int | None) -> dict:
        return {k: v for k, v in (("render_mode", render_mode), ("max_episode_steps", max_episode_steps))
                if v is not None}

    if isinstance(target, str):
        def make(num_envs: int, render_mode: str | None = None, max_episode_steps: int | None = None):
            return gymnasium.make_vec(target, num_envs=num_envs, vectorization_mode=mode, **options,
                                      **extra(render_mode, max_episode_steps))
    elif takes(target, "num_envs"):
        def make(num_envs: int, render_mode: str | None = None, max_episode_steps: int | None = None):
            return target(num_envs=num_envs, **kwargs, **extra(render_mode, max_episode_steps))
    else:
        if mode not in ("sync", "async"):
            raise EnvError(f"--env-kwargs vectorization_mode={mode}: fastppo runs a one-env factory in a sync or an "
                           f"async Gymnasium vector env")
        vector = gymnasium.vector.AsyncVectorEnv if mode == "async" else gymnasium.vector.SyncVectorEnv

        def make(num_envs: int, render_mode: str | None = None, max_episode_steps: int | None = None):
            def one():
                env = target(**options, **extra(render_mode, None))
                if max_episode_steps is not None:
                    env = gymnasium.wrappers.TimeLimit(env, max_episode_steps)
                return env
            return vector([one] * num_envs)
    return make


def check_autoreset(env_id: str, metadata: dict) -> None:
    """EnvError unless the vector env (or device env) declares Gymnasium's NEXT_STEP autoreset mode, the semantics
    the collectors rely on (fastppo.envs)."""
    from gymnasium.vector import AutoresetMode

    mode = (metadata or {}).get("autoreset_mode")
    try:
        mode = AutoresetMode(mode)
    except ValueError:
        raise EnvError(f"--env-id {env_id!r} declares no autoreset mode (metadata['autoreset_mode'] = {mode!r}); "
                       f"fastppo needs AutoresetMode.NEXT_STEP") from None
    if mode != AutoresetMode.NEXT_STEP:
        raise EnvError(f"--env-id {env_id!r} resets its envs in autoreset mode {mode.value}; fastppo trains on "
                       f"NEXT_STEP (Gymnasium's default: the step after an episode's end returns the reset "
                       f"observation)")


def gym_env_info(env_id: str, target: str | Callable, kwargs: dict[str, object]) -> EnvInfo:
    """EnvInfo of a Gymnasium vector env: one env made, checked, reset and stepped once, and closed."""
    import gymnasium

    maker = vector_maker(target, kwargs)
    try:
        envs = maker(1)
    except Exception as e:  # whatever the user's factory raises
        raise EnvError(f"--env-id {env_id!r} cannot be made: {first_line(e)}") from None
    try:
        if not isinstance(envs, gymnasium.vector.VectorEnv):
            raise EnvError(f"--env-id {env_id!r}: its factory returned a {type(envs).__name__}, not a "
                           f"gymnasium.vector.VectorEnv")
        check_autoreset(env_id, envs.metadata)
        fields = space_fields(env_id, envs.single_observation_space, envs.single_action_space)
        try:
            envs.reset(seed=0)
            envs.step(envs.action_space.sample())
        except Exception as e:
            raise EnvError(f"--env-id {env_id!r} fails its first reset and step: {first_line(e)}") from None
        fps = int(envs.metadata.get("render_fps") or 0)
    finally:
        envs.close()
    return EnvInfo(env_id=env_id, is_atari=False, family="gym", env_kwargs=tuple(sorted(kwargs.items())),
                   source="gym", maker=maker, render_fps=fps, **fields)


class ElapsedSteps:
    """EnvPool's ``info["elapsed_step"]`` for envs that do not report it: the agent steps of each env's current
    episode, 0 on the NEXT_STEP reset step (the step after an episode's end), as EnvPool counts them."""

    def __init__(self, num_envs: int):
        self.count = np.zeros(num_envs, dtype=np.int64)
        self.done = np.zeros(num_envs, dtype=bool)

    def reset(self) -> None:
        self.count[:] = 0
        self.done[:] = False

    def step(self, terminated: np.ndarray, truncated: np.ndarray) -> np.ndarray:
        self.count = np.where(self.done, 0, self.count + 1)
        self.done = np.asarray(terminated, dtype=bool) | np.asarray(truncated, dtype=bool)
        return self.count


class GymAdapter(EnvAdapter):
    """A Gymnasium vector env as fastppo's sync collector, evaluation and resume see EnvPool's pool.

    ``reset()`` seeds env i with seed + i on its first call (Gymnasium's rule, EnvPool's too); ``step`` adds
    ``info["elapsed_step"]`` and ``info["env_id"]`` to the env's info; ``render(env_ids=[i])`` returns env i's
    frame, (1, H, W, 3) uint8 (with ``render_mode="rgb_array"``). Observations and actions are adapted as
    EnvPool's are (:class:`fastppo.envs.EnvAdapter`). No ``send``/``recv``: EnvPool's async stepping has no
    Gymnasium counterpart (a Gymnasium AsyncVectorEnv still steps all envs together).
    """

    def __init__(self, envs, info: EnvInfo, seed: int):
        super().__init__(envs, info)
        self.seed: int | None = seed
        self.elapsed = ElapsedSteps(envs.num_envs)
        self.env_ids = np.arange(envs.num_envs, dtype=np.int32)

    def reset(self, *args, **kwargs):
        seed, self.seed = self.seed, None  # later resets go on with each env's own random stream
        obs, info = self.envs.reset(seed=seed)
        self.elapsed.reset()
        return adapt_obs(self.info, obs), info

    def step(self, action, env_id=None):
        obs, reward, terminated, truncated, info = self.envs.step(self.action(action))
        info = dict(info, elapsed_step=self.elapsed.step(terminated, truncated), env_id=self.env_ids)
        return adapt_obs(self.info, obs), np.asarray(reward), terminated, truncated, info

    def render(self, env_ids=None) -> np.ndarray:
        frames = self.envs.render()  # every env's frame, Gymnasium's vector API
        return np.stack([np.asarray(frames[i]) for i in (range(len(frames)) if env_ids is None else env_ids)])
