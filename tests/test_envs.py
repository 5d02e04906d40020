"""EnvPool semantics fastppo depends on: autoreset masking, terminated vs truncated, full-game scores."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from gymnasium.spaces import Box, Discrete, MultiDiscrete

from fastppo.envs import EnvAdapter, EnvError, EpisodeStats, env_info, make_envs, space_fields
from fastppo.kernels import reference
from fastppo.policy import make_policy
from fastppo.rollout import Collector, Rollout


def collect(env_id: str, num_envs: int, num_steps: int, seed: int = 0, **env_kwargs):
    info = env_info(env_id)
    envs = make_envs(info, num_envs, seed, **env_kwargs)
    torch.manual_seed(seed)
    policy = make_policy(info)
    buf = Rollout.allocate(info, num_steps, num_envs, torch.device("cpu"))
    collector = Collector(envs, info, torch.device("cpu"))
    collector.collect(policy, buf)
    return buf, collector, envs


# --- detail 1: EnvPool's autoreset step is masked out ------------------------------------------
def test_autoreset_step_is_marked_invalid():
    buf, _, _ = collect("CartPole-v1", num_envs=5, num_steps=300, max_episode_steps=40)
    done = buf.terminated | buf.truncated
    assert done.any(), "expected episodes to end within the rollout"
    # the step after every episode end is EnvPool's reset step: invalid, reward 0
    assert torch.equal(buf.valid[1:], ~done[:-1])
    assert (buf.rewards[1:][done[:-1]] == 0).all()
    assert buf.valid[0].all()
    # both truncations (time limit 40) and terminations (pole falls) occur here
    assert buf.truncated.any() and buf.terminated.any()


def test_masked_transitions_do_not_train_policy_or_value():
    """The loss and its gradients on a batch with masked rows equal those on the valid rows alone,
    whatever garbage the masked rows hold (they are out of the advantage statistics too)."""
    gen = torch.Generator().manual_seed(0)
    M, A = 40, 6
    logits = torch.randn(M, A, generator=gen)
    actions = torch.randint(0, A, (M,), generator=gen)
    old_logp = torch.randn(M, generator=gen) - 2
    adv, values, returns = (torch.randn(M, generator=gen) for _ in range(3))
    mask = torch.rand(M, generator=gen) < 0.6
    kw = dict(clip_coef=0.1, vf_coef=0.5, ent_coef=0.01, vf_clip_coef=0.1)

    def loss_and_grads(lg, act, olp, ad, v, r, m):
        lg = lg.clone().requires_grad_(True)
        v = v.clone().requires_grad_(True)
        loss, _ = reference.ppo_loss(lg, act, olp, ad, v, v.detach(), r, mask=m, **kw)
        loss.backward()
        return loss, lg.grad, v.grad

    garbage_adv = torch.where(mask, adv, torch.full_like(adv, 1e4))
    garbage_ret = torch.where(mask, returns, torch.full_like(returns, -1e4))
    full = loss_and_grads(logits, actions, old_logp, garbage_adv, values, garbage_ret, mask)
    sub = loss_and_grads(logits[mask], actions[mask], old_logp[mask], adv[mask], values[mask], returns[mask], None)
    torch.testing.assert_close(full[0], sub[0])
    torch.testing.assert_close(full[1][mask], sub[1])
    torch.testing.assert_close(full[2][mask], sub[2])
    assert (full[1][~mask] == 0).all() and (full[2][~mask] == 0).all()


# --- detail 2: terminated vs truncated; life loss is terminal for learning ----------------------
def test_truncated_step_bootstraps_from_final_observation_value():
    """EnvPool puts the final observation of a truncated episode in the next row, so the value the
    truncated step bootstraps from is exactly V(final obs)."""
    buf, _, envs = collect("CartPole-v1", num_envs=3, num_steps=120, max_episode_steps=25)
    t, n = torch.nonzero(buf.truncated)[0].tolist()
    assert not buf.valid[t + 1, n]  # row t+1 holds the final observation, then the reset step
    values = buf.values.clone()
    adv, _ = reference.gae(buf.rewards, values, buf.terminated, buf.truncated, 0.99, 0.95)
    values[t + 1, n] += 1.0  # a truncated step's advantage moves with V(final obs)...
    adv2, _ = reference.gae(buf.rewards, values, buf.terminated, buf.truncated, 0.99, 0.95)
    assert (adv2[t, n] - adv[t, n]).item() == pytest.approx(0.99)
    term_t, term_n = torch.nonzero(buf.terminated)[0].tolist()
    values = buf.values.clone()
    values[term_t + 1, term_n] += 1.0  # ...a terminated step's does not
    adv3, _ = reference.gae(buf.rewards, values, buf.terminated, buf.truncated, 0.99, 0.95)
    assert adv3[term_t, term_n].item() == pytest.approx(adv[term_t, term_n].item())


def test_life_loss_is_terminal_for_learning_but_not_a_game_end():
    info = env_info("Breakout-v5")
    envs = make_envs(info, 2, seed=3)
    envs.reset()
    rng = np.random.default_rng(0)
    stats = EpisodeStats(2, is_atari=True)
    life_losses = game_overs = 0
    for _ in range(600):
        _, reward, term, trunc, inf = envs.step(rng.integers(0, info.num_actions, 2).astype(np.int32))
        stats.update(reward, term, trunc, inf)
        game_over = inf["terminated"] == 1
        life_loss = term & ~game_over
        assert (inf["lives"][life_loss] > 0).all()  # terminal for learning, the game goes on
        assert (inf["lives"][game_over] == 0).all() and term[game_over].all()
        life_losses += int(life_loss.sum())
        game_overs += int(game_over.sum())
    assert game_overs >= 1 and life_losses >= 4 * game_overs
    assert len(stats.finished_returns) == game_overs  # a score per game, not per life


# --- detail 3: full-game raw scores, no leak after truncation ------------------------------------
def test_episode_stats_sum_raw_rewards_over_lives_and_reset_on_truncation():
    stats = EpisodeStats(2, is_atari=True)
    z = np.zeros(2, dtype=bool)

    def step(raw, life_lost=(False, False), game_over=(False, False), trunc=(False, False), elapsed=(1, 1)):
        info = {"reward": np.array(raw, dtype=np.float32), "terminated": np.array(game_over, dtype=np.int32),
                "elapsed_step": np.array(elapsed, dtype=np.int32)}
        clipped = np.sign(info["reward"])
        stats.update(clipped, np.array(life_lost) | np.array(game_over), np.array(trunc), info)

    step([7, 3])
    step([0, 0], life_lost=(True, False))  # env 0 loses a life: the game goes on
    step([5, 0])
    assert stats.pop() == ([], [])
    step([1, 2], trunc=(False, True), elapsed=(4, 4))  # env 1 truncated by the time limit
    step([0, 9])  # env 1's next game starts from 0: nothing leaks
    step([0, 0], game_over=(True, True), elapsed=(6, 2))
    returns, lengths = stats.pop()
    assert returns == [5.0, 13.0, 9.0]  # raw, unclipped, summed over lives
    assert lengths == [4, 6, 2]
    assert not z.any()


def test_truncated_atari_game_score_does_not_leak_into_next_game():
    """Pong with a 60-step time limit: every game is truncated; each reported score is the raw sum
    of its own game only."""
    info = env_info("Pong-v5")
    envs = make_envs(info, 2, seed=1, max_episode_steps=60)
    envs.reset()
    stats = EpisodeStats(2, is_atari=True)
    expected: list[float] = []
    running = np.zeros(2)
    rng = np.random.default_rng(0)
    for _ in range(200):
        _, reward, term, trunc, inf = envs.step(rng.integers(0, 6, 2).astype(np.int32))
        stats.update(reward, term, trunc, inf)
        running += inf["reward"]
        end = trunc | (inf["terminated"] == 1)
        expected.extend(running[end].tolist())
        running[end] = 0
    returns, lengths = stats.pop()
    assert len(returns) >= 4
    assert returns == expected
    assert all(n == 60 for n in lengths)


# --- bad env ids -----------------------------------------------------------------------------------
def test_unknown_env_id_names_close_matches():
    with pytest.raises(EnvError, match="unknown --env-id 'Pongg-v5'.*Pong-v5"):
        env_info("Pongg-v5")


SPACES = [
    ("Hopper-v4", dict(continuous=True, num_actions=3, obs_shape=(11,), family="mujoco", action_low=(-1.0,) * 3)),
    ("Pendulum-v1", dict(continuous=True, num_actions=1, obs_shape=(3,), action_low=(-2.0,), action_high=(2.0,))),
    ("LunarLanderContinuous-v2", dict(continuous=True, num_actions=2, family="box2d")),
    ("CheetahRun-v1", dict(continuous=True, num_actions=6, obs_shape=(17,), dict_spec=(("position", 0),
                                                                                      ("velocity", 0)))),
    ("Taxi-v3", dict(continuous=False, num_actions=6, obs_shape=(), obs_classes=500, family="toy_text")),
    ("MiniGrid-Empty-5x5-v0", dict(num_actions=7, obs_shape=(151,), dict_spec=(("direction", 4), ("image", 0)))),
    ("Pong-v5", dict(num_actions=6, obs_shape=(4, 84, 84), is_atari=True, family="atari")),
]


@pytest.mark.parametrize("env_id,expected", SPACES, ids=[e for e, _ in SPACES])
def test_env_info_of_every_space_fastppo_trains_on(env_id, expected):
    info = env_info(env_id)
    for key, value in expected.items():
        assert getattr(info, key) == value, (key, getattr(info, key))
    assert info.dist_size == (2 if info.continuous else 1) * info.num_actions


@pytest.mark.parametrize("env_id,message", [
    ("CarRacing-v2", "observes (H, W, C) = (96, 96, 3) frames"),
], ids=["channels-last-frames"])
def test_unsupported_spaces_are_one_line(env_id, message):
    with pytest.raises(EnvError, match=re.escape(message)):
        env_info(env_id)


@pytest.mark.parametrize("obs_space,action_space,message", [
    (Box(-1, 1, (3,)), Discrete(4, start=1), "Discrete(4, start=1) action space; fastppo's actions start at 0"),
    (Discrete(5, start=-2), Discrete(2), "observes a Discrete(5, start=-2); fastppo one-hots state indices from 0"),
    (Box(-1, 1, (3,)), MultiDiscrete([2, 3]), "MultiDiscrete([2 3]) action space; fastppo trains on Discrete and"),
    (Box(-1, 1, (3,)), Box(-np.inf, np.inf, (2,)), "unbounded Box action space"),
    (Box(0, 255, (96, 96, 3), np.uint8), Discrete(2), "observes (H, W, C) = (96, 96, 3) frames"),
], ids=["actions-from-1", "states-from-minus-2", "multi-discrete", "unbounded-box", "channels-last"])
def test_space_fields_refuse_what_no_policy_has_in_one_line(obs_space, action_space, message):
    """The spaces of any env (EnvPool's, or Gymnasium's for envs of your own), checked by one function."""
    with pytest.raises(EnvError, match=re.escape(message)):
        space_fields("X-v0", obs_space, action_space)
    assert space_fields("X-v0", Discrete(5), Box(-2, 2, (1,)))["obs_classes"] == 5


def test_adapter_flattens_dict_observations_and_clips_continuous_actions():
    minigrid = env_info("MiniGrid-Empty-5x5-v0")
    envs = make_envs(minigrid, 3, 0)
    raw, _ = envs.envs.reset()  # EnvPool's own observation: a dict
    flat = envs.obs(raw)
    assert flat.shape == (3, 151) and flat.dtype == np.float32
    np.testing.assert_array_equal(flat[:, :4], np.eye(4)[raw["direction"]])  # direction one-hot
    np.testing.assert_array_equal(flat[:, 4:], raw["image"].reshape(3, -1))  # image as numbers; mission dropped
    envs.close()

    class Recorder:
        def step(self, action):
            self.sent = action
            return np.zeros((2, 3), np.float32), np.zeros(2), np.zeros(2, bool), np.zeros(2, bool), {}

    pendulum = env_info("Pendulum-v1")
    adapter = EnvAdapter(Recorder(), pendulum)
    adapter.step(np.array([[-7.0], [0.5]], dtype=np.float32))
    np.testing.assert_array_equal(adapter.envs.sent, [[-2.0], [0.5]])  # clipped to the Box's bounds
    assert adapter.envs.sent.dtype == np.float32


@pytest.mark.parametrize("items,message", [
    (("agent_view_size=5",), None),
    (("nope=1",), "--env-kwargs nope: MiniGrid-Empty-5x5-v0 has no such option"),
    (("agent_view_siz=5",), "close names: agent_view_size"),
    (("num_envs=3",), "--env-kwargs num_envs: set by fastppo; use --num-envs"),
    (("agent_view_size=five",), "--env-kwargs agent_view_size='five': expected a int like its default 7"),
    (("agent_view_size",), "expected key=value"),
], ids=["passed-through", "unknown", "close-name", "reserved", "bad-type", "malformed"])
def test_env_kwargs_are_checked_and_change_the_spaces(items, message):
    if message is None:
        info = env_info("MiniGrid-Empty-5x5-v0", items)
        assert info.env_kwargs == (("agent_view_size", 5),) and info.obs_shape == (4 + 5 * 5 * 3,)
        envs = make_envs(info, 2, 0)
        assert envs.reset()[0].shape == (2, 79)
        envs.close()
    else:
        with pytest.raises(EnvError, match=re.escape(message)):
            env_info("MiniGrid-Empty-5x5-v0", items)


def test_policies_for_each_space():
    from fastppo.policy import GaussianMLP

    hopper, taxi = env_info("Hopper-v4"), env_info("Taxi-v3")
    gaussian = make_policy(hopper)
    assert isinstance(gaussian, GaussianMLP) and gaussian.dist_kind == "gaussian"
    dist, value = gaussian(torch.zeros(5, 11))
    assert dist.shape == (5, 6) and value.shape == (5,)
    assert torch.equal(dist[:, 3:], torch.zeros(5, 3))  # log-std starts at 0, the same for every state
    one_hot = make_policy(taxi)
    logits, value = one_hot(torch.tensor([0, 499, 3]))
    assert logits.shape == (3, 6) and value.shape == (3,)
    assert one_hot.double()(torch.tensor([1]))[0].dtype == torch.float64  # the one-hot follows the model's dtype
