"""--preset: named settings that explicit flags override; bench/learning.py writes its results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import read_metrics

from fastppo.cli import main
from fastppo.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]
CARTPOLE = ["train", "--env-id", "CartPole-v1", "--device", "cpu", "--total-timesteps", "1024"]


def config(run_dir) -> dict:
    return json.loads((run_dir / "config.json").read_text())


def test_cleanrl_preset_is_cleanrls_hyperparameters(tmp_path):
    assert main([*CARTPOLE, "--run-dir", str(tmp_path / "c"), "--preset", "cleanrl"]) == 0
    c = config(tmp_path / "c")
    # CleanRL ppo.py for vector observations: 4 envs x 128 steps, clip 0.2, 4 minibatches x 4 epochs, ...
    assert (c["num_envs"], c["num_steps"], c["clip_coef"], c["num_minibatches"], c["update_epochs"]) == (4, 128, 0.2,
                                                                                                       4, 4)
    assert (c["learning_rate"], c["ent_coef"], c["vf_coef"], c["max_grad_norm"], c["gamma"], c["gae_lambda"]) == (
        2.5e-4, 0.01, 0.5, 0.5, 0.99, 0.95)
    assert not (c["async_envs"] or c["overlap"] or c["compile"] or c["bf16"])
    assert (c["minibatch_by"], c["advantages"], c["loss"]) == ("sample", "rollout", "clip")


def test_fast_preset_values_and_explicit_flags_win(tmp_path):
    run_dir = tmp_path / "f"
    assert main([*CARTPOLE, "--run-dir", str(run_dir), "--preset", "fast", "--num-envs", "8", "--num-steps", "32",
                 "--update-epochs", "2"]) == 0
    c = config(run_dir)
    for key, value in PRESETS["fast"]["discrete"].items():
        if key not in ("num_envs", "num_steps", "update_epochs"):
            assert c[key] == value, key
    assert (c["num_envs"], c["num_steps"], c["update_epochs"]) == (8, 32, 2)  # the flags given, not the preset's
    assert len(read_metrics(run_dir)) == 4


def test_help_lists_the_presets():
    out = subprocess.run([sys.executable, "-m", "fastppo", "train", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "--preset {none,cleanrl,fast}" in out and "not yet timed on a GPU" in out


def test_preset_cannot_change_on_resume(tmp_path, capsys):
    run_dir = tmp_path / "r"
    assert main([*CARTPOLE, "--run-dir", str(run_dir), "--save-every", "1"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir), "--preset", "fast"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastppo: error: ") and "--preset" in err and err.count("\n") == 1


def test_learning_bench_writes_json_and_png(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "learning.py"), "--env-id", "CartPole-v1", "--preset",
                           "cleanrl", "--target-return", "30", "--device", "cpu", "--max-seconds", "60", "--out-dir",
                           str(out), "--name", "smoke"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "smoke.json").read_text())
    assert result["reached"] and result["stopped_by"] == "target_return"
    assert result["curve"] and result["curve"][-1]["global_step"] == result["steps"]
    assert result["machine"]["cpu_cores"] and result["config"]["preset"] == "cleanrl"
    assert (out / "smoke.png").stat().st_size > 1000
    assert "target 30 reached" in proc.stdout


def test_learning_bench_resumes_a_run_and_reports_all_of_it(tmp_path):
    out = tmp_path / "results"
    script = [sys.executable, str(ROOT / "bench" / "learning.py")]
    first = subprocess.run([*script, "--env-id", "CartPole-v1", "--preset", "cleanrl", "--target-return", "500",
                            "--device", "cpu", "--max-seconds", "1", "--out-dir", str(out), "--name", "r"],
                           capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    before = json.loads((out / "r.json").read_text())
    assert before["stopped_by"] == "max_seconds" and not before["resumed"]

    refused = subprocess.run([*script, "--resume", str(out / "runs" / "r"), "--target-return", "30"],
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "do not give them" in refused.stderr.strip().splitlines()[-1]
    missing = subprocess.run([*script, "--resume", str(tmp_path / "nothing"), "--device", "cpu"],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        f"learning.py: error: --resume {str(tmp_path / 'nothing')!r}: no such run folder"]

    second = subprocess.run([*script, "--resume", str(out / "runs" / "r"), "--device", "cpu", "--max-seconds", "1",
                             "--out-dir", str(out)], capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    after = json.loads((out / "r.json").read_text())
    assert after["resumed"] and after["target_return"] == 500 and after["env_id"] == "CartPole-v1"
    steps = [p["global_step"] for p in after["curve"]]
    assert steps[: len(before["curve"])] == [p["global_step"] for p in before["curve"]]  # the whole run
    assert after["steps"] > before["steps"] and steps == sorted(set(steps))
    assert after["seconds"] > before["seconds"]


def test_learning_bench_runs_several_seeds_and_draws_another_result_beside(tmp_path):
    """--seeds 1 2: one run per seed, each with its curve and the steps and seconds where its recent return first
    reached the target; --compare draws that file's runs beside a new one's in the same PNG."""
    out = tmp_path / "results"
    script = [sys.executable, str(ROOT / "bench" / "learning.py"), "--env-id", "CartPole-v1", "--preset", "cleanrl",
              "--target-return", "30", "--device", "cpu", "--max-seconds", "30", "--out-dir", str(out)]
    proc = subprocess.run([*script, "--seeds", "1", "2", "--name", "multi"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "multi.json").read_text())
    assert result["seeds"] == [1, 2] and result["reached"] and result["machine"]["cpu_cores"]
    for seed, run in zip((1, 2), result["runs"], strict=True):
        assert run["seed"] == run["config"]["seed"] == seed and run["stopped_by"] == "target_return"
        assert (out / "runs" / f"multi_seed{seed}" / "config.json").exists()
        steps = [p["global_step"] for p in run["curve"]]
        seconds = [p["seconds"] for p in run["curve"]]
        assert steps == [512 * i for i in range(1, len(steps) + 1)] and seconds == sorted(seconds)
        first = next(p for p in run["curve"] if p["recent"] is not None and p["recent"] >= 30)
        assert (run["target_steps"], run["target_seconds"]) == (first["global_step"], first["seconds"])
        assert run["target_steps"] == run["steps"] == steps[-1]  # the run stopped there
        assert f"seed {seed}: target 30 reached after {run['steps']:,} steps" in proc.stdout
    assert result["runs"][0]["curve"] != result["runs"][1]["curve"]

    proc = subprocess.run([*script, "--seeds", "3", "--name", "one", "--compare", str(out / "multi.json"),
                           "--", "--total-timesteps", "1024"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    one = json.loads((out / "one.json").read_text())
    assert one["seed"] == 3 and not one["reached"] and one["target_steps"] is None and one["steps"] == 1024
    assert one["compare"] == [{"file": str(out / "multi.json"), "presets": ["cleanrl"], "seeds": [1, 2]}]
    assert (out / "one.png").stat().st_size > (out / "multi.png").stat().st_size / 2 > 1000
    bad = subprocess.run([*script, "--compare", str(out / "one.png")], capture_output=True, text=True)
    assert bad.returncode == 2 and "--compare" in bad.stderr.strip().splitlines()[-1]

    # --report: the results of existing runs, no training, against another target
    report = [sys.executable, str(ROOT / "bench" / "learning.py"), "--out-dir", str(out), "--target-return", "20"]
    proc = subprocess.run([*report, "--report", str(out / "runs" / "one"), str(out / "runs" / "multi_seed1"), "--name",
                           "both"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    both = json.loads((out / "both.json").read_text())
    assert [r["seed"] for r in both["runs"]] == [3, 1] and both["target_return"] == 20
    assert both["runs"][0]["curve"] == one["curve"] and both["runs"][0]["stopped_by"] == "total_timesteps"
    assert both["runs"][1]["target_steps"] <= result["runs"][0]["target_steps"]  # 20 comes before 30
    # --label: what the picture and the JSON call runs whose flags equal another preset's values
    proc = subprocess.run([*report, "--report", str(out / "runs" / "one"), "--name", "labelled", "--label",
                           "fast's settings"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    labelled = json.loads((out / "labelled.json").read_text())
    assert labelled["label"] == "fast's settings" and labelled["preset"] == one["preset"]
    from importlib import util
    spec = util.spec_from_file_location("learning", ROOT / "bench" / "learning.py")
    learning = util.module_from_spec(spec)
    spec.loader.exec_module(learning)
    assert learning.run_label(labelled) == "fast's settings" and learning.run_label(one) == f"--preset {one['preset']}"
    missing = subprocess.run([*report, "--report", str(tmp_path / "nothing")], capture_output=True, text=True)
    assert missing.returncode == 2 and "no such run folder" in missing.stderr.strip().splitlines()[-1]


def test_a_preset_fills_only_the_fields_its_caller_did_not_set(tmp_path):
    """One rule for the command line and for Python: what the caller set wins over the preset, even a
    value equal to the field's default (update_epochs=4); a later assignment counts as set too."""
    from fastppo.config import Config, given_fields
    from fastppo.presets import apply_preset
    from fastppo.trainer import train

    assert apply_preset(Config(preset="fast", update_epochs=4), "discrete").update_epochs == 4
    assert apply_preset(Config(preset="fast"), "discrete").update_epochs == PRESETS["fast"]["discrete"]["update_epochs"]
    cfg = Config(preset="fast")
    cfg.update_epochs = 4
    assert "update_epochs" in given_fields(cfg) and apply_preset(cfg, "discrete").update_epochs == 4
    train(Config(env_id="CartPole-v1", device="cpu", total_timesteps=1024, preset="fast", update_epochs=4,
                 num_envs=8, num_steps=32, run_dir=str(tmp_path / "py")))
    assert main([*CARTPOLE, "--run-dir", str(tmp_path / "cli"), "--preset", "fast", "--update-epochs", "4",
                 "--num-envs", "8", "--num-steps", "32"]) == 0
    for name in ("py", "cli"):
        c = config(tmp_path / name)
        assert c["update_epochs"] == 4 and c["learning_rate"] == PRESETS["fast"]["discrete"]["learning_rate"], name


def test_a_changed_copy_keeps_the_record_of_what_was_set():
    """config.replace keeps which fields the caller set (dataclasses.replace counts every field as set,
    so the preset would no longer fill anything); resolve's fills and a preset's values are not "set"."""
    from fastppo.config import Config, given_fields, replace, resolve
    from fastppo.envs import env_info
    from fastppo.presets import apply_preset

    fast = PRESETS["fast"]["discrete"]
    cfg = replace(Config(preset="fast", env_id="CartPole-v1", update_epochs=4), seed=2)
    assert given_fields(cfg) == {"preset", "env_id", "update_epochs", "seed"}
    filled = apply_preset(cfg, "discrete")
    assert filled.update_epochs == 4 and filled.num_steps == fast["num_steps"]
    resolved = resolve(filled, env_info("CartPole-v1"))
    assert given_fields(resolved) == given_fields(cfg)  # kl_max, world_size, the kind's defaults: filled in


def test_fast_for_atari_is_the_measured_setting_and_valid():
    """fast's Atari values (docs/presets.md: measured on Pong) resolve to a valid config: 32 async envs x 128
    with --overlap, minibatches of 256, clip 0.2 and --decoupled; --no-decoupled given wins."""
    from fastppo.config import Config, env_kind, resolve, validate
    from fastppo.envs import env_info
    from fastppo.presets import apply_preset

    info = env_info("Pong-v5")
    assert env_kind(info) == "atari"
    cfg = resolve(apply_preset(Config(env_id="Pong-v5", preset="fast", device="cpu"), env_kind(info)), info)
    validate(cfg)
    assert (cfg.num_envs, cfg.num_steps, cfg.minibatch_size, cfg.update_epochs) == (32, 128, 256, 4)
    assert cfg.async_envs and cfg.overlap and cfg.decoupled and cfg.clip_coef == 0.2
    off = apply_preset(Config(env_id="Pong-v5", preset="fast", device="cpu", decoupled=False), "atari")
    assert off.decoupled is False and off.overlap
