"""The command line: bad input, a Pong smoke run, determinism, NaN handling, outputs."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import read_metrics, without_timings

import fastppo.config
import fastppo.trainer
from fastppo.checkpoint import list_checkpoints, load_checkpoint
from fastppo.cli import main
from fastppo.loss import AdaptiveKLCoef, AdaptiveLR, adapt_to_kl

CARTPOLE = ["train", "--env-id", "CartPole-v1", "--device", "cpu"]


@pytest.fixture
def no_envs(monkeypatch):
    """Bad input must be caught before any environment exists."""

    def forbidden(*args, **kwargs):
        raise AssertionError("an environment was created before the input was validated")

    monkeypatch.setattr(fastppo.trainer, "make_envs", forbidden)


BAD_INPUTS = [
    (["--env-id", "Pongg-v5"], "unknown --env-id 'Pongg-v5'; close names: Pong-v5"),
    (["--env-id", "CarRacing-v2"], "observes (H, W, C) = (96, 96, 3) frames"),
    (["--env-id", "Pendulum-v1", "--env-kwargs", "nope=1"], "--env-kwargs nope: Pendulum-v1 has no such option"),
    (["--env-id", "CartPole-v1", "--num-envs", "3", "--num-steps", "5", "--num-minibatches", "4"],
     "num_envs * num_steps = 3 * 5 = 15 does not divide by --num-minibatches 4"),
    (["--env-id", "CartPole-v1", "--num-envs", "0"], "--num-envs must be positive, got 0"),
    (["--env-id", "CartPole-v1", "--num-steps", "-3"], "--num-steps must be positive, got -3"),
    (["--env-id", "CartPole-v1", "--update-epochs", "0"], "--update-epochs must be positive, got 0"),
    (["--env-id", "CartPole-v1", "--num-minibatches", "0"], "--num-minibatches must be positive, got 0"),
    (["--env-id", "CartPole-v1", "--total-timesteps", "100"], "--total-timesteps 100 is less than one rollout"),
    (["--env-id", "CartPole-v1", "--learning-rate", "0"], "--learning-rate must be positive, got 0.0"),
    (["--env-id", "CartPole-v1", "--gamma", "1.5"], "--gamma must be in [0, 1], got 1.5"),
    (["--env-id", "CartPole-v1", "--loss", "penalty", "--kl-min", "0.1", "--kl-max", "0.05"],
     "--kl-min (0.1) must be below --kl-max (0.05)"),
    (["--env-id", "CartPole-v1", "--loss", "penalty", "--kl-coef", "0"],
     "--kl-coef 0.0 is outside [--kl-coef-min, --kl-coef-max] = [0.0001, 10000.0]"),
    (["--env-id", "CartPole-v1", "--loss", "penalty", "--kl-coef-min", "2", "--kl-coef-max", "1"],
     "--kl-coef-min (2.0) must be positive and at most --kl-coef-max (1.0)"),
    # an option the run's algorithm would ignore is refused, not dropped
    (["--env-id", "CartPole-v1", "--algo", "trpo", "--ent-coef", "0.01"],
     "--ent-coef is for --algo ppo; this run (--algo trpo) does not read it"),
    (["--env-id", "CartPole-v1", "--max-kl", "0.02"],
     "--max-kl is for --algo trpo; this run (--algo ppo, --loss clip) does not read it"),
    (["--env-id", "CartPole-v1", "--kl-coef", "0.5"],
     "--kl-coef is for --loss penalty; this run (--algo ppo, --loss clip) does not read it"),
    (["--env-id", "CartPole-v1", "--kl-target", "0.02"],
     "--kl-target is for --loss penalty or --lr-schedule adaptive; this run (--algo ppo, --loss clip, --lr-schedule "
     "anneal) does not read it"),
    (["--env-id", "CartPole-v1", "--lr-max", "0.1", "--no-anneal-lr"],
     "--lr-max is for --lr-schedule adaptive; this run (--lr-schedule constant) does not read it"),
    # --anneal-lr (CleanRL's) and --lr-schedule must agree on whether the rate anneals
    (["--env-id", "CartPole-v1", "--anneal-lr", "--lr-schedule", "adaptive"],
     "--lr-schedule adaptive contradicts --anneal-lr; give one of them"),
    (["--env-id", "CartPole-v1", "--no-anneal-lr", "--lr-schedule", "anneal"],
     "--lr-schedule anneal contradicts --no-anneal-lr; give one of them"),
    (["--env-id", "CartPole-v1", "--lr-schedule", "adaptive", "--learning-rate", "0.05"],
     "--learning-rate 0.05 is outside [--lr-min, --lr-max] = [1e-06, 0.01]"),
    (["--env-id", "CartPole-v1", "--lr-schedule", "adaptive", "--lr-min", "0.1", "--lr-max", "0.01"],
     "--lr-min (0.1) must be positive and at most --lr-max (0.01)"),
    (["--env-id", "CartPole-v1", "--lr-schedule", "adaptive", "--lr-factor", "1"], "--lr-factor must be above 1"),
    (["--env-id", "CartPole-v1", "--algo", "trpo", "--lr-schedule", "adaptive"],
     "--lr-schedule adaptive is for --algo ppo; --algo trpo does not take it"),
    (["--env-id", "CartPole-v1", "--norm-value", "True", "--minibatch-by", "env", "--advantages", "epoch"],
     "--norm-value does not work with --minibatch-by env --advantages epoch"),
]


@pytest.mark.parametrize("extra,message", BAD_INPUTS, ids=[m.split(" ")[0] + str(i) for i, (_, m) in
                                                             enumerate(BAD_INPUTS)])
def test_bad_input_is_one_line_exit_2(extra, message, tmp_path, capsys, no_envs):
    run_dir = tmp_path / "run"
    code = main(["train", "--device", "cpu", "--run-dir", str(run_dir), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and err.startswith("fastppo: error: ")
    assert not run_dir.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(tmp_path, capsys, no_envs):
    code = main([*CARTPOLE[:-2], "--device", "cuda", "--run-dir", str(tmp_path / "r")])
    assert code == 2
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err


def test_run_dir_holding_a_run_is_refused_and_left_intact(tmp_path, capsys, no_envs):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"global_step": 1}\n')
    code = main([*CARTPOLE, "--run-dir", str(run_dir)])
    assert code == 2
    assert f"--run-dir '{run_dir}' already holds a run (metrics.jsonl)" in capsys.readouterr().err
    assert (run_dir / "metrics.jsonl").read_text() == '{"global_step": 1}\n'


def test_help_lists_cleanrl_flags():
    out = subprocess.run([sys.executable, "-m", "fastppo", "train", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for flag in ["--env-id", "--total-timesteps", "--num-envs", "--num-steps", "--num-minibatches",
                 "--update-epochs", "--learning-rate", "--clip-coef", "--ent-coef", "--vf-coef",
                 "--max-grad-norm", "--target-kl", "--loss", "--kl-coef", "--kl-target", "--seed", "--device",
                 "--run-dir"]:
        assert flag in out


def test_pong_smoke_run(tmp_path):
    run_dir = tmp_path / "pong"
    code = main(["train", "--env-id", "Pong-v5", "--device", "cpu", "--run-dir", str(run_dir), "--num-steps", "32",
                 "--total-timesteps", "1024"])
    assert code == 0
    metrics = read_metrics(run_dir)
    assert [m["global_step"] for m in metrics] == [256, 512, 768, 1024]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["env_id"] == "Pong-v5" and config["num_envs"] == 8 and config["clip_coef"] == 0.1
    ckpt = load_checkpoint(str(run_dir))
    assert ckpt["global_step"] == 1024 and ckpt["iteration"] == 4
    assert ckpt["model"]["network.0.weight"].shape == (32, 4, 8, 8)
    for key in ["charts/SPS", "charts/learning_rate", "losses/policy_loss", "losses/value_loss", "losses/entropy",
                "losses/approx_kl", "losses/old_approx_kl", "losses/clipfrac", "losses/explained_variance",
                "losses/kl", "losses/kl_coef", "charts/episodic_return", "charts/episodic_length"]:
        assert key in metrics[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_without_an_env_on_a_cpu_machine_trains_cartpole_and_says_so(tmp_path, capsys):
    """`fastppo train` on a machine without CUDA: CartPole-v1 (Pong's 10M steps would take days here), said in
    one line, before the line that names the run folder."""
    run_dir = tmp_path / "default"
    assert main(["train", "--run-dir", str(run_dir), "--total-timesteps", "1024"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "fastppo: no CUDA and no --env-id: training CartPole-v1; give --env-id Pong-v5 for Atari"
    assert out[1] == f"fastppo: training CartPole-v1 in {run_dir}"
    assert sum("--env-id" in line for line in out) == 1
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["env_id"], config["num_envs"], config["device"]) == ("CartPole-v1", 4, "auto")


def test_the_default_env_follows_the_training_device_in_python_too():
    """Config() names no env: Pong-v5 when the run trains on CUDA, CartPole-v1 on the CPU, as a default (not a
    field the caller set, so a preset or a resume treats it as one); an env the caller names is kept, silently."""
    from fastppo.config import Config, env_id_notice, given_fields, with_env_id

    assert Config().env_id is None
    assert with_env_id(Config(device="cuda")).env_id == "Pong-v5"
    filled = with_env_id(Config(device="cpu"))
    assert filled.env_id == "CartPole-v1" and "env_id" not in given_fields(filled)
    why = "--device cpu" if torch.cuda.is_available() else "no CUDA"
    assert env_id_notice(filled) == f"{why} and no --env-id: training CartPole-v1; give --env-id Pong-v5 for Atari"
    named = with_env_id(Config(env_id="CartPole-v1", device="cpu"))
    assert named.env_id == "CartPole-v1" and env_id_notice(named) is None
    assert with_env_id(Config(env_id="Breakout-v5", device="cpu")).env_id == "Breakout-v5"
    if not torch.cuda.is_available():
        assert with_env_id(Config()).env_id == "CartPole-v1"


def test_rounding_is_said_only_of_a_budget_the_caller_gave(tmp_path, capsys):
    """Every default budget rounds down with the default sizes (500k / 512): the notice is for a
    --total-timesteps the caller gave (a new run's or a resume's), not for a default's or a preset's."""
    one_iteration = ["--max-seconds", "0.001"]  # stops after the first iteration
    assert main([*CARTPOLE, "--run-dir", str(tmp_path / "sizes"), "--num-envs", "3", "--num-steps", "7",
                 "--num-minibatches", "1", "--update-epochs", "1", *one_iteration]) == 0
    assert main([*CARTPOLE, "--run-dir", str(tmp_path / "preset"), "--preset", "cleanrl", *one_iteration]) == 0
    assert "rounds down" not in capsys.readouterr().out
    run_dir = tmp_path / "given"
    assert main([*CARTPOLE, "--run-dir", str(run_dir), "--total-timesteps", "1300"]) == 0
    notice = "fastppo: --total-timesteps {} rounds down to {} iteration(s) of 512 steps: training {} steps"
    assert capsys.readouterr().out.splitlines()[0] == notice.format("1,300", 2, "1,024")
    assert main(["train", "--resume", str(run_dir), "--total-timesteps", "5000", *one_iteration]) == 0
    assert capsys.readouterr().out.splitlines()[0] == notice.format("5,000", 9, "4,608")
    assert main(["train", "--resume", str(run_dir), "--max-seconds", "1000"]) == 0  # the saved 5,000: said when given
    out = capsys.readouterr().out
    assert "rounds down" not in out and "finished after 4,608 steps" in out


def short_cartpole(run_dir, *extra):
    return main([*CARTPOLE, "--run-dir", str(run_dir), "--total-timesteps", "4096", *extra])


def test_same_seed_gives_identical_metrics(tmp_path):
    assert short_cartpole(tmp_path / "a", "--seed", "7") == 0
    assert short_cartpole(tmp_path / "b", "--seed", "7") == 0
    a, b = without_timings(read_metrics(tmp_path / "a")), without_timings(read_metrics(tmp_path / "b"))
    assert a == b
    assert any(m["charts/episodic_return"] is not None for m in a)
    # and a different seed gives a different run
    assert short_cartpole(tmp_path / "c", "--seed", "8") == 0
    c = read_metrics(tmp_path / "c")
    assert [m["losses/value_loss"] for m in c] != [m["losses/value_loss"] for m in a]


def test_penalty_variant_adapts_beta(tmp_path):
    assert short_cartpole(tmp_path / "p", "--loss", "penalty", "--kl-coef", "1.0", "--kl-target", "0.01") == 0
    metrics = read_metrics(tmp_path / "p")
    betas = [m["losses/kl_coef"] for m in metrics]
    kls = [m["losses/kl"] for m in metrics]
    assert betas[0] == 1.0
    for beta, kl, next_beta in zip(betas, kls, betas[1:], strict=False):
        expected = beta * 2 if kl > 0.015 else beta / 2 if kl < 0.01 / 1.5 else beta
        assert next_beta == pytest.approx(expected)
    assert len(set(betas)) > 1


def test_penalty_beta_stays_within_its_bounds():
    """The doubling/halving rule within [--kl-coef-min, --kl-coef-max]: unbounded, a long run of small KLs
    halves beta to exactly 0, from where doubling never brings the penalty back."""
    ctl = AdaptiveKLCoef(1.0, kl_min=0.01 / 1.5, kl_max=0.015, beta_min=1e-4, beta_max=8.0)
    betas = [ctl.update(0.0) for _ in range(2000)]
    assert betas[:3] == [0.5, 0.25, 0.125] and min(betas) == betas[-1] == 1e-4
    assert [ctl.update(1.0) for _ in range(17)][-4:] == pytest.approx([1.6384, 3.2768, 6.5536, 8.0])
    assert ctl.update(0.01) == 8.0  # within [kl_min, kl_max]: unchanged
    unbounded = AdaptiveKLCoef(1.0, kl_min=0.01 / 1.5, kl_max=0.015, beta_min=0.0, beta_max=float("inf"))
    for _ in range(1100):
        unbounded.update(0.0)
    assert unbounded.beta == 0.0 and unbounded.update(1.0) == 0.0  # the failure the bounds prevent
    ctl.set(0.0)  # a beta from outside (a checkpoint written before the bounds): within them too
    assert ctl.beta == 1e-4 and AdaptiveKLCoef(1e9, 0.1, 0.2, beta_max=8.0).beta == 8.0


def test_adaptive_learning_rate_rule_and_bounds():
    """--lr-schedule adaptive: PPO-penalty's rule on the step size, lr / factor above kl_max and lr * factor below
    kl_min, exact in floating point and clamped to [lr_min, lr_max]; the shared rule moves beta the other way."""
    d = 0.01
    ctl = AdaptiveLR(2.5e-4, kl_min=d / 1.5, kl_max=1.5 * d, lr_min=1e-6, lr_max=1e-2, factor=1.5)
    assert ctl.update(0.0) == 2.5e-4 * 1.5 and ctl.update(0.001) == 2.5e-4 * 1.5 * 1.5
    assert ctl.update(0.01) == 2.5e-4 * 1.5 * 1.5  # within [d / 1.5, 1.5 d]: unchanged
    assert ctl.update(d / 1.5) == ctl.update(1.5 * d) == 2.5e-4 * 1.5 * 1.5  # the bounds themselves too
    assert ctl.update(0.02) == 2.5e-4 * 1.5 * 1.5 / 1.5
    assert ctl.update(float("nan")) == ctl.lr  # NaN compares false both ways
    rates = [ctl.update(0.0) for _ in range(30)]
    assert max(rates) == rates[-1] == 1e-2 and rates[-2] == 1e-2  # clamped, and it stays there
    rates = [ctl.update(1.0) for _ in range(60)]
    assert min(rates) == rates[-1] == 1e-6 and ctl.update(0.0) == 1.5e-6  # and up again from the floor
    for value, kl, raises, want in [(1.0, 0.1, True, 0.5), (1.0, 0.1, False, 2.0), (1.0, 0.0, True, 2.0),
                                    (1.0, 0.0, False, 0.5), (1.0, 0.05, True, 1.0), (3.0, 0.05, True, 2.5)]:
        assert adapt_to_kl(value, kl, 0.01, 0.09, 2.0, 0.1, 2.5, raises_kl=raises) == want


def test_lr_schedule_follows_anneal_lr_unless_given_and_a_preset_yields(tmp_path):
    """None follows --anneal-lr; given together they must agree on annealing; a preset's schedule yields to an
    --anneal-lr / --no-anneal-lr the caller gave; the resolved config says one thing (anneal_lr false unless
    annealed) and resolves again to itself, and a run saved before these fields has the same identity."""
    from fastppo.config import ADDED_FIELDS, Config, ConfigError, lr_schedule, mark_given, resolve, run_identity
    from fastppo.envs import env_info
    from fastppo.presets import apply_preset

    def schedule(given: dict, preset: dict | None = None) -> str:
        cfg = mark_given(Config(**given), set(given))
        if preset:
            cfg = fastppo.config.replace(cfg, given=False, **preset)
        return lr_schedule(cfg)

    assert schedule({}) == "anneal" and schedule({"anneal_lr": False}) == "constant"
    assert schedule({"lr_schedule": "adaptive"}) == "adaptive"
    assert schedule({"lr_schedule": "adaptive", "anneal_lr": False}) == "adaptive"
    assert schedule({"lr_schedule": "constant", "anneal_lr": False}) == "constant"
    assert schedule({"anneal_lr": True}, {"lr_schedule": "adaptive"}) == "anneal"
    assert schedule({"anneal_lr": False}, {"lr_schedule": "adaptive"}) == "adaptive"
    assert schedule({"anneal_lr": False}, {"lr_schedule": "anneal"}) == "constant"
    assert schedule({}, {"lr_schedule": "adaptive", "anneal_lr": True}) == "adaptive"
    with pytest.raises(ConfigError, match="--lr-schedule constant contradicts --anneal-lr"):
        schedule({"lr_schedule": "constant", "anneal_lr": True})
    assert apply_preset(Config(preset="cleanrl", anneal_lr=False), "discrete").lr_schedule == "anneal"

    info = env_info("CartPole-v1")
    resolved = resolve(Config(env_id="CartPole-v1", lr_schedule="adaptive"), info)
    assert (resolved.lr_schedule, resolved.anneal_lr) == ("adaptive", False)
    again = Config(**{k: v for k, v in dataclasses.asdict(resolved).items()})  # every field given, as on resume
    assert resolve(again, info).lr_schedule == "adaptive"
    plain = resolve(Config(env_id="CartPole-v1"), info).to_dict()
    assert (plain["lr_schedule"], plain["anneal_lr"], plain["norm_value"]) == ("anneal", True, False)
    before = {k: v for k, v in plain.items() if k not in {*ADDED_FIELDS, "lr_schedule"}}
    assert run_identity(before) == run_identity(plain) != run_identity(resolved.to_dict())


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real = fastppo.trainer.minibatch_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, stats = real(*args, **kwargs)
        if calls["n"] > 2 * 16:  # iterations 1 and 2 are fine (16 minibatches each), then NaN
            loss = loss * float("nan")
        return loss, stats

    monkeypatch.setattr(fastppo.trainer, "minibatch_loss", poisoned)
    run_dir = tmp_path / "nan"
    code = main([*CARTPOLE, "--run-dir", str(run_dir), "--total-timesteps", "4096", "--save-every", "1"])
    assert code == 1
    err = capsys.readouterr().err
    assert "loss is nan at iteration 3" in err and "ckpt_0000002.pt" in err
    ckpts = list_checkpoints(str(run_dir))
    assert [os.path.basename(p) for p in ckpts] == ["ckpt_0000001.pt", "ckpt_0000002.pt"]
    state = load_checkpoint(str(run_dir))
    assert state["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_target_kl_stops_epochs_early(tmp_path):
    assert short_cartpole(tmp_path / "t", "--target-kl", "1e-9") == 0
    assert all(m["losses/epochs"] == 1 for m in read_metrics(tmp_path / "t"))


def test_target_return_stops_early_and_checkpoints(tmp_path, capsys):
    # CartPole games last >= 8 steps: a target of 0 over 3 games is reached in the first iteration
    assert short_cartpole(tmp_path / "s", "--target-return", "0", "--target-return-games", "3") == 0
    out = capsys.readouterr().out
    metrics = read_metrics(tmp_path / "s")
    assert len(metrics) == 1
    # one line says it, with the run's result: the last line
    assert sum("target return" in line for line in out.splitlines()) == 1
    assert out.splitlines()[-1] == (f"fastppo: target return 0.0 reached: mean of the last 3 games is "
                                    f"{metrics[0]['charts/recent_return']:.2f} after 512 steps (iteration 1 of 8); "
                                    f"run folder {tmp_path / 's'}")
    assert load_checkpoint(str(tmp_path / "s"))["iteration"] == 1


def test_progress_lines_show_the_recent_return_and_the_evaluations(tmp_path, capsys):
    """Each plain line's return is charts/recent_return with the games so far ("-" and the count until the
    window is full); a line with an --eval-every evaluation shows its score and the best so far."""
    run_dir = tmp_path / "p"
    assert short_cartpole(run_dir, "--log-seconds", "0", "--eval-every", "3", "--eval-episodes", "2") == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("iter ")]
    metrics = read_metrics(run_dir)
    assert len(lines) == len(metrics) == 8
    games = 0
    for line, m in zip(lines, metrics, strict=True):
        games += m["charts/episodes"]
        recent = m["charts/recent_return"]
        expected = f"- ({games:,} of 10 games)" if recent is None else f"{recent:.2f} (last 10 of {games:,} games)"
        assert f"  return {expected}  " in line, line
        if m.get("eval/episodic_return") is not None:
            assert f"  eval {m['eval/episodic_return']:.2f} (best {m['eval/best_return']:.2f})  " in line
        else:
            assert "eval" not in line
    assert [m["iteration"] for m in metrics if m.get("eval/episodic_return") is not None] == [3, 6, 8]


def test_docs_and_scripts_speak_of_fastppo_only():
    """The README, the scripts and the code name no tool or folder of the team's own machines: the GPU
    check is a script for any machine with CUDA and fastppo installed."""
    root = Path(__file__).resolve().parents[1]
    files = [root / "README.md", *root.glob("docs/*.md"), *root.glob("bench/*.py"), *root.glob("bench/*.sh"),
             *root.glob("fastppo/*.py"),
             *root.glob("kernels/*.py")]
    for path in files:
        text = path.read_text()
        for word in ("device tool", "../shared", ".device-site", "device-machine", "the issue"):
            assert word not in text, f"{path.name} mentions {word!r}"
        assert not re.search(r"\$OUT\b", text), f"{path.name} uses the device machine's $OUT"


def test_version_is_the_package_version(capsys):
    """fastppo --version prints fastppo.__version__, which pyproject.toml reads as the package's version (one
    place); py.typed ships in the package."""
    import tomllib

    import fastppo

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"fastppo {fastppo.__version__}\n"
    proc = subprocess.run([sys.executable, "-m", "fastppo", "--version"], capture_output=True, text=True, check=True)
    assert proc.stdout == f"fastppo {fastppo.__version__}\n"
    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert "version" in project["project"]["dynamic"] and "version" not in project["project"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fastppo.__version__"}
    assert project["tool"]["setuptools"]["package-data"]["fastppo"] == ["py.typed"]
    assert (root / "fastppo" / "py.typed").is_file() and (root / "LICENSE").read_text().startswith("MIT License")


def test_the_flags_given_come_from_tyros_parse_a_default_value_included():
    """given_flags: the fields a command line set, as tyro parsed it: a value equal to the field's default
    counts (--seed 1, --no-track, --anneal-lr, --gamma=0.99, --target-return None), a field left out does
    not; every field of every subcommand that takes one has another value of its type to tell them apart."""
    import tyro

    from fastppo.bench import BenchConfig
    from fastppo.cli import _elsewhere, _leaves, _subcommands, given_flags
    from fastppo.config import Config, TrainFlags

    for name, cls in _subcommands().items():
        if name == "eval":  # no defaults to tell apart (its run is positional), and it has no preset or resume
            continue
        ours, theirs = _leaves(cls()), _leaves(_elsewhere(cls()))
        assert [k for k in ours if ours[k] == theirs[k]] == [], name

    defaults = Config()
    argv = ["--seed", "1", "--no-track", "--anneal-lr", "--gamma=0.99", "--target-return", "None",
            "--wandb-tags", "a", "b", "--preset", "fast"]
    assert (defaults.seed, defaults.track, defaults.anneal_lr, defaults.gamma) == (1, False, True, 0.99)
    assert given_flags(tyro.cli(TrainFlags, args=argv), argv) == {
        "seed", "track", "anneal_lr", "gamma", "target_return", "wandb_tags", "preset"}
    assert given_flags(tyro.cli(TrainFlags, args=[]), []) == set()
    argv = ["--preset", "fast", "--update-epochs", "4", "--batch-fraction", "0.5", "--no-overlap"]
    assert given_flags(tyro.cli(BenchConfig, args=argv), argv) == {"preset", "update_epochs", "batch_fraction",
                                                                   "overlap"}


def test_a_config_from_python_knows_its_calls_arguments_without_wrapping_its_methods():
    """Config records the Config call's arguments (positional ones too) and the values it made: a later
    assignment of another value counts as set, a copy (copy.copy, pickle) keeps the record."""
    import copy
    import pickle

    from fastppo.config import Config, given_fields, mark_given

    assert not hasattr(Config.__init__, "__wrapped__") and "__setattr__" not in vars(Config)  # dataclass's own
    cfg = Config(None, num_steps=16, update_epochs=4)
    assert given_fields(cfg) == {"env_id", "num_steps", "update_epochs"}
    cfg.learning_rate = 1e-3
    cfg.seed = cfg.seed  # the value it had: nothing to keep from a preset
    assert given_fields(cfg) == {"env_id", "num_steps", "update_epochs", "learning_rate"}
    assert given_fields(copy.copy(cfg)) == given_fields(pickle.loads(pickle.dumps(cfg))) == given_fields(cfg)
    assert given_fields(mark_given(cfg, {"seed"})) == {"seed"}
