"""Runs people can watch and keep: checkpoints and exact resume, SIGTERM, W&B tracking, progress."""

from __future__ import annotations

import copy
import glob
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import (
    folder_digest,
    read_finished_wandb_records,
    read_metrics,
    subprocess_env,
    two_iteration_cartpole,
    wait_for_lines,
    wandb_history,
    without_timings,
)

import fastppo.trainer
from fastppo.checkpoint import list_checkpoints, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from fastppo.cli import main
from fastppo.logger import RunLogger

CARTPOLE = ["train", "--env-id", "CartPole-v1", "--device", "cpu"]


@pytest.fixture
def wandb_home(tmp_path, monkeypatch):
    """Keep W&B's settings, cache and artifact staging out of the user's home."""
    home = tmp_path / "wandb_home"
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return home


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A finished 2-iteration CartPole run with a checkpoint at each iteration."""
    return two_iteration_cartpole(tmp_path_factory, "short")


# --- checkpoints ------------------------------------------------------------------------------
def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(4), np.random.normal(size=3), random.random())
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(4), np.random.normal(size=3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_checkpoint_killed_between_write_and_rename_keeps_the_previous_one(tmp_path):
    """A process killed (SIGKILL) after writing its temporary file, before the rename."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()  # a checkpoint never makes its run folder (one removed under a run stays removed)
    script = f"""
import os, signal, torch
import fastppo.checkpoint as ck
ck.save_checkpoint({str(run_dir)!r}, 1, {{"model": {{"w": torch.ones(3)}}, "config": {{"env_id": "CartPole-v1"}},
                                        "iteration": 1, "global_step": 8}})
def killed(src, dst):
    os.kill(os.getpid(), signal.SIGKILL)
ck.os.replace = killed
ck.save_checkpoint({str(run_dir)!r}, 2, {{"model": {{"w": torch.zeros(3)}}, "config": {{"env_id": "CartPole-v1"}},
                                        "iteration": 2, "global_step": 16}})
"""
    proc = subprocess.run([sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert glob.glob(str(run_dir / "checkpoints" / "ckpt_0000002.pt.tmp.*")), "the kill came after the write"
    assert [os.path.basename(p) for p in list_checkpoints(str(run_dir))] == ["ckpt_0000001.pt"]
    state = load_checkpoint(str(run_dir))
    assert state["iteration"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    # the next save clears the leftover
    save_checkpoint(str(run_dir), 3, {"model": {}, "config": {}, "iteration": 3, "global_step": 24})
    assert not glob.glob(str(run_dir / "checkpoints" / "*.tmp.*"))


def interrupt_at_iteration(monkeypatch, iteration: int, signum=signal.SIGTERM):
    """Deliver a real signal to this process during the given iteration's update."""
    real = fastppo.trainer.compute_advantages
    calls = {"n": 0}

    def signalling(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == iteration:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(fastppo.trainer, "compute_advantages", signalling)


def test_resumed_run_matches_an_uninterrupted_one(tmp_path, monkeypatch, capsys):
    """Synchronous CPU run: SIGTERM after iteration 3 of 8, resume; every metric but the wall-clock
    ones, the parameters, the optimizer state and beta equal those of the run that was never stopped.
    PPO-penalty (beta adapts) and --eval-every (a separate pool) are on to cover their state too."""
    args = [*CARTPOLE, "--total-timesteps", "2048", "--num-steps", "64", "--seed", "3", "--loss", "penalty",
            "--eval-every", "3", "--eval-episodes", "2"]
    assert main([*args, "--run-dir", str(tmp_path / "straight")]) == 0

    interrupt_at_iteration(monkeypatch, 3)
    assert main([*args, "--run-dir", str(tmp_path / "stopped")]) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM after iteration 3 (global step 768)" in capsys.readouterr().err
    assert [m["iteration"] for m in read_metrics(tmp_path / "stopped")] == [1, 2, 3]
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the trainer put the handlers back

    assert main(["train", "--resume", str(tmp_path / "stopped")]) == 0
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "stopped")
    assert [m["global_step"] for m in resumed] == [256 * i for i in range(1, 9)]
    assert without_timings(resumed) == without_timings(straight)
    assert len({m["losses/kl_coef"] for m in straight}) > 1 and "eval/episodic_return" in straight[5]
    a, b = load_checkpoint(str(tmp_path / "straight")), load_checkpoint(str(tmp_path / "stopped"))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["kl_coef"] == b["kl_coef"] and torch.equal(a["actions"], b["actions"])
    assert b["elapsed"] > 0


def test_adaptive_learning_rate_run_resumes_exactly(tmp_path, monkeypatch, capsys):
    """--lr-schedule adaptive, whose learning rate is state rather than a function of the iteration: SIGTERM
    after iteration 3 of 8, resume; every metric (the learning rates included), the parameters and the next
    learning rate equal those of the uninterrupted run, and the learning rate did move."""
    args = [*CARTPOLE, "--total-timesteps", "2048", "--num-steps", "64", "--seed", "4", "--lr-schedule", "adaptive",
            "--kl-target", "0.002"]
    assert main([*args, "--run-dir", str(tmp_path / "straight")]) == 0
    interrupt_at_iteration(monkeypatch, 3)
    assert main([*args, "--run-dir", str(tmp_path / "stopped")]) == 128 + signal.SIGTERM
    monkeypatch.undo()
    state = load_checkpoint(str(tmp_path / "stopped"))
    assert state["iteration"] == 3 and state["adaptive_lr"] == read_metrics(tmp_path / "straight")[3][
        "charts/learning_rate"]
    assert main(["train", "--resume", str(tmp_path / "stopped")]) == 0
    capsys.readouterr()
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "stopped")
    assert without_timings(resumed) == without_timings(straight)
    assert len({m["charts/learning_rate"] for m in straight}) > 2
    a, b = load_checkpoint(str(tmp_path / "straight")), load_checkpoint(str(tmp_path / "stopped"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["adaptive_lr"] == b["adaptive_lr"]


def test_async_overlap_run_resumes_from_its_checkpoint(tmp_path, monkeypatch, capsys):
    """--async-envs --overlap (whose env steps cannot be replayed) with PPO-penalty: SIGTERM during
    iteration 3 of 6, then resume. The resumed loop starts from the checkpoint's weights, optimizer
    state, counters, beta, RNG states, acting generator and recent-return window, the LR schedule
    goes on where it was, and the envs restart on fresh seeds derived from (seed, iteration)."""
    args = [*CARTPOLE, "--total-timesteps", "3072", "--async-envs", "--overlap", "--loss", "penalty",
            "--target-return-games", "1000", "--run-dir", str(tmp_path / "r")]
    interrupt_at_iteration(monkeypatch, 3)
    assert main(args) == 128 + signal.SIGTERM
    capsys.readouterr()
    monkeypatch.undo()
    state = load_checkpoint(str(tmp_path / "r"))
    assert state["iteration"] == 3 and state["actions"] is None

    built, seeds = [], []
    real_build, real_make_envs = fastppo.trainer.build, fastppo.trainer.make_envs

    def build(prepared, world):
        session = real_build(prepared, world)
        built.append((copy.deepcopy(session.policy.state_dict()), copy.deepcopy(session.optimizer.state_dict()),
                      session.kl_ctl.beta, session.recent.state(), session.progress.global_step, torch.get_rng_state(),
                      session.collection.actor.generator.get_state()))
        return session

    monkeypatch.setattr(fastppo.trainer, "build", build)
    monkeypatch.setattr(fastppo.trainer, "make_envs", lambda *a, **k: seeds.append(a[2]) or real_make_envs(*a, **k))
    assert main(["train", "--resume", str(tmp_path / "r")]) == 0
    [(model, optimizer, beta, recent, step, rng, acting)] = built
    assert all(torch.equal(model[k], state["model"][k]) for k in model)
    for a, b in zip(optimizer["state"].values(), state["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert beta == state["kl_coef"] and recent == state["recent_returns"] and len(recent) > 10
    assert step == 1536 and torch.equal(rng, state["rng"]["torch"])
    assert torch.equal(acting, state["collection"][0]["acting_rng"])
    assert seeds and seeds[0] != 1  # fresh env seeds, not the run's first ones
    metrics = read_metrics(tmp_path / "r")
    assert [m["global_step"] for m in metrics] == [512 * i for i in range(1, 7)]
    assert [m["charts/learning_rate"] for m in metrics] == pytest.approx([2.5e-4 * (1 - i / 6) for i in range(6)])


def test_a_resume_starts_from_the_best_evaluation_on_disk(tmp_path):
    """best.pt may have been written after the checkpoint a resume starts from (iterations it redoes):
    its score still has to be beaten, so best.pt and eval/best_return keep agreeing."""
    from fastppo.checkpoint import best_score, save_best

    config = {"env_id": "CartPole-v1"}
    assert best_score(str(tmp_path), config) == -float("inf")
    save_best(str(tmp_path), {"model": {"w": torch.ones(2)}, "config": config, "iteration": 9, "global_step": 9,
                              "eval_return": 7.5})
    assert best_score(str(tmp_path), config) == 7.5


def test_a_signal_in_the_last_iteration_ends_a_finished_run(tmp_path, monkeypatch, capsys):
    """The run is complete after its last iteration: a SIGTERM during it neither reports an interruption
    nor points at a resume that has nothing left to do."""
    interrupt_at_iteration(monkeypatch, 2)
    assert main([*CARTPOLE, "--total-timesteps", "1024", "--run-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "finished after 1,024 steps (iteration 2 of 2)" in out and "--resume" not in out
    assert load_checkpoint(str(tmp_path / "r"))["iteration"] == 2


def test_sync_overlap_keeps_no_action_log_and_resumes_on_fresh_seeds(tmp_path, monkeypatch, capsys):
    """--overlap (sync envs) resumes as async runs do: its checkpoints hold no action log (the host copy
    of every action sent, which only a replay needs), and the envs restart on fresh seeds."""
    args = [*CARTPOLE, "--total-timesteps", "2048", "--overlap", "--run-dir", str(tmp_path / "r")]
    interrupt_at_iteration(monkeypatch, 2)
    assert main(args) == 128 + signal.SIGTERM
    capsys.readouterr()
    monkeypatch.undo()
    state = load_checkpoint(str(tmp_path / "r"))
    assert state["iteration"] == 2 and state["actions"] is None
    seeds = []
    real_make_envs = fastppo.trainer.make_envs
    monkeypatch.setattr(fastppo.trainer, "make_envs", lambda *a, **k: seeds.append(a[2]) or real_make_envs(*a, **k))
    assert main(["train", "--resume", str(tmp_path / "r")]) == 0
    assert seeds and seeds[0] != 1
    assert [m["global_step"] for m in read_metrics(tmp_path / "r")] == [512 * i for i in range(1, 5)]


def test_sigterm_mid_run_leaves_a_loadable_checkpoint_and_resume_continues(tmp_path):
    run_dir = tmp_path / "preempted"
    cmd = [sys.executable, "-m", "fastppo", *CARTPOLE, "--total-timesteps", "1000000", "--num-steps", "32",
           "--log-seconds", "0"]
    proc = subprocess.Popen([*cmd, "--run-dir", str(run_dir)], env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_for_lines(run_dir / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and f"fastppo train --resume {run_dir}" in err
    state = load_checkpoint(str(run_dir))
    lines = read_metrics(run_dir)
    assert state["iteration"] == len(lines) and state["global_step"] == lines[-1]["global_step"] == 128 * len(lines)

    # resume (in a new process, as after a preemption), let it run an iteration, stop it again
    proc = subprocess.Popen([sys.executable, "-m", "fastppo", "train", "--resume", str(run_dir), "--log-seconds", "0"],
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_lines(run_dir / "metrics.jsonl", len(lines) + 1, proc)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 128 + signal.SIGTERM, err
    after = read_metrics(run_dir)
    assert after[: len(lines)] == lines
    assert [m["global_step"] for m in after] == [128 * i for i in range(1, len(after) + 1)]
    assert load_checkpoint(str(run_dir))["iteration"] == len(after)


def truncated(src, dst):
    data = open(src, "rb").read()
    open(dst, "wb").write(data[: len(data) // 2])


def foreign(src, dst):
    torch.save({"weights": torch.ones(2)}, dst)


def pickled_code(src, dst):
    torch.save({"model": {}, "config": {}, "iteration": 1, "global_step": 1, "x": subprocess.Popen}, dst)


@pytest.mark.parametrize("damage,message", [
    (truncated, "cannot read checkpoint"),
    (foreign, "is not a fastppo checkpoint"),
    (pickled_code, "cannot read checkpoint"),
], ids=["truncated", "foreign", "pickled-code"])
def test_resume_from_a_bad_checkpoint_is_one_line_and_leaves_the_run(short_run, tmp_path, damage, message, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(short_run, run_dir)
    newest = list_checkpoints(str(run_dir))[-1]
    damage(newest, newest + ".new")
    os.replace(newest + ".new", newest)
    before = folder_digest(run_dir)
    assert main(["train", "--resume", str(run_dir), "--total-timesteps", "2048"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastppo: error: ") and err.count("\n") == 1 and message in err
    assert folder_digest(run_dir) == before


@pytest.mark.parametrize("extra,message", [
    ([], "already ran 2 of its 2 iterations"),
    (["--learning-rate", "0.1"], "--learning-rate cannot be given with --resume"),
    (["--no-anneal-lr"], "--anneal-lr cannot be given with --resume"),
    (["--total-timesteps", "2048", "--save-every", "-1"], "--save-every must be >= 0"),
], ids=["finished", "algorithm-flag", "bool-flag", "bad-value"])
def test_resume_refusals(short_run, extra, message, capsys):
    before = folder_digest(short_run)
    assert main(["train", "--resume", str(short_run), *extra]) == 2
    assert message in capsys.readouterr().err
    assert folder_digest(short_run) == before


def test_resume_of_a_missing_run(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()


@pytest.mark.parametrize("flag,value,message", [
    ("--log-every", "0", "--log-every must be positive, got 0"),
    ("--log-seconds", "-1", "--log-seconds must be >= 0, got -1.0"),
    ("--eval-every", "-2", "--eval-every must be >= 0, got -2"),
    ("--eval-episodes", "0", "--eval-episodes must be positive, got 0"),
])
def test_bad_new_options_are_one_line_exit_2(tmp_path, capsys, flag, value, message):
    assert main([*CARTPOLE, "--run-dir", str(tmp_path / "r"), flag, value]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


# --- Weights & Biases -------------------------------------------------------------------------
def test_training_without_track_never_imports_wandb(tmp_path):
    script = (f"import sys; from fastppo.cli import main; "
              f"assert main({[*CARTPOLE, '--run-dir', str(tmp_path / 'r'), '--total-timesteps', '512']!r}) == 0; "
              f"assert 'wandb' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_offline_wandb_run_holds_the_metrics_config_model_and_eval_video(tmp_path, wandb_home, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "tracked"
    assert main([*CARTPOLE, "--run-dir", str(run_dir), "--total-timesteps", "1024", "--track", "--wandb-group", "g1",
                 "--wandb-tags", "a", "b"]) == 0
    run_id = json.loads((run_dir / "wandb_run.json").read_text())["id"]
    [path] = glob.glob(str(run_dir / "wandb" / "offline-run-*" / f"run-{run_id}.wandb"))
    records = read_finished_wandb_records(path)
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["env_id"] == "CartPole-v1" and config["total_timesteps"] == 1024 and config["num_envs"] == 4
    assert run.run_group == "g1" and list(run.tags) == ["a", "b"] and run.display_name == "tracked"
    history = wandb_history(records)
    metrics = read_metrics(run_dir)
    assert [h["global_step"] for h in history] == [m["global_step"] for m in metrics]  # first and last always
    names = set(history[-1])
    assert {k for k, v in metrics[-1].items() if v is not None} <= names  # None (no game ended) is left out
    assert {"charts/episodic_return", "charts/SPS", "losses/approx_kl", "perf/rollout_time", "time/elapsed"} <= names
    assert any(r.WhichOneof("record_type") == "artifact" and r.artifact.type == "model" for r in records)

    # fastppo eval --video logs to the same W&B run
    assert main(["eval", str(run_dir), "--episodes", "2", "--video"]) == 0
    rows = [row for p in glob.glob(str(run_dir / "wandb" / "offline-run-*" / f"run-{run_id}.wandb"))
            for row in wandb_history(read_finished_wandb_records(p))]
    [video_row] = [row for row in rows if row.get("eval/video/_type") == "video-file"]
    assert video_row["global_step"] == 1024 and "eval/episodic_return" in video_row
    assert glob.glob(str(run_dir / "wandb" / "offline-run-*" / "files" / video_row["eval/video/path"]))


def test_unreachable_wandb_goes_on_offline_with_one_warning(tmp_path, wandb_home):
    run_dir = tmp_path / "no_network"
    env = subprocess_env(WANDB_MODE="online", WANDB_BASE_URL="http://127.0.0.1:9", WANDB_API_KEY="x" * 40,
                         WANDB_INIT_TIMEOUT="2", WANDB_SILENT="true")
    proc = subprocess.run([sys.executable, "-m", "fastppo", *CARTPOLE, "--run-dir", str(run_dir), "--total-timesteps",
                           "1024", "--track"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("fastppo: warning:") == 1
    assert "W&B is unreachable" in proc.stderr
    assert [m["global_step"] for m in read_metrics(run_dir)] == [512, 1024]
    assert glob.glob(str(run_dir / "wandb" / "offline-run-*"))


# --- progress ---------------------------------------------------------------------------------
class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def fake_metrics(iteration: int, n: int, ret: float | None, games: int) -> dict:
    return {"global_step": 100 * iteration, "iteration": iteration, "num_iterations": n, "charts/SPS": 1000,
            "charts/episodic_return": ret, "charts/episodic_length": ret, "charts/episodes": games,
            "charts/recent_return": ret,
            "losses/policy_loss": 0.1, "losses/value_loss": 1.0, "losses/entropy": 0.6, "losses/kl": 0.01,
            "time/elapsed": 0.1 * iteration}


class Recorder:
    """A W&B Tracker that keeps the lines it is sent."""

    def __init__(self):
        self.lines: list[dict] = []

    def log(self, line: dict) -> None:
        self.lines.append(line)


def test_plain_progress_lines_are_throttled_and_lose_no_game(tmp_path):
    """The throttle holds lines back; W&B's charts/episodic_return is the mean of every game since its previous
    line, and the progress line's return is the recent return with the games so far."""
    out, tracker = io.StringIO(), Recorder()
    logger = RunLogger(str(tmp_path), 500, log_every=2, log_seconds=0.0, stream=out, tracker=tracker, window=3)
    recent = [None, 17.5, 17.5, 25.0, 40.0]  # charts/recent_return: the mean of the last 3 games, once 3 ended
    for i, (ret, games) in enumerate([(10.0, 1), (20.0, 3), (None, 0), (40.0, 1), (50.0, 1)], start=1):
        logger.log(dict(fake_metrics(i, 5, ret, games), **{"charts/recent_return": recent[i - 1]}))
    logger.close()
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["1/5", "3/5", "5/5"]
    assert "return - (1 of 3 games)" in lines[0]
    assert "return 17.50 (last 3 of 4 games)" in lines[1]
    assert "return 40.00 (last 3 of 6 games)" in lines[2] and "ETA 0:00:00" in lines[2]
    assert [(m["charts/episodic_return"], m["charts/episodes"]) for m in tracker.lines] == [(10.0, 1), (20.0, 3),
                                                                                           (45.0, 2)]
    assert len(read_metrics(tmp_path)) == 5  # metrics.jsonl keeps every iteration
    # a resumed run's logger counts the games of the lines already in metrics.jsonl
    resumed = io.StringIO()
    logger = RunLogger(str(tmp_path), 600, stream=resumed, window=3)
    logger.log(dict(fake_metrics(6, 6, 30.0, 2), **{"charts/recent_return": 30.0}))
    logger.close()
    assert "return 30.00 (last 3 of 8 games)" in resumed.getvalue()


def test_evaluations_show_in_the_progress_lines_and_the_live_display(tmp_path):
    """A line with an --eval-every score shows it and the best so far; the live display keeps the newest one
    until the next evaluation."""
    evaluated = {"eval/episodic_return": 187.25, "eval/episodic_return_std": 3.0, "eval/best_return": 201.0}
    out = io.StringIO()
    (tmp_path / "plain").mkdir()
    logger = RunLogger(str(tmp_path / "plain"), 300, stream=out)
    for i in (1, 2, 3):
        logger.log(dict(fake_metrics(i, 3, 12.0, 2), **(evaluated if i == 2 else {})))
    logger.close()
    lines = out.getvalue().splitlines()
    assert "eval" not in lines[0] and "eval" not in lines[2]
    assert "return 12.00 (last 10 of 4 games)  eval 187.25 (best 201.00)  pg 0.1000" in lines[1]
    screen = Terminal()
    (tmp_path / "tty").mkdir()
    logger = RunLogger(str(tmp_path / "tty"), 300, stream=screen, title="fastppo CartPole-v1")
    for i in (1, 2, 3):
        logger.log(dict(fake_metrics(i, 3, 12.0, 2), **(evaluated if i == 2 else {})))
        logger.display.live.refresh()
        frame = screen.getvalue().rsplit("fastppo CartPole-v1", 1)[-1]
        assert ("eval 187.25 (best 201.00)" in frame) == (i >= 2), i
        assert "at step 200 (iter 2)" in frame or i == 1
    logger.close()


def test_live_display_on_a_terminal(tmp_path):
    out = Terminal()
    logger = RunLogger(str(tmp_path), 300, stream=out, title="fastppo CartPole-v1")
    assert logger.display is not None
    logger.phase("update")
    logger.log(fake_metrics(1, 3, 12.0, 2))
    logger.close()
    text = out.getvalue()
    assert "\x1b[" in text  # drawn with terminal control codes
    for part in ["fastppo CartPole-v1", "update", "100 / 300 steps", "steps/s 1,000", "12.00"]:
        assert part in text
    assert "iter 1/3  step" not in text  # no plain lines on a terminal


def test_training_with_a_terminal_stdout(tmp_path, monkeypatch):
    out = Terminal()
    monkeypatch.setattr(sys, "stdout", out)
    assert main([*CARTPOLE, "--run-dir", str(tmp_path / "tty"), "--total-timesteps", "1024"]) == 0
    assert "1,024 / 1,024 steps" in out.getvalue() and "\x1b[" in out.getvalue()
