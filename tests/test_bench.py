"""`fastppo bench` smoke run on CPU: tiny settings, every mode measured, JSON + PNG written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from fastppo.cli import main


def test_bench_smoke(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        code = main(["bench", "--device", "cpu", "--env-id", "CartPole-v1", "--num-envs", "2", "4", "--seconds",
                     "0.2", "--warmup", "0.05", "--num-steps", "4", "--num-minibatches", "2", "--update-epochs", "1",
                     "--torch-threads", "1", "--out-dir", str(tmp_path), "--name", "smoke"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    out = capsys.readouterr().out
    assert "% of ceiling" in out and "wrote" in out
    result = json.loads((tmp_path / "smoke.json").read_text())
    assert (tmp_path / "smoke.png").stat().st_size > 0
    assert {"cpu", "cpu_cores", "versions", "commit", "date", "gpu"} <= set(result["machine"])
    assert result["settings"]["num_envs"] == [2, 4]
    for point in result["points"]:
        for key in ("envpool_sync", "envpool_async", "inference", "training"):
            assert point[key] > 0, key
        assert point["ceiling"] == point["envpool_async"]
        assert set(point["training_phases"]) == {"env_wait", "h2d", "inference", "gae", "update", "logging"}


def test_bench_cudagraphs_on_cpu_is_a_one_line_error(tmp_path, capsys):
    code = main(["bench", "--device", "cpu", "--cudagraphs", "--out-dir", str(tmp_path)])
    assert code == 2
    assert capsys.readouterr().err == "fastppo: error: --cudagraphs needs CUDA; the device is cpu\n"


def test_host_overhead_bench_smoke(tmp_path):
    script = Path(__file__).resolve().parents[1] / "bench" / "host_overhead.py"
    proc = subprocess.run([sys.executable, str(script), "--num-envs", "4", "8", "--num-steps", "4", "--rollouts", "1",
                           "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "host_overhead_cpu.json").read_text())["rows"]
    assert len(rows) == 2 * 2 * 2  # two observation shapes, sync and async, two env counts
    assert all(r["us_per_step"] > 0 for r in rows)
    bad = subprocess.run([sys.executable, str(script), "--num-envs", "5", "--out", str(tmp_path)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "host_overhead.py: error: --num-envs must be even counts >= 2, got [5]"]
