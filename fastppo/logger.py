"""Run outputs: metrics.jsonl (one JSON object per iteration) and a progress line on stdout.

Metric names are CleanRL's (``charts/episodic_return``, ``losses/approx_kl``, ...) so fastppo runs
sit beside CleanRL runs. Values arrive here as Python numbers: the trainer converts its device
tensors once per log line, which is the one deliberate host sync per iteration.
"""

from __future__ import annotations

import json
import math
import os
import sys


class RunLogger:
    def __init__(self, run_dir: str, stream=None):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.file = open(self.path, "a")
        self.stream = stream if stream is not None else sys.stdout

    def log(self, metrics: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        print(progress_line(metrics), file=self.stream, flush=True)

    def close(self) -> None:
        self.file.close()


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def progress_line(m: dict) -> str:
    ret = m.get("charts/episodic_return")
    games = m.get("charts/episodes", 0)
    return (
        f"iter {m['iteration']}/{m['num_iterations']}  step {m['global_step']:,}  SPS {m['charts/SPS']:,}  "
        f"return {_fmt(ret, '.2f')} ({games} games)  pg {_fmt(m.get('losses/policy_loss'), '.4f')}  "
        f"v {_fmt(m.get('losses/value_loss'), '.4f')}  ent {_fmt(m.get('losses/entropy'), '.3f')}  "
        f"kl {_fmt(m.get('losses/kl'), '.4f')}"
    )
