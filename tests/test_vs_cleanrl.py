"""bench/vs_cleanrl.py without CleanRL: bad arguments as one line before anything runs, and one round
against fake CleanRL and fastppo scripts that log what the real ones log (CleanRL's TensorBoard
charts/SPS events, fastppo's metrics.jsonl), at clock values they choose, so the measure is exact."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "vs_cleanrl.py"
spec = importlib.util.spec_from_file_location("vs_cleanrl", SCRIPT)
vs = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = vs  # dataclasses look their module up there
spec.loader.exec_module(vs)

pytest.importorskip("tensorboard")

# Logs charts/SPS as CleanRL does (SummaryWriter's event file in runs/<run name>/ under its working folder)
# until it is stopped: iteration k ends at global step 2048 k. Its clock: 10 s of startup and first
# iteration, then 1 s per iteration, so the steps/s after the first iteration are exactly 2048.
FAKE_CLEANRL = """
import json, sys, time
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter

json.dump(sys.argv[1:], open("argv.json", "w"))
writer = EventFileWriter("runs/HalfCheetah-v4__ppo_continuous_action__1__0")
for k in range(1, 100_000):
    sps = Summary(value=[Summary.Value(tag="charts/SPS", simple_value=100.0 + k)])
    writer.add_event(Event(wall_time=1_000_000.0 + 10 + k, step=2048 * k, summary=sps))
    writer.flush()
    print("SPS:", 100 + k, flush=True)
    time.sleep(0.05)
"""

# Writes metrics.jsonl and config.json into --run-dir as fastppo train does: 0.5 s per iteration after a
# 10 s first one, so 4096 steps/s.
FAKE_FASTPPO = """
import json, os, sys, time
argv = sys.argv[1:]
run_dir = argv[argv.index("--run-dir") + 1]
os.makedirs(run_dir)
json.dump(argv, open(os.path.join(os.path.dirname(run_dir), "argv.json"), "w"))
threads = int(argv[argv.index("--torch-threads") + 1])
json.dump({"torch_threads": threads}, open(os.path.join(run_dir, "config.json"), "w"))
with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
    for k in range(1, 100_000):
        f.write(json.dumps({"global_step": 2048 * k, "iteration": k, "charts/SPS": 200 + k,
                            "time/elapsed": 10 + 0.5 * k}) + "\\n")
        f.flush()
        time.sleep(0.05)
"""


def fake_cleanrl(tmp_path: Path) -> Path:
    script = tmp_path / "ppo_continuous_action.py"
    script.write_text(FAKE_CLEANRL)
    return script


@pytest.mark.parametrize("change, message", [
    (dict(cleanrl_script=None), "--cleanrl-script is needed"),
    (dict(cleanrl_script="{tmp}/missing.py"), "--cleanrl-script '{tmp}/missing.py' is not a file"),
    (dict(cleanrl_python="{tmp}/no-python"), "--cleanrl-python '{tmp}/no-python' is not an executable file"),
    (dict(env_id="CartPole-v1"), "--env-id 'CartPole-v1' is not one of HalfCheetah-v4, Pong-v5"),
    (dict(env_id="Pong-v5"), "--env-id Pong-v5 needs CleanRL's ppo_atari_envpool.py, got ppo_continuous_action.py"),
    (dict(cleanrl_script="{tmp}/other.py"), "--env-id is needed: 'other.py' is not one of CleanRL's"),
    (dict(seconds=0.0), "--seconds must be a positive number, got 0.0"),
    (dict(seconds=float("nan")), "--seconds must be a positive number, got nan"),
    (dict(rounds=0), "--rounds must be >= 1, got 0"),
    (dict(torch_threads=-1), "--torch-threads must be >= 0, got -1"),
    (dict(out="{tmp}/ppo_continuous_action.py"), "--out '{tmp}/ppo_continuous_action.py' exists and is not a folder"),
])
def test_bad_arguments_name_the_value(tmp_path, change, message):
    fake_cleanrl(tmp_path)
    (tmp_path / "other.py").write_text("")
    change = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in change.items()}
    args = vs.Args(**{"cleanrl_script": str(tmp_path / "ppo_continuous_action.py"), **change})
    assert message.format(tmp=tmp_path) in vs.error(args)


def test_good_arguments_and_the_env_from_the_script_name(tmp_path):
    args = vs.Args(cleanrl_script=str(fake_cleanrl(tmp_path)))
    assert vs.error(args) is None and vs.env_of(args) == "HalfCheetah-v4"
    renamed = tmp_path / "my_copy.py"
    renamed.write_text("")
    assert vs.error(vs.Args(cleanrl_script=str(renamed), env_id="Pong-v5")) is None


def test_bad_argument_exits_2_with_one_line_before_anything_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cleanrl-script", str(tmp_path / "nope.py"), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    message = f"vs_cleanrl.py: error: --cleanrl-script '{tmp_path}/nope.py' is not a file"
    assert proc.stderr.strip().splitlines() == [message]
    assert not (tmp_path / "out").exists()


def test_steps_per_second_leaves_the_first_iteration_out():
    assert vs.steps_per_second([(100, 5.0), (300, 6.0), (500, 7.0)]) == 200.0
    assert vs.steps_per_second([(100, 5.0)]) is None  # one iteration: nothing to measure


def test_one_round_against_fakes(tmp_path, monkeypatch, capsys):
    fake_fastppo = tmp_path / "fake_fastppo.py"
    fake_fastppo.write_text(FAKE_FASTPPO)
    script = fake_cleanrl(tmp_path)
    argvs = tmp_path / "argvs"
    argvs.mkdir()
    # keep each side's argv: the temporary folder is removed when the round is over
    real_measure = vs.measure

    def measure(side, cmd, cwd, env, args, run_dir):
        run = real_measure(side, cmd, cwd, env, args, run_dir)
        (argvs / f"{side}.json").write_text(Path(cwd, "argv.json").read_text())
        return run

    monkeypatch.setattr(vs, "FASTPPO", [sys.executable, str(fake_fastppo)])
    monkeypatch.setattr(vs, "measure", measure)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "out"
    args = vs.Args(cleanrl_script=str(script), rounds=1, seconds=2.0, out=str(out))
    assert vs.error(args) is None
    result = vs.main(args)

    assert list((tmp_path / "tmp").iterdir()) == []  # the runs' folder is gone
    assert json.loads((out / "vs_cleanrl_HalfCheetah-v4_cpu.json").read_text()) == result
    (r,) = result["rounds"]
    cleanrl, fast = r["cleanrl"], r["fastppo"]
    assert cleanrl["steps_per_second"] == pytest.approx(2048.0) and fast["steps_per_second"] == pytest.approx(4096.0)
    assert r["ratio"] == pytest.approx(2.0) and result["ratio_median"] == pytest.approx(2.0)
    for run, sps in ((cleanrl, 100), (fast, 200)):
        assert run["ended_by"] == "SIGINT" and run["iterations"] >= 2
        assert run["reported_sps"] == sps + run["iterations"]  # the process's own last charts/SPS
        assert 2.0 <= run["wall_seconds"] < 30

    cleanrl_argv = json.loads((argvs / "cleanrl.json").read_text())
    fastppo_argv = json.loads((argvs / "fastppo.json").read_text())
    threads = result["settings"]["torch_threads"]["cleanrl"]  # torch's default in --cleanrl-python
    assert fast["torch_threads"] == threads and result["settings"]["torch_threads"]["fastppo"] == threads
    for flag, value in (("--env-id", "HalfCheetah-v4"), ("--num-envs", "1"), ("--num-steps", "2048"),
                        ("--seed", "1"), ("--total-timesteps", "1000000")):
        assert cleanrl_argv[cleanrl_argv.index(flag) + 1] == value == fastppo_argv[fastppo_argv.index(flag) + 1]
    assert "--no-cuda" in cleanrl_argv
    assert fastppo_argv[:4] == ["--preset", "cleanrl", "--device", "cpu"]
    assert fastppo_argv[fastppo_argv.index("--torch-threads") + 1] == str(threads)

    blob = subprocess.run(["git", "hash-object", str(script)], capture_output=True, text=True, check=True).stdout
    assert result["cleanrl"]["script"]["git_blob"] == blob.strip()
    assert result["cleanrl"]["versions"]["torch"] and result["machine"]["commit"]
    table = capsys.readouterr().out
    assert "fastppo/CleanRL" in table and "median" in table and "2.00" in table


def test_a_run_that_logs_under_two_iterations_is_an_error_with_its_output(tmp_path, monkeypatch):
    script = tmp_path / "ppo_continuous_action.py"
    script.write_text("import sys\nprint('ModuleNotFoundError: No module named gym')\nsys.exit(1)\n")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    args = vs.Args(cleanrl_script=str(script), rounds=1, seconds=5.0, out=str(tmp_path / "out"))
    with pytest.raises(RuntimeError, match=r"CleanRL's run logged 0 iteration\(s\) in 5 s \(exit code 1\), 2 are "
                                           r"needed: raise --seconds; its output ended: .*No module named gym"):
        vs.main(args)
    assert list((tmp_path / "tmp").iterdir()) == [] and not (tmp_path / "out").exists()
