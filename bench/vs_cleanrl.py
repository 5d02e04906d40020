"""fastppo's ``--preset cleanrl`` against CleanRL's own script at the same settings, on CPU, in alternating runs.

    python bench/vs_cleanrl.py --cleanrl-script ../cleanrl/cleanrl/ppo_continuous_action.py \\
        --cleanrl-python ../cleanrl-venv/bin/python                 # HalfCheetah-v4, 1 env x 2048 steps
    python bench/vs_cleanrl.py --cleanrl-script ../cleanrl/cleanrl/ppo_atari_envpool.py \\
        --cleanrl-python ../cleanrl-venv/bin/python                 # Pong-v5, 8 envs x 128 steps
    python bench/vs_cleanrl.py ... --rounds 5 --seconds 90 --torch-threads 1

CleanRL is not part of fastppo: its script and the interpreter that has its dependencies are given.
A venv for both scripts (Python 3.11; CleanRL pins gym 0.23.1 for its EnvPool scripts, whose old
4-tuple step API envpool 0.8.4 keeps under gym < 0.26):

    python3 -m venv cleanrl-venv
    cleanrl-venv/bin/pip install torch==2.13.0      # first: the CPU build
    cleanrl-venv/bin/pip install "numpy<2" gymnasium==0.29.1 mujoco==2.3.7 imageio gym==0.23.1 \\
        envpool==0.8.4 tyro tensorboard

Each round runs CleanRL's script, then ``fastppo train --preset cleanrl --device cpu``, each as a
subprocess in a temporary folder for --seconds of wall time (startup included), then stopped by
SIGINT. Both get the same env, num_envs, num_steps, seed and total timesteps (CleanRL's defaults
for the env, given to both explicitly) and the same torch threads (CleanRL's default, torch's own
choice in --cleanrl-python, unless --torch-threads is given). Both are measured the same way, from
what each process logged itself at the end of every iteration: CleanRL's TensorBoard ``charts/SPS``
events (step = global_step, wall_time = CleanRL's clock) and fastppo's metrics.jsonl (global_step,
time/elapsed). steps/s = global steps from the end of the first iteration to the last one logged,
over the seconds between the two: startup and the first iteration are left out of both. Each
process's own ``charts/SPS`` (from its start, first iteration included) is recorded too.

The envs are not the same code: CleanRL's HalfCheetah-v4 is gymnasium's (mujoco's Python bindings,
its normalisation wrappers in numpy), fastppo's is EnvPool's (C++); for Pong both are EnvPool's,
of different versions. Prints a table (per round and the median; the ratio is fastppo / CleanRL)
and writes bench/results/vs_cleanrl_<env>_cpu.json: every run's numbers, both commands, CleanRL's
commit and its interpreter's versions, and the machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastppo.bench import machine  # noqa: E402
from fastppo.config import ConfigError  # noqa: E402
from fastppo.logger import read_metrics  # noqa: E402


@dataclass(frozen=True)
class EnvSetting:
    """CleanRL's script for an env and its defaults there, given to both sides."""

    script: str
    num_envs: int
    num_steps: int
    total_timesteps: int


ENVS = {
    "HalfCheetah-v4": EnvSetting("ppo_continuous_action.py", num_envs=1, num_steps=2048, total_timesteps=1_000_000),
    "Pong-v5": EnvSetting("ppo_atari_envpool.py", num_envs=8, num_steps=128, total_timesteps=10_000_000),
}
FASTPPO = [sys.executable, "-m", "fastppo", "train"]  # this checkout's fastppo (PYTHONPATH is set to it)
STOP_GRACE = 120.0  # seconds a run may take after SIGINT (fastppo ends its iteration and saves) before SIGKILL

# Run by --cleanrl-python before the rounds: its versions and torch's thread count (under the same
# OMP_NUM_THREADS as CleanRL's runs).
PROBE = """
import importlib.metadata as m, json, platform, torch
versions = {"python": platform.python_version()}
for name in ("torch", "numpy", "gymnasium", "gym", "mujoco", "envpool", "tyro", "tensorboard"):
    try:
        versions[name] = m.version(name)
    except m.PackageNotFoundError:
        pass
print(json.dumps({"versions": versions, "torch_threads": torch.get_num_threads()}))
"""


@dataclass
class Args:
    cleanrl_script: str | None = None
    """CleanRL's ppo_continuous_action.py (HalfCheetah-v4) or ppo_atari_envpool.py (Pong-v5)"""
    cleanrl_python: str = sys.executable
    """the interpreter that has CleanRL's dependencies"""
    env_id: str | None = None
    """HalfCheetah-v4 or Pong-v5 (None: the env of --cleanrl-script's name)"""
    rounds: int = 3
    """rounds of one CleanRL run then one fastppo run"""
    seconds: float = 60.0
    """wall seconds of each run, startup included"""
    torch_threads: int = 0
    """torch CPU threads of both (0: CleanRL's default, torch's own choice in --cleanrl-python, and
    fastppo gets --torch-threads that many; N: OMP_NUM_THREADS=N for CleanRL, --torch-threads N for fastppo)"""
    seed: int = 1
    """seed of both"""
    cleanrl_commit: str | None = None
    """CleanRL's commit the script came from, for the JSON (None: git's, when the script lies in a
    CleanRL checkout; the script's git blob hash is recorded either way)"""
    out: str = str(ROOT / "bench" / "results")
    """folder for vs_cleanrl_<env>_cpu.json"""


def env_of(args: Args) -> str:
    """--env-id, or the env whose CleanRL script --cleanrl-script is named after (ValueError when none)."""
    if args.env_id is not None:
        return args.env_id
    name = os.path.basename(args.cleanrl_script or "")
    for env_id, setting in ENVS.items():
        if name == setting.script:
            return env_id
    scripts = ", ".join(s.script for s in ENVS.values())
    raise ValueError(f"--env-id is needed: {name!r} is not one of CleanRL's {scripts}")


def error(args: Args) -> str | None:
    """One line naming the first bad value, or None."""
    if args.cleanrl_script is None:
        return "--cleanrl-script is needed (CleanRL's ppo_continuous_action.py or ppo_atari_envpool.py)"
    if not os.path.isfile(args.cleanrl_script):
        return f"--cleanrl-script {args.cleanrl_script!r} is not a file"
    if not (os.path.isfile(args.cleanrl_python) and os.access(args.cleanrl_python, os.X_OK)):
        return f"--cleanrl-python {args.cleanrl_python!r} is not an executable file"
    try:
        env_id = env_of(args)
    except ValueError as e:
        return str(e)
    if env_id not in ENVS:
        return f"--env-id {env_id!r} is not one of {', '.join(ENVS)}"
    name, script = os.path.basename(args.cleanrl_script), ENVS[env_id].script
    if name != script and name in {s.script for s in ENVS.values()}:
        return f"--env-id {env_id} needs CleanRL's {script}, got {name}"
    if importlib.util.find_spec("tensorboard") is None:
        return "reading CleanRL's TensorBoard events needs tensorboard: pip install 'fastppo[tensorboard]'"
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        return f"--out {args.out!r} exists and is not a folder"
    if args.rounds < 1:
        return f"--rounds must be >= 1, got {args.rounds}"
    if not (math.isfinite(args.seconds) and args.seconds > 0):
        return f"--seconds must be a positive number, got {args.seconds}"
    if args.torch_threads < 0:
        return f"--torch-threads must be >= 0, got {args.torch_threads}"
    return None


def cleanrl_command(args: Args, env_id: str) -> list[str]:
    s = ENVS[env_id]
    return [args.cleanrl_python, os.path.abspath(args.cleanrl_script), "--env-id", env_id, "--num-envs",
            str(s.num_envs), "--num-steps", str(s.num_steps), "--seed", str(args.seed), "--total-timesteps",
            str(s.total_timesteps), "--no-cuda"]


def fastppo_command(args: Args, env_id: str, threads: int, run_dir: str) -> list[str]:
    s = ENVS[env_id]
    return [*FASTPPO, "--preset", "cleanrl", "--device", "cpu", "--env-id", env_id, "--num-envs", str(s.num_envs),
            "--num-steps", str(s.num_steps), "--seed", str(args.seed), "--total-timesteps", str(s.total_timesteps),
            "--torch-threads", str(threads), "--run-dir", run_dir]


def cleanrl_env(args: Args) -> dict[str, str]:
    env = dict(os.environ)
    if args.torch_threads:
        env["OMP_NUM_THREADS"] = str(args.torch_threads)  # torch reads it at startup
    return env


def probe(args: Args) -> dict:
    """--cleanrl-python's versions and torch threads (RuntimeError with its last line when it fails)."""
    proc = subprocess.run([args.cleanrl_python, "-c", PROBE], capture_output=True, text=True, timeout=300,
                          env=cleanrl_env(args))
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"--cleanrl-python {args.cleanrl_python!r} cannot import torch: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def script_identity(args: Args) -> dict:
    """The script's git blob hash (as `git hash-object`: findable in CleanRL's history) and commit."""
    data = Path(args.cleanrl_script).read_bytes()
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    commit = args.cleanrl_commit
    if commit is None:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            folder = os.path.dirname(os.path.abspath(args.cleanrl_script))
            commit = subprocess.run(["git", "-C", folder, "log", "-1", "--format=%H", "--", args.cleanrl_script],
                                    capture_output=True, text=True, check=True).stdout.strip() or None
    return {"path": os.path.abspath(args.cleanrl_script), "git_blob": blob, "commit": commit}


def run_for(cmd: list[str], cwd: str, env: dict[str, str], seconds: float, log: str) -> dict:
    """Run cmd for `seconds` of wall time, then SIGINT it (SIGKILL after STOP_GRACE); output to `log`."""
    start = time.perf_counter()
    with open(log, "w") as out:
        # SIGINT back to its default in the child, so Python turns it into KeyboardInterrupt even when
        # this bench was started with SIGINT ignored (a background job of a non-interactive shell)
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            try:
                code = proc.wait(timeout=seconds)
                ended = "itself"
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)
                ended = "SIGINT"
                code = proc.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            ended = "SIGKILL"
        finally:
            if proc.poll() is None:
                proc.kill()
                code = proc.wait()
    return {"wall_seconds": time.perf_counter() - start, "exit_code": code, "ended_by": ended}


def steps_per_second(points: list[tuple[int, float]]) -> float | None:
    """(global_step, seconds) at the end of each iteration, in order: the steps from the end of the
    first iteration to the last, over the seconds between them (None with fewer than 2 points)."""
    if len(points) < 2 or points[-1][1] <= points[0][1]:
        return None
    return (points[-1][0] - points[0][0]) / (points[-1][1] - points[0][1])


def cleanrl_points(folder: str) -> tuple[list[tuple[int, float]], float | None]:
    """CleanRL's charts/SPS events under folder/runs/ (SummaryWriter's run folder): (step, wall_time)
    per iteration and the last value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = []
    for run in sorted(Path(folder, "runs").glob("*")):
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
        acc.Reload()
        if "charts/SPS" in acc.Tags()["scalars"]:
            events += acc.Scalars("charts/SPS")
    events.sort(key=lambda e: e.step)
    return [(e.step, e.wall_time) for e in events], (events[-1].value if events else None)


def fastppo_points(run_dir: str) -> tuple[list[tuple[int, float]], float | None]:
    """fastppo's metrics.jsonl: (global_step, time/elapsed) per iteration and the last charts/SPS."""
    try:
        lines = read_metrics(run_dir)
    except ConfigError:  # killed before its first line
        return [], None
    return [(m["global_step"], m["time/elapsed"]) for m in lines], lines[-1]["charts/SPS"]


def tail(log: str, n: int = 3) -> str:
    with open(log, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    return " | ".join(lines[-n:]) or "no output"


def measure(side: str, cmd: list[str], cwd: str, env: dict[str, str], args: Args, run_dir: str) -> dict:
    """One run of one side: its wall time, end, and steps/s (RuntimeError when it logged under 2 iterations)."""
    os.makedirs(cwd)
    log = os.path.join(cwd, "output.txt")
    run = run_for(cmd, cwd, env, args.seconds, log)
    points, reported = (cleanrl_points if side == "cleanrl" else fastppo_points)(run_dir)
    sps = steps_per_second(points)
    if sps is None:
        who = "CleanRL" if side == "cleanrl" else side
        raise RuntimeError(f"{who}'s run logged {len(points)} iteration(s) in {args.seconds:g} s (exit code "
                           f"{run['exit_code']}), 2 are needed: raise --seconds; its output ended: {tail(log)}")
    run.update(steps_per_second=sps, reported_sps=reported, iterations=len(points), first=list(points[0]),
               last=list(points[-1]))
    return run


def main(args: Args) -> dict:
    env_id = env_of(args)
    info = probe(args)
    threads = args.torch_threads or info["torch_threads"]
    fastppo_env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    rounds = []
    with tempfile.TemporaryDirectory(prefix="vs_cleanrl_") as tmp:
        for r in range(1, args.rounds + 1):
            cwd = os.path.join(tmp, f"cleanrl_{r}")
            cleanrl = measure("cleanrl", cleanrl_command(args, env_id), cwd, cleanrl_env(args), args, cwd)
            print(f"round {r}: CleanRL {cleanrl['steps_per_second']:,.0f} steps/s", flush=True)
            cwd = os.path.join(tmp, f"fastppo_{r}")
            run_dir = os.path.join(cwd, "run")
            fast = measure("fastppo", fastppo_command(args, env_id, threads, run_dir), cwd, fastppo_env, args, run_dir)
            with open(os.path.join(run_dir, "config.json")) as f:
                fast["torch_threads"] = json.load(f)["torch_threads"]
            print(f"round {r}: fastppo {fast['steps_per_second']:,.0f} steps/s", flush=True)
            rounds.append({"round": r, "cleanrl": cleanrl, "fastppo": fast,
                           "ratio": fast["steps_per_second"] / cleanrl["steps_per_second"]})
    median = {side: statistics.median(r[side]["steps_per_second"] for r in rounds) for side in ("cleanrl", "fastppo")}
    s = ENVS[env_id]
    result = {
        "settings": {"env_id": env_id, "num_envs": s.num_envs, "num_steps": s.num_steps, "seed": args.seed,
                     "total_timesteps": s.total_timesteps, "rounds": args.rounds, "seconds": args.seconds,
                     "torch_threads": {"asked": args.torch_threads, "cleanrl": info["torch_threads"],
                                       "fastppo": threads}},
        "measure": "global steps from the end of the first iteration to the last logged one / seconds between them",
        "commands": {"cleanrl": cleanrl_command(args, env_id),
                     "cleanrl_env": {"OMP_NUM_THREADS": str(args.torch_threads)} if args.torch_threads else {},
                     "fastppo": fastppo_command(args, env_id, threads, "<temporary folder>")},
        "cleanrl": {"script": script_identity(args), "versions": info["versions"]},
        "machine": machine(),
        "rounds": rounds,
        "median_steps_per_second": median,
        "ratio_median": statistics.median(r["ratio"] for r in rounds),
    }
    m = result["machine"]
    print(f"\n{env_id}, {s.num_envs} env(s) x {s.num_steps} steps, seed {args.seed}, torch threads "
          f"{info['torch_threads']} (CleanRL) / {threads} (fastppo), {args.seconds:g} s runs, "
          f"{m['cpu']} ({m['cpu_cores']} cores); steps/s after the first iteration")
    print(f"{'round':<7} {'CleanRL':>9} {'fastppo':>9} {'fastppo/CleanRL':>16}")
    for r in rounds:
        print(f"{r['round']:<7} {r['cleanrl']['steps_per_second']:>9,.0f} {r['fastppo']['steps_per_second']:>9,.0f} "
              f"{r['ratio']:>16.2f}")
    print(f"{'median':<7} {median['cleanrl']:>9,.0f} {median['fastppo']:>9,.0f} {result['ratio_median']:>16.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"vs_cleanrl_{env_id}_cpu.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    cli_args = tyro.cli(Args, description=__doc__.split("\n\n")[0])
    if (message := error(cli_args)) is not None:
        print(f"vs_cleanrl.py: error: {message}", file=sys.stderr)
        sys.exit(2)
    try:
        main(cli_args)
    except RuntimeError as e:
        print(f"vs_cleanrl.py: error: {e}", file=sys.stderr)
        sys.exit(1)
