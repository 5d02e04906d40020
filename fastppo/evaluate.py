"""Evaluation: full games with a trained policy, their scores, and an MP4 of one of them.

``fastppo eval runs/<name>`` loads the run's newest (or a named) checkpoint and plays full games:
Atari with all lives (no episodic life) and raw, unclipped scores. The games are split over a small
env pool with a fixed quota per env (each env plays its first k games), so short games are not
over-represented. ``--video`` films env 0's first game from EnvPool's ``render()``, the real screen in
colour (210x160 for Atari, 400x600 for CartPole), and writes an MP4.

During training, ``--eval-every`` calls :func:`play` between iterations on a fresh pool of a few envs
seeded from the run seed and the iteration, with its own torch generator: training envs and the
training RNG are untouched, so evaluation changes neither the run's results nor its resume.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import tyro
from torch import nn

from fastppo.config import ConfigError
from fastppo.envs import EnvInfo, make_envs
from fastppo.policy import act

EVAL_SEED_OFFSET = 1_000_000  # eval pools never share a seed with the training envs (seed .. seed + N - 1)


@dataclass
class EvalConfig:
    run: tyro.conf.Positional[str]
    """run folder (runs/<name>), or one of its checkpoint files"""
    checkpoint: str | None = None
    """checkpoint file to load (default: the run's newest)"""
    episodes: int = 10
    """full games to play"""
    video: bool = False
    """write an MP4 of the first game to <run>/videos/ (and log it to the run's W&B run when tracked)"""
    greedy: bool = False
    """act with the most likely action instead of sampling"""
    num_envs: int | None = None
    """envs playing in parallel (default min(episodes, 8))"""
    seed: int = EVAL_SEED_OFFSET
    """seed of the eval envs (env i gets seed + i) and of the action sampling"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """device of the policy"""
    track: bool = True
    """when the run is tracked, log the scores (and video) to its W&B run"""


@dataclass
class Games:
    returns: np.ndarray  # (episodes,) full-game scores
    lengths: np.ndarray  # (episodes,) agent steps
    frames: list[np.ndarray]  # (H, W, 3) uint8 of env 0's first game; empty without video


def play(
    policy: nn.Module, info: EnvInfo, episodes: int, seed: int, device: torch.device, *,
    num_envs: int | None = None, greedy: bool = False, video: bool = False,
    max_episode_steps: int | None = None, repeat_action_probability: float = 0.0,
) -> Games:
    """Play `episodes` full games; env i of min(num_envs, episodes) plays a fixed quota of them."""
    n = min(num_envs or 8, episodes)
    quota = np.array([episodes // n + (i < episodes % n) for i in range(n)])
    envs = make_envs(info, n, seed, max_episode_steps=max_episode_steps,
                     repeat_action_probability=repeat_action_probability, episodic_life=False, reward_clip=False,
                     render_mode="rgb_array" if video else None)
    generator = torch.Generator(device=device).manual_seed(seed)
    returns: list[list[float]] = [[] for _ in range(n)]
    lengths: list[list[int]] = [[] for _ in range(n)]
    running = np.zeros(n)
    frames: list[np.ndarray] = []
    filming = video
    try:
        obs, _ = envs.reset()
        if filming:
            frames.append(envs.render(env_ids=[0])[0])
        while any(len(r) < q for r, q in zip(returns, quota, strict=True)):
            obs_t = torch.from_numpy(obs).to(device)
            if greedy:
                with torch.no_grad():
                    action = policy(obs_t)[0].argmax(-1)
            else:
                action = act(policy, obs_t, generator)[0]
            obs, reward, terminated, truncated, step_info = envs.step(action.cpu().numpy())
            running += step_info["reward"] if info.is_atari else reward
            if filming:
                frames.append(envs.render(env_ids=[0])[0])
            for i in np.flatnonzero(terminated | truncated):
                if len(returns[i]) < quota[i]:
                    returns[i].append(float(running[i]))
                    lengths[i].append(int(step_info["elapsed_step"][i]))
                running[i] = 0.0
                filming = filming and i != 0
    finally:
        envs.close()
    return Games(np.array(sum(returns, [])), np.array(sum(lengths, [])), frames)


def eval_metrics(policy: nn.Module, info: EnvInfo, cfg, iteration: int, device: torch.device) -> dict:
    """--eval-every during training: eval/* metrics of cfg.eval_episodes sampled full games."""
    games = play(policy, info, cfg.eval_episodes, cfg.seed + EVAL_SEED_OFFSET + iteration, device,
                 num_envs=4, max_episode_steps=cfg.max_episode_steps,
                 repeat_action_probability=cfg.repeat_action_probability)
    return {"eval/episodic_return": float(games.returns.mean()),
            "eval/episodic_return_std": float(games.returns.std()),
            "eval/episodic_length": float(games.lengths.mean())}


def write_video(frames: list[np.ndarray], path: str, fps: int) -> None:
    import imageio

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    # yuv420p (what every player reads) needs even sizes; EnvPool's screens are even already.
    imageio.mimwrite(path, frames, fps=fps, codec="libx264", pixelformat="yuv420p", macro_block_size=2)


def run_folder(path: str) -> str:
    """The run folder of a run folder or of one of its checkpoint files (<run>/checkpoints/ckpt_*.pt)."""
    if os.path.isdir(path):
        return path
    parent = os.path.dirname(os.path.abspath(path))
    return os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else parent


def run_eval(ecfg: EvalConfig, stream=None) -> Games:
    """``fastppo eval``: print the scores; write (and log) the video. Raises ConfigError / CheckpointError."""
    import sys

    from fastppo.checkpoint import CheckpointError, load_checkpoint, non_finite
    from fastppo.envs import env_info
    from fastppo.policy import make_policy
    from fastppo.tracking import Tracker, tracked_run, wandb_installed

    stream = stream if stream is not None else sys.stdout
    if ecfg.episodes <= 0:
        raise ConfigError(f"--episodes must be positive, got {ecfg.episodes}")
    if ecfg.num_envs is not None and ecfg.num_envs <= 0:
        raise ConfigError(f"--num-envs must be positive, got {ecfg.num_envs}")
    if ecfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available on this machine (use --device cpu or auto)")
    if ecfg.video:
        try:
            import imageio  # noqa: F401
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise ConfigError("--video needs imageio and imageio-ffmpeg: pip install 'fastppo[video]'") from None
    state = load_checkpoint(ecfg.checkpoint if ecfg.checkpoint is not None else ecfg.run)
    bad = non_finite({"model": state["model"]})
    if bad is not None:
        raise CheckpointError(f"{state['path']!r} holds a non-finite {bad} (the run diverged); evaluate an earlier "
                              f"checkpoint")
    run_dir = run_folder(ecfg.run)
    known = tracked_run(run_dir) if ecfg.track else None  # a damaged record is an error before any game
    cfg = state["config"]
    info = env_info(cfg["env_id"])
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if ecfg.device == "auto" else ecfg.device)
    policy = make_policy(info).to(device)
    try:
        policy.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ConfigError(f"{state['path']!r} does not fit a {cfg['env_id']} policy: "
                          f"{str(e).strip().splitlines()[0]}") from None
    games = play(policy, info, ecfg.episodes, ecfg.seed, device, num_envs=ecfg.num_envs, greedy=ecfg.greedy,
                 video=ecfg.video, max_episode_steps=cfg.get("max_episode_steps"),
                 repeat_action_probability=cfg.get("repeat_action_probability", 0.0))
    r = games.returns
    how = "greedy" if ecfg.greedy else "sampled"
    print(f"{cfg['env_id']}  {os.path.basename(state['path'])} (global step {state['global_step']:,})  "
          f"{len(r)} full games, {how} actions", file=stream)
    print(f"score  mean {r.mean():.2f}  std {r.std():.2f}  min {r.min():.2f}  max {r.max():.2f}  "
          f"(length mean {games.lengths.mean():.1f})", file=stream, flush=True)
    scores = {"eval/episodic_return": float(r.mean()), "eval/episodic_return_std": float(r.std()),
              "eval/episodic_return_min": float(r.min()), "eval/episodic_return_max": float(r.max()),
              "global_step": state["global_step"]}
    video_path = None
    if ecfg.video:
        name = os.path.splitext(os.path.basename(state["path"]))[0]
        video_path = os.path.join(run_dir, "videos", f"{name}_{how}.mp4")
        write_video(games.frames, video_path, fps=15 if info.is_atari else 50)  # Atari: 60 Hz / frame skip 4
        print(f"video: {video_path} ({len(games.frames)} frames of game 1, score {r[0]:.2f})", file=stream)
    if known is not None and wandb_installed():
        tracker = Tracker.start(run_dir, project=known["project"], entity=known["entity"], job_type="eval")
        if video_path is not None:
            tracker.log_video(video_path, scores)
        else:
            tracker.log(scores)
        tracker.finish()
    return games
