"""Evaluation: full games with a trained policy, their scores, and an MP4 of one of them.

``fastppo eval runs/<name>`` loads the run's newest (or a named) checkpoint and plays full games:
Atari with all lives (no episodic life) and raw, unclipped scores. The games are split over a small
env pool with a fixed quota per env (each env plays its first k games), so short games are not
over-represented. ``--video`` films env 0's first game from EnvPool's ``render()``, the real screen in
colour (210x160 for Atari, 400x600 for CartPole), and writes an MP4 (your own env: its renderer's frames,
Gymnasium's ``render_mode="rgb_array"`` or a device env's ``render(env_id)``).

During training, ``--eval-every`` calls :func:`play` between iterations on a fresh pool of a few envs
seeded from the run seed and the iteration, with its own torch generator: training envs and the
training RNG are untouched, so evaluation changes neither the run's results nor its resume.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import tyro
from torch import nn

from fastppo.agent import Agent, load, make_env
from fastppo.checkpoint import check_belongs, run_folder
from fastppo.config import INT32_MAX, ConfigError, check_device, host_memory_available, read_config
from fastppo.envs import EnvInfo, expose_egl, make_envs

EVAL_SEED_OFFSET = 1_000_000  # eval pools never share a seed with the training envs (seed .. seed + N - 1)


@dataclass
class EvalConfig:
    """Play full games with a trained policy and print their scores (and film one with --video)."""

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


def play(agent: Agent, episodes: int, seed: int, *, num_envs: int | None = None, greedy: bool = False,
         video: bool = False) -> Games:
    """Play `episodes` full games with agent on ``agent.make_env``'s envs seeded from `seed`; env i of
    min(num_envs, episodes) plays a fixed quota of them. Actions: sampled from the agent's generator,
    or the most likely with greedy. video: keep env 0's screens of its first game."""
    n = min(num_envs or 8, episodes)
    quota = np.array([episodes // n + (i < episodes % n) for i in range(n)])
    envs = make_env(agent, n, seed, video=video)
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
            obs, reward, terminated, truncated, step_info = envs.step(agent.act(obs, deterministic=greedy))
            running += reward  # raw: the envs play without reward clipping
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


def eval_metrics(policy: nn.Module, info: EnvInfo, cfg, iteration: int, obs_norm=None) -> dict:
    """--eval-every during training: eval/* metrics of cfg.eval_episodes sampled full games, played on a
    fresh pool and with a generator both seeded from (seed, iteration), the observation statistics as
    they are now. With --capture-video the first game of env 0 is filmed into
    <run>/videos/eval_<iteration>.mp4, whose path (relative to the run folder) is eval/video."""
    seed = cfg.seed + EVAL_SEED_OFFSET + iteration
    games = play(Agent(policy, info, cfg.to_dict(), obs_norm, seed=seed), cfg.eval_episodes, seed, num_envs=4,
                 video=cfg.capture_video)
    out = {"eval/episodic_return": float(games.returns.mean()),
           "eval/episodic_return_std": float(games.returns.std()),
           "eval/episodic_length": float(games.lengths.mean())}
    if cfg.capture_video:
        out["eval/video"] = os.path.join("videos", f"eval_{iteration:07d}.mp4")
        write_video(games.frames, os.path.join(cfg.run_dir, out["eval/video"]), fps=video_fps(info))
    return out


# Host memory per env of an eval pool, EnvPool's own (measured with EnvPool 1.2.5: about 1.3 MB per Atari env,
# its emulator; 8 KB per classic-control env; 64 KiB for the others), and per game its score and length in
# Python lists.
ENV_BYTES = {"atari": 3 * 2**19}
BYTES_PER_GAME = 64


def check_eval_memory(info: EnvInfo, episodes: int, num_envs: int | None) -> None:
    """ConfigError when --episodes games on --num-envs envs cannot fit in host memory (they were OOM-killed
    at 23 GB), naming the estimate."""
    n = min(num_envs or 8, episodes)
    per_env = ENV_BYTES.get(info.family, 2**16) + 8 * info.obs_bytes  # + the state queue's and network's copies
    need = n * per_env + episodes * BYTES_PER_GAME
    free = host_memory_available()
    if need > free:
        raise ConfigError(f"--episodes {episodes} on --num-envs {n} need about {need / 2**30:,.1f} GiB, more than the "
                          f"{free / 2**30:,.1f} GiB available in host memory")


def check_video(info: EnvInfo, flag: str, device: object = "cpu") -> None:
    """ConfigError (one line) unless a video of this env can be written here: imageio and its ffmpeg,
    and an env that renders (a device env is tried on `device`)."""
    try:
        import imageio  # noqa: F401
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        raise ConfigError(f"{flag} needs imageio and imageio-ffmpeg: pip install 'fastppo[video]'") from None
    problem = render_problem(info, device)
    if problem is not None:
        raise ConfigError(f"{flag}: {problem}")


# Frames per second of the videos: one frame per agent step, at the env's own pace where it has one.
VIDEO_FPS = {"atari": 15, "classic_control": 50, "box2d": 50, "mujoco": 30, "minigrid": 5}


# What a machine without a working EGL needs for MuJoCo's frames (software rendering; a GPU driver's EGL
# works too).
EGL_FIX = "install EGL: apt install libegl1 libgl1-mesa-dri (or your GPU driver's EGL)"


def render_problem(info: EnvInfo, device: object = "cpu") -> str | None:
    """Why this env cannot be filmed here, or None when it can.

    Toy-text envs have no renderer. MuJoCo's renders through EGL (envs.expose_egl), and where that
    fails EnvPool aborts the process, so one frame is rendered in a child process first (in a
    temporary folder: MuJoCo writes MUJOCO_LOG.TXT into the current one when it fails). Your own env
    (a Gymnasium or device env) renders one frame of one env here: a missing renderer (Gymnasium's
    classic control needs pygame) or a device env without render() is named in one line.
    """
    if info.source != "envpool":
        return own_render_problem(info, device)
    if info.family == "toy_text":
        return f"EnvPool does not render {info.env_id}"
    if info.family == "mujoco":
        import subprocess
        import sys
        import tempfile

        egl = expose_egl()
        if egl is None:
            return f"EnvPool renders {info.env_id} through EGL, and this machine has none: {EGL_FIX}"
        probe = ("import ctypes, envpool, warnings; warnings.filterwarnings('ignore'); "
                 f"ctypes.CDLL({egl!r}, mode=ctypes.RTLD_GLOBAL); "
                 f"e = envpool.make({info.env_id!r}, env_type='gymnasium', num_envs=1, render_mode='rgb_array'); "
                 "e.reset(); e.render(env_ids=[0])")
        with tempfile.TemporaryDirectory() as folder:
            proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                                  cwd=folder)
        if proc.returncode != 0:
            why = next((line.strip()[:120] for line in (proc.stdout + proc.stderr).splitlines()  # MuJoCo: stdout
                        if "OpenGL" in line or "EGL" in line or "ERROR" in line), "the renderer failed")
            return f"EnvPool cannot render {info.env_id} on this machine ({why}): {EGL_FIX}"
    return None


def own_render_problem(info: EnvInfo, device: object) -> str | None:
    """render_problem for a Gymnasium or device env: one env made with render_mode="rgb_array", reset, and one
    frame rendered; the first line of what fails, or None."""
    from fastppo.gymenv import first_line

    envs = None
    try:
        envs = make_envs(info, 1, 0, render_mode="rgb_array", device=device)
        envs.reset()
        frame = np.asarray(envs.render(env_ids=[0])[0])
    except Exception as e:  # whatever the env's renderer raises
        return f"{info.env_id} cannot render here ({first_line(e)})"
    finally:
        if envs is not None:
            envs.close()
    if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
        return f"{info.env_id} renders {frame.shape} {frame.dtype} frames; a video needs (H, W, 3) uint8"
    return None


def video_fps(info: EnvInfo) -> int:
    """Frames per second of a video of this env: its renderer's own pace where it says, else its family's."""
    return info.render_fps or VIDEO_FPS.get(info.family, 30)


def write_video(frames: list[np.ndarray], path: str, fps: int) -> None:
    import imageio

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    # yuv420p (what every player reads) needs even sizes; EnvPool's screens are even already.
    imageio.mimwrite(path, frames, fps=fps, codec="libx264", pixelformat="yuv420p", macro_block_size=2)


def run_eval(ecfg: EvalConfig, stream=None) -> Games:
    """``fastppo eval``: print the scores; write (and log) the video. Raises ConfigError / CheckpointError."""
    import sys

    from fastppo.tracking import Tracker, tracked_run, wandb_installed

    stream = stream if stream is not None else sys.stdout
    if ecfg.episodes <= 0:
        raise ConfigError(f"--episodes must be positive, got {ecfg.episodes}")
    if ecfg.num_envs is not None and not 0 < ecfg.num_envs <= INT32_MAX:
        raise ConfigError(f"--num-envs must be in [1, 2^31), got {ecfg.num_envs}")
    check_device(ecfg.device)
    agent = load(ecfg.checkpoint if ecfg.checkpoint is not None else ecfg.run, ecfg.device, seed=ecfg.seed)
    run_dir = run_folder(ecfg.run)
    if ecfg.checkpoint is not None and os.path.isfile(os.path.join(run_dir, "config.json")):
        # its scores and video go to this run (its videos/, its W&B run): another run's model would lie there
        check_belongs({"config": agent.config, "path": agent.checkpoint}, read_config(run_dir),
                      os.path.join(run_dir, "config.json"))
    known = tracked_run(run_dir) if ecfg.track else None  # a damaged record is an error before any game
    if ecfg.video:
        check_video(agent.info, "--video", agent.device)
    check_eval_memory(agent.info, ecfg.episodes, ecfg.num_envs)
    games = play(agent, ecfg.episodes, ecfg.seed, num_envs=ecfg.num_envs, greedy=ecfg.greedy, video=ecfg.video)
    r = games.returns
    how = "greedy" if ecfg.greedy else "sampled"
    print(f"{agent.info.env_id}  {os.path.basename(agent.checkpoint)} (global step {agent.global_step:,})  "
          f"{len(r)} full games, {how} actions", file=stream)
    print(f"score  mean {r.mean():.2f}  std {r.std():.2f}  min {r.min():.2f}  max {r.max():.2f}  "
          f"(length mean {games.lengths.mean():.1f})", file=stream, flush=True)
    scores = {"eval/episodic_return": float(r.mean()), "eval/episodic_return_std": float(r.std()),
              "eval/episodic_return_min": float(r.min()), "eval/episodic_return_max": float(r.max()),
              "global_step": agent.global_step}
    video_path = None
    if ecfg.video:
        name = os.path.splitext(os.path.basename(agent.checkpoint))[0]
        video_path = os.path.join("videos", f"{name}_{how}.mp4")  # relative to the run folder
        write_video(games.frames, os.path.join(run_dir, video_path), fps=video_fps(agent.info))
        print(f"video: {os.path.join(run_dir, video_path)} ({len(games.frames)} frames of game 1, score {r[0]:.2f})",
              file=stream)
    if known is not None and wandb_installed():
        tracker = Tracker.start(run_dir, project=known["project"], entity=known["entity"], job_type="eval")
        if video_path is not None:
            tracker.log_video(video_path, scores)
        else:
            tracker.log(scores)
        tracker.finish()
    return games
