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

Under torchrun each rank runs this loop on its own envs; see ``distributed`` for what is shared.
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

from fastppo import distributed, kernels, tracking
from fastppo.advantage import compute_advantages, explained_variance
from fastppo.checkpoint import (
    CheckpointError,
    StopOnSignal,
    checkpoint_path,
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
from fastppo.distributed import World
from fastppo.envs import EnvInfo, env_info, make_envs
from fastppo.evaluate import eval_metrics
from fastppo.logger import RunLogger, keep_metrics_until
from fastppo.loss import AdaptiveKLCoef, loss_kwargs, minibatch_loss, policy_kl
from fastppo.perf import PHASES, Actor, PhaseTimer, copy_weights, learner_forward
from fastppo.policy import make_policy
from fastppo.presets import apply_preset
from fastppo.rollout import AsyncCollector, BackgroundCollection, Collector, Rollout, gather_rows


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
    obs = buf.obs.flatten(0, 1)  # (T * N, ...), a view: no copy of the observation buffer
    with torch.no_grad():
        values = [policy(obs[i : i + chunk])[1].float() for i in range(0, obs.shape[0], chunk)]
        values.append(policy(buf.next_obs)[1].float())  # row T, the bootstrap
    return torch.cat(values).view(T + 1, N)


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
        mb = {k: gather_rows(v, idx) for k, v in b.items()}
        logits, newvalue = policy(mb["obs"])
        yield minibatch_loss(ops.ppo_loss, cfg, kl_coef, logits, newvalue, mb)


def env_minibatches(policy: nn.Module, buf: Rollout, cfg: Config, ops: kernels.Ops, kl_coef: float):
    """One epoch of minibatches made of whole env columns, (T, n) each.

    With --advantages epoch, each minibatch recomputes its columns' GAE from the values the forward
    pass just predicted (bootstrap row included) inside one fused GAE + loss op.
    """
    T, N = buf.rewards.shape
    n = N // cfg.num_minibatches
    columns = {k: v.view(T, N, *v.shape[1:]) for k, v in flatten(buf).items()}  # (T, N, ...) views
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
            mb = {k: v[:, cols].flatten(0, 1) for k, v in columns.items()}
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
    kl_ctl: AdaptiveKLCoef, collector: Collector | AsyncCollector, elapsed: float, recent_returns: list[float],
) -> dict | None:
    """Everything the loop needs to go on exactly; the LR follows from iteration and the config.

    Runs with --async-envs or --overlap save no action log (``actions`` is None): the order in which
    their envs stepped cannot be replayed, so they cannot be resumed.

    Under torchrun every rank calls it (a collective) and rank 0 gets the state, others None: the
    model, optimizer and beta are the same on every rank; the actions are those of all ranks, rank
    r's envs in columns [r * N, (r + 1) * N); ``rank_rng`` holds each rank's RNG states.
    """
    replayable = not (cfg.async_envs or cfg.overlap)
    if replayable:
        collector.action_log = [np.concatenate(collector.action_log)]  # one array, so the next save is one copy
    gathered = distributed.gather_on_main((collector.action_log[0] if replayable else None, rng_state()))
    if gathered is None:
        return None
    actions, rngs = zip(*gathered, strict=True)
    state = {
        "model": policy.state_dict(),
        "optimizer": optimizer.state_dict(),
        "config": cfg.to_dict(),
        "iteration": iteration,
        "global_step": global_step,
        "kl_coef": kl_ctl.beta,
        "rng": rngs[0],
        # (iteration * T, world * N), every action sent
        "actions": torch.from_numpy(np.concatenate(actions, axis=1)) if replayable else None,
        "elapsed": elapsed,  # wall-clock seconds of training so far (time/elapsed)
        "recent_returns": recent_returns,  # the --target-return window
    }
    if cfg.world_size > 1:
        state["rank_rng"] = rngs
    return state


def restore(
    state: dict, policy: nn.Module, optimizer: torch.optim.Optimizer, kl_ctl: AdaptiveKLCoef, collector: Collector,
    rank: int = 0,
) -> None:
    """Put the loop back where the checkpoint was taken.

    Model, optimizer and beta are loaded; the envs, freshly made with the run's seed, replay every
    action of the run (EnvPool cannot save an env's state), which rebuilds their state, the next
    observation and the running game scores exactly; the RNG states come last, as they were.
    Under torchrun every rank loads the same checkpoint and takes its own columns and RNG states.
    """
    policy.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    kl_ctl.beta = state["kl_coef"]
    n = collector.num_envs
    collector.replay(state["actions"][:, rank * n : (rank + 1) * n].numpy())
    set_rng_state(state["rank_rng"][rank] if "rank_rng" in state else state["rng"])


def prepare_resume(
    cfg: Config, explicit: set[str] | None, world: World | None = None
) -> tuple[Config, EnvInfo, torch.device, str, kernels.Ops, dict]:
    """--resume: load and check the run's newest checkpoint and merge the config, touching no file.

    Under torchrun every rank reads the same checkpoint (the run folder must be visible to all).
    Raises CheckpointError / ConfigError / EnvError (one line each).
    """
    world = world or World()
    state = load_resumable(cfg.resume)
    if state["actions"] is None:
        raise CheckpointError(f"{state['path']!r} cannot be resumed from: the run used --async-envs or --overlap, "
                              f"whose env steps cannot be replayed")
    saved_world = state["config"].get("world_size", 1)
    if saved_world != world.size:
        raise ConfigError(f"the run in {cfg.resume!r} was trained by {saved_world} rank(s); resume it with "
                          f"{saved_world} (this launch has {world.size})")
    cfg = resume_config(state["config"], cfg, explicit if explicit is not None else fields_changed(cfg))
    info = env_info(cfg.env_id)
    cfg = resolve(cfg, info, world.size)
    iteration = state["iteration"]
    if cfg.num_iterations <= iteration:
        raise ConfigError(f"the run in {cfg.run_dir!r} already ran {iteration} of its {cfg.num_iterations} "
                          f"iterations ({state['global_step']:,} steps); raise --total-timesteps to go on")
    expected = (iteration * cfg.num_steps, cfg.num_envs * cfg.world_size)
    if tuple(state["actions"].shape) != expected:
        raise CheckpointError(f"{state['path']!r} does not match its config (actions of shape "
                              f"{tuple(state['actions'].shape)}, expected {expected})")
    cfg.env_threads = distributed.env_threads(cfg.env_threads, cfg.num_envs, world)
    device = distributed.rank_device(training_device(cfg), world)
    return cfg, info, device, cfg.run_dir, select_ops(cfg, device), state


def prepare(cfg: Config, world: World | None = None) -> tuple[Config, EnvInfo, torch.device, kernels.Ops]:
    """Validate everything the user gave, before any env, file, device memory or process group exists.

    Every check here gives the same answer on every rank; the run folder is checked later, on rank
    0 (:func:`claim_run_dir`). Returns the resolved config, the env's info, this rank's device
    (world: None for a plain run) and the GAE/loss ops. Raises EnvError / ConfigError (one line each).
    """
    world = world or World()
    info = env_info(cfg.env_id)
    cfg = resolve(cfg, info, world.size)
    cfg.env_threads = distributed.env_threads(cfg.env_threads, cfg.num_envs, world)
    device = distributed.rank_device(training_device(cfg), world)
    return cfg, info, device, select_ops(cfg, device)


def claim_run_dir(cfg: Config) -> str:
    """The run folder (named now when --run-dir is not given), checked to hold no run yet."""
    run_dir = cfg.run_dir or default_run_dir(cfg, time.time())
    check_run_dir(run_dir)
    return run_dir


def save(run_dir: str, iteration: int, state: dict | None) -> str:
    """save_checkpoint on rank 0 (state None elsewhere: see checkpoint_state); the file's path."""
    return checkpoint_path(run_dir, iteration) if state is None else save_checkpoint(run_dir, iteration, state)


class _Quiet:
    """The logger of the ranks other than 0: they neither print nor write."""

    def phase(self, name: str) -> None:
        pass

    def log(self, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass


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
    """Train from cfg; returns the last metrics line, with "stopped_by": "total_timesteps",
    "target_return" or "max_seconds". Writes cfg.run_dir (see README).

    max_seconds (for ``fastppo bench``): stop after the first iteration that ends past it.

    With cfg.resume, continues that run; `explicit` names the flags given on the command line (None:
    those that differ from their defaults). Raises TrainingInterrupted after SIGINT/SIGTERM.
    Under torchrun: one rank of a data-parallel run; only rank 0 prints and writes cfg.run_dir.
    """
    world = World.from_env()
    resume_state, run_dir = None, None
    if cfg.resume is not None:  # the saved config holds its preset's values (--preset is refused with --resume)
        cfg, info, device, run_dir, ops, resume_state = prepare_resume(cfg, explicit, world)
    else:
        cfg = apply_preset(cfg, explicit if explicit is not None else fields_changed(cfg))
        cfg, info, device, ops = prepare(cfg, world)
    if cfg.track and not tracking.wandb_installed():
        raise ConfigError("--track needs wandb: pip install 'fastppo[track]'")
    threads = torch.get_num_threads()  # --torch-threads changes a process-wide setting: put it back after
    try:
        with distributed.process_group(world, device, cfg.dist_timeout):
            return _train(cfg, info, device, ops, world, run_dir, resume_state, max_seconds)
    finally:
        torch.set_num_threads(threads)


def _train(
    cfg: Config, info: EnvInfo, device: torch.device, ops: kernels.Ops, world: World, run_dir: str | None,
    resume_state: dict | None, max_seconds: float | None,
) -> dict:
    if run_dir is None:
        run_dir = cfg.run_dir = distributed.on_main(lambda: claim_run_dir(cfg))
    main = distributed.is_main()
    torch_seed, env_seed = distributed.rank_seeds(cfg.seed, cfg.num_envs, world.rank)
    seed_everything(torch_seed, cfg.torch_deterministic)
    if main:
        os.makedirs(run_dir, exist_ok=True)
        save_config(cfg, os.path.join(run_dir, "config.json"))
        if resume_state is not None:
            keep_metrics_until(run_dir, resume_state["iteration"])
    envs = make_envs(
        info, cfg.num_envs, env_seed,
        num_threads=cfg.env_threads,
        max_episode_steps=cfg.max_episode_steps,
        repeat_action_probability=cfg.repeat_action_probability,
        batch_size=cfg.recv_batch_size if cfg.async_envs else None,
    )
    if cfg.torch_threads or len(info.obs_shape) != 3:  # auto: 1 thread for the MLP (see --torch-threads)
        torch.set_num_threads(cfg.torch_threads or 1)
    policy = make_policy(info).to(device)
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.learning_rate, eps=1e-5)
    # the update calls `forward` (bf16 autocast / compiled wrapper, same parameters); checkpoints hold `policy`
    forward = learner_forward(policy, cfg.bf16, cfg.compile)
    # Under torchrun the update calls DDP around it (gradients averaged across ranks in backward);
    # acting and the no-grad KL call `forward` itself.
    train_forward = distributed.wrap_model(forward, device)
    # --overlap acts with a frozen copy of the weights (theta'), refreshed after each update
    behaviour = copy.deepcopy(policy).requires_grad_(False) if cfg.overlap else policy
    # With --overlap, acting draws its Gumbel noise from its own generator: the update's shuffles run
    # at the same time on the main thread, and one shared generator would make runs irreproducible.
    acting_rng = torch.Generator(device).manual_seed(torch_seed + 1) if cfg.overlap else None
    actor = Actor(behaviour, learner_forward(behaviour, cfg.bf16, cfg.compile) if cfg.overlap else forward,
                  generator=acting_rng, cudagraphs=cfg.cudagraphs, graph_batch_sizes=(cfg.recv_batch_size,))
    timer, collect_timer = PhaseTimer(device), PhaseTimer(device)
    collector = make_collector(cfg, envs, info, device, collect_timer)
    bufs = collector.allocate(cfg.num_steps, 2 if cfg.overlap else 1)
    background = BackgroundCollection(collector, device) if cfg.overlap else None
    kl_ctl = AdaptiveKLCoef(cfg.kl_coef, cfg.kl_min, cfg.kl_max)
    tracker = None
    if cfg.track and main:
        tracker = tracking.Tracker.start(run_dir, project=cfg.wandb_project, entity=cfg.wandb_entity,
                                         group=cfg.wandb_group, tags=cfg.wandb_tags, config=cfg.to_dict())
    logger = RunLogger(run_dir, cfg.num_iterations * cfg.global_batch_size, log_every=cfg.log_every,
                       log_seconds=cfg.log_seconds, tracker=tracker,
                       title=f"fastppo {cfg.env_id}  {run_dir}") if main else _Quiet()

    recent_returns: collections.deque[float] = collections.deque(maxlen=cfg.target_return_games)
    first_iteration, global_step, elapsed = 1, 0, 0.0
    if resume_state is not None:
        logger.phase("replay")
        restore(resume_state, policy, optimizer, kl_ctl, collector, world.rank)
        first_iteration = resume_state["iteration"] + 1
        global_step, elapsed = resume_state["global_step"], resume_state["elapsed"]
        recent_returns.extend(resume_state.get("recent_returns", []))
    start_step = global_step
    start_time = time.time()
    eval_time = 0.0  # SPS leaves out time spent evaluating (training envs idle)
    metrics: dict = {}
    stopped_by = "total_timesteps"
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
            games = collector.stats.pop()  # the games that ended in rollout k (before k+1 starts below)
            if background is not None and iteration < cfg.num_iterations:
                background.start(actor, bufs[iteration % 2])  # rollout k+1, theta' = the weights before this update
            t_update = time.perf_counter()  # collect ends synchronised: each step waits for its actions
            logger.phase("update")
            global_step += cfg.global_batch_size
            with timer.phase("gae"):
                compute_advantages(buf, ops.gae, cfg.gamma, cfg.gae_lambda)
            kl_coef = kl_ctl.beta
            with timer.phase("update"):
                stats = update(train_forward, optimizer, buf, cfg, ops, kl_coef)
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
                # Host-device sync, deliberate: one per iteration, to log (and to decide beta on). The
                # values are means over the ranks, so beta and the NaN stop are the same on all of them.
                names = list(stats)
                reduced = distributed.all_reduce_mean(torch.stack([stats[k].to(device, torch.float64) for k in names]))
                values = dict(zip(names, reduced.tolist(), strict=True))
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

            returns, lengths = distributed.all_games(*games)  # the games of every rank
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
            if main and cfg.eval_every and (iteration % cfg.eval_every == 0 or iteration == cfg.num_iterations):
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
            if reached:
                if main:
                    print(f"target return {cfg.target_return} reached: mean of the last {len(recent_returns)} "
                          f"games is {np.mean(recent_returns):.2f} at global step {global_step}", flush=True)
                stopped_by = "target_return"
                break
            if max_seconds is not None and distributed.any_rank(time.time() - start_time > max_seconds, device):
                stopped_by = "max_seconds"
                break
            # Any rank's signal stops them all, after the same iteration.
            stopping = distributed.any_rank(stop.signum is not None, device) and iteration != cfg.num_iterations
            if stopping or (cfg.save_every and iteration % cfg.save_every == 0 and iteration != cfg.num_iterations):
                logger.phase("checkpoint")
                path = save(run_dir, iteration, checkpoint_state(
                    cfg, policy, optimizer, iteration, global_step, kl_ctl, collector, metrics["time/elapsed"],
                    list(recent_returns)))
            if stopping:
                signum = stop.signum or signal.SIGTERM  # a rank stopped by another rank's signal
                exit_code = 128 + signum
                raise TrainingInterrupted(
                    signum, f"stopped by {signal.Signals(signum).name} after iteration {iteration} "
                    f"(global step {global_step:,}); saved {path}; go on with: fastppo train --resume {run_dir}")
        logger.phase("checkpoint")
        path = save(run_dir, iteration, checkpoint_state(
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
    return dict(metrics, stopped_by=stopped_by)
