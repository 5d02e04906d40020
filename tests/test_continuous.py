"""Continuous control and the other EnvPool spaces: the Gaussian policy's rollouts and update, CleanRL's
observation and reward normalisation (on the device, checkpointed, combined across ranks), exact
resume with them, eval and video, and short learning runs on small envs."""

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
from fastppo.normalize import ObsNormalizer, RewardScaler, RunningMeanStd
from fastppo.policy import make_policy
from fastppo.rollout import Collector

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


def test_observation_normalisation_is_gymnasiums():
    """NormalizeObservation then TransformObservation(clip 10): update with the batch, then normalise."""
    gen = np.random.default_rng(0)
    ours, theirs = ObsNormalizer((3,), torch.device("cpu")), GymRunningMeanStd((3,))
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


def test_reward_scaling_is_gymnasiums_and_skips_envpools_reset_step():
    """NormalizeReward(gamma) then TransformReward(clip 10): G = gamma G (1 - terminated) + r updates the
    return statistics, and the reward is divided by their std; EnvPool's reset step changes nothing."""
    gen = np.random.default_rng(1)
    gamma, n = 0.99, 3
    ours, theirs = RewardScaler(n, gamma, torch.device("cpu")), GymRunningMeanStd()
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


def test_statistics_are_combined_across_ranks(monkeypatch):
    """Two ranks' statistics after sync are those of all their data together, the same on both."""
    data = [torch.randn(30, 4, dtype=torch.float64) * 3 + 1, torch.randn(50, 4, dtype=torch.float64) - 2]
    monkeypatch.setattr(fastppo.distributed, "is_distributed", lambda: True)
    ranks = [RunningMeanStd((4,), torch.device("cpu")) for _ in data]
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


def test_cleanrl_preset_is_ppo_continuous_actions(tmp_path):
    import json

    assert main([*PENDULUM, "--preset", "cleanrl", "--total-timesteps", "2048", "--run-dir", str(tmp_path / "c")]) == 0
    c = json.loads((tmp_path / "c" / "config.json").read_text())
    assert (c["num_envs"], c["num_steps"], c["num_minibatches"], c["update_epochs"], c["learning_rate"]) == (
        1, 2048, 32, 10, 3e-4)
    assert (c["clip_coef"], c["ent_coef"], c["anneal_lr"], c["norm_obs"], c["norm_reward"]) == (0.2, 0.0, True, True,
                                                                                             True)


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
