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


def wandb_history(records) -> list[dict]:
    """The history rows (wandb.log calls) among W&B records, as {name: value}."""
    return [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]
