"""Run outputs: metrics.jsonl (one JSON object per iteration), the progress display, W&B.

Metric names are CleanRL's (``charts/episodic_return``, ``losses/approx_kl``, ...) so fastppo runs
sit beside CleanRL runs. Values arrive here as Python numbers: the trainer converts its device
tensors once per iteration, which is the one deliberate host sync per iteration; nothing here
touches the device.

metrics.jsonl (and TensorBoard) get every iteration. W&B and the plain progress lines are
throttled: a line goes out every ``log_every`` iterations once ``log_seconds`` have passed since the
previous one (always for the first and the last iteration, and for every line with an evaluation),
and its W&B ``charts/episodic_return`` is the mean of all the games that ended since the previous
line, so no game and no evaluation is lost to the throttle. A progress line shows the recent return
(``charts/recent_return``, with the games so far) and, on a line with an evaluation, its score and
the best so far. When stdout is a terminal the progress is a live rich display (steps, steps/s, ETA,
recent return, the last evaluation, phase) instead of lines.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import sys
import time
from collections import deque

import numpy as np


class RecentReturns:
    """The recent-return window: the mean full-game return of the last `games` games (None until that
    many have ended).

    The one definition behind charts/recent_return, the progress display, --target-return and the
    curves of ``fastppo plot`` and bench/learning.py (which draw the logged charts/recent_return).
    """

    def __init__(self, games: int):
        self.window: deque[float] = deque(maxlen=games)

    def extend(self, returns) -> None:
        self.window.extend(returns)

    def mean(self) -> float | None:
        return float(np.mean(self.window)) if len(self.window) == self.window.maxlen else None

    def state(self) -> list[float]:
        return list(self.window)


class RunLogger:
    """Writes metrics.jsonl, drives the progress display and (optionally) a W&B Tracker."""

    def __init__(self, run_dir: str, total_steps: int, *, log_every: int = 1, log_seconds: float = 0.0,
                 tracker=None, stream=None, live: bool | None = None, title: str = "fastppo", window: int = 10,
                 tensorboard=None):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.file = open(self.path, "a")
        self.stream = stream if stream is not None else sys.stdout
        self.total_steps = total_steps
        self.log_every = log_every
        self.log_seconds = log_seconds
        self.tracker = tracker
        self.tensorboard = tensorboard  # every line, like metrics.jsonl (no throttle)
        self.last_sent: tuple[int, float] | None = None  # (iteration, time) of the last W&B / progress line
        self._games = [0.0, 0, 0.0]  # return sum, games, length sum since the last line
        self.window = window
        self.games = _games_logged(self.path)  # games ended in the run so far (a resume's earlier lines too)
        self._held: dict | None = None  # the newest metrics, when the throttle held them back
        if live is None:
            live = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.display = LiveDisplay(self.stream, total_steps, title, window, self.games) if live else None

    def phase(self, name: str) -> None:
        """The phase the trainer is in (collect, update, eval, checkpoint, replay), for the display."""
        if self.display is not None:
            self.display.phase = name

    def announce(self, text: str) -> None:
        """A line for the user (the run folder at the start, the result at the end): printed in plain
        mode; on a terminal the live display shows it in place of the phase, and keeps it at the end."""
        if self.display is not None:
            self.display.phase = text
        else:
            self._send_held()  # the run's last progress line comes before its result
            print(f"fastppo: {text}", file=self.stream, flush=True)

    def log(self, metrics: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            self.tensorboard.log(clean)
        n = metrics.get("charts/episodes", 0)
        self.games += n
        if n:
            self._games[0] += metrics["charts/episodic_return"] * n
            self._games[1] += n
            self._games[2] += metrics["charts/episodic_length"] * n
        if self.display is not None:
            self.display.update(metrics, self.games)
        now = time.monotonic()
        iteration = metrics["iteration"]
        evaluated = any(k.startswith("eval/") and v is not None for k, v in metrics.items())
        due = (self.last_sent is None or iteration == metrics["num_iterations"] or evaluated  # never drop an eval
               or (iteration - self.last_sent[0] >= self.log_every and now - self.last_sent[1] >= self.log_seconds))
        if not due:
            self._held = clean
            return
        self._send(clean, iteration, now)

    def _send(self, clean: dict, iteration: int, now: float) -> None:
        total, games, length = self._games
        line = dict(clean)
        line["charts/episodes"] = games
        line["charts/episodic_return"] = total / games if games else None
        line["charts/episodic_length"] = length / games if games else None
        self._games = [0.0, 0, 0.0]
        self.last_sent = (iteration, now)
        if self.tracker is not None:
            self.tracker.log(line)
        if self.display is None:
            print(progress_line(line, self.total_steps, self.window, self.games), file=self.stream, flush=True)

    def _send_held(self) -> None:
        if self._held is not None and (self.last_sent is None or self.last_sent[0] < self._held["iteration"]):
            self._send(self._held, self._held["iteration"], time.monotonic())

    def close(self) -> None:
        """Send the line the throttle held back (a run that stopped early), stop the display, close."""
        self._send_held()
        if self.display is not None:
            self.display.stop()
        if self.tensorboard is not None:
            self.tensorboard.finish()
        self.file.close()


def _parse(line: str) -> dict | None:
    """One metrics.jsonl line as a dict; None for a torn line, or one that is not a metrics object."""
    try:
        m = json.loads(line)
    except json.JSONDecodeError:
        return None
    ok = isinstance(m, dict) and isinstance(m.get("global_step"), int) and isinstance(m.get("iteration"), int)
    return m if ok and line.endswith("\n") else None


def _games_logged(path: str) -> int:
    """Games ended in the lines of a metrics.jsonl so far (0 for a new run)."""
    if not os.path.exists(path):
        return 0
    with open(path, errors="replace") as f:
        return sum(m.get("charts/episodes") or 0 for m in map(_parse, f) if m is not None)


def read_metrics(run_dir: str) -> list[dict]:
    """The metrics lines of a run folder, in order: the one reader of metrics.jsonl (plot, bench,
    tests). A line cut short by a kill, or one that is not a metrics object, is skipped.

    Raises ConfigError when the folder has no metrics.jsonl or it holds no metrics line.
    """
    from fastppo.config import ConfigError

    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ConfigError(f"{run_dir!r} is not a run folder (no metrics.jsonl)")
    try:
        with open(path, errors="replace") as f:
            lines = [m for m in map(_parse, f) if m is not None]
    except OSError as e:
        raise ConfigError(f"cannot read {path!r} ({e.strerror})") from None
    if not lines:
        raise ConfigError(f"{path!r} holds no metrics yet")
    return lines


def keep_metrics_until(run_dir: str, iteration: int) -> int:
    """Drop the metrics.jsonl lines after `iteration` (a resume redoes them); returns how many went.

    A line cut short by a kill, or one that is not a metrics object, is dropped too. The file is
    rewritten atomically, only when needed.
    """
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path, errors="replace") as f:
        for line in f:
            m = _parse(line)
            if m is not None and m["iteration"] <= iteration:
                kept.append(line)
            else:
                dropped += 1
    if dropped:
        write_atomically(path, "".join(kept))
    return dropped


def write_atomically(path: str, text: str) -> None:
    """Write text to path.tmp, then rename it over path: a reader sees the old file or the new one. A failed
    write (a full disk) leaves the old file and no path.tmp."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def eta_seconds(m: dict, total_steps: int) -> float | None:
    sps = m.get("charts/SPS")
    return (total_steps - m["global_step"]) / sps if sps else None


def recent_text(m: dict, window: int, games: int) -> str:
    """The recent return (charts/recent_return, the mean of the last `window` games) and the games behind it;
    "-" and how many of the window's games have ended, until that many have."""
    recent = m.get("charts/recent_return")
    if recent is None:
        return f"- ({games:,} of {window} games)"
    return f"{recent:.2f} (last {window} of {games:,} games)"


def eval_text(m: dict) -> str | None:
    """The line's --eval-every score and the best so far (the one in checkpoints/best.pt); None without one."""
    score = m.get("eval/episodic_return")
    return None if score is None else f"{score:.2f} (best {_fmt(m.get('eval/best_return'), '.2f')})"


def progress_line(m: dict, total_steps: int, window: int, games: int) -> str:
    """A plain progress line: m (a metrics line), of a run of total_steps, whose recent-return window is
    `window` games and which has ended `games` games so far."""
    evaluated = eval_text(m)
    return (
        f"iter {m['iteration']}/{m['num_iterations']}  step {m['global_step']:,}  SPS {m['charts/SPS']:,}  "
        f"ETA {_duration(eta_seconds(m, total_steps))}  return {recent_text(m, window, games)}  "
        + (f"eval {evaluated}  " if evaluated is not None else "")
        + f"pg {_fmt(m.get('losses/policy_loss'), '.4f')}  v {_fmt(m.get('losses/value_loss'), '.4f')}  "
        f"ent {_fmt(m.get('losses/entropy'), '.3f')}  kl {_fmt(m.get('losses/kl'), '.4f')}"
    )


class LiveDisplay:
    """A rich live panel, redrawn by rich's own thread 4 times a second from the latest values."""

    def __init__(self, stream, total_steps: int, title: str, window: int, games: int = 0):
        from rich.console import Console
        from rich.live import Live

        self.total_steps = total_steps
        self.title = title
        self.window = window
        self.games = games
        self.phase = "start"
        self.metrics: dict = {}
        self.evaluation: dict | None = None  # the newest line with an --eval-every score: shown until the next
        self.live = Live(self, console=Console(file=stream), refresh_per_second=4, transient=False)
        self.live.start()

    def update(self, metrics: dict, games: int) -> None:
        self.metrics, self.games = metrics, games
        if eval_text(metrics) is not None:
            self.evaluation = metrics

    def __rich__(self):
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        m = self.metrics
        step = m.get("global_step", 0)
        grid = Table.grid(padding=(0, 2))
        grid.add_row(f"[bold]{self.title}[/]", f"phase [cyan]{self.phase}[/]")
        grid.add_row(ProgressBar(total=self.total_steps, completed=step, width=40),
                     f"{step:,} / {self.total_steps:,} steps")
        if m:
            grid.add_row(f"steps/s {m['charts/SPS']:,}", f"elapsed {_duration(m.get('time/elapsed'))}  "
                         f"ETA {_duration(eta_seconds(m, self.total_steps))}")
            grid.add_row(f"return {recent_text(m, self.window, self.games)}",
                         f"iter {m['iteration']}/{m['num_iterations']}  pg {_fmt(m.get('losses/policy_loss'), '.4f')}"
                         f"  v {_fmt(m.get('losses/value_loss'), '.4f')}  kl {_fmt(m.get('losses/kl'), '.4f')}")
        if self.evaluation is not None:
            e = self.evaluation
            grid.add_row(f"eval {eval_text(e)}", f"at step {e['global_step']:,} (iter {e['iteration']})")
        return grid

    def stop(self) -> None:
        self.live.refresh()
        self.live.stop()


def command_line(cfg) -> str:
    """`fastppo train` with the flags the run's caller set (config.given_fields), for the model card."""
    from fastppo.config import given_fields

    parts = ["fastppo", "train"]
    for name in sorted(given_fields(cfg) - {"resume"}):
        value, flag = getattr(cfg, name), "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, (tuple, list)):
            parts += [flag, *map(str, value)] if value else []
        elif value is not None:
            parts += [flag, str(value)]
    return shlex.join(parts)


def write_model_card(run_dir: str, cfg, metrics: dict, *, command: str, best: float | None,
                     versions: dict[str, str]) -> None:
    """<run>/README.md: what the run is (env, algorithm, command), how far it got and how well it plays
    (recent return, last and best evaluation), the versions it ran with, and how to use it. Rewritten
    atomically with every checkpoint."""
    algo = "TRPO" if cfg.algo == "trpo" else f"PPO-{cfg.loss}"
    rows = [
        ("env", f"`{cfg.env_id}`" + (f" with {', '.join(cfg.env_kwargs)}" if cfg.env_kwargs else "")),
        ("algorithm", f"{algo}, preset `{cfg.preset}`"),
        ("command", f"`{command}`"),
        ("agent steps", f"{metrics.get('global_step', 0):,} of {cfg.num_iterations * cfg.global_batch_size:,} "
                        f"(iteration {metrics.get('iteration', 0)} of {cfg.num_iterations})"),
        ("training time", _duration(metrics.get("time/elapsed"))),
        (f"recent return (last {cfg.target_return_games} games)", _fmt(metrics.get("charts/recent_return"), ".2f")),
        ("last evaluation", _fmt(metrics.get("eval/episodic_return"), ".2f") if "eval/episodic_return" in metrics
         else "-"),
        ("best evaluation (checkpoints/best.pt)", _fmt(best, ".2f") if best is not None and math.isfinite(best)
         else "-"),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items())),
    ]
    text = "\n".join([
        f"# {cfg.env_id}: {algo} (fastppo)", "",
        "| | |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in rows], "",
        "Every option is in `config.json`, every iteration's metrics in `metrics.jsonl`.", "",
        "```bash", f"fastppo eval {shlex.quote(run_dir)}                # full games with the newest checkpoint",
        f"fastppo train --resume {shlex.quote(run_dir)}        # go on training", "```", "",
        "```python", "import fastppo", "",
        f"agent = fastppo.load({run_dir!r})", "env = fastppo.make_env(agent)", "obs, _ = env.reset()",
        "obs, reward, terminated, truncated, info = env.step(agent.act(obs))", "```", "",
    ])
    write_atomically(os.path.join(run_dir, "README.md"), text)
