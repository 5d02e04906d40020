"""Async collection (EnvPool send/recv): columns assembled in time order whatever order envs return in.

FakeAsyncPool has EnvPool's async API and autoreset semantics and returns envs out of order; every
observation names its env and its index in that env's life, so each column of the rollout can be
checked against the env's own record of what happened.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastppo.envs import EnvInfo, env_info, make_envs
from fastppo.policy import make_policy
from fastppo.rollout import AsyncCollector, SpillRollout, as_words, gather_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


INFO = EnvInfo(env_id="Fake-v0", obs_shape=(3,), obs_dtype=np.dtype(np.float32), num_actions=3, is_atari=False)


class FakeAsyncPool:
    """EnvPool's async API (async_reset, send(actions, env_ids), recv) over num_envs toy envs.

    Env n's k-th observation (k counts from 0 over its whole life, reset observations included) is
    [n, k, step in episode]. The reward of a step is n + 0.01 * k + action; episodes end after a
    per-env pseudo-random length, by termination or truncation. Autoreset as EnvPool: the step after
    an episode's end ignores its action and returns reward 0, terminated = truncated = False and the
    next episode's first observation. recv returns batch_size of the envs whose step is done, picked
    at random among the `window` oldest (out of order, none overdue by more than 2 recvs); the 5th step of
    a `slow` env (a long reset, say) is only returned once it has waited `slow_recvs` recvs, or when
    no other env could fill the batch. Fewer than batch_size envs in flight is a hang in EnvPool: an
    error here.
    """

    def __init__(self, num_envs: int, batch_size: int, seed: int = 0, window: int | None = None,
                 slow: tuple[int, ...] = (), slow_recvs: int = 0):
        self.num_envs, self.batch_size = num_envs, batch_size
        self.rng = np.random.default_rng(seed)
        self.window = window or batch_size + 3
        self.slow, self.slow_recvs = set(slow), slow_recvs
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

    def async_reset(self) -> None:
        for n in range(self.num_envs):
            self.ready[n] = (self._obs(n), 0.0, False, False)
            self.queue.append((n, -1))

    def send(self, actions: np.ndarray, env_ids: np.ndarray) -> None:
        assert len(actions) == len(env_ids)
        for a, n in zip(actions.tolist(), env_ids.tolist(), strict=True):
            assert n not in dict(self.queue), f"env {n} got an action while one is in flight"
            self._step(n, a)
            self.queue.append((n, self.recvs))

    def _step(self, n: int, action: int) -> None:
        for key, value in zip(("action",), (action,), strict=True):
            self.log[key][n].append(value)
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

    def recv(self):
        self.recvs += 1
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
        ids = [self.queue.pop(i)[0] for i in picked]
        self.rng.shuffle(ids)
        obs, rew, term, trunc = zip(*(self.ready.pop(n) for n in ids), strict=True)
        self.episode_returns += [self.final_return[n] for n, te, tr in zip(ids, term, trunc, strict=True) if te or tr]
        info = {"env_id": np.array(ids, dtype=np.int32), "elapsed_step": self.ep_step[ids].copy()}
        return (np.stack(obs), np.array(rew, dtype=np.float32), np.array(term), np.array(trunc), info)


def check_rollout(pool: FakeAsyncPool, policy: torch.nn.Module, buf: SpillRollout, first_k: np.ndarray) -> None:
    """Every column n of buf holds env n's transitions first_k[n] .. first_k[n] + T - 1, in order."""
    T, N = buf.rewards.shape
    for n in range(N):
        k = np.arange(first_k[n], first_k[n] + T)
        col = buf.obs[:, n]
        assert (col[:, 0] == n).all(), f"env {n}: another env's observation in its column"
        assert col[:, 1].tolist() == k.tolist(), f"env {n}: observations out of time order"
        assert buf.actions[:, n].tolist() == [pool.log["action"][n][i] for i in k]
        assert buf.rewards[:, n].tolist() == pytest.approx([pool.log["reward"][n][i] for i in k])
        assert buf.terminated[:, n].tolist() == [pool.log["terminated"][n][i] for i in k]
        assert buf.truncated[:, n].tolist() == [pool.log["truncated"][n][i] for i in k]
        # the step after an episode's end is EnvPool's reset step: invalid
        ended_before = [i > 0 and (pool.log["terminated"][n][i - 1] or pool.log["truncated"][n][i - 1]) for i in k]
        assert buf.valid[:, n].tolist() == [not e for e in ended_before]
        # bootstrap row: the observation after the T-th step, and its value
        assert buf.next_obs[n, 1].item() == first_k[n] + T
    with torch.no_grad():
        logits, values = policy(buf.obs.flatten(0, 1))
        _, boot = policy(buf.next_obs)
    logp = F.log_softmax(logits, -1).gather(-1, buf.actions.reshape(-1, 1)).view(T, N)
    torch.testing.assert_close(buf.logprobs, logp)
    torch.testing.assert_close(buf.values[:T], values.view(T, N))
    torch.testing.assert_close(buf.values[T], boot)
    torch.testing.assert_close(buf.dist, logits.view(T, N, -1))


@pytest.mark.parametrize("num_envs,batch_size,num_steps,spill,pool_kw", [
    (11, 4, 37, 16, {}),
    (8, 4, 12, 5, dict(window=8)),
    (6, 2, 9, 4, dict(slow=(0, 1, 2), slow_recvs=10)),
], ids=["odd-sizes-shuffled", "tiny-spill-random-order", "slow-env-held"])
def test_async_columns_in_time_order(num_envs, batch_size, num_steps, spill, pool_kw):
    """Three consecutive rollouts: columns in time order with the stored results, masks, behaviour
    log-probs, values, logits and the bootstrap row; the carry between rollouts loses no step."""
    torch.manual_seed(0)
    policy = make_policy(INFO)
    pool = FakeAsyncPool(num_envs, batch_size, **pool_kw)
    collector = AsyncCollector(pool, INFO, torch.device("cpu"), num_envs, batch_size, spill_rows=spill)
    (buf,) = collector.allocate(num_steps)
    first_k = np.zeros(num_envs, dtype=np.int64)
    held = []
    for _ in range(3):
        collector.collect(policy, buf)
        check_rollout(pool, policy, buf, first_k)
        first_k += num_steps
        held.append(int(collector.held.sum()))  # envs that filled their spill: acted on by the next rollout
    assert any(held) == (spill < 16), held
    returns, _ = collector.stats.pop()
    assert returns == pytest.approx(pool.episode_returns)


def test_async_two_buffers_carry_across():
    """With two buffers (--overlap), each rollout carries its spill into the other buffer."""
    torch.manual_seed(0)
    policy = make_policy(INFO)
    pool = FakeAsyncPool(9, 3, seed=2)
    collector = AsyncCollector(pool, INFO, torch.device("cpu"), 9, 3)
    bufs = collector.allocate(10, 2)
    first_k = np.zeros(9, dtype=np.int64)
    for i in range(4):
        collector.collect(policy, bufs[i % 2])
        check_rollout(pool, policy, bufs[i % 2], first_k)
        first_k += 10


def test_stall_is_an_error_not_a_hang():
    """An env slower than the spill can absorb: collection stops with an error instead of hanging."""
    pool = FakeAsyncPool(4, 3, slow=(0,), slow_recvs=50)
    collector = AsyncCollector(pool, INFO, torch.device("cpu"), 4, 3, spill_rows=2)
    (buf,) = collector.allocate(4)
    with pytest.raises(RuntimeError, match="async collection stalled"):
        collector.collect(make_policy(INFO), buf)


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
    """The CUDA data path (pinned staging, non-blocking copies, index_copy_ on the device, graphed
    acting) assembles the same columns."""
    from fastppo.policy import Actor

    torch.manual_seed(0)
    policy = make_policy(INFO).cuda()
    pool = FakeAsyncPool(11, 4)
    collector = AsyncCollector(pool, INFO, torch.device("cuda"), 11, 4)
    (buf,) = collector.allocate(37)
    actor = Actor(policy, cudagraphs=cudagraphs, graph_batch_sizes=(4,))
    first_k = np.zeros(11, dtype=np.int64)
    for _ in range(3):
        collector.collect(actor, buf)
        check_rollout(pool, policy, buf, first_k)
        first_k += 37
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
