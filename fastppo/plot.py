"""``fastppo plot``: one PNG comparing runs from their metrics.jsonl, for users without W&B.

Three panels: mean full-game return against agent steps, the same against wall-clock time
(``time/elapsed``), and steps/s (``charts/SPS``) against steps. Each metrics line's return is the
mean of the games that ended during that iteration (drawn faintly); the curve is the run's recent
return (``charts/recent_return``: the mean of its last --target-return-games games).
``eval/episodic_return`` points are drawn as markers when the run evaluated with --eval-every.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import tyro

from fastppo.config import ConfigError
from fastppo.logger import read_metrics


@dataclass
class PlotConfig:
    runs: tyro.conf.Positional[tuple[str, ...]]
    """run folders (runs/<name> ...), each with a metrics.jsonl"""
    out: str = "plot.png"
    """PNG file to write"""


def drawn(xs: list, ys: list[float | None]) -> tuple[list, list]:
    """The points of (xs, ys) whose y is not None."""
    pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
    return [x for x, _ in pts], [y for _, y in pts]


def plot_runs(pcfg: PlotConfig) -> str:
    """Write the PNG; returns its path. Raises ConfigError before drawing anything on bad input."""
    if not pcfg.runs:
        raise ConfigError("fastppo plot needs at least one run folder")
    if not pcfg.out.lower().endswith(".png"):
        raise ConfigError(f"--out {pcfg.out!r} must end in .png")
    out_dir = os.path.dirname(pcfg.out) or "."
    if not os.path.isdir(out_dir):
        raise ConfigError(f"--out {pcfg.out!r}: folder {out_dir!r} does not exist")
    runs = {run: read_metrics(run) for run in pcfg.runs}

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_steps, ax_time, ax_sps) = plt.subplots(1, 3, figsize=(16, 4.5))
    for i, (run, lines) in enumerate(runs.items()):
        color = f"C{i % 10}"
        label = os.path.basename(os.path.normpath(run))
        games = [m for m in lines if m.get("charts/episodic_return") is not None]
        steps = [m["global_step"] for m in games]
        times = [m.get("time/elapsed") for m in games]
        ret = [m["charts/episodic_return"] for m in games]
        recent = [m.get("charts/recent_return") for m in games]
        ax_steps.plot(steps, ret, color=color, alpha=0.2, lw=0.8)
        ax_steps.plot(*drawn(steps, recent), color=color, label=label)
        if all(t is not None for t in times):
            ax_time.plot(times, ret, color=color, alpha=0.2, lw=0.8)
            ax_time.plot(*drawn(times, recent), color=color, label=label)
        evals = [m for m in lines if m.get("eval/episodic_return") is not None]
        if evals:
            ax_steps.plot([m["global_step"] for m in evals], [m["eval/episodic_return"] for m in evals], "o",
                          color=color, ms=4, label=f"{label} (eval)")
        ax_sps.plot([m["global_step"] for m in lines], [m.get("charts/SPS") for m in lines], color=color, label=label)
    ax_steps.set(xlabel="agent steps", ylabel="full-game return", title="return vs steps")
    ax_time.set(xlabel="wall-clock time (s)", ylabel="full-game return", title="return vs time")
    ax_sps.set(xlabel="agent steps", ylabel="steps/s", title="speed (charts/SPS)")
    for ax in (ax_steps, ax_time, ax_sps):
        ax.grid(alpha=0.3)
    ax_steps.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(pcfg.out, dpi=100)
    plt.close(fig)
    return pcfg.out
