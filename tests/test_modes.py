"""Trainer options of the kernels issue: --kernels, --minibatch-by, --advantages."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import read_metrics

from fastppo.checkpoint import load_checkpoint
from fastppo.cli import main

CARTPOLE = ["train", "--env-id", "CartPole-v1", "--device", "cpu"]


@pytest.mark.parametrize("minibatch_by", ["sample", "env"])
@pytest.mark.parametrize("advantages", ["rollout", "epoch"])
def test_minibatch_and_advantage_modes_run(tmp_path, minibatch_by, advantages):
    run_dir = tmp_path / "r"
    code = main([*CARTPOLE, "--run-dir", str(run_dir), "--total-timesteps", "2048", "--minibatch-by", minibatch_by,
                 "--advantages", advantages])
    assert code == 0
    metrics = read_metrics(run_dir)
    assert len(metrics) == 4
    assert all(m["losses/value_loss"] is not None and m["losses/value_loss"] > 0 for m in metrics)


def test_env_minibatches_need_divisible_envs(tmp_path, capsys):
    code = main([*CARTPOLE, "--run-dir", str(tmp_path / "r"), "--num-envs", "6", "--num-minibatches", "4",
                 "--num-steps", "2", "--minibatch-by", "env"])
    assert code == 2
    assert "--minibatch-by env: --num-envs 6 does not divide by --num-minibatches 4" in capsys.readouterr().err


def test_triton_on_cpu_without_interpreter_is_a_one_line_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastppo", *CARTPOLE, "--run-dir", str(tmp_path / "r"),
                           "--kernels", "triton"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr.startswith("fastppo: error: --kernels triton: ") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("mode", [["--minibatch-by", "sample"], ["--minibatch-by", "env", "--advantages", "epoch"],
                                  ["--loss", "penalty"],
                                  ["--env-id", "Pendulum-v1", "--num-minibatches", "2", "--loss", "penalty"],
                                  ["--env-id", "Pendulum-v1", "--num-envs", "2", "--num-minibatches", "2",
                                   "--minibatch-by", "env", "--advantages", "epoch"]],
                         ids=["sample", "env-epoch-fused", "penalty", "gaussian-penalty", "gaussian-env-epoch-fused"])
def test_triton_and_torch_kernels_train_the_same(tmp_path, mode):
    """Same seed, --kernels triton (interpreted on CPU) vs torch: same losses and parameters after
    several iterations, within float32 tolerance (categorical and Gaussian ops)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    runs = {}
    for kind in ("torch", "triton"):
        run_dir = tmp_path / kind
        subprocess.run([sys.executable, "-m", "fastppo", *CARTPOLE, "--run-dir", str(run_dir), "--kernels", kind,
                        "--num-steps", "32", "--total-timesteps", "512", *mode], check=True, env=env,
                       capture_output=True)
        runs[kind] = (read_metrics(run_dir), load_checkpoint(str(run_dir))["model"])
    (m_torch, p_torch), (m_triton, p_triton) = runs["torch"], runs["triton"]
    assert len(m_torch) == len(m_triton) >= 4
    for a, b in zip(m_torch, m_triton, strict=True):
        # the same actions were taken (continuous ones up to the float32 rounding of the weights)
        ret_a, ret_b = a["charts/episodic_return"], b["charts/episodic_return"]
        assert ret_a == ret_b or (None not in (ret_a, ret_b) and ret_a == pytest.approx(ret_b, rel=1e-5))
        for key in ("losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/approx_kl", "losses/kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    for name, value in p_torch.items():
        torch.testing.assert_close(p_triton[name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_fused_gae_loss_mode_learns_cartpole(tmp_path, capsys):
    """--minibatch-by env --advantages epoch (one fused GAE + loss op per minibatch) reaches the
    same score as the default mode: a 10-game mean >= 450 within 500k steps."""
    run_dir = tmp_path / "fused"
    code = main([*CARTPOLE, "--run-dir", str(run_dir), "--total-timesteps", "500000", "--seed", "1",
                 "--minibatch-by", "env", "--advantages", "epoch", "--target-return", "450"])
    assert code == 0
    assert "target return 450.0 reached" in capsys.readouterr().out
    assert read_metrics(run_dir)[-1]["global_step"] < 500_000
