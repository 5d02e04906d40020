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
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from helpers import folder_digest, read_metrics, subprocess_env, two_iteration_cartpole, wait_for_lines

import fastppo
import fastppo.checkpoint
import fastppo.config
import fastppo.evaluate
import fastppo.logger
import fastppo.normalize
import fastppo.runfolder
import fastppo.trainer
from fastppo.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from fastppo.cli import main
from fastppo.config import Config, ConfigError

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


def test_a_best_checkpoint_from_another_run_is_refused(finished, tmp_path, capsys):
    """best.pt was trusted without the check the other checkpoints get: another run's, with a forged score,
    was kept by a resume, logged as eval/best_return and played by eval --checkpoint best.pt."""
    run_dir = copy_run(finished, tmp_path / "run")
    state = torch.load(list_checkpoints(str(run_dir))[-1], weights_only=True)
    state["config"]["seed"] = 7  # another run of the same env: its model loads, only its identity differs
    state["eval_return"] = 1e9
    best = run_dir / "checkpoints" / "best.pt"
    torch.save(state, best)
    before = folder_digest(run_dir)
    message = "disagree on seed (7 in the checkpoint, 1 in config.json): the checkpoint belongs to another run"
    assert main(["eval", str(run_dir), "--checkpoint", str(best), "--episodes", "1"]) == 2
    one_line_error(capsys, "best.pt", message)
    assert main(["train", "--resume", str(run_dir), "--total-timesteps", "1536", "--eval-every", "1"]) == 2
    one_line_error(capsys, "best.pt", message)
    with pytest.raises(CheckpointError, match="belongs to another run"):
        fastppo.load(best)
    assert folder_digest(run_dir) == before


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
    one_line_error(capsys, "cannot be used: its parameter critic.1.weight is not finite")
    assert main(["train", "--resume", str(run_dir), "--total-timesteps", "4096"]) == 2
    one_line_error(capsys, "cannot be used: its parameter critic.1.weight is not finite")


@pytest.fixture(scope="module")
def normalised(tmp_path_factory):
    """A finished 1-iteration CartPole run with observation and reward normalisation."""
    run_dir = tmp_path_factory.mktemp("runs") / "normalised"
    assert main([*CARTPOLE, "--run-dir", str(run_dir), "--total-timesteps", "512", "--norm-obs", "True",
                 "--norm-reward", "True"]) == 0
    return run_dir


def nan(t: torch.Tensor) -> None:
    t.view(-1)[0] = float("nan")


@pytest.mark.parametrize("damage,message", [
    (lambda s: nan(s["normalizer"]["obs"]["mean"]), "observation statistics' mean is not finite"),
    (lambda s: s["normalizer"]["reward"]["m2"].fill_(float("inf")), "reward statistics' m2 is not finite"),
    (lambda s: s["normalizer"]["reward"]["m2"].fill_(-1.0), "reward statistics' m2 is negative"),
    (lambda s: s["normalizer"]["obs"]["count"].fill_(0.0), "observation statistics' count is not positive"),
    (lambda s: nan(s["collection"][0]["reward_returns"]), "discounted returns of rank 0's envs is not finite"),
    (lambda s: s.update(recent_returns=[9.0, float("nan")]), "recent returns is not finite"),
    (lambda s: s.update(elapsed=float("nan")), "elapsed is not finite"),
    (lambda s: s.update(elapsed=-5.0), "elapsed is negative (-5.0)"),
    (lambda s: s.update(best_eval=float("nan")), "best_eval is nan"),
    (lambda s: s["actions"].view(-1)[5].fill_(7), "its action log holds action 7, outside the env's 0..1"),
], ids=["obs-mean", "reward-m2-inf", "reward-m2-negative", "obs-count", "reward-returns", "recent-returns",
        "elapsed-nan", "elapsed-negative", "best-eval", "actions"])
def test_eval_and_resume_refuse_every_value_out_of_range(normalised, tmp_path, capsys, damage, message):
    """A NaN observation mean was played by eval and trained on by a resume, which later called the file
    "the last good checkpoint"; an inf M2 was carried into new checkpoints; NaN returns and clocks, and
    actions the env does not have, resumed silently."""
    run_dir = copy_run(normalised, tmp_path / "run")
    path = list_checkpoints(str(run_dir))[-1]
    state = torch.load(path, weights_only=True)
    damage(state)
    torch.save(state, path)
    before = folder_digest(run_dir)
    if "action" not in message:  # eval plays no action log
        assert main(["eval", str(run_dir), "--episodes", "1"]) == 2
        one_line_error(capsys, message)
    assert main(["train", "--resume", str(run_dir), "--total-timesteps", "1024"]) == 2
    one_line_error(capsys, message)
    assert folder_digest(run_dir) == before


def test_statistics_that_turn_inf_are_never_checkpointed(tmp_path, monkeypatch, capsys):
    real = fastppo.normalize.Normalizers.state_dict

    def state_dict(self):
        out = real(self)
        out["reward"]["m2"] = torch.full_like(out["reward"]["m2"], float("inf"))
        return out

    monkeypatch.setattr(fastppo.normalize.Normalizers, "state_dict", state_dict)
    run_dir = tmp_path / "run"
    assert main([*CARTPOLE, "--run-dir", str(run_dir), "--total-timesteps", "512", "--norm-reward", "True"]) == 1
    one_line_error(capsys, "reward statistics' m2 is not finite at iteration 1", "no checkpoint was written")
    assert list_checkpoints(str(run_dir)) == []


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
    (["--dist-timeout", "1e30"], "--dist-timeout must be in (0, 31536000] seconds, got 1e+30"),
    (["--max-episode-steps", str(2**40)], "--max-episode-steps must be in [1, 2^31)"),
    (["--max-seconds", "0"], "--max-seconds must be positive, got 0.0"),
    (["--learning-rate", "1e39"], "--learning-rate 1e+39 is beyond the float32 range"),  # crashed in the update
    (["--vf-coef", "-1e300"], "--vf-coef -1e+300 is beyond the float32 range"),
    (["--vf-coef", "3e38"], "--vf-coef 3e+38 is more than 1e+10: it scales the update's float32 values"),  # NaN
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
        return Full(f) if str(path).endswith("metrics.jsonl") and args[:1] == ("a",) else f  # the writer only

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
        (["eval", str(run_dir), "--num-envs", "-1"], "--num-envs must be in [1, 2^31), got -1"),
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


# --- 6. every field typed, and what config.json may change ------------------------------------------


@pytest.mark.parametrize("fields,message", [
    (dict(algo="sac"), "--algo must be one of 'ppo', 'trpo', got 'sac'"),  # trained PPO, wrote "sac"
    (dict(norm_obs="yes"), "--norm-obs must be bool or None, got 'yes'"),
    (dict(num_envs=True), "--num-envs must be int or None, got True"),
    (dict(wandb_tags=("a", 1)), "--wandb-tags must be tuple[str, ...], got ('a', 1)"),
], ids=["literal", "bool", "bool-for-int", "tuple-item"])
def test_the_python_api_checks_the_type_of_every_field(tmp_path, fields, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        fastppo.train(Config(env_id="CartPole-v1", device="cpu", run_dir=str(tmp_path / "r"), total_timesteps=512,
                             **fields))
    assert not (tmp_path / "r").exists()


def edit_config(run_dir, **fields) -> None:
    path = run_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.mark.parametrize("config,checkpoint,message", [
    ({"total_timesteps": "4096"}, {}, "config.json': total_timesteps must be int or None, got '4096'"),
    ({"num_envs": "4"}, {"num_envs": "4"}, "config.json': num_envs must be int or None, got '4'"),
    ({"learning_rate": None}, {}, "disagree on learning_rate (0.00025 in the checkpoint, None in config.json)"),
    ({"gamma": 0.9}, {}, "disagree on gamma (0.99 in the checkpoint, 0.9 in config.json)"),
    ({"total_timestep": 4096}, {}, "'total_timestep' is not an option of fastppo train"),
], ids=["editable-type", "type-in-both", "null", "not-editable", "unknown-key"])
def test_a_resume_names_the_config_field_it_refuses(finished, tmp_path, capsys, config, checkpoint, message):
    run_dir = copy_run(finished, tmp_path / "run")
    edit_config(run_dir, **config)
    path = list_checkpoints(str(run_dir))[-1]
    state = torch.load(path, weights_only=True)
    state["config"].update(checkpoint)
    torch.save(state, path)
    before = folder_digest(run_dir)
    assert main(["train", "--resume", str(run_dir)]) == 2
    one_line_error(capsys, message)
    assert folder_digest(run_dir) == before


def test_a_resume_honours_the_fields_config_json_may_change(finished, tmp_path):
    """total_timesteps and eval_every edited in config.json were ignored, and overwritten, by a resume."""
    run_dir = copy_run(finished, tmp_path / "run")
    edit_config(run_dir, total_timesteps=1536, eval_every=3, eval_episodes=1)
    assert main(["train", "--resume", str(run_dir)]) == 0
    lines = read_metrics(run_dir)
    assert [m["global_step"] for m in lines] == [512, 1024, 1536] and "eval/episodic_return" in lines[-1]
    saved = json.loads((run_dir / "config.json").read_text())
    assert (saved["total_timesteps"], saved["eval_every"]) == (1536, 3)


# --- 7. a run whose folder disappears stops -------------------------------------------------------------


def remove(run_dir) -> None:
    shutil.rmtree(run_dir)


def replace_folder(run_dir) -> None:
    os.rename(run_dir, f"{run_dir}.moved")
    os.mkdir(run_dir)


@pytest.mark.parametrize("change", [remove, replace_folder], ids=["rm-rf", "replaced"])
def test_a_run_whose_folder_is_removed_or_replaced_stops(tmp_path, monkeypatch, capsys, change):
    """rm -rf RUN mid-run ended "finished", exit 0, with checkpoints/ and README.md re-created and the rest
    (metrics, config.json, .lock) gone."""
    run_dir = tmp_path / "run"
    real = fastppo.trainer.update
    calls = {"n": 0}

    def update(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # in iteration 2
            change(run_dir)
        return real(*args, **kwargs)

    monkeypatch.setattr(fastppo.trainer, "update", update)
    assert main([*CARTPOLE, "--run-dir", str(run_dir), "--total-timesteps", "1536", "--save-every", "1"]) == 1
    one_line_error(capsys, f"the run folder {str(run_dir)!r} was removed or replaced while this run used it")
    assert not run_dir.exists() if change is remove else os.listdir(run_dir) == []


# --- 8. EnvPool options within their real ranges ---------------------------------------------------------


@pytest.fixture
def no_envs(monkeypatch):
    """The options must be refused before any env exists (the old failures were a crash in the first
    forward pass, a segfault or an abort of the whole process inside EnvPool)."""

    def forbidden(*args, **kwargs):
        raise AssertionError("an environment was created before the options were checked")

    monkeypatch.setattr(fastppo.trainer, "make_envs", forbidden)


@pytest.mark.parametrize("env_id,option,message", [
    ("Pong-v5", "stack_num=0", "--env-kwargs stack_num=0 must be in [1, 2^31): frames per observation"),
    ("Pong-v5", "noop_max=-1", "--env-kwargs noop_max=-1 must be in [1, 2^31): EnvPool draws the no-op count"),
    ("Pong-v5", "frame_skip=0", "--env-kwargs frame_skip=0 must be in [1, 2^31)"),
    ("MiniGrid-Empty-5x5-v0", "size=0", "EnvPool cannot make MiniGrid-Empty-5x5-v0 with --env-kwargs size=0: "
                                        "it crashed (SIGABRT)"),
], ids=["stack-num", "noop-max", "frame-skip", "probed"])
def test_envpool_options_out_of_their_range_are_one_line_before_any_env(tmp_path, capsys, no_envs, env_id, option,
                                                                         message):
    assert main(["train", "--env-id", env_id, "--device", "cpu", "--run-dir", str(tmp_path / "r"), "--env-kwargs",
                 option]) == 2
    one_line_error(capsys, message)
    assert not (tmp_path / "r").exists()


def test_an_unknown_atari_task_is_one_line_exit_2(tmp_path):
    """The emulator exits the process (code 1) on a missing ROM, so the check must come first."""
    proc = subprocess.run([sys.executable, "-m", "fastppo", "train", "--env-id", "Pong-v5", "--device", "cpu",
                           "--run-dir", str(tmp_path / "r"), "--env-kwargs", "task=pongg"], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == ("fastppo: error: --env-kwargs task='pongg': EnvPool has no such Atari ROM; close names: "
                           "pong\n")
    assert not (tmp_path / "r").exists()


def test_a_new_run_on_a_full_disk_is_one_line_and_leaves_no_folder(tmp_path, monkeypatch, capsys):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fastppo.runfolder.os, "pwrite", full)  # the lock file's PID: the first write of a run
    assert main([*CARTPOLE, "--run-dir", str(tmp_path / "r")]) == 2
    one_line_error(capsys, "cannot lock the run folder", "No space left on device")
    assert not (tmp_path / "r").exists()


def test_a_resume_on_a_full_disk_leaves_no_temporary_file(finished, tmp_path, monkeypatch, capsys):
    real_open = open

    def full_open(path, *args, **kwargs):
        f = real_open(path, *args, **kwargs)  # the file is made; its first write finds the disk full
        if str(path).endswith(".tmp"):
            f.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return f

    run_dir = copy_run(finished, tmp_path / "run")
    before = folder_digest(run_dir)
    for module in (fastppo.config, fastppo.logger):  # where config.json and the metrics are rewritten
        monkeypatch.setattr(module, "open", full_open, raising=False)
    assert main(["train", "--resume", str(run_dir), "--total-timesteps", "1536"]) == 1
    one_line_error(capsys, "cannot write to the run folder", "No space left on device")
    assert folder_digest(run_dir) == before  # no 0-byte config.json.tmp


def test_the_loser_of_two_simultaneous_launches_names_the_winner(tmp_path, monkeypatch, capsys):
    """The winner of the lock writes its PID a moment after taking it; the loser read the file in between and
    said "process unknown" (271 of 300 simultaneous launches), or named the folder's earlier holder."""
    import fcntl

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()  # an earlier holder: its PID is still in the file
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").write_text(f"{ended.pid}\n")
    fd = os.open(run_dir / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the winner, before it wrote its PID
    real_pread = os.pread

    def pread(*args):
        text = real_pread(*args)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # the winner writes just after the loser read
        return text

    monkeypatch.setattr(fastppo.runfolder.os, "pread", pread)
    try:
        assert main([*CARTPOLE, "--run-dir", str(run_dir)]) == 2
        one_line_error(capsys, f"is in use by process {os.getpid()} (another fastppo train)")
    finally:
        os.close(fd)


@pytest.mark.parametrize("extra,message", [
    (["--episodes", str(10**12)], "--episodes 1000000000000 on --num-envs 8 need about 59,604.6 GiB, more than"),
    (["--episodes", str(10**9), "--num-envs", str(10**9)], "--episodes 1000000000 on --num-envs 1000000000 need"),
    (["--num-envs", str(2**31)], "--num-envs must be in [1, 2^31), got 2147483648"),
], ids=["episodes", "num-envs", "int32"])
def test_eval_refuses_games_that_memory_cannot_hold(finished, monkeypatch, capsys, extra, message):
    """Absurd --episodes / --num-envs were OOM-killed at 23 GB."""

    def play(*args, **kwargs):
        raise AssertionError("the games started")

    monkeypatch.setattr(fastppo.evaluate, "play", play)
    assert main(["eval", str(finished), *extra]) == 2
    one_line_error(capsys, message)


# --- 9. the command line's own errors -----------------------------------------------------------------


@pytest.mark.parametrize("argv,message", [
    (["train", "--total-timesteps", "1e6"], "--total-timesteps '1e6' is not an integer or None"),
    (["train", "--num-envs", "abc"], "--num-envs 'abc' is not an integer or None"),
    (["train", "--norm-obs", "yes"], "--norm-obs 'yes' is not True or False or None"),
    (["train", "--num-env", "4"], "unknown flag --num-env of fastppo train; close names: --num-envs"),
    (["train", "--track", "True"], "fastppo train takes no 'True' (after --track, which takes no value)"),
    (["plot", "runs/x", "--out"], "--out needs a value (text)"),
    (["bench", "--num-envs", "4", "x"], "--num-envs 'x' is not an integer"),
], ids=["float-for-int", "word-for-int", "bool", "unknown", "switch-value", "missing", "tuple-item"])
def test_malformed_flags_are_one_line(argv, message, capsys):
    """They were tyro's boxes of 5 to 16 lines."""
    assert main(argv) == 2
    one_line_error(capsys, message)


def test_ctrl_c_while_fastppo_starts_is_one_line(tmp_path):
    """A Ctrl-C during the start-up imports (torch's take seconds) printed a long KeyboardInterrupt traceback.
    The signal is sent as torch's import begins. SIGINT gets Python's own handler first, as in a terminal: a
    test suite started in the background by a non-interactive shell inherits SIGINT ignored."""
    script = ("import os, runpy, signal, sys\n"
              "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
              "class Interrupt:\n"
              "    def find_spec(self, name, path=None, target=None):\n"
              "        if name == 'torch':\n"
              "            os.kill(os.getpid(), signal.SIGINT)\n"
              "sys.meta_path.insert(0, Interrupt())\n"
              "sys.argv = ['fastppo', 'train', '--env-id', 'CartPole-v1']\n"
              "runpy.run_module('fastppo', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert (proc.returncode, proc.stderr) == (130, "fastppo: interrupted\n")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("call,message", [
    (lambda run: fastppo.load(run, device="cuda:99"), "device cuda:99: "),  # no CUDA, or no 100th GPU
    (lambda run: fastppo.load(run, device="tpu"), "device 'tpu' is not a device (auto, cpu, cuda or cuda:<index>)"),
    (lambda run: fastppo.load(run, seed="1"), "seed must be an int in [-2^63, 2^63), got '1'"),
    (lambda run: fastppo.make_env(run, num_envs=0), "num_envs must be an int in [1, 2^31), got 0"),
], ids=["cuda-index", "device", "seed", "num-envs"])
def test_the_python_api_refuses_bad_arguments_with_config_error(finished, call, message):
    """load(device="cuda:3") and make_env(num_envs=0) raised bare AssertionErrors."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        call(finished)
