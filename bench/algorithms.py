"""PPO-clip, PPO-penalty and TRPO on the same engine: learning curves over seeds and steps to a target.

    python bench/algorithms.py --env-id CartPole-v1 --target 450 --total-timesteps 500000 --device cpu
    python bench/algorithms.py --env-id Acrobot-v1 --target -100 --total-timesteps 500000 --device cpu
    python bench/algorithms.py --env-id Hopper-v4 --target 1000 --total-timesteps 300000 --device cpu

For each algorithm (--algo ppo --loss clip, --algo ppo --loss penalty, --algo trpo) and seed, one
``fastppo train`` run of the whole budget (no early stop, so the curves compare), all with the same
env, rollout sizes and critic settings (the env's defaults, CleanRL's; flags after ``--`` go to every
run). Runs are kept under <out-dir>/runs/ and reused: a finished run is read, an interrupted one is
resumed (``fastppo train --resume``), so the script can be run again until every run is there.
--jobs runs that many trainings at once (each takes about one core on CPU).

Writes <out-dir>/algorithms_<env>.json (per run: steps and wall-clock seconds until the recent
return, the mean of the last 10 full games, first reached --target; the best and the final recent
return; the machine) and algorithms_<env>.png (``fastppo plot``'s figure of the runs: per algorithm
each seed, their mean and its 95% bootstrap CI, against agent steps and against wall-clock time), and
prints the table of steps to the target.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastppo.bench import machine  # noqa: E402
from fastppo.checkpoint import list_checkpoints  # noqa: E402
from fastppo.config import ConfigError, read_config  # noqa: E402
from fastppo.logger import read_metrics  # noqa: E402
from fastppo.plot import PlotConfig, plot_runs  # noqa: E402

ALGOS = {"clip": ["--algo", "ppo", "--loss", "clip"], "penalty": ["--algo", "ppo", "--loss", "penalty"],
         "trpo": ["--algo", "trpo"]}


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    train_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env-id", required=True)
    p.add_argument("--target", type=float, required=True, help="the recent return whose first step is reported")
    p.add_argument("--total-timesteps", type=int, required=True, help="every run's budget (no early stop)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--algos", nargs="+", default=list(ALGOS), choices=list(ALGOS))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--jobs", type=int, default=1, help="trainings run at once")
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(own)
    if args.total_timesteps <= 0 or args.jobs <= 0 or any(s < 0 for s in args.seeds):
        p.error("--total-timesteps and --jobs must be positive and --seeds >= 0")
    return args, train_args


def command(args: argparse.Namespace, algo: str, seed: int, run_dir: Path, train_args: list[str]) -> list[str]:
    """The `fastppo train` command of one run: a new one, or the resume of an interrupted one."""
    base = [sys.executable, "-m", "fastppo", "train"]
    if list_checkpoints(str(run_dir)):
        return [*base, "--resume", str(run_dir), "--log-seconds", "30"]
    return [*base, "--env-id", args.env_id, *ALGOS[algo], "--seed", str(seed), "--total-timesteps",
            str(args.total_timesteps), "--device", args.device, "--run-dir", str(run_dir), "--log-seconds", "30",
            *train_args]


def finished(run_dir: Path, total: int) -> bool:
    try:
        lines = read_metrics(str(run_dir))
    except ConfigError:
        return False
    return lines[-1]["iteration"] == lines[-1]["num_iterations"] and lines[-1]["global_step"] <= total


def first_reach(lines: list[dict], target: float) -> tuple[int | None, float | None]:
    """(agent steps, wall-clock seconds) at the first line whose recent return reaches target."""
    for m in lines:
        if m.get("charts/recent_return") is not None and m["charts/recent_return"] >= target:
            return m["global_step"], m["time/elapsed"]
    return None, None


def update_stats(lines: list[dict]) -> dict:
    """How far each update moved the policy and what it cost: the KL after the update (``losses/kl``:
    PPO-penalty and TRPO measure it over the whole batch, PPO-clip on the last minibatch), its mean and
    maximum over the iterations, the steps per second of the whole run, and for TRPO the fraction of
    accepted steps and the mean number of line-search points tried."""
    kls = [m["losses/kl"] for m in lines if m.get("losses/kl") is not None]
    stats = {"mean_kl": sum(kls) / len(kls) if kls else None, "max_kl": max(kls, default=None),
             "steps_per_second": lines[-1]["global_step"] / lines[-1]["time/elapsed"]}
    if "trpo/accepted" in lines[-1]:
        stats["trpo_accepted"] = sum(m["trpo/accepted"] for m in lines) / len(lines)
        stats["trpo_line_search_steps"] = sum(m["trpo/line_search_steps"] for m in lines) / len(lines)
    return stats


def main(argv: list[str] | None = None) -> int:
    args, train_args = parse(list(sys.argv[1:] if argv is None else argv))
    out_dir = Path(args.out_dir)
    runs = {(a, s): out_dir / "runs" / f"algorithms_{args.env_id}_{a}_{s}" for a in args.algos for s in args.seeds}
    for run_dir in runs.values():  # a run of another budget is neither reused nor resumed
        budget = read_config(str(run_dir)).get("total_timesteps") if (run_dir / "config.json").exists() else None
        if budget not in (None, args.total_timesteps):
            print(f"algorithms.py: error: {run_dir} was trained with --total-timesteps {budget}, not "
                  f"{args.total_timesteps}; give that budget or another --out-dir", file=sys.stderr)
            return 2
    todo = [(key, run) for key, run in runs.items() if not finished(run, args.total_timesteps)]
    running: list[tuple[tuple[str, int], subprocess.Popen]] = []
    failed = []
    while todo or running:
        while todo and len(running) < args.jobs:
            (algo, seed), run_dir = todo.pop(0)
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            log = open(run_dir.parent / f"{run_dir.name}.log", "a")
            print(f"start {args.env_id} {algo} seed {seed}", flush=True)
            proc = subprocess.Popen(command(args, algo, seed, run_dir, train_args), stdout=log,
                                    stderr=subprocess.STDOUT)
            running.append(((algo, seed), proc))
        time.sleep(2)
        for item in list(running):
            if item[1].poll() is not None:
                running.remove(item)
                print(f"done {args.env_id} {item[0][0]} seed {item[0][1]}: exit {item[1].returncode}", flush=True)
                if item[1].returncode != 0:
                    failed.append(item[0])
    if failed:
        print(f"algorithms.py: error: runs failed: {failed} (see their .log files under {out_dir / 'runs'})",
              file=sys.stderr)
        return 1

    results = []
    for (algo, seed), run_dir in runs.items():
        lines = read_metrics(str(run_dir))
        steps, seconds = first_reach(lines, args.target)
        recent = [m["charts/recent_return"] for m in lines if m.get("charts/recent_return") is not None]
        results.append({"algo": algo, "seed": seed, "steps_to_target": steps, "seconds_to_target": seconds,
                        "best_recent_return": max(recent, default=None), "final_recent_return": recent[-1] if recent
                        else None, "steps": lines[-1]["global_step"], "seconds": lines[-1]["time/elapsed"],
                        **update_stats(lines), "run": run_dir.name})
    stem = out_dir / f"algorithms_{args.env_id}"
    with open(f"{stem}.json", "w") as f:
        json.dump({"env_id": args.env_id, "target": args.target, "total_timesteps": args.total_timesteps,
                   "train_args": train_args, "results": results, "machine": machine()}, f, indent=1)
    plot_runs(PlotConfig(runs=tuple(str(run) for run in runs.values()), out=f"{stem}.png"))
    print(table(results, args.target, args.env_id))
    print(f"wrote {stem}.json and .png")
    return 0


def table(results: list[dict], target: float, env_id: str) -> str:
    """Markdown: per algorithm, the steps to the target for each seed, their mean, and the final returns."""
    seeds = sorted({r["seed"] for r in results})
    head = (f"| {env_id}: steps to a recent return of {target:g} | " + " | ".join(f"seed {s}" for s in seeds)
            + " | mean (reached) | seconds, mean | final recent return, mean | KL after update, mean / max | steps/s |")
    rows = [head, "| --- " * (len(seeds) + 6) + "|"]
    for algo in dict.fromkeys(r["algo"] for r in results):
        mine = {r["seed"]: r for r in results if r["algo"] == algo}
        steps = [mine[s]["steps_to_target"] for s in seeds]
        reached = [x for x in steps if x is not None]
        secs = [mine[s]["seconds_to_target"] for s in seeds if mine[s]["seconds_to_target"] is not None]
        finals = [mine[s]["final_recent_return"] for s in seeds if mine[s]["final_recent_return"] is not None]
        cells = [f"{x:,}" if x is not None else "not reached" for x in steps]
        mean = f"{sum(reached) / len(reached):,.0f} ({len(reached)}/{len(seeds)})" if reached else "-"
        kls = [mine[s]["mean_kl"] for s in seeds if mine[s]["mean_kl"] is not None]
        max_kls = [mine[s]["max_kl"] for s in seeds if mine[s]["max_kl"] is not None]
        sps = [mine[s]["steps_per_second"] for s in seeds]
        rows.append(f"| {algo} | " + " | ".join(cells) + f" | {mean} | "
                    + (f"{sum(secs) / len(secs):,.0f}" if secs else "-") + " | "
                    + (f"{sum(finals) / len(finals):,.1f}" if finals else "-") + " | "
                    + (f"{sum(kls) / len(kls):.4f} / {max(max_kls):.4f}" if kls else "-")
                    + f" | {sum(sps) / len(sps):,.0f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
