"""The training loop: collect a rollout, compute advantages, update the policy, log, repeat.

Plain functions over plain tensors, CleanRL's order of operations:

    for iteration in 1..num_iterations:
        anneal the learning rate
        collector.collect(policy, buf)            # envs -> rollout storage on the device
        compute_advantages(buf, ops.gae, ...)     # GAE, once per rollout
        update(policy, optimizer, buf, ...)       # K epochs of shuffled minibatches
        [penalty] beta <- adaptive rule(KL)       # once per iteration, after the epochs
        [--eval-every] play full games on a separate small pool
        log metrics; checkpoint; stop here after SIGINT/SIGTERM

--resume rebuilds the state of the loop from a checkpoint first (see :func:`restore`).

With --overlap the collection of rollout k+1 runs in the background (rollout.BackgroundCollection),
acting with a frozen copy of the weights, while the main thread runs GAE and the update on rollout k.
"""

from __future__ import annotations

import collections
import copy
import math
import os
import random
import signal
import time

import numpy as np
import torch
from torch import nn

from fastppo import kernels, tracking
from fastppo.advantage import compute_advantages, explained_variance
from fastppo.checkpoint import (
    CheckpointError,
    StopOnSignal,
    list_checkpoints,
    load_resumable,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from fastppo.config import (
    Config,
    ConfigError,
    check_run_dir,
    default_run_dir,
    fields_changed,
    resolve,
    resume_config,
    save_config,
    training_device,
)
from fastppo.envs import EnvInfo, env_info, make_envs
from fastppo.evaluate import eval_metrics
from fastppo.logger import RunLogger, keep_metrics_until
from fastppo.loss import AdaptiveKLCoef, loss_kwargs, minibatch_loss, policy_kl
from fastppo.perf import PHASES, Actor, PhaseTimer, copy_weights, learner_forward
from fastppo.policy import make_policy
from fastppo.rollout import AsyncCollector, BackgroundCollection, Collector, Rollout


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the run stops and keeps its last good checkpoint."""


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM: the run saved a checkpoint after its current iteration and stopped."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


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


def checkpoint_state(
    cfg: Config, policy: nn.Module, optimizer: torch.optim.Optimizer, iteration: int, global_step: int,
    kl_ctl: AdaptiveKLCoef, collector: Collector | AsyncCollector, elapsed: float, recent_returns: list[float],
) -> dict:
    """Everything the loop needs to go on exactly; the LR follows from iteration and the config.

    Runs with --async-envs or --overlap save no action log (``actions`` is None): the order in which
    their envs stepped cannot be replayed, so they cannot be resumed.
    """
    replayable = not (cfg.async_envs or cfg.overlap)
    if replayable:
        collector.action_log = [np.concatenate(collector.action_log)]  # one array, so the next save is one copy
    return {
        "model": policy.state_dict(),
        "optimizer": optimizer.state_dict(),
        "config": cfg.to_dict(),
        "iteration": iteration,
        "global_step": global_step,
        "kl_coef": kl_ctl.beta,
        "rng": rng_state(),
        "actions": torch.from_numpy(collector.action_log[0]) if replayable else None,  # (iteration * T, N)
        "elapsed": elapsed,  # wall-clock seconds of training so far (time/elapsed)
        "recent_returns": recent_returns,  # the --target-return window
    }


def restore(
    state: dict, policy: nn.Module, optimizer: torch.optim.Optimizer, kl_ctl: AdaptiveKLCoef, collector: Collector
) -> None:
    """Put the loop back where the checkpoint was taken.

    Model, optimizer and beta are loaded; the envs, freshly made with the run's seed, replay every
    action of the run (EnvPool cannot save an env's state), which rebuilds their state, the next
    observation and the running game scores exactly; the RNG states come last, as they were.
    """
    policy.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    kl_ctl.beta = state["kl_coef"]
    collector.replay(state["actions"].numpy())
    set_rng_state(state["rng"])


def prepare_resume(
    cfg: Config, explicit: set[str] | None
) -> tuple[Config, EnvInfo, torch.device, str, kernels.Ops, dict]:
    """--resume: load and check the run's newest checkpoint and merge the config, touching no file.

    Raises CheckpointError / ConfigError / EnvError (one line each).
    """
    state = load_resumable(cfg.resume)
    if state["actions"] is None:
        raise CheckpointError(f"{state['path']!r} cannot be resumed from: the run used --async-envs or --overlap, "
                              f"whose env steps cannot be replayed")
    cfg = resume_config(state["config"], cfg, explicit if explicit is not None else fields_changed(cfg))
    info = env_info(cfg.env_id)
    cfg = resolve(cfg, info)
    iteration = state["iteration"]
    if cfg.num_iterations <= iteration:
        raise ConfigError(f"the run in {cfg.run_dir!r} already ran {iteration} of its {cfg.num_iterations} "
                          f"iterations ({state['global_step']:,} steps); raise --total-timesteps to go on")
    if tuple(state["actions"].shape) != (iteration * cfg.num_steps, cfg.num_envs):
        raise CheckpointError(f"{state['path']!r} does not match its config (actions of shape "
                              f"{tuple(state['actions'].shape)}, expected {(iteration * cfg.num_steps, cfg.num_envs)})")
    device = training_device(cfg)
    return cfg, info, device, cfg.run_dir, select_ops(cfg, device), state


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
    return cfg, info, device, run_dir, select_ops(cfg, device)


def select_ops(cfg: Config, device: torch.device) -> kernels.Ops:
    try:
        return kernels.select(cfg.kernels, device)
    except ValueError as e:
        raise ConfigError(f"--kernels {cfg.kernels}: {e}") from None


def make_collector(cfg: Config, envs, info: EnvInfo, device: torch.device,
                   timer: PhaseTimer) -> Collector | AsyncCollector:
    if cfg.async_envs:
        return AsyncCollector(envs, info, device, cfg.num_envs, cfg.recv_batch_size, timer=timer)
    return Collector(envs, info, device, timer=timer)


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


def train(cfg: Config, explicit: set[str] | None = None, *, max_seconds: float | None = None) -> dict:
    """Train from cfg; returns the last metrics line. Writes cfg.run_dir (see README).

    max_seconds (for ``fastppo bench``): stop after the first iteration that ends past it.

    With cfg.resume, continues that run; `explicit` names the flags given on the command line (None:
    those that differ from their defaults). Raises TrainingInterrupted after SIGINT/SIGTERM.
    """
    resume_state = None
    if cfg.resume is not None:
        cfg, info, device, run_dir, ops, resume_state = prepare_resume(cfg, explicit)
    else:
        cfg, info, device, run_dir, ops = prepare(cfg)
    if cfg.track and not tracking.wandb_installed():
        raise ConfigError("--track needs wandb: pip install 'fastppo[track]'")

    seed_everything(cfg.seed, cfg.torch_deterministic)
    os.makedirs(run_dir, exist_ok=True)
    save_config(cfg, os.path.join(run_dir, "config.json"))
    if resume_state is not None:
        keep_metrics_until(run_dir, resume_state["iteration"])
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
    tracker = None
    if cfg.track:
        tracker = tracking.Tracker.start(run_dir, project=cfg.wandb_project, entity=cfg.wandb_entity,
                                         group=cfg.wandb_group, tags=cfg.wandb_tags, config=cfg.to_dict())
    logger = RunLogger(run_dir, cfg.num_iterations * cfg.batch_size, log_every=cfg.log_every,
                       log_seconds=cfg.log_seconds, tracker=tracker, title=f"fastppo {cfg.env_id}  {run_dir}")

    recent_returns: collections.deque[float] = collections.deque(maxlen=cfg.target_return_games)
    first_iteration, global_step, elapsed = 1, 0, 0.0
    if resume_state is not None:
        logger.phase("replay")
        restore(resume_state, policy, optimizer, kl_ctl, collector)
        first_iteration = resume_state["iteration"] + 1
        global_step, elapsed = resume_state["global_step"], resume_state["elapsed"]
        recent_returns.extend(resume_state.get("recent_returns", []))
    start_step = global_step
    start_time = time.time()
    eval_time = 0.0  # SPS leaves out time spent evaluating (training envs idle)
    metrics: dict = {}
    exit_code = 1
    stop = StopOnSignal()
    stop.install()
    try:
        if background is not None:
            collector.collect(actor, bufs[0])  # rollout 1: nothing to overlap with yet
        for iteration in range(first_iteration, cfg.num_iterations + 1):
            iteration_start = time.perf_counter()
            if cfg.anneal_lr:
                frac = 1.0 - (iteration - 1.0) / cfg.num_iterations
                optimizer.param_groups[0]["lr"] = frac * cfg.learning_rate
            lr = optimizer.param_groups[0]["lr"]

            buf = bufs[(iteration - 1) % len(bufs)]
            logger.phase("collect")
            t_collect = time.perf_counter()
            if background is None:
                collector.collect(actor, buf)
            elif iteration < cfg.num_iterations:  # rollout k+1, with theta' = the weights before this update
                background.start(actor, bufs[iteration % 2])
            t_update = time.perf_counter()  # collect ends synchronised: each step waits for its actions
            logger.phase("update")
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
            t_done = time.perf_counter()
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
                "charts/SPS": int((global_step - start_step) / max(time.time() - start_time - eval_time, 1e-9)),
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
                "time/elapsed": elapsed + time.time() - start_time,
                "perf/rollout_time": t_update - t_collect,
                "perf/update_time": t_done - t_update,
                **perf_metrics(timer, collect_timer, time.perf_counter() - iteration_start),
            }
            if cfg.eval_every and (iteration % cfg.eval_every == 0 or iteration == cfg.num_iterations):
                logger.phase("eval")
                t_eval = time.perf_counter()
                metrics.update(eval_metrics(policy, info, cfg, iteration, device))
                metrics["perf/eval_time"] = time.perf_counter() - t_eval
                eval_time += metrics["perf/eval_time"]
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
            stopping = stop.signum is not None and iteration != cfg.num_iterations
            if stopping or (cfg.save_every and iteration % cfg.save_every == 0 and iteration != cfg.num_iterations):
                logger.phase("checkpoint")
                path = save_checkpoint(run_dir, iteration, checkpoint_state(
                    cfg, policy, optimizer, iteration, global_step, kl_ctl, collector, metrics["time/elapsed"],
                    list(recent_returns)))
            if stopping:
                exit_code = 128 + stop.signum
                raise TrainingInterrupted(
                    stop.signum, f"stopped by {signal.Signals(stop.signum).name} after iteration {iteration} "
                    f"(global step {global_step:,}); saved {path}; go on with: fastppo train --resume {run_dir}")
        logger.phase("checkpoint")
        path = save_checkpoint(run_dir, iteration, checkpoint_state(
            cfg, policy, optimizer, iteration, global_step, kl_ctl, collector, metrics["time/elapsed"],
            list(recent_returns)))
        if tracker is not None:
            tracker.log_model(path, global_step)
        exit_code = 0
    finally:
        if background is not None and background.thread is not None:
            background.thread.join()  # an error in the update: let the collection finish before closing the envs
        stop.restore()
        logger.close()
        if tracker is not None:
            tracker.finish(exit_code)
        envs.close()
    return metrics
