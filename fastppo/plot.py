"""``fastppo plot``: one PNG comparing runs from their config.json and metrics.jsonl, for users without W&B.

Runs are grouped twice:

* by env (config.json's ``env_id``): one row of panels per env, the env named in the row's title;
* within an env, by setting: runs whose config.json differ only in ``seed``, in the run folder's name
  (``run_dir``, ``exp_name``) and in the flags a resume may change (``config.RESUME_FLAGS``: length,
  logging, device, threads) are one group, the runs of one setting. One folder is one run, however
  many launches (resumes) it took. Options the run's algorithm does not read (PPO's for a TRPO run,
  PPO-penalty's for PPO-clip, TRPO's for PPO) are not part of its setting, and a field an older
  config.json lacks counts as its default. A group is labelled by the config fields that differ
  between the groups of its env (``loss=penalty``; ``algo=trpo``), or by its exp_name (one run: its
  folder's name) when its env has one group, and by its seeds; two folders of one setting with the
  same seed are two runs, said in the label and in a warning (:func:`same_seed_warnings`), not
  counted as two seeds.

A group of several runs is drawn as each run's own curve (thin, to its own end: runs of different
lengths are not cut) and their mean (thick) where enough of them have data (:func:`enough`: half of
them, 2 at least); each run's curve is interpolated onto a common x grid over its own range. The band
around the mean is, with --band ci (default), the 95% percentile-bootstrap confidence interval of the
mean over the runs that have data there (:func:`bootstrap_ci`; 3 runs at least, fewer get no band)
and, with --band minmax, the lowest to the highest run.

Three panels per row: the recent return (``charts/recent_return``, the mean of the last
--target-return-games full games, None until that many games ended) against agent steps and
against wall-clock time (``time/elapsed``, in s, min or h by its range), with ``eval/episodic_return``
as markers when the runs evaluated (--eval-every); and the training speed, agent steps per second of
each iteration from its own timing (the iteration's steps over its ``perf/iteration``).
``charts/SPS``, an average since the launch that starts again at a resume, is not drawn. The
legends sit below each row, outside the panels.

Bad input (no run, a folder without metrics.jsonl, a missing or unreadable config.json, a metric
that is not a number, an --out that is not a writable .png path) is one ConfigError line, before
anything is drawn. metrics.jsonl is read by ``logger.read_metrics`` only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import tyro

from fastppo.config import IDENTITY_EXCLUDED, Config, ConfigError, read_config, unread_options, with_added_fields
from fastppo.logger import read_metrics


@dataclass
class PlotConfig:
    """Compare runs in one PNG: recent return against steps and wall-clock time, and steps/s, per env."""

    runs: tyro.conf.Positional[tuple[str, ...]] = ()
    """run folders (runs/<name> ...), each with config.json and metrics.jsonl"""
    out: str = "plot.png"
    """PNG file to write"""
    band: Literal["ci", "minmax"] = "ci"
    """the band around a setting's mean over its runs: ci = the 95% bootstrap confidence interval of
    the mean (3 runs or more), minmax = from the lowest to the highest run (2 or more)"""


# config.json fields that do not make two runs different settings: the seed, the folder's name, the flags
# a resume may change, and the sizes derived from other fields.
NOT_A_SETTING = set(IDENTITY_EXCLUDED) | {"seed", "batch_size", "minibatch_size", "global_batch_size",
                                          "num_iterations"}
FIELD_ORDER = {f.name: i for i, f in enumerate(dataclasses.fields(Config))}
# Defaults of the fields a config.json written by an older fastppo may lack (it counts as the default).
DEFAULTS = {f.name: f.default for f in dataclasses.fields(Config) if f.default is not dataclasses.MISSING}
METRICS = ("charts/recent_return", "time/elapsed", "perf/iteration", "eval/episodic_return")
MAX_POINTS = 400  # points of a group's common grid; a run's own x values are used when fewer
SMOOTH_ABOVE = 200  # iterations: longer runs draw their steps/s as a moving mean over 1% of their iterations
BOOTSTRAP_SAMPLES = 2000  # resamples of the runs per x: the CI's ends move by well under 1% of its width
CI_MIN_RUNS = 3  # fewer runs give no confidence interval worth drawing (their own curves show them)


@dataclass
class Run:
    path: str
    name: str  # the folder's name
    config: dict
    lines: list[dict]

    @property
    def env_id(self) -> str:
        return self.config["env_id"]

    def setting(self) -> dict:
        """The config fields that make this run's setting: everything but NOT_A_SETTING and the options its
        algorithm does not read; a field missing from an older config.json counts as its default."""
        config = with_added_fields({**DEFAULTS, **self.config})
        unused = unread_options(config.get("algo"), config.get("loss"), config.get("lr_schedule"))
        return {k: v for k, v in config.items() if k not in NOT_A_SETTING and k not in unused}

    def series(self, x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of the lines where both are numbers; x is global_step or a metric name."""
        pts = [(m.get(x), m.get(y)) for m in self.lines]
        pts = [(a, b) for a, b in pts if a is not None and b is not None]
        return np.array([a for a, _ in pts], dtype=float), np.array([b for _, b in pts], dtype=float)

    def speed(self) -> tuple[np.ndarray, np.ndarray, int]:
        """(global_step, agent steps/s of that iteration, smoothing window): each iteration's steps
        (the global_step since the previous line, per iteration) over its own perf/iteration."""
        steps, rates = [], []
        prev_step, prev_iter = 0, 0
        for m in self.lines:
            seconds = m.get("perf/iteration")
            iters = m["iteration"] - prev_iter
            if seconds is not None and seconds > 0 and iters > 0:
                steps.append(m["global_step"])
                rates.append((m["global_step"] - prev_step) / iters / seconds)
            prev_step, prev_iter = m["global_step"], m["iteration"]
        x, y = np.array(steps, dtype=float), np.array(rates, dtype=float)
        window = max(1, len(y) // 100) if len(y) > SMOOTH_ABOVE else 1
        if window > 1:  # moving mean, same length (shorter windows at the ends)
            kernel = np.ones(window)
            y = np.convolve(y, kernel, "same") / np.convolve(np.ones_like(y), kernel, "same")
        return x, y, window


# --- reading ---------------------------------------------------------------------------------------


def check_lines(run: str, lines: list[dict]) -> list[dict]:
    """The lines, checked: ConfigError on a value of METRICS that is not a finite number (fastppo writes
    null for no value, never NaN or Infinity), or on a global_step that goes back (two runs in one file)."""
    path = os.path.join(run, "metrics.jsonl")
    previous = None
    out = []
    for m in lines:
        m = dict(m)
        for key in METRICS:
            v = m.get(key)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"{path!r}: {key} is {v!r} at iteration {m['iteration']}, not a finite number")
        if previous is not None and m["global_step"] <= previous["global_step"]:
            raise ConfigError(f"{path!r}: global_step goes from {previous['global_step']} back to {m['global_step']} "
                              f"at iteration {m['iteration']} (two runs in one file?)")
        previous = m
        out.append(m)
    return out


def load_runs(paths: tuple[str, ...] | list[str]) -> list[Run]:
    """Every run folder, read and checked (a folder named twice is read once); ConfigError on bad input."""
    if not paths:
        raise ConfigError("fastppo plot needs at least one run folder")
    runs, seen = [], set()
    for path in paths:
        key = os.path.realpath(path)
        if key in seen:
            continue
        seen.add(key)
        lines = check_lines(path, read_metrics(path))
        runs.append(Run(path, os.path.basename(os.path.normpath(path)), read_config(path), lines))
    return runs


def check_out(out: str) -> None:
    """ConfigError unless --out is a .png file that can be written."""
    if not out.lower().endswith(".png"):
        raise ConfigError(f"--out {out!r} must end in .png")
    folder = os.path.dirname(out) or "."
    if not os.path.isdir(folder):
        raise ConfigError(f"--out {out!r}: folder {folder!r} does not exist")
    if os.path.isdir(out):
        raise ConfigError(f"--out {out!r} is a folder")
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(out) and not os.access(out, os.W_OK)):
        raise ConfigError(f"--out {out!r} is not writable")


# --- grouping --------------------------------------------------------------------------------------


@dataclass
class Group:
    label: str
    runs: list[Run]


def by_env(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs by env id, in the order the envs first appear."""
    envs: dict[str, list[Run]] = {}
    for run in runs:
        envs.setdefault(run.env_id, []).append(run)
    return envs


def groups_of(runs: list[Run]) -> list[Group]:
    """The runs of one env grouped by setting (seeds together), each labelled (see the module docstring)."""
    keyed: dict[str, list[Run]] = {}
    for run in runs:
        keyed.setdefault(json.dumps(run.setting(), sort_keys=True, default=str), []).append(run)
    members = list(keyed.values())
    settings = [ms[0].setting() for ms in members]
    names = sorted({k for s in settings for k in s}, key=lambda k: (FIELD_ORDER.get(k, len(FIELD_ORDER)), k))
    # An algorithm's own options label its settings only where they differ between them; PPO's --loss
    # is named whenever PPO runs are drawn beside TRPO runs.
    differing = [k for k in names if len({json.dumps(s[k], default=str) for s in settings if k in s}) > 1
                 or (k == "loss" and 0 < sum(k in s for s in settings) < len(settings))]
    out = []
    for ms, setting in zip(members, settings, strict=True):
        if differing:
            parts = [f"{k}={_value(setting[k])}" for k in differing if k in setting]
            label = ",\n".join(", ".join(parts[i : i + 3]) for i in range(0, len(parts), 3))
        elif len(ms) == 1:
            label = ms[0].name
        else:
            exp_names = {r.config.get("exp_name") for r in ms}
            label = str(exp_names.pop()) if len(exp_names) == 1 else f"{len(ms)} runs"
        out.append(Group(f"{label} ({_seeds(ms)})", ms))
    return out


def _value(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v)) or "()"
    return str(v)


def _seeds(runs: list[Run]) -> str:
    seeds = [r.config.get("seed") for r in runs]
    if len(runs) == 1:
        return f"seed {seeds[0]}"
    listed = ", ".join(map(str, sorted(seeds, key=str)))
    twice = sorted({s for s in seeds if seeds.count(s) > 1}, key=str)
    if not twice:
        return f"{len(runs)} seeds: {listed}"
    return f"{len(runs)} runs: seeds {listed}; the same seed {', '.join(map(str, twice))} in several folders"


def same_seed_warnings(runs: list[Run]) -> list[str]:
    """One line per seed that two or more folders of one setting share: they are drawn as that many runs of
    the setting (their folders may be copies, or a run and its rerun), which the reader should know."""
    out = []
    for env_runs in by_env(runs).values():
        for group in groups_of(env_runs):
            by_seed: dict = {}
            for run in group.runs:
                by_seed.setdefault(run.config.get("seed"), []).append(run.path)
            out += [f"{' and '.join(paths)} have the same setting and seed {seed}: drawn as {len(paths)} runs, "
                    f"not {len(paths)} seeds" for seed, paths in by_seed.items() if len(paths) > 1]
    return out


# --- curves ----------------------------------------------------------------------------------------


def on_grid(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray] | None:
    """(x, ys[run, x]): every curve interpolated onto one grid over the range any of them covers (their own
    x values, or MAX_POINTS evenly spaced when more), NaN where a run has no data (before its first or past
    its last point); None when no curve has a point."""
    curves = [(x[order], y[order]) for x, y in curves if len(x) for order in [np.argsort(x, kind="stable")]]
    if not curves:
        return None
    grid = np.unique(np.concatenate([x for x, _ in curves]))
    if len(grid) > MAX_POINTS:
        grid = np.linspace(grid[0], grid[-1], MAX_POINTS)
    ys = np.stack([np.where((grid >= x[0]) & (grid <= x[-1]), np.interp(grid, x, y), np.nan) for x, y in curves])
    return grid, ys


def enough(runs: int) -> int:
    """Runs that must have data at an x for a group's mean (and band) to be drawn there: half of them, 2 at
    least, so that the mean is not one run's curve and one run stopping early does not end it."""
    return max(2, math.ceil(runs / 2))


def bootstrap_ci(ys: np.ndarray, confidence: float = 0.95, samples: int = BOOTSTRAP_SAMPLES,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Percentile-bootstrap confidence interval of the mean over runs at each x: ys is (runs, x), NaN where a
    run has no data. At each x the runs that have data are resampled with replacement `samples` times, and
    the interval holds the middle `confidence` of the resampled means. Seeded: a figure is drawn the same
    every time. NaN where fewer than CI_MIN_RUNS runs have data."""
    rng = np.random.default_rng(seed)
    lo, hi = np.full(ys.shape[1], np.nan), np.full(ys.shape[1], np.nan)
    have = ~np.isnan(ys)
    for mask in sorted({tuple(col) for col in have.T}):  # the x columns with the same runs resample together
        rows = np.flatnonzero(mask)
        if len(rows) < CI_MIN_RUNS:
            continue
        cols = np.flatnonzero((have.T == mask).all(1))
        picks = rng.integers(0, len(rows), (samples, len(rows)))
        weights = (picks[:, :, None] == np.arange(len(rows))).sum(1) / len(rows)  # (samples, runs)
        means = weights @ ys[np.ix_(rows, cols)]  # (samples, x): the mean of each resample
        lo[cols], hi[cols] = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2], axis=0)
    return lo, hi


def time_unit(seconds: float) -> tuple[str, float]:
    """(unit, seconds per unit) that reads well for a span of `seconds`: s up to 3 min, min up to 3 h, h."""
    if seconds <= 180:
        return "s", 1.0
    if seconds <= 3 * 3600:
        return "min", 60.0
    return "h", 3600.0


def drawn(xs: list, ys: list[float | None]) -> tuple[list, list]:
    """The points of (xs, ys) whose y is not None (bench/learning.py's curves)."""
    pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
    return [x for x, _ in pts], [y for _, y in pts]


def si_label(v: float, _pos=None) -> str:
    """1500 -> 1.5k, 2e6 -> 2M: axis labels (a matplotlib FuncFormatter's function)."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:g}{suffix}"
    return f"{v:g}"


# --- drawing ---------------------------------------------------------------------------------------


def figure(runs: list[Run], band: str = "ci"):
    """The matplotlib Figure: one subfigure per env (suptitle: the env), three panels each, a legend
    below each row. band: "ci" or "minmax" (PlotConfig.band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter

    envs = by_env(runs)
    fig = plt.figure(figsize=(17, 5.2 * len(envs)), layout="constrained")
    rows = fig.subfigures(len(envs), 1, squeeze=False)[:, 0]
    for row, (env, env_runs) in zip(rows, envs.items(), strict=True):
        groups = groups_of(env_runs)
        row.suptitle(f"{env}  ({len(env_runs)} run{'s' if len(env_runs) > 1 else ''})", fontsize=13,
                     fontweight="bold")
        ax_steps, ax_time, ax_speed = row.subplots(1, 3)
        unit, per = time_unit(max((m.get("time/elapsed") or 0.0 for r in env_runs for m in r.lines), default=0.0))
        windows = set()
        handles = []
        banded: set[int] = set()  # the run counts of the groups drawn with a band
        evals = False
        for i, group in enumerate(groups):
            color = f"C{i % 10}"
            handles.append(Line2D([], [], color=color, lw=2, label=group.label))
            for ax, x_name, scale in ((ax_steps, "global_step", 1.0), (ax_time, "time/elapsed", per)):
                curves = [r.series(x_name, "charts/recent_return") for r in group.runs]
                banded |= _draw(ax, curves, color, scale, band)
                evals |= _draw_evals(ax, group.runs, x_name, color, scale)
            speeds = [r.speed() for r in group.runs]
            windows |= {w for _, _, w in speeds}
            banded |= _draw(ax_speed, [(x, y) for x, y, _ in speeds], color, 1.0, band)
        games = {r.config.get("target_return_games", 10) for r in env_runs}
        recent = f"recent return (mean of the last {games.pop()} games)" if len(games) == 1 else "recent return"
        ax_steps.set(xlabel="agent steps", ylabel=recent, title="recent return vs agent steps")
        ax_time.set(xlabel=f"wall-clock time ({unit})", ylabel=recent, title="recent return vs wall-clock time")
        smoothing = "" if windows <= {1} else "\n(moving mean over 1% of a run's iterations)"
        ax_speed.set(xlabel="agent steps", ylabel=f"agent steps / s of each iteration{smoothing}",
                     title="training speed (the iteration's steps / perf/iteration)")
        for ax in (ax_steps, ax_time, ax_speed):
            ax.grid(alpha=0.3)
            if not ax.lines:
                ax.text(0.5, 0.5, "no data yet", transform=ax.transAxes, ha="center", va="center", color="0.5")
        for ax in (ax_steps, ax_speed):
            ax.xaxis.set_major_formatter(FuncFormatter(si_label))
        ax_speed.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax_speed.set_ylim(bottom=0)
        if any(len(g.runs) > 1 for g in groups):
            handles.append(Line2D([], [], color="0.4", lw=0.8, alpha=0.6, label="thin: each run, to its own end"))
        if banded:
            distinct = all(len({r.config.get("seed") for r in g.runs}) == len(g.runs) for g in groups)
            unit = "seeds" if distinct else "runs"
            handles.append(Patch(facecolor="0.5", alpha=0.25, label=band_label(band, banded, unit)))
        if evals:
            handles.append(Line2D([], [], color="0.3", marker="D", ls="none", ms=5,
                                  label="eval/episodic_return (mean over the runs that evaluated)"))
        row.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), fontsize=9,
                   frameon=False)
    return fig


def band_label(band: str, counts: set[int], unit: str) -> str:
    """The legend's entry for the bands of a row whose banded groups have `counts` runs; unit: "seeds", or
    "runs" where two runs of a setting share a seed."""
    over = f"{next(iter(counts))} {unit}" if len(counts) == 1 else f"each setting's {unit}"
    return f"mean, 95% bootstrap CI over {over}" if band == "ci" else f"mean, min-max over {over}"


def _draw(ax, curves: list[tuple[np.ndarray, np.ndarray]], color: str, scale: float, band: str) -> set[int]:
    """A group's curves on ax: one run's as a thick line; several runs' each thin to its own end, and their
    mean (thick) and band where enough of them have data. {the group's run count} when a band was drawn."""
    grid = on_grid(curves)
    if grid is None:
        return set()
    x, ys = grid
    x = x / scale
    style = dict(marker="o", ls="none", ms=4) if len(x) == 1 else {}
    if len(ys) == 1:
        ax.plot(x, ys[0], color=color, lw=1.8, **style)
        return set()
    for y in ys:
        ax.plot(x, y, color=color, lw=0.8, alpha=0.45, **style)  # NaN where the run has no data: not drawn
    have = (~np.isnan(ys)).sum(0)
    shown = have >= enough(len(ys))
    mean = np.divide(np.nansum(ys, 0), have, out=np.full(len(x), np.nan), where=shown)
    ax.plot(x, mean, color=color, lw=2, **style)
    if band == "ci":
        lo, hi = bootstrap_ci(ys)
    else:  # fmin / fmax skip the NaN of runs without data there
        lo, hi = np.fmin.reduce(ys, axis=0), np.fmax.reduce(ys, axis=0)
    lo, hi = np.where(shown, lo, np.nan), np.where(shown, hi, np.nan)
    if not np.isfinite(lo).any():
        return set()
    ax.fill_between(x, lo, hi, where=np.isfinite(lo), color=color, alpha=0.2, lw=0)
    return {len(ys)}


def _draw_evals(ax, runs: list[Run], x_name: str, color: str, scale: float) -> bool:
    """eval/episodic_return markers: at each global_step some run evaluated, the mean over those runs
    (x: the step, or the mean of their times); whether any was drawn."""
    at: dict[int, list[tuple[float | None, float]]] = {}
    for run in runs:
        for m in run.lines:
            if m.get("eval/episodic_return") is not None:
                at.setdefault(m["global_step"], []).append((m.get(x_name), m["eval/episodic_return"]))
    pts = []
    for step in sorted(at):
        xs = [x for x, _ in at[step] if x is not None]
        if xs:
            pts.append((float(np.mean(xs)) / scale, float(np.mean([y for _, y in at[step]]))))
    if pts:
        ax.plot([x for x, _ in pts], [y for _, y in pts], "D", color=color, ms=5, mec="white", mew=0.6)
    return bool(pts)


def plot_runs(pcfg: PlotConfig) -> str:
    """Write the PNG; returns its path. Raises ConfigError before drawing anything on bad input."""
    if not pcfg.runs:
        raise ConfigError("fastppo plot needs at least one run folder")
    check_out(pcfg.out)
    runs = load_runs(pcfg.runs)
    import sys

    import matplotlib.pyplot as plt

    for line in same_seed_warnings(runs):
        print(f"fastppo: warning: {line}", file=sys.stderr)
    fig = figure(runs, pcfg.band)
    try:
        fig.savefig(pcfg.out, dpi=100)
    except OSError as e:
        raise ConfigError(f"cannot write --out {pcfg.out!r} ({e.strerror or e})") from None
    finally:
        plt.close(fig)
    return pcfg.out
