"""Time to score: train a game with a preset until a score or a time budget; JSON + PNG learning curve.

    python bench/learning.py --env-id Pong-v5 --preset fast --target-return 20 --max-seconds 120
    python bench/learning.py --env-id CartPole-v1 --preset cleanrl --target-return 450 --device cpu
    python bench/learning.py --env-id Breakout-v5 --preset fast --target-return 400 -- --total-timesteps 10000000
    python bench/learning.py --resume bench/results/runs/learning_Pong-v5_cleanrl_cpu_1 --max-seconds 3600

Flags after ``--`` go to ``fastppo train`` as they are (they override the preset). The run stops at
the first iteration where the mean full-game return of the last 10 games reaches --target-return
(the trainer's --target-return), or at the first iteration that ends past --max-seconds, or at the
run's --total-timesteps. Writes ``<out-dir>/<name>.json`` (the curve: global step, wall-clock
seconds and mean return per iteration; whether and when the target was reached; the resolved
config; GPU/CPU model, core count, versions, commit, date) and ``<name>.png``. The run folder is
kept under ``<out-dir>/runs/`` (git-ignored). ``--resume RUN_DIR`` goes on with such a run (its own
env, preset and target; ``fastppo train --resume`` rebuilds the envs exactly) for another
--max-seconds, and writes the results of the whole run: steps and seconds count from its start.
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
from fastppo.cli import USER_ERRORS  # noqa: E402
from fastppo.config import Config, flags_given, mark_given, read_config  # noqa: E402
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
                   help="wall-clock budget of the training run (of this segment, with --resume)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    p.add_argument("--name", default=None, help="file stem (default learning_<env>_<preset>_<device>_<seed>, or "
                   "the run folder's name with --resume)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="go on with the run in RUN_DIR (its config, "
                   "target included) and write the results of the whole run")
    args = p.parse_args(own)
    if args.resume is None and args.target_return is None:
        p.error("--target-return is required (unless --resume)")
    if args.resume is not None and (args.target_return is not None or args.preset != p.get_default("preset")
                                    or args.env_id != p.get_default("env_id")):
        p.error("--resume goes on with the run's own --env-id, --preset and --target-return; do not give them")
    if not args.max_seconds > 0:
        p.error(f"--max-seconds must be positive, got {args.max_seconds}")
    return args, train_args


def curve(run_dir: str) -> list[dict]:
    """Per iteration: global step, wall-clock seconds, mean return of the games since the last line and
    the recent return (the mean of the last --target-return-games games, what the target compares)."""
    return [{"global_step": m["global_step"], "seconds": m["time/elapsed"], "return": m["charts/episodic_return"],
             "games": m["charts/episodes"], "recent": m.get("charts/recent_return")} for m in read_metrics(run_dir)]


def plot(points: list[dict], target: float, games: int, title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [p for p in points if p["return"] is not None]
    recent = [p["recent"] for p in pts]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "global_step", "agent steps"), (axes[1], "seconds", "wall-clock seconds")):
        ax.plot([p[key] for p in pts], [p["return"] for p in pts], lw=0.6, alpha=0.35, label="games of the iteration")
        ax.plot(*drawn([p[key] for p in pts], recent), lw=1.4, label=f"last {games} games")
        ax.axhline(target, color="k", ls="--", lw=0.8, label=f"target {target:g}")
        ax.set_xlabel(label)
        ax.set_ylabel("mean full-game return")
        ax.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args, train_args = parse(list(sys.argv[1:] if argv is None else argv))
    info = machine()
    out_dir = Path(args.out_dir)
    if args.resume is not None:
        run_dir = Path(args.resume)
        name = args.name or run_dir.name
        train_argv = ["--resume", str(run_dir), "--device", args.device, "--max-seconds", str(args.max_seconds),
                      *train_args]
    else:
        device_name = (info["gpu"] or "cpu").replace(" ", "-") if args.device != "cpu" else "cpu"
        name = args.name or f"learning_{args.env_id}_{args.preset}_{device_name}_{args.seed}"
        run_dir = out_dir / "runs" / name
        train_argv = ["--env-id", args.env_id, "--preset", args.preset, "--target-return", str(args.target_return),
                      "--seed", str(args.seed), "--device", args.device, "--run-dir", str(run_dir),
                      "--max-seconds", str(args.max_seconds), *train_args]
    cfg = tyro.cli(Config, args=train_argv, prog="bench/learning.py -- (fastppo train flags)")
    try:
        last = train(mark_given(cfg, flags_given(train_argv)))
    except USER_ERRORS as e:
        print(f"learning.py: error: {e}", file=sys.stderr)
        return 2
    points = curve(str(run_dir))
    config = read_config(str(run_dir))
    env_id, preset, target = config["env_id"], config["preset"], config["target_return"]
    reached = last["stopped_by"] == "target_return"
    result = {
        "env_id": env_id, "preset": preset, "target_return": target, "resumed": args.resume is not None,
        "max_seconds": args.max_seconds, "reached": reached, "stopped_by": last["stopped_by"],
        "steps": last["global_step"], "seconds": last["time/elapsed"],
        "final_return": last["charts/episodic_return"], "curve": points, "config": config, "machine": info,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{name}.json", "w") as f:
        json.dump(result, f, indent=1)
    where = info["gpu"] or f"{info['cpu']} ({info['cpu_cores']} cores)"
    title = f"{env_id}, --preset {preset}, {where}"
    plot(points, target, config["target_return_games"], title, str(out_dir / f"{name}.png"))
    status = "reached" if reached else "NOT reached"
    print(f"{env_id} --preset {preset}: target {target:g} {status} after "
          f"{last['global_step']:,} steps, {last['time/elapsed']:.1f} s on {where}")
    print(f"wrote {out_dir / name}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
