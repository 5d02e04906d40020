"""Your own environment: a Gymnasium env (gym: ids, factories) and envs on the device (torch:, the DeviceEnv
protocol) train through the same loop, evaluate, film, resume exactly and plot; bad input is one line before any
folder exists."""

from __future__ import annotations

import os
import re

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.spaces import Box, Discrete, MultiDiscrete
from gymnasium.vector import AutoresetMode
from helpers import read_metrics, without_timings

import fastppo
from fastppo.cli import main
from fastppo.config import Config, ConfigError
from fastppo.devenv import HostView
from fastppo.envs import EnvError, env_info, make_envs
from fastppo.envs_torch import CartPole
from fastppo.normalize import Normalizers, ObsNormalizer, RewardScaler
from fastppo.policy import make_policy
from fastppo.rollout import Collector, DeviceCollector, Rollout, RowLayout

CPU = torch.device("cpu")


class Sign(gymnasium.Env):
    """Say the observation's sign: it is -1 or +1, action 1 says +, 0 says -, reward 1 when right. An episode is
    `length` steps, ended by truncation. The best return is `length`, a random policy's half of it."""

    observation_space = Box(-1.0, 1.0, (1,), np.float32)
    action_space = Discrete(2)
    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, render_mode: str | None = None, length: int = 8):
        self.render_mode, self.length = render_mode, length

    def _draw(self) -> np.ndarray:
        self.x = float(self.np_random.choice([-1.0, 1.0]))
        return np.array([self.x], dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._draw(), {}

    def step(self, action):
        reward = float(int(action) == int(self.x > 0))
        self.t += 1
        return self._draw(), reward, False, self.t >= self.length, {}

    def render(self) -> np.ndarray:
        return np.full((16, 16, 3), 255 if self.x > 0 else 0, dtype=np.uint8)


gymnasium.register("FastppoTest/Sign-v0", entry_point=Sign)


class Reach:
    """A device env with Box actions: observe a target in [-1, 1], reward -|action - target|, 5-step episodes
    (NEXT_STEP autoreset). `fault` breaks one rule of the protocol, for the refusals."""

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP}
    single_observation_space = Box(-1.0, 1.0, (1,), np.float32)
    single_action_space = Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self, num_envs: int, device, fault: str = ""):
        if fault == "raise":
            raise RuntimeError("no simulator here")
        if fault == "autoreset":
            self.metadata = {"autoreset_mode": AutoresetMode.SAME_STEP}
        self.num_envs, self.device, self.fault = num_envs, torch.device(device), fault
        self.generator = torch.Generator(self.device)
        self.steps = torch.zeros(num_envs, dtype=torch.int64, device=self.device)
        self.done = torch.zeros(num_envs, dtype=torch.bool, device=self.device)

    def _targets(self) -> torch.Tensor:
        return torch.rand((self.num_envs, 1), device=self.device, generator=self.generator) * 2 - 1

    def reset(self, *, seed=None):
        if seed is not None:
            self.generator.manual_seed(seed)
        self.target, self.steps, self.done = self._targets(), self.steps.zero_(), self.done.zero_()
        return self.target, {}

    def step(self, actions):
        reward = torch.where(self.done, 0.0, -(actions - self.target).abs().squeeze(1))
        self.steps = torch.where(self.done, 0, self.steps + 1)
        truncated = (self.steps >= 5) & ~self.done
        self.target, self.done = self._targets(), truncated
        terminated = torch.zeros_like(truncated)
        if self.fault == "device":
            reward = reward.to("meta")
        elif self.fault == "shape":
            reward = reward.unsqueeze(1)
        elif self.fault == "dtype":
            terminated = terminated.float()
        return self.target, reward, terminated, truncated, {}


class Dice(gymnasium.Env):
    """Two dice to set at once: a MultiDiscrete action space, which fastppo's policies do not have."""

    observation_space = Box(-1.0, 1.0, (1,), np.float32)
    action_space = MultiDiscrete([6, 6])


def broken():
    raise RuntimeError("the simulator's licence expired")


def same_step(num_envs: int):
    return gymnasium.vector.SyncVectorEnv([Sign] * num_envs, autoreset_mode=AutoresetMode.SAME_STEP)


SIGN = ["--env-id", "gym:test_ownenv:FastppoTest/Sign-v0", "--num-envs", "8", "--num-steps", "16",
        "--learning-rate", "1e-3", "--device", "cpu"]
CARTPOLE = ["--env-id", "torch:CartPole-v1", "--num-envs", "64", "--num-steps", "32", "--learning-rate", "1e-3",
            "--device", "cpu"]


# --- training to a target --------------------------------------------------------------------------------------
def test_a_gymnasium_env_of_this_module_trains_to_its_target_through_the_cli_and_the_api(tmp_path, capsys):
    run = tmp_path / "cli"
    assert main(["train", *SIGN, "--target-return", "7.5", "--total-timesteps", "20000", "--run-dir", str(run)]) == 0
    assert read_metrics(run)[-1]["charts/recent_return"] >= 7.5
    assert main(["eval", str(run), "--episodes", "4", "--greedy"]) == 0
    assert "score  mean 8.00" in capsys.readouterr().out
    assert main(["plot", str(run), "--out", str(tmp_path / "sign.png")]) == 0
    assert (tmp_path / "sign.png").stat().st_size > 0

    cfg = Config(device="cpu", num_envs=8, num_steps=16, learning_rate=1e-3, target_return=7.5,
                 total_timesteps=20000, run_dir=str(tmp_path / "api"))
    out = fastppo.train(cfg, env=Sign)  # a gymnasium.Env class: fastppo makes num_envs of them
    assert out["stopped_by"] == "target_return"
    agent = fastppo.load(tmp_path / "api", device="cpu")
    assert agent.config["env_id"] == "gym:test_ownenv:Sign"  # imports by name: the run can be made again
    env = fastppo.make_env(agent)
    obs, _ = env.reset()
    score, done = 0.0, False
    while not done:
        obs, reward, terminated, truncated, _ = env.step(agent.act(obs, deterministic=True))
        score, done = score + reward[0], terminated[0] or truncated[0]
    assert score == 8.0


def test_the_torch_cartpole_trains_to_475_on_the_cpu(tmp_path, capsys):
    """64 envs of fastppo.envs_torch.CartPole on the CPU, the device collector: 475 in about 150k-210k steps (six
    seeds), seconds of training."""
    run = tmp_path / "cartpole"
    assert main(["train", *CARTPOLE, "--target-return", "475", "--seed", "1", "--run-dir", str(run)]) == 0
    metrics = read_metrics(run)
    assert metrics[-1]["charts/recent_return"] >= 475 and metrics[-1]["global_step"] <= 400_000
    assert main(["eval", str(run), "--episodes", "2", "--greedy"]) == 0  # full games through devenv.HostView
    assert float(re.search(r"score  mean ([\d.]+)", capsys.readouterr().out).group(1)) >= 300
    assert main(["plot", str(run), "--out", str(tmp_path / "cartpole.png")]) == 0


# --- the torch CartPole is Gymnasium's ------------------------------------------------------------------------
def test_the_torch_cartpole_is_gymnasiums_cartpole():
    """From the same state and with the same actions, the torch CartPole follows Gymnasium's CartPoleEnv to
    rounding, terminates at the same step, truncates at its limit, and resets as NEXT_STEP says."""
    n, rng = 5, np.random.default_rng(0)
    env = CartPole(n, "cpu", max_episode_steps=30)
    env.reset(seed=1)
    reference = [gymnasium.make("CartPole-v1").unwrapped for _ in range(n)]
    for i, ref in enumerate(reference):
        ref.reset(seed=i)
        ref.state = env.state[i].numpy().copy()
    ended = np.zeros(n, dtype=bool)
    for t in range(40):
        actions = rng.integers(0, 2, n)
        obs, reward, terminated, truncated, _ = env.step(torch.from_numpy(actions))
        for i, ref in enumerate(reference):
            if ended[i]:  # the step after the end: the action ignored, reward 0, a fresh start
                assert reward[i] == 0 and not terminated[i] and not truncated[i], (t, i)
                assert (obs[i].abs() <= 0.05).all()
                ended[i] = False
                ref.reset()
                ref.state = env.state[i].numpy().copy()
                continue
            ref_obs, ref_reward, ref_terminated, _, _ = ref.step(int(actions[i]))
            np.testing.assert_allclose(obs[i].numpy(), ref_obs, rtol=1e-6, atol=1e-6)
            assert reward[i] == ref_reward == 1.0 and bool(terminated[i]) == ref_terminated, (t, i)
            assert bool(truncated[i]) == (int(env.steps[i]) == 30 and not ref_terminated)
            ended[i] = bool(terminated[i] or truncated[i])
    assert env.render(0).shape == (400, 600, 3)


# --- the device collector -------------------------------------------------------------------------------------
@pytest.mark.usefixtures("one_torch_thread")
def test_the_device_collector_writes_the_rows_the_host_collector_writes():
    """The same envs, policy and noise through the sync Collector (the device env behind its numpy HostView) and
    through the DeviceCollector: byte-identical rollouts (observations and rewards normalised on the way, episode
    ends and autoreset steps in them), the same games, statistics and action log."""
    T, N = 37, 11
    info = env_info("torch:CartPole-v1")

    def collect(device_side: bool):
        torch.manual_seed(0)
        policy = make_policy(info)
        norms = Normalizers(ObsNormalizer(info.obs_shape, CPU), RewardScaler(N, 0.99, CPU))
        envs = make_envs(info, N, seed=3, max_episode_steps=20, device=CPU)
        collector = (DeviceCollector(envs, info, CPU, norms=norms) if device_side
                     else Collector(HostView(envs), info, CPU, norms=norms))
        buf = Rollout.allocate(info, T, N, CPU)
        torch.manual_seed(1)
        out = []
        for _ in range(2):
            collector.collect(policy, buf)
            out.append((buf.store.clone(), collector.stats.pop()))
        return out, collector.state(), norms.state_dict()

    host, device = collect(False), collect(True)
    for (a, games_a), (b, games_b) in zip(host[0], device[0], strict=True):
        assert torch.equal(a, b)
        assert games_a == games_b and len(games_a[0]) > 10
    assert 20 in games_b[1] and not RowLayout.of(info).views(b)["valid"].all()  # truncations, autoreset steps
    assert np.array_equal(host[1]["actions"], device[1]["actions"]) and host[1]["actions"].shape == (2 * T, N)
    assert torch.equal(host[1]["reward_returns"], device[1]["reward_returns"])
    assert all(torch.equal(x, y) for x, y in zip(host[2]["obs"].values(), device[2]["obs"].values(), strict=True))


# --- resume, eval, video, overlap -----------------------------------------------------------------------------
@pytest.mark.parametrize("env_args", [
    pytest.param(["--env-id", "gym:FastppoTest/Sign-v0", "--num-envs", "3"], id="gymnasium"),
    pytest.param(["--env-id", "torch:CartPole-v1", "--num-envs", "16"], id="torch-cartpole"),
    pytest.param(["--env-id", "torch:test_ownenv:Reach", "--num-envs", "4", "--num-minibatches", "4",
                  "--update-epochs", "2"], id="device-box-actions"),
])
def test_a_resumed_run_on_its_own_env_matches_an_uninterrupted_one(tmp_path, env_args, capsys):
    """Two iterations, then a resume to four (the envs made again with the run's seed, the action log replayed):
    every metric but the wall-clock ones equals the uninterrupted run's, and so do the weights."""
    args = ["train", *env_args, "--num-steps", "16", "--no-anneal-lr", "--device", "cpu", "--seed", "4"]
    batch = int(env_args[env_args.index("--num-envs") + 1]) * 16
    assert main([*args, "--total-timesteps", str(4 * batch), "--run-dir", str(tmp_path / "straight")]) == 0
    assert main([*args, "--total-timesteps", str(2 * batch), "--run-dir", str(tmp_path / "split")]) == 0
    assert main(["train", "--resume", str(tmp_path / "split"), "--total-timesteps", str(4 * batch)]) == 0
    capsys.readouterr()

    def comparable(run):
        return [{k: v for k, v in m.items() if k != "num_iterations"} for m in without_timings(read_metrics(run))]

    assert comparable(tmp_path / "split") == comparable(tmp_path / "straight")
    a, b = fastppo.load(tmp_path / "straight", device="cpu"), fastppo.load(tmp_path / "split", device="cpu")
    assert all(torch.equal(x, y) for x, y in zip(a.policy.state_dict().values(), b.policy.state_dict().values(),
                                                 strict=True))


@pytest.mark.parametrize("env_id", ["gym:test_ownenv:Sign", "torch:CartPole-v1"])
def test_eval_films_a_game_and_overlap_collects_in_the_background(tmp_path, env_id, capsys):
    run = tmp_path / "run"
    assert main(["train", "--env-id", env_id, "--device", "cpu", "--num-envs", "4", "--num-steps", "16",
                 "--total-timesteps", "192", "--overlap", "--eval-every", "2", "--eval-episodes", "2",
                 "--capture-video", "--run-dir", str(run)]) == 0
    assert [m["iteration"] for m in read_metrics(run)] == [1, 2, 3]
    assert os.path.getsize(run / "videos" / "eval_0000002.mp4") > 0
    assert main(["eval", str(run), "--episodes", "1", "--video"]) == 0
    assert "video:" in capsys.readouterr().out


def test_a_factory_without_an_import_path_is_named_by_its_label_and_given_again(tmp_path, capsys):
    """A lambda (a notebook's factory) cannot be made from config.json: the run says python:<lambda>, fastppo eval
    refuses it in one line, and the API takes the same env= again to load, play and resume it."""
    def make(num_envs):
        return gymnasium.vector.SyncVectorEnv([lambda: Sign(length=4)] * num_envs)

    run = tmp_path / "run"
    fastppo.train(Config(device="cpu", num_envs=2, num_steps=16, total_timesteps=64, run_dir=str(run)), env=make)
    assert main(["eval", str(run), "--episodes", "1"]) == 2
    err = capsys.readouterr().err
    assert "python:" in err and "env=" in err and len(err.strip().splitlines()) == 1
    agent = fastppo.load(run, device="cpu", env=make)
    assert agent.config["env_id"].startswith("python:") and fastppo.make_env(agent).reset()[0].shape == (1, 1)
    out = fastppo.train(Config(resume=str(run), total_timesteps=128), env=make)
    assert out["iteration"] == 4
    with pytest.raises(EnvError, match="trained on --env-id"):
        fastppo.train(Config(resume=str(run), total_timesteps=192), env=Sign)


# --- bad input: one line, before any folder -------------------------------------------------------------------
@pytest.mark.parametrize("fields,env,error,message", [
    (dict(env_id="gym:NoSuchEnv-v0"), None, EnvError, "Gymnasium has no such id"),
    (dict(env_id="gym:CartPol-v1"), None, EnvError, "close names: CartPole-v1"),
    (dict(env_id="gym:test_ownenv:Nothing"), None, EnvError, "'test_ownenv' has no 'Nothing'"),
    (dict(env_id="torch:no_such_module:Env"), None, EnvError, "cannot import 'no_such_module'"),
    (dict(env_id="torch:CartPol-v1"), None, EnvError, "fastppo's device envs are CartPole-v1"),
    (dict(env_id="pkg:Env-v0"), None, EnvError, "an id with a colon is gym:"),
    ({}, broken, EnvError, "cannot be made: RuntimeError: the simulator's licence expired"),
    ({}, Dice, EnvError, "MultiDiscrete([6 6]) action space; fastppo trains on Discrete and 1-D Box"),
    ({}, same_step, EnvError, "autoreset mode SameStep; fastppo trains on NEXT_STEP"),
    ({}, 42, EnvError, "env= must be a factory"),
    (dict(env_kwargs=("fault=raise",)), Reach, EnvError, "cannot be made on cpu: RuntimeError: no simulator here"),
    (dict(env_kwargs=("fault=autoreset",)), Reach, EnvError, "autoreset mode SameStep"),
    (dict(env_kwargs=("fault=device",)), Reach, EnvError,
     "returned rewards as a (2,) float32 tensor on meta; fastppo needs a (2,) float tensor on cpu"),
    (dict(env_kwargs=("fault=shape",)), Reach, EnvError, "returned rewards as a (2, 1) float32 tensor"),
    (dict(env_kwargs=("fault=dtype",)), Reach, EnvError, "returned terminated as a (2,) float32 tensor on cpu; "
                                                          "fastppo needs a (2,) bool tensor"),
    (dict(env_kwargs=("colour=red",)), Reach, EnvError, "unexpected keyword argument 'colour'"),
    (dict(env_id="torch:CartPole-v1", async_envs=True), None, ConfigError, "--async-envs is EnvPool's send/recv"),
    (dict(env_id="gym:CartPole-v1", env_threads=1), None, ConfigError, "--env-threads sets EnvPool's threads"),
    (dict(env_id="CartPole-v1"), Sign, ConfigError, "both name the env"),
], ids=lambda v: None)
def test_bad_input_is_one_line_before_any_folder(tmp_path, fields, env, error, message):
    with pytest.raises(error) as caught:
        fastppo.train(Config(device="cpu", run_dir=str(tmp_path / "run"), **fields), env=env)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert os.listdir(tmp_path) == []


def test_bad_input_on_the_command_line_is_exit_2(tmp_path, capsys):
    for args in (["--env-id", "gym:NoSuchEnv-v0"], ["--env-id", "torch:CartPole-v1", "--async-envs"],
                 ["--env-id", "gym:test_ownenv:Sign", "--env-kwargs", "length=x"]):
        assert main(["train", *args, "--device", "cpu", "--run-dir", str(tmp_path / "run")]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []


def test_a_gymnasium_async_vector_env_trains_as_the_sync_one(tmp_path):
    """--env-kwargs vectorization_mode=async steps the envs in Gymnasium's AsyncVectorEnv (processes): same seed,
    same games and losses as the SyncVectorEnv run."""
    runs = {}
    for mode in ("sync", "async"):
        run = tmp_path / mode
        assert main(["train", "--env-id", "gym:CartPole-v1", "--env-kwargs", f"vectorization_mode={mode}",
                     "--num-envs", "4", "--num-steps", "64", "--total-timesteps", "768", "--device", "cpu",
                     "--run-dir", str(run)]) == 0
        runs[mode] = without_timings(read_metrics(run))
    assert len(runs["async"]) == 3 and runs["async"] == runs["sync"]
