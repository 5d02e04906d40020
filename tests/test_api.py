"""Using a trained policy, and watching it train: the Python API, checkpoints/best.pt, eval videos during
training, eval lines that the throttle never drops, TensorBoard, the model card and the run's own lines."""

from __future__ import annotations

import glob
import io
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import read_finished_wandb_records, read_metrics, wandb_history

import fastppo
from fastppo.checkpoint import load_checkpoint
from fastppo.cli import main

ROOT = Path(__file__).resolve().parents[1]
CARTPOLE = ["train", "--env-id", "CartPole-v1", "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A CartPole run of 4 iterations with an evaluation every 2 (so best.pt exists)."""
    run_dir = tmp_path_factory.mktemp("runs") / "cartpole"
    assert main([*CARTPOLE, "--run-dir", str(run_dir), "--total-timesteps", "2048", "--eval-every", "2",
                 "--eval-episodes", "2"]) == 0
    return run_dir


def readme_example() -> str:
    """The Python block of the docs' Python API page (the README's quickstart has the same one): it must
    run as it is."""
    text = (ROOT / "docs" / "python-api.md").read_text()
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def test_the_readme_example_plays_a_full_game_and_eval_agrees(trained, capsys, monkeypatch):
    """The example's ten lines, pointed at a real run, play one full game; `fastppo eval` with the same
    seed, one env and one game plays the same game and prints the same score."""
    code = readme_example().replace('"runs/cartpole"', repr(str(trained)))
    assert len([line for line in code.splitlines() if line.strip()]) <= 10
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 (the README's own example)
    score = namespace["score"]
    assert 8 <= score <= 500
    assert f"score {score}" in capsys.readouterr().out
    assert main(["eval", str(trained), "--episodes", "1", "--num-envs", "1", "--seed", "0"]) == 0
    assert f"score  mean {score:.2f}" in capsys.readouterr().out


def test_load_acts_values_and_refuses_bad_input(trained, tmp_path):
    agent = fastppo.load(trained, device="cpu", seed=3)
    env = fastppo.make_env(agent, num_envs=3, seed=5)
    obs, _ = env.reset()
    assert agent.act(obs).shape == (3,) and agent.act(obs).dtype == np.int64
    assert agent.value(obs).shape == (3,) and agent.value(obs).dtype == np.float32
    np.testing.assert_array_equal(agent.act(obs, deterministic=True), agent.act(obs, deterministic=True))
    again = fastppo.load(trained, device="cpu", seed=3)  # same seed, same samples
    np.testing.assert_array_equal(fastppo.load(trained, seed=3).act(obs), again.act(obs))
    env.close()
    best = fastppo.load(trained / "checkpoints" / "best.pt")
    assert best.checkpoint.endswith("best.pt")
    from fastppo.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="does not exist"):
        fastppo.load(tmp_path / "nothing.pt")


def test_the_api_applies_the_runs_normalisation_and_clips_continuous_actions(tmp_path):
    run_dir = tmp_path / "pendulum"
    fastppo.train(fastppo.Config(env_id="Pendulum-v1", device="cpu", num_steps=64, num_minibatches=2,
                                 total_timesteps=128, run_dir=str(run_dir)))
    agent = fastppo.load(run_dir)
    state = load_checkpoint(str(run_dir))
    torch.testing.assert_close(agent.obs_norm.rms.mean, state["normalizer"]["obs"]["mean"].double())
    with torch.no_grad():
        agent.policy.actor_logstd.fill_(3.0)  # samples far outside the [-2, 2] torque bounds
    env = fastppo.make_env(agent, num_envs=4)
    obs, _ = env.reset()
    actions = agent.act(obs)
    assert actions.shape == (4, 1) and np.abs(actions).max() <= 2.0
    raw = agent.observe(obs)  # what the network sees: normalised with the saved statistics
    expected = ((torch.from_numpy(obs).double() - agent.obs_norm.rms.mean) * agent.obs_norm.rms.inv_std).clamp(-10, 10)
    torch.testing.assert_close(raw, expected.float())
    env.close()


def test_the_api_gives_values_in_reward_units_with_norm_value(tmp_path):
    """With --norm-value the network's value output is normalised: Agent.value de-normalises it with the run's
    saved statistics; a checkpoint whose value statistics are damaged is a CheckpointError."""
    from fastppo.checkpoint import CheckpointError, list_checkpoints

    run_dir = tmp_path / "cartpole"
    fastppo.train(fastppo.Config(env_id="CartPole-v1", device="cpu", total_timesteps=1024, norm_value=True,
                                 run_dir=str(run_dir)))
    agent = fastppo.load(run_dir)
    stats = load_checkpoint(str(run_dir))["normalizer"]["value"]
    env = fastppo.make_env(agent, num_envs=3)
    obs, _ = env.reset()
    env.close()
    with torch.no_grad():
        network = agent.policy(agent.observe(obs))[1].double()
    want = network * (stats["m2"] / stats["count"] + 1e-8).sqrt() + stats["mean"]
    np.testing.assert_allclose(agent.value(obs), want.numpy(), rtol=1e-5)
    assert float(stats["mean"]) > 1  # CartPole's returns: the de-normalised values are not the network's
    state = torch.load(list_checkpoints(str(run_dir))[-1], weights_only=True)
    state["normalizer"]["value"]["mean"] = torch.zeros(3, dtype=torch.float64)
    torch.save(state, tmp_path / "damaged.pt")
    with pytest.raises(CheckpointError, match="its value statistics do not load"):
        fastppo.load(tmp_path / "damaged.pt")


def test_best_checkpoint_keeps_the_best_evaluation(trained):
    metrics = read_metrics(trained)
    evals = [m for m in metrics if m.get("eval/episodic_return") is not None]
    assert [m["iteration"] for m in evals] == [2, 4]
    best = max(m["eval/episodic_return"] for m in evals)
    assert evals[-1]["eval/best_return"] == best
    state = load_checkpoint(str(trained / "checkpoints" / "best.pt"))
    assert state["eval_return"] == best
    assert state["iteration"] == next(m["iteration"] for m in evals if m["eval/episodic_return"] == best)
    assert [Path(p).name for p in glob.glob(str(trained / "checkpoints" / "*.pt"))].count("best.pt") == 1


def test_eval_lines_are_never_dropped_by_the_throttle_and_videos_reach_wandb(tmp_path, monkeypatch):
    """--log-seconds 1000 holds back every line but the first and the last; the eval lines go out
    anyway, each with its video (--capture-video) as a W&B video."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    run_dir = tmp_path / "tracked"
    assert main([*CARTPOLE, "--run-dir", str(run_dir), "--total-timesteps", "3072", "--num-steps", "64",
                 "--log-seconds", "1000", "--eval-every", "3", "--eval-episodes", "1", "--capture-video",
                 "--track"]) == 0
    evals = [m for m in read_metrics(run_dir) if m.get("eval/episodic_return") is not None]
    assert [m["iteration"] for m in evals] == [3, 6, 9, 12]
    assert sorted(p.name for p in (run_dir / "videos").iterdir()) == [f"eval_{i:07d}.mp4" for i in (3, 6, 9, 12)]
    [path] = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    rows = wandb_history(read_finished_wandb_records(path))
    assert [r["global_step"] for r in rows if "eval/episodic_return" in r] == [m["global_step"] for m in evals]
    assert sum(1 for r in rows if r.get("eval/video/_type") == "video-file") == 4
    assert len(rows) == 1 + 4  # the first line, and the four eval lines (the last of which is also the last)


def test_tensorboard_files_hold_the_metric_names(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "board"
    assert main([*CARTPOLE, "--run-dir", str(run_dir), "--total-timesteps", "1536", "--tensorboard"]) == 0
    board = EventAccumulator(str(run_dir / "tensorboard"))
    board.Reload()
    tags = set(board.Tags()["scalars"])
    assert {"charts/episodic_return", "charts/SPS", "losses/approx_kl", "losses/value_loss", "perf/iteration"} <= tags
    metrics = read_metrics(run_dir)
    assert [e.step for e in board.Scalars("losses/value_loss")] == [m["global_step"] for m in metrics]
    assert [e.value for e in board.Scalars("losses/value_loss")] == pytest.approx(
        [m["losses/value_loss"] for m in metrics], rel=1e-6)


def test_bad_flags_of_the_outputs_are_one_line(tmp_path, capsys):
    assert main([*CARTPOLE, "--run-dir", str(tmp_path / "r"), "--capture-video"]) == 2
    assert "--capture-video films the --eval-every evaluations" in capsys.readouterr().err
    assert main(["train", "--env-id", "Taxi-v3", "--device", "cpu", "--run-dir", str(tmp_path / "r"),
                 "--eval-every", "1", "--capture-video"]) == 2
    assert "--capture-video: EnvPool does not render Taxi-v3" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_the_run_says_where_it_writes_what_it_rounds_and_how_it_ended(tmp_path, capsys):
    run_dir = tmp_path / "said"
    assert main([*CARTPOLE, "--run-dir", str(run_dir), "--total-timesteps", "1300"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "fastppo: --total-timesteps 1,300 rounds down to 2 iteration(s) of 512 steps: training 1,024 steps"
    assert out[1] == f"fastppo: training CartPole-v1 in {run_dir}"
    assert out[-1].startswith("fastppo: finished after 1,024 steps (iteration 2 of 2), recent return ")
    assert out[-1].endswith(f"; run folder {run_dir}")


def test_the_live_display_ends_on_the_result(tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    monkeypatch.setattr(sys, "stdout", out)
    assert main([*CARTPOLE, "--run-dir", str(tmp_path / "tty"), "--total-timesteps", "1024"]) == 0
    last_frame = out.getvalue().rsplit("fastppo CartPole-v1", 1)[-1]
    assert "finished after 1,024 steps" in last_frame and "phase checkpoint" not in last_frame


def test_model_card(trained):
    card = (trained / "README.md").read_text()
    assert card.startswith("# CartPole-v1: PPO-clip (fastppo)")
    for part in ("`fastppo train --device cpu --env-id CartPole-v1 --eval-episodes 2 --eval-every 2 --run-dir",
                 "| agent steps | 2,048 of 2,048 (iteration 4 of 4) |", "| best evaluation (checkpoints/best.pt) |",
                 f"torch {torch.__version__}", f"fastppo eval {trained}", "fastppo.load("):
        assert part in card, part


def test_help_describes_each_subcommand():
    import subprocess

    out = subprocess.run([sys.executable, "-m", "fastppo", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for name, words in (("train", "PPO (clip or penalty) or TRPO"), ("eval", "full games"),
                        ("plot", "Compare runs"), ("bench", "training speed")):
        assert re.search(rf"{name}\s+.*{re.escape(words.split()[0])}", out), name
        assert words.split()[-1] in out
