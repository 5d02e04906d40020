"""The training loop: collect a rollout, compute advantages, update the policy, log, repeat.

Plain functions over plain tensors, in CleanRL's order (:func:`_loop`):

    for iteration in first..num_iterations:
        set the learning rate                      # annealed, constant, or the adaptive rule's
        buf = collection.next()                    # envs -> rollout storage on the device
        [--norm-value] de-normalise buf's values
        compute_advantages(buf, ops.gae, ...)      # GAE, once per rollout
        [--norm-value] returns -> statistics; normalise the targets
        [--decoupled] pi_prox <- the policy now; weights pi_prox / pi_behaviour
        stats = update(policy, optimizer, buf)     # K epochs of minibatches (PPO-clip or -penalty),
                                                   #   or trpo.trpo_update (--algo trpo)
        collection.refresh(policy)                 # what acts next (--overlap: theta' <- theta)
        [penalty] beta <- adaptive rule(KL)        # once per iteration, after the epochs
        [--lr-schedule adaptive] lr <- the same rule, on the step size
        [--eval-every] evaluate                    # full games on a separate pool; best.pt
        log the iteration; stop or save

Everything decided once before it (inputs checked, the preset, resume checks, the run folder, the
device) is in ``fastppo.prepare``, read top to bottom. Here, around the loop, each step is a named
helper: :func:`build` makes the envs, networks and collection (and, on resume, puts
them back where the checkpoint was: :func:`restore`), :func:`iteration_metrics` assembles a metrics
line, :func:`evaluate` runs --eval-every, :func:`stop_reason` and :func:`save_due` are the stop and
save rules, :func:`save` writes the checkpoint and the model card.

Under torchrun each rank runs this loop on its own envs; see ``distributed`` for what is shared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fastppo import distributed, kernels, tracking
from fastppo.advantage import compute_advantages, explained_variance
from fastppo.checkpoint import (
    StopOnSignal,
    WriteFailed,
    bad_actions,
    checkpoint_path,
    last_checkpoint_note,
    rng_state,
    save_best,
    save_checkpoint,
    set_rng_state,
)
from fastppo.config import (
    Config,
    ConfigError,
    check_types,
    env_id_notice,
    given_fields,
    run_identity,
    save_config,
)
from fastppo.distributed import World
from fastppo.envs import EnvInfo, make_envs
from fastppo.evaluate import eval_metrics
from fastppo.kernels.reference import masked_mean
from fastppo.logger import RecentReturns, RunLogger, command_line, keep_metrics_until, write_model_card
from fastppo.loss import AdaptiveKLCoef, AdaptiveLR, gae_minibatch_loss, minibatch_loss, policy_kl
from fastppo.normalize import ValueNormalizer
from fastppo.perf import PHASES, PhaseTimer, learner_forward
from fastppo.policy import forward_in_chunks, log_prob, make_policy
from fastppo.policy import kl as exact_kl
from fastppo.prepare import Prepared, claim_run_dir, make_normalizers, make_optimizer, prepare, prepare_resume
from fastppo.rollout import Collection, Rollout, dist_kind, flatten, gather_rows, make_collection
from fastppo.runfolder import RunFolder
from fastppo.tensorboard import TensorBoardWriter, tensorboard_installed
from fastppo.trpo import trpo_update


class TrainingDiverged(RuntimeError):
    """The loss or the parameters became NaN/inf; the run stops and keeps its last good checkpoint."""


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM: the run saved a checkpoint after its current iteration and stopped (or, before
    training started, stopped and left nothing behind)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def seed_everything(seed: int, torch_deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic


# --- the update ----------------------------------------------------------------------------------


def value_predictions(policy: nn.Module, buf: Rollout, chunk: int) -> torch.Tensor:
    """V(s) of every observation of the rollout under the current policy, row T included: (T + 1, N)."""
    T, N = buf.rewards.shape
    obs = buf.obs.flatten(0, 1)  # (T * N, ...), a view: no copy of the observation buffer
    values = [forward_in_chunks(policy, o, chunk)[1] for o in (obs, buf.next_obs)]  # then row T, the bootstrap
    return torch.cat(values).float().view(T + 1, N)


def proximal_rollout(policy: nn.Module, buf: Rollout, chunk: int) -> tuple[Rollout, torch.Tensor]:
    """--decoupled: buf with the policy at the start of the update (pi_prox) as its "old" policy.

    One forward pass over the batch without gradients, in chunks of `chunk` states. The returned rollout's
    logprobs and dist are pi_prox's (new tensors: the collector's storage keeps what acted), and its weights
    pi_prox(a|s) / pi_behaviour(a|s), the importance weights from the policy that acted to pi_prox, which the
    loss puts on the normalised advantages. Also returns the policy lag: the exact mean KL(pi_behaviour ||
    pi_prox) over the valid states (0-dim; no host sync here)."""
    T, N = buf.rewards.shape
    kind = dist_kind(buf)
    b = flatten(buf)
    dist = forward_in_chunks(policy, b["obs"], chunk)[0].to(buf.dist.dtype)  # no gradients from here on
    logp = log_prob(kind, dist, b["actions"]).to(buf.logprobs.dtype)
    # 1 on the steps the loss masks out (EnvPool's autoreset step), whatever was stored there
    weights = torch.where(b["valid"], torch.exp(logp - b["logprobs"]), 1.0)
    lag = masked_mean(exact_kl(kind, b["dist"], dist), b["valid"])
    prox = dataclasses.replace(buf, logprobs=logp.view(T, N), dist=dist.view(T, N, -1), weights=weights.view(T, N))
    return prox, lag


def sample_minibatches(policy: nn.Module, buf: Rollout, cfg: Config, ops: kernels.Ops, kl_coef: float,
                       value_norm: ValueNormalizer | None = None):
    """One epoch of CleanRL's minibatches: shuffled samples of the flattened rollout.

    Yields (loss, stats) per minibatch; the caller steps the optimizer before the next one. value_norm
    (--norm-value): the predictions are normalised values, de-normalised for GAE (--advantages epoch).
    """
    b = flatten(buf)
    if cfg.advantages == "epoch":  # GAE again, from the current value predictions
        values = value_predictions(policy, buf, cfg.minibatch_size)
        if value_norm is not None:
            values = value_norm.denormalize(values)
        advantages, returns = ops.gae(buf.rewards, values, buf.terminated, buf.truncated, cfg.gamma, cfg.gae_lambda)
        if value_norm is not None:
            returns = value_norm.normalize(returns)
        b["advantages"], b["returns"] = advantages.reshape(-1), returns.reshape(-1)
    perm = torch.randperm(cfg.batch_size, device=b["actions"].device)
    for start in range(0, cfg.batch_size, cfg.minibatch_size):
        idx = perm[start : start + cfg.minibatch_size]
        mb = {k: gather_rows(v, idx) for k, v in b.items()}
        dist, newvalue = policy(mb["obs"])
        yield minibatch_loss(ops, cfg, kl_coef, dist, newvalue, mb, dist_kind(buf))


def env_minibatches(policy: nn.Module, buf: Rollout, cfg: Config, ops: kernels.Ops, kl_coef: float):
    """One epoch of minibatches made of whole env columns, (T, n) each.

    With --advantages epoch, each minibatch recomputes its columns' GAE from the values the forward
    pass just predicted (bootstrap row included) inside one fused GAE + loss op (not with --norm-value,
    whose GAE needs de-normalised values and whose loss the normalised ones: config.validate refuses it).
    """
    T, N = buf.rewards.shape
    n = N // cfg.num_minibatches
    kind = dist_kind(buf)
    columns = {k: v.view(T, N, *v.shape[1:]) for k, v in flatten(buf).items()}  # (T, N, ...) views
    perm = torch.randperm(N, device=buf.actions.device)
    for start in range(0, N, n):
        cols = perm[start : start + n]
        if cfg.advantages == "epoch":
            obs = torch.cat([buf.obs[:, cols], buf.next_obs[cols].unsqueeze(0)])  # (T + 1, n, ...)
            dist, values = policy(obs.flatten(0, 1))
            dist = dist.view(T + 1, n, -1)[:T]  # (T, n, P); row T only feeds the bootstrap value
            data = {k: getattr(buf, k)[:, cols] for k in ("actions", "logprobs", "dist", "rewards", "terminated",
                                                          "truncated", "valid")}
            data["values"] = buf.values[:T, cols]
            yield gae_minibatch_loss(ops, cfg, kl_coef, dist, values.view(T + 1, n), data, kind)
        else:
            mb = {k: v[:, cols].flatten(0, 1) for k, v in columns.items()}
            dist, newvalue = policy(mb["obs"])
            yield minibatch_loss(ops, cfg, kl_coef, dist, newvalue, mb, kind)


def update(
    policy: nn.Module,
    optimizer: torch.optim.Optimizer,
    buf: Rollout,
    cfg: Config,
    ops: kernels.Ops,
    kl_coef: float,
    value_norm: ValueNormalizer | None = None,
) -> dict[str, torch.Tensor]:
    """K epochs of minibatches over the rollout (--minibatch-by sample or env).

    With --norm-value, buf's values and returns are the normalised targets (:func:`normalized_targets`)
    and value_norm is the normaliser. Returns detached 0-dim stats of the last minibatch (as CleanRL
    logs them) with clipfrac averaged over all minibatches, and the number of epochs run.
    """
    clipfracs = []
    epochs_run = 0
    for _epoch in range(cfg.update_epochs):
        if cfg.minibatch_by == "env":
            minibatches = env_minibatches(policy, buf, cfg, ops, kl_coef)
        else:
            minibatches = sample_minibatches(policy, buf, cfg, ops, kl_coef, value_norm)
        for loss, stats in minibatches:
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


def rollout_stats(buf: Rollout, forward: nn.Module, cfg: Config) -> dict[str, torch.Tensor]:
    """After the update: explained variance of the rollout's values (raw, with --norm-value); for
    PPO-penalty and --lr-schedule adaptive the exact KL between the behaviour policy and the updated one
    over the whole batch (it drives beta and the learning rate). 0-dim tensors."""
    out = {"explained_variance": explained_variance(buf.values[:-1].reshape(-1), buf.returns.reshape(-1),
                                                    buf.valid.reshape(-1))}
    if cfg.loss == "penalty" or cfg.lr_schedule == "adaptive":
        b = flatten(buf)
        out["kl"] = policy_kl(forward, b["obs"], b["dist"], b["valid"], cfg.minibatch_size, dist_kind(buf))
    return out


def params_finite(policy: nn.Module) -> torch.Tensor:
    """1.0 when every parameter is finite, else 0.0 (0-dim, on the device; no host sync here)."""
    norms = torch._foreach_norm([p.detach() for p in policy.parameters()])
    return torch.stack(norms).isfinite().all().float()


def host_values(stats: dict[str, torch.Tensor], device: torch.device) -> dict[str, float]:
    """The iteration's stats as Python numbers, averaged over the ranks.

    Host-device sync, deliberate: one per iteration, to log, to decide beta and to stop on NaN. The
    values are means over the ranks, so those decisions are the same on all of them.
    """
    names = list(stats)
    reduced = distributed.all_reduce_mean(torch.stack([stats[k].to(device, torch.float64) for k in names]))
    return dict(zip(names, reduced.tolist(), strict=True))


# --- what the loop carries, and its rules --------------------------------------------------------


@dataclass
class Progress:
    """The loop's counters. elapsed_before: wall-clock seconds of training in earlier launches (resume)."""

    iteration: int = 0
    global_step: int = 0
    elapsed_before: float = 0.0
    start_step: int = 0
    start_time: float = field(default_factory=time.time)
    eval_time: float = 0.0  # seconds spent evaluating in this launch: left out of charts/SPS
    best_eval: float = -math.inf  # the best --eval-every score so far (checkpoints/best.pt)

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.start_time

    def sps(self) -> int:
        return int((self.global_step - self.start_step) / max(time.time() - self.start_time - self.eval_time, 1e-9))


def set_learning_rate(optimizer: torch.optim.Optimizer, cfg: Config, iteration: int,
                      lr_ctl: AdaptiveLR | None) -> float:
    """This iteration's learning rate, set on the optimizer and returned. anneal: CleanRL's linear schedule,
    lr * (1 - (iteration - 1) / num_iterations); constant: --learning-rate as it is; adaptive: lr_ctl's,
    which the previous iteration's KL moved."""
    if cfg.lr_schedule == "anneal":
        optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / cfg.num_iterations) * cfg.learning_rate
    elif cfg.lr_schedule == "adaptive":
        optimizer.param_groups[0]["lr"] = lr_ctl.lr
    return optimizer.param_groups[0]["lr"]


def raw_values(buf: Rollout, value_norm: ValueNormalizer | None) -> Rollout:
    """The trainer's view of a collected rollout: with --norm-value its values (T + 1, N), which the network
    gave in normalised units, de-normalised in one op into a new tensor (the collector's storage keeps
    what the network wrote: see fastppo.normalize). buf itself without --norm-value."""
    if value_norm is None:
        return buf
    return dataclasses.replace(buf, values=value_norm.denormalize(buf.values))


def normalized_targets(buf: Rollout, value_norm: ValueNormalizer | None) -> Rollout:
    """What the update trains on: with --norm-value the returns and the collection-time values (raw in buf)
    normalised with the statistics, for the whole batch at once; the advantages stay as GAE gave them."""
    if value_norm is None:
        return buf
    return dataclasses.replace(buf, values=value_norm.normalize(buf.values), returns=value_norm.normalize(buf.returns))


def check_finite(values: dict[str, float], progress: Progress, run_dir: str) -> None:
    """TrainingDiverged when the loss or the parameters stopped being finite."""
    if math.isfinite(values["loss"]) and values["params_finite"] == 1.0:
        return
    what = f"loss is {values['loss']}" if not math.isfinite(values["loss"]) else "the parameters are not finite"
    kept = last_checkpoint_note(run_dir, "last good")
    raise TrainingDiverged(f"{what} at iteration {progress.iteration} (global step {progress.global_step}); "
                           f"stopping, {kept}")


def iteration_metrics(cfg: Config, progress: Progress, lr: float, kl_coef: float, values: dict[str, float],
                      games: tuple[list[float], list[int]], recent: RecentReturns) -> dict:
    """One metrics.jsonl line (CleanRL's names; see the README for each)."""
    returns, lengths = games
    return {
        "global_step": progress.global_step,
        "iteration": progress.iteration,
        "num_iterations": cfg.num_iterations,
        "charts/episodic_return": float(np.mean(returns)) if returns else None,
        "charts/episodic_length": float(np.mean(lengths)) if lengths else None,
        "charts/episodes": len(returns),
        "charts/recent_return": recent.mean(),
        "charts/SPS": progress.sps(),
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
        "time/elapsed": progress.elapsed(),
        **({"losses/lag_kl": values["lag_kl"]} if "lag_kl" in values else {}),
        **{k: values[k] for k in values if k.startswith("trpo/")},
    }


def perf_metrics(timer: PhaseTimer, collect_timer: PhaseTimer, rollout_time: float, update_time: float,
                 iteration_seconds: float) -> dict[str, float]:
    """perf/<phase>: seconds per iteration in each phase; perf/iteration: the iteration's wall time.

    Read at log time (the CUDA events are read after the iteration's sync). With --overlap the
    collection phases run beside gae/update, so the phases may add up to more than perf/iteration.
    perf/logging is the previous iteration's (this line is timed after it is written).
    """
    phases = collect_timer.read()
    for name, seconds in timer.read().items():
        phases[name] = phases.get(name, 0.0) + seconds
    out = {f"perf/{name}": round(phases.get(name, 0.0), 6) for name in PHASES}
    out.update({"perf/rollout_time": rollout_time, "perf/update_time": update_time,
                "perf/iteration": round(iteration_seconds, 6)})
    return out


def stop_reason(cfg: Config, recent: RecentReturns, progress: Progress, stop: StopOnSignal,
                device: torch.device) -> str | None:
    """Why the loop stops after this iteration: "target_return", "max_seconds", "signal" or None.

    A collective under torchrun (every rank takes the same decision: the return window holds the
    games of all ranks, and a time limit or a signal on any rank stops them all). After the last
    iteration a time limit or a signal changes nothing: the run is complete.
    """
    if cfg.target_return is not None and recent.mean() is not None and recent.mean() >= cfg.target_return:
        return "target_return"
    reason = None
    if cfg.max_seconds is not None and distributed.any_rank(time.time() - progress.start_time > cfg.max_seconds,
                                                            device):
        reason = "max_seconds"
    elif distributed.any_rank(stop.signum is not None, device):
        reason = "signal"
    return None if progress.iteration == cfg.num_iterations else reason


def eval_due(cfg: Config, iteration: int) -> bool:
    """--eval-every: every that many iterations, and at the last one."""
    return bool(cfg.eval_every) and (iteration % cfg.eval_every == 0 or iteration == cfg.num_iterations)


def evaluate(cfg: Config, info: EnvInfo, s: Session) -> dict:
    """--eval-every on rank 0: the eval/* metrics (evaluate.eval_metrics: full games on a separate pool),
    perf/eval_time (left out of charts/SPS), and checkpoints/best.pt when the score beats every earlier
    evaluation of the run (eval/best_return)."""
    t = time.perf_counter()
    norms = s.collection.collector.norms
    out = eval_metrics(s.policy, info, cfg, s.progress.iteration, norms.obs)
    score = out["eval/episodic_return"]
    if score > s.progress.best_eval:
        s.progress.best_eval = score
        try:
            save_best(cfg.run_dir, {"model": s.policy.state_dict(), "config": cfg.to_dict(),
                                    "identity": run_identity(cfg.to_dict()), "iteration": s.progress.iteration,
                                    "global_step": s.progress.global_step, "normalizer": norms.state_dict(),
                                    "eval_return": score})
        except ValueError as e:  # a value of the state is not finite (checkpoint.bad_value): never a best.pt
            raise TrainingDiverged(f"{e} at iteration {s.progress.iteration}; stopping, "
                                   f"{last_checkpoint_note(cfg.run_dir, 'last good')}") from None
    out["eval/best_return"] = s.progress.best_eval
    out["perf/eval_time"] = time.perf_counter() - t
    s.progress.eval_time += out["perf/eval_time"]
    return out


def save_due(cfg: Config, iteration: int, stopping: str | None) -> bool:
    """A checkpoint after every --save-every iterations, when the run stops, and at its last iteration."""
    return bool(stopping or iteration == cfg.num_iterations or (cfg.save_every and iteration % cfg.save_every == 0))


# --- checkpoints ---------------------------------------------------------------------------------


def checkpoint_state(cfg: Config, policy: nn.Module, optimizer: torch.optim.Optimizer, progress: Progress,
                     kl_ctl: AdaptiveKLCoef, collection: Collection, recent: RecentReturns,
                     command: str, lr_ctl: AdaptiveLR | None = None) -> dict | None:
    """Everything the loop needs to go on. The LR follows from the iteration and the config, except with
    --lr-schedule adaptive, whose next LR is state (``adaptive_lr``).

    Under torchrun every rank calls it (a collective) and rank 0 gets the state, others None: the
    model, optimizer and beta are the same on every rank; ``actions`` (sync collection only: the
    action log that a resume replays) are those of all ranks, rank r's envs in columns
    [r * N, (r + 1) * N); ``rank_rng`` and ``collection`` hold each rank's RNG states and collection
    state (the acting generator with --overlap).
    """
    gathered = distributed.gather_on_main((collection.state(), rng_state()))
    if gathered is None:
        return None
    collections, rngs = zip(*gathered, strict=True)
    actions = [c.pop("actions") for c in collections]
    state = {
        "model": policy.state_dict(),
        "optimizer": optimizer.state_dict(),
        "config": cfg.to_dict(),
        "identity": run_identity(cfg.to_dict()),
        "iteration": progress.iteration,
        "global_step": progress.global_step,
        "kl_coef": kl_ctl.beta,
        "rng": rngs[0],
        # (iteration * T, world * N), every action sent; None for async/overlap collection
        "actions": None if actions[0] is None else torch.from_numpy(np.concatenate(actions, axis=1)),
        "collection": list(collections),
        "elapsed": progress.elapsed(),  # wall-clock seconds of training so far (time/elapsed)
        "recent_returns": recent.state(),  # the recent-return window
        "best_eval": progress.best_eval,  # the score of checkpoints/best.pt
        "command": command,  # how the run was started, for its model card
        "normalizer": collection.collector.norms.state_dict(),  # synced: the same on every rank
    }
    if lr_ctl is not None:
        state["adaptive_lr"] = lr_ctl.lr  # the next iteration's, after this one's KL moved it
    if cfg.world_size > 1:
        state["rank_rng"] = rngs
    return state


def save(cfg: Config, info: EnvInfo, state: dict | None, progress: Progress, metrics: dict) -> str:
    """save_checkpoint on rank 0 (state None elsewhere: see checkpoint_state), then the run's model card
    (logger.write_model_card); the checkpoint's path.

    A state holding a value that is not finite or out of its range (checkpoint.bad_value, an action
    outside the env's) is never written (TrainingDiverged: the last checkpoint stays the last good one).
    """
    if state is None:
        return checkpoint_path(cfg.run_dir, progress.iteration)
    try:
        wrong = bad_actions(state["actions"], info.num_actions, info.continuous)
        if wrong is not None:
            raise ValueError(wrong)
        path = save_checkpoint(cfg.run_dir, progress.iteration, state)
    except ValueError as e:  # Host-device sync, deliberate: the finiteness check reads every tensor once per save
        kept = last_checkpoint_note(cfg.run_dir, "last good")
        raise TrainingDiverged(f"{e} at iteration {progress.iteration} (global step {progress.global_step}); "
                               f"stopping, {kept}") from None
    write_model_card(cfg.run_dir, cfg, metrics, command=state["command"], best=progress.best_eval,
                     versions=versions())
    return path


def versions() -> dict[str, str]:
    """fastppo, torch, envpool, gymnasium and Python versions, for the model card."""
    import platform

    import envpool
    import gymnasium

    from fastppo import __version__

    return {"fastppo": __version__, "torch": torch.__version__, "envpool": envpool.__version__,
            "gymnasium": gymnasium.__version__, "python": platform.python_version()}


def restore(state: dict, policy: nn.Module, optimizer: torch.optim.Optimizer, kl_ctl: AdaptiveKLCoef,
            collection: Collection, rank: int = 0, lr_ctl: AdaptiveLR | None = None) -> None:
    """Put the loop back where the checkpoint was taken.

    Model, optimizer, beta, the adaptive learning rate and the normalisers' statistics (and each env's
    discounted return) are loaded. Sync collection: the envs, freshly made with the run's seed,
    replay every action of the run (EnvPool cannot save an env's state), which rebuilds their state,
    the next observation and the running game scores exactly. Async/overlap collection: the envs
    were made with fresh seeds (see ``prepare.prepare_resume``); the acting generator is restored. The
    RNG states come last, as they were. Under torchrun every rank loads the same checkpoint and
    takes its own columns and states.
    """
    policy.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    kl_ctl.set(state["kl_coef"])
    if lr_ctl is not None:
        lr_ctl.lr = state["adaptive_lr"]  # check_loadable made sure it is there
    norms = collection.collector.norms
    norms.load_state_dict(state.get("normalizer", {}))  # before the replay, which normalises with them
    own = state["collection"][rank] if "collection" in state else {}
    if norms.reward is not None and "reward_returns" in own and state["actions"] is not None:
        norms.reward.returns.copy_(own["reward_returns"])  # the replayed envs' games go on (restarted ones: 0)
    if state["actions"] is not None:
        n = collection.collector.num_envs
        collection.collector.replay(state["actions"][:, rank * n : (rank + 1) * n].numpy())
    acting = own.get("acting_rng")
    if acting is not None and getattr(collection.actor, "generator", None) is not None:
        collection.actor.generator.set_state(acting)
    set_rng_state(state["rank_rng"][rank] if "rank_rng" in state else state["rng"])


# --- the run ---------------------------------------------------------------------------------------


def train(cfg: Config, env: Callable | None = None) -> dict:
    """Train from cfg; returns the last metrics line, with "stopped_by": "total_timesteps",
    "target_return" or "max_seconds". Writes cfg.run_dir (see README).

    env: the env to train on instead of cfg.env_id, a factory (``fastppo.gymenv``): of a Gymnasium env (a
    ``gymnasium.Env`` class or function), of a Gymnasium vector env (it takes ``num_envs``), or of a device env
    (it takes ``num_envs`` and ``device``: ``fastppo.devenv.DeviceEnv``). cfg.env_id is then left unset; the
    run names the env by the factory's import path where it has one (so ``fastppo eval`` and a resume make it
    again), else ``python:<name>``, and a resume then takes the same env= again.

    The fields the caller set (``config.given_fields``: the Config call's arguments, fields assigned another
    value since, or the command line's flags) override cfg.preset's values. With cfg.resume, continues that
    run: only the RESUME_FLAGS may be set then. Raises ConfigError / EnvError / CheckpointError on bad input (before
    anything is written), TrainingInterrupted after SIGINT/SIGTERM, TrainingDiverged on NaN, WriteFailed
    when the run folder cannot be written. Under torchrun: one rank of a data-parallel run; only rank
    0 prints and writes the run folder.
    """
    world = World.from_env()
    check_types(cfg)  # a Config from Python is not parsed: Config(algo="sac") stops here
    if cfg.resume is not None:  # the saved config holds its preset's values (--preset is refused with --resume)
        prepared = prepare_resume(cfg, world, env)
    else:
        prepared = prepare(cfg, world, env)
        prepared.command = command_line(cfg)  # the flags the caller set, before the preset fills the rest
    threads = torch.get_num_threads()  # --torch-threads changes a process-wide setting: put it back after
    try:
        if prepared.cfg.track and not tracking.wandb_installed():
            raise ConfigError("--track needs wandb: pip install 'fastppo[track]'")
        if prepared.cfg.tensorboard and not tensorboard_installed():
            raise ConfigError("--tensorboard needs tensorboard: pip install 'fastppo[tensorboard]'")
        with distributed.process_group(world, prepared.device, prepared.cfg.dist_timeout):
            return _train(prepared, world)
    finally:
        if prepared.folder is not None:
            prepared.folder.release()
        torch.set_num_threads(threads)


@dataclass
class Session:
    """What the loop works with, built by :func:`build`."""

    policy: nn.Module
    forward: nn.Module  # bf16 autocast / compiled wrapper of policy (same parameters)
    train_forward: nn.Module  # forward, wrapped in DDP under torchrun
    optimizer: torch.optim.Optimizer
    collection: Collection
    kl_ctl: AdaptiveKLCoef
    lr_ctl: AdaptiveLR | None  # --lr-schedule adaptive
    value_norm: ValueNormalizer | None  # --norm-value; the run's Normalizers (the collectors') hold it too
    recent: RecentReturns
    progress: Progress
    timer: PhaseTimer
    collect_timer: PhaseTimer


def build(prepared: Prepared, world: World) -> Session:
    """Envs, networks, optimizer and collection of this rank; on resume, put back as checkpointed."""
    cfg, info, device, state = prepared.cfg, prepared.info, prepared.device, prepared.resume
    # Async/overlap runs resume with their envs restarted on fresh seeds derived from (seed, iteration).
    restart = state["iteration"] if state is not None and state["actions"] is None else 0
    torch_seed, env_seed = distributed.rank_seeds(cfg.seed, cfg.num_envs, world.rank, restart)
    seed_everything(torch_seed, cfg.torch_deterministic)
    if cfg.torch_threads or not info.is_image:  # auto: 1 thread for the MLP (see --torch-threads)
        torch.set_num_threads(cfg.torch_threads or 1)
    envs = make_envs(
        info, cfg.num_envs, env_seed,
        num_threads=cfg.env_threads,
        max_episode_steps=cfg.max_episode_steps,
        repeat_action_probability=cfg.repeat_action_probability,
        batch_size=cfg.recv_batch_size if cfg.async_envs else None,
        device=device,
    )
    try:
        policy = make_policy(info).to(device)
        optimizer = make_optimizer(policy, cfg)
        # the update calls `forward` (bf16 autocast / compiled wrapper, same parameters); checkpoints hold
        # `policy`. Under torchrun the update calls DDP around it (gradients averaged across ranks in
        # backward); acting and the no-grad KL call `forward` itself.
        forward = learner_forward(policy, cfg.bf16, cfg.compile)
        collect_timer = PhaseTimer(device)
        first = 1 if state is None else state["iteration"] + 1
        norms = make_normalizers(cfg, info, device)
        collection = make_collection(cfg, envs, info, device, policy, forward, collect_timer,
                                     rollouts=cfg.num_iterations - first + 1, seed=torch_seed + 1, norms=norms)
    except BaseException:
        envs.close()
        raise
    lr_ctl = (AdaptiveLR(cfg.learning_rate, cfg.kl_min, cfg.kl_max, cfg.lr_min, cfg.lr_max, cfg.lr_factor)
              if cfg.lr_schedule == "adaptive" else None)
    session = Session(policy, forward, distributed.wrap_model(forward, device), optimizer, collection,
                      AdaptiveKLCoef(cfg.kl_coef, cfg.kl_min, cfg.kl_max, cfg.kl_coef_min, cfg.kl_coef_max), lr_ctl,
                      norms.value, RecentReturns(cfg.target_return_games), Progress(), PhaseTimer(device),
                      collect_timer)
    if state is not None:
        try:
            restore(state, policy, optimizer, session.kl_ctl, collection, world.rank, lr_ctl)
        except BaseException:
            collection.close()
            raise
        session.recent.extend(state["recent_returns"])
        p = session.progress
        p.iteration, p.global_step, p.elapsed_before = state["iteration"], state["global_step"], state["elapsed"]
        p.best_eval = state["best_eval"]
        p.start_step = p.global_step
    return session


def _train(prepared: Prepared, world: World) -> dict:
    cfg, device = prepared.cfg, prepared.device
    main = distributed.is_main()
    stop = StopOnSignal()
    stop.install()  # from here a SIGINT/SIGTERM is a request: before training starts it undoes the start
    folder = prepared.folder
    try:
        if prepared.resume is None:
            claimed: list[RunFolder] = []  # rank 0's; every rank gets the path (or the ConfigError)
            cfg.run_dir = distributed.on_main(lambda: claimed.append(claim_run_dir(cfg)) or claimed[0].path)
            folder = claimed[0] if claimed else None
        session = None
        try:
            session = build(prepared, world)
            if distributed.any_rank(stop.signum is not None, device):  # a signal while setting up: undo the start
                signum = stop.signum or signal.SIGTERM
                what = "the run is unchanged" if prepared.resume is not None else "nothing was written"
                raise TrainingInterrupted(signum, f"stopped by {signal.Signals(signum).name} before training "
                                                  f"started; {what}")
            logger, tracker = start_outputs(cfg, prepared, folder) if main else (_Quiet(), None)
        except BaseException:  # the start failed or was interrupted: a new run's folder is left as it was
            if session is not None:
                session.collection.close()
            if folder is not None and prepared.resume is None:
                folder.abandon()
            raise
        try:
            if folder is not None:
                folder.commit()
            return _loop(cfg, prepared, session, logger, tracker, stop, device, folder)
        finally:
            session.collection.close()
    finally:
        stop.restore()
        if folder is not None and folder is not prepared.folder:
            folder.release()


def start_outputs(cfg: Config, prepared: Prepared, folder: RunFolder):
    """Rank 0: config.json (a resume keeps its metrics up to the checkpoint), metrics logger, W&B."""
    run_dir = cfg.run_dir
    folder.check()  # still the folder it locked (RunFolder.check)
    notice = env_id_notice(cfg) if prepared.resume is None else None
    if notice is not None:
        print(f"fastppo: {notice}", flush=True)
    steps = cfg.num_iterations * cfg.global_batch_size
    # Said once, so that a shorter run than asked is no surprise; only when the caller asked for a number of
    # steps: every default budget (and a preset's) rounds down with the default sizes, as CleanRL's does.
    if steps != cfg.total_timesteps and "total_timesteps" in given_fields(cfg):
        print(f"fastppo: --total-timesteps {cfg.total_timesteps:,} rounds down to {cfg.num_iterations} iteration(s) of "
              f"{cfg.global_batch_size:,} steps: training {steps:,} steps", flush=True)
    with write_errors(run_dir):
        save_config(cfg, os.path.join(run_dir, "config.json"))
        if prepared.resume is not None:
            keep_metrics_until(run_dir, prepared.resume["iteration"])
    tracker = None
    if cfg.track:
        tracker = tracking.Tracker.start(run_dir, project=cfg.wandb_project, entity=cfg.wandb_entity,
                                         group=cfg.wandb_group, tags=cfg.wandb_tags, config=cfg.to_dict())
    board = None
    if cfg.tensorboard:
        board = TensorBoardWriter(run_dir, resume_step=None if prepared.resume is None
                                  else prepared.resume["global_step"])
    try:
        with write_errors(run_dir):
            logger = RunLogger(run_dir, cfg.num_iterations * cfg.global_batch_size, log_every=cfg.log_every,
                               log_seconds=cfg.log_seconds, tracker=tracker, window=cfg.target_return_games,
                               title=f"fastppo {cfg.env_id}  {run_dir}", tensorboard=board)
    except WriteFailed:
        if tracker is not None:
            tracker.finish(1)
        if board is not None:
            board.finish(1)
        raise
    resumed = f", resumed after iteration {prepared.resume['iteration']}" if prepared.resume is not None else ""
    logger.announce(f"training {cfg.env_id} in {run_dir}{resumed}")
    return logger, tracker


def _loop(cfg: Config, prepared: Prepared, s: Session, logger, tracker, stop: StopOnSignal,
          device: torch.device, folder: RunFolder | None) -> dict:
    """The training loop (see the module docstring); returns the last metrics line with "stopped_by".

    folder: rank 0's locked run folder (None on the other ranks), checked before each write and at the
    end: a run whose folder was removed or replaced under it stops with WriteFailed, never "finished".
    """
    ops, progress, run_dir = prepared.ops, s.progress, cfg.run_dir
    metrics: dict = {}
    reason: str | None = None
    exit_code = 1
    progress.start_time = time.time()
    try:
        for iteration in range(progress.iteration + 1, cfg.num_iterations + 1):
            t_start = time.perf_counter()
            progress.iteration = iteration
            lr = set_learning_rate(s.optimizer, cfg, iteration, s.lr_ctl)
            logger.phase("collect")
            buf = s.collection.next()  # envs -> rollout storage
            t_collected = time.perf_counter()  # collection ends synchronised: each step waits for its actions
            logger.phase("update")
            kl_coef = s.kl_ctl.beta
            with s.timer.phase("gae"):
                buf = raw_values(buf, s.value_norm)
                compute_advantages(buf, ops.gae, cfg.gamma, cfg.gae_lambda)
                if s.value_norm is not None:
                    s.value_norm.update(buf.returns, buf.valid)
            with s.timer.phase("update"):
                if cfg.decoupled:  # pi_prox replaces the behaviour policy in the loss and the measured KL
                    buf, lag_kl = proximal_rollout(s.train_forward, buf, cfg.minibatch_size)
                targets = normalized_targets(buf, s.value_norm)
                if cfg.algo == "trpo":
                    stats = trpo_update(s.policy, s.forward, s.optimizer, targets, cfg)
                else:
                    stats = update(s.train_forward, s.optimizer, targets, cfg, ops, kl_coef, s.value_norm)
                stats.update(rollout_stats(buf, s.forward, cfg), params_finite=params_finite(s.policy))
                if cfg.decoupled:
                    stats["lag_kl"] = lag_kl
            s.collection.refresh(s.policy)
            with s.timer.phase("logging", host=True):
                values = host_values(stats, device)
            t_updated = time.perf_counter()
            progress.global_step += cfg.global_batch_size
            check_finite(values, progress, run_dir)
            if folder is not None:
                folder.check()
            # beta and the adaptive learning rate move on the KL averaged over the ranks (host_values): the
            # same decision on every rank, taken where the iteration syncs anyway
            if cfg.loss == "penalty":
                s.kl_ctl.update(values["kl"])
            if s.lr_ctl is not None:
                s.lr_ctl.update(values["kl"])
            games = distributed.all_games(*buf.games)  # the games of every rank
            s.recent.extend(games[0])
            metrics = iteration_metrics(cfg, progress, lr, kl_coef, values, games, s.recent)
            metrics.update(perf_metrics(s.timer, s.collect_timer, t_collected - t_start, t_updated - t_collected,
                                        time.perf_counter() - t_start))
            if distributed.is_main() and eval_due(cfg, iteration):
                logger.phase("eval")
                with write_errors(run_dir):
                    metrics.update(evaluate(cfg, prepared.info, s))
            with s.timer.phase("logging", host=True), write_errors(run_dir):
                logger.log(metrics)
            reason = stop_reason(cfg, s.recent, progress, stop, device)
            if save_due(cfg, iteration, reason):
                logger.phase("checkpoint")
                if folder is not None:
                    folder.check()
                with write_errors(run_dir):
                    path = save(cfg, prepared.info, checkpoint_state(cfg, s.policy, s.optimizer, progress, s.kl_ctl,
                                                                     s.collection, s.recent, prepared.command,
                                                                     s.lr_ctl), progress, metrics)
            if reason is not None:
                break
        if folder is not None:
            folder.check()
        logger.announce(result_line(cfg, reason, progress, s.recent, stop))
        if reason == "signal":
            signum = stop.signum or signal.SIGTERM  # a rank stopped by another rank's signal
            exit_code = 128 + signum
            raise TrainingInterrupted(
                signum, f"stopped by {signal.Signals(signum).name} after iteration {progress.iteration} "
                f"(global step {progress.global_step:,}); saved {path}; go on with: fastppo train --resume {run_dir}")
        if tracker is not None:
            tracker.log_model(path, progress.global_step)
        exit_code = 0
    finally:
        try:
            with write_errors(run_dir):  # the last line is flushed here: a full disk shows up here too
                logger.close()
        finally:
            if tracker is not None:
                tracker.finish(exit_code)
    return dict(metrics, stopped_by=reason or "total_timesteps")


def result_line(cfg: Config, reason: str | None, progress: Progress, recent: RecentReturns,
                stop: StopOnSignal) -> str:
    """How the run ended, for the last progress line (and the live display's last state)."""
    where = f"after {progress.global_step:,} steps (iteration {progress.iteration} of {cfg.num_iterations})"
    if reason == "target_return":  # the run's one line about its target
        return (f"target return {cfg.target_return} reached: mean of the last {cfg.target_return_games} games is "
                f"{recent.mean():.2f} {where}; run folder {cfg.run_dir}")
    if reason == "max_seconds":
        why = f"stopped at --max-seconds {cfg.max_seconds:g}"
    elif reason == "signal":
        why = f"stopped by {signal.Signals(stop.signum or signal.SIGTERM).name}"
    else:
        why = "finished"
    recent_return = recent.mean()
    score = f"recent return {recent_return:.2f}" if recent_return is not None else "no recent return yet"
    return f"{why} {where}, {score}; run folder {cfg.run_dir}"


@contextlib.contextmanager
def write_errors(run_dir: str):
    """An OSError while writing the run folder (disk full, say) becomes WriteFailed: one line, and the last
    checkpoint stays intact (checkpoints are written to a temporary file and renamed)."""
    try:
        yield
    except OSError as e:
        raise WriteFailed(f"cannot write to the run folder {run_dir!r} ({e.strerror or e}); "
                          f"{last_checkpoint_note(run_dir)}") from None


class _Quiet:
    """The logger of the ranks other than 0: they neither print nor write."""

    def phase(self, name: str) -> None:
        pass

    def announce(self, text: str) -> None:
        pass

    def log(self, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass
