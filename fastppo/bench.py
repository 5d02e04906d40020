"""``fastppo bench``: training speed against the environment ceiling, in one process and run.

Every measured run is a :class:`fastppo.config.Config`: the bench's own flags are the sweep's
(--num-envs, --seconds, --warmup, --batch-fraction, --out-dir, --name) and every other one is fastppo
train's (:class:`BenchTraining`, with the bench's defaults T = 32, --async-envs, --overlap). Each
point's Config goes through ``prepare.prepare`` (``config.resolve``: the same validation and one-line
errors as train) before anything is measured. For each num_envs of the sweep, each mode for a fixed
number of seconds after a warm-up:

1. EnvPool alone with random actions: synchronous (``step``) and asynchronous (``send``/``recv``
   with the same batch size as the trainer), the ceiling; for a Gymnasium vector env (``gym:``) or an
   env on the device (``torch:``), the env alone, stepped all together (its random actions drawn on the
   device beforehand), the JSON's ``envpool_sync`` (``env_source`` says which kind it was);
2. envs + inference: ``trainer.build``'s envs, networks and collection (``rollout.make_collection``,
   the trainer's seeds and torch thread rule) asked for rollouts, no update;
3. full training: ``trainer.train`` with the same Config, stopped by its --max-seconds, timed from
   its own ``perf/iteration``.

Prints a table (steps/s, training as % of the ceiling, where an iteration's time goes), and
writes ``<name>.json`` (machine, versions, commit, date, settings, every number) and ``<name>.png``
(steps/s vs num_envs on log axes, ceiling drawn) under --out-dir (default ``./fastppo_bench``, in the
current directory: an installed fastppo has no repository to write into).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import io
import json
import math
import os
import platform
import re
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import tyro

from fastppo.config import (
    Config,
    ConfigError,
    default_env_id,
    env_kind,
    given_fields,
    mark_given,
    replace,
    training_device,
)
from fastppo.envs import env_info, make_envs
from fastppo.logger import read_metrics
from fastppo.perf import PHASES
from fastppo.presets import apply_preset

ROOT = Path(__file__).resolve().parents[1]

# Config fields the bench sets for each point (the sweep's num_envs, --batch-fraction's env_batch_size,
# a run long enough for --warmup + --seconds, a temporary folder), and those that have no effect on
# a measurement (naming, logging, tracking, evaluation, stop rules, torchrun): not flags of fastppo bench.
SET_PER_POINT = ("num_envs", "env_batch_size", "total_timesteps", "max_seconds", "run_dir", "resume")
NOT_MEASURED = ("exp_name", "save_every", "target_return", "target_return_games", "log_every", "log_seconds",
                "track", "wandb_project", "wandb_entity", "wandb_group", "wandb_tags", "eval_every",
                "eval_episodes", "capture_video", "dist_timeout", "tensorboard")
TRAINING_FIELDS = tuple(f.name for f in fields(Config) if f.name not in (*SET_PER_POINT, *NOT_MEASURED, "world_size"))


@dataclass
class BenchTraining(Config):
    """The training options of every measured run: fastppo train's (a Config), with the bench's defaults
    (T = 32, --async-envs, --overlap); --preset fills the ones not given, as in fastppo train."""

    num_steps: int = 32
    """steps per env per rollout (T)"""
    async_envs: bool = True
    """step EnvPool asynchronously (send/recv), with --batch-fraction * num_envs envs per recv; the async
    EnvPool ceiling is then the reference"""
    overlap: bool = True
    """update on rollout k while the envs collect rollout k+1 (see fastppo train --help)"""

    num_envs: tyro.conf.Suppress[int | None] = None
    env_batch_size: tyro.conf.Suppress[int | None] = None
    total_timesteps: tyro.conf.Suppress[int | None] = None
    max_seconds: tyro.conf.Suppress[float | None] = None
    run_dir: tyro.conf.Suppress[str | None] = None
    resume: tyro.conf.Suppress[str | None] = None
    exp_name: tyro.conf.Suppress[str] = "fastppo"
    save_every: tyro.conf.Suppress[int] = 0
    target_return: tyro.conf.Suppress[float | None] = None
    target_return_games: tyro.conf.Suppress[int] = 10
    log_every: tyro.conf.Suppress[int] = 1
    log_seconds: tyro.conf.Suppress[float] = 1.0
    track: tyro.conf.Suppress[bool] = False
    wandb_project: tyro.conf.Suppress[str] = "fastppo"
    wandb_entity: tyro.conf.Suppress[str | None] = None
    wandb_group: tyro.conf.Suppress[str | None] = None
    wandb_tags: tyro.conf.Suppress[tuple[str, ...]] = ()
    eval_every: tyro.conf.Suppress[int] = 0
    eval_episodes: tyro.conf.Suppress[int] = 4
    dist_timeout: tyro.conf.Suppress[float] = 600.0
    capture_video: tyro.conf.Suppress[bool] = False
    tensorboard: tyro.conf.Suppress[bool] = False


@dataclass
class BenchConfig:
    """Measure training speed against EnvPool's own (the ceiling), over a sweep of num_envs."""

    num_envs: tuple[int, ...] | None = None
    """the sweep: one measured point per value (None: 64 256 1024 4096 on CUDA, 4 8 16 on CPU)"""
    seconds: float | None = None
    """measured seconds per point and mode, after the warm-up; training measures at least 3
    iterations, longer where they take more (None: 5 on CUDA, 2 on CPU)"""
    warmup: float | None = None
    """warm-up seconds per point and mode, not measured (None: 2 on CUDA, 0.5 on CPU)"""
    batch_fraction: float = 0.5
    """envs per EnvPool recv as a fraction of num_envs, with --async-envs (train's --env-batch-size)"""
    out_dir: str = "fastppo_bench"
    """folder for the JSON and PNG, made if needed (relative to the current directory; a checkout's
    committed results live in bench/results/, given explicitly)"""
    name: str | None = None
    """file name stem (None: bench_<env>_<device name>_<date>)"""
    training: Annotated[BenchTraining, tyro.conf.OmitArgPrefixes] = field(default_factory=BenchTraining)
    """fastppo train's options for every measured run (sizes, algorithm, throughput, device, threads, seed)"""


@dataclass
class Sweep:
    """What resolve_bench checked: the sweep's timing and files, and one prepared run per point."""

    bench: BenchConfig
    device: torch.device
    points: list  # prepare.Prepared, one per num_envs: resolved Config, env info, device
    stem: str  # out_dir/name, without .json / .png


def async_batch(cfg: Config, bench: BenchConfig) -> int:
    """The recv batch of a point's async envs: --batch-fraction of its num_envs (the async ceiling's too)."""
    return max(1, int(cfg.num_envs * bench.batch_fraction))


def point_config(bench: BenchConfig, num_envs: int, env_id: str, given: set[str], kind: str,
                 source: str = "envpool") -> Config:
    """The Config of one point: the training options (the preset for the env's `kind` applied to the
    fields not in `given`, as fastppo train does), then the bench's own settings for the point. Not
    resolved. A Gymnasium or device env (`source`) steps all its envs together: no recv batch (config.resolve
    drops the bench's default --async-envs for it)."""
    values = {name: getattr(bench.training, name) for name in TRAINING_FIELDS}
    cfg = apply_preset(mark_given(Config(**values), given & set(TRAINING_FIELDS)), kind)
    cfg.env_id = env_id
    cfg.num_envs = num_envs
    cfg.env_batch_size = async_batch(cfg, bench) if cfg.async_envs and source == "envpool" else None
    cfg.total_timesteps = num_envs * cfg.num_steps * 1_000_000  # the training run sets its own (see training)
    return cfg


def resolve_bench(bench: BenchConfig, given: set[str] | None = None) -> Sweep:
    """Check every argument and prepare every point, before anything is measured or written.

    given: the training fields the caller set (the command line's flags; None: those bench.training
    was constructed with). Each point's Config goes through prepare.prepare (config.resolve, the
    memory check, the kernels), so a bad value is the same one-line ConfigError as in fastppo train.
    """
    from fastppo.prepare import prepare

    given = given_fields(bench.training) if given is None else set(given)
    device = training_device(bench.training)
    cuda = device.type == "cuda"
    env_id = bench.training.env_id or default_env_id(bench.training.device)
    bench = dataclasses.replace(
        bench,
        num_envs=tuple(bench.num_envs or ((64, 256, 1024, 4096) if cuda else (4, 8, 16))),
        seconds=bench.seconds if bench.seconds is not None else (5.0 if cuda else 2.0),
        warmup=bench.warmup if bench.warmup is not None else (2.0 if cuda else 0.5),
    )
    if not (math.isfinite(bench.seconds) and bench.seconds > 0):
        raise ConfigError(f"--seconds must be a positive number, got {bench.seconds}")
    if not (math.isfinite(bench.warmup) and bench.warmup >= 0):
        raise ConfigError(f"--warmup must be a number >= 0, got {bench.warmup}")
    if not 0 < bench.batch_fraction <= 1:
        raise ConfigError(f"--batch-fraction must be in (0, 1], got {bench.batch_fraction}")
    if len(set(bench.num_envs)) != len(bench.num_envs):
        raise ConfigError(f"--num-envs lists a value twice: {' '.join(map(str, bench.num_envs))}")
    info = env_info(env_id, bench.training.env_kwargs, device=device)  # --env-kwargs may change the spaces
    points = [prepare(point_config(bench, n, env_id, given, env_kind(info), info.source)) for n in bench.num_envs]
    name = bench.name
    if name is None:
        gpu = torch.cuda.get_device_name(device) if cuda else None
        name = "bench_{}_{}_{}".format(re.sub(r"[^A-Za-z0-9_.-]", "_", env_id), (gpu or "cpu").replace(" ", "-"),
                                       datetime.date.today().isoformat())
    if not name or name in (".", "..") or os.sep in name or (os.altsep and os.altsep in name):
        raise ConfigError(f"--name must be a file name (no folder), got {name!r}")
    check_out_dir(bench.out_dir)
    return Sweep(bench, device, points, os.path.join(bench.out_dir, name))


def check_out_dir(path: str) -> None:
    """Make --out-dir (and its parents) if needed; ConfigError when it is not a writable folder."""
    if not path:
        raise ConfigError("--out-dir must not be empty")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--out-dir {path!r} exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out-dir {path!r} cannot be made ({e.strerror or e})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"--out-dir {path!r} is not writable")


def timed(step, warmup: float, seconds: float, sync=lambda: None) -> tuple[float, int]:
    """Run step() (returning the agent steps it made) for warmup, then for seconds: (elapsed, steps). sync()
    waits for work step() queued (a device env's kernels) before each clock reading that counts."""
    end = time.perf_counter() + warmup
    while time.perf_counter() < end:
        step()
    sync()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        steps += step()
    sync()
    return time.perf_counter() - start, steps


def envpool_ceiling(cfg: Config, info, bench: BenchConfig, batch_size: int | None,
                    device: torch.device | None = None) -> float:
    """Agent steps/s of EnvPool alone with random actions, with the point's env settings; async
    (send/recv) when batch_size is given. The same for a Gymnasium vector env (sync), and for a device env
    on `device` (its random actions drawn there beforehand, so that the env alone is timed)."""
    num_envs = cfg.num_envs
    envs = make_envs(info, num_envs, cfg.seed, num_threads=cfg.env_threads, batch_size=batch_size,
                     max_episode_steps=cfg.max_episode_steps, repeat_action_probability=cfg.repeat_action_probability,
                     device=device)
    rng = np.random.default_rng(cfg.seed)
    if info.continuous:  # uniform in the Box
        bank = rng.uniform(info.action_low, info.action_high, (64, num_envs, info.num_actions)).astype(np.float32)
    else:
        bank = rng.integers(0, info.num_actions, (64, num_envs))
    if info.source == "device":
        bank = torch.from_numpy(bank).to(device)
    # a device env's steps are kernels queued on the GPU: the clock counts them once they ran
    on_gpu = info.source == "device" and device.type == "cuda"
    sync = functools.partial(torch.cuda.synchronize, device) if on_gpu else (lambda: None)
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

    try:
        elapsed, steps = timed(step, bench.warmup, bench.seconds, sync)
    finally:
        envs.close()
    return steps / elapsed


def envs_and_inference(prepared, bench: BenchConfig) -> tuple[float, dict, int]:
    """Agent steps/s of the trainer's own envs, networks and collection (trainer.build: its seeds, its
    torch thread rule, rollout.make_collection) asked for rollouts with no update in between; the
    collection phases as fractions; the torch threads it ran with (build sets them; put back after,
    as train does)."""
    from fastppo.distributed import World
    from fastppo.trainer import build

    cfg = prepared.cfg
    threads = torch.get_num_threads()
    session = build(prepared, World())
    collection, timer = session.collection, session.collect_timer
    used = torch.get_num_threads()
    try:
        def step() -> int:
            collection.next()
            collection.refresh(session.policy)  # as the trainer does; with --overlap, waits for the next rollout
            return cfg.batch_size

        step()  # at least one whole rollout of warm-up (allocation, compilation, graph capture)
        timer.read()
        elapsed, steps = timed(step, bench.warmup, bench.seconds)
        if prepared.device.type == "cuda":
            torch.cuda.synchronize()
        phases = timer.read()  # includes the warm-up after the first rollout: used as fractions only
    finally:
        collection.close()
        torch.set_num_threads(threads)
    total = sum(phases.values()) or 1.0
    return steps / elapsed, {k: v / total for k, v in phases.items()}, used


MIN_TRAINING_ITERATIONS = 3


def training_iterations(cfg: Config, bench: BenchConfig, rate: float) -> tuple[int, int]:
    """(warm-up, measured) iterations of a point's training run, from an estimate of its steps/s: the
    first iteration and --warmup seconds' worth are warm-up; --seconds' worth, at least
    MIN_TRAINING_ITERATIONS, are measured. A count, not a clock, ends the run: a point whose iterations
    take longer than expected is still measured over whole iterations, never over one."""
    per_second = max(rate, 1e-9) / cfg.batch_size  # iterations per second
    warmup = 1 + math.ceil(bench.warmup * per_second)
    return warmup, max(MIN_TRAINING_ITERATIONS, math.ceil(bench.seconds * per_second))


def training(prepared, bench: BenchConfig, rate: float) -> tuple[float, dict, int]:
    """Agent steps/s of trainer.train after its warm-up, from its own perf/iteration, over the iterations
    training_iterations gives for the estimated rate (steps/s of envs + inference); phase fractions;
    iterations measured."""
    from fastppo.trainer import train

    cfg = prepared.cfg
    warmup, measured = training_iterations(cfg, bench, rate)
    run = replace(cfg, run_dir=None, total_timesteps=(warmup + measured) * cfg.global_batch_size, max_seconds=None)
    with tempfile.TemporaryDirectory() as tmp:
        run.run_dir = os.path.join(tmp, "run")
        with contextlib.redirect_stdout(io.StringIO()):
            train(run)
        kept = read_metrics(run.run_dir)[warmup:]
    wall = sum(m["perf/iteration"] for m in kept)
    steps = len(kept) * cfg.global_batch_size
    phases = {p: sum(m[f"perf/{p}"] for m in kept) / wall for p in PHASES}
    return steps / wall, phases, len(kept)


def fastppo_commit() -> str:
    """The commit of the fastppo checkout this module runs from ('-dirty' with uncommitted changes), or
    $FASTPPO_COMMIT where it is not a git checkout (a copied tree, an installed package), else
    "unknown". Only the checkout whose top folder holds this package counts: an installed fastppo
    inside another repository (a venv in a project) must not report that project's commit."""
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        if Path(top).resolve() == ROOT.resolve():
            return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                                  text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return os.environ.get("FASTPPO_COMMIT") or "unknown"


def machine() -> dict:
    cpu = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for name in ("envpool", "gymnasium", "triton"):
        with contextlib.suppress(ImportError):
            versions[name] = __import__(name).__version__
    from fastppo import __version__

    versions["fastppo"] = __version__
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": versions,
        "commit": fastppo_commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def settings(sweep: Sweep) -> dict:
    """The JSON's settings: the sweep's and every training option of the first point's resolved Config
    (the fields the bench sets per point are in each point)."""
    cfg, b = sweep.points[0].cfg, sweep.bench
    out = {k: v for k, v in cfg.to_dict().items()
           if k not in (*SET_PER_POINT, *NOT_MEASURED, "batch_size", "minibatch_size", "global_batch_size",
                        "num_iterations", "world_size")}
    out.update(num_envs=list(b.num_envs), seconds=b.seconds, warmup=b.warmup, batch_fraction=b.batch_fraction,
               out_dir=b.out_dir, name=os.path.basename(sweep.stem))
    return out


def run_bench(bench: BenchConfig, given: set[str] | None = None) -> dict:
    """Measure the sweep; print the table; write <name>.json (after every point) and <name>.png.

    given: the training fields the caller set (see resolve_bench). ConfigError before anything is
    measured on a bad argument.
    """
    sweep = resolve_bench(bench, given)
    bench = sweep.bench
    warnings.filterwarnings("ignore", message=".*precision lowered by casting.*")  # gymnasium, on every make
    points = []
    result = {"machine": machine(), "device": str(sweep.device), "settings": settings(sweep), "points": points,
              "env_source": sweep.points[0].info.source}  # envpool, gym or device: what "envpool_*" measured
    sweep_started = time.perf_counter()
    for prepared in sweep.points:
        started = time.perf_counter()
        cfg, info = prepared.cfg, prepared.info
        point = {"num_envs": cfg.num_envs, "batch_size": cfg.recv_batch_size}
        point["envpool_sync"] = envpool_ceiling(cfg, info, bench, None, prepared.device)
        # a Gymnasium or device env has no send/recv: its ceiling is the env alone, stepped all together
        point["envpool_async"] = (envpool_ceiling(cfg, info, bench, async_batch(cfg, bench))
                                  if info.source == "envpool" else None)
        point["ceiling"] = point["envpool_async"] if cfg.async_envs else point["envpool_sync"]
        point["inference"], point["inference_phases"], point["torch_threads"] = envs_and_inference(prepared, bench)
        point["training"], point["training_phases"], point["training_iterations"] = training(
            prepared, bench, point["inference"])
        point["seconds"] = time.perf_counter() - started
        point["training_pct_of_ceiling"] = 100.0 * point["training"] / point["ceiling"]
        points.append(point)
        result["seconds"] = time.perf_counter() - sweep_started  # the whole sweep's wall time so far
        print(f"num_envs {cfg.num_envs}: {SOURCE_NAMES[info.source]} {point['ceiling']:,.0f}  envs+inference "
              f"{point['inference']:,.0f}  training {point['training']:,.0f} steps/s "
              f"({point['training_pct_of_ceiling']:.0f}%)", flush=True)
        with open(sweep.stem + ".json", "w") as f:  # after every point: a sweep cut short keeps what it measured
            json.dump(result, f, indent=2)
            f.write("\n")
    plot(result, sweep.stem + ".png")
    print_table(result)
    print(f"wrote {sweep.stem}.json and {sweep.stem}.png")
    return result


# What the bench calls the env alone (its "envpool_*" numbers), by EnvInfo.source.
SOURCE_NAMES = {"envpool": "EnvPool", "gym": "Gymnasium", "device": "device env"}


def _steps(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    m, s = result["machine"], result["settings"]
    threads = sorted({p["torch_threads"] for p in result["points"] if "torch_threads" in p})
    title = (f"fastppo bench: {s['env_id']}, {m['gpu'] or 'CPU'} / {m['cpu']} ({m['cpu_cores']} cores), "
             f"T={s['num_steps']}, {s['update_epochs']} epochs, async={s['async_envs']}, overlap={s['overlap']}"
             + (f", torch threads {'/'.join(map(str, threads))}" if threads else ""))
    table = Table(title=title)
    alone = SOURCE_NAMES[result.get("env_source", "envpool")]
    for col in ("num_envs", "batch", f"{alone} sync", f"{alone} async", "envs+inference", "training", "% of ceiling",
                "training: " + " / ".join(PHASES) + " (% of iteration)"):
        table.add_column(col, justify="right")
    for p in result["points"]:
        phases = " / ".join(f"{100 * p['training_phases'][k]:.0f}" for k in PHASES)
        table.add_row(str(p["num_envs"]), str(p["batch_size"]), _steps(p["envpool_sync"]), _steps(p["envpool_async"]),
                      _steps(p["inference"]), _steps(p["training"]), f"{p['training_pct_of_ceiling']:.0f}%", phases)
    Console(width=200).print(table)


def plot(result: dict, path: str) -> None:
    """Steps/s against num_envs, both on log axes (log2 x, log10 y): the EnvPool ceiling, envs +
    inference and training side by side however far apart; training's % of the ceiling by its points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullLocator

    from fastppo.plot import si_label

    pts, s, m = result["points"], result["settings"], result["machine"]
    x = [p["num_envs"] for p in pts]
    fig, ax = plt.subplots(figsize=(7.5, 5), layout="constrained")
    alone = SOURCE_NAMES[result.get("env_source", "envpool")]
    ax.plot(x, [p["envpool_sync"] for p in pts], "k--", marker="o", label=f"{alone} alone, sync")
    if all(p["envpool_async"] is not None for p in pts):
        ax.plot(x, [p["envpool_async"] for p in pts], "k-", marker="o", label=f"{alone} alone, async")
    ax.plot(x, [p["inference"] for p in pts], marker="s", label="envs + inference (no update)")
    ax.plot(x, [p["training"] for p in pts], marker="^", label=f"training ({s['update_epochs']} epochs)")
    for p in pts:
        ax.annotate(f"{p['training_pct_of_ceiling']:.0f}%", (p["num_envs"], p["training"]), textcoords="offset points",
                    xytext=(0, -13), ha="center", fontsize=8, color="C1")
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(v) for v in x])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(min(x) / 1.4, max(x) * 1.4)
    ax.set_yscale("log")
    ys = [p[k] for p in pts for k in ("envpool_sync", "envpool_async", "inference", "training") if (p[k] or 0) > 0]
    if ys:
        ax.set_ylim(min(ys) / 1.8, max(ys) * 1.5)  # room for the % labels under the training points
    ax.yaxis.set_major_formatter(FuncFormatter(si_label))
    ax.set_xlabel("num_envs (log2)")
    ax.set_ylabel("agent steps / s (log)")
    ax.set_title(f"{s['env_id']} on {m['gpu'] or 'CPU'} ({m['cpu_cores']} CPU cores), T={s['num_steps']}, "
                 f"async={s['async_envs']}, overlap={s['overlap']}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize=8,
               title="training's % of the ceiling is marked under its points", title_fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


