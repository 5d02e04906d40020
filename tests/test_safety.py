"""No input may lose or corrupt a run: the run folder lock, checkpoints that must match their folder,
no non-finite checkpoint, every flag checked before a folder exists, a failed or interrupted start
that leaves nothing behind, write failures as one line, and bad input of every command as one line.

Each data-safety test reproduces the failure it guards against (it fails on a trainer without the guard).
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from helpers import folder_digest, read_metrics, subprocess_env, two_iteration_cartpole, wait_for_lines

import fastppo.checkpoint
import fastppo.logger
import fastppo.trainer
from fastppo.checkpoint import list_checkpoints, load_checkpoint
from fastppo.cli import main

CARTPOLE = ["train", "--env-id", "CartPole-v1", "--device", "cpu"]


def one_line_error(capsys, *parts: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastppo: "), err
    for part in parts:
        assert part in err, err
    return err


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-iteration CartPole run with a checkpoint at each iteration (copy it before changing it)."""
    return two_iteration_cartpole(tmp_path_factory, "cartpole")


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


# --- 1. one writer per run folder ------------------------------------------------------------------


def test_a_second_resume_of_a_folder_in_use_is_refused_naming_the_holder(finished, tmp_path, capsys):
    run_dir = copy_run(finished, tmp_path / "run")
    first = subprocess.Popen([sys.executable, "-m", "fastppo", "train", "--resume", str(run_dir), "--total-timesteps",
                              "10000000", "--log-seconds", "0"], env=subprocess_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for_lines(run_dir / "metrics.jsonl", 4, first)  # it trains: 2 lines were there, 2 more are its own
        assert main(["train", "--resume", str(run_dir), "--total-timesteps", "20000000"]) == 2
        one_line_error(capsys, f"is in use by process {first.pid}")
        assert main([*CARTPOLE, "--run-dir", str(run_dir)]) == 2  # a new run there is refused too
        capsys.readouterr()
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    steps = [m["global_step"] for m in read_metrics(run_dir)]
    assert steps == [512 * i for i in range(1, len(steps) + 1)]  # one writer: no duplicate, no step back
    assert load_checkpoint(str(run_dir))["global_step"] == steps[-1]


# --- 2. a checkpoint must belong to its folder ------------------------------------------------------


@pytest.mark.parametrize("other", [["--env-id", "Acrobot-v1"], ["--env-id", "CartPole-v1", "--learning-rate", "1e-3"]],
                         ids=["other-env", "other-config"])
def test_a_checkpoint_from_another_run_is_refused_and_the_folder_is_untouched(finished, tmp_path, capsys, other):
    run_dir = tmp_path / "run"
    assert main(["train", *other, "--device", "cpu", "--run-dir", str(run_dir), "--total-timesteps", "1024",
                 "--save-every", "1"]) == 0
    foreign = list_checkpoints(str(finished))[-1]
    shutil.copy(foreign, run_dir / "checkpoints" / "ckpt_0000009.pt")  # newer than the run's own
    capsys.readouterr()
    before = folder_digest(run_dir)
    assert main(["train", "--resume", str(run_dir), "--total-timesteps", "4096"]) == 2
    one_line_error(capsys, "ckpt_0000009.pt", "belongs to another run")
    assert folder_digest(run_dir) == before  # config.json not rewritten, no checkpoint rotated away


@pytest.mark.parametrize("damage,message", [
    (lambda s: s["model"].update({"actor.2.weight": torch.zeros(3, 64)}), "does not fit a CartPole-v1 policy"),
    (lambda s: s.update(iteration="2"), "its 'iteration' is a str"),
    (lambda s: s.update(model=torch.zeros(3)), "its 'model' is a Tensor"),
    (lambda s: s.update(actions=torch.zeros(3)), "its actions have shape (3,)"),
    (lambda s: s.update(rng={"torch": 1}), "its RNG states do not read"),
    (lambda s: s["optimizer"].update(state={0: {"step": 1}}), "optimizer state does not load"),
    (lambda s: s.update(recent_returns=["x"]), "'recent_returns' are not numbers"),
    (lambda s: s.update(global_step=7), "global step 7 after 2 iterations"),
    (lambda s: s.pop("recent_returns"), "cannot be resumed from: it has no recent_returns"),
    (lambda s: s.update(collection={"actions": None}), "normalisation or collection state does not load"),
], ids=["model-shape", "iteration-type", "model-type", "actions-shape", "rng", "optimizer", "returns", "step",
        "no-returns", "collection"])
def test_resume_from_a_damaged_checkpoint_is_one_line(finished, tmp_path, capsys, damage, message):
    resume_after_damage(copy_run(finished, tmp_path / "run"), damage, capsys, message)


def resume_after_damage(run_dir, damage, capsys, *parts: str) -> None:
    """Damage the run's newest checkpoint in place; a resume is one line naming it, the folder untouched."""
    path = list_checkpoints(str(run_dir))[-1]
    state = torch.load(path, weights_only=True)
    damage(state)
    torch.save(state, path)
    before = folder_digest(run_dir)
    assert main(["train", "--resume", str(run_dir), "--total-timesteps", "4096"]) == 2
    one_line_error(capsys, *parts)
    assert folder_digest(run_dir) == before


@pytest.mark.parametrize("damage,message", [
    (lambda s: s["normalizer"].pop("obs"), "KeyError: 'obs'"),
    (lambda s: s["normalizer"]["obs"].update(mean=torch.zeros(7)), "statistics of shape (7,), expected (4,)"),
    (lambda s: s["collection"][0].update(reward_returns=torch.zeros(3)), "discounted returns of shape"),
    (lambda s: s["normalizer"].pop("value"), "KeyError: 'value'"),
    (lambda s: s["normalizer"]["value"].update(mean=torch.zeros(2)), "statistics of shape (2,), expected ()"),
    (lambda s: s.pop("adaptive_lr"), "its adaptive learning rate None is not a number in [--lr-min, --lr-max]"),
    (lambda s: s.update(adaptive_lr=0.5), "its adaptive learning rate 0.5 is not a number in [--lr-min, --lr-max]"),
], ids=["no-obs-statistics", "obs-statistics-shape", "reward-returns-shape", "no-value-statistics",
        "value-statistics-shape", "no-adaptive-lr", "adaptive-lr-out-of-bounds"])
def test_resume_with_damaged_normalisation_or_learning_rate_state_is_one_line(tmp_path, capsys, damage, message):
    run_dir = tmp_path / "run"
    assert main([*CARTPOLE, "--run-dir", str(run_dir), "--total-timesteps", "512", "--norm-obs", "True",
                 "--norm-reward", "True", "--norm-value", "True", "--lr-schedule", "adaptive"]) == 0
    capsys.readouterr()
    resume_after_damage(run_dir, damage, capsys, "is damaged", message)


# --- 3. no non-finite checkpoint --------------------------------------------------------------------


def test_parameters_that_turn_nan_are_never_checkpointed(tmp_path, monkeypatch, capsys):
    """The update's last step makes the parameters NaN while the loss it logged is still finite: the
    run stops at that iteration, and its last checkpoint is the last good one."""
    real = fastppo.trainer.update
    calls = {"n": 0}

    def update(policy, *args, **kwargs):
        stats = real(policy, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                for p in policy.parameters():
                    p.mul_(float("nan"))
        return stats

    monkeypatch.setattr(fastppo.trainer, "update", update)
    run_dir = tmp_path / "nan"
    assert main([*CARTPOLE, "--run-dir", str(run_dir), "--total-timesteps", "4096", "--save-every", "1"]) == 1
    one_line_error(capsys, "the parameters are not finite at iteration 2", "the last good checkpoint is",
                   "ckpt_0000001.pt")
    assert [os.path.basename(p) for p in list_checkpoints(str(run_dir))] == ["ckpt_0000001.pt"]
    assert all(torch.isfinite(v).all() for v in load_checkpoint(str(run_dir))["model"].values())


def test_eval_and_resume_refuse_a_non_finite_checkpoint(finished, tmp_path, capsys):
    run_dir = copy_run(finished, tmp_path / "run")
    path = list_checkpoints(str(run_dir))[-1]
    state = torch.load(path, weights_only=True)
    state["model"]["critic.1.weight"][0, 0] = float("inf")
    torch.save(state, path)
    assert main(["eval", str(run_dir), "--episodes", "1"]) == 2
    one_line_error(capsys, "holds a non-finite parameter critic.1.weight")
    assert main(["train", "--resume", str(run_dir), "--total-timesteps", "4096"]) == 2
    one_line_error(capsys, "cannot be resumed from: its parameter critic.1.weight is not finite")


# --- 4. every flag checked before a folder exists ---------------------------------------------------

BAD_FLAGS = [
    (["--learning-rate", "inf"], "--learning-rate must be a finite number, got inf"),
    (["--gamma", "nan"], "--gamma must be a finite number, got nan"),
    (["--ent-coef", "-inf"], "--ent-coef must be a finite number, got -inf"),
    (["--seed", "-1"], "--seed must be in [0, 2^31), got -1"),
    (["--seed", str(2**31)], "--seed must be in [0, 2^31), got 2147483648"),
    (["--env-threads", "100000"], "--env-threads 100000 is more than the"),
    (["--torch-threads", "100000"], "--torch-threads 100000 is more than the"),
    (["--num-envs", "20000000", "--num-steps", "128", "--total-timesteps", str(2**62)], "GiB, more than the"),
    (["--dist-timeout", "1e300"], "--dist-timeout must be in (0, 31536000] seconds, got 1e+300"),
    (["--max-episode-steps", str(2**40)], "--max-episode-steps must be in [1, 2^31)"),
    (["--max-seconds", "0"], "--max-seconds must be positive, got 0.0"),
    (["--exp-name", "x" * 300, "--run-dir", None], "the folder name 'CartPole-v1__xxxxxxxxxxx'... is 328 bytes"),
    (["--run-dir", "{tmp}/" + "y" * 256], "is 256 bytes, more than the 255"),
    (["--run-dir", "{tmp}/" + "/".join(["z" * 200] * 21)], "bytes, more than 4095"),
    (["--run-dir", "{tmp}/file/run"], "is a file, not a folder"),
    (["--run-dir", ""], "--run-dir must not be empty"),
    (["--run-dir", "/sys/fastppo-run"], "cannot make the folder"),
]


@pytest.mark.parametrize("extra,message", BAD_FLAGS, ids=[m[:28] for _, m in BAD_FLAGS])
def test_bad_flags_are_one_line_before_any_folder(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)  # the default run folder would go under ./runs
    (tmp_path / "file").write_text("not a folder")
    args = [a.format(tmp=tmp_path) if a is not None else None for a in extra]
    if None in args:  # --run-dir None: the default name, built from --exp-name
        args = args[: args.index("--run-dir")]
    else:
        args = args if "--run-dir" in args else [*args, "--run-dir", str(tmp_path / "run")]
    assert main([*CARTPOLE, *args]) == 2
    one_line_error(capsys, message)
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_a_bad_choice_names_the_allowed_values_on_one_line(capsys):
    assert main(["train", "--preset", "nope"]) == 2
    one_line_error(capsys, "--preset 'nope' is not one of none, cleanrl, fast")
    assert main(["eval", "run", "--device=tpu"]) == 2
    one_line_error(capsys, "--device 'tpu' is not one of auto, cpu, cuda")


def test_a_signal_before_training_starts_leaves_no_folder(tmp_path, monkeypatch, capsys):
    real = fastppo.trainer.make_envs

    def make_envs(*args, **kwargs):  # SIGTERM while the envs are being made
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(fastppo.trainer, "make_envs", make_envs)
    assert main([*CARTPOLE, "--run-dir", str(tmp_path / "new")]) == 128 + signal.SIGTERM
    one_line_error(capsys, "stopped by SIGTERM before training started; nothing was written")
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    for name in ("notes.txt", "README.md"):  # a folder that existed keeps what it held, whatever the names
        (tmp_path / "mine" / name).write_text("the user's")
    (tmp_path / "mine" / "wandb").mkdir()
    (tmp_path / "mine" / "wandb" / "their-run").write_text("the user's")
    assert main([*CARTPOLE, "--run-dir", str(tmp_path / "mine")]) == 128 + signal.SIGTERM
    capsys.readouterr()
    assert sorted(os.listdir(tmp_path / "mine")) == ["README.md", "notes.txt", "wandb"]
    assert os.listdir(tmp_path / "mine" / "wandb") == ["their-run"]
    assert (tmp_path / "mine" / "README.md").read_text() == "the user's"


def test_a_failed_start_leaves_no_folder_and_a_resume_interrupted_in_replay_leaves_the_run(finished, tmp_path,
                                                                                           monkeypatch, capsys):
    def broken(info):
        raise RuntimeError("no network for you")

    with monkeypatch.context() as m:
        m.setattr(fastppo.trainer, "make_policy", broken)
        with pytest.raises(RuntimeError, match="no network"):
            main([*CARTPOLE, "--run-dir", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()

    run_dir = copy_run(finished, tmp_path / "run")
    before = folder_digest(run_dir)
    real = fastppo.rollout.Collector.replay

    def replay(self, actions):
        os.kill(os.getpid(), signal.SIGINT)
        return real(self, actions)

    monkeypatch.setattr(fastppo.rollout.Collector, "replay", replay)
    assert main(["train", "--resume", str(run_dir), "--total-timesteps", "4096"]) == 128 + signal.SIGINT
    one_line_error(capsys, "stopped by SIGINT before training started; the run is unchanged")
    assert folder_digest(run_dir) == before


def test_disk_full_at_a_checkpoint_is_one_line_and_keeps_the_last_one(tmp_path, monkeypatch, capsys):
    real = torch.save
    saves = {"n": 0}

    def save(obj, f, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(fastppo.checkpoint.torch, "save", save)
    run_dir = tmp_path / "full"
    assert main([*CARTPOLE, "--run-dir", str(run_dir), "--total-timesteps", "2048", "--save-every", "1"]) == 1
    one_line_error(capsys, "cannot write checkpoint", "No space left on device", "the last checkpoint is",
                   "ckpt_0000001.pt")
    assert [os.path.basename(p) for p in glob.glob(str(run_dir / "checkpoints" / "*"))] == ["ckpt_0000001.pt"]
    assert load_checkpoint(str(run_dir))["iteration"] == 1


def test_disk_full_for_the_metrics_is_one_line(tmp_path, monkeypatch, capsys):
    real = fastppo.logger.RunLogger.log
    lines = {"n": 0}

    def log(self, metrics):
        lines["n"] += 1
        if lines["n"] == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, metrics)

    monkeypatch.setattr(fastppo.logger.RunLogger, "log", log)
    run_dir = tmp_path / "full"
    assert main([*CARTPOLE, "--run-dir", str(run_dir), "--total-timesteps", "4096", "--save-every", "2"]) == 1
    one_line_error(capsys, "cannot write to the run folder", "No space left on device", "ckpt_0000002.pt")
    assert load_checkpoint(str(run_dir))["iteration"] == 2


def test_a_full_disk_when_the_last_metrics_line_is_flushed_is_one_line(tmp_path, monkeypatch, capsys):
    """The metrics file's buffer cannot be flushed (no space left): its close fails too, and that is the
    same one line, not a traceback."""
    real_open = open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            return len(text)  # buffered: the disk is only asked at the flush

        def flush(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def close(self):
            self.f.close()
            self.flush()

    def fake_open(path, *args, **kwargs):
        f = real_open(path, *args, **kwargs)
        return Full(f) if str(path).endswith("metrics.jsonl") else f

    monkeypatch.setattr(fastppo.logger, "open", fake_open, raising=False)
    assert main([*CARTPOLE, "--run-dir", str(tmp_path / "full"), "--total-timesteps", "1024"]) == 1
    one_line_error(capsys, "cannot write to the run folder", "No space left on device")


def test_a_start_whose_outputs_cannot_be_written_leaves_no_folder(tmp_path, monkeypatch, capsys):
    def unwritable(*args, **kwargs):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(fastppo.trainer, "RunLogger", unwritable)
    assert main([*CARTPOLE, "--run-dir", str(tmp_path / "new")]) == 1
    one_line_error(capsys, "cannot write to the run folder", "Permission denied")
    assert not (tmp_path / "new").exists()  # config.json was written, and went with the folder


def test_wandb_file_errors_are_one_line(finished, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))

    def unwritable(run_dir, record):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    with monkeypatch.context() as m:
        m.setattr(fastppo.tracking, "_write_run_file", unwritable)
        assert main([*CARTPOLE, "--run-dir", str(tmp_path / "r"), "--total-timesteps", "512", "--track"]) == 0
    err = capsys.readouterr().err
    assert err.count("fastppo: warning:") == 1 and "tracking is off" in err
    run_dir = copy_run(finished, tmp_path / "run")
    (run_dir / "wandb_run.json").write_text("{not json")
    for argv in (["train", "--resume", str(run_dir), "--total-timesteps", "4096", "--track"],
                 ["eval", str(run_dir), "--episodes", "1"]):
        assert main(argv) == 2
        one_line_error(capsys, "wandb_run.json", "does not read")
    (run_dir / "wandb_run.json").write_text('["not", "a", "record"]')
    assert main(["eval", str(run_dir), "--episodes", "1"]) == 2
    one_line_error(capsys, "is not a W&B run record")


# --- 5. bad input of the other commands: one line, exit 2 ----------------------------------------


def test_bad_input_of_eval_plot_and_bench_is_one_line(finished, tmp_path, capsys):
    run_dir = copy_run(finished, tmp_path / "run")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "metrics.jsonl").write_text('[1, 2]\n"x"\n{"a": 1}\n7\n')
    (tmp_path / "code.pt").write_bytes(b"")
    torch.save({"model": {}, "config": {"env_id": "CartPole-v1"}, "iteration": 1, "global_step": 1,
                "x": subprocess.Popen}, tmp_path / "code.pt")
    (tmp_path / "text.pt").write_text("hello")
    cases = [
        (["eval", str(run_dir), "--episodes", "0"], "--episodes must be positive"),
        (["eval", str(run_dir), "--num-envs", "-1"], "--num-envs must be positive"),
        (["eval", str(tmp_path / "nothing")], "does not exist"),
        (["eval", str(run_dir / "config.json")], "not a torch checkpoint"),
        (["eval", str(tmp_path / "text.pt")], "not a torch checkpoint"),
        (["eval", str(tmp_path / "code.pt")], "holds Python objects other than tensors"),
        (["plot", str(tmp_path / "junk")], "holds no metrics yet"),
        (["plot", str(run_dir), "--out", str(tmp_path)], "must end in .png"),
        (["plot", str(run_dir / "config.json")], "is not a run folder"),
        (["bench", "--device", "cpu", "--seconds", "nan"], "--seconds"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = one_line_error(capsys, message)
        assert "weights_only" not in err


def test_eval_of_a_checkpoint_file_with_video_writes_into_its_run(finished, tmp_path, capsys):
    run_dir = copy_run(finished, tmp_path / "run")
    ckpt = list_checkpoints(str(run_dir))[0]
    assert main(["eval", ckpt, "--episodes", "1", "--video"]) == 0
    assert "video: " in capsys.readouterr().out
    assert os.listdir(run_dir / "videos") == ["ckpt_0000001_sampled.mp4"]


def test_non_object_metrics_lines_are_skipped_on_resume(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path / "run")
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('[1, 2]\n{"global_step": "x"}\n')
    assert main(["train", "--resume", str(run_dir), "--total-timesteps", "1536"]) == 0
    assert [m["global_step"] for m in read_metrics(run_dir)] == [512, 1024, 1536]
    assert json.loads((run_dir / "config.json").read_text())["total_timesteps"] == 1536
