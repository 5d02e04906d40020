"""Async collection (EnvPool send/recv): segments of T consecutive steps, whatever order and speed envs run at.

FakeAsyncPool has EnvPool's async API and autoreset semantics and returns envs out of order (or, with
per-env step durations, in the order a clock says they finish); every observation names its env and
its index in that env's life, so each column of a rollout can be checked against the env's own record
of what happened, and the columns of successive rollouts against the env's whole life.
"""

from __future__ import annotations

import heapq

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastppo.envs import EnvInfo, env_info, make_envs
from fastppo.policy import make_policy
from fastppo.rollout import AsyncCollector, Rollout, as_words, gather_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


INFO = EnvInfo(env_id="Fake-v0", obs_shape=(3,), obs_dtype=np.dtype(np.float32), num_actions=3, is_atari=False)


class FakeAsyncPool:
    """EnvPool's async API (async_reset, send(actions, env_ids), recv) over num_envs toy envs.

    Env n's k-th observation (k counts from 0 over its whole life, reset observations included) is
    [n, k, step in episode]. The reward of a step is n + 0.01 * k + action; episodes end after a
    per-env pseudo-random length, by termination or truncation. Autoreset as EnvPool: the step after
    an episode's end ignores its action and returns reward 0, terminated = truncated = False and the
    next episode's first observation.

    Which envs a recv returns: with ``durations`` (time units per step of each env, jittered by up to
    +-50% per step), the batch_size envs that finish first on a clock, as EnvPool's threads would
    return them; otherwise batch_size of the envs whose step is done, picked at random among the
    `window` oldest (out of order, none overdue by more than 2 recvs); the 5th step of a `slow` env (a
    long reset, say) is only returned once it has waited `slow_recvs` recvs, or when no other env
    could fill the batch. Fewer than batch_size envs in flight is a hang in EnvPool: an error here.
    """

    def __init__(self, num_envs: int, batch_size: int, seed: int = 0, window: int | None = None,
                 slow: tuple[int, ...] = (), slow_recvs: int = 0, durations: np.ndarray | None = None):
        self.num_envs, self.batch_size = num_envs, batch_size
        self.rng = np.random.default_rng(seed)
        self.window = window or batch_size + 3
        self.slow, self.slow_recvs = set(slow), slow_recvs
        self.durations, self.clock, self.finish = durations, 0.0, []  # (finish time, env) heap, with durations
        self.k = np.zeros(num_envs, dtype=np.int64)  # observations produced so far
        self.ep_step = np.zeros(num_envs, dtype=np.int64)
        self.ep_len = self.rng.integers(3, 9, num_envs)
        self.ended = np.zeros(num_envs, dtype=bool)
        self.queue: list[tuple[int, int]] = []  # (env, recv count when sent), oldest first
        self.recvs = 0
        self.ready: dict[int, tuple] = {}
        # the env's own record, indexed by the transition k (taken from observation k)
        self.log = {key: [[] for _ in range(num_envs)] for key in ("action", "reward", "terminated", "truncated")}
        self.returns = np.zeros(num_envs)
        self.final_return = np.zeros(num_envs)
        self.episode_returns: list[float] = []  # in the order the envs report their episode's end

    def _obs(self, n: int) -> np.ndarray:
        return np.array([n, self.k[n], self.ep_step[n]], dtype=np.float32)

    def _started(self, n: int) -> None:
        if self.durations is not None:
            step = self.durations[n] * self.rng.uniform(0.5, 1.5)
            heapq.heappush(self.finish, (self.clock + step, n))
        else:
            self.queue.append((n, self.recvs))

    def in_flight(self) -> set[int]:
        return {n for _, n in self.finish} | {n for n, _ in self.queue}

    def async_reset(self) -> None:
        for n in range(self.num_envs):
            self.ready[n] = (self._obs(n), 0.0, False, False)
            self._started(n)

    def send(self, actions: np.ndarray, env_ids: np.ndarray) -> None:
        assert len(actions) == len(env_ids)
        for a, n in zip(actions.tolist(), env_ids.tolist(), strict=True):
            assert n not in self.in_flight(), f"env {n} got an action while one is in flight"
            self._step(n, a)
            self._started(n)

    def _step(self, n: int, action: int) -> None:
        self.log["action"][n].append(action)
        if self.ended[n]:  # EnvPool's reset step: the action is ignored
            reward, term, trunc = 0.0, False, False
            self.ended[n] = False
            self.ep_step[n] = 0
            self.ep_len[n] = self.rng.integers(3, 9)
        else:
            reward = n + 0.01 * self.k[n] + action
            self.ep_step[n] += 1
            end = self.ep_step[n] >= self.ep_len[n]
            term, trunc = bool(end and n % 2 == 0), bool(end and n % 2 == 1)
            self.ended[n] = end
            self.returns[n] += reward
            if end:
                self.final_return[n] = self.returns[n]
                self.returns[n] = 0.0
        self.log["reward"][n].append(reward)
        self.log["terminated"][n].append(term)
        self.log["truncated"][n].append(trunc)
        self.k[n] += 1
        self.ready[n] = (self._obs(n), reward, term, trunc)

    def _pick(self) -> list[int]:
        if self.durations is not None:
            if len(self.finish) < self.batch_size:
                raise RuntimeError(f"pool would hang: {len(self.finish)} envs in flight, batch {self.batch_size}")
            done = [heapq.heappop(self.finish) for _ in range(self.batch_size)]
            self.clock = done[-1][0]
            return [n for _, n in done]
        eligible = [i for i, (n, sent) in enumerate(self.queue)
                    if n not in self.slow or self.k[n] != 5 or self.recvs - sent > self.slow_recvs][: self.window]
        if len(eligible) < self.batch_size:  # time passes: the slow envs finish too
            eligible = list(range(min(len(self.queue), self.window)))
        if len(eligible) < self.batch_size:
            raise RuntimeError(f"pool would hang: {len(self.queue)} envs in flight, batch size {self.batch_size}")
        # out of order, but no env waits more than 2 recvs past its turn (EnvPool's queue is FIFO)
        overdue = [i for i in eligible if self.recvs - self.queue[i][1] > 2][: self.batch_size]
        rest = [i for i in eligible if i not in overdue]
        picked = overdue + self.rng.choice(rest, self.batch_size - len(overdue), replace=False).tolist()
        picked.sort(reverse=True)
        return [self.queue.pop(i)[0] for i in picked]

    def recv(self):
        self.recvs += 1
        ids = self._pick()
        self.rng.shuffle(ids)
        obs, rew, term, trunc = zip(*(self.ready.pop(n) for n in ids), strict=True)
        self.episode_returns += [self.final_return[n] for n, te, tr in zip(ids, term, trunc, strict=True) if te or tr]
        info = {"env_id": np.array(ids, dtype=np.int32), "elapsed_step": self.ep_step[ids].copy()}
        return (np.stack(obs), np.array(rew, dtype=np.float32), np.array(term), np.array(trunc), info)


def check_rollout(pool: FakeAsyncPool, policy: torch.nn.Module, buf: Rollout) -> list[tuple[int, int]]:
    """Every column of buf holds one env's transitions k0 .. k0 + T - 1, in order, with their results,
    masks, behaviour log-probs, values and logits, and the bootstrap row; returns (env, k0) per column."""
    T, N = buf.rewards.shape
    segments = []
    for j in range(N):
        col = buf.obs[:, j]
        n, k0 = int(col[0, 0]), int(col[0, 1])
        k = np.arange(k0, k0 + T)
        assert (col[:, 0] == n).all(), f"column {j}: another env's observation in env {n}'s segment"
        assert col[:, 1].tolist() == k.tolist(), f"column {j} (env {n}): observations out of time order"
        assert buf.actions[:, j].tolist() == [pool.log["action"][n][i] for i in k]
        assert buf.rewards[:, j].tolist() == pytest.approx([pool.log["reward"][n][i] for i in k])
        assert buf.terminated[:, j].tolist() == [pool.log["terminated"][n][i] for i in k]
        assert buf.truncated[:, j].tolist() == [pool.log["truncated"][n][i] for i in k]
        # the step after an episode's end is EnvPool's reset step: invalid
        ended_before = [i > 0 and (pool.log["terminated"][n][i - 1] or pool.log["truncated"][n][i - 1]) for i in k]
        assert buf.valid[:, j].tolist() == [not e for e in ended_before]
        # bootstrap row: the env's observation after the T-th step
        assert buf.next_obs[j].tolist()[:2] == [n, k0 + T]
        segments.append((n, k0))
    with torch.no_grad():
        logits, values = policy(buf.obs.flatten(0, 1))
        _, boot = policy(buf.next_obs)
    logp = F.log_softmax(logits, -1).gather(-1, buf.actions.reshape(-1, 1)).view(T, N)
    torch.testing.assert_close(buf.logprobs, logp)
    torch.testing.assert_close(buf.values[:T], values.view(T, N))
    torch.testing.assert_close(buf.values[T], boot)
    torch.testing.assert_close(buf.dist, logits.view(T, N, -1))
    return segments


def check_every_step_once(segments: list[tuple[int, int]], num_envs: int, num_steps: int) -> dict[int, int]:
    """Over the rollouts so far, each env's segments start at 0, T, 2T, ...: in time order, every transition
    in exactly one rollout, none lost or duplicated. Returns the number of segments of each env."""
    starts: dict[int, list[int]] = {n: [] for n in range(num_envs)}
    for n, k0 in segments:
        starts[n].append(k0)
    for n, ks in starts.items():
        assert ks == [i * num_steps for i in range(len(ks))], f"env {n}: segments start at {ks}"
    return {n: len(ks) for n, ks in starts.items()}


@pytest.mark.parametrize("num_envs,batch_size,num_steps,pool_kw", [
    (11, 4, 37, {}),
    (8, 4, 12, dict(window=8)),
    (6, 2, 9, dict(slow=(0, 1, 2), slow_recvs=10)),
    (5, 5, 1, {}),
], ids=["odd-sizes-shuffled", "random-order", "slow-resets", "one-step-whole-batch"])
def test_async_segments_in_time_order(num_envs, batch_size, num_steps, pool_kw):
    """Consecutive rollouts: each column a segment of one env in time order with the stored results, masks,
    behaviour log-probs, values, logits and the bootstrap row; every step in exactly one rollout."""
    torch.manual_seed(0)
    policy = make_policy(INFO)
    pool = FakeAsyncPool(num_envs, batch_size, **pool_kw)
    collector = AsyncCollector(pool, INFO, torch.device("cpu"), num_envs, batch_size)
    (buf,) = collector.allocate(num_steps)
    segments = []
    for _ in range(4):
        collector.collect(policy, buf)
        segments += check_rollout(pool, policy, buf)
    assert len(segments) == 4 * num_envs
    check_every_step_once(segments, num_envs, num_steps)
    returns, _ = collector.stats.pop()
    assert returns == pytest.approx(pool.episode_returns)


def test_async_two_buffers_carry_across():
    """With two buffers (--overlap), rollouts alternate between them and the segments still follow on."""
    torch.manual_seed(0)
    policy = make_policy(INFO)
    pool = FakeAsyncPool(9, 3, seed=2)
    collector = AsyncCollector(pool, INFO, torch.device("cpu"), 9, 3)
    bufs = collector.allocate(10, 2)
    segments = []
    for i in range(4):
        collector.collect(policy, bufs[i % 2])
        segments += check_rollout(pool, policy, bufs[i % 2])
    check_every_step_once(segments, 9, 10)


@pytest.mark.parametrize("slow_factor,slow_envs", [(10, 8), (50, 1), (1000, 3)],
                         ids=["half-10x-slower", "one-50x-slower", "three-1000x-slower"])
def test_async_never_stalls_whatever_the_env_speeds(slow_factor, slow_envs):
    """Envs whose step times differ by 10x to 1000x: thousands of recvs, no error, and every rollout is
    still made of whole segments in time order, every step in exactly one of them. The fast envs fill
    most columns; a very slow env may fill none in a rollout (its segment waits for it)."""
    N, B, T, rollouts = 16, 8, 6, 100
    durations = np.ones(N)
    durations[:slow_envs] = slow_factor
    torch.manual_seed(0)
    policy = make_policy(INFO)
    pool = FakeAsyncPool(N, B, seed=3, durations=durations)
    collector = AsyncCollector(pool, INFO, torch.device("cpu"), N, B)
    bufs = collector.allocate(T, 2)
    segments = []
    for i in range(rollouts):
        collector.collect(policy, bufs[i % 2])
        segments += check_rollout(pool, policy, bufs[i % 2])
    assert pool.recvs >= 1000
    per_env = check_every_step_once(segments, N, T)
    fast, slow = min(per_env[n] for n in range(slow_envs, N)), max(per_env[n] for n in range(slow_envs))
    assert fast > slow  # nothing waited for the slow envs
    returns, _ = collector.stats.pop()
    assert returns == pytest.approx(pool.episode_returns)


def test_envpool_async_cartpole_masks_and_scores():
    """Real EnvPool async pool: each column's autoreset step is masked, results line up with masks."""
    info = env_info("CartPole-v1")
    envs = make_envs(info, 6, 0, batch_size=3, max_episode_steps=20)
    torch.manual_seed(0)
    policy = make_policy(info)
    collector = AsyncCollector(envs, info, torch.device("cpu"), 6, 3)
    (buf,) = collector.allocate(60)
    for _ in range(2):
        collector.collect(policy, buf)
        done = buf.terminated | buf.truncated
        assert done.any()
        assert torch.equal(buf.valid[1:], ~done[:-1])
        assert (buf.rewards[1:][done[:-1]] == 0).all()  # the reset step pays nothing
        assert (buf.rewards[buf.valid] == 1).all()
    returns, lengths = collector.stats.pop()
    assert returns and all(1 <= r <= 20 for r in returns) and returns == [float(n) for n in lengths]
    envs.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cudagraphs", [False, True], ids=["eager", "cudagraphs"])
def test_async_columns_on_cuda(cudagraphs):
    """The CUDA data path (packed pinned blocks, non-blocking copies, index copies on the device, graphed
    acting) assembles the same segments."""
    from fastppo.policy import Actor

    torch.manual_seed(0)
    policy = make_policy(INFO).cuda()
    pool = FakeAsyncPool(11, 4)
    collector = AsyncCollector(pool, INFO, torch.device("cuda", 0), 11, 4)
    (buf,) = collector.allocate(37)
    actor = Actor(policy, cudagraphs=cudagraphs, graph_batch_sizes=(4,))
    segments = []
    for _ in range(3):
        collector.collect(actor, buf)
        segments += check_rollout(pool, policy, buf)
    check_every_step_once(segments, 11, 37)
    assert bool(actor.graphs) == cudagraphs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("own_generator", [False, True], ids=["default-generator", "own-generator"])
def test_graphed_acting_draws_what_eager_acting_draws(own_generator):
    """A CUDA graph's Gumbel noise is filled outside the graph from the actor's generator: graphed
    and eager acting give the same actions from the same RNG state, capturing draws nothing, and the
    default generator is left alone when the actor has its own (the --overlap thread's)."""
    from fastppo.policy import Actor

    torch.manual_seed(0)
    policy = make_policy(env_info("Pong-v5")).cuda()
    obs = torch.randint(0, 256, (5, 4, 84, 84), dtype=torch.uint8, device="cuda")

    def run(cudagraphs: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        torch.cuda.manual_seed(1)
        gen = torch.Generator("cuda").manual_seed(2) if own_generator else None
        actor = Actor(policy, generator=gen, cudagraphs=cudagraphs, graph_batch_sizes=(5,))
        out = [torch.cat([t.float().reshape(5, -1) for t in actor(obs)], 1).clone() for _ in range(4)]
        assert bool(actor.graphs) == cudagraphs
        return out, torch.cuda.get_rng_state()

    eager, eager_state = run(False)
    graphed, graphed_state = run(True)
    assert not torch.equal(eager[0], eager[1])  # fresh noise every step
    for e, g in zip(eager, graphed, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert torch.equal(graphed_state, eager_state)  # capture and warm-up drew nothing extra


def test_as_words_is_the_same_memory_in_wider_elements():
    obs = torch.randint(0, 256, (5, 4, 84, 84), dtype=torch.uint8)
    words = as_words(obs)
    assert words.dtype == torch.int64 and words.shape == (5, 4 * 84 * 84 // 8)
    assert words.data_ptr() == obs.data_ptr()
    dst = torch.zeros(9, 4, 84, 84, dtype=torch.uint8)
    as_words(dst).index_copy_(0, torch.tensor([7, 0, 3, 8, 1]), words)
    assert torch.equal(dst[[7, 0, 3, 8, 1]], obs)
    assert as_words(torch.zeros(5, 3)).dtype == torch.float32  # 12-byte rows: no wider type tiles them
    assert as_words(torch.zeros(5, 6, dtype=torch.uint8)).dtype == torch.int16


@pytest.mark.parametrize("shape,dtype", [((4, 84, 84), torch.uint8), ((6,), torch.float32), ((), torch.float32),
                                         ((3,), torch.float32), ((), torch.bool)])
def test_gather_rows_is_indexing(shape, dtype):
    t = (torch.rand(11, *shape) * 255).to(dtype)
    idx = torch.tensor([3, 10, 0, 3, 7])
    torch.testing.assert_close(gather_rows(t, idx), t[idx], rtol=0, atol=0)
    torch.testing.assert_close(gather_rows(t[:, None].expand(11, 2, *shape), idx), t[idx, None].expand(5, 2, *shape))


class RecordingPool:
    """A real EnvPool pool, recording what each env returned and was sent (observations as hashes)."""

    def __init__(self, envs, num_envs: int):
        self.envs = envs
        keys = ("obs", "action", "reward", "terminated", "truncated")
        self.log = {key: [[] for _ in range(num_envs)] for key in keys}

    def async_reset(self):
        return self.envs.async_reset()

    def recv(self):
        obs, reward, terminated, truncated, info = self.envs.recv()
        for i, n in enumerate(info["env_id"]):
            if self.log["obs"][n]:  # the result of the env's last transition
                for key, value in (("reward", float(reward[i])), ("terminated", bool(terminated[i])),
                                   ("truncated", bool(truncated[i]))):
                    self.log[key][n].append(value)
            self.log["obs"][n].append(obs[i].tobytes())
        return obs, reward, terminated, truncated, info

    def send(self, action, env_id):
        for a, n in zip(np.asarray(action), env_id, strict=True):
            self.log["action"][n].append(int(a))
        return self.envs.send(action, env_id)

    def __getattr__(self, name):
        return getattr(self.envs, name)


def column_is(buf: Rollout, j: int, frames: list[bytes], log: dict, n: int, k0: int) -> bool:
    """Column j of buf (its frames as bytes) is env n's transitions k0 .. k0 + T - 1 by the env's record."""
    T = buf.rewards.shape[0]
    ended = [i > 0 and (log["terminated"][n][i - 1] or log["truncated"][n][i - 1]) for i in range(k0, k0 + T)]
    return (log["obs"][n][k0 : k0 + T + 1] == frames
            and buf.actions[:, j].tolist() == log["action"][n][k0 : k0 + T]
            and buf.rewards[:, j].tolist() == log["reward"][n][k0 : k0 + T]
            and buf.terminated[:, j].tolist() == log["terminated"][n][k0 : k0 + T]
            and buf.truncated[:, j].tolist() == log["truncated"][n][k0 : k0 + T]
            and buf.valid[:, j].tolist() == [not e for e in ended])


def test_async_collection_of_real_pong_matches_each_envs_own_record():
    """EnvPool's own async Pong (truncated every 100 steps, so games end inside segments): each column of
    each rollout is T consecutive transitions of one env (frames, actions, rewards, ends, the reset step
    masked, the bootstrap frame) as that env's record says; static frames may match several places of an
    env's record, and one of them must match everything."""
    info = env_info("Pong-v5")
    N, B, T = 6, 3, 16
    pool = RecordingPool(make_envs(info, N, 3, batch_size=B, max_episode_steps=100), N)
    torch.manual_seed(0)
    policy = make_policy(info)
    collector = AsyncCollector(pool, info, torch.device("cpu"), N, B)
    (buf,) = collector.allocate(T)
    log, ends, rewards = pool.log, 0, 0
    for _ in range(14):
        collector.collect(policy, buf)
        for j in range(N):
            frames = [buf.obs[r, j].numpy().tobytes() for r in range(T)] + [buf.next_obs[j].numpy().tobytes()]
            found = [(n, k0) for n in range(N) for k0 in range(len(log["obs"][n]) - T)
                     if log["obs"][n][k0] == frames[0] and column_is(buf, j, frames, log, n, k0)]
            assert found, f"column {j}: no env's record holds these {T} transitions"
            ends += int(buf.truncated[:, j].sum() + buf.terminated[:, j].sum())
            rewards += int((buf.rewards[:, j] != 0).sum())
    assert ends >= N and rewards > 0  # games ended inside segments, and points were scored
