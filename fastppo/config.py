"""Training configuration: one dataclass, a docstring per field (tyro turns them into --help).

The fields are defined by topic (environment, run, algorithm, rollout, speed, outputs, tracking), one
option class each; :class:`Config` inherits them all and is what the trainer and the Python API take,
and :class:`TrainFlags` nests them for the command line, so ``fastppo train --help`` shows one group
per topic with the same flat flag names.

Flag names follow CleanRL's ``ppo_atari_envpool.py`` / ``ppo.py`` so commands and W&B runs compare
directly. A few defaults depend on the environment (CleanRL's Atari script and its classic-control
``ppo.py`` differ): those fields default to ``None`` and :func:`resolve` fills them once the env is
known. Derived sizes are computed and validated in one place, :func:`resolve`, before any
environment or device memory is created.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import tyro
from typeguard import CollectionCheckStrategy, TypeCheckError, check_type

from fastppo.envs import INT32_MAX, EnvInfo


class ConfigError(ValueError):
    """A bad user input; the CLI prints it as one line and exits with code 2."""


# The options by topic, one dataclass each; Config inherits them all, so it is one flat set of fields in
# this order (the environment's first), and fastppo train --help shows each topic as its own group (cli.py).


@dataclass
class EnvironmentOptions:
    """The environments: which EnvPool env, how many, and what reaches the policy."""

    env_id: str | None = None
    """EnvPool env id with Discrete or one-dimensional Box actions: Atari 'Pong-v5', classic
    control 'CartPole-v1' or 'Pendulum-v1', MuJoCo 'HalfCheetah-v4', DMC 'CheetahRun-v1',
    Box2D, toy text 'Taxi-v3', MiniGrid (None: Pong-v5 when training on CUDA; on the CPU, where
    Pong's 10M steps take days, CartPole-v1, which learns there in minutes, and the run says so).
    Your own env: 'gym:<id>' a Gymnasium id ('gym:<module>:<id>' imports the module that registers
    it, 'gym:<module>:<factory>' a gymnasium.Env class or function in it), 'torch:CartPole-v1' or
    'torch:<module>:<factory>' an env on the training device (see the docs' Your own environment)"""
    env_kwargs: tuple[str, ...] = ()
    """EnvPool options as key=value, passed to the envs as they are (checked against the env's
    options and their types), e.g. use_combined_action=true for VizDoom; for your own env, keyword
    arguments of its factory (values read as JSON where they read), and vectorization_mode=async
    for Gymnasium's one-process-per-env vector env"""
    num_envs: int | None = None
    """number of parallel environments, per rank under torchrun (None: 8 for Atari, 4 for other
    discrete actions, 1 for continuous ones)"""
    repeat_action_probability: float = 0.0
    """Atari sticky actions (0 as in CleanRL; 0.25 for the Machado et al. protocol)"""
    max_episode_steps: int | None = None
    """time limit in agent steps (None: EnvPool's, 27000 for Atari = 108k frames)"""
    norm_obs: bool | None = None
    """normalise vector observations by their running mean and std, clipped to +-10 (None: on
    for continuous actions, as CleanRL's ppo_continuous_action)"""
    norm_reward: bool | None = None
    """scale rewards by the running std of the discounted return, clipped to +-10 (None: on for
    continuous actions)"""


@dataclass
class RunOptions:
    """What to train for how long: the preset, the budget, the seed, the device, the stop rules."""

    preset: Literal["none", "cleanrl", "fast"] = "none"
    """named settings for the kind of env, overridden by explicit flags. cleanrl: CleanRL's
    hyperparameters exactly (ppo_atari_envpool, ppo, or ppo_continuous_action), every
    throughput option off. fast (chosen on Pong on CPU, not yet timed on a GPU): async envs
    (recv num_envs / 2) and --overlap; Atari 32 envs x 128 steps, minibatches of 256, 4
    epochs, lr 2.5e-4 annealed, clip 0.2, --decoupled; other discrete actions 64 x 128, 4
    minibatches, 3 epochs, lr 3e-4, clip 0.2; continuous 64 x 64, 4 minibatches, 5 epochs, lr
    3e-4, clip 0.2. fastppo/presets.py lists them and why"""
    total_timesteps: int | None = None
    """total agent steps, all ranks together (None: 10M for Atari, 500k for other discrete
    actions, 1M for continuous ones)"""
    seed: int = 1
    """seed of torch, numpy and the environments (env i gets seed + i; under torchrun, env i of
    rank r gets seed + r * num_envs + i and rank r seeds torch with seed + r)"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """training device: auto = cuda when available, else cpu"""
    target_return: float | None = None
    """stop early once the mean full-game return of the last --target-return-games games
    reaches this"""
    target_return_games: int = 10
    """games in the recent-return window: the mean of the last this many full games is
    charts/recent_return, the progress display's return and what --target-return compares"""
    max_seconds: float | None = None
    """stop after the first iteration that ends past this many seconds of training (per launch:
    a resumed run counts from its resume); the run ends normally, with a checkpoint"""
    torch_deterministic: bool = True
    """set torch.backends.cudnn.deterministic"""


@dataclass
class AlgorithmOptions:
    """The update: PPO (clip or penalty) or TRPO, the optimizer and its schedule."""

    algo: Literal["ppo", "trpo"] = "ppo"
    """policy update: ppo (--loss clip or penalty, K epochs of minibatches) or trpo (one
    natural gradient step to the edge of the KL trust region --max-kl, then a line search;
    the critic trained by Adam with --learning-rate, --update-epochs and --num-minibatches)"""
    loss: Literal["clip", "penalty"] = "clip"
    """PPO variant: clipped surrogate, or surrogate minus adaptive beta * KL(old || new)"""
    decoupled: bool = False
    """decoupled PPO (Hilton et al. 2021): the "old" policy that the clip (or the penalty's KL)
    holds the update near is the policy at the start of the update (pi_prox, from one forward
    pass over the batch without gradients), and each sample's advantage is weighted by
    pi_prox(a|s) / pi_behaviour(a|s), the importance weight from the policy that acted. With
    --overlap the envs act one update behind, so the ratio to the behaviour policy starts away
    from 1 and clipping spends part of each update; decoupled, it starts at exactly 1. Without
    --overlap and --async-envs the two policies are the same and the update is the plain one"""
    learning_rate: float | None = None
    """Adam learning rate, eps 1e-5 (None: 2.5e-4; 3e-4 for continuous actions)"""
    anneal_lr: bool = True
    """anneal the learning rate linearly to 0 over the run (CleanRL's flag: --no-anneal-lr keeps it
    constant); see --lr-schedule"""
    lr_schedule: Literal["anneal", "constant", "adaptive"] | None = None
    """how the learning rate moves. anneal: linearly to 0 over the run (CleanRL); constant;
    adaptive: after each update divided by --lr-factor when the exact KL(pi_old || pi_new)
    over the batch is above --kl-max, multiplied by it when below --kl-min, within
    [--lr-min, --lr-max] (PPO-penalty's rule for beta, applied to the step size). None: what
    --anneal-lr says (anneal, or constant with its negation). Given together, the two must
    agree on whether the rate anneals (so adaptive goes with --no-anneal-lr, never with
    --anneal-lr); a preset's schedule yields to either form of --anneal-lr given by the caller"""
    lr_min: float = 1e-6
    """--lr-schedule adaptive: the least learning rate (rl_games' min_lr)"""
    lr_max: float = 1e-2
    """--lr-schedule adaptive: the largest learning rate (rl_games' max_lr)"""
    lr_factor: float = 1.5
    """--lr-schedule adaptive: the factor by which the learning rate moves per iteration (rl_games'
    lr_multiplier)"""
    update_epochs: int | None = None
    """epochs over each rollout, K (None: 4; 10 for continuous actions)"""
    num_minibatches: int | None = None
    """minibatches per epoch; num_envs * num_steps must divide by it (None: 4; 32 for
    continuous actions)"""
    minibatch_by: Literal["sample", "env"] = "sample"
    """minibatches of shuffled samples (CleanRL), or of whole env columns [T, n] (num_envs must
    divide by num_minibatches)"""
    clip_coef: float | None = None
    """surrogate clip epsilon, also the value clip range (None: 0.1 for Atari, 0.2 otherwise)"""
    clip_vloss: bool = True
    """clip the value update to +-clip_coef around the collection-time value (CleanRL)"""
    ent_coef: float | None = None
    """entropy bonus coefficient (None: 0.01; 0 for continuous actions)"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """global gradient-norm clip"""
    target_kl: float | None = None
    """stop the epochs of an update early when the k3 KL estimate exceeds this (CleanRL)"""
    kl_coef: float = 1.0
    """PPO-penalty: initial beta"""
    kl_target: float = 0.01
    """PPO-penalty and --lr-schedule adaptive: d, the KL each update aims at; beta doubles (the
    learning rate shrinks) when KL > kl_max and beta halves (the learning rate grows) when
    KL < kl_min"""
    kl_max: float | None = None
    """PPO-penalty and --lr-schedule adaptive: upper KL bound (None: 1.5 * kl_target)"""
    kl_min: float | None = None
    """PPO-penalty and --lr-schedule adaptive: lower KL bound (None: kl_target / 1.5)"""
    kl_coef_min: float = 1e-4
    """PPO-penalty: the least beta (halving stops there, so a rise of the KL is penalised again
    within a few iterations)"""
    kl_coef_max: float = 1e4
    """PPO-penalty: the largest beta"""
    max_kl: float = 0.01
    """TRPO: the trust region delta, the largest mean KL(pi_old || pi) over the batch's states
    that an update may take"""
    cg_iters: int = 10
    """TRPO: conjugate-gradient iterations of the natural-gradient solve"""
    cg_damping: float = 0.1
    """TRPO: damping added to the Fisher matrix's diagonal (F + damping * I)"""
    line_search_steps: int = 10
    """TRPO: backtracking line-search points at most (the step halves each time)"""


@dataclass
class RolloutOptions:
    """Each rollout and what is learned from it: its length, the returns and the advantages."""

    num_steps: int | None = None
    """steps per env per rollout, T (None: 128; 2048 for continuous actions)"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    advantages: Literal["rollout", "epoch"] = "rollout"
    """compute GAE once per rollout (CleanRL), or again every epoch from the current value
    predictions (Andrychowicz et al. 2021); with --minibatch-by env that is one fused
    GAE+loss op"""
    norm_adv: bool = True
    """normalise advantages per minibatch (TRPO: over the batch), over the valid transitions"""
    norm_value: bool | None = None
    """normalise the critic's targets by the running mean and std of the returns, updated with each
    rollout's returns before its update: the value head learns (G - mean) / std, the rollout's
    values are de-normalised for GAE and the value clip range is in normalised units (rl_games'
    normalize_value). None: off for every kind of env, as CleanRL"""


@dataclass
class SpeedOptions:
    """How fast: asynchronous envs, overlapped updates, graphs, kernels, threads, torchrun."""

    async_envs: bool = False
    """step EnvPool asynchronously (send/recv): each recv returns the --env-batch-size envs
    that finished first; every env's steps still land in its own column, in time order"""
    env_batch_size: int | None = None
    """envs per recv with --async-envs (None: num_envs // 2)"""
    overlap: bool = False
    """update on rollout k while the envs step rollout k+1 with a frozen copy of the weights
    from before the update; the importance ratio uses the recorded behaviour log-probs (off:
    CleanRL's exact on-policy loop)"""
    cudagraphs: bool | None = None
    """capture acting (forward, sampling and the rollout row it writes) in a CUDA graph per batch
    size and replay it every env step: one launch instead of ~30; a graphed step draws exactly the
    noise the eager one would (None: on with CUDA, off on CPU)"""
    compile: bool = False
    """torch.compile the policy's forward (acting and update)"""
    bf16: bool = False
    """bf16 autocast for the forward passes (acting and update); losses stay float32"""
    kernels: Literal["auto", "torch", "triton"] = "auto"
    """implementation of GAE and the loss: auto = Triton on CUDA, torch reference on CPU"""
    env_threads: int = 0
    """EnvPool worker threads (0 = EnvPool's default; under torchrun with several local ranks,
    the machine's cores split evenly across them)"""
    torch_threads: int = 0
    """torch CPU threads (0 = auto: 1 for the MLP of vector observations, whose tiny matmuls
    only lose to thread hand-offs and contend with EnvPool's threads; torch's default for
    the Nature CNN)"""
    dist_timeout: float = 600.0
    """torchrun only: seconds a rank waits for the others (rendezvous, a collective) before it
    fails with an error instead of hanging"""
    world_size: tyro.conf.Suppress[int] = 1
    """ranks training together; set from torchrun's WORLD_SIZE, not a flag"""


@dataclass
class OutputOptions:
    """The run folder: where, what it keeps, how to go on, the evaluations and their videos."""

    run_dir: str | None = None
    """run folder (config.json, metrics.jsonl, checkpoints); it must not hold a run already
    (None: runs/<env>__<exp>__<seed>__<time>)"""
    exp_name: str = "fastppo"
    """name of this experiment (part of the default run folder name)"""
    resume: str | None = None
    """continue the run in this folder (runs/<name>) from its newest checkpoint, with the folder's
    config.json. A resume may change only --total-timesteps, --max-seconds, --save-every,
    --log-every, --log-seconds, --eval-every, --eval-episodes, --capture-video, --track, --wandb-*,
    --tensorboard, --device, --env-threads, --torch-threads and --dist-timeout: as flags given with
    --resume, or edited in config.json (a flag wins); a config.json edited in any other field is
    refused, naming it (see README)"""
    save_every: int = 0
    """write a checkpoint every this many iterations (0 = only at the end; SIGINT/SIGTERM also
    save)"""
    log_every: int = 1
    """iterations between W&B logs and progress lines (metrics.jsonl gets every iteration)"""
    log_seconds: float = 1.0
    """and at least this many seconds between them (0 = no limit); the first and last
    iteration, and every iteration with an evaluation, are always logged"""
    eval_every: int = 0
    """every this many iterations (and at the end), play --eval-episodes full games on a
    separate small env pool and log eval/* (0 = never)"""
    eval_episodes: int = 4
    """full games per --eval-every evaluation"""
    capture_video: bool = False
    """film the first game of each --eval-every evaluation into videos/eval_<iteration>.mp4 in
    the run folder, also logged to W&B with --track; needs the `video` extra and an env
    EnvPool renders"""


@dataclass
class TrackingOptions:
    """Experiment tracking: Weights & Biases and TensorBoard."""

    track: bool = False
    """log to Weights & Biases (needs the `track` extra; WANDB_MODE=offline works without a
    network)"""
    wandb_project: str = "fastppo"
    """W&B project"""
    wandb_entity: str | None = None
    """W&B entity (user or team; None: your default)"""
    wandb_group: str | None = None
    """W&B group"""
    wandb_tags: tuple[str, ...] = ()
    """W&B tags"""
    tensorboard: bool = False
    """also write every metrics line as TensorBoard scalars to <run_dir>/tensorboard/ (needs
    the `tensorboard` extra)"""


@dataclass
class Config(TrackingOptions, OutputOptions, SpeedOptions, RolloutOptions, AlgorithmOptions, RunOptions,
             EnvironmentOptions):
    """Train on an EnvPool env with PPO (clip or penalty) or TRPO, into a run folder.

    One flat set of fields (``cfg.num_envs``), defined by topic in the option classes above.
    """

    # Which fields the caller set (see given_fields below): the call's own arguments, and the values it made.
    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        object.__setattr__(self, "_given", frozenset(names[: len(args)]) | frozenset(kwargs))
        return self

    def __post_init__(self):
        object.__setattr__(self, "_made", {name: getattr(self, name) for name in _FIELD_NAMES})

    # --- derived sizes (read-only) ------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        """Transitions per rollout of one rank: num_envs * num_steps."""
        return self.num_envs * self.num_steps

    @property
    def minibatch_size(self) -> int:
        """Transitions per minibatch of one rank (the gradient step averages world_size of them)."""
        return self.batch_size // self.num_minibatches

    @property
    def global_batch_size(self) -> int:
        """Transitions per iteration, all ranks together: batch_size * world_size."""
        return self.batch_size * self.world_size

    @property
    def num_iterations(self) -> int:
        """Rollout+update iterations: total_timesteps // global_batch_size."""
        return self.total_timesteps // self.global_batch_size

    @property
    def recv_batch_size(self) -> int:
        """Envs per EnvPool recv: --env-batch-size with --async-envs, else all of them."""
        if not self.async_envs:
            return self.num_envs
        return self.env_batch_size or max(1, self.num_envs // 2)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(batch_size=self.batch_size, minibatch_size=self.minibatch_size,
                 global_batch_size=self.global_batch_size, num_iterations=self.num_iterations)
        return d


# CleanRL's settings per kind of env: ppo_atari_envpool.py for Atari frames, ppo.py for discrete
# actions on other observations, ppo_continuous_action.py for Box actions. The fields that default to
# None take them (resolve), and --preset cleanrl sets them all.
KIND_DEFAULTS: dict[str, dict] = {
    "atari": dict(num_envs=8, total_timesteps=10_000_000, num_steps=128, num_minibatches=4, update_epochs=4,
                  learning_rate=2.5e-4, clip_coef=0.1, ent_coef=0.01, norm_obs=False, norm_reward=False,
                  norm_value=False),
    "discrete": dict(num_envs=4, total_timesteps=500_000, num_steps=128, num_minibatches=4, update_epochs=4,
                     learning_rate=2.5e-4, clip_coef=0.2, ent_coef=0.01, norm_obs=False, norm_reward=False,
                     norm_value=False),
    "continuous": dict(num_envs=1, total_timesteps=1_000_000, num_steps=2048, num_minibatches=32,
                       update_epochs=10, learning_rate=3e-4, clip_coef=0.2, ent_coef=0.0, norm_obs=True,
                       norm_reward=True, norm_value=False),
}


def env_kind(info: EnvInfo) -> str:
    """atari (CNN on frames), continuous (Box actions) or discrete (any other observation)."""
    return "continuous" if info.continuous else "atari" if info.is_image else "discrete"


@dataclass
class TrainFlags:
    """Train on an EnvPool env with PPO (clip or penalty) or TRPO, into a run folder. Flags that depend on
    the kind of env default to None and take CleanRL's value for it (Atari / other discrete actions /
    continuous actions)."""

    environment: Annotated[EnvironmentOptions, tyro.conf.OmitArgPrefixes] = dataclasses.field(
        default_factory=EnvironmentOptions)
    run: Annotated[RunOptions, tyro.conf.OmitArgPrefixes] = dataclasses.field(default_factory=RunOptions)
    algorithm: Annotated[AlgorithmOptions, tyro.conf.OmitArgPrefixes] = dataclasses.field(
        default_factory=AlgorithmOptions)
    rollout: Annotated[RolloutOptions, tyro.conf.OmitArgPrefixes] = dataclasses.field(default_factory=RolloutOptions)
    speed: Annotated[SpeedOptions, tyro.conf.OmitArgPrefixes] = dataclasses.field(default_factory=SpeedOptions)
    outputs: Annotated[OutputOptions, tyro.conf.OmitArgPrefixes] = dataclasses.field(default_factory=OutputOptions)
    tracking: Annotated[TrackingOptions, tyro.conf.OmitArgPrefixes] = dataclasses.field(
        default_factory=TrackingOptions)

    def config(self) -> Config:
        """The flat Config of these flags (every field counts as set: the command line marks its own)."""
        return Config(**{f.name: getattr(getattr(self, group.name), f.name) for group in dataclasses.fields(self)
                         for f in dataclasses.fields(getattr(self, group.name))})


# --- which fields the caller set ------------------------------------------------------------------
# A preset fills the fields its caller did not set, and --resume refuses the fields outside
# RESUME_FLAGS that its caller set. Both need to know which fields were set, not only their values:
# Config(preset="fast", update_epochs=4) sets update_epochs to its default value and means it.
# - From Python, the call says it: Config.__new__ receives the call's arguments, and __post_init__ keeps
#   the values it made, so a later assignment (cfg.update_epochs = 4) counts as set too.
# - From the command line, tyro says it (cli.given_flags); the parsed flags build a Config of every
#   field, and mark_given(cfg, names) then records the flags actually given.
# dataclasses.replace(cfg, ...) calls Config with every field, so it counts every field as set;
# config.replace keeps the record instead.

_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(Config))


def given_fields(cfg: Config) -> set[str]:
    """The fields cfg's caller set: the Config call's arguments, fields assigned another value since, or the
    command line's flags (mark_given)."""
    made = cfg.__dict__.get("_made", {})
    changed = {name for name, value in made.items() if not same_value(getattr(cfg, name), value)}
    return set(cfg.__dict__.get("_given", ())) | changed


def same_value(a, b) -> bool:
    """Whether two values of a field are the same: equal and of one type (4 is not 4.0, True is not 1)."""
    return a is b or (type(a) is type(b) and a == b)


def mark_given(cfg: Config, names: set[str]) -> Config:
    """Record `names` as the fields the caller set (the command line's flags); returns cfg."""
    object.__setattr__(cfg, "_given", frozenset(names))
    object.__setattr__(cfg, "_made", {name: getattr(cfg, name) for name in _FIELD_NAMES})
    return cfg


def replace(cfg: Config, given: bool = True, **changes) -> Config:
    """A copy of cfg with `changes`, keeping the record of the fields its caller set (dataclasses.replace
    would count every field as set); the changed fields count as set unless `given` is False (values
    filled in by a preset or a default)."""
    return mark_given(dataclasses.replace(cfg, **changes), given_fields(cfg) | (set(changes) if given else set()))


# --- resolution and validation --------------------------------------------------------------------


def default_env_id(device: str) -> str:
    """--env-id's default for a --device value: Pong-v5 when training on CUDA, else CartPole-v1."""
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return "Pong-v5" if cuda else "CartPole-v1"


def with_env_id(cfg: Config, env: Callable | None = None) -> Config:
    """cfg with its env id: the caller's, the label of the factory `env` given to fastppo.train(cfg, env=...)
    (gymenv.env_label), or default_env_id's (both not counted as given). ConfigError for both an env id and env."""
    if env is not None:
        from fastppo.gymenv import env_label

        if cfg.env_id is not None:
            raise ConfigError(f"env_id {cfg.env_id!r} and env= both name the env; give one of them")
        return replace(cfg, given=False, env_id=env_label(env))
    return cfg if cfg.env_id is not None else replace(cfg, given=False, env_id=default_env_id(cfg.device))


def env_id_notice(cfg: Config) -> str | None:
    """The line a run prints when it trains CartPole-v1 because its caller named no env and it trains on
    the CPU (a user who typed `fastppo train` expects Pong); None otherwise."""
    if "env_id" in given_fields(cfg) or cfg.env_id != default_env_id("cpu"):
        return None
    why = "--device cpu" if torch.cuda.is_available() else "no CUDA"
    return f"{why} and no --env-id: training {cfg.env_id}; give --env-id Pong-v5 for Atari"


def resolve(cfg: Config, info: EnvInfo, world_size: int = 1) -> Config:
    """Fill the env-dependent defaults and validate every value; returns a new Config.

    world_size: ranks training together (torchrun's WORLD_SIZE; 1 for a plain run).
    Raises ConfigError (one line, naming the value) on any bad input.
    """
    check_types(cfg)  # before the defaults are computed from it (1.5 * kl_target of a str...)
    check_numbers(cfg)
    # filled in, not set by the caller: they do not count as given (config.given_fields)
    fills = {k: v for k, v in KIND_DEFAULTS[env_kind(info)].items() if getattr(cfg, k) is None}
    fills["world_size"] = world_size
    if cfg.kl_max is None:
        fills["kl_max"] = 1.5 * cfg.kl_target
    if cfg.kl_min is None:
        fills["kl_min"] = cfg.kl_target / 1.5
    fills["lr_schedule"] = lr_schedule(cfg)
    fills["anneal_lr"] = fills["lr_schedule"] == "anneal"  # so that the resolved config says one thing
    if cfg.algo == "trpo" and cfg.decoupled and "decoupled" not in given_fields(cfg):
        fills["decoupled"] = False  # a preset's: TRPO's step has no clip to centre (given, check_options_read refuses)
    cfg = replace(cfg, given=False, **fills)
    if cfg.norm_obs and (info.is_image or info.obs_classes):
        what = "frames" if info.is_image else "a state index"
        raise ConfigError(f"--norm-obs needs vector observations; {info.env_id} observes {what}")
    if info.source != "envpool":
        cfg = own_env_options(cfg, info)
    validate(cfg)
    return cfg


def own_env_options(cfg: Config, info: EnvInfo) -> Config:
    """The options of EnvPool's own that a Gymnasium or device env has no use for: ConfigError when the caller
    gave them; a preset's --async-envs is dropped (such envs step all together, as the sync loop does)."""
    what = "a Gymnasium vector env" if info.source == "gym" else "an env on the device"
    given = given_fields(cfg)
    if cfg.async_envs and "async_envs" in given:
        hint = " (--env-kwargs vectorization_mode=async runs Gymnasium's envs in processes)" if info.source == "gym" \
            else ""
        raise ConfigError(f"--async-envs is EnvPool's send/recv; {info.env_id} is {what}, stepped all together"
                          f"{hint}")
    if cfg.env_threads and "env_threads" in given:
        raise ConfigError(f"--env-threads sets EnvPool's threads; {info.env_id} is {what}")
    return replace(cfg, given=False, async_envs=False, env_batch_size=None) if cfg.async_envs else cfg


def lr_schedule(cfg: Config) -> str:
    """The run's learning-rate schedule from --lr-schedule and --anneal-lr (see the --lr-schedule field).

    --lr-schedule as its caller gave it or a preset filled it in; a preset's that disagrees with an
    --anneal-lr / --no-anneal-lr its caller gave yields to it; None follows --anneal-lr. ConfigError when
    the caller gave both and they disagree on whether the rate anneals.
    """
    schedule = cfg.lr_schedule
    given = given_fields(cfg)
    if "anneal_lr" in given and schedule is not None and (schedule == "anneal") != cfg.anneal_lr:
        if "lr_schedule" in given:
            flag = "--anneal-lr" if cfg.anneal_lr else "--no-anneal-lr"
            raise ConfigError(f"--lr-schedule {schedule} contradicts {flag}; give one of them")
        schedule = None
    return schedule or ("anneal" if cfg.anneal_lr else "constant")


MAX_DIST_TIMEOUT = 365 * 24 * 3600  # torch keeps collective timeouts in milliseconds; a year is plenty


def host_memory_available() -> int:
    """Bytes of host memory available to a new allocation (Linux's MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def available_cpus() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # ~3.4e38: the networks, losses and optimizer run in float32
INT64_MAX = 2**63 - 1  # counters and sizes end up in int64 tensors and numpy arrays


# The scales of the update's float32 values: the learning rate (Adam's first step divides it by 1 - 0.9), the
# loss weights, PPO-penalty's beta and TRPO's trust region. Their products with what a working run computes
# (losses, gradients, activations well below 1e28) must stay within float32's 3.4e38; at 3e38 a CartPole
# run's first update overflowed (--learning-rate: a traceback in Adam; --vf-coef, --max-kl: NaN).
SCALES = ("learning_rate", "vf_coef", "ent_coef", "kl_coef", "kl_coef_min", "kl_coef_max", "max_kl")
SCALE_MAX = 1e10


@functools.cache
def _hints() -> dict[str, object]:
    """Config's field annotations, resolved (Annotated, e.g. tyro.conf.Suppress, stripped)."""
    return typing.get_type_hints(Config)


def describe_type(hint) -> str:
    """An annotation in words: "int or None", "one of 'ppo', 'trpo'", "tuple[str, ...]"."""
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(describe_type(arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return "None"
    return str(hint) if typing.get_args(hint) else getattr(hint, "__name__", str(hint))


def _takes_bool(hint) -> bool:
    return hint is bool or any(_takes_bool(arg) for arg in typing.get_args(hint))


def check_types(cfg: Config, where: str | None = None) -> None:
    """ConfigError unless every field of cfg has its annotation's type (typeguard, every item of a tuple):
    Config(algo="sac"), Config(norm_obs="yes") and a config.json's "num_envs": "4" are refused.

    A bool is not taken for a number (Python's bool is an int, but true is no count of envs). `where`
    names a saved config (its fields are then named as in the file, not as flags).
    """
    for name, hint in _hints().items():
        value = getattr(cfg, name)
        try:
            check_type(value, hint, collection_check_strategy=CollectionCheckStrategy.ALL_ITEMS)
            ok = not isinstance(value, bool) or _takes_bool(hint)
        except TypeCheckError:
            ok = False
        if not ok:
            field = f"{where}: {name}" if where else f"--{_flag(name)}"
            raise ConfigError(f"{field} must be {describe_type(hint)}, got {value!r}")


def check_numbers(cfg: Config) -> None:
    """ConfigError for a number no computation of the run can hold: a float that is not finite or
    beyond float32's range, an int beyond int64's. Each field's own range is validate's."""
    for name in _FIELD_NAMES:
        value = getattr(cfg, name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{_flag(name)} must be a finite number, got {value}")
        if isinstance(value, float) and abs(value) > FLOAT32_MAX:
            raise ConfigError(f"--{_flag(name)} {value:g} is beyond the float32 range fastppo computes in "
                              f"(|x| <= {FLOAT32_MAX:.3g})")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT64_MAX:
            raise ConfigError(f"--{_flag(name)} {value} is beyond the int64 range (|x| < 2^63)")


def validate(cfg: Config) -> None:
    """Raise ConfigError on the first bad value: its type (check_types), its range as a number
    (check_numbers), then the rules of each field and between fields."""
    check_types(cfg)
    check_numbers(cfg)
    for name in ("num_envs", "num_steps", "num_minibatches", "update_epochs", "total_timesteps",
                 "target_return_games"):
        value = getattr(cfg, name)
        if value <= 0:
            raise ConfigError(f"--{_flag(name)} must be positive, got {value}")
    for name in ("env_threads", "torch_threads", "save_every", "eval_every"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{_flag(name)} must be >= 0, got {getattr(cfg, name)}")
    cpus = available_cpus()
    for name in ("env_threads", "torch_threads"):
        if getattr(cfg, name) > cpus:
            raise ConfigError(f"--{_flag(name)} {getattr(cfg, name)} is more than the {cpus} CPU cores this process "
                              f"may use")
    if not 0 <= cfg.seed <= INT32_MAX:
        raise ConfigError(f"--seed must be in [0, 2^31), got {cfg.seed}")
    if cfg.num_envs * cfg.world_size > INT32_MAX:
        raise ConfigError(f"--num-envs {cfg.num_envs} is too large")
    if not 0 < cfg.dist_timeout <= MAX_DIST_TIMEOUT:
        raise ConfigError(f"--dist-timeout must be in (0, {MAX_DIST_TIMEOUT}] seconds, got {cfg.dist_timeout}")
    if cfg.capture_video and not cfg.eval_every:
        raise ConfigError("--capture-video films the --eval-every evaluations; give --eval-every too")
    if cfg.max_seconds is not None and not cfg.max_seconds > 0:
        raise ConfigError(f"--max-seconds must be positive, got {cfg.max_seconds}")
    for name in ("log_every", "eval_episodes"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"--{_flag(name)} must be positive, got {getattr(cfg, name)}")
    if not cfg.log_seconds >= 0:
        raise ConfigError(f"--log-seconds must be >= 0, got {cfg.log_seconds}")
    if cfg.max_episode_steps is not None and not 0 < cfg.max_episode_steps <= INT32_MAX:
        raise ConfigError(f"--max-episode-steps must be in [1, 2^31), got {cfg.max_episode_steps}")
    for name in ("learning_rate", "clip_coef", "kl_target", "kl_max", "kl_min", "kl_coef_min", "kl_coef_max"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"--{_flag(name)} must be positive, got {getattr(cfg, name)}")
    for name in ("ent_coef", "vf_coef", "max_grad_norm", "kl_coef"):
        if not getattr(cfg, name) >= 0:
            raise ConfigError(f"--{_flag(name)} must be >= 0, got {getattr(cfg, name)}")
    for name in SCALES:
        if getattr(cfg, name) > SCALE_MAX:
            raise ConfigError(f"--{_flag(name)} {getattr(cfg, name):g} is more than {SCALE_MAX:g}: it scales the "
                              f"update's float32 values, and one update would overflow them")
    if cfg.target_kl is not None and not cfg.target_kl > 0:
        raise ConfigError(f"--target-kl must be positive, got {cfg.target_kl}")
    for name in ("gamma", "gae_lambda"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ConfigError(f"--{_flag(name)} must be in [0, 1], got {getattr(cfg, name)}")
    if not 0.0 <= cfg.repeat_action_probability < 1.0:
        raise ConfigError(f"--repeat-action-probability must be in [0, 1), got {cfg.repeat_action_probability}")
    check_device(cfg.device)
    for name in ("max_kl", "cg_iters", "line_search_steps"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"--{_flag(name)} must be positive, got {getattr(cfg, name)}")
    if not cfg.cg_damping >= 0:
        raise ConfigError(f"--cg-damping must be >= 0, got {cfg.cg_damping}")
    if cfg.algo == "trpo":
        # PPO's options, and the forward wrappers that TRPO's double backward (Fisher-vector products) avoids
        refused = [flag for flag, on in (("--loss penalty", cfg.loss == "penalty"),
                                         ("--minibatch-by env", cfg.minibatch_by == "env"),
                                         ("--advantages epoch", cfg.advantages == "epoch"),
                                         ("--target-kl", cfg.target_kl is not None), ("--compile", cfg.compile),
                                         ("--bf16", cfg.bf16)) if on]
        if refused:
            raise ConfigError(f"{refused[0]} is for --algo ppo; --algo trpo does not take it")
    if cfg.decoupled and cfg.advantages == "epoch" and cfg.minibatch_by == "env":
        # that path's advantages come out of the fused GAE + loss op, where no weight can reach them
        raise ConfigError("--decoupled does not go with --advantages epoch --minibatch-by env (the fused GAE + loss "
                          "op); give --minibatch-by sample, or --no-decoupled")
    if cfg.kl_min >= cfg.kl_max:
        raise ConfigError(f"--kl-min ({cfg.kl_min}) must be below --kl-max ({cfg.kl_max})")
    if not 0 < cfg.kl_coef_min <= cfg.kl_coef_max:
        raise ConfigError(f"--kl-coef-min ({cfg.kl_coef_min}) must be positive and at most --kl-coef-max "
                          f"({cfg.kl_coef_max})")
    if cfg.loss == "penalty" and not cfg.kl_coef_min <= cfg.kl_coef <= cfg.kl_coef_max:
        raise ConfigError(f"--kl-coef {cfg.kl_coef} is outside [--kl-coef-min, --kl-coef-max] = "
                          f"[{cfg.kl_coef_min}, {cfg.kl_coef_max}]")
    if not 0 < cfg.lr_min <= cfg.lr_max:
        raise ConfigError(f"--lr-min ({cfg.lr_min}) must be positive and at most --lr-max ({cfg.lr_max})")
    if not cfg.lr_factor > 1:
        raise ConfigError(f"--lr-factor must be above 1, got {cfg.lr_factor}")
    if cfg.lr_schedule == "adaptive":
        if cfg.algo == "trpo":  # its policy step is sized by --max-kl; the learning rate is the critic's
            raise ConfigError("--lr-schedule adaptive is for --algo ppo; --algo trpo does not take it")
        if not cfg.lr_min <= cfg.learning_rate <= cfg.lr_max:
            raise ConfigError(f"--learning-rate {cfg.learning_rate} is outside [--lr-min, --lr-max] = "
                              f"[{cfg.lr_min}, {cfg.lr_max}]")
    if cfg.norm_value and cfg.minibatch_by == "env" and cfg.advantages == "epoch":
        # the fused GAE + loss op computes the advantages and the value loss from the same predictions
        raise ConfigError("--norm-value does not work with --minibatch-by env --advantages epoch (one fused op "
                          "computes GAE and the value loss from the same predictions); use --minibatch-by sample")
    if cfg.batch_size % cfg.num_minibatches:
        raise ConfigError(
            f"num_envs * num_steps = {cfg.num_envs} * {cfg.num_steps} = {cfg.batch_size} does not divide "
            f"by --num-minibatches {cfg.num_minibatches}"
        )
    if cfg.minibatch_by == "env" and cfg.num_envs % cfg.num_minibatches:
        raise ConfigError(
            f"--minibatch-by env: --num-envs {cfg.num_envs} does not divide by --num-minibatches {cfg.num_minibatches}"
        )
    if cfg.env_batch_size is not None:
        if not cfg.async_envs:
            raise ConfigError("--env-batch-size needs --async-envs")
        if not 1 <= cfg.env_batch_size <= cfg.num_envs:
            raise ConfigError(f"--env-batch-size must be in [1, --num-envs {cfg.num_envs}], got {cfg.env_batch_size}")
    if cfg.cudagraphs and training_device(cfg).type != "cuda":
        raise ConfigError("--cudagraphs needs CUDA; the training device is cpu")
    if cfg.total_timesteps < cfg.global_batch_size:
        ranks = f" * world_size {cfg.world_size}" if cfg.world_size > 1 else ""
        raise ConfigError(
            f"--total-timesteps {cfg.total_timesteps} is less than one rollout "
            f"(num_envs * num_steps{ranks} = {cfg.global_batch_size})"
        )


def device_named(name: str) -> torch.device:
    """The device a --device value names (auto = cuda when available), a CUDA device with its index.

    "cuda" becomes cuda:<current device> (cuda:0 unless the process chose another): everything fastppo
    passes a device to gets one with an index, because some of torch's CUDA calls refuse one without
    (``torch.cuda.set_device(torch.device("cuda"))`` raises in a new thread).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def check_device(name: str, flag: str = "--device") -> torch.device:
    """The device `name` names (device_named), or ConfigError (one line) for a name torch does not know, a
    device other than cpu or cuda, CUDA on a machine without it, or a CUDA index the machine does not have."""
    try:
        device = torch.device("cpu" if name == "auto" else name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{flag} {name!r} is not a device (auto, cpu, cuda or cuda:<index>)") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{flag} {name}: fastppo runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{flag} {name}: CUDA is not available on this machine (use cpu or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device_named(name)


def training_device(cfg: Config) -> torch.device:
    """The device named by --device."""
    return device_named(cfg.device)


# Options only one algorithm, PPO's penalty loss or the adaptive learning rate reads. The KL target and
# its bounds drive both beta (--loss penalty) and the adaptive learning rate.
PENALTY_ONLY = {"kl_coef", "kl_coef_min", "kl_coef_max"}
KL_TARGET = {"kl_target", "kl_max", "kl_min"}
ADAPTIVE_LR_ONLY = {"lr_min", "lr_max", "lr_factor"}
TRPO_ONLY = {"max_kl", "cg_iters", "cg_damping", "line_search_steps"}
PPO_ONLY = ({"loss", "decoupled", "clip_coef", "clip_vloss", "ent_coef", "vf_coef", "target_kl"} | PENALTY_ONLY
            | KL_TARGET)


def unread_options(algo: str, loss: str, schedule: str | None = None) -> set[str]:
    """The options a run of `algo` (and, for PPO, `loss`) with the learning-rate `schedule` does not read."""
    adaptive = schedule == "adaptive"
    unread = ADAPTIVE_LR_ONLY if not adaptive else set()
    if algo == "trpo":
        return PPO_ONLY | unread
    penalty = loss == "penalty"
    return (TRPO_ONLY | unread | (PENALTY_ONLY if not penalty else set())
            | (KL_TARGET if not (penalty or adaptive) else set()))


def check_options_read(cfg: Config) -> None:
    """ConfigError when the caller set an option the run would ignore (--ent-coef with --algo trpo, --max-kl
    with --algo ppo, --kl-coef with --loss clip, --kl-target with neither --loss penalty nor --lr-schedule
    adaptive): a value given is a value used. For a config with its preset's values in (apply_preset)."""
    schedule = lr_schedule(cfg)
    unread = sorted(given_fields(cfg) & unread_options(cfg.algo, cfg.loss, schedule), key=_FIELD_NAMES.index)
    if not unread:
        return
    name = unread[0]
    run = f"--algo {cfg.algo}" + (f", --loss {cfg.loss}" if cfg.algo == "ppo" else "")
    if name in TRPO_ONLY:
        owner = "--algo trpo"
    elif cfg.algo == "trpo":
        owner = "--algo ppo"
    elif name in ADAPTIVE_LR_ONLY:
        owner, run = "--lr-schedule adaptive", f"--lr-schedule {schedule}"
    elif name in KL_TARGET:
        owner, run = "--loss penalty or --lr-schedule adaptive", f"{run}, --lr-schedule {schedule}"
    else:
        owner = "--loss penalty"
    raise ConfigError(f"--{_flag(name)} is for {owner}; this run ({run}) does not read it")


def _flag(name: str) -> str:
    return name.replace("_", "-")


# --- the run folder -------------------------------------------------------------------------------


def default_run_dir(cfg: Config, now: float) -> str:
    """runs/<env>__<exp>__<seed>__<unix time>, CleanRL's run name."""
    name = f"{cfg.env_id}__{cfg.exp_name}__{cfg.seed}__{int(now)}"
    return os.path.join("runs", re.sub(r"[^A-Za-z0-9_.-]", "_", name))


RUN_MARKERS = ("config.json", "metrics.jsonl", "checkpoints")
NAME_MAX, PATH_MAX = 255, 4095  # bytes, Linux's limits for one folder name and for a whole path


def check_run_dir(path: str, flag: str = "--run-dir") -> None:
    """A run folder must be new or empty of run files, and makeable: never overwrite a user's run.

    flag names the option the path came from (--exp-name for the default name). Creates nothing.
    """
    if not path:
        raise ConfigError(f"{flag} must not be empty")
    if len(os.fsencode(path)) > PATH_MAX:
        raise ConfigError(f"{flag}: the run folder's path is {len(os.fsencode(path))} bytes, more than {PATH_MAX}")
    for part in path.split(os.sep):
        if len(os.fsencode(part)) > NAME_MAX:
            raise ConfigError(f"{flag}: the folder name {part[:24]!r}... is {len(os.fsencode(part))} bytes, more "
                              f"than the {NAME_MAX} a file system allows")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--run-dir {path!r} exists and is not a folder")
    for marker in RUN_MARKERS:
        if os.path.exists(os.path.join(path, marker)):
            raise ConfigError(f"--run-dir {path!r} already holds a run ({marker}); choose another folder")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"--run-dir {path!r}: {existing!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--run-dir {path!r}: the folder {existing!r} is not writable")


def save_config(cfg: Config, path: str) -> None:
    """Write config.json atomically (a resume rewrites it)."""
    from fastppo.logger import write_atomically

    write_atomically(path, json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")


def _not_json(token: str):
    raise ValueError(f"{token} is not JSON")  # Python's json reads NaN and Infinity; fastppo never writes them


def read_config(run: str) -> dict:
    """A run folder's config.json as a dict with a string env_id; ConfigError (one line) otherwise."""
    path = os.path.join(run, "config.json")
    try:
        with open(path) as f:
            config = json.load(f, parse_constant=_not_json)
    except FileNotFoundError:
        raise ConfigError(f"{run!r} has no config.json: not a run folder") from None
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise ConfigError(f"{path!r} does not read as JSON ({why})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path!r} is not a JSON object")
    if not isinstance(config.get("env_id"), str) or not config["env_id"]:
        raise ConfigError(f"{path!r} names no env_id")
    return config


# Flags that may be given with --resume: they change how long the run goes on and what it reports,
# never the algorithm, the environments or the seed (so the resumed run stays the same run).
RESUME_FLAGS = (
    "resume", "total_timesteps", "max_seconds", "save_every", "log_every", "log_seconds", "eval_every",
    "eval_episodes", "capture_video", "track", "wandb_project", "wandb_entity", "wandb_group", "wandb_tags",
    "tensorboard", "device", "env_threads", "torch_threads", "dist_timeout",
)
# What names a run: every field but those a resume may change and the folder's own name.
IDENTITY_EXCLUDED = set(RESUME_FLAGS) | {"run_dir", "exp_name"}
# Fields added after runs had been saved, with the value every run saved before them has (and lr_schedule,
# which such a run's anneal_lr says).
ADDED_FIELDS = {"norm_value": False, "lr_min": 1e-6, "lr_max": 1e-2, "lr_factor": 1.5}


def with_added_fields(config: dict) -> dict:
    """A saved config dict with the fields added to Config after it was written (missing or None in it) as
    the run had them, so that it compares with the config of a run saved now."""
    out = dict(config)
    for name, before in ADDED_FIELDS.items():
        if out.get(name) is None:
            out[name] = before
    if out.get("lr_schedule") is None:
        out["lr_schedule"] = "anneal" if out.get("anneal_lr", True) else "constant"
    return out


def run_identity(config: dict) -> str:
    """A short hash of the fields that define a run (its algorithm, envs and seed), from a config dict.

    A checkpoint belongs to a run folder when its config has the folder's identity.
    """
    import hashlib

    return hashlib.sha256(json.dumps(_identity_fields(config), sort_keys=True, default=list).encode()).hexdigest()[:12]


def _identity_fields(config: dict) -> dict:
    config = with_added_fields(config)  # a run saved by an earlier fastppo still resumes after an upgrade
    kept = {k: config.get(k) for k in _FIELD_NAMES if k not in IDENTITY_EXCLUDED}
    kept["world_size"] = config.get("world_size", 1)
    return kept


def config_difference(a: dict, b: dict) -> str | None:
    """The first field that defines a run (see run_identity) whose value differs between two config dicts."""
    a, b = _identity_fields(a), _identity_fields(b)
    return next((k for k in a if json.dumps(a[k], default=list) != json.dumps(b[k], default=list)), None)


# What a resume reads from the folder's config.json, when it was edited there: the fields a resume may change
# (the RESUME_FLAGS) and the run's name. Every other field must equal the checkpoint's (config_difference).
CONFIG_EDITABLE = tuple(n for n in RESUME_FLAGS if n != "resume") + ("exp_name",)
# Config.to_dict's derived sizes: written to config.json for the reader, never read back.
DERIVED = ("batch_size", "minibatch_size", "global_batch_size", "num_iterations")


def resume_config(saved: dict, folder: dict, given: Config, where: str = "config.json") -> Config:
    """The config of a resumed run: the checkpoint's (`saved`), with the fields of the folder's config.json
    (`folder`, read from `where`) that a resume may change (CONFIG_EDITABLE), then the RESUME_FLAGS the
    caller set on `given`.

    The caller has checked that saved and folder agree on every other field (config_difference). Raises
    ConfigError naming the first flag that may not change on resume, a config.json key that is no option,
    or a value of the wrong type.
    """
    explicit = given_fields(given)
    refused = sorted(explicit - set(RESUME_FLAGS))
    if refused:
        allowed = ", ".join(f"--{_flag(n)}" for n in RESUME_FLAGS[1:])
        raise ConfigError(f"--{_flag(refused[0])} cannot be given with --resume (the run keeps its config; "
                          f"allowed: {allowed})")
    unknown = sorted(set(folder) - set(_FIELD_NAMES) - set(DERIVED))
    if unknown:
        raise ConfigError(f"{where!r}: {unknown[0]!r} is not an option of fastppo train; remove it")
    values = {k: v for k, v in saved.items() if k in _FIELD_NAMES}
    values.update({k: folder[k] for k in CONFIG_EDITABLE if k in folder})
    hints = _hints()
    for k, v in values.items():  # JSON has no tuples
        if isinstance(v, list) and tuple in map(typing.get_origin, (hints[k], *typing.get_args(hints[k]))):
            values[k] = tuple(v)
    cfg = mark_given(Config(**values), set())  # the saved values are the run's; given: this caller's flags
    check_types(cfg, repr(where))
    for name in explicit:
        setattr(cfg, name, getattr(given, name))
    cfg.resume = given.resume
    cfg.run_dir = given.resume
    validate(cfg)
    return cfg
