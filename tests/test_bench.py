"""`fastppo bench`: every measured run is a Config (resolved as train resolves it), smoke run on CPU,
bad arguments as one line, and bench/host_overhead.py."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastppo.bench import BenchConfig, BenchTraining, point_config, resolve_bench, training_iterations
from fastppo.cli import main
from fastppo.config import Config, given_fields

TINY = ["--device", "cpu", "--env-id", "CartPole-v1", "--num-steps", "4", "--num-minibatches", "2",
        "--update-epochs", "1"]
# the keys of the JSON's settings before the bench took its training options from Config
OLD_SETTINGS = {"env_id", "num_envs", "seconds", "warmup", "num_steps", "update_epochs", "num_minibatches",
                "async_envs", "batch_fraction", "overlap", "compile", "cudagraphs", "bf16", "env_threads",
                "torch_threads", "device", "out_dir", "name", "seed"}


def test_bench_smoke(tmp_path, capsys):
    threads = torch.get_num_threads()
    code = main(["bench", *TINY, "--num-envs", "2", "4", "--seconds", "0.2", "--warmup", "0.05",
                 "--out-dir", str(tmp_path), "--name", "smoke"])
    assert code == 0
    assert torch.get_num_threads() == threads  # the run's torch threads are put back
    out = capsys.readouterr().out
    assert "% of ceiling" in out and "wrote" in out
    result = json.loads((tmp_path / "smoke.json").read_text())
    assert (tmp_path / "smoke.png").stat().st_size > 0
    assert {"cpu", "cpu_cores", "versions", "commit", "date", "gpu", "torch_threads"} <= set(result["machine"])
    settings = result["settings"]
    assert OLD_SETTINGS <= set(settings)
    assert settings["num_envs"] == [2, 4] and settings["name"] == "smoke" and settings["num_steps"] == 4
    assert settings["async_envs"] is True and settings["overlap"] is True  # the bench's defaults
    assert settings["loss"] == "clip" and settings["clip_coef"] == 0.2  # resolved as train resolves CartPole
    for point, n in zip(result["points"], (2, 4), strict=True):
        assert point["num_envs"] == n and point["batch_size"] == n // 2
        for key in ("envpool_sync", "envpool_async", "inference", "training"):
            assert point[key] > 0, key
        assert point["ceiling"] == point["envpool_async"]
        assert set(point["training_phases"]) == {"env_wait", "h2d", "inference", "gae", "update", "logging"}
        assert point["torch_threads"] == 1  # --torch-threads 0 on the MLP: 1 thread, as train uses
        assert point["training_iterations"] >= 3 and point["seconds"] > 0
    assert result["seconds"] >= sum(p["seconds"] for p in result["points"]) - 1e-6
    assert result["machine"]["commit"] != "unknown" and "fastppo" in result["machine"]["versions"]


@pytest.mark.parametrize("env_id,source,label", [("gym:CartPole-v1", "gym", "Gymnasium"),
                                                  ("torch:CartPole-v1", "device", "device env")])
def test_bench_of_your_own_env(tmp_path, capsys, env_id, source, label):
    """A Gymnasium vector env and a device env are measured like EnvPool's: the env alone (sync: no send/recv, so
    the bench's default --async-envs is dropped), envs + inference, training."""
    assert main(["bench", *TINY, "--env-id", env_id, "--num-envs", "4", "--seconds", "0.2", "--warmup", "0.05",
                 "--out-dir", str(tmp_path), "--name", source]) == 0
    assert f"{label} sync" in capsys.readouterr().out
    result = json.loads((tmp_path / f"{source}.json").read_text())
    assert result["env_source"] == source and result["settings"]["async_envs"] is False
    assert result["settings"]["overlap"] is True and "gymnasium" in result["machine"]["versions"]
    (point,) = result["points"]
    assert point["envpool_async"] is None and point["ceiling"] == point["envpool_sync"] > 0
    assert point["batch_size"] == 4 and point["inference"] > 0 and point["training"] > 0
    assert (tmp_path / f"{source}.png").stat().st_size > 0


def test_training_is_measured_over_whole_iterations_three_at_least():
    cfg = Config(num_envs=8, num_steps=32)  # 256 steps per iteration
    bench = BenchConfig(seconds=5.0, warmup=2.0)
    assert training_iterations(cfg, bench, rate=256.0) == (1 + 2, 5)  # an iteration a second
    assert training_iterations(cfg, bench, rate=25.6) == (1 + 1, 3)  # 10 s an iteration: still 3 measured
    assert training_iterations(cfg, bench, rate=25600.0) == (1 + 200, 500)


def test_the_commit_is_fastppos_own(tmp_path, monkeypatch):
    """The JSON's commit is this checkout's; a tree that is not fastppo's checkout (a copy, an installed
    package inside some other repository) says $FASTPPO_COMMIT or "unknown", never another repo's."""
    import fastppo.bench as bench_module

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=bench_module.ROOT, capture_output=True,
                          text=True).stdout.strip()
    assert bench_module.fastppo_commit().startswith(head[:7])
    other = tmp_path / "project"
    (other / "site-packages").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(other)], check=True)
    monkeypatch.setattr(bench_module, "ROOT", other / "site-packages")
    monkeypatch.delenv("FASTPPO_COMMIT", raising=False)
    assert bench_module.fastppo_commit() == "unknown"
    monkeypatch.setenv("FASTPPO_COMMIT", "abc1234")
    assert bench_module.fastppo_commit() == "abc1234"


def test_bench_of_a_continuous_env(tmp_path, capsys):
    """Random actions for the ceiling come from the Box; the preset and defaults are the continuous ones."""
    assert main(["bench", "--device", "cpu", "--env-id", "Pendulum-v1", "--num-envs", "2", "--num-steps", "8",
                 "--num-minibatches", "2", "--update-epochs", "1", "--seconds", "0.2", "--warmup", "0.05",
                 "--out-dir", str(tmp_path), "--name", "box"]) == 0
    capsys.readouterr()
    result = json.loads((tmp_path / "box.json").read_text())
    assert result["settings"]["norm_obs"] is True and result["settings"]["learning_rate"] == 3e-4
    assert all(result["points"][0][key] > 0 for key in ("envpool_sync", "envpool_async", "inference", "training"))


def test_each_point_is_a_config_with_the_bench_defaults_and_the_preset_rule():
    bench = BenchConfig(num_envs=(8,), seconds=1.0, warmup=0.5)
    cfg = point_config(bench, 8, "CartPole-v1", given_fields(bench.training), "discrete")
    assert (cfg.num_steps, cfg.async_envs, cfg.overlap, cfg.env_batch_size, cfg.num_envs) == (32, True, True, 4, 8)
    assert cfg.max_seconds is None and cfg.total_timesteps >= 1000 * cfg.batch_size and cfg.run_dir is None
    # a preset fills the fields not given (the bench's defaults included); explicit ones win, as in train
    bench = BenchConfig(batch_fraction=0.25, seconds=1.0, warmup=0.0,
                        training=BenchTraining(preset="fast", update_epochs=4))
    cfg = point_config(bench, 16, "CartPole-v1", given_fields(bench.training), "discrete")
    assert (cfg.num_steps, cfg.update_epochs, cfg.learning_rate, cfg.num_envs, cfg.env_batch_size) == (128, 4, 3e-4,
                                                                                                       16, 4)
    # the command line's flags (cli.given_flags) are the given fields
    cfg = point_config(BenchConfig(seconds=1.0, warmup=0.0, training=BenchTraining(preset="cleanrl", num_steps=8)),
                       4, "CartPole-v1", {"preset", "num_steps"}, "discrete")
    assert (cfg.num_steps, cfg.async_envs, cfg.overlap, cfg.env_batch_size) == (8, False, False, None)


def test_resolve_bench_resolves_every_point_as_train_does(tmp_path):
    bench = BenchConfig(num_envs=(4, 8), out_dir=str(tmp_path / "new" / "folder"), name="x",
                        training=BenchTraining(device="cpu", env_id="Acrobot-v1", loss="penalty"))
    sweep = resolve_bench(bench)
    assert [p.cfg.num_envs for p in sweep.points] == [4, 8]
    assert all(p.cfg.kl_max == pytest.approx(0.015) and p.cfg.world_size == 1 for p in sweep.points)
    assert (sweep.bench.seconds, sweep.bench.warmup) == (2.0, 0.5)  # CPU defaults
    assert sweep.stem == str(tmp_path / "new" / "folder" / "x") and (tmp_path / "new" / "folder").is_dir()


@pytest.mark.parametrize("args,message", [
    (["--num-steps", "0"], "--num-steps must be positive, got 0"),
    (["--num-envs", "4", "0"], "--num-envs must be positive, got 0"),
    (["--num-envs", "6", "--num-steps", "3", "--num-minibatches", "4"],
     "num_envs * num_steps = 6 * 3 = 18 does not divide by --num-minibatches 4"),
    (["--seconds", "nan"], "--seconds must be a positive number, got nan"),
    (["--seconds", "0"], "--seconds must be a positive number, got 0.0"),
    (["--warmup", "inf"], "--warmup must be a number >= 0, got inf"),
    (["--batch-fraction", "0"], "--batch-fraction must be in (0, 1], got 0.0"),
    (["--num-envs", "4", "4"], "--num-envs lists a value twice: 4 4"),
    (["--cudagraphs", "True"], "--cudagraphs needs CUDA; the training device is cpu"),
    (["--learning-rate", "-1"], "--learning-rate must be positive, got -1.0"),
    (["--env-id", "CartPole-v9"], "unknown --env-id 'CartPole-v9'"),
    (["--env-id", "torch:CartPole-v1", "--async-envs"], "--async-envs is EnvPool's send/recv"),
    (["--name", "a/b"], "--name must be a file name (no folder), got 'a/b'"),
    (["--out-dir", "{file}"], "exists and is not a folder"),
])
def test_bad_arguments_are_one_line_before_anything_runs(tmp_path, args, message, capsys):
    (tmp_path / "file").write_text("")
    args = [a.format(file=tmp_path / "file") for a in args]
    out_dir = tmp_path / "out"
    extra = [] if "--out-dir" in args else ["--out-dir", str(out_dir)]
    assert main(["bench", "--device", "cpu", *extra, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastppo: error: ") and message in err and err.count("\n") == 1, err
    assert not out_dir.exists()  # nothing measured or written


def test_options_the_bench_sets_are_not_flags(capsys):
    for flag in ("--total-timesteps", "--run-dir", "--max-seconds", "--env-batch-size", "--resume", "--track"):
        assert main(["bench", flag, "1"]) == 2
        assert f"unknown flag {flag} of fastppo bench" in capsys.readouterr().err


def test_host_overhead_bench_smoke(tmp_path):
    script = Path(__file__).resolve().parents[1] / "bench" / "host_overhead.py"
    proc = subprocess.run([sys.executable, str(script), "--num-envs", "4", "8", "--num-steps", "4", "--rollouts", "1",
                           "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "host_overhead_cpu.json").read_text())["rows"]
    assert len(rows) == 2 * 2 * 2  # two observation shapes, sync and async, two env counts
    assert all(r["us_per_step"] > 0 for r in rows)
    # the collector's own torch operators, by name; they add up to the count per step
    assert all(r["ops_per_step"] > 0 and sum(r["ops"].values()) == pytest.approx(r["ops_per_step"]) for r in rows)
    bad = subprocess.run([sys.executable, str(script), "--num-envs", "5", "--out", str(tmp_path)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "host_overhead.py: error: --num-envs must be even counts >= 2, got [5]"]


def test_bench_flags_are_the_training_fields_and_its_own():
    """BenchTraining hides exactly the fields the bench sets per point or that a measurement ignores
    (SET_PER_POINT, NOT_MEASURED); every other training option is a flag of fastppo bench."""
    from fastppo.bench import NOT_MEASURED, SET_PER_POINT, TRAINING_FIELDS

    out = subprocess.run([sys.executable, "-m", "fastppo", "bench", "--help"], capture_output=True, text=True,
                         check=True).stdout
    flags = {token.split("=")[0].split(",")[0].split("{")[0] for token in out.split() if token.startswith("--")}
    for name in TRAINING_FIELDS:
        assert f"--{name.replace('_', '-')}" in flags or f"--no-{name.replace('_', '-')}" in flags, name
    own = {f.name for f in dataclasses.fields(BenchConfig)}  # --num-envs: the sweep's list
    for name in {*SET_PER_POINT, *NOT_MEASURED} - own:
        assert f"--{name.replace('_', '-')}" not in flags, name


def test_update_cost_times_the_four_updates_on_one_rollout(tmp_path):
    proc = subprocess.run([sys.executable, "bench/update_cost.py", "--env-id", "CartPole-v1", "--device", "cpu",
                           "--repeats", "1", "--out-dir", str(tmp_path)], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "update_cost_CartPole-v1_cpu.json").read_text())
    assert set(result["ms_per_update_median"]) == {"clip", "decoupled", "penalty", "trpo"}
    assert result["ratio_to_clip"]["clip"] == 1.0 and all(v > 0 for v in result["ms_per_update_median"].values())
    assert (result["num_envs"], result["num_steps"]) == (4, 128)
    proc = subprocess.run([sys.executable, "bench/update_cost.py", "--env-id", "CartPole-v1", "--device", "cpu",
                           "--repeats", "1", "--algos", "decoupled", "--out-dir", str(tmp_path)],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "update_cost_CartPole-v1_cpu.json").read_text())
    assert set(result["ms_per_update_median"]) == {"clip", "decoupled"}  # clip: the ratios' base, always


def test_results_go_to_a_folder_in_the_current_directory_by_default(tmp_path, monkeypatch):
    """Without --out-dir the JSON and PNG go to ./fastppo_bench, wherever fastppo is installed: never into a
    bench/results/ folder that the user's directory has no reason to hold."""
    monkeypatch.chdir(tmp_path)
    assert BenchConfig().out_dir == "fastppo_bench"
    sweep = resolve_bench(BenchConfig(num_envs=(4,), name="x", training=BenchTraining(device="cpu")))
    assert sweep.stem == os.path.join("fastppo_bench", "x") and (tmp_path / "fastppo_bench").is_dir()
    assert sorted(os.listdir(tmp_path)) == ["fastppo_bench"]
