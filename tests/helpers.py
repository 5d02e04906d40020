"""Shared helpers of the test suite."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time

from fastppo.logger import read_metrics  # noqa: F401  (the one reader of metrics.jsonl, re-exported for the tests)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(**extra) -> dict:
    """This checkout's fastppo first on the path (and the W&B folders of `wandb_home`, when set).

    WANDB_SERVICE is left out: set by an earlier in-process W&B run, it would make the child share
    this process's W&B service."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return dict(env, PYTHONPATH=ROOT, **extra)


def folder_digest(path) -> dict:
    out = {}
    for p in sorted(glob.glob(os.path.join(path, "**"), recursive=True)):
        if os.path.isfile(p):
            out[os.path.relpath(p, path)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def wait_for_lines(path, n: int, proc, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        if os.path.exists(path) and sum(1 for _ in open(path)) >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"{path} did not reach {n} lines")


TIMING_KEYS = ("charts/SPS", "time/elapsed")


def without_timings(metrics: list[dict]) -> list[dict]:
    """Metrics lines without the wall-clock fields (SPS, time/elapsed, perf/*), which differ run to run."""
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS and not k.startswith("perf/")} for m in metrics]


def read_wandb_records(path) -> list:
    """The records of a local W&B run file (run-<id>.wandb), as wandb's protobuf Records.

    The file is W&B's LevelDB-style log: a 7-byte header, then 32 KiB blocks of chunks, each with a
    7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last).
    """
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    block, pos, chunks, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def read_finished_wandb_records(path, timeout: float = 20.0) -> list:
    """The records of a finished W&B run file, once it holds the run's exit record.

    run.finish() can return before W&B's writer process has flushed the last records to the file,
    so this re-reads it until the exit record is there (or `timeout` seconds have passed).
    """
    import time

    deadline = time.monotonic() + timeout
    while True:
        records = read_wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def wandb_history(records) -> list[dict]:
    """The history rows (wandb.log calls) among W&B records, as {name: value}."""
    return [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


def two_iteration_cartpole(tmp_path_factory, name: str):
    """A finished 2-iteration CartPole run with a checkpoint at each iteration, in a fresh folder (for a
    module-scoped fixture; copy it before changing it)."""
    from fastppo.cli import main

    run_dir = tmp_path_factory.mktemp("runs") / name
    assert main(["train", "--env-id", "CartPole-v1", "--device", "cpu", "--run-dir", str(run_dir),
                 "--total-timesteps", "1024", "--save-every", "1"]) == 0
    return run_dir
