"""Shared helpers of the test suite."""

from __future__ import annotations

import json

from fastppo.logger import read_metrics  # noqa: F401  (the one reader of metrics.jsonl, re-exported for the tests)

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
