"""fastppo.tensorboard: metrics lines as TensorBoard scalars, read back with TensorBoard's own loader."""

from __future__ import annotations

import os
import time

import pytest

from fastppo.tensorboard import FOLDER, TensorBoardWriter, scalars, tensorboard_installed

pytest.importorskip("tensorboard")


def line(step: int, **values) -> dict:
    """A metrics line as the trainer writes it (names of metrics.jsonl)."""
    return {"global_step": step, "iteration": step // 8, "num_iterations": 4, **values}


def read_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} as TensorBoard's EventAccumulator loads the run's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, FOLDER), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_installed_is_found_without_importing_it():
    assert tensorboard_installed()


def test_scalars_keeps_finite_numbers_only():
    got = scalars({"global_step": 8, "iteration": 1, "charts/episodic_return": None, "losses/kl": 0.5,
                   "charts/SPS": 1200, "stopped_by": "max_seconds", "flag": True, "losses/value_loss": float("nan")})
    assert got == {"iteration": 1.0, "losses/kl": 0.5, "charts/SPS": 1200.0}


def test_lines_become_scalars_at_their_global_step(tmp_path):
    writer = TensorBoardWriter(str(tmp_path))
    writer.log(line(8, **{"charts/episodic_return": None, "losses/approx_kl": 0.25, "perf/iteration": 0.5}))
    writer.log(line(16, **{"charts/episodic_return": 21.0, "losses/approx_kl": 0.125, "perf/iteration": 0.75,
                           "eval/episodic_return": 30.0, "stopped_by": "target_return"}))
    writer.finish()
    writer.finish()  # a no-op, as after a failure
    writer.log(line(24, **{"losses/approx_kl": 9.0}))  # after finish: nothing written, no error
    got = read_scalars(tmp_path)
    assert set(got) == {"iteration", "num_iterations", "charts/episodic_return", "losses/approx_kl",
                        "perf/iteration", "eval/episodic_return"}
    assert got["losses/approx_kl"] == [(8, 0.25), (16, 0.125)]
    assert got["charts/episodic_return"] == [(16, 21.0)]  # None on the first line: skipped
    assert got["eval/episodic_return"] == [(16, 30.0)]
    assert got["perf/iteration"] == [(8, 0.5), (16, 0.75)]
    assert os.listdir(tmp_path) == [FOLDER]


def test_a_resumed_run_continues_the_same_tags_without_overlapping_steps(tmp_path):
    # First launch: checkpoint at step 16, then two more lines (24, 32) before a kill; an eval at 24.
    first = TensorBoardWriter(str(tmp_path))
    for step in (8, 16, 24, 32):
        evaluated = {"eval/episodic_return": -5.0} if step == 24 else {}
        first.log(line(step, **{"losses/approx_kl": step / 64}, **evaluated))
    first.finish()
    # TensorBoard reads a folder's event files in name order, and the name starts with the creation
    # second: a resumed launch is a later process, here a later second in the same one.
    time.sleep(1.01 - time.time() % 1)
    # The resumed launch redoes the lines after the checkpoint (other values) and goes on.
    resumed = TensorBoardWriter(str(tmp_path), resume_step=16)
    for step in (24, 32, 40):
        evaluated = {"eval/episodic_return": 7.0} if step == 40 else {}
        resumed.log(line(step, **{"losses/approx_kl": -step / 64}, **evaluated))
    resumed.finish()
    assert len(os.listdir(tmp_path / FOLDER)) == 2
    got = read_scalars(tmp_path)
    assert got["losses/approx_kl"] == [(8, 0.125), (16, 0.25), (24, -0.375), (32, -0.5), (40, -0.625)]
    # the eval of the killed launch at step 24 is hidden too, though the resumed run never logs that tag at 24
    assert got["eval/episodic_return"] == [(40, 7.0)]
    assert [s for s, _ in got["iteration"]] == [8, 16, 24, 32, 40]


def test_an_unwritable_folder_is_one_warning_and_no_writer(tmp_path, capsys):
    blocker = tmp_path / "run"
    blocker.write_text("a file where the run folder should be")
    writer = TensorBoardWriter(str(blocker))
    writer.log(line(8, **{"losses/kl": 0.1}))
    writer.finish()
    err = capsys.readouterr().err
    assert err.startswith("fastppo: warning: cannot write TensorBoard files to") and err.count("\n") == 1
