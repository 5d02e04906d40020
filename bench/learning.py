"""Time to score: train a game with a preset until a score or a time budget, for one or several seeds; JSON + PNG.

    python bench/learning.py --env-id Pong-v5 --preset fast --target-return 20 --max-seconds 120
    python bench/learning.py --env-id CartPole-v1 --preset cleanrl --target-return 450 --device cpu --seeds 1 2 3
    python bench/learning.py --env-id Pong-v5 --preset fast --target-return 20 --seeds 1 2 3 \\
        --compare bench/results/learning_Pong-v5_cleanrl_cpu_1.json
    python bench/learning.py --env-id Breakout-v5 --preset fast --target-return 400 -- --total-timesteps 10000000
    python bench/learning.py --resume bench/results/runs/learning_Pong-v5_cleanrl_cpu_1 --max-seconds 3600

Flags after ``--`` go to ``fastppo train`` as they are (they override the preset). Each seed of
--seeds is one training run, one after another; a run stops at the first iteration where the mean
full-game return of the last 10 games (the recent return) reaches --target-return (the trainer's
--target-return), or at the first iteration that ends past --max-seconds, or at the run's
--total-timesteps.

Writes ``<out-dir>/<name>.json`` and ``<name>.png``. For each run: the curve (global step,
wall-clock seconds of training, mean return of the iteration's games and the recent return per
iteration), whether the target was reached, the steps and seconds at which the recent return first
reached it (``target_steps``, ``target_seconds``; null if never), the resolved config. With one
seed the file is that run's record (the layout of the results already committed); with several,
``runs`` holds one record per seed beside the env, preset, target and ``reached`` (every seed
reached it). Both name the machine (GPU/CPU model, core count, versions, commit, date). The PNG
has two panels, recent return against agent steps and against wall-clock seconds, one line per seed
and the target; ``--compare RESULT.json`` (repeatable) draws the runs of other result files dashed
beside them, so that two presets compare per env step in one picture (curves written before the
recent return was recorded are drawn as the mean over the latest iterations holding 10 games).

The run folders are kept under ``<out-dir>/runs/`` (git-ignored): ``<name>`` for one seed,
``<name>_seed<S>`` for several. ``--report RUN_DIR [...]`` trains nothing and writes the results of
existing run folders (a run of ``fastppo train`` too), measured against --target-return if given;
``--label TEXT`` names the runs in the legend and title (and in the JSON, ``label``) where
``--preset NAME`` would not say what they ran.
``--resume RUN_DIR`` goes on with one such run (its own env, preset,
target and seed; ``fastppo train --resume`` rebuilds the envs exactly) for another --max-seconds,
and writes the results of the whole run: steps and seconds count from its start.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastppo.bench import machine  # noqa: E402
from fastppo.cli import USER_ERRORS, given_flags  # noqa: E402
from fastppo.config import Config, mark_given, read_config  # noqa: E402
from fastppo.logger import read_metrics  # noqa: E402
from fastppo.plot import drawn  # noqa: E402
from fastppo.trainer import train  # noqa: E402


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    train_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env-id", default="Pong-v5")
    p.add_argument("--preset", default="fast", choices=["none", "cleanrl", "fast"])
    p.add_argument("--target-return", type=float, help="stop once the last 10 games reach this (required unless "
                   "--resume)")
    p.add_argument("--max-seconds", type=float, default=600.0,
                   help="wall-clock budget of each training run (of this segment, with --resume)")
    p.add_argument("--seeds", "--seed", type=int, nargs="+", default=[1], metavar="SEED",
                   help="one training run per seed, one after another")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    p.add_argument("--name", default=None, help="file stem (default learning_<env>_<preset>_<device>_<seed>, "
                   "..._seeds<a>-<b> for several, or the run folder's name with --resume)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="go on with the run in RUN_DIR (its config, "
                   "target included) and write the results of the whole run")
    p.add_argument("--compare", action="append", default=[], metavar="RESULT.json",
                   help="draw the runs of this result file beside (repeatable)")
    p.add_argument("--label", default=None, help="what the legend and the title call these runs (default: "
                   "--preset NAME), say for runs whose explicit flags equal another preset's values")
    p.add_argument("--report", nargs="+", default=None, metavar="RUN_DIR",
                   help="train nothing: write the results of these existing run folders (one per seed), measured "
                   "against --target-return (default: each run's own)")
    args = p.parse_args(own)
    if args.report is not None:
        if args.resume is not None or train_args:
            p.error("--report writes the results of runs as they are; it takes neither --resume nor train flags")
        missing = [r for r in args.report if not (Path(r) / "metrics.jsonl").is_file()]
        if missing:
            p.error(f"--report {missing[0]!r}: no such run folder (no metrics.jsonl)")
    elif args.resume is None and args.target_return is None:
        p.error("--target-return is required (unless --resume or --report)")
    if args.resume is not None and (args.target_return is not None or args.preset != p.get_default("preset")
                                    or args.env_id != p.get_default("env_id")
                                    or args.seeds != p.get_default("seeds")):
        p.error("--resume goes on with the run's own --env-id, --preset, --target-return and seed; do not give them")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds {' '.join(map(str, args.seeds))}: a seed is given twice")
    if not args.max_seconds > 0:
        p.error(f"--max-seconds must be positive, got {args.max_seconds}")
    args.compared = []
    for path in args.compare:
        try:
            args.compared.append((path, load_result(path)))
        except (OSError, ValueError, KeyError, TypeError) as e:
            p.error(f"--compare {path!r} is not a learning result ({type(e).__name__}: {e})")
    return args, train_args


def curve(run_dir: str) -> list[dict]:
    """Per iteration: global step, wall-clock seconds, mean return of the games since the last line and
    the recent return (the mean of the last --target-return-games games, what the target compares)."""
    return [{"global_step": m["global_step"], "seconds": m["time/elapsed"], "return": m["charts/episodic_return"],
             "games": m["charts/episodes"], "recent": m.get("charts/recent_return")} for m in read_metrics(run_dir)]


def run_record(run_dir: str, last: dict, resumed: bool, target: float | None = None) -> dict:
    """One run's results: its curve, whether and where the recent return first reached the target (the run's
    own --target-return unless `target` is given), its config."""
    points = curve(run_dir)
    config = read_config(run_dir)
    target = config["target_return"] if target is None else target
    first = None if target is None else next(
        (p for p in points if p["recent"] is not None and p["recent"] >= target), None)
    return {
        "env_id": config["env_id"], "preset": config["preset"], "target_return": target, "seed": config["seed"],
        "resumed": resumed, "reached": first is not None, "stopped_by": last["stopped_by"],
        "steps": last["global_step"], "seconds": last["time/elapsed"],
        "target_steps": first["global_step"] if first else None, "target_seconds": first["seconds"] if first else None,
        "final_return": last["charts/episodic_return"], "curve": points, "config": config,
    }


def load_result(path: str) -> dict:
    """A result file of this script (one run, or "runs"), checked enough to be drawn."""
    with open(path) as f:
        result = json.load(f)
    for run in result.get("runs", [result]):
        if not run["curve"] or not {"global_step", "seconds", "return", "games"} <= set(run["curve"][0]):
            raise ValueError("a run without a curve")
    return result


def recent_returns(points: list[dict], games: int) -> list[float | None]:
    """The recent return of each point: recorded, or for a curve written before it was (no "recent"), the
    games-weighted mean of the returns of the latest iterations that hold at least `games` games."""
    if all("recent" in p for p in points):
        return [p["recent"] for p in points]
    out: list[float | None] = []
    for i in range(len(points)):
        total, weight, j = 0.0, 0, i
        while j >= 0 and weight < games:
            if points[j]["return"] is not None:
                total += points[j]["return"] * points[j]["games"]
                weight += points[j]["games"]
            j -= 1
        out.append(total / weight if weight >= games else None)
    return out


def machine_name(info: dict) -> str:
    return info["gpu"] or f"{info['cpu']} ({info['cpu_cores']} cores)"


def run_label(run: dict) -> str:
    """What a run is called in the picture: its --label, or --preset NAME."""
    return run.get("label") or f"--preset {run['preset']}"


def plot(runs: list[dict], compared: list[tuple[str, dict]], target: float, title: str, path: str) -> None:
    """Two panels, recent return against agent steps and against wall-clock seconds: a line per seed (with
    a dot where it first reached the target), the compared files' runs dashed, the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [(run, "-", f"{run_label(run)} seed {run['seed']}") for run in runs]
    for file, result in compared:
        where = machine_name(result["machine"])
        for run in result.get("runs", [result]):
            env = f"{run['env_id']}, " if run["env_id"] != runs[0]["env_id"] else ""
            seed = run.get("seed", run["config"]["seed"])
            lines.append((run, "--", f"{env}{run_label(run)} seed {seed}, {where} ({Path(file).name})"))
    legend = 0.22 * (len(lines) + (target is not None))  # inches under the panels, one row per entry
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5 + legend))
    for ax, key, label in ((axes[0], "global_step", "agent steps"), (axes[1], "seconds", "wall-clock seconds")):
        for run, style, name in lines:
            points = run["curve"]
            recent = recent_returns(points, run["config"].get("target_return_games", 10))
            if len(runs) == 1 and style == "-":  # one run: its iterations' games too, faint
                pts = [p for p in points if p["return"] is not None]
                ax.plot([p[key] for p in pts], [p["return"] for p in pts], lw=0.6, alpha=0.3, color="grey")
            (line,) = ax.plot(*drawn([p[key] for p in points], recent), ls=style, lw=1.4, label=name)
            if style == "-" and run.get("target_steps") is not None:
                x = run["target_steps"] if key == "global_step" else run["target_seconds"]
                ax.plot([x], [target], "o", color=line.get_color(), ms=5)
        if target is not None:
            ax.axhline(target, color="k", ls=":", lw=0.8, label=f"target {target:g}")
        ax.set_xlabel(label)
        ax.set_ylabel(f"recent return (last {runs[0]['config']['target_return_games']} games)")
    # below both panels, so that long labels do not squeeze them
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", fontsize="small", frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, (legend + 0.1) / (4.5 + legend), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args, train_args = parse(list(sys.argv[1:] if argv is None else argv))
    info = machine()
    out_dir = Path(args.out_dir)
    if args.resume is not None:
        run_dir = Path(args.resume)
        name = args.name or run_dir.name
        launches = [(run_dir, ["--resume", str(run_dir), "--device", args.device, "--max-seconds",
                               str(args.max_seconds), *train_args])]
    else:
        device_name = (info["gpu"] or "cpu").replace(" ", "-") if args.device != "cpu" else "cpu"
        several = len(args.seeds) > 1
        seeds = f"seeds{'-'.join(map(str, args.seeds))}" if several else str(args.seeds[0])
        name = args.name or f"learning_{args.env_id}_{args.preset}_{device_name}_{seeds}"
        launches = []
        for seed in args.seeds:
            run_dir = out_dir / "runs" / (f"{name}_seed{seed}" if several else name)
            launches.append((run_dir, ["--env-id", args.env_id, "--preset", args.preset, "--target-return",
                                       str(args.target_return), "--seed", str(seed), "--device", args.device,
                                       "--run-dir", str(run_dir), "--max-seconds", str(args.max_seconds),
                                       *train_args]))
    runs = []
    where = machine_name(info)
    label = {} if args.label is None else {"label": args.label}
    if args.report is not None:
        name = args.name or Path(args.report[0]).name
        for run_dir in args.report:
            metrics = read_metrics(run_dir)
            config = read_config(run_dir)
            done = metrics[-1]["global_step"] >= config["num_iterations"] * config["global_batch_size"]
            own, recent = config["target_return"], metrics[-1].get("charts/recent_return")
            at_target = own is not None and recent is not None and recent >= own
            last = {**metrics[-1], "stopped_by": "target_return" if at_target else
                    "total_timesteps" if done else "stopped early"}
            runs.append({**run_record(run_dir, last, resumed=False, target=args.target_return), **label})
        launches = []
    for run_dir, train_argv in launches:
        cfg = tyro.cli(Config, args=train_argv, prog="bench/learning.py -- (fastppo train flags)")
        try:
            last = train(mark_given(cfg, given_flags(cfg, train_argv)))
        except USER_ERRORS as e:
            print(f"learning.py: error: {e}", file=sys.stderr)
            return 2
        run = {**run_record(str(run_dir), last, args.resume is not None), **label}
        runs.append(run)
        status = "reached" if run["reached"] else "NOT reached"
        print(f"{run['env_id']} --preset {run['preset']} seed {run['seed']}: target {run['target_return']:g} "
              f"{status} after {run['steps']:,} steps, {run['seconds']:.1f} s on {where}")
    first = runs[0]
    common = {"max_seconds": args.max_seconds, "machine": info,
              "compare": [{"file": file, "presets": sorted({r["preset"] for r in result.get("runs", [result])}),
                           "seeds": [r.get("seed", r["config"]["seed"]) for r in result.get("runs", [result])]}
                          for file, result in args.compared]}
    if len(runs) == 1:
        result = {**first, **common}
    else:
        result = {"env_id": first["env_id"], "preset": first["preset"], **label,
                  "target_return": first["target_return"], "seeds": [r["seed"] for r in runs],
                  "reached": all(r["reached"] for r in runs), "runs": runs,
                  **common}
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{name}.json", "w") as f:
        json.dump(result, f, indent=1)
    title = f"{first['env_id']}, {run_label(first)}, {where}"
    plot(runs, args.compared, first["target_return"], title, str(out_dir / f"{name}.png"))
    print(f"wrote {out_dir / name}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
