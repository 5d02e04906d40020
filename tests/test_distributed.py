"""Data-parallel training under torchrun, on CPU with gloo: ranks stay in lockstep, rank 0 alone writes,
one rank matches the plain run, bad launches fail fast, and two ranks learn CartPole."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from helpers import read_metrics

from fastppo.checkpoint import load_checkpoint
from fastppo.cli import main
from fastppo.config import ConfigError
from fastppo.distributed import World, env_threads, rank_seeds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CARTPOLE = ["train", "--env-id", "CartPole-v1", "--device", "cpu"]


def rank_env(**extra: str) -> dict[str, str]:
    """The test's environment for child processes: this checkout's fastppo, one thread per rank."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(extra)
    return env


def torchrun(nproc: int, args: list[str], cwd, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node nproc <args>` (standalone picks a free port)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    return subprocess.run(cmd, cwd=cwd, env=rank_env(**env), capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(nproc: int, args: list[str], cwd, ranks: int | None = None) -> list[subprocess.Popen]:
    """Start `python -m fastppo <args>` as ranks 0..ranks-1 of nproc the way torchrun does, without its agent.

    torchrun stops all ranks as soon as one fails; started by hand, each rank's own exit code and
    stderr show what fastppo itself does.
    """
    port = str(free_port())
    return [
        subprocess.Popen(
            [sys.executable, "-m", "fastppo", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=rank_env(WORLD_SIZE=str(nproc), RANK=str(r), LOCAL_RANK=str(r),
                                    LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
        )
        for r in range(nproc if ranks is None else ranks)
    ]


def without_timings(metrics: list[dict]) -> list[dict]:
    """The metrics lines less the wall-clock ones (charts/SPS, time/*, perf/*)."""
    return [{k: v for k, v in m.items() if k != "charts/SPS" and not k.startswith(("time/", "perf/"))}
            for m in metrics]


def fastppo_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("fastppo:")]


# --- helpers of fastppo.distributed -------------------------------------------------------------


def test_world_from_env():
    assert World.from_env({}) == World()
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert World.from_env(env) == World(rank=3, local_rank=1, size=4, local_size=2, launched=True)
    with pytest.raises(ConfigError, match="torchrun environment is incomplete"):
        World.from_env({"WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="RANK 2 of WORLD_SIZE 2"):
        World.from_env({"WORLD_SIZE": "2", "RANK": "2"})


def test_rank_seeds_never_overlap_and_rank0_is_the_plain_run():
    assert rank_seeds(7, 4, 0) == (7, 7)
    env_seeds = [set(range(s, s + 4)) for _, s in (rank_seeds(7, 4, r) for r in range(3))]
    assert set.union(*env_seeds) == set(range(7, 19))


def test_env_threads_split_across_local_ranks():
    one = World()
    four = World(rank=1, local_rank=1, size=8, local_size=4, launched=True)
    assert env_threads(0, 64, one, cpus=16) == 0  # EnvPool's default, as in a plain run
    assert env_threads(0, 64, four, cpus=16) == 4
    assert env_threads(0, 2, four, cpus=16) == 2  # no more threads than envs
    assert env_threads(0, 64, four, cpus=2) == 1
    assert env_threads(3, 64, four, cpus=16) == 3  # the user's value wins


# --- torchrun runs --------------------------------------------------------------------------------

# Each worker records its parameters at the end, next to rank 0's checkpoint.
CAPTURE_PARAMS = textwrap.dedent("""
    import os, sys, torch
    import fastppo.trainer
    from fastppo.cli import main
    made = []
    def capture(info, make=fastppo.trainer.make_policy):
        made.append(make(info))
        return made[-1]
    fastppo.trainer.make_policy = capture
    code = main(sys.argv[1:])
    torch.save(made[0].state_dict(), os.path.join(os.environ["PARAMS_DIR"], f"rank{os.environ['RANK']}.pt"))
    sys.exit(code)
""")


def test_two_ranks_stay_identical_and_only_rank0_writes(tmp_path):
    """2 ranks x 2 envs, 8 iterations of PPO-penalty with --target-kl (both all-reduced host decisions).

    No --run-dir: each rank would name a different default folder, so a second folder would show a
    rank other than 0 writing.
    """
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "capture.py").write_text(CAPTURE_PARAMS)
    proc = torchrun(2, [str(tmp_path / "capture.py"), *CARTPOLE, "--num-envs", "2", "--total-timesteps", "4096",
                        "--loss", "penalty", "--target-kl", "0.0002", "--save-every", "4", "--dist-timeout", "60"],
                    cwd=work, PARAMS_DIR=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]

    runs = os.listdir(work / "runs")
    assert len(runs) == 1, runs
    run_dir = work / "runs" / runs[0]
    assert sorted(os.listdir(run_dir)) == [".lock", "README.md", "checkpoints", "config.json", "metrics.jsonl"]
    metrics = read_metrics(run_dir)
    assert [m["global_step"] for m in metrics] == [512 * i for i in range(1, 9)]  # 2 ranks x 2 envs x 128
    assert proc.stdout.count("iter 1/8 ") == 1  # one progress line per iteration, from rank 0
    epochs = [m["losses/epochs"] for m in metrics]
    assert min(epochs) < 4 == max(epochs)  # the early stop fired on some iterations, not on all
    assert len({m["losses/kl_coef"] for m in metrics}) > 1

    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    ckpt = load_checkpoint(str(run_dir))
    assert ckpt["global_step"] == 4096 and ckpt["config"]["world_size"] == 2
    for name, tensor in ckpt["model"].items():
        assert torch.equal(rank0[name], rank1[name]), name  # bit-identical, not merely close
        assert torch.equal(tensor, rank1[name]), name


@pytest.mark.parametrize("env_id,extra", [
    ("CartPole-v1", ["--algo", "trpo"]),
    ("Pendulum-v1", ["--num-steps", "64", "--num-minibatches", "2"]),
    ("Pendulum-v1", ["--num-steps", "64", "--num-minibatches", "2", "--norm-value", "True", "--lr-schedule",
                     "adaptive"]),
], ids=["trpo", "gaussian-normalised", "value-normalised-adaptive-lr"])
def test_two_ranks_stay_identical_with_trpo_and_with_normalisation(tmp_path, env_id, extra):
    """TRPO's reductions (surrogate gradient, Fisher-vector products, line-search decisions, critic
    gradients), the observation/reward statistics combined across ranks, and the value statistics and
    adaptive learning rate (every rank's returns merged before each update; the rate moved by the KL
    averaged over the ranks) keep both ranks' parameters and statistics bit-identical."""
    (tmp_path / "capture.py").write_text(CAPTURE_PARAMS)
    run_dir = tmp_path / "run"
    proc = torchrun(2, [str(tmp_path / "capture.py"), "train", "--env-id", env_id, "--device", "cpu", "--num-envs",
                        "2", "--total-timesteps", str(4 * 2 * 2 * (64 if env_id == "Pendulum-v1" else 128)),
                        "--run-dir", str(run_dir), "--dist-timeout", "60", *extra], cwd=tmp_path,
                    PARAMS_DIR=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    ckpt = load_checkpoint(str(run_dir))
    assert all(torch.equal(ckpt["model"][k], rank0[k]) for k in rank0)
    if env_id == "Pendulum-v1":  # statistics of both ranks' envs: 2 x 2 envs x 4 rollouts of 64 observations
        assert float(ckpt["normalizer"]["obs"]["count"]) == pytest.approx(4 * 4 * 64 + 4 + 1e-4)
    if "--norm-value" in extra:  # every valid return of both ranks: 4 envs x 256 steps, less 1 reset step each
        assert float(ckpt["normalizer"]["value"]["count"]) == pytest.approx(4 * 256 - 4 + 1e-4)
        assert len({m["charts/learning_rate"] for m in read_metrics(run_dir)}) > 1


def test_one_rank_under_torchrun_matches_the_plain_run(tmp_path):
    args = [*CARTPOLE, "--total-timesteps", "4096", "--seed", "3"]
    # Both as child processes with one thread: CPU float results may depend on the thread count.
    plain = subprocess.run([sys.executable, "-m", "fastppo", *args, "--run-dir", str(tmp_path / "plain")],
                           cwd=tmp_path, env=rank_env(), capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0, plain.stderr[-3000:]
    proc = torchrun(1, ["-m", "fastppo", *args, "--run-dir", str(tmp_path / "one")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain, one = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "one")
    assert without_timings(plain) == without_timings(one)
    a, b = load_checkpoint(str(tmp_path / "plain")), load_checkpoint(str(tmp_path / "one"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.parametrize("case", ["run-dir-holds-a-run", "num-envs-0"])
def test_bad_input_fails_every_rank_with_one_line(case, tmp_path):
    """A refused run folder is found on rank 0 after the ranks meet; a bad value before they meet."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"global_step": 1}\n')
    if case == "num-envs-0":
        run_dir, extra = tmp_path / "new", ["--num-envs", "0"]
        message = "fastppo: error: --num-envs must be positive, got 0"
    else:
        extra = []
        message = f"fastppo: error: --run-dir '{run_dir}' already holds a run (metrics.jsonl); choose another folder"
    ranks = start_ranks(2, [*CARTPOLE, "--run-dir", str(run_dir), "--dist-timeout", "30", *extra], cwd=tmp_path)
    for proc in ranks:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, err
        assert fastppo_lines(err) == [message]
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == '{"global_step": 1}\n'
    assert not (tmp_path / "new").exists()


def test_a_rank_that_never_comes_is_an_error_after_the_timeout(tmp_path):
    args = [*CARTPOLE, "--run-dir", str(tmp_path / "run"), "--dist-timeout", "3"]
    (rank0,) = start_ranks(2, args, cwd=tmp_path, ranks=1)  # rank 1 is never started
    _, err = rank0.communicate(timeout=60)
    assert rank0.returncode == 1, err
    lines = fastppo_lines(err)
    assert len(lines) == 1 and "rank 0 of 2 could not meet the other ranks" in lines[0], err[-3000:]
    assert not (tmp_path / "run").exists()


def test_a_stalled_rank_is_an_error_after_the_timeout(tmp_path):
    ranks = start_ranks(2, [*CARTPOLE, "--run-dir", str(tmp_path / "run"), "--total-timesteps", "10000000",
                            "--dist-timeout", "5"], cwd=tmp_path)
    rank0, rank1 = ranks
    try:
        deadline = time.time() + 120
        metrics = tmp_path / "run" / "metrics.jsonl"
        while not metrics.exists() or metrics.read_text().count("\n") < 2:  # two iterations done
            assert rank0.poll() is None and time.time() < deadline, "rank 0 stopped before training ran"
            time.sleep(0.5)
        rank1.send_signal(signal.SIGSTOP)  # alive, holding its sockets, never answering
        start = time.time()
        _, err = rank0.communicate(timeout=60)
        assert rank0.returncode == 1, err
        lines = fastppo_lines(err)
        assert len(lines) == 1 and "rank 0" in lines[0] and "--dist-timeout" in lines[0], err[-3000:]
        assert time.time() - start < 30
    finally:
        rank1.kill()
        rank1.communicate()


# Each worker lists its gloo threads once main() has returned, into a file of its own (the ranks share one
# stderr, where their lines can interleave).
GLOO_THREADS_AFTER_RUN = textwrap.dedent("""
    import os, sys
    from fastppo.cli import main
    code = main(sys.argv[1:])
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    with open(f"threads_rank{os.environ['RANK']}.txt", "w") as f:
        f.write(f"gloo threads left: {sorted(n for n in names if 'gloo' in n)}")
    sys.exit(code)
""")


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="lists threads through /proc")
def test_the_process_group_is_gone_when_the_run_returns(tmp_path):
    """Its worker threads joined: a group kept alive past destroy_process_group (torch._dynamo, imported
    while the group is up, keeps it) lets a worker free a collective's tensors while the interpreter shuts
    down, and the process then aborts, now and then, after a finished run ("terminate called without an active
    exception")."""
    (tmp_path / "threads.py").write_text(GLOO_THREADS_AFTER_RUN)
    proc = torchrun(2, [str(tmp_path / "threads.py"), *CARTPOLE, "--num-envs", "2", "--num-steps", "64",
                        "--total-timesteps", "512", "--run-dir", str(tmp_path / "run")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in range(2):
        assert (tmp_path / f"threads_rank{rank}.txt").read_text() == "gloo threads left: []"


def test_two_ranks_resume_exactly(tmp_path):
    """A 2-rank run resumed from its iteration-4 checkpoint equals the run that went straight on:
    each rank replays its own envs' actions and gets its own RNG states back."""
    args = [*CARTPOLE, "--num-envs", "2", "--num-steps", "64", "--total-timesteps", "2048", "--seed", "5",
            "--save-every", "4"]
    proc = torchrun(2, ["-m", "fastppo", *args, "--run-dir", str(tmp_path / "straight")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    os.remove(tmp_path / "resumed" / "checkpoints" / "ckpt_0000008.pt")  # as if stopped after iteration 4
    proc = torchrun(2, ["-m", "fastppo", "train", "--resume", str(tmp_path / "resumed")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [m["global_step"] for m in resumed] == [256 * i for i in range(1, 9)]
    assert without_timings(resumed) == without_timings(straight)
    a, b = load_checkpoint(str(tmp_path / "straight")), load_checkpoint(str(tmp_path / "resumed"))
    assert a["actions"].shape == (8 * 64, 2 * 2) and torch.equal(a["actions"], b["actions"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_resume_with_another_world_size_is_refused(tmp_path, capsys):
    """A run made by 2 ranks (here: a plain run relabelled so, in its checkpoint and its folder)."""
    run_dir = tmp_path / "run"
    assert main([*CARTPOLE, "--num-envs", "2", "--total-timesteps", "512", "--run-dir", str(run_dir)]) == 0
    [path] = glob.glob(str(run_dir / "checkpoints" / "*.pt"))
    state = torch.load(path, weights_only=True)
    state["config"]["world_size"] = 2
    torch.save(state, path)
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps(dict(config, world_size=2)))
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir), "--total-timesteps", "4096"]) == 2
    assert "was trained by 2 rank(s); resume it with 2 (this launch has 1)" in capsys.readouterr().err


@pytest.mark.slow
def test_two_ranks_learn_cartpole_to_450(tmp_path):
    """The single-process learning test split over 2 ranks x 2 envs (the same 4 envs) with the same
    500k global-step budget; it stops once the mean of the last 10 games (all ranks) reaches 450."""
    proc = torchrun(2, ["-m", "fastppo", *CARTPOLE, "--num-envs", "2", "--total-timesteps", "500000", "--seed", "1",
                        "--run-dir", str(tmp_path / "run"), "--target-return", "450"], cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("target return 450.0 reached: mean of the last 10 games") == 1  # rank 0 only
    metrics = read_metrics(tmp_path / "run")
    assert metrics[-1]["global_step"] < 500_000
