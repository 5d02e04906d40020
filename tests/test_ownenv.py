"""Your own environment: a Gymnasium env (gym: ids, factories) trains through the same loop, evaluates, films,
resumes exactly and plots; bad input is one line before any folder exists."""

from __future__ import annotations

import os

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
from fastppo.envs import EnvError


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


# --- resume, eval, video, overlap -----------------------------------------------------------------------------
@pytest.mark.parametrize("env_args", [
    pytest.param(["--env-id", "gym:FastppoTest/Sign-v0", "--num-envs", "3"], id="gymnasium"),
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


@pytest.mark.parametrize("env_id", ["gym:test_ownenv:Sign"])
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
    (dict(env_id="gym:no_such_module:Env"), None, EnvError, "cannot import 'no_such_module'"),
    (dict(env_id="pkg:Env-v0"), None, EnvError, "an id with a colon is gym:"),
    ({}, broken, EnvError, "cannot be made: RuntimeError: the simulator's licence expired"),
    ({}, Dice, EnvError, "MultiDiscrete([6 6]) action space; fastppo trains on Discrete and 1-D Box"),
    ({}, same_step, EnvError, "autoreset mode SameStep; fastppo trains on NEXT_STEP"),
    ({}, 42, EnvError, "env= must be a factory"),
    (dict(env_id="gym:CartPole-v1", async_envs=True), None, ConfigError, "--async-envs is EnvPool's send/recv"),
    (dict(env_id="gym:CartPole-v1", env_threads=1), None, ConfigError, "--env-threads sets EnvPool's threads"),
    (dict(env_id="CartPole-v1"), Sign, ConfigError, "both name the env"),
], ids=lambda v: None)
def test_bad_input_is_one_line_before_any_folder(tmp_path, fields, env, error, message):
    with pytest.raises(error) as caught:
        fastppo.train(Config(device="cpu", run_dir=str(tmp_path / "run"), **fields), env=env)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert os.listdir(tmp_path) == []


def test_bad_input_on_the_command_line_is_exit_2(tmp_path, capsys):
    for args in (["--env-id", "gym:NoSuchEnv-v0"], ["--env-id", "gym:CartPole-v1", "--async-envs"],
                 ["--env-id", "gym:test_ownenv:Sign", "--env-kwargs", "length=x"]):
        assert main(["train", *args, "--device", "cpu", "--run-dir", str(tmp_path / "run")]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []
