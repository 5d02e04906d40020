"""Running normalisation of observations, rewards and value targets, on the training device (``--norm-obs``,
``--norm-reward``, ``--norm-value``).

CleanRL's ``ppo_continuous_action.py`` wraps its envs in gymnasium's NormalizeObservation,
TransformObservation(clip 10), NormalizeReward(gamma) and TransformReward(clip 10); fastppo does the
same on the device, vectorised over envs, in the collectors:

* :class:`ObsNormalizer`: every observation the envs return first updates the running mean and
  variance, then is normalised, (obs - mean) / sqrt(var + 1e-8), and clipped to [-10, 10]. The
  rollout stores normalised observations (what the policy saw); evaluation and the Python API use
  the saved statistics, frozen.
* :class:`RewardScaler`: each env keeps its discounted return G <- gamma * G * (1 - terminated) + r;
  G updates the running variance, and the stored reward is r / sqrt(var(G) + 1e-8), clipped to
  [-10, 10]. EnvPool's reset step (masked out of training) moves neither G nor the statistics.
  The scores fastppo reports stay the envs' raw rewards.

Value normalisation (:class:`ValueNormalizer`, rl_games' ``normalize_value``; not in CleanRL, off by
default) is the trainer's, not the collectors'. The critic learns the return in normalised units,
(G - mean) / sqrt(var + 1e-8), with the running mean and variance of the returns; the network's value
output is that normalised value wherever it is read. So:

* The rollout's ``values`` (T + 1, N), which the Actor records from the network at collection time,
  are normalised values. Right after collection the trainer de-normalises the whole tensor in one
  op, ``values * std + mean`` with the statistics the acting weights were trained with, into the
  trainer's own view of the rollout (``dataclasses.replace``: the collector's storage, whose rows an
  async env's next segment or the next sync rollout starts from, is left as the network wrote it).
  GAE, its bootstrap row T, the returns and the explained variance all see raw values.
* The statistics then take in that rollout's returns (valid transitions only), once per iteration
  before the update, as rl_games' ``prepare_dataset`` does (rl_games also adds the old values).
* The update trains on targets normalised with the new statistics: the returns and the
  collection-time values (whose value clip range, ``--clip-coef``, is then in normalised units) are
  normalised once for the whole batch; with ``--advantages epoch`` the fresh value predictions are
  de-normalised for GAE and its returns normalised. TRPO's critic trains on the same normalised
  returns. The logged value loss is in normalised units.

Under ``--overlap`` (and for the steps of an async segment that spans updates) the acting weights
are one update older than the statistics that de-normalise their values; the statistics are running means
over the whole run, so one rollout moves them by about 1 / (iterations so far).

Statistics (:class:`RunningMeanStd`) are (count, mean, M2) in float64, merged with Chan et al.'s
parallel formula, and start as gymnasium's do (count 1e-4, mean 0, variance 1). Each rank also
keeps ``delta``, what it saw since the ranks last agreed; :meth:`Normalizers.sync` (once per
iteration, a collective under torchrun) merges every rank's delta into the agreed statistics, rank
by rank, so all ranks normalise alike. The value statistics are merged as soon as they are updated
(:meth:`ValueNormalizer.update`), so that every rank trains on the same targets. In a plain run
the statistics are simply CleanRL's running ones.
"""

from __future__ import annotations

import numpy as np
import torch

from fastppo import distributed

CLIP = 10.0
EPS = 1e-8


class RunningMeanStd:
    """Running mean and variance of vectors of `shape`, float64 on `device`; no host sync.

    ``count``, ``mean`` and ``m2`` are the statistics in use; under torchrun ``delta`` is what this
    rank added since the last :meth:`sync` (a plain run keeps none). Updates are in place and run once
    per env step. On CUDA they are about a dozen small kernels. On the CPU the same arithmetic
    (:func:`_batch_stats`, :func:`_merge_`, written once for both) runs in numpy on views of the same
    tensors (``host``): a tiny array op costs about 1 us in numpy and 4 us in torch, and a step's
    statistics are some thirty of them (CleanRL's normalisation wrappers are numpy too).
    """

    def __init__(self, shape: tuple[int, ...], device: torch.device, host: bool | None = None):
        f64 = dict(dtype=torch.float64, device=device)
        self.host = torch.device(device).type == "cpu" if host is None else host
        self.count = torch.tensor(1e-4, **f64)  # gymnasium's start: count 1e-4, mean 0, variance 1
        self.mean = torch.zeros(shape, **f64)
        self.m2 = torch.full(shape, 1e-4, **f64)
        self.delta = ((torch.zeros((), **f64), torch.zeros(shape, **f64), torch.zeros(shape, **f64))
                      if distributed.is_distributed() else None)
        self._base = (self.count.clone(), self.mean.clone(), self.m2.clone())
        self.var = torch.ones(shape, **f64)
        self.inv_std = torch.ones(shape, **f64)  # 1 / sqrt(var + 1e-8)
        # what the per-step arithmetic works on: the tensors, or numpy views of them (changed in place
        # by both, so loading a checkpoint or syncing ranks, which copy into the tensors, is seen by both)
        tensors = (self.count, self.mean, self.m2, self.var, self.inv_std, *(self.delta or ()))
        self._stats = tuple(t.numpy() for t in tensors) if self.host else tensors
        self._set_var()

    def _set_var(self) -> None:
        count, _, m2, var, inv_std = self._stats[:5]
        var[...] = m2 / count
        inv_std[...] = (var + EPS) ** -0.5

    def update(self, x: torch.Tensor | np.ndarray, weight: torch.Tensor | np.ndarray | None = None) -> None:
        """Add the rows of x (B, *shape); weight (B,) of 0/1 leaves rows out."""
        if self.host:
            x = _numpy(x).astype(np.float64)
            weight = None if weight is None else _numpy(weight).astype(np.float64)
        else:
            x = x.to(torch.float64)
            weight = None if weight is None else weight.to(torch.float64)
        n, mean, m2 = _batch_stats(x, weight)
        _merge_(*self._stats[:3], n, mean, m2)
        if self.delta is not None:
            _merge_(*self._stats[5:], n, mean, m2)
        self._set_var()

    def sync(self) -> None:
        """Merge every rank's delta into the base (rank 0's first); a collective under torchrun.

        A plain run's statistics are already all there is: nothing to do.
        """
        if self.delta is None:
            return
        deltas = distributed.all_gather_tensors(torch.cat([self.delta[0].view(1), self.delta[1].flatten(),
                                                           self.delta[2].flatten()]))
        size = self.mean.numel()
        base = tuple(t.clone() for t in self._base)
        for d in deltas:
            _merge_(*base, d[0], d[1 : 1 + size].view_as(self.mean), d[1 + size :].view_as(self.mean))
        for mine, agreed, zero in zip((self.count, self.mean, self.m2), base, self.delta, strict=True):
            mine.copy_(agreed)
            zero.zero_()
        self._base = base
        self._set_var()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """(count, mean, M2): exactly the statistics in use (variance = M2 / count)."""
        return {"count": self.count.cpu(), "mean": self.mean.cpu(), "m2": self.m2.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        device = self.mean.device
        count, mean, m2 = (state[k].to(device, torch.float64) for k in ("count", "mean", "m2"))
        if mean.shape != self.mean.shape or m2.shape != self.mean.shape or count.dim() != 0:
            raise ValueError(f"statistics of shape {tuple(mean.shape)}, expected {tuple(self.mean.shape)}")
        for mine, saved in zip((self.count, self.mean, self.m2), (count, mean, m2), strict=True):
            mine.copy_(saved)
        if self.delta is not None:
            for t in self.delta:
                t.zero_()
        self._base = (self.count.clone(), self.mean.clone(), self.m2.clone())
        self._set_var()


def _numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """A CPU tensor's numpy view (no copy), or x as it is."""
    return x.numpy() if isinstance(x, torch.Tensor) else x


def _batch_stats(x, weight):
    """(count, mean, M2) of the rows of x (B, ...) float64, weighted by weight (B,) float64 when given; numpy
    arrays or tensors alike. An unweighted count is a host number (no device op)."""
    if weight is None:
        n = float(x.shape[0])
        mean = x.mean(0)
        return n, mean, ((x - mean) ** 2).sum(0)
    w = weight.reshape(-1, *([1] * (x.ndim - 1)))
    n = w.sum()
    mean = (w * x).sum(0) / (n + 1e-300)  # + 1e-300: an empty batch has mean 0, any other is unchanged
    return n, mean, (w * (x - mean) ** 2).sum(0)


def _merge_(n_a, mean_a, m2_a, n_b, mean_b, m2_b) -> None:
    """Chan et al.'s merge of (n_b, mean_b, M2_b) into (n_a, mean_a, M2_a), in place (either count may be 0);
    numpy arrays or tensors alike."""
    delta = mean_b - mean_a
    w = n_b / (n_a + n_b + 1e-300)
    m2_a += m2_b + delta * delta * (n_a * w)
    mean_a += delta * w
    n_a += n_b


class ObsNormalizer:
    """(obs - mean) / sqrt(var + 1e-8) clipped to [-10, 10], with the running statistics of `rms`."""

    def __init__(self, shape: tuple[int, ...], device: torch.device):
        self.rms = RunningMeanStd(shape, device)

    def __call__(self, obs: torch.Tensor) -> torch.Tensor:
        """Update the statistics with obs (B, *shape), then normalise it (float32)."""
        self.rms.update(obs)
        return self.normalize(obs)

    def normalize(self, obs: torch.Tensor) -> torch.Tensor:
        """Normalise with the statistics as they are (evaluation, the Python API)."""
        if self.rms.host:
            _, mean, _, _, inv_std = self.rms._stats[:5]
            return torch.from_numpy(np.clip((_numpy(obs) - mean) * inv_std, -CLIP, CLIP).astype(np.float32))
        return ((obs - self.rms.mean) * self.rms.inv_std).clamp_(-CLIP, CLIP).to(torch.float32)


class RewardScaler:
    """r / sqrt(var(G) + 1e-8) clipped to [-10, 10]; G the per-env discounted return (see the module)."""

    def __init__(self, num_envs: int, gamma: float, device: torch.device):
        self.gamma = gamma
        self.rms = RunningMeanStd((), device)
        self.returns = torch.zeros(num_envs, dtype=torch.float64, device=device)  # G of each env

    def __call__(self, reward: torch.Tensor, terminated: torch.Tensor, valid: torch.Tensor,
                 env_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Scale the rewards (B,) of envs env_ids (all when None); valid (B,) False on EnvPool's reset step."""
        if self.rms.host:  # the same arithmetic in numpy (see RunningMeanStd)
            reward, terminated, valid = _numpy(reward), _numpy(terminated), _numpy(valid)
            returns, idx = self.returns.numpy(), slice(None) if env_ids is None else _numpy(env_ids)
            g = returns[idx]
            g = np.where(valid, g * self.gamma * ~terminated + reward, g)
            returns[idx] = g
            self.rms.update(g, valid)
            inv_std = self.rms._stats[4]
            return torch.from_numpy(np.clip(reward * inv_std, -CLIP, CLIP).astype(np.float32))
        idx = slice(None) if env_ids is None else env_ids
        g = self.returns[idx]
        g = torch.where(valid, g * self.gamma * (~terminated).to(g.dtype) + reward.to(g.dtype), g)
        self.returns[idx] = g
        self.rms.update(g, valid)
        return (reward * self.rms.inv_std).clamp_(-CLIP, CLIP).to(torch.float32)


class ValueNormalizer:
    """--norm-value: the critic's targets in units of the running std of the returns (see the module)."""

    def __init__(self, device: torch.device):
        self.rms = RunningMeanStd((), device)

    def update(self, returns: torch.Tensor, valid: torch.Tensor) -> None:
        """Take in a rollout's returns (T, N) where valid (T, N); a collective under torchrun (every rank's
        returns are merged at once, so all ranks normalise the update's targets alike)."""
        self.rms.update(returns.reshape(-1), valid.reshape(-1))
        self.rms.sync()

    def normalize(self, values: torch.Tensor) -> torch.Tensor:
        """(values - mean) / sqrt(var + 1e-8), computed in float64, in the dtype of values; not clipped."""
        return ((values.double() - self.rms.mean) * self.rms.inv_std).to(values.dtype)

    def denormalize(self, values: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`normalize`: values * sqrt(var + 1e-8) + mean, in the dtype of values."""
        return (values.double() / self.rms.inv_std + self.rms.mean).to(values.dtype)


class Normalizers:
    """The run's normalisers (any may be None): statistics synced per iteration and checkpointed."""

    def __init__(self, obs: ObsNormalizer | None, reward: RewardScaler | None, value: ValueNormalizer | None = None):
        self.obs = obs
        self.reward = reward
        self.value = value

    def _named(self) -> list[tuple[str, ObsNormalizer | RewardScaler | ValueNormalizer]]:
        return [(name, norm) for name, norm in (("obs", self.obs), ("reward", self.reward), ("value", self.value))
                if norm is not None]

    def sync(self) -> None:
        """Agree on the collectors' statistics across ranks (a collective under torchrun; local merge
        otherwise). The value statistics agree already: ValueNormalizer.update merges them."""
        for norm in (self.obs, self.reward):
            if norm is not None:
                norm.rms.sync()

    def state_dict(self) -> dict:
        """The statistics, for the checkpoint (the same on every rank after sync)."""
        return {name: norm.rms.state_dict() for name, norm in self._named()}

    def load_state_dict(self, state: dict) -> None:
        for name, norm in self._named():
            norm.rms.load_state_dict(state[name])
