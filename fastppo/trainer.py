"""The training loop: collect a rollout, compute advantages, update the policy, log, repeat.

Plain functions over plain tensors, CleanRL's order of operations:

    for iteration in 1..num_iterations:
        anneal the learning rate
        collector.collect(policy, buf)            # envs -> rollout storage on the device
        compute_advantages(buf, ops.gae, ...)     # GAE, once per rollout
        update(policy, optimizer, buf, ...)       # K epochs of shuffled minibatches
        [penalty] beta <- adaptive rule(KL)       # once per iteration, after the epochs
        log metrics; checkpoint

With --overlap the collection of rollout k+1 runs in the background (rollout.BackgroundCollection),
acting with a frozen copy of the weights, while the main thread runs GAE and the update on rollout k.
"""

from __future__ import annotations

import collections
import copy
import math
import os
import random
import time

import numpy as np
import torch
from torch import nn

from fastppo import kernels
from fastppo.advantage import compute_advantages, explained_variance
from fastppo.checkpoint import list_checkpoints, save_checkpoint
from fastppo.config import Config, ConfigError, check_run_dir, default_run_dir, resolve, save_config, training_device
from fastppo.envs import EnvInfo, env_info, make_envs
from fastppo.logger import RunLogger
from fastppo.loss import AdaptiveKLCoef, loss_kwargs, minibatch_loss, policy_kl
from fastppo.perf import PHASES, Actor, PhaseTimer, copy_weights, learner_forward
from fastppo.policy import make_policy
from fastppo.rollout import AsyncCollector, BackgroundCollection, Collector, Rollout


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


def value_predictions(policy: nn.Module, buf: Rollout, chunk: int) -> torch.Tensor:
    """V(s) of every observation of the rollout under the current policy, row T included: (T + 1, N)."""
    T, N = buf.rewards.shape
    obs = torch.cat([buf.obs, buf.next_obs.unsqueeze(0)]).flatten(0, 1)  # ((T + 1) * N, ...)
    with torch.no_grad():
        values = torch.cat([policy(obs[i : i + chunk])[1].float() for i in range(0, obs.shape[0], chunk)])
    return values.view(T + 1, N)


def sample_minibatches(policy: nn.Module, buf: Rollout, cfg: Config, ops: kernels.Ops, kl_coef: float):
    """One epoch of CleanRL's minibatches: shuffled samples of the flattened rollout.

    Yields (loss, stats) per minibatch; the caller steps the optimizer before the next one.
    """
    b = flatten(buf)
    if cfg.advantages == "epoch":  # GAE again, from the current value predictions
        advantages, returns = ops.gae(buf.rewards, value_predictions(policy, buf, cfg.minibatch_size),
                                      buf.terminated, buf.truncated, cfg.gamma, cfg.gae_lambda)
        b["advantages"], b["returns"] = advantages.reshape(-1), returns.reshape(-1)
    perm = torch.randperm(cfg.batch_size, device=b["actions"].device)
    for start in range(0, cfg.batch_size, cfg.minibatch_size):
        idx = perm[start : start + cfg.minibatch_size]
        mb = {k: v[idx] for k, v in b.items()}
        logits, newvalue = policy(mb["obs"])
        yield minibatch_loss(ops.ppo_loss, cfg, kl_coef, logits, newvalue, mb)


def env_minibatches(policy: nn.Module, buf: Rollout, cfg: Config, ops: kernels.Ops, kl_coef: float):
    """One epoch of minibatches made of whole env columns, (T, n) each.

    With --advantages epoch, each minibatch recomputes its columns' GAE from the values the forward
    pass just predicted (bootstrap row included) inside one fused GAE + loss op.
    """
    T, N = buf.rewards.shape
    n = N // cfg.num_minibatches
    perm = torch.randperm(N, device=buf.actions.device)
    for start in range(0, N, n):
        cols = perm[start : start + n]
        if cfg.advantages == "epoch":
            obs = torch.cat([buf.obs[:, cols], buf.next_obs[cols].unsqueeze(0)])  # (T + 1, n, ...)
            logits, values = policy(obs.flatten(0, 1))
            logits = logits.view(T + 1, n, -1)[:T]  # (T, n, A); row T only feeds the bootstrap value
            yield ops.gae_ppo_loss(
                logits, buf.actions[:, cols], buf.logprobs[:, cols], values.view(T + 1, n),
                buf.values[:T, cols], buf.rewards[:, cols], buf.terminated[:, cols], buf.truncated[:, cols],
                gamma=cfg.gamma, gae_lambda=cfg.gae_lambda, old_logits=buf.logits[:, cols],
                mask=buf.valid[:, cols], **loss_kwargs(cfg, kl_coef),
            )
        else:
            mb = {k: v.view(T, N, *v.shape[1:])[:, cols].flatten(0, 1) for k, v in flatten(buf).items()}
            logits, newvalue = policy(mb["obs"])
            yield minibatch_loss(ops.ppo_loss, cfg, kl_coef, logits, newvalue, mb)


def update(
    policy: nn.Module,
    optimizer: torch.optim.Optimizer,
    buf: Rollout,
    cfg: Config,
    ops: kernels.Ops,
    kl_coef: float,
) -> dict[str, torch.Tensor]:
    """K epochs of minibatches over the rollout (--minibatch-by sample or env).

    Returns detached 0-dim stats of the last minibatch (as CleanRL logs them) with clipfrac averaged
    over all minibatches, and the number of epochs run.
    """
    minibatches = env_minibatches if cfg.minibatch_by == "env" else sample_minibatches
    clipfracs = []
    epochs_run = 0
    for _epoch in range(cfg.update_epochs):
        for loss, stats in minibatches(policy, buf, cfg, ops, kl_coef):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            optimizer.step()
            clipfracs.append(stats["clipfrac"])
        epochs_run += 1
        # Host-device sync, deliberate and only with --target-kl: the early stop is a host decision.
        if cfg.target_kl is not None and stats["approx_kl"].item() > cfg.target_kl:
            break
    out = dict(stats)
    out["clipfrac"] = torch.stack(clipfracs).mean()
    out["loss"] = loss.detach()
    out["epochs"] = torch.tensor(epochs_run)
    return out


def perf_metrics(timer: PhaseTimer, collect_timer: PhaseTimer, iteration_seconds: float) -> dict[str, float]:
    """perf/<phase>: seconds per iteration in each phase; perf/iteration: the iteration's wall time.

    Read at log time (the CUDA events are read after the log line's sync). With --overlap the
    collection phases run beside gae/update, so the phases may add up to more than perf/iteration.
    perf/logging is the previous iteration's (this line is timed after it is written).
    """
    phases = collect_timer.read()
    for name, seconds in timer.read().items():
        phases[name] = phases.get(name, 0.0) + seconds
    out = {f"perf/{name}": round(phases.get(name, 0.0), 6) for name in PHASES}
    out["perf/iteration"] = round(iteration_seconds, 6)
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


def prepare(cfg: Config) -> tuple[Config, EnvInfo, torch.device, str, kernels.Ops]:
    """Validate everything the user gave, before any env, file or device memory is created.

    Returns the resolved config, the env's info, the device, the run folder and the GAE/loss ops.
    Raises EnvError / ConfigError (one line each).
    """
    info = env_info(cfg.env_id)
    cfg = resolve(cfg, info)
    device = training_device(cfg)
    run_dir = cfg.run_dir or default_run_dir(cfg, time.time())
    check_run_dir(run_dir)
    cfg.run_dir = run_dir
    try:
        ops = kernels.select(cfg.kernels, device)
    except ValueError as e:
        raise ConfigError(f"--kernels {cfg.kernels}: {e}") from None
    return cfg, info, device, run_dir, ops


def make_collector(cfg: Config, envs, info: EnvInfo, device: torch.device,
                   timer: PhaseTimer) -> Collector | AsyncCollector:
    if cfg.async_envs:
        return AsyncCollector(envs, info, device, cfg.num_envs, cfg.recv_batch_size, timer=timer)
    return Collector(envs, info, device, timer=timer)


def train(cfg: Config, *, max_seconds: float | None = None) -> dict:
    """Train from cfg; returns the last metrics line. Writes cfg.run_dir (see README).

    max_seconds (for ``fastppo bench``): stop after the first iteration that ends past it.
    """
    cfg, info, device, run_dir, ops = prepare(cfg)

    seed_everything(cfg.seed, cfg.torch_deterministic)
    os.makedirs(run_dir, exist_ok=True)
    save_config(cfg, os.path.join(run_dir, "config.json"))
    envs = make_envs(
        info, cfg.num_envs, cfg.seed,
        num_threads=cfg.env_threads,
        max_episode_steps=cfg.max_episode_steps,
        repeat_action_probability=cfg.repeat_action_probability,
        batch_size=cfg.recv_batch_size if cfg.async_envs else None,
    )
    policy = make_policy(info).to(device)
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.learning_rate, eps=1e-5)
    # the update calls `forward` (bf16 autocast / compiled wrapper, same parameters); checkpoints hold `policy`
    forward = learner_forward(policy, cfg.bf16, cfg.compile)
    # --overlap acts with a frozen copy of the weights (theta'), refreshed after each update
    behaviour = copy.deepcopy(policy).requires_grad_(False) if cfg.overlap else policy
    # With --overlap, acting draws its Gumbel noise from its own generator: the update's shuffles run
    # at the same time on the main thread, and one shared generator would make runs irreproducible.
    acting_rng = torch.Generator(device).manual_seed(cfg.seed + 1) if cfg.overlap else None
    actor = Actor(behaviour, learner_forward(behaviour, cfg.bf16, cfg.compile) if cfg.overlap else forward,
                  generator=acting_rng, cudagraphs=cfg.cudagraphs, graph_batch_sizes=(cfg.recv_batch_size,))
    timer, collect_timer = PhaseTimer(device), PhaseTimer(device)
    collector = make_collector(cfg, envs, info, device, collect_timer)
    bufs = collector.allocate(cfg.num_steps, 2 if cfg.overlap else 1)
    background = BackgroundCollection(collector, device) if cfg.overlap else None
    kl_ctl = AdaptiveKLCoef(cfg.kl_coef, cfg.kl_min, cfg.kl_max)
    logger = RunLogger(run_dir)

    recent_returns: collections.deque[float] = collections.deque(maxlen=cfg.target_return_games)
    global_step = 0
    start_time = time.time()
    metrics: dict = {}
    try:
        if background is not None:
            collector.collect(actor, bufs[0])  # rollout 1: nothing to overlap with yet
        for iteration in range(1, cfg.num_iterations + 1):
            iteration_start = time.perf_counter()
            if cfg.anneal_lr:
                frac = 1.0 - (iteration - 1.0) / cfg.num_iterations
                optimizer.param_groups[0]["lr"] = frac * cfg.learning_rate
            lr = optimizer.param_groups[0]["lr"]

            buf = bufs[(iteration - 1) % len(bufs)]
            if background is None:
                collector.collect(actor, buf)
            elif iteration < cfg.num_iterations:  # rollout k+1, with theta' = the weights before this update
                background.start(actor, bufs[iteration % 2])
            global_step += cfg.batch_size
            with timer.phase("gae"):
                compute_advantages(buf, ops.gae, cfg.gamma, cfg.gae_lambda)
            kl_coef = kl_ctl.beta
            with timer.phase("update"):
                stats = update(forward, optimizer, buf, cfg, ops, kl_coef)
                if cfg.loss == "penalty":
                    b = flatten(buf)
                    stats["kl"] = policy_kl(forward, b["obs"], b["logits"], b["valid"], cfg.minibatch_size)
            stats["explained_variance"] = explained_variance(
                buf.values[:-1].reshape(-1), buf.returns.reshape(-1), buf.valid.reshape(-1)
            )
            if background is not None:
                background.wait()
                copy_weights(behaviour, policy)  # theta' <- theta for the next rollout

            with timer.phase("logging", host=True):
                # Host-device sync, deliberate: one per iteration, to log (and to decide beta on).
                values = {k: v.item() for k, v in stats.items()}
            if not math.isfinite(values["loss"]):
                last = list_checkpoints(run_dir)
                kept = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written"
                raise TrainingDiverged(
                    f"loss is {values['loss']} at iteration {iteration} (global step {global_step}); "
                    f"stopping, {kept}"
                )
            if cfg.loss == "penalty":
                kl_ctl.update(values["kl"])

            returns, lengths = collector.stats.pop()
            metrics = {
                "global_step": global_step,
                "iteration": iteration,
                "num_iterations": cfg.num_iterations,
                "charts/episodic_return": float(np.mean(returns)) if returns else None,
                "charts/episodic_length": float(np.mean(lengths)) if lengths else None,
                "charts/episodes": len(returns),
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
                **perf_metrics(timer, collect_timer, time.perf_counter() - iteration_start),
            }
            with timer.phase("logging", host=True):
                logger.log(metrics)

            recent_returns.extend(returns)
            reached = (cfg.target_return is not None and len(recent_returns) == recent_returns.maxlen
                       and np.mean(recent_returns) >= cfg.target_return)
            if max_seconds is not None and time.time() - start_time > max_seconds:
                break
            if reached:
                print(f"target return {cfg.target_return} reached: mean of the last {len(recent_returns)} games "
                      f"is {np.mean(recent_returns):.2f} at global step {global_step}", flush=True)
                break
            if cfg.save_every and iteration % cfg.save_every == 0 and iteration != cfg.num_iterations:
                save_checkpoint(run_dir, iteration,
                                checkpoint_state(cfg, policy, optimizer, iteration, global_step, kl_ctl))
        save_checkpoint(run_dir, iteration, checkpoint_state(cfg, policy, optimizer, iteration, global_step, kl_ctl))
    finally:
        if background is not None and background.thread is not None:
            background.thread.join()  # an error in the update: let the collection finish before closing the envs
        logger.close()
        envs.close()
    return metrics
