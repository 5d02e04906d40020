"""Learning: CartPole-v1 through the CLI reaches a mean full-game return >= 450 within 500k steps."""

from __future__ import annotations

import pytest
from helpers import read_metrics

from fastppo.cli import main


@pytest.mark.slow
def test_cartpole_learns_to_450(tmp_path, capsys):
    """Stops as soon as the mean of the last 10 full games reaches 450 (--target-return), which
    must happen within the 500k-step budget."""
    run_dir = tmp_path / "cartpole"
    code = main(["train", "--env-id", "CartPole-v1", "--total-timesteps", "500000", "--device", "cpu",
                 "--seed", "1", "--run-dir", str(run_dir), "--target-return", "450"])
    assert code == 0
    assert "target return 450.0 reached: mean of the last 10 games" in capsys.readouterr().out
    metrics = read_metrics(run_dir)
    assert metrics[-1]["global_step"] < 500_000
    assert metrics[-1]["charts/episodic_return"] is not None
