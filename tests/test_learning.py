"""Learning: CartPole-v1 through the CLI reaches a mean full-game return >= 450 within 500k steps."""

from __future__ import annotations

import pytest
from helpers import best_recent_return, read_metrics

from fastppo.cli import main


@pytest.mark.slow
def test_cartpole_learns_to_450(tmp_path):
    run_dir = tmp_path / "cartpole"
    code = main(["train", "--env-id", "CartPole-v1", "--total-timesteps", "500000", "--device", "cpu",
                 "--seed", "1", "--run-dir", str(run_dir)])
    assert code == 0
    metrics = read_metrics(run_dir)
    assert metrics[-1]["global_step"] <= 500_000
    assert best_recent_return(metrics, games=10) >= 450
