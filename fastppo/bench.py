"""``fastppo bench``: training speed against the environment ceiling, in one process and run.

For each num_envs of the sweep, each for a fixed number of seconds after a warm-up:

1. EnvPool alone with random actions: synchronous (``step``) and asynchronous (``send``/``recv``
   with the same batch size as the trainer), the ceiling;
2. envs + inference: the trainer's collector and actor filling the rollout, no update;
3. full training: ``trainer.train`` with the same settings, timed from its own ``perf/iteration``.

Prints a table (steps/s, training as % of the ceiling, where an iteration's time goes), and
writes ``<name>.json`` (machine, versions, commit, date, settings, every number) and ``<name>.png``
(steps/s vs num_envs, ceiling drawn) under --out-dir.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import platform
import subprocess
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from fastppo.config import Config, ConfigError, training_device
from fastppo.envs import env_info, make_envs
from fastppo.logger import read_metrics
from fastppo.perf import PHASES, PhaseTimer, learner_forward
from fastppo.policy import Actor, make_policy
from fastppo.rollout import AsyncCollector, Collector

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class BenchConfig:
    env_id: str | None = None
    """EnvPool env id (None: Pong-v5 on CUDA, CartPole-v1 on CPU)"""
    num_envs: tuple[int, ...] | None = None
    """the sweep (None: 64 256 1024 4096 on CUDA, 4 8 16 on CPU)"""
    seconds: float | None = None
    """measured seconds per point and mode, after the warm-up (None: 10 on CUDA, 2 on CPU)"""
    warmup: float | None = None
    """warm-up seconds per point and mode, not measured (None: 3 on CUDA, 0.5 on CPU)"""
    num_steps: int = 32
    """steps per env per rollout (T) for envs + inference and training"""
    update_epochs: int = 4
    """epochs per rollout in the training mode"""
    num_minibatches: int = 4
    """minibatches per epoch in the training mode"""
    async_envs: bool = True
    """collect with EnvPool's send/recv (the async ceiling is then the reference)"""
    batch_fraction: float = 0.5
    """EnvPool batch size as a fraction of num_envs, with --async-envs"""
    overlap: bool = True
    """training mode: update while the envs collect the next rollout"""
    compile: bool = False
    """torch.compile the policy forward"""
    cudagraphs: bool = False
    """CUDA graph of acting (CUDA only)"""
    bf16: bool = False
    """bf16 autocast for the forward passes"""
    env_threads: int = 0
    """EnvPool worker threads (0 = EnvPool's default)"""
    torch_threads: int = 0
    """torch intra-op threads (0 = torch's default)"""
    device: str = "auto"
    """auto, cpu or cuda"""
    out_dir: str = "bench/results"
    """folder for the JSON and PNG"""
    name: str | None = None
    """file name stem (None: bench_<env>_<device name>_<date>)"""
    seed: int = 1
    """seed of envs and weights"""


def resolve_bench(cfg: BenchConfig) -> tuple[BenchConfig, torch.device]:
    device = training_device(Config(device=cfg.device))  # type: ignore[arg-type]
    cuda = device.type == "cuda"
    cfg.env_id = cfg.env_id or ("Pong-v5" if cuda else "CartPole-v1")
    cfg.num_envs = tuple(cfg.num_envs or ((64, 256, 1024, 4096) if cuda else (4, 8, 16)))
    cfg.seconds = cfg.seconds if cfg.seconds is not None else (10.0 if cuda else 2.0)
    cfg.warmup = cfg.warmup if cfg.warmup is not None else (3.0 if cuda else 0.5)
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda, got {cfg.device!r}")
    if any(n <= 0 for n in cfg.num_envs):
        raise ConfigError(f"--num-envs must be positive, got {' '.join(map(str, cfg.num_envs))}")
    if not cfg.seconds > 0 or cfg.warmup < 0:
        raise ConfigError(f"--seconds must be positive and --warmup >= 0, got {cfg.seconds} and {cfg.warmup}")
    if not 0 < cfg.batch_fraction <= 1:
        raise ConfigError(f"--batch-fraction must be in (0, 1], got {cfg.batch_fraction}")
    if cfg.cudagraphs and not cuda:
        raise ConfigError("--cudagraphs needs CUDA; the device is cpu")
    return cfg, device


def recv_batch(cfg: BenchConfig, num_envs: int) -> int:
    return max(1, int(num_envs * cfg.batch_fraction)) if cfg.async_envs else num_envs


def timed(step, warmup: float, seconds: float) -> tuple[float, int]:
    """Run step() (returning the agent steps it made) for warmup, then for seconds: (elapsed, steps)."""
    end = time.perf_counter() + warmup
    while time.perf_counter() < end:
        step()
    steps, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        steps += step()
    return elapsed, steps


def envpool_ceiling(cfg: BenchConfig, info, num_envs: int, batch_size: int | None) -> float:
    """Agent steps/s of EnvPool alone with random actions; async (send/recv) when batch_size is given."""
    envs = make_envs(info, num_envs, cfg.seed, num_threads=cfg.env_threads, batch_size=batch_size)
    rng = np.random.default_rng(cfg.seed)
    bank = rng.integers(0, info.num_actions, (64, num_envs))
    i = 0
    if batch_size is None:
        envs.reset()

        def step() -> int:
            nonlocal i
            envs.step(bank[i % 64])
            i += 1
            return num_envs
    else:
        envs.async_reset()

        def step() -> int:
            nonlocal i
            env_id = envs.recv()[4]["env_id"]
            envs.send(bank[i % 64, : len(env_id)], env_id)
            i += 1
            return len(env_id)

    elapsed, steps = timed(step, cfg.warmup, cfg.seconds)
    envs.close()
    return steps / elapsed


def envs_and_inference(cfg: BenchConfig, info, device: torch.device, num_envs: int) -> tuple[float, dict]:
    """Agent steps/s of the trainer's collector and actor filling rollouts, no update; phase fractions."""
    batch = recv_batch(cfg, num_envs)
    envs = make_envs(info, num_envs, cfg.seed, num_threads=cfg.env_threads,
                     batch_size=batch if cfg.async_envs else None)
    torch.manual_seed(cfg.seed)
    policy = make_policy(info).to(device)
    actor = Actor(policy, learner_forward(policy, cfg.bf16, cfg.compile), cudagraphs=cfg.cudagraphs,
                  graph_batch_sizes=(batch,))
    timer = PhaseTimer(device)
    if cfg.async_envs:
        collector = AsyncCollector(envs, info, device, num_envs, batch, timer=timer)
    else:
        collector = Collector(envs, info, device, timer=timer)
    (buf,) = collector.allocate(cfg.num_steps)

    def step() -> int:
        collector.collect(actor, buf)
        return num_envs * cfg.num_steps

    step()  # at least one whole rollout of warm-up (allocation, compilation, graph capture)
    timer.read()
    elapsed, steps = timed(step, cfg.warmup, cfg.seconds)
    if device.type == "cuda":
        torch.cuda.synchronize()
    phases = timer.read()  # includes the warm-up after the first rollout: used as fractions only
    total = sum(phases.values()) or 1.0
    envs.close()
    return steps / elapsed, {k: v / total for k, v in phases.items()}


def training(cfg: BenchConfig, num_envs: int) -> tuple[float, dict, int]:
    """Agent steps/s of trainer.train after the warm-up, from its perf/iteration; phase fractions."""
    from fastppo.trainer import train

    batch = recv_batch(cfg, num_envs)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = os.path.join(tmp, "run")
        train_cfg = Config(
            env_id=cfg.env_id, num_envs=num_envs, num_steps=cfg.num_steps, update_epochs=cfg.update_epochs,
            num_minibatches=cfg.num_minibatches, total_timesteps=num_envs * cfg.num_steps * 1_000_000,
            async_envs=cfg.async_envs, env_batch_size=batch if cfg.async_envs else None, overlap=cfg.overlap,
            compile=cfg.compile, cudagraphs=cfg.cudagraphs, bf16=cfg.bf16, env_threads=cfg.env_threads,
            device=cfg.device, seed=cfg.seed, run_dir=run_dir, max_seconds=cfg.warmup + cfg.seconds,  # type: ignore[arg-type]
        )
        with contextlib.redirect_stdout(io.StringIO()):
            train(train_cfg)
        lines = read_metrics(run_dir)
    # drop the warm-up: the first iteration always, then iterations until --warmup seconds have passed
    kept, spent = [], 0.0
    for i, m in enumerate(lines):
        if i == 0 or spent < cfg.warmup:
            spent += m["perf/iteration"]
        else:
            kept.append(m)
    kept = kept or lines[-1:]
    wall = sum(m["perf/iteration"] for m in kept)
    steps = len(kept) * num_envs * cfg.num_steps
    phases = {p: sum(m[f"perf/{p}"] for m in kept) / wall for p in PHASES}
    return steps / wall, phases, len(kept)


def machine() -> dict:
    cpu = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for name in ("envpool", "triton"):
        with contextlib.suppress(ImportError):
            versions[name] = __import__(name).__version__
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": versions,
        "commit": commit,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def run_bench(cfg: BenchConfig) -> dict:
    cfg, device = resolve_bench(cfg)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    warnings.filterwarnings("ignore", message=".*precision lowered by casting.*")  # gymnasium, on every make
    info = env_info(cfg.env_id)
    points = []
    result = {"machine": machine(), "device": str(device), "settings": asdict(cfg), "points": points}
    os.makedirs(cfg.out_dir, exist_ok=True)
    gpu = result["machine"]["gpu"]
    name = cfg.name or "bench_{}_{}_{}".format(
        cfg.env_id, (gpu or "cpu").replace(" ", "-"), datetime.date.today().isoformat())
    stem = os.path.join(cfg.out_dir, name)
    for n in cfg.num_envs:
        batch = recv_batch(cfg, n)
        point = {"num_envs": n, "batch_size": batch}
        point["envpool_sync"] = envpool_ceiling(cfg, info, n, None)
        point["envpool_async"] = envpool_ceiling(cfg, info, n, max(1, int(n * cfg.batch_fraction)))
        point["ceiling"] = point["envpool_async"] if cfg.async_envs else point["envpool_sync"]
        point["inference"], point["inference_phases"] = envs_and_inference(cfg, info, device, n)
        point["training"], point["training_phases"], point["training_iterations"] = training(cfg, n)
        point["training_pct_of_ceiling"] = 100.0 * point["training"] / point["ceiling"]
        points.append(point)
        print(f"num_envs {n}: EnvPool {point['ceiling']:,.0f}  envs+inference {point['inference']:,.0f}  "
              f"training {point['training']:,.0f} steps/s ({point['training_pct_of_ceiling']:.0f}%)", flush=True)
        with open(stem + ".json", "w") as f:  # after every point: a sweep cut short keeps what it measured
            json.dump(result, f, indent=2)
            f.write("\n")
    plot(result, stem + ".png")
    print_table(result)
    print(f"wrote {stem}.json and {stem}.png")
    return result


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    m, s = result["machine"], result["settings"]
    title = (f"fastppo bench: {s['env_id']}, {m['gpu'] or 'CPU'} / {m['cpu']} ({m['cpu_cores']} cores), "
             f"T={s['num_steps']}, {s['update_epochs']} epochs, async={s['async_envs']}, overlap={s['overlap']}")
    table = Table(title=title)
    for col in ("num_envs", "batch", "EnvPool sync", "EnvPool async", "envs+inference", "training", "% of ceiling",
                "training: " + " / ".join(PHASES) + " (% of iteration)"):
        table.add_column(col, justify="right")
    for p in result["points"]:
        phases = " / ".join(f"{100 * p['training_phases'][k]:.0f}" for k in PHASES)
        table.add_row(str(p["num_envs"]), str(p["batch_size"]), f"{p['envpool_sync']:,.0f}",
                      f"{p['envpool_async']:,.0f}", f"{p['inference']:,.0f}", f"{p['training']:,.0f}",
                      f"{p['training_pct_of_ceiling']:.0f}%", phases)
    Console(width=200).print(table)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts, s, m = result["points"], result["settings"], result["machine"]
    x = [p["num_envs"] for p in pts]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(x, [p["envpool_sync"] for p in pts], "k--", marker="o", label="EnvPool alone, sync")
    ax.plot(x, [p["envpool_async"] for p in pts], "k-", marker="o", label="EnvPool alone, async")
    ax.plot(x, [p["inference"] for p in pts], marker="s", label="envs + inference")
    ax.plot(x, [p["training"] for p in pts], marker="^", label=f"training ({s['update_epochs']} epochs)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(v) for v in x])
    ax.set_xlabel("num_envs")
    ax.set_ylabel("agent steps / s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{s['env_id']} on {m['gpu'] or 'CPU'} ({m['cpu_cores']} CPU cores)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
