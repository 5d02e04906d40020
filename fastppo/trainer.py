"""The training loop: collect a rollout, compute advantages, update the policy, log, repeat.

Plain functions over plain tensors, CleanRL's order of operations:

    for iteration in 1..num_iterations:
        anneal the learning rate
        collector.collect(policy, buf)            # envs -> rollout storage on the device
        compute_advantages(buf, ops.gae, ...)     # GAE, once per rollout
        update(policy, optimizer, buf, ...)       # K epochs of shuffled minibatches
        [penalty] beta <- adaptive rule(KL)       # once per iteration, after the epochs
        log metrics; checkpoint

Under torchrun each rank runs this loop on its own envs; see ``distributed`` for what is shared.
"""

from __future__ import annotations

import math
import os
import random
import time

import numpy as np
import torch
from torch import nn

from fastppo import distributed, kernels
from fastppo.advantage import compute_advantages, explained_variance
from fastppo.checkpoint import list_checkpoints, save_checkpoint
from fastppo.config import Config, check_run_dir, default_run_dir, resolve, save_config, training_device
from fastppo.distributed import World
from fastppo.envs import EnvInfo, env_info, make_envs
from fastppo.logger import RunLogger
from fastppo.loss import AdaptiveKLCoef, minibatch_loss, policy_kl
from fastppo.policy import make_policy
from fastppo.rollout import Collector, Rollout


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the run stops and keeps its last good checkpoint."""


def seed_everything(seed: int, torch_deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic


def flatten(buf: Rollout) -> dict[str, torch.Tensor]:
    """(T, N, ...) -> (T * N, ...) views of the fields the update reads."""
    T, N = buf.rewards.shape
    return {
        "obs": buf.obs.reshape(T * N, *buf.obs.shape[2:]),
        "actions": buf.actions.reshape(-1),
        "logprobs": buf.logprobs.reshape(-1),
        "logits": buf.logits.reshape(T * N, -1),
        "values": buf.values[:T].reshape(-1),
        "advantages": buf.advantages.reshape(-1),
        "returns": buf.returns.reshape(-1),
        "valid": buf.valid.reshape(-1),
    }


def update(
    policy: nn.Module,
    optimizer: torch.optim.Optimizer,
    buf: Rollout,
    cfg: Config,
    ppo_loss,
    kl_coef: float,
) -> dict[str, torch.Tensor]:
    """K epochs of shuffled minibatches over the rollout.

    Returns detached 0-dim stats of the last minibatch (as CleanRL logs them) with clipfrac averaged
    over all minibatches, and the number of epochs run.
    """
    b = flatten(buf)
    device = b["actions"].device
    clipfracs = []
    epochs_run = 0
    for _epoch in range(cfg.update_epochs):
        perm = torch.randperm(cfg.batch_size, device=device)
        for start in range(0, cfg.batch_size, cfg.minibatch_size):
            idx = perm[start : start + cfg.minibatch_size]
            mb = {k: v[idx] for k, v in b.items()}
            logits, newvalue = policy(mb["obs"])
            loss, stats = minibatch_loss(ppo_loss, cfg, kl_coef, logits, newvalue, mb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            optimizer.step()
            clipfracs.append(stats["clipfrac"])
        epochs_run += 1
        # Host-device sync, deliberate and only with --target-kl: the early stop is a host decision,
        # taken on the KL averaged over the ranks so that all of them stop at the same epoch.
        if cfg.target_kl is not None and distributed.all_reduce_mean(stats["approx_kl"]).item() > cfg.target_kl:
            break
    out = dict(stats)
    out["clipfrac"] = torch.stack(clipfracs).mean()
    out["loss"] = loss.detach()
    out["epochs"] = torch.tensor(epochs_run)
    return out


def checkpoint_state(
    cfg: Config, policy: nn.Module, optimizer: torch.optim.Optimizer, iteration: int, global_step: int,
    kl_ctl: AdaptiveKLCoef,
) -> dict:
    return {
        "model": policy.state_dict(),
        "optimizer": optimizer.state_dict(),
        "config": cfg.to_dict(),
        "iteration": iteration,
        "global_step": global_step,
        "kl_coef": kl_ctl.beta,
    }


def prepare(cfg: Config, world: World | None = None) -> tuple[Config, EnvInfo, torch.device]:
    """Validate everything the user gave, before any env, file, device memory or process group exists.

    Every check here gives the same answer on every rank. Returns the resolved config, the env's
    info and this rank's device (world: None for a plain run). Raises EnvError / ConfigError (one
    line each).
    """
    world = world or World()
    info = env_info(cfg.env_id)
    cfg = resolve(cfg, info, world.size)
    cfg.env_threads = distributed.env_threads(cfg.env_threads, cfg.num_envs, world)
    device = distributed.rank_device(training_device(cfg), world)
    return cfg, info, device


def claim_run_dir(cfg: Config) -> str:
    """The run folder (named now when --run-dir is not given), checked to hold no run yet."""
    run_dir = cfg.run_dir or default_run_dir(cfg, time.time())
    check_run_dir(run_dir)
    return run_dir


def episode_means(returns: list[float], lengths: list[int], device: torch.device
                  ) -> tuple[float | None, float | None, int]:
    """Mean full-game return and length, and the game count, over the games of all ranks."""
    # float64: the sums stay exact, and one rank gives what np.mean gives.
    totals = torch.tensor([np.sum(returns), np.sum(lengths), len(returns)], dtype=torch.float64, device=device)
    ret_sum, len_sum, games = distributed.all_reduce_sum(totals).tolist()
    if not games:
        return None, None, 0
    return ret_sum / games, len_sum / games, int(games)


def train(cfg: Config) -> dict:
    """Train from cfg; returns the last metrics line. Writes cfg.run_dir (see README).

    Under torchrun: one rank of a data-parallel run; only rank 0 prints and writes cfg.run_dir.
    """
    world = World.from_env()
    cfg, info, device = prepare(cfg, world)
    with distributed.process_group(world, device, cfg.dist_timeout):
        return _train(cfg, info, device, world)


def _train(cfg: Config, info: EnvInfo, device: torch.device, world: World) -> dict:
    run_dir = cfg.run_dir = distributed.on_main(lambda: claim_run_dir(cfg))
    main = distributed.is_main()
    torch_seed, env_seed = distributed.rank_seeds(cfg.seed, cfg.num_envs, world.rank)
    seed_everything(torch_seed, cfg.torch_deterministic)
    if main:
        os.makedirs(run_dir, exist_ok=True)
        save_config(cfg, os.path.join(run_dir, "config.json"))
    envs = make_envs(
        info, cfg.num_envs, env_seed,
        num_threads=cfg.env_threads,
        max_episode_steps=cfg.max_episode_steps,
        repeat_action_probability=cfg.repeat_action_probability,
    )
    policy = make_policy(info).to(device)
    train_policy = distributed.wrap_model(policy, device)  # DDP under torchrun: gradients averaged in backward
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.learning_rate, eps=1e-5)
    ops = kernels.select(cfg.kernels, device)
    buf = Rollout.allocate(info, cfg.num_steps, cfg.num_envs, device)
    collector = Collector(envs, info, device)
    kl_ctl = AdaptiveKLCoef(cfg.kl_coef, cfg.kl_min, cfg.kl_max)
    logger = RunLogger(run_dir) if main else None

    global_step = 0
    start_time = time.time()
    metrics: dict = {}
    try:
        for iteration in range(1, cfg.num_iterations + 1):
            if cfg.anneal_lr:
                frac = 1.0 - (iteration - 1.0) / cfg.num_iterations
                optimizer.param_groups[0]["lr"] = frac * cfg.learning_rate
            lr = optimizer.param_groups[0]["lr"]

            collector.collect(policy, buf)
            global_step += cfg.global_batch_size
            compute_advantages(buf, ops.gae, cfg.gamma, cfg.gae_lambda)
            kl_coef = kl_ctl.beta
            stats = update(train_policy, optimizer, buf, cfg, ops.ppo_loss, kl_coef)
            if cfg.loss == "penalty":
                b = flatten(buf)
                stats["kl"] = policy_kl(policy, b["obs"], b["logits"], b["valid"], cfg.minibatch_size)
            stats["explained_variance"] = explained_variance(
                buf.values[:-1].reshape(-1), buf.returns.reshape(-1), buf.valid.reshape(-1)
            )

            # Host-device sync, deliberate: one per iteration, to log (and to decide beta on). The
            # values are means over the ranks, so beta and the NaN stop are the same on all of them.
            names = list(stats)
            reduced = distributed.all_reduce_mean(torch.stack([stats[k].to(device, torch.float64) for k in names]))
            values = dict(zip(names, reduced.tolist(), strict=True))
            if not math.isfinite(values["loss"]):
                last = list_checkpoints(run_dir)
                kept = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written"
                raise TrainingDiverged(
                    f"loss is {values['loss']} at iteration {iteration} (global step {global_step}); "
                    f"stopping, {kept}"
                )
            if cfg.loss == "penalty":
                kl_ctl.update(values["kl"])

            mean_return, mean_length, games = episode_means(*collector.stats.pop(), device)
            metrics = {
                "global_step": global_step,
                "iteration": iteration,
                "num_iterations": cfg.num_iterations,
                "charts/episodic_return": mean_return,
                "charts/episodic_length": mean_length,
                "charts/episodes": games,
                "charts/SPS": int(global_step / (time.time() - start_time)),
                "charts/learning_rate": lr,
                "losses/policy_loss": values["policy_loss"],
                "losses/value_loss": values["value_loss"],
                "losses/entropy": values["entropy"],
                "losses/approx_kl": values["approx_kl"],
                "losses/old_approx_kl": values["old_approx_kl"],
                "losses/clipfrac": values["clipfrac"],
                "losses/explained_variance": values["explained_variance"],
                "losses/kl": values["kl"],
                "losses/kl_coef": kl_coef,
                "losses/epochs": int(values["epochs"]),
            }
            if main:
                logger.log(metrics)

            if main and cfg.save_every and iteration % cfg.save_every == 0 and iteration != cfg.num_iterations:
                save_checkpoint(run_dir, iteration,
                                checkpoint_state(cfg, policy, optimizer, iteration, global_step, kl_ctl))
        if main:
            save_checkpoint(run_dir, cfg.num_iterations,
                            checkpoint_state(cfg, policy, optimizer, cfg.num_iterations, global_step, kl_ctl))
    finally:
        if logger is not None:
            logger.close()
        envs.close()
    return metrics
