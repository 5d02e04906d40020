"""Property-based: whatever a user gives fastppo.train, it trains or is refused in one line, before any folder.

Values are drawn from each Config field's annotation (so a field added to Config is drawn too): values of
its type at the edges of every range (0, -1, 2^31, 2^63, NaN, inf, 1e39, ...), values of other types, and
for Literal fields other words. Each example is a tiny CartPole run (one iteration of 2 envs x 16 steps):
it either trains that iteration or raises ConfigError / EnvError and leaves no folder. EnvPool's Atari
options are drawn the same way on Pong. Derandomized, so CI draws the same examples every time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import types
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typeguard import CollectionCheckStrategy, check_type

import fastppo
from fastppo.config import Config, ConfigError
from fastppo.envs import EnvError

# A run that trains one iteration in a fraction of a second.
TINY = dict(env_id="CartPole-v1", device="cpu", num_envs=2, num_steps=16, num_minibatches=2, update_epochs=1,
            total_timesteps=32, log_seconds=0.0)
# Not drawn: they need an extra and its services (track: W&B, tensorboard, capture_video: a renderer),
# compile (torch.compile takes a minute on CPU), or name the run's folder (resume, run_dir: the property is
# about that folder), or are no input (world_size: torchrun's).
NOT_DRAWN = {"track", "tensorboard", "capture_video", "compile", "resume", "run_dir", "world_size"}
# A valid value of these multiplies the work of the run; they are drawn small and never None (a larger valid
# one, or the env's default, only takes longer: None is 500k CartPole steps).
WORK = {"total_timesteps", "update_epochs", "cg_iters", "line_search_steps", "eval_episodes", "num_steps",
        "num_envs", "target_return_games"}

EDGE_INTS = [-(2**63), -1, 0, 1, 2, 3, 2**31 - 1, 2**31, 2**63, 2**64]
EDGE_FLOATS = [math.nan, math.inf, -math.inf, -1e39, -1.0, 0.0, 1e-45, 1e-8, 0.01, 0.5, 0.99, 1.0, 2.0, 1e4, 3e38,
               1e39]
OTHER_TYPES = ["", "1", "x", True, 1.5, [1], ("a",)]  # and None, where the field does not take it


def values_of(name: str, hint) -> st.SearchStrategy:
    """Values for a field of this annotation: its own type's edges, None where allowed, other types."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return st.one_of(*(values_of(name, a) for a in args if not (name in WORK and a is type(None))))
    if hint is type(None):
        return st.none()
    if typing.get_origin(hint) is typing.Literal:
        return st.sampled_from([*args, "nope"])
    if hint is bool:
        return st.booleans()
    if hint is int:
        return st.sampled_from([v for v in EDGE_INTS if name not in WORK or v <= 3])
    if hint is float:
        return st.sampled_from(EDGE_FLOATS) | st.floats(allow_nan=True, allow_infinity=True)
    if hint is str:
        return st.sampled_from(["", "x", "../x", "é", "a" * 300])
    if typing.get_origin(hint) is tuple:
        return st.lists(st.sampled_from(["", "x", "a=1", "seed=1", "version=0"]), max_size=2).map(tuple)
    raise AssertionError(f"no strategy for {name}: {hint}")


HINTS = {name: hint for name, hint in typing.get_type_hints(Config).items() if name not in NOT_DRAWN}
FIELDS = st.dictionaries(st.sampled_from(sorted(HINTS)), st.just(None), min_size=1, max_size=3).flatmap(
    lambda chosen: st.fixed_dictionaries({name: values_of(name, HINTS[name]) | st.sampled_from(
        OTHER_TYPES if name in WORK or type(None) in typing.get_args(HINTS[name]) else [*OTHER_TYPES, None])
        for name in chosen}))


def trains_or_is_refused(fields: dict, base: dict = TINY) -> None:
    """Train with fields over base: either one iteration ran, with every field of its config.json as given and
    of its annotation's type (Config(algo="sac") trained PPO and wrote "sac"), or ConfigError / EnvError in one
    line and nothing on disk."""
    root = tempfile.mkdtemp()
    run_dir = os.path.join(root, "run")
    try:
        out = fastppo.train(Config(**{**base, **fields}, run_dir=run_dir))
    except (ConfigError, EnvError) as e:
        assert "\n" not in str(e), e
        assert os.listdir(root) == [], f"{fields} was refused ({e}) but left {os.listdir(root)}"
        return
    assert out["iteration"] >= 1, fields
    with open(os.path.join(run_dir, "config.json")) as f:
        saved = json.load(f)
    hints = typing.get_type_hints(Config)
    for name, value in fields.items():
        if value is not None:  # None: the env's default, filled in
            check_type(value, hints[name], collection_check_strategy=CollectionCheckStrategy.ALL_ITEMS)
            assert not isinstance(value, bool) or bool in (hints[name], *typing.get_args(hints[name])), (name, value)
            assert saved[name] == json.loads(json.dumps(value)), (name, value, saved[name])


@pytest.mark.usefixtures("one_torch_thread")
@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(FIELDS)
def test_any_config_trains_one_iteration_or_is_refused_before_any_folder(fields):
    trains_or_is_refused(fields)


def test_every_config_field_is_drawn_or_said_why_not():
    """A field added to Config is drawn without an edit here; a field that cannot be drawn says so."""
    fields = {f.name for f in dataclasses.fields(Config)}
    assert NOT_DRAWN <= fields and WORK <= fields
    for name, hint in HINTS.items():
        values_of(name, hint)  # raises for an annotation it cannot draw from


# EnvPool's Atari options (make_spec("Pong-v5").config) but those fastppo sets from its own flags, at their edges
# (a frame_skip or noop_max of 2^31 - 1 is valid and only slow: not drawn).
ATARI_VALUES = {
    "stack_num": [-1, 0, 1, 2, 2**31], "frame_skip": [-1, 0, 1, 2], "noop_max": [-1, 0, 1, 30, 2**31],
    "img_height": [-5, 0, 1, 35, 36, 2**31], "img_width": [-5, 0, 36, 84], "task": ["pong", "breakout", "nope", ""],
    "mode": [-1, 0, 1, 99], "difficulty": [-1, 0, 99],
    **{k: ["True", "False", "2"] for k in ("zero_discount_on_life_loss", "use_fire_reset", "full_action_space",
                                           "use_inter_area_resize", "gray_scale")},
}
ATARI_OPTIONS = st.dictionaries(st.sampled_from(sorted(ATARI_VALUES)), st.just(None), min_size=1, max_size=3).flatmap(
    lambda keys: st.fixed_dictionaries({k: st.sampled_from(ATARI_VALUES[k]) for k in keys}))
TINY_ATARI = dict(TINY, env_id="Pong-v5", num_envs=1, num_steps=8, num_minibatches=1, total_timesteps=8)


@pytest.mark.usefixtures("one_torch_thread")
@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ATARI_OPTIONS)
def test_any_atari_option_trains_one_iteration_or_is_refused_before_any_folder(options):
    """The options fastppo sets for Atari, given through --env-kwargs at their edges: a zero frame stack broke
    the first forward pass, a negative no-op count segfaulted the process."""
    trains_or_is_refused({"env_kwargs": tuple(f"{k}={v}" for k, v in options.items())}, TINY_ATARI)
