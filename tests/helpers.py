"""Shared helpers of the test suite."""

from __future__ import annotations

import json
import os


def read_metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def best_recent_return(metrics: list[dict], games: int = 10) -> float:
    """The best mean full-game return over `games` consecutive finished games.

    metrics.jsonl holds, per line, the mean return of the games that ended since the previous line
    and their count, so the window is built from whole lines holding at least `games` games.
    """
    best = float("-inf")
    lines = [(m["charts/episodic_return"], m["charts/episodes"]) for m in metrics if m["charts/episodes"]]
    for end in range(len(lines)):
        total = count = 0
        for ret, n in reversed(lines[: end + 1]):
            total += ret * n
            count += n
            if count >= games:
                best = max(best, total / count)
                break
    return best
