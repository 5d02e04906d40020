"""Continuous control and the other EnvPool spaces: the Gaussian policy's rollouts and update, CleanRL's
observation and reward normalisation and rl_games' value normalisation (on the device, checkpointed,
combined across ranks), exact resume with them, eval and video, and short learning runs on small envs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import read_metrics, without_timings

import fastppo.distributed
from fastppo.checkpoint import load_checkpoint
from fastppo.cli import main
from fastppo.envs import env_info, make_envs
from fastppo.kernels import reference
from fastppo.normalize import ObsNormalizer, RewardScaler, RunningMeanStd, ValueNormalizer
from fastppo.policy import make_policy
from fastppo.rollout import Collector, Rollout
from fastppo.trainer import normalized_targets, raw_values

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py
PENDULUM = ["train", "--env-id", "Pendulum-v1", "--device", "cpu"]


class GymRunningMeanStd:
    """gymnasium's RunningMeanStd (numpy, float64), transcribed: what CleanRL's wrappers use."""

    def __init__(self, shape=()):
        self.mean, self.var, self.count = np.zeros(shape), np.ones(shape), 1e-4

    def update(self, x):
        batch_mean, batch_var, batch_count = np.mean(x, axis=0), np.var(x, axis=0), x.shape[0]
        delta = batch_mean - self.mean
        tot = self.count + batch_count
        self.mean = self.mean + delta * batch_count / tot
        m2 = self.var * self.count + batch_var * batch_count + delta**2 * self.count * batch_count / tot
        self.var, self.count = m2 / tot, tot


# The statistics' arithmetic runs in numpy on the CPU and in torch on CUDA (RunningMeanStd.host): both, on CPU.
ARITHMETIC = pytest.mark.parametrize("host", [True, False], ids=["numpy", "torch"])


@ARITHMETIC
def test_observation_normalisation_is_gymnasiums(host):
    """NormalizeObservation then TransformObservation(clip 10): update with the batch, then normalise."""
    gen = np.random.default_rng(0)
    ours, theirs = ObsNormalizer((3,), torch.device("cpu")), GymRunningMeanStd((3,))
    ours.rms = RunningMeanStd((3,), torch.device("cpu"), host=host)
    for step in range(50):
        obs = gen.normal([5.0, -2.0, 0.0], [3.0, 0.1, 100.0], size=(4, 3))
        if step == 7:
            obs[0, 2] = 1e6  # an outlier: clipped at 10 after normalisation
        got = ours(torch.from_numpy(obs))
        theirs.update(obs)
        want = np.clip((obs - theirs.mean) / np.sqrt(theirs.var + 1e-8), -10, 10)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
        assert got.dtype == torch.float32
    np.testing.assert_allclose(ours.rms.var.numpy(), theirs.var, rtol=1e-10)


@ARITHMETIC
def test_reward_scaling_is_gymnasiums_and_skips_envpools_reset_step(host):
    """NormalizeReward(gamma) then TransformReward(clip 10): G = gamma G (1 - terminated) + r updates the
    return statistics, and the reward is divided by their std; EnvPool's reset step changes nothing."""
    gen = np.random.default_rng(1)
    gamma, n = 0.99, 3
    ours, theirs = RewardScaler(n, gamma, torch.device("cpu")), GymRunningMeanStd()
    ours.rms = RunningMeanStd((), torch.device("cpu"), host=host)
    returns = np.zeros(n)
    for _ in range(200):
        reward = gen.normal(1.0, 2.0, n)
        terminated = gen.random(n) < 0.05
        valid = gen.random(n) < 0.9
        reward[~valid] = 0.0  # EnvPool's reset step pays nothing
        got = ours(torch.from_numpy(reward).float(), torch.from_numpy(terminated), torch.from_numpy(valid))
        returns = np.where(valid, returns * gamma * (1 - terminated) + reward.astype(np.float32), returns)
        if valid.any():
            theirs.update(returns[valid])
        want = np.clip(reward.astype(np.float32) / np.sqrt(theirs.var + 1e-8), -10, 10)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.returns.numpy(), returns, rtol=1e-6)


@ARITHMETIC
def test_statistics_are_combined_across_ranks(monkeypatch, host):
    """Two ranks' statistics after sync are those of all their data together, the same on both."""
    data = [torch.randn(30, 4, dtype=torch.float64) * 3 + 1, torch.randn(50, 4, dtype=torch.float64) - 2]
    monkeypatch.setattr(fastppo.distributed, "is_distributed", lambda: True)
    ranks = [RunningMeanStd((4,), torch.device("cpu"), host=host) for _ in data]
    for rms, x in zip(ranks, data, strict=True):
        for chunk in x.split(7):
            rms.update(chunk)
    deltas = [torch.cat([r.delta[0].view(1), r.delta[1], r.delta[2]]) for r in ranks]
    monkeypatch.setattr(fastppo.distributed, "all_gather_tensors", lambda t: deltas)
    for rms in ranks:
        rms.sync()
    everything = GymRunningMeanStd((4,))
    everything.update(torch.cat(data).numpy())
    for rms in ranks:
        np.testing.assert_allclose(rms.mean.numpy(), everything.mean, rtol=1e-12)
        np.testing.assert_allclose(rms.var.numpy(), everything.var, rtol=1e-12)
        assert all(float(t.abs().sum()) == 0 for t in rms.delta)


def test_value_statistics_are_the_valid_returns_and_normalise_invertibly(monkeypatch):
    """--norm-value: the statistics take in each rollout's valid returns (gymnasium's float64 running mean and
    variance of them), normalise to (x - mean) / sqrt(var + 1e-8) and de-normalise back, in the input's dtype;
    under torchrun every rank's returns are merged as soon as they are taken in."""
    gen = torch.Generator().manual_seed(2)
    norm, theirs = ValueNormalizer(torch.device("cpu")), GymRunningMeanStd()
    for _ in range(6):
        returns = torch.randn(37, 11, generator=gen, dtype=torch.float64) * 40 + 100
        valid = torch.rand(37, 11, generator=gen) < 0.8
        norm.update(returns.float(), valid)
        theirs.update(returns.float().double()[valid].numpy())
        np.testing.assert_allclose(float(norm.rms.mean), theirs.mean, rtol=1e-12)
        np.testing.assert_allclose(float(norm.rms.var), theirs.var, rtol=1e-10)
    x = torch.randn(5, 3, generator=gen) * 40 + 100
    want = (x.double().numpy() - theirs.mean) / np.sqrt(theirs.var + 1e-8)
    normalised = norm.normalize(x)
    assert normalised.dtype == torch.float32 and norm.denormalize(normalised).dtype == torch.float32
    np.testing.assert_allclose(normalised.numpy(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm.denormalize(normalised), x)
    torch.testing.assert_close(norm.denormalize(norm.normalize(x.double())), x.double(), rtol=1e-12, atol=1e-12)

    mine, other = torch.randn(40, dtype=torch.float64) * 3 + 1, torch.randn(25, dtype=torch.float64) - 2
    monkeypatch.setattr(fastppo.distributed, "is_distributed", lambda: True)
    elsewhere = RunningMeanStd((), torch.device("cpu"))  # what the other rank took in since the last sync
    elsewhere.update(other)
    their_delta = torch.cat([d.view(1) for d in elsewhere.delta])
    monkeypatch.setattr(fastppo.distributed, "all_gather_tensors", lambda t: [t, their_delta])
    ranked = ValueNormalizer(torch.device("cpu"))
    ranked.update(mine.view(8, 5), torch.ones(8, 5, dtype=torch.bool))
    everything = GymRunningMeanStd()
    everything.update(torch.cat([mine, other]).numpy())
    np.testing.assert_allclose([float(ranked.rms.mean), float(ranked.rms.var)], [everything.mean, everything.var],
                               rtol=1e-12)
    assert all(float(t.abs().sum()) == 0 for t in ranked.rms.delta)


def test_the_trainer_sees_raw_values_and_trains_on_normalised_targets():
    """The rollout's values (T + 1, N) are the network's normalised outputs: the trainer de-normalises them
    into its own view (GAE and its bootstrap row T then see raw values; the collector's storage is left as it
    was), takes the valid returns into the statistics, and the update's returns and collection-time values are
    normalised with the new statistics; the advantages are GAE's on raw values."""
    T, N, gamma, lam = 37, 11, 0.99, 0.95
    gen = torch.Generator().manual_seed(3)
    buf = Rollout.allocate(env_info("CartPole-v1"), T, N, torch.device("cpu"))
    buf.values.copy_(torch.randn(T + 1, N, generator=gen))
    buf.rewards.copy_(torch.rand(T, N, generator=gen) * 3)
    buf.terminated.copy_(torch.rand(T, N, generator=gen) < 0.05)
    buf.truncated.copy_(torch.rand(T, N, generator=gen) < 0.02)
    buf.valid.copy_(torch.rand(T, N, generator=gen) > 0.03)
    stored = buf.values.clone()
    norm = ValueNormalizer(torch.device("cpu"))
    norm.update(torch.randn(T, N, generator=gen) * 20 + 50, buf.valid)  # statistics of earlier rollouts
    mean, std = float(norm.rms.mean), float(norm.rms.var.add(1e-8).sqrt())

    raw = raw_values(buf, norm)
    assert torch.equal(buf.values, stored) and raw.values is not buf.values and raw.rewards is buf.rewards
    torch.testing.assert_close(raw.values.double(), stored.double() * std + mean)
    advantages, returns = reference.gae(raw.rewards.double(), raw.values.double(), raw.terminated, raw.truncated,
                                        gamma, lam)
    raw.advantages.copy_(advantages)
    raw.returns.copy_(returns)
    theirs = GymRunningMeanStd()
    theirs.mean, theirs.var, theirs.count = mean, float(norm.rms.var), float(norm.rms.count)
    norm.update(raw.returns, raw.valid)
    theirs.update(returns[buf.valid].float().double().numpy())
    np.testing.assert_allclose([float(norm.rms.mean), float(norm.rms.var)], [theirs.mean, theirs.var], rtol=1e-10)

    targets = normalized_targets(raw, norm)
    scale = np.sqrt(theirs.var + 1e-8)
    np.testing.assert_allclose(targets.returns.numpy(), (returns.numpy() - theirs.mean) / scale, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(targets.values.numpy(), (raw.values.double().numpy() - theirs.mean) / scale, rtol=1e-5,
                               atol=1e-5)
    assert targets.advantages is buf.advantages and torch.equal(buf.values, stored)
    assert raw_values(buf, None) is buf and normalized_targets(buf, None) is buf  # --norm-value off: untouched


def test_gaussian_rollout_keeps_unclipped_samples_and_their_log_probs():
    info = env_info("Pendulum-v1")
    envs = make_envs(info, 3, 0)
    torch.manual_seed(0)
    policy = make_policy(info)
    with torch.no_grad():
        policy.actor_logstd.fill_(1.5)  # wide: many samples fall outside [-2, 2]
    collector = Collector(envs, info, torch.device("cpu"))
    (buf,) = collector.allocate(40)
    collector.collect(policy, buf)
    assert buf.actions.shape == (40, 3, 1) and buf.actions.dtype == torch.float32
    assert (buf.actions.abs() > 2).any()  # stored as sampled, not as clipped for the env
    mean, log_std = buf.dist[..., :1], buf.dist[..., 1:]
    torch.testing.assert_close(buf.logprobs, reference.gaussian_log_prob(mean, log_std, buf.actions))
    assert collector.state()["actions"].shape == (40, 3, 1)  # the action log a resume replays
    envs.close()


def test_continuous_run_with_normalisation_resumes_exactly(tmp_path, monkeypatch, capsys):
    """Pendulum with CleanRL's continuous settings (normalised observations and rewards) and PPO-penalty
    (exact Gaussian KL): SIGTERM after iteration 2 of 4, resume; metrics and parameters equal the
    uninterrupted run's, the normalisation statistics are in the checkpoint."""
    import signal

    from test_runs import interrupt_at_iteration

    args = [*PENDULUM, "--num-steps", "256", "--num-minibatches", "4", "--total-timesteps", "1024", "--loss",
            "penalty", "--seed", "5"]
    assert main([*args, "--run-dir", str(tmp_path / "straight")]) == 0
    interrupt_at_iteration(monkeypatch, 2)
    assert main([*args, "--run-dir", str(tmp_path / "stopped")]) == 128 + signal.SIGTERM
    monkeypatch.undo()
    state = load_checkpoint(str(tmp_path / "stopped"))
    assert set(state["normalizer"]) == {"obs", "reward"} and float(state["normalizer"]["obs"]["count"]) > 500
    assert state["actions"].shape == (512, 1, 1) and "reward_returns" in state["collection"][0]
    assert main(["train", "--resume", str(tmp_path / "stopped")]) == 0
    capsys.readouterr()
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "stopped")
    assert without_timings(resumed) == without_timings(straight)
    assert len({m["losses/kl_coef"] for m in straight}) > 1 and all(m["losses/kl"] > 0 for m in straight)
    a, b = load_checkpoint(str(tmp_path / "straight")), load_checkpoint(str(tmp_path / "stopped"))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for part in ("obs", "reward"):
        for key, value in a["normalizer"][part].items():
            assert torch.equal(value, b["normalizer"][part][key]), (part, key)


def test_value_normalisation_run_resumes_exactly(tmp_path, monkeypatch, capsys):
    """Pendulum with --norm-value (and GAE every epoch, which de-normalises the fresh predictions): SIGTERM after
    iteration 2 of 4, resume; metrics, parameters and the value statistics equal the uninterrupted run's, and
    the statistics are those of every valid return so far."""
    import signal

    from test_runs import interrupt_at_iteration

    args = [*PENDULUM, "--num-steps", "256", "--num-minibatches", "4", "--total-timesteps", "1024", "--norm-value",
            "True", "--advantages", "epoch", "--seed", "6"]
    assert main([*args, "--run-dir", str(tmp_path / "straight")]) == 0
    interrupt_at_iteration(monkeypatch, 2)
    assert main([*args, "--run-dir", str(tmp_path / "stopped")]) == 128 + signal.SIGTERM
    monkeypatch.undo()
    state = load_checkpoint(str(tmp_path / "stopped"))
    assert set(state["normalizer"]) == {"obs", "reward", "value"}
    # the valid steps: 512, less EnvPool's reset step after each of the two 200-step games
    assert float(state["normalizer"]["value"]["count"]) == pytest.approx(512 - 2, abs=1e-3)
    assert main(["train", "--resume", str(tmp_path / "stopped")]) == 0
    capsys.readouterr()
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "stopped")
    assert without_timings(resumed) == without_timings(straight)
    a, b = load_checkpoint(str(tmp_path / "straight")), load_checkpoint(str(tmp_path / "stopped"))
    assert all(torch.equal(a["model"][key], b["model"][key]) for key in a["model"])
    for key, value in a["normalizer"]["value"].items():
        assert torch.equal(value, b["normalizer"]["value"][key]), key
    assert abs(float(a["normalizer"]["value"]["mean"])) > 0.1  # it moved from its start at 0


def test_cleanrl_preset_is_ppo_continuous_actions(tmp_path):
    import json

    assert main([*PENDULUM, "--preset", "cleanrl", "--total-timesteps", "2048", "--run-dir", str(tmp_path / "c")]) == 0
    c = json.loads((tmp_path / "c" / "config.json").read_text())
    assert (c["num_envs"], c["num_steps"], c["num_minibatches"], c["update_epochs"], c["learning_rate"]) == (
        1, 2048, 32, 10, 3e-4)
    assert (c["clip_coef"], c["ent_coef"], c["anneal_lr"], c["norm_obs"], c["norm_reward"]) == (0.2, 0.0, True, True,
                                                                                             True)
    assert (c["lr_schedule"], c["norm_value"]) == ("anneal", False)


@pytest.mark.parametrize("extra,message", [
    (["--env-id", "Taxi-v3", "--norm-obs", "True"],
     "--norm-obs needs vector observations; Taxi-v3 observes a state index"),
    (["--env-id", "Pendulum-v1", "--env-kwargs", "version=x"], "--env-kwargs version='x': expected a int"),
    (["--env-id", "MiniGrid-Empty-5x5-v0", "--env-kwargs", "size"], "--env-kwargs 'size': expected key=value"),
], ids=["norm-obs-on-indices", "env-kwargs-type", "env-kwargs-form"])
def test_bad_options_for_these_envs_are_one_line(tmp_path, capsys, extra, message):
    assert main(["train", "--device", "cpu", "--run-dir", str(tmp_path / "r"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_eval_and_video_of_continuous_and_dict_envs(tmp_path, capsys):
    """fastppo eval plays with the run's frozen observation statistics; videos where EnvPool renders,
    and one line where it cannot (MuJoCo without an OpenGL context, toy text)."""
    import imageio

    for env_id, extra in (("Pendulum-v1", ["--num-steps", "64", "--num-minibatches", "2"]),
                          ("MiniGrid-Empty-5x5-v0", ["--num-steps", "32"])):
        run_dir = tmp_path / env_id
        assert main(["train", "--env-id", env_id, "--device", "cpu", "--run-dir", str(run_dir), "--total-timesteps",
                     "128", *extra]) == 0
        assert main(["eval", str(run_dir), "--episodes", "2", "--video"]) == 0
        out = capsys.readouterr().out
        assert f"{env_id}  ckpt_" in out and "2 full games" in out
        [video] = list((run_dir / "videos").iterdir())
        with imageio.get_reader(str(video), "ffmpeg") as reader:
            assert len([f for f in reader]) > 2
    taxi = tmp_path / "taxi"
    assert main(["train", "--env-id", "Taxi-v3", "--device", "cpu", "--run-dir", str(taxi), "--total-timesteps",
                 "512"]) == 0
    capsys.readouterr()
    assert main(["eval", str(taxi), "--episodes", "1", "--video"]) == 2
    assert "--video: EnvPool does not render Taxi-v3" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("env_id,target,budget,extra", [
    ("MiniGrid-Empty-5x5-v0", 0.9, 200_000, ["--target-return-games", "50"]),
    ("Taxi-v3", 0.0, 1_000_000, ["--target-return-games", "100", "--num-envs", "64", "--norm-reward", "True",
                                 "--no-clip-vloss", "--learning-rate", "1e-3", "--no-anneal-lr"]),
], ids=["minigrid-empty", "taxi"])
def test_small_envs_learn(tmp_path, capsys, env_id, target, budget, extra):
    """A dict-observation env (MiniGrid, image + direction) and a state-index env (Taxi, one-hot input)
    reach a recent return that a random policy never does (MiniGrid: 0.9 of the 1.0 for reaching the
    goal at once; Taxi: a positive mean over 100 games, where random play scores about -770 and a
    policy that only learned to avoid the -10 penalties -200), within the step budget. Taxi's returns
    are in the hundreds, which CleanRL's value clipping (+-0.2 per update) holds the critic back from:
    it trains with reward scaling and no value clipping (see the README)."""
    run_dir = tmp_path / "r"
    assert main(["train", "--env-id", env_id, "--device", "cpu", "--run-dir", str(run_dir), "--total-timesteps",
                 str(budget), "--target-return", str(target), "--seed", "1", *extra]) == 0
    assert f"target return {float(target)} reached" in capsys.readouterr().out
    assert read_metrics(run_dir)[-1]["global_step"] < budget


@pytest.mark.parametrize("env_id", ["HalfCheetah-v4", "CartPole-v1", "Taxi-v3"])
def test_mlp_policies_compute_exactly_what_their_layers_do(env_id):
    """GaussianMLP and MLP run their layers' ops without the per-layer module calls (policy._run): the
    outputs equal the nn.Sequential's bit for bit, on flat and one-hot (state index) observations."""
    info = env_info(env_id)
    torch.manual_seed(0)
    policy = make_policy(info)
    obs = (torch.randint(0, info.obs_classes, (5,)) if info.obs_classes else torch.randn(5, *info.obs_shape))
    dist, value = policy(obs)
    heads = (policy.actor_mean, policy.critic) if info.continuous else (policy.actor, policy.critic)
    expected = heads[0](obs if info.obs_classes else obs.float())
    assert torch.equal(dist[:, : expected.shape[1]], expected)
    assert torch.equal(value, heads[1](obs if info.obs_classes else obs.float()).squeeze(-1))
