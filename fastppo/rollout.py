"""Rollout storage on the training device and the collection loop that fills it.

Storage is allocated once, time-major ``[T, N, ...]``; observations keep the env's dtype (uint8
for Atari, so 4096 envs x 128 steps of 4x84x84 frames is 14.8 GB rather than 59 GB in float32).

Row t of every buffer describes one transition of each env: the observation seen (normalised with
``--norm-obs``), the action chosen for it (with its log-prob, value and action-distribution
parameters under the behaviour policy, recorded when the action was chosen), and what the env
returned (the reward scaled with ``--norm-reward``). ``values`` has a row T for the bootstrap value.

Two collectors fill a buffer:

* :class:`Collector` steps a synchronous pool: every env, every step (CleanRL, the default).
* :class:`AsyncCollector` uses EnvPool's ``send``/``recv``: each ``recv`` returns the
  ``batch_size`` envs that finished first, in any order. Each env has its own time cursor and its
  step lands in its own column; see the class for how a rollout ends and carries over.

The trainer sees neither: it asks a :class:`Collection` for the next rollout (``next()``), hands it
the learner's weights after each update (``refresh(policy)``), takes its part of a checkpoint
(``state()``) and closes it (``close()``). :class:`InlineCollection` collects each rollout when asked,
acting with the learner itself; :class:`OverlapCollection` (``--overlap``) collects rollout k+1 in a
background thread (on CUDA, its own stream; :class:`BackgroundCollection`) with a frozen copy of the
weights while the trainer updates on rollout k. :func:`make_collection` picks one from the config.

Data path on CUDA: EnvPool's numpy arrays are copied into pinned host buffers, then copied to the
device with ``non_blocking=True`` (:class:`Stager`); the only host sync per step is the copy of the
chosen actions to the host, which EnvPool needs.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from torch import nn

from fastppo.envs import EnvInfo, EpisodeStats
from fastppo.normalize import Normalizers
from fastppo.perf import PhaseTimer, copy_weights, learner_forward
from fastppo.policy import Actor


def observe(norms: Normalizers, obs: torch.Tensor, update: bool = True) -> torch.Tensor:
    """The observation the policy sees: with --norm-obs normalised, after updating the statistics."""
    if norms.obs is None:
        return obs
    return norms.obs(obs) if update else norms.obs.normalize(obs)


def action_log_dtype(info: EnvInfo) -> np.dtype:
    """The action log's dtype: one byte per discrete action when it fits, float32 for continuous ones."""
    if info.continuous:
        return np.dtype(np.float32)
    return np.dtype(np.uint8 if info.num_actions <= 256 else np.int32)


@dataclass
class Rollout:
    obs: torch.Tensor  # (T, N, *obs_shape), the env's dtype (uint8 frames, int64 state indices) or float32
    actions: torch.Tensor  # (T, N) int64, or (T, N, D) float32 unclipped Gaussian samples
    logprobs: torch.Tensor  # (T, N) log pi_old(a|s)
    dist: torch.Tensor  # (T, N, P) behaviour distribution: logits (A) or [mean, log-std] (2 D), for the exact KL
    values: torch.Tensor  # (T + 1, N) V_old(s); row T bootstraps
    rewards: torch.Tensor  # (T, N) training reward (clipped for Atari)
    terminated: torch.Tensor  # (T, N) bool
    truncated: torch.Tensor  # (T, N) bool
    valid: torch.Tensor  # (T, N) bool; False on EnvPool's autoreset step
    advantages: torch.Tensor  # (T, N), filled by advantage.compute_advantages
    returns: torch.Tensor  # (T, N)
    next_obs: torch.Tensor  # (N, *obs_shape), the observation after row T - 1 (for values[T])
    # host side: (returns, lengths) of the games that ended while this rollout was collected
    games: tuple[list[float], list[int]] = ((), ())

    @classmethod
    def allocate(cls, info: EnvInfo, num_steps: int, num_envs: int, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> Rollout:
        """Zeroed storage for T steps of N envs; `dtype` is the float fields' (float64 for tests)."""
        T, N = num_steps, num_envs
        obs_dtype = torch.from_numpy(np.zeros(0, dtype=info.obs_dtype)).dtype

        def f32(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        def flag() -> torch.Tensor:
            return torch.zeros((T, N), dtype=torch.bool, device=device)

        return cls(
            obs=torch.zeros((T, N, *info.obs_shape), dtype=obs_dtype, device=device),
            actions=torch.zeros((T, N, *info.action_shape), dtype=dtype if info.continuous else torch.int64,
                                device=device),
            logprobs=f32(T, N),
            dist=f32(T, N, info.dist_size),
            values=f32(T + 1, N),
            rewards=f32(T, N),
            terminated=flag(),
            truncated=flag(),
            valid=flag(),
            advantages=f32(T, N),
            returns=f32(T, N),
            next_obs=torch.zeros((N, *info.obs_shape), dtype=obs_dtype, device=device),
        )

    @property
    def num_steps(self) -> int:
        return self.obs.shape[0]

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]


@dataclass
class SpillRollout(Rollout):
    """A Rollout whose fields are views of rows [0, T] of longer storage, (T + S, N, ...).

    The async collector writes an env's steps past row T - 1 into rows T.. (the spill) while slower
    envs finish the rollout; the next rollout starts by copying the spill to its rows [0, S).
    ``next_obs`` is row T of ``full["obs"]`` and ``values[T]`` row T of ``full["values"]``.
    """

    full: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def allocate_spill(cls, info: EnvInfo, num_steps: int, num_envs: int, spill_rows: int,
                       device: torch.device) -> SpillRollout:
        T, S, N = num_steps, spill_rows, num_envs
        base = Rollout.allocate(info, T + S, N, device)  # every per-row field has T + S rows
        full = {name: getattr(base, name) for name in STEP_FIELDS}
        full["values"] = base.values[: T + S]
        views = {name: t[:T] for name, t in full.items()}
        views["values"] = full["values"][: T + 1]
        return cls(**views, advantages=base.advantages[:T], returns=base.returns[:T], next_obs=full["obs"][T],
                   full=full)

    def tensors(self) -> list[torch.Tensor]:
        return [*self.full.values(), self.advantages, self.returns]


def dist_kind(buf: Rollout) -> str:
    """The policy's distribution, read off the rollout: Gaussian samples are floats, categorical ones ints."""
    return "gaussian" if buf.actions.is_floating_point() else "categorical"


def flatten(buf: Rollout) -> dict[str, torch.Tensor]:
    """(T, N, ...) -> (T * N, ...) views of the fields the update reads."""
    T, N = buf.rewards.shape
    return {
        "obs": buf.obs.reshape(T * N, *buf.obs.shape[2:]),
        "actions": buf.actions.reshape(T * N, *buf.actions.shape[2:]),
        "logprobs": buf.logprobs.reshape(-1),
        "dist": buf.dist.reshape(T * N, -1),
        "values": buf.values[:T].reshape(-1),
        "advantages": buf.advantages.reshape(-1),
        "returns": buf.returns.reshape(-1),
        "valid": buf.valid.reshape(-1),
    }


SPILL_ROWS = 16  # rows past T an async env may run ahead into while the slowest envs finish the rollout

# The per-step fields an env's transition writes (advantages and returns are computed later).
STEP_FIELDS = ("obs", "actions", "logprobs", "dist", "values", "rewards", "terminated", "truncated", "valid")


class Stager:
    """numpy -> device tensors for the collectors.

    On CUDA each array is copied into a pinned host buffer kept per name (a host memcpy), then to
    the device with ``non_blocking=True``: the host does not wait for the copy. Before a buffer is
    refilled, the event recorded after its last copy is waited on; by then the per-step action sync
    has normally passed it, so the wait costs nothing. On CPU the array is wrapped, not copied.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.pinned: dict[str, tuple[torch.Tensor, torch.cuda.Event]] = {}

    def __call__(self, name: str, array: np.ndarray) -> torch.Tensor:
        src = torch.from_numpy(np.ascontiguousarray(array))
        if not self.cuda:
            return src
        entry = self.pinned.get(name)
        if entry is None or entry[0].shape != src.shape or entry[0].dtype != src.dtype:
            entry = (torch.empty(src.shape, dtype=src.dtype, pin_memory=True), torch.cuda.Event())
            self.pinned[name] = entry
        host, copied = entry
        copied.synchronize()  # the previous non-blocking copy out of this buffer has finished
        host.copy_(src)
        out = host.to(self.device, non_blocking=True)
        copied.record()
        return out


def as_words(t: torch.Tensor) -> torch.Tensor:
    """t (B, ...) contiguous, as (B, W) of the widest integer type that tiles a row: the same memory.

    Index copies of whole rows then move up to 8 bytes per element instead of 1: on CPU, scattering
    128 uint8 Pong observations (28 KB each) into the rollout took 3.3 ms as uint8 and 0.5 ms as
    int64 (one thread, bench/host_overhead.py measures the collectors).
    """
    rows = t.view(t.shape[0], -1)
    row_bytes = rows.shape[1] * t.element_size()
    for dtype in (torch.int64, torch.int32, torch.int16):
        size = dtype.itemsize
        if size > t.element_size() and row_bytes % size == 0 and t.storage_offset() * t.element_size() % size == 0:
            return rows.view(torch.uint8).view(dtype)
    return rows


def gather_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t[idx] for t (B, ...), copied as words when t is contiguous (see as_words).

    Gathering a minibatch of 256 uint8 Pong observations out of 1024 took 6.6 ms as uint8 and
    1.3 ms as int64 on CPU (one thread).
    """
    words = as_words(t) if t.is_contiguous() else None
    if words is None or words.dtype == t.dtype:
        return t[idx]
    return words[idx].view(t.dtype).view(idx.shape[0], *t.shape[1:])


def _as_actor(policy: nn.Module | Actor, generator: torch.Generator | None) -> Actor:
    return policy if isinstance(policy, Actor) else Actor(policy, generator=generator)


class Collector:
    """Steps a synchronous EnvPool pool and writes each step into a Rollout (CleanRL's loop).

    Carries what must survive from one rollout to the next: the current observation (on the
    device) and whether each env's next step is EnvPool's reset step.

    ``action_log`` holds every action sent to the envs since their reset, one host array per rollout,
    (T, N) (uint8 when the action space allows) or (T, N, D) float32 for continuous actions: EnvPool
    cannot save an env's state, so a resumed run rebuilds it by re-creating the envs with the same
    seed and replaying these actions (:meth:`replay`). ``record=False`` keeps no log (``--overlap``,
    whose resume restarts the envs on fresh seeds instead); ``state()`` then holds no actions.

    ``norms`` (optional) normalises the observations and scales the rewards on the device
    (``fastppo.normalize``); the rollout keeps what the policy saw and what it is trained on.
    """

    def __init__(self, envs, info: EnvInfo, device: torch.device, generator: torch.Generator | None = None,
                 timer: PhaseTimer | None = None, norms: Normalizers | None = None, record: bool = True):
        self.envs = envs
        self.info = info
        self.record = record
        self.device = device
        self.generator = generator
        self.timer = timer or PhaseTimer(device)
        self.stage = Stager(device)
        self.norms = norms or Normalizers(None, None)
        obs, _ = envs.reset()
        self.num_envs = len(obs)
        self.stats = EpisodeStats(self.num_envs, info.is_atari)
        # The reset's observation is normalised by the first collect(), once a resume has loaded the
        # statistics (a resume that replays nothing would otherwise act on it normalised by fresh ones).
        self.next_obs = torch.from_numpy(obs).to(device)
        self.next_is_raw = True
        self.next_is_reset = torch.zeros(self.num_envs, dtype=torch.bool, device=device)
        self.action_dtype = action_log_dtype(info)
        self.action_log: list[np.ndarray] = []

    def replay(self, actions: np.ndarray) -> None:
        """Step the freshly reset envs with actions (S, N[, D]), as collect() did, without a policy.

        Leaves the envs, the next observation, the reset flags and the running full-game scores as
        they were after those S steps; games that ended during the replay were reported then, and are
        dropped here. The normalisers are not updated: their checkpointed state is loaded as it was.
        """
        obs = done = None
        for row in actions:
            obs, reward, terminated, truncated, info = self.envs.step(row if self.info.continuous
                                                                      else row.astype(np.int64))
            self.stats.update(reward, terminated, truncated, info)
            done = terminated | truncated
        if obs is not None:
            self.next_obs = observe(self.norms, torch.from_numpy(obs).to(self.device), update=False)
            self.next_is_raw = False
            self.next_is_reset = torch.from_numpy(done).to(self.device)
        self.stats.pop()
        self.action_log = [np.ascontiguousarray(actions, dtype=self.action_dtype)]

    def state(self) -> dict:
        """This rank's part of a checkpoint: every action sent since the envs' reset, (S, N[, D]) on the
        host, and each env's discounted return with --norm-reward.

        The log is kept as one array afterwards, so the next save is one copy. Without ``record`` the
        actions are None.
        """
        if self.record and len(self.action_log) != 1:
            self.action_log = [np.concatenate(self.action_log) if self.action_log
                               else np.zeros((0, self.num_envs, *self.info.action_shape), dtype=self.action_dtype)]
        out = {"actions": self.action_log[0] if self.record else None}
        if self.norms.reward is not None:
            out["reward_returns"] = self.norms.reward.returns.cpu()
        return out

    def allocate(self, num_steps: int, num_buffers: int = 1) -> list[Rollout]:
        return [Rollout.allocate(self.info, num_steps, self.num_envs, self.device) for _ in range(num_buffers)]

    def collect(self, policy: nn.Module | Actor, buf: Rollout) -> None:
        """Fill buf with num_steps steps of every env, acting with policy (a module or an Actor)."""
        actor = _as_actor(policy, self.generator)
        timer = self.timer
        if self.next_is_raw:
            self.next_obs = observe(self.norms, self.next_obs)
            self.next_is_raw = False
        sent = np.empty((buf.num_steps, self.num_envs, *self.info.action_shape), dtype=self.action_dtype)
        if self.record:
            self.action_log.append(sent)
        for t in range(buf.num_steps):
            buf.obs[t] = self.next_obs
            buf.valid[t] = ~self.next_is_reset
            with timer.phase("inference"):
                action, logprob, value, dist = actor(self.next_obs)
                buf.actions[t] = action
                buf.logprobs[t] = logprob
                buf.values[t] = value
                buf.dist[t] = dist
                # Host-device sync, deliberate: EnvPool needs the actions on the host.
                host_action = action.cpu().numpy()
            sent[t] = host_action
            with timer.phase("env_wait", host=True):
                obs, reward, terminated, truncated, info = self.envs.step(host_action)
            self.stats.update(reward, terminated, truncated, info)
            with timer.phase("h2d"):
                reward = self.stage("reward", reward)
                term = self.stage("terminated", terminated)
                trunc = self.stage("truncated", truncated)
                if self.norms.reward is not None:
                    reward = self.norms.reward(reward, term, buf.valid[t])
                buf.rewards[t] = reward
                buf.terminated[t] = term
                buf.truncated[t] = trunc
                self.next_is_reset = term | trunc
                self.next_obs = observe(self.norms, self.stage("obs", obs))
        buf.next_obs.copy_(self.next_obs)
        with timer.phase("inference"):
            buf.values[buf.num_steps] = actor.value(self.next_obs)


class AsyncCollector:
    """Steps an async EnvPool pool (``send``/``recv``, ``batch_size < num_envs``) into SpillRollouts.

    Each ``recv`` returns ``batch_size`` envs, whichever finished first, in any order. For each env
    the recv holds the result of its previous transition (reward, terminated, truncated) and the
    observation of its next one. Env n has a time cursor ``cursor[n]``, the row of column n where
    its next observation lands; on a recv, for the returned env ids (vectorised, no loop over envs):

    1. the result goes to row ``cursor - 1`` (the transition whose action was sent last);
    2. the observation goes to row ``cursor``, valid unless the result ended the episode (EnvPool's
       autoreset step ignores the action and is masked, as in the sync loop);
    3. the actor chooses actions for them; action, log-prob, value and distribution are stored at row
       ``cursor`` as they are chosen, the cursor moves on, and the actions are sent.

    A rollout is complete when every env has rows 0..T (T transitions with their results, and the
    observation and value of row T, which bootstraps GAE). EnvPool's ``recv`` blocks until
    ``batch_size`` envs report, so envs that are done cannot simply wait for the slowest one: fewer
    than ``batch_size`` envs in flight would hang the pool. They keep stepping into the spill rows
    T..T+S-1, acting with the same policy. Row T of an env is thus row 0 of its next rollout: the
    next :meth:`collect` copies rows [T, T+S) to [0, S) (of the next buffer, or of the same one
    after the update) and moves every cursor back by T. An env that fills its spill is held (its
    last observation is stored, no action is sent) until the next rollout acts on it; if so many
    envs are held that fewer than ``batch_size`` remain in flight, collection stops with an error
    rather than hanging (raise --num-steps, or lower --env-batch-size).

    Consequence for on-policy-ness: the first steps of an env in rollout k + 1 (row 0, and any spill
    rows) were chosen by the policy that collected rollout k, before its update. Their behaviour
    log-probs are the ones stored, so PPO's importance ratio stays correct (see --overlap).
    """

    def __init__(self, envs, info: EnvInfo, device: torch.device, num_envs: int, batch_size: int,
                 generator: torch.Generator | None = None, timer: PhaseTimer | None = None,
                 spill_rows: int = SPILL_ROWS, norms: Normalizers | None = None):
        self.envs = envs
        self.info = info
        self.device = device
        self.num_envs = num_envs
        self.batch_size = batch_size
        self.generator = generator
        self.spill_rows = spill_rows
        self.timer = timer or PhaseTimer(device)
        self.stage = Stager(device)
        self.norms = norms or Normalizers(None, None)
        self.stats = EpisodeStats(num_envs, info.is_atari)
        self.cursor = np.zeros(num_envs, dtype=np.int64)  # row of the env's next observation
        self.pending = np.zeros(num_envs, dtype=bool)  # an action was sent; its result is due at row cursor - 1
        self.held = np.zeros(num_envs, dtype=bool)  # observation stored at row cursor, no action sent
        self.in_flight = 0
        self.last: SpillRollout | None = None

    def state(self) -> dict:
        """No action log: the order in which async envs step cannot be replayed (a resume restarts them)."""
        return {"actions": None}

    def allocate(self, num_steps: int, num_buffers: int = 1) -> list[SpillRollout]:
        """Buffers of T + S rows, S = min(T, spill_rows); needs T >= 2 (the spill holds row T and more)."""
        if num_steps < 2:
            raise ValueError(f"async collection needs num_steps >= 2, got {num_steps}")
        spill = min(num_steps, self.spill_rows)
        return [SpillRollout.allocate_spill(self.info, num_steps, self.num_envs, spill, self.device)
                for _ in range(num_buffers)]

    def collect(self, policy: nn.Module | Actor, buf: SpillRollout) -> None:
        actor = _as_actor(policy, self.generator)
        T, N = buf.num_steps, self.num_envs
        # (R * N, ...) views of the storage: row r of env n is element r * N + n
        flat = {name: t.flatten(0, 1) for name, t in buf.full.items()}
        if self.last is None:
            self.envs.async_reset()
            self.in_flight = N
        else:
            spill = buf.full["obs"].shape[0] - T
            for name, t in buf.full.items():  # carry: the rows past T of the last rollout start this one
                t[:spill].copy_(self.last.full[name][T:])
            self.cursor -= T
            if self.held.any():
                ids = np.flatnonzero(self.held)
                rows = self.stage("held_rows", self.cursor[ids] * N + ids)
                self._act(actor, flat, ids, rows, flat["obs"][rows])
                self.held[ids] = False
        while self.cursor.min() <= T:
            if self.in_flight < self.batch_size:
                raise RuntimeError(
                    f"async collection stalled: {self.held.sum()} envs filled their {buf.full['obs'].shape[0] - T} "
                    f"spill rows while others lag, leaving {self.in_flight} in flight (< batch size "
                    f"{self.batch_size}); raise --num-steps or lower --env-batch-size")
            with self.timer.phase("env_wait", host=True):
                obs, reward, terminated, truncated, info = self.envs.recv()
            self.in_flight -= len(obs)
            self._on_recv(actor, flat, T, obs, reward, terminated, truncated, info)
        self.last = buf

    def _on_recv(self, actor: Actor, flat: dict[str, torch.Tensor], T: int, obs, reward, terminated, truncated,
                 info) -> None:
        N, R = self.num_envs, flat["obs"].shape[0] // self.num_envs
        ids = info["env_id"].astype(np.int64)
        cursor = self.cursor[ids]
        self.stats.update(reward, terminated, truncated, info, env_ids=ids)
        with self.timer.phase("h2d"):
            # 1. results of the previous transition (none for the first recv after async_reset)
            done = np.flatnonzero(self.pending[ids])
            if len(done):
                sel = slice(None) if len(done) == len(ids) else done
                prev = self.stage("prev_rows", (cursor[sel] - 1) * N + ids[sel])
                rew = self.stage("reward", reward[sel]).float()
                term = self.stage("terminated", terminated[sel])
                if self.norms.reward is not None:
                    rew = self.norms.reward(rew, term, flat["valid"][prev], env_ids=self.stage("prev_ids", ids[sel]))
                flat["rewards"].index_copy_(0, prev, rew)
                flat["terminated"].index_copy_(0, prev, term)
                flat["truncated"].index_copy_(0, prev, self.stage("truncated", truncated[sel]))
            # 2. the new observation, masked when it follows an episode's end (EnvPool's reset step)
            rows = self.stage("rows", cursor * N + ids)
            obs_d = observe(self.norms, self.stage("obs", obs))
            as_words(flat["obs"]).index_copy_(0, rows, as_words(obs_d))
            flat["valid"].index_copy_(0, rows, self.stage("valid", ~(terminated | truncated)))
        self.pending[ids] = False
        # 3. act, except for envs whose new row is the last one of the spill: they wait for the next rollout
        room = cursor < R - 1
        if room.all():
            self._act(actor, flat, ids, rows, obs_d)
        else:
            act = np.flatnonzero(room)
            self.held[ids[~room]] = True
            if len(act):
                sel = self.stage("act_sel", act)
                self._act(actor, flat, ids[act], rows[sel], obs_d[sel])

    def _act(self, actor: Actor, flat: dict[str, torch.Tensor], ids: np.ndarray, rows: torch.Tensor,
             obs: torch.Tensor) -> None:
        with self.timer.phase("inference"):
            action, logprob, value, dist = actor(obs)
            flat["actions"].index_copy_(0, rows, action)
            flat["logprobs"].index_copy_(0, rows, logprob)
            flat["values"].index_copy_(0, rows, value)
            flat["dist"].index_copy_(0, rows, dist)
            # Host-device sync, deliberate: EnvPool needs the actions on the host.
            action = action.cpu().numpy()
        self.cursor[ids] += 1
        self.pending[ids] = True
        with self.timer.phase("env_wait", host=True):
            self.envs.send(action, ids.astype(np.int32))
        self.in_flight += len(ids)


class BackgroundCollection:
    """Runs ``collector.collect(actor, buf)`` in a thread while the caller updates (``--overlap``).

    The actor acts with a frozen copy of the weights (theta'), so the update may change the
    learner's weights meanwhile. A thread is enough: EnvPool waits and torch ops release the GIL.
    On CUDA the thread works on its own high-priority stream so acting kernels are not queued behind
    the update's; ``start`` orders that stream after the work already queued on the caller's stream
    (the weight copy, the last reads of buf) and ``wait`` orders the caller's stream after the
    collection.
    """

    def __init__(self, collector: Collector | AsyncCollector, device: torch.device):
        if device.type == "cuda" and device.index is None:  # the thread's set_device needs the index
            raise ValueError(f"BackgroundCollection needs a CUDA device with its index, got {device}")
        self.collector = collector
        self.device = device
        # High priority: acting kernels go ahead of the update's queued ones, since EnvPool waits
        # for each step's actions (lower numbers are higher priorities; -1 is the highest).
        self.stream = torch.cuda.Stream(device, priority=-1) if device.type == "cuda" else None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self, actor: Actor, buf: Rollout) -> None:
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))

        def run() -> None:
            try:
                if self.stream is not None:
                    # A new thread's current device is cuda:0; without this, leaving the stream
                    # context below would make a context on GPU 0 for every torchrun rank.
                    torch.cuda.set_device(self.device)
                with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
                    self.collector.collect(actor, buf)
            except BaseException as e:  # re-raised in wait(), on the caller's thread
                self.error = e

        self.thread = threading.Thread(target=run, name="fastppo-collect", daemon=True)
        self.thread.start()

    def wait(self) -> None:
        """Join the collection; re-raise its error. Its buffer is then safe to read on this thread's stream."""
        if self.thread is None:
            return
        self.thread.join()
        self.thread = None
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        if self.error is not None:
            error, self.error = self.error, None
            raise error


class InlineCollection:
    """Collects each rollout when asked, acting with the learner itself (sync or async envs).

    The actor evaluates the learner's own module, so every rollout is collected by the weights of the
    latest update (CleanRL's on-policy loop); ``refresh`` only agrees on the normalisation statistics
    across ranks.
    """

    def __init__(self, collector: Collector | AsyncCollector, actor: Actor, num_steps: int):
        self.collector = collector
        self.actor = actor
        (self.buf,) = collector.allocate(num_steps)

    def next(self) -> Rollout:
        self.collector.collect(self.actor, self.buf)
        self.buf.games = self.collector.stats.pop()
        return self.buf

    def refresh(self, policy: nn.Module) -> None:
        self.collector.norms.sync()  # the ranks agree on the normalisation statistics

    def state(self) -> dict:
        return self.collector.state()

    def close(self) -> None:
        self.collector.envs.close()


class OverlapCollection:
    """``--overlap``: rollout k+1 is collected in the background while the learner updates on rollout k.

    The actor evaluates ``behaviour``, a frozen copy of the learner's weights (theta'). ``next()``
    returns rollout k (the first one is collected on the spot: there is nothing to overlap it with)
    and starts rollout k+1 with theta' = the weights before the update on rollout k; ``refresh``
    waits for that collection, then copies the updated weights into theta' in place, so rollout k+2
    acts with them. The behaviour log-probs stored with each step are theta''s, so PPO's importance
    ratio stays correct. Two buffers alternate; ``rollouts`` is how many ``next()`` will be asked
    for, so no collection is started after the last one. The actor draws its sampling noise from its
    own generator (the update's shuffles run at the same time on the caller's thread).
    """

    def __init__(self, collector: Collector | AsyncCollector, actor: Actor, behaviour: nn.Module, num_steps: int,
                 rollouts: int, device: torch.device):
        self.collector = collector
        self.actor = actor
        self.behaviour = behaviour
        self.bufs = collector.allocate(num_steps, 2)
        self.remaining = rollouts
        self.background = BackgroundCollection(collector, device)
        self.pending: Rollout | None = None  # the buffer being filled in the background

    def next(self) -> Rollout:
        if self.pending is None:
            buf = self.bufs[0]
            self.collector.collect(self.actor, buf)
        else:
            self.background.wait()  # normally already joined by refresh()
            buf = self.pending
        buf.games = self.collector.stats.pop()  # the games of rollout k, before rollout k+1 adds its own
        self.remaining -= 1
        self.pending = None
        if self.remaining > 0:
            self.pending = self.bufs[1] if buf is self.bufs[0] else self.bufs[0]
            self.background.start(self.actor, self.pending)
        return buf

    def refresh(self, policy: nn.Module) -> None:
        self.background.wait()
        copy_weights(self.behaviour, policy)  # theta' <- theta, in place (a CUDA graph keeps its addresses)
        self.collector.norms.sync()  # the ranks agree on the normalisation statistics (no collection runs now)

    def state(self) -> dict:
        return {**self.collector.state(), "acting_rng": self.actor.generator.get_state()}

    def close(self) -> None:
        if self.background.thread is not None:
            self.background.thread.join()  # an error in the update: let the collection finish first
        self.collector.envs.close()


Collection = InlineCollection | OverlapCollection


def make_collection(cfg, envs, info: EnvInfo, device: torch.device, policy: nn.Module, forward: nn.Module,
                    timer: PhaseTimer, rollouts: int, seed: int, norms: Normalizers | None = None) -> Collection:
    """The collection cfg asks for: sync or async envs (--async-envs), inline or overlapped (--overlap).

    policy is the learner and forward its bf16/compiled wrapper; with --overlap the actor evaluates a
    frozen copy instead and draws its noise from its own generator seeded with `seed`. rollouts: how
    many ``next()`` calls the run will make. norms: the run's observation and reward normalisers.
    """
    if cfg.async_envs:
        collector = AsyncCollector(envs, info, device, cfg.num_envs, cfg.recv_batch_size, timer=timer, norms=norms)
    else:
        collector = Collector(envs, info, device, timer=timer, norms=norms, record=not cfg.overlap)
    graphs = dict(cudagraphs=cfg.cudagraphs, graph_batch_sizes=(cfg.recv_batch_size,))
    if not cfg.overlap:
        return InlineCollection(collector, Actor(policy, forward, **graphs), cfg.num_steps)
    behaviour = copy.deepcopy(policy).requires_grad_(False)  # theta', refreshed in place after each update
    generator = torch.Generator(device).manual_seed(seed)
    actor = Actor(behaviour, learner_forward(behaviour, cfg.bf16, cfg.compile), generator=generator, **graphs)
    return OverlapCollection(collector, actor, behaviour, cfg.num_steps, rollouts, device)


def storage_bytes(info: EnvInfo, num_steps: int, num_envs: int, buffers: int = 1, spill: bool = False) -> int:
    """Bytes of the rollout storage the collectors allocate: `buffers` buffers, with the async spill rows.

    The buffers are allocated on the meta device, which sizes them exactly and allocates nothing.
    """
    meta = torch.device("meta")
    if spill:
        buf = SpillRollout.allocate_spill(info, num_steps, num_envs, min(num_steps, SPILL_ROWS), meta)
    else:
        buf = Rollout.allocate(info, num_steps, num_envs, meta)
    return buffers * buf.nbytes()
