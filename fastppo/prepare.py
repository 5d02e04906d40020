"""Everything decided once, before the training loop: every input checked, the preset applied, a resume's
folder and checkpoint checked against each other, the run folder claimed, the device placed.

Read top to bottom, it is what ``fastppo train`` does before its first iteration:

* :func:`prepare` (a new run) or :func:`prepare_resume` (``--resume``): the Config's types and ranges,
  the env's spaces and options, the preset, the options the algorithm reads, the derived sizes
  (``config.resolve``), the device and the rollout's memory (:func:`place`), the kernels; for a resume,
  the folder's lock, its newest checkpoint, the checkpoint's identity and values against the folder's
  config.json (:func:`check_loadable`). Nothing is written, no env exists: a bad input is one line.
* :func:`claim_run_dir`: the new run's folder, checked, made and locked (rank 0).

The loop itself, and :func:`fastppo.trainer.build` which makes the envs, networks and collection from
a :class:`Prepared`, are in ``trainer``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fastppo import distributed, kernels, tracking
from fastppo.checkpoint import CheckpointError, bad_actions, best_score, check_belongs, load_resumable
from fastppo.config import (
    Config,
    ConfigError,
    check_options_read,
    check_types,
    default_run_dir,
    env_kind,
    host_memory_available,
    read_config,
    resolve,
    resume_config,
    training_device,
    with_env_id,
)
from fastppo.distributed import World
from fastppo.envs import EnvInfo, env_info
from fastppo.evaluate import check_video
from fastppo.gymenv import check_same_env
from fastppo.normalize import Normalizers, ObsNormalizer, RewardScaler, ValueNormalizer
from fastppo.policy import make_policy
from fastppo.presets import apply_preset
from fastppo.rollout import storage_bytes
from fastppo.runfolder import RunFolder


@dataclass
class Prepared:
    """What prepare / prepare_resume checked: the resolved config, the env, this rank's device and ops,
    and for a resume its folder (locked on rank 0) and checkpoint."""

    cfg: Config
    info: EnvInfo
    device: torch.device
    ops: kernels.Ops
    resume: dict | None = None
    folder: RunFolder | None = None
    command: str = "fastppo train"  # how the run was started (logger.command_line), for its model card


def select_ops(cfg: Config, device: torch.device) -> kernels.Ops:
    try:
        return kernels.select(cfg.kernels, device)
    except ValueError as e:
        raise ConfigError(f"--kernels {cfg.kernels}: {e}") from None


def check_memory(cfg: Config, info: EnvInfo, device: torch.device) -> None:
    """ConfigError when the rollout storage (and EnvPool's buffers) cannot fit, naming the bytes (a device env's
    own memory is not known: not counted)."""
    rollout = storage_bytes(info, cfg.num_steps, cfg.num_envs, buffers=2 if cfg.overlap else 1,
                            async_batch=cfg.recv_batch_size if cfg.async_envs else None)
    # EnvPool's state queue holds a few observations per env (a Gymnasium env's arrays are of that order)
    envs = 0 if info.source == "device" else 3 * cfg.num_envs * info.obs_bytes
    if device.type == "cuda":
        checks = [(rollout, torch.cuda.mem_get_info(device)[0], f"free on {device}"),
                  (envs, host_memory_available(), "available in host memory")]
    else:
        checks = [(rollout + envs, host_memory_available(), "available in host memory")]
    for need, free, where in checks:
        if need > free:
            raise ConfigError(f"the rollout of --num-envs {cfg.num_envs} x --num-steps {cfg.num_steps} needs "
                              f"{need / 2**30:,.1f} GiB, more than the {free / 2**30:,.1f} GiB {where}")


def prepare(cfg: Config, world: World | None = None, env: Callable | None = None) -> Prepared:
    """Validate everything the caller gave, before any env, file, device memory or process group exists.

    Every check here gives the same answer on every rank; the run folder is claimed later, on rank 0.
    env: the factory given to ``fastppo.train(cfg, env=...)``. The user's own envs (a ``gym:`` or ``torch:``
    id, or env) are made once here, checked and closed (``gymenv.own_env_info``): a factory that raises, an
    env that breaks the protocol, is one line before the run folder exists.
    Raises EnvError / ConfigError (one line each).
    """
    world = world or World()
    check_types(cfg)
    cfg = with_env_id(cfg, env)
    info = env_info(cfg.env_id, cfg.env_kwargs, env=env, device=cfg.device)
    cfg = apply_preset(cfg, env_kind(info))
    check_options_read(cfg)  # with the preset's values: a preset may set what decides which options are read
    cfg = resolve(cfg, info, world.size)
    device = place(cfg, info, world)
    return Prepared(cfg, info, device, select_ops(cfg, device))


def place(cfg: Config, info: EnvInfo, world: World) -> torch.device:
    """This rank's env threads and device, once the resolved config fits them: the rollout's memory, and a
    renderer for --capture-video. Returns the device."""
    cfg.env_threads = distributed.env_threads(cfg.env_threads, cfg.num_envs, world)
    device = distributed.rank_device(training_device(cfg), world)
    check_memory(cfg, info, device)
    if cfg.capture_video:
        check_video(info, "--capture-video", device)
    return device


def prepare_resume(cfg: Config, world: World | None = None, env: Callable | None = None) -> Prepared:
    """--resume: lock the run folder (rank 0), load and check its newest checkpoint against the folder,
    and merge the config, changing no file.

    The checkpoint must belong to the folder: its config agrees with the folder's config.json on every
    field that defines the run (env, algorithm, seed, sizes: config.config_difference), and its model,
    optimizer state and action log fit that config. The fields a resume may change are taken from
    config.json (a user may edit them there), then from the caller's flags. Under torchrun every rank
    reads the same checkpoint (the run folder must be visible to all). env: the factory of a run trained
    with ``fastppo.train(cfg, env=...)``, which must be the one its config.json names. Raises CheckpointError /
    ConfigError / EnvError (one line each).
    """
    world = world or World()
    folder = RunFolder.lock_existing(cfg.resume) if world.rank == 0 else None
    try:
        state = load_resumable(cfg.resume)
        folder_config = read_config(cfg.resume)
        path, config_path = state["path"], os.path.join(cfg.resume, "config.json")
        check_belongs(state, folder_config, config_path)
        # best.pt too: a foreign one (its score forged, say) would be kept, logged as eval/best_return, played
        state["best_eval"] = max(state.get("best_eval", -math.inf), best_score(cfg.resume, folder_config))
        saved_world = state["config"].get("world_size", 1)
        if saved_world != world.size:
            raise ConfigError(f"the run in {cfg.resume!r} was trained by {saved_world} rank(s); resume it with "
                              f"{saved_world} (this launch has {world.size})")
        cfg = resume_config(state["config"], folder_config, cfg, config_path)
        if cfg.track:
            tracking.tracked_run(cfg.run_dir)  # a damaged W&B record is an error now, not after the envs exist
        if env is not None:
            check_same_env(env, cfg.env_id)
        info = env_info(cfg.env_id, cfg.env_kwargs, env=env, device=cfg.device)
        cfg = resolve(cfg, info, world.size)
        iteration = state["iteration"]
        if cfg.num_iterations <= iteration:
            raise ConfigError(f"the run in {cfg.run_dir!r} already ran {iteration} of its {cfg.num_iterations} "
                              f"iterations ({state['global_step']:,} steps); raise --total-timesteps to go on")
        if state["global_step"] != iteration * cfg.global_batch_size:
            raise CheckpointError(f"{path!r} is damaged: global step {state['global_step']} after {iteration} "
                                  f"iterations of {cfg.global_batch_size}")
        replayable = not (cfg.async_envs or cfg.overlap)
        expected = (iteration * cfg.num_steps, cfg.num_envs * cfg.world_size, *info.action_shape)
        if replayable and (state["actions"] is None or tuple(state["actions"].shape) != expected):
            got = None if state["actions"] is None else tuple(state["actions"].shape)
            raise CheckpointError(f"{path!r} does not match its config (actions of shape {got}, expected {expected})")
        check_loadable(state, info, cfg)
        device = place(cfg, info, world)
        return Prepared(cfg, info, device, select_ops(cfg, device), state, folder,
                        state.get("command", "fastppo train"))
    except BaseException:
        if folder is not None:
            folder.release()
        raise


def make_optimizer(policy: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """Adam (eps 1e-5) over what the update steps with it: every parameter for PPO, the critic's for TRPO
    (whose policy moves by its natural-gradient step). fused: one kernel for the whole step, on CUDA and
    on the CPU (there 0.08 ms a step for the MLPs against 0.25 ms with foreach and 0.34 ms per parameter;
    the update of a continuous-control iteration takes 320 of them)."""
    params = policy.value_parameters() if cfg.algo == "trpo" else policy.parameters()
    return torch.optim.Adam(params, lr=cfg.learning_rate, eps=1e-5, fused=True)


def make_normalizers(cfg: Config, info: EnvInfo, device: torch.device) -> Normalizers:
    """The run's observation normaliser, reward scaler and value normaliser (--norm-obs, --norm-reward,
    --norm-value), on device. The collectors use the first two; the trainer reads ``value``."""
    return Normalizers(ObsNormalizer(info.obs_shape, device) if cfg.norm_obs else None,
                       RewardScaler(cfg.num_envs, cfg.gamma, device) if cfg.norm_reward else None,
                       ValueNormalizer(device) if cfg.norm_value else None)


def check_loadable(state: dict, info: EnvInfo, cfg: Config) -> None:
    """CheckpointError unless the checkpoint's model, optimizer state, action log (every action one the
    env takes), normalisation statistics, adaptive learning rate and per-rank collection state load into
    this run's networks, envs and collectors."""
    policy = make_policy(info)
    expected = {k: tuple(v.shape) for k, v in policy.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state["model"].items()}
    if got != expected:
        wrong = sorted(set(got) ^ set(expected)) or sorted(k for k in got if got[k] != expected[k])
        raise CheckpointError(f"{state['path']!r} does not fit a {info.env_id} policy (at {wrong[0]}: "
                              f"{got.get(wrong[0])} vs {expected.get(wrong[0])})")
    optimizer = make_optimizer(policy, cfg)
    try:
        optimizer.load_state_dict(state["optimizer"])
        for p in (p for group in optimizer.param_groups for p in group["params"]):  # Adam's moments, in shape
            slots = optimizer.state[p]
            if {k: tuple(v.shape) for k, v in slots.items() if k != "step"} != {"exp_avg": p.shape,
                                                                               "exp_avg_sq": p.shape}:
                raise ValueError(f"Adam's state of a parameter of shape {tuple(p.shape)} is {sorted(slots)}")
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{state['path']!r} is damaged: its optimizer state does not load ({e})") from None
    wrong = bad_actions(state["actions"], info.num_actions, info.continuous)
    if wrong is not None:
        raise CheckpointError(f"{state['path']!r} is damaged: its {wrong}")
    if cfg.lr_schedule == "adaptive":
        lr = state.get("adaptive_lr")
        if not (isinstance(lr, float) and cfg.lr_min <= lr <= cfg.lr_max):
            raise CheckpointError(f"{state['path']!r} is damaged: its adaptive learning rate {lr!r} is not a number "
                                  f"in [--lr-min, --lr-max] = [{cfg.lr_min}, {cfg.lr_max}]")
    norms = make_normalizers(cfg, info, torch.device("cpu"))
    try:
        norms.load_state_dict(state.get("normalizer", {}))
        parts = state.get("collection", [{}] * cfg.world_size)
        if not (isinstance(parts, list) and len(parts) == cfg.world_size and all(isinstance(c, dict) for c in parts)):
            raise ValueError(f"expected one collection state per rank ({cfg.world_size})")
        for part in parts:
            returns = part.get("reward_returns")
            if norms.reward is not None and returns is not None and (
                    not isinstance(returns, torch.Tensor) or returns.shape != norms.reward.returns.shape):
                raise ValueError(f"discounted returns of shape {getattr(returns, 'shape', None)}, expected "
                                 f"({cfg.num_envs},)")
    except (KeyError, ValueError, TypeError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"{state['path']!r} is damaged: its normalisation or collection state does not load "
                              f"({type(e).__name__}: {e})") from None




def claim_run_dir(cfg: Config) -> RunFolder:
    """The new run's folder (named now when --run-dir is not given): checked, made and locked."""
    if cfg.run_dir is not None:
        return RunFolder.claim_new(cfg.run_dir)
    return RunFolder.claim_new(default_run_dir(cfg, time.time()), flag="--exp-name (the default --run-dir)")
