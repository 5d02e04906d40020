"""Rollout storage on the training device and the collection loop that fills it.

Storage is allocated once, time-major: a rollout of T steps of N envs is one byte tensor
``store`` (T + 1, N, W), one row of W bytes per env and step, and every field (observations,
actions, log-probs, ...) is a view of it (:class:`RowLayout` says where each lies). Observations keep
the env's dtype (uint8 for Atari, so 4096 envs x 128 steps of 4x84x84 frames is 14.8 GB rather than
59 GB in float32).

Row t of env n holds, in its first bytes (the *arrival* part, written when the env's step result
arrives), the observation seen at t (normalised with ``--norm-obs``), whether it is a real one
(``valid``: False on EnvPool's autoreset step) and the result of the transition before it (reward
scaled with ``--norm-reward``, terminated, truncated); in its last bytes (the *acting* part, written
when the action is chosen), the action and its log-prob, value and action-distribution parameters
under the behaviour policy. So ``rewards[t]`` is row t + 1's, and row T (the bootstrap row) holds
the observation and value after the last transition. Each part of a row is written by one copy:
per env step the collectors make one host-to-device transfer (every host array of the step packed
into one pinned buffer, :class:`Stager`), one copy of the arrival rows into the storage, one forward
pass and one copy of the acting rows (:func:`fastppo.policy.pack_acting`); the only host sync is the
copy of the chosen actions to the host, which EnvPool needs.

Three collectors fill a rollout:

* :class:`Collector` steps a synchronous pool: every env, every step (CleanRL, the default); EnvPool's,
  or a Gymnasium vector env (``fastppo.gymenv.GymAdapter``).
* :class:`DeviceCollector` steps envs that live on the training device (``fastppo.devenv``): the same
  rows, written with torch ops only, no host sync per step.
* :class:`AsyncCollector` uses EnvPool's ``send``/``recv``: each ``recv`` returns the
  ``batch_size`` envs that finished first, in any order; each column of a rollout is a segment of T
  consecutive steps of one env, and the rollout is the first N segments completed (see the class).

The trainer sees none of them: it asks a :class:`Collection` for the next rollout (``next()``), hands it
the learner's weights after each update (``refresh(policy)``), takes its part of a checkpoint
(``state()``) and closes it (``close()``). :class:`InlineCollection` collects each rollout when asked,
acting with the learner itself; :class:`OverlapCollection` (``--overlap``) collects rollout k+1 in a
background thread (on CUDA, its own stream; :class:`BackgroundCollection`) with a frozen copy of the
weights while the trainer updates on rollout k. :func:`make_collection` picks one from the config.
"""

from __future__ import annotations

import contextlib
import copy
import math
import threading
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fastppo.envs import EnvInfo, EpisodeStats
from fastppo.normalize import Normalizers
from fastppo.perf import PhaseTimer, copy_weights, learner_forward
from fastppo.policy import Actor


def action_log_dtype(info: EnvInfo) -> np.dtype:
    """The action log's dtype: one byte per discrete action when it fits, float32 for continuous ones."""
    if info.continuous:
        return np.dtype(np.float32)
    return np.dtype(np.uint8 if info.num_actions <= 256 else np.int32)


def _pad8(n: int) -> int:
    return -(-n // 8) * 8


def torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, dtype=dtype)).dtype


@dataclass(frozen=True)
class RowLayout:
    """Where each field of a rollout row lies in its W bytes (offsets in bytes, both parts 8-aligned):

    ``[obs | reward | terminated truncated valid prev_valid | pad]`` the arrival part, then
    ``[action | logprob | value | dist | pad]`` the acting part. ``reward``, ``terminated`` and
    ``truncated`` are the result of the transition before the row's observation; ``prev_valid``
    whether that transition was a real one (it drives the reward scaler's running return). Floats are
    ``float_dtype`` (float32; float64 for the tests' reference rollouts); a discrete action is int64.
    """

    obs_shape: tuple[int, ...]
    obs_dtype: torch.dtype
    action_shape: tuple[int, ...]
    dist_size: int
    float_dtype: torch.dtype = torch.float32

    @classmethod
    def of(cls, info: EnvInfo, float_dtype: torch.dtype = torch.float32) -> RowLayout:
        return cls(tuple(info.obs_shape), torch_dtype(info.obs_dtype), info.action_shape, info.dist_size, float_dtype)

    @property
    def float_size(self) -> int:
        return self.float_dtype.itemsize

    @property
    def obs_bytes(self) -> int:
        return math.prod(self.obs_shape) * self.obs_dtype.itemsize

    @property
    def reward_off(self) -> int:
        return _pad8(self.obs_bytes)

    @property
    def flags_off(self) -> int:
        return self.reward_off + self.float_size

    @property
    def arrival_bytes(self) -> int:
        return _pad8(self.flags_off + 4)

    @property
    def action_bytes(self) -> int:
        return 8 if not self.action_shape else math.prod(self.action_shape) * self.float_size

    @property
    def acting_bytes(self) -> int:
        """Bytes of :func:`fastppo.policy.pack_acting`'s row: action, log-prob, value, dist."""
        return self.action_bytes + (2 + self.dist_size) * self.float_size

    @property
    def width(self) -> int:
        return self.arrival_bytes + _pad8(self.acting_bytes)

    def views(self, store: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every field of store (R, K, W) uint8 as a (R, K, ...) view; the arrival fields only when the rows
        hold only the arrival part (W = arrival_bytes: the collectors' staged steps)."""
        R, K = store.shape[:2]
        fs, a = self.float_size, self.arrival_bytes

        def field(off: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
            v = store[..., off : off + nbytes].view(dtype)  # (R, K, n), rows W bytes apart
            return v.view(R, K, *shape) if shape else v[..., 0]

        out = {"obs": field(0, self.obs_bytes, self.obs_dtype, self.obs_shape),
               "reward": field(self.reward_off, fs, self.float_dtype, ())}
        for i, name in enumerate(("terminated", "truncated", "valid", "prev_valid")):
            out[name] = store[..., self.flags_off + i].view(torch.bool)
        if store.shape[-1] == self.width:
            out.update(
                actions=field(a, self.action_bytes, self.float_dtype if self.action_shape else torch.int64,
                              self.action_shape),
                logprobs=field(a + self.action_bytes, fs, self.float_dtype, ()),
                values=field(a + self.action_bytes + fs, fs, self.float_dtype, ()),
                dist=field(a + self.action_bytes + 2 * fs, self.dist_size * fs, self.float_dtype, (self.dist_size,)))
        return out

    def host_views(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The arrival fields of rows (..., W) uint8 on the host (numpy views): obs, reward, flags (..., 4)."""
        obs_np, flt = (torch.empty(0, dtype=d).numpy().dtype for d in (self.obs_dtype, self.float_dtype))
        lead = rows.shape[:-1]
        return {"obs": rows[..., : self.obs_bytes].view(obs_np).reshape(*lead, *self.obs_shape),
                "reward": rows[..., self.reward_off : self.reward_off + self.float_size].view(flt)[..., 0],
                "flags": rows[..., self.flags_off : self.flags_off + 4]}

    def words(self, store: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """store (R, K, W) as (R * K, ...) rows for the collectors' index copies: whole rows and the arrival
        part in int64 words, the acting part in float32 words (:func:`fastppo.policy.pack_acting`'s)."""
        rows = store.view(-1, self.width)
        a = self.arrival_bytes
        return (rows.view(torch.int64), rows[:, :a].view(torch.int64),
                rows[:, a : a + self.acting_bytes].view(torch.float32))


@dataclass
class Rollout:
    """T steps of N envs: views of ``store`` (T + 1, N, W) (see :class:`RowLayout`) plus GAE's outputs."""

    store: torch.Tensor  # (T + 1, N, W) uint8
    layout: RowLayout
    obs: torch.Tensor  # (T, N, *obs_shape), the env's dtype (uint8 frames, int64 state indices) or float32
    actions: torch.Tensor  # (T, N) int64, or (T, N, D) float32 unclipped Gaussian samples
    logprobs: torch.Tensor  # (T, N) log pi_old(a|s)
    dist: torch.Tensor  # (T, N, P) behaviour distribution: logits (A) or [mean, log-std] (2 D), for the exact KL
    values: torch.Tensor  # (T + 1, N) V_old(s); row T bootstraps
    rewards: torch.Tensor  # (T, N) training reward (clipped for Atari)
    terminated: torch.Tensor  # (T, N) bool
    truncated: torch.Tensor  # (T, N) bool
    valid: torch.Tensor  # (T, N) bool; False on EnvPool's autoreset step
    next_obs: torch.Tensor  # (N, *obs_shape), the observation after row T - 1 (for values[T])
    advantages: torch.Tensor  # (T, N), filled by advantage.compute_advantages
    returns: torch.Tensor  # (T, N)
    # host side: (returns, lengths) of the games that ended while this rollout was collected
    games: tuple[list[float], list[int]] = ((), ())
    # --decoupled: pi_prox(a|s) / pi_behaviour(a|s) (T, N), set by trainer.proximal_rollout, which also puts
    # pi_prox's log-probs and distributions in logprobs and dist; None otherwise
    weights: torch.Tensor | None = None

    @classmethod
    def allocate(cls, info: EnvInfo, num_steps: int, num_envs: int, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> Rollout:
        """Zeroed storage for T steps of N envs; `dtype` is the float fields' (float64 for tests)."""
        layout = RowLayout.of(info, dtype)
        store = torch.zeros((num_steps + 1, num_envs, layout.width), dtype=torch.uint8, device=device)
        return cls.of(store, layout)

    @classmethod
    def of(cls, store: torch.Tensor, layout: RowLayout) -> Rollout:
        T = store.shape[0] - 1
        v = layout.views(store)
        return cls(store, layout, obs=v["obs"][:T], actions=v["actions"][:T], logprobs=v["logprobs"][:T],
                   dist=v["dist"][:T], values=v["values"], rewards=v["reward"][1:], terminated=v["terminated"][1:],
                   truncated=v["truncated"][1:], valid=v["valid"][:T], next_obs=v["obs"][T],
                   advantages=torch.zeros((T, store.shape[1]), dtype=layout.float_dtype, device=store.device),
                   returns=torch.zeros((T, store.shape[1]), dtype=layout.float_dtype, device=store.device))

    @property
    def num_steps(self) -> int:
        return self.obs.shape[0]

    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in (self.store, self.advantages, self.returns))


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
        **({} if buf.weights is None else {"weights": buf.weights.reshape(-1)}),
    }


def as_words(t: torch.Tensor) -> torch.Tensor | None:
    """t (B, ...) whose rows are each contiguous (rows may lie apart, as in a rollout's storage), as (B, W)
    of the widest integer type that tiles a row: the same memory. None when rows are not contiguous.

    Index copies of whole rows then move up to 8 bytes per element instead of 1: on CPU, scattering
    128 uint8 Pong observations (28 KB each) into the rollout took 3.3 ms as uint8 and 0.5 ms as
    int64 (one thread, bench/host_overhead.py measures the collectors).
    """
    try:
        rows = t.view(t.shape[0], -1)
    except RuntimeError:  # the dims after the first do not merge: rows are not contiguous
        return None
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        return None
    size = t.element_size()
    row_bytes, stride_bytes, offset_bytes = rows.shape[1] * size, rows.stride(0) * size, t.storage_offset() * size
    for dtype in (torch.int64, torch.int32, torch.int16):
        wide = dtype.itemsize
        if wide > size and row_bytes % wide == 0 and stride_bytes % wide == 0 and offset_bytes % wide == 0:
            return rows.view(torch.uint8).view(dtype)
    return rows


def gather_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t[idx] for t (B, ...), copied as words when t's rows are contiguous (see as_words).

    Gathering a minibatch of 256 uint8 Pong observations out of 1024 took 6.6 ms as uint8 and
    1.3 ms as int64 on CPU (one thread).
    """
    words = as_words(t)
    if words is None or words.dtype == t.dtype:
        return t[idx]
    return words[idx].view(t.dtype).view(idx.shape[0], *t.shape[1:])


def _as_actor(policy: nn.Module | Actor, generator: torch.Generator | None) -> Actor:
    return policy if isinstance(policy, Actor) else Actor(policy, generator=generator)


ARRIVAL_FIELDS = ("obs", "reward", "terminated", "prev_valid")  # what normalize_arrival reads and writes
DEVICE_VIEWS = ("arrival", *ARRIVAL_FIELDS, "index")  # a Stager block's device views, cut to b envs


def arrival_fields(layout: RowLayout, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The fields normalize_arrival reads and writes, of rows (1, b, >= arrival_bytes) uint8: (b, ...) views."""
    views = layout.views(rows[..., : layout.arrival_bytes])
    return {name: views[name][0] for name in ARRIVAL_FIELDS}


def pack_arrival(host: dict[str, np.ndarray], obs: np.ndarray, reward: np.ndarray, terminated: np.ndarray,
                 truncated: np.ndarray, valid: np.ndarray, prev_valid: np.ndarray) -> None:
    """Write one step of b envs into the first b of the host arrival rows `host` (RowLayout.host_views): the
    observations convert to the storage's dtype on the way."""
    b = len(reward)
    dst = host["obs"][:b]
    if obs.dtype == dst.dtype and obs.flags.writeable and obs.flags.c_contiguous:  # what torch can wrap as is
        # torch's copy: 1.6 ms against numpy's 2.4 ms for 1,024 Pong frames into their rows (one thread)
        torch.from_numpy(dst).copy_(torch.from_numpy(obs))
    else:
        np.copyto(dst, obs, casting="same_kind")
    host["reward"][:b] = reward
    flags = host["flags"]
    flags[:b, 0], flags[:b, 1], flags[:b, 2], flags[:b, 3] = terminated, truncated, valid, prev_valid


class Stager:
    """The host arrays of one env step -> one transfer to the training device.

    A block holds ``batch`` arrival rows (:class:`RowLayout`'s first part: observation, reward,
    flags), then ``indices`` int64 vectors of ``batch`` entries (where the rows go, env ids, ...). The
    host packs a step into a block with a few numpy copies (:func:`pack_arrival`), and on CUDA the whole
    block goes to the device in one non-blocking copy from pinned memory; on CPU the block is used
    where it is. Blocks alternate in a ring of two, so the host never waits on a copy: a block is
    refilled two steps after its copy was queued, and every step in between synchronised on its
    actions, which come after that copy on the same stream (the event check below is a guard that then
    costs nothing).
    """

    def __init__(self, layout: RowLayout, batch: int, device: torch.device, indices: int = 0):
        self.layout, self.batch, self.device = layout, batch, device
        self.cuda = device.type == "cuda"
        self.blocks = [self._block(indices) for _ in range(2 if self.cuda else 1)]
        self.next = 0

    def _block(self, indices: int) -> dict:
        L, B = self.layout, self.batch
        nbytes = B * L.arrival_bytes + indices * B * 8
        host = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=self.cuda)
        dev = torch.zeros(nbytes, dtype=torch.uint8, device=self.device) if self.cuda else host
        h = host.numpy()
        rows = dev[: B * L.arrival_bytes].view(1, B, L.arrival_bytes)
        block = {"host": host, "dev": dev, "event": torch.cuda.Event() if self.cuda else None,
                 "np": L.host_views(h[: B * L.arrival_bytes].reshape(B, L.arrival_bytes)),
                 "np_index": h[B * L.arrival_bytes :].view(np.int64).reshape(indices, B),
                 "arrival": rows[0].view(torch.int64),
                 "index": dev[B * L.arrival_bytes :].view(torch.int64).view(indices, B)}
        block.update(arrival_fields(L, rows))
        return block

    def __call__(self, obs: np.ndarray, reward: np.ndarray, terminated: np.ndarray, truncated: np.ndarray,
                 valid: np.ndarray, prev_valid: np.ndarray, indices: tuple[np.ndarray, ...] = ()) -> dict:
        """Pack one step of b <= batch envs; returns the block: device views ``arrival`` (b, words), ``obs``,
        ``reward``, ``terminated``, ``prev_valid`` (b, ...) and ``index`` (indices, batch) (vector i's
        first len(indices[i]) entries are set)."""
        block = self.blocks[self.next]
        self.next = (self.next + 1) % len(self.blocks)
        b = len(reward)
        if block["event"] is not None:
            block["event"].synchronize()  # its last copy has finished (see the class: it always has by now)
        pack_arrival(block["np"], obs, reward, terminated, truncated, valid, prev_valid)
        for i, values in enumerate(indices):
            block["np_index"][i, : len(values)] = values
        if self.cuda:
            block["dev"].copy_(block["host"], non_blocking=True)
            block["event"].record()
        if b == self.batch:
            return block
        return {k: (v[:, :b] if k == "index" else v[:b]) if k in DEVICE_VIEWS else v for k, v in block.items()}


def normalize_arrival(norms: Normalizers, block: dict, update: bool = True,
                      env_ids: torch.Tensor | None = None) -> None:
    """--norm-obs / --norm-reward on a staged step, in place: its observations normalised (after updating the
    statistics, unless `update` is False), its rewards scaled with the running return of the envs
    env_ids (all envs in order when None)."""
    if norms.obs is not None:
        obs = block["obs"]
        obs.copy_(norms.obs(obs) if update else norms.obs.normalize(obs))
    if norms.reward is not None and update:
        reward = block["reward"]
        reward.copy_(norms.reward(reward, block["terminated"], block["prev_valid"], env_ids=env_ids))


class Collector:
    """Steps a synchronous EnvPool pool and writes each step into a Rollout (CleanRL's loop).

    Row t of env n is step t of env n. Carries what must survive from one rollout to the next: the
    last row's arrival part (the observation after the rollout and whether it is a real one), which
    becomes row 0 of the next rollout.

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
        self._setup(envs, info, device, generator, timer, norms, record)
        obs, _ = envs.reset()
        self.num_envs = N = len(obs)
        self.stage = Stager(self.layout, N, device)
        self.stats = EpisodeStats(N, info.is_atari)
        self.valid = np.ones(N, dtype=bool)  # whether each env's current observation is a real one
        # The reset's observation is normalised by the first collect(), once a resume has loaded the
        # statistics (a resume that replays nothing would otherwise act on it normalised by fresh ones).
        self.carry = torch.zeros((N, self.layout.arrival_bytes // 8), dtype=torch.int64, device=device)
        self._carry(obs, np.zeros(N, dtype=bool), update=None)
        self.action_dtype = action_log_dtype(info)
        self.action_log: list[np.ndarray] = []

    def _setup(self, envs, info: EnvInfo, device: torch.device, generator: torch.Generator | None,
               timer: PhaseTimer | None, norms: Normalizers | None, record: bool) -> None:
        """What every collector of this family holds (DeviceCollector's too)."""
        self.envs = envs
        self.info = info
        self.record = record
        self.device = device
        self.generator = generator
        self.timer = timer or PhaseTimer(device)
        self.norms = norms or Normalizers(None, None)
        self.layout = RowLayout.of(info)

    def _carry(self, obs: np.ndarray, done: np.ndarray, update: bool | None) -> None:
        """Row 0 of the next rollout: obs, valid unless done; normalised (None: later, by collect)."""
        self.valid = ~done
        block = self.stage(obs, np.zeros(self.num_envs, np.float32), done, np.zeros_like(done), self.valid,
                           np.zeros_like(done))
        if update is not None:
            normalize_arrival(Normalizers(self.norms.obs, None), block, update=update)
        self.carry.copy_(block["arrival"])
        self.carry_raw = update is None

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
            self._carry(obs, done, update=False)
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
        timer, T = self.timer, buf.num_steps
        _, arrival, acting = self.layout.words(buf.store)
        arrival, acting = arrival.view(T + 1, self.num_envs, -1), acting.view(T + 1, self.num_envs, -1)
        fields = self.layout.views(buf.store)  # (T + 1, N, ...)
        obs_rows = fields["obs"]
        # On CPU each step is packed straight into its storage row: the observations are copied once.
        host = None if self.stage.cuda else self.layout.host_views(buf.store.numpy())
        normalized = self.norms.obs is not None or self.norms.reward is not None
        arrival[0].copy_(self.carry)
        if self.carry_raw:
            if self.norms.obs is not None:
                obs_rows[0].copy_(self.norms.obs(obs_rows[0]))
            self.carry_raw = False
        sent = np.empty((T, self.num_envs, *self.info.action_shape), dtype=self.action_dtype)
        if self.record:
            self.action_log.append(sent)
        for t in range(T):
            with timer.phase("inference"):
                row, action = actor.row(obs_rows[t])
                acting[t].copy_(row)
                # Host-device sync, deliberate: EnvPool needs the actions on the host.
                host_action = action.cpu().numpy()
            sent[t] = host_action
            with timer.phase("env_wait", host=True):
                obs, reward, terminated, truncated, info = self.envs.step(host_action)
            self.stats.update(reward, terminated, truncated, info)
            with timer.phase("h2d"):
                prev_valid, self.valid = self.valid, ~(terminated | truncated)
                if host is not None:
                    pack_arrival({k: v[t + 1] for k, v in host.items()}, obs, reward, terminated, truncated,
                                 self.valid, prev_valid)
                    if normalized:
                        normalize_arrival(self.norms, {k: fields[k][t + 1] for k in ARRIVAL_FIELDS})
                else:
                    block = self.stage(obs, reward, terminated, truncated, self.valid, prev_valid)
                    normalize_arrival(self.norms, block)
                    arrival[t + 1].copy_(block["arrival"])
        with timer.phase("inference"):
            buf.values[T] = actor.value(buf.next_obs)
        self.carry.copy_(arrival[T])


class DeviceGames:
    """Full-game scores of envs on the device, by :class:`fastppo.envs.EpisodeStats`' rules (a game's summed
    rewards, reported when it terminates or is truncated, its length counted as EnvPool's elapsed steps), kept
    on the device: each rollout records which envs ended a game at each step and their running scores, and
    :meth:`pop` moves the finished games to the host once per rollout instead of once per step."""

    def __init__(self, num_envs: int, device: torch.device):
        self.returns = torch.zeros(num_envs, dtype=torch.float64, device=device)
        self.lengths = torch.zeros(num_envs, dtype=torch.int64, device=device)
        self.done = torch.zeros(num_envs, dtype=torch.bool, device=device)  # the last step ended a game
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # per rollout: ended (T, N), scores (2, T, N)

    def record(self, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffers for a rollout's games, filled by :meth:`update` (row t of step t) and read by :meth:`pop`."""
        n, device = self.returns.shape[0], self.returns.device
        out = (torch.zeros((num_steps, n), dtype=torch.bool, device=device),
               torch.zeros((2, num_steps, n), dtype=torch.float64, device=device))  # [return; length]
        self.pending.append(out)
        return out

    def update(self, reward: torch.Tensor, terminated: torch.Tensor, truncated: torch.Tensor,
               out: tuple[torch.Tensor, torch.Tensor] | None = None, t: int = 0) -> None:
        """Account one step of every env (into row t of `out` when given)."""
        self.lengths = torch.where(self.done, 0, self.lengths + 1)  # 0 on the reset step, as elapsed_step
        self.returns += reward
        self.done = terminated | truncated
        if out is not None:
            ended, scores = out
            ended[t] = self.done
            scores[0, t] = self.returns
            scores[1, t] = self.lengths
        self.returns.masked_fill_(self.done, 0.0)

    def pop(self) -> tuple[list[float], list[int]]:
        """The (returns, lengths) of the games that ended since the last pop, in the order they ended.

        Host-device sync, deliberate: once per rollout, when the trainer takes its games.
        """
        pending, self.pending = self.pending, []
        returns: list[float] = []
        lengths: list[int] = []
        for ended, scores in pending:
            r, n = scores[:, ended].cpu().tolist()  # row-major: by step, then by env, as EpisodeStats reports
            returns.extend(r)
            lengths.extend(int(x) for x in n)
        return returns, lengths


class DeviceCollector(Collector):
    """Steps envs that live on the training device (``fastppo.devenv.DeviceEnvs``) into a Rollout, with torch
    ops only.

    The rollout rows, the carry row, the action log, replay and the checkpoint state are :class:`Collector`'s;
    what differs is that a step never reaches the host: the actions go to the envs as the actor left them, and
    the envs' tensors are copied into row t + 1's arrival fields (views of the storage, ``RowLayout.views``).
    There is no host sync per step; the host transfers are once per rollout: the action log (for a resume,
    when ``record``) and the finished games' scores (:class:`DeviceGames`, when the trainer pops them).
    With ``--overlap`` it collects on the trainer's CUDA stream (see :class:`BackgroundCollection`).
    """

    on_device = True  # the envs' tensors are on the training device (BackgroundCollection's stream choice)

    def __init__(self, envs, info: EnvInfo, device: torch.device, generator: torch.Generator | None = None,
                 timer: PhaseTimer | None = None, norms: Normalizers | None = None, record: bool = True):
        self._setup(envs, info, device, generator, timer, norms, record)
        obs = envs.reset()
        self.num_envs = N = obs.shape[0]
        self.stats = DeviceGames(N, device)
        # Row 0 of the next rollout (its arrival part), as in Collector; its fields as (N, ...) views.
        self.carry_rows = torch.zeros((1, N, self.layout.arrival_bytes), dtype=torch.uint8, device=device)
        self.carry_fields = {k: v[0] for k, v in self.layout.views(self.carry_rows).items()}
        self._carry(obs, torch.zeros(N, dtype=torch.bool, device=device), update=None)
        self.action_dtype = action_log_dtype(info)
        self.action_log: list[np.ndarray] = []

    def _carry(self, obs: torch.Tensor, done: torch.Tensor, update: bool | None) -> None:
        """Row 0 of the next rollout: obs, valid unless done; normalised (None: later, by collect)."""
        self.valid = ~done
        f = self.carry_fields
        f["obs"].copy_(obs)
        f["reward"].zero_()
        f["terminated"].copy_(done)
        f["truncated"].zero_()
        f["valid"].copy_(self.valid)
        f["prev_valid"].zero_()
        if update is not None:
            normalize_arrival(Normalizers(self.norms.obs, None), f, update=update)
        self.carry_raw = update is None

    def replay(self, actions: np.ndarray) -> None:
        """Step the freshly reset envs with actions (S, N[, D]), as collect() did (see Collector.replay)."""
        log = torch.from_numpy(np.ascontiguousarray(actions)).to(self.device)
        obs = done = None
        for row in log:
            obs, reward, terminated, truncated = self.envs.step(row.float() if self.info.continuous else row.long())
            self.stats.update(reward, terminated, truncated)
            done = terminated | truncated
        if obs is not None:
            self._carry(obs, done, update=False)
        self.action_log = [np.ascontiguousarray(actions, dtype=self.action_dtype)]

    def collect(self, policy: nn.Module | Actor, buf: Rollout) -> None:
        """Fill buf with num_steps steps of every env, acting with policy (a module or an Actor)."""
        actor = _as_actor(policy, self.generator)
        timer, T, a = self.timer, buf.num_steps, self.layout.arrival_bytes
        acting = self.layout.words(buf.store)[2].view(T + 1, self.num_envs, -1)
        fields = self.layout.views(buf.store)  # (T + 1, N, ...)
        buf.store[0, :, :a].copy_(self.carry_rows[0])
        if self.carry_raw:
            if self.norms.obs is not None:
                fields["obs"][0].copy_(self.norms.obs(fields["obs"][0]))
            self.carry_raw = False
        sent = torch.empty((T, self.num_envs, *self.info.action_shape), dtype=torch_dtype(self.action_dtype),
                           device=self.device)
        games = self.stats.record(T)
        valid = self.valid
        for t in range(T):
            with timer.phase("inference"):
                row, action = actor.row(fields["obs"][t])
                acting[t].copy_(row)
            sent[t] = action
            with timer.phase("env_wait"):  # device work here: the envs step on the device
                obs, reward, terminated, truncated = self.envs.step(action)
            with timer.phase("h2d"):  # for device envs: the step's tensors copied into row t + 1, on the device
                self.stats.update(reward, terminated, truncated, games, t)
                prev_valid, valid = valid, ~(terminated | truncated)
                for name, value in (("obs", obs), ("reward", reward), ("terminated", terminated),
                                    ("truncated", truncated), ("valid", valid), ("prev_valid", prev_valid)):
                    fields[name][t + 1].copy_(value)
                normalize_arrival(self.norms, {k: fields[k][t + 1] for k in ARRIVAL_FIELDS})
        self.valid = valid
        with timer.phase("inference"):
            buf.values[T] = actor.value(buf.next_obs)
        self.carry_rows[0].copy_(buf.store[T, :, :a])
        if self.record:
            # Host-device sync, deliberate: once per rollout, the actions a resume replays.
            self.action_log.append(sent.cpu().numpy())


class AsyncCollector:
    """Steps an async EnvPool pool (``send``/``recv``, ``batch_size < num_envs``) into Rollouts.

    Each ``recv`` returns ``batch_size`` envs, whichever finished first, in any order. For each env
    it holds the result of its previous transition and the observation of its next one; every env
    returned is acted on and sent its next action at once, so the pool never runs short of envs in
    flight, whatever the envs' relative speeds (a recv with fewer envs in flight than its batch
    would hang EnvPool).

    Each env writes its steps into a *segment*, one column of a staging store of T + 1 rows and
    ``num_envs + batch_size`` columns (slots): row r of the env's slot is its r-th step in the
    segment (vectorised over the recv's envs, no loop over envs: a cursor and a slot per env). When
    an env's observation lands on row T (the bootstrap row), its segment is complete: T transitions
    with their results, and the observation and value of row T. The column is copied into the
    rollout being collected, and the env goes on in a free slot whose row 0 is a copy of row T
    (its action was chosen and sent with row T). A rollout is the first N segments completed, in the
    order they complete; segments completed in the same recv beyond the N-th wait in their slots
    and open the next rollout. So a rollout always has N columns of T consecutive steps (N * T
    transitions, each in exactly one rollout, in time order within its column), but a fast env may
    fill several columns of a rollout and a slow one none; nothing waits for the slowest env.

    Consequence for on-policy-ness: a segment's steps may be chosen by the policies of several
    iterations (a slow env's segment spans updates). Each step's behaviour log-prob is stored as it
    is chosen, so PPO's importance ratio stays correct (see --overlap).
    """

    def __init__(self, envs, info: EnvInfo, device: torch.device, num_envs: int, batch_size: int,
                 generator: torch.Generator | None = None, timer: PhaseTimer | None = None,
                 norms: Normalizers | None = None):
        self.envs = envs
        self.info = info
        self.device = device
        self.num_envs = num_envs
        self.batch_size = batch_size
        self.slots = num_envs + batch_size  # one in progress per env, and the completions of one recv
        self.generator = generator
        self.timer = timer or PhaseTimer(device)
        self.norms = norms or Normalizers(None, None)
        self.layout = RowLayout.of(info)
        # rows (flat store rows), env ids, then completions: source and target rows of the row T -> row 0
        # copy, and the slots emitted into the rollout (into its next columns, in this order)
        self.stage = Stager(self.layout, batch_size, device, indices=5)
        self.stats = EpisodeStats(num_envs, info.is_atari)
        self.slot = np.arange(num_envs)  # the slot each env writes its segment into
        self.cursor = np.zeros(num_envs, dtype=np.int64)  # row of the env's next observation in its slot
        self.pending = np.zeros(num_envs, dtype=bool)  # an action was sent; its result is due at row cursor - 1
        self.valid = np.ones(num_envs, dtype=bool)  # whether the env's last observation was a real one
        self.free = deque(range(num_envs, self.slots))
        self.ready: list[int] = []  # slots of segments completed beyond the last rollout's N
        self.staging: torch.Tensor | None = None  # (T + 1, slots, W) uint8
        self.started = False

    def state(self) -> dict:
        """No action log: the order in which async envs step cannot be replayed (a resume restarts them)."""
        return {"actions": None}

    def allocate(self, num_steps: int, num_buffers: int = 1) -> list[Rollout]:
        """Rollouts of T steps of N envs (and, the first time, the staging store of the segments)."""
        if self.staging is None:
            self.staging = torch.zeros((num_steps + 1, self.slots, self.layout.width), dtype=torch.uint8,
                                       device=self.device)
        elif self.staging.shape[0] != num_steps + 1:
            raise ValueError(f"this collector's segments have {self.staging.shape[0] - 1} steps, not {num_steps}")
        return [Rollout.allocate(self.info, num_steps, self.num_envs, self.device) for _ in range(num_buffers)]

    def collect(self, policy: nn.Module | Actor, buf: Rollout) -> None:
        actor = _as_actor(policy, self.generator)
        if self.staging is None or self.staging.shape[0] != buf.store.shape[0]:
            raise ValueError("allocate the rollouts of an AsyncCollector with its allocate()")
        whole, arrival, acting = self.layout.words(self.staging)
        rows = (self.staging.view(torch.int64), buf.store.view(torch.int64))  # (T + 1, slots or N, W / 8)
        self.emitted = 0
        if self.ready:  # the segments completed beyond the last rollout's N open this one
            ready, self.ready = self.ready, []
            self._emit(rows, torch.tensor(ready, device=self.device), ready)
        if not self.started:
            self.envs.async_reset()
            self.started = True
        while self.emitted < self.num_envs:
            with self.timer.phase("env_wait", host=True):
                obs, reward, terminated, truncated, info = self.envs.recv()
            self._on_recv(actor, whole, arrival, acting, rows, obs, reward, terminated, truncated, info)

    def _emit(self, rows: tuple[torch.Tensor, torch.Tensor], slots: torch.Tensor, host_slots) -> None:
        """Copy completed segments (their slots' columns) into the rollout's next columns; free the slots."""
        staging, out = rows
        # One gather straight into the next columns (a contiguous range): on CPU an index_select into a
        # temporary and an index_copy_ from it took 7x as long for Pong rows (8 segments of 33 x 28 KB).
        torch.index_select(staging, 1, slots, out=out[:, self.emitted : self.emitted + len(host_slots)])
        self.free.extend(host_slots)
        self.emitted += len(host_slots)

    def _on_recv(self, actor: Actor, whole, arrival, acting, rows, obs, reward, terminated, truncated, info) -> None:
        K, N, T = self.slots, self.num_envs, self.staging.shape[0] - 1
        ids = info["env_id"].astype(np.int64)
        self.stats.update(reward, terminated, truncated, info, env_ids=ids)
        slot, cursor = self.slot[ids], self.cursor[ids]
        prev_valid = self.pending[ids] & self.valid[ids]  # the result ends a real transition (none after a reset)
        valid = ~(terminated | truncated)  # the observation after an episode's end is EnvPool's reset step
        self.valid[ids] = valid
        # envs whose new row is row T: their segment is complete, and they go on in a fresh slot
        full = np.flatnonzero(cursor == T)
        old = slot[full]
        new = np.array([self.free.popleft() for _ in full], dtype=np.int64)
        take = min(len(full), N - self.emitted)
        with self.timer.phase("h2d"):
            block = self.stage(obs, reward, terminated, truncated, valid, prev_valid,
                               (cursor * K + slot, ids, T * K + old, new, old[:take]))
            index = block["index"]
            normalize_arrival(self.norms, block, env_ids=index[1])
            arrival.index_copy_(0, index[0], block["arrival"])
        with self.timer.phase("inference"):
            row, action = actor.row(block["obs"])
            acting.index_copy_(0, index[0], row)
            # Host-device sync, deliberate: EnvPool needs the actions on the host.
            action = action.cpu().numpy()
        self.cursor[ids] += 1
        self.pending[ids] = True
        if len(full):
            m = len(full)
            whole.index_copy_(0, index[3, :m], whole.index_select(0, index[2, :m]))  # row T -> the new slot's row 0
            self.slot[ids[full]] = new
            self.cursor[ids[full]] = 1
            if take:
                self._emit(rows, index[4, :take], old[:take].tolist())
            self.ready.extend(old[take:].tolist())
        with self.timer.phase("env_wait", host=True):
            self.envs.send(action, ids.astype(np.int32))


class BackgroundCollection:
    """Runs ``collector.collect(actor, buf)`` in a thread while the caller updates (``--overlap``).

    The actor acts with a frozen copy of the weights (theta'), so the update may change the
    learner's weights meanwhile. A thread is enough: EnvPool waits and torch ops release the GIL.
    On CUDA the thread works on its own high-priority stream so acting kernels are not queued behind
    the update's; ``start`` orders that stream after the work already queued on the caller's stream
    (the weight copy, the last reads of buf) and ``wait`` orders the caller's stream after the
    collection.

    A collector whose envs live on the device (``on_device``) stays on the caller's stream instead: such
    an env replaces its state tensors every step, and a tensor made on one stream and freed after use on
    another could be handed by the caching allocator to the update while the env's kernel still reads it.
    On one stream the kernels of both threads queue in order (the host work of the two still overlaps).
    """

    def __init__(self, collector: Collector | AsyncCollector, device: torch.device):
        if device.type == "cuda" and device.index is None:  # the thread's set_device needs the index
            raise ValueError(f"BackgroundCollection needs a CUDA device with its index, got {device}")
        self.collector = collector
        self.device = device
        # High priority: acting kernels go ahead of the update's queued ones, since EnvPool waits
        # for each step's actions (lower numbers are higher priorities; -1 is the highest).
        own_stream = device.type == "cuda" and not getattr(collector, "on_device", False)
        self.stream = torch.cuda.Stream(device, priority=-1) if own_stream else None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self, actor: Actor, buf: Rollout) -> None:
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))

        def run() -> None:
            try:
                if self.device.type == "cuda":
                    # A new thread's current device is cuda:0; without this, leaving the stream
                    # context below would make a context on GPU 0 for every torchrun rank (and a
                    # device env's work would go to GPU 0's stream).
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
    """The collection cfg asks for: sync or async envs (--async-envs), or envs on the device (info.source
    "device"); inline or overlapped (--overlap).

    policy is the learner and forward its bf16/compiled wrapper; with --overlap the actor evaluates a
    frozen copy instead and draws its noise from its own generator seeded with `seed`. rollouts: how
    many ``next()`` calls the run will make. norms: the run's observation and reward normalisers.
    """
    if info.source == "device":
        collector = DeviceCollector(envs, info, device, timer=timer, norms=norms, record=not cfg.overlap)
    elif cfg.async_envs:
        collector = AsyncCollector(envs, info, device, cfg.num_envs, cfg.recv_batch_size, timer=timer, norms=norms)
    else:
        collector = Collector(envs, info, device, timer=timer, norms=norms, record=not cfg.overlap)
    # --cudagraphs None (auto): graphed acting wherever it can be, on CUDA
    graphs = dict(cudagraphs=device.type == "cuda" if cfg.cudagraphs is None else cfg.cudagraphs,
                  graph_batch_sizes=(cfg.recv_batch_size,))
    if not cfg.overlap:
        return InlineCollection(collector, Actor(policy, forward, **graphs), cfg.num_steps)
    behaviour = copy.deepcopy(policy).requires_grad_(False)  # theta', refreshed in place after each update
    generator = torch.Generator(device).manual_seed(seed)
    actor = Actor(behaviour, learner_forward(behaviour, cfg.bf16, cfg.compile), generator=generator, **graphs)
    return OverlapCollection(collector, actor, behaviour, cfg.num_steps, rollouts, device)


def storage_bytes(info: EnvInfo, num_steps: int, num_envs: int, buffers: int = 1, async_batch: int | None = None
                  ) -> int:
    """Bytes of the rollout storage the collectors allocate: `buffers` rollouts, and with async envs
    (`async_batch` envs per recv) the staging store of their segments."""
    row = RowLayout.of(info).width
    rollout = (num_steps + 1) * num_envs * row + 2 * num_steps * num_envs * 4  # the store, advantages, returns
    staging = 0 if async_batch is None else (num_steps + 1) * (num_envs + async_batch) * row
    return buffers * rollout + staging
