"""fastppo eval (full-game scores, MP4) and fastppo plot."""

from __future__ import annotations

import pytest

from fastppo.cli import main
from fastppo.logger import RecentReturns

CARTPOLE = ["train", "--env-id", "CartPole-v1", "--device", "cpu"]


@pytest.fixture(scope="module")
def cartpole_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "cartpole"
    assert main([*CARTPOLE, "--run-dir", str(run_dir), "--total-timesteps", "1024", "--save-every", "1"]) == 0
    return run_dir


def test_eval_prints_full_game_scores_on_cartpole(cartpole_run, capsys):
    assert main(["eval", str(cartpole_run), "--episodes", "5", "--greedy"]) == 0
    out = capsys.readouterr().out
    assert "CartPole-v1  ckpt_0000002.pt (global step 1,024)  5 full games, greedy actions" in out
    line = next(x for x in out.splitlines() if x.startswith("score"))
    _, _, mean, _, std, _, lo, _, hi = line.split()[:9]
    assert 1 <= float(lo) <= float(mean) <= float(hi) <= 500 and float(std) >= 0


def test_eval_of_a_named_checkpoint_and_fixed_quotas(cartpole_run, capsys):
    ckpt = cartpole_run / "checkpoints" / "ckpt_0000001.pt"
    assert main(["eval", str(cartpole_run), "--checkpoint", str(ckpt), "--episodes", "7", "--num-envs", "3"]) == 0
    assert "ckpt_0000001.pt (global step 512)  7 full games" in capsys.readouterr().out


@pytest.mark.parametrize("extra,message", [
    (["--episodes", "0"], "--episodes must be positive, got 0"),
    (["--checkpoint", "nowhere.pt"], "checkpoint 'nowhere.pt' does not exist"),
])
def test_eval_bad_input(cartpole_run, extra, message, capsys):
    assert main(["eval", str(cartpole_run), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_eval_of_a_folder_without_checkpoints(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "no checkpoint in" in capsys.readouterr().err


def test_eval_video_on_atari_is_a_playable_colour_mp4(tmp_path, capsys):
    import imageio

    run_dir = tmp_path / "breakout"
    assert main(["train", "--env-id", "Breakout-v5", "--device", "cpu", "--run-dir", str(run_dir), "--num-envs", "2",
                 "--num-steps", "16", "--num-minibatches", "2", "--update-epochs", "1", "--total-timesteps", "32"]) == 0
    assert main(["eval", str(run_dir), "--episodes", "1", "--video"]) == 0
    out = capsys.readouterr().out
    assert "Breakout-v5" in out and "1 full games" in out
    path = run_dir / "videos" / "ckpt_0000001_sampled.mp4"
    with imageio.get_reader(str(path), "ffmpeg") as reader:
        frames = [frame for frame in reader]
    assert len(frames) > 20
    assert frames[0].shape == (210, 160, 3)  # the real screen, not the 84x84 gray observation
    colour = frames[len(frames) // 2].astype(int)
    assert (abs(colour[..., 0] - colour[..., 2]) > 30).any(), "expected colour, got gray"
    assert any((a != b).any() for a, b in zip(frames, frames[1:], strict=False))


def test_plot_writes_a_png(cartpole_run, tmp_path):
    out = tmp_path / "cmp.png"
    assert main(["plot", str(cartpole_run), str(cartpole_run), "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


@pytest.mark.parametrize("args,message", [
    (["{missing}"], "is not a run folder (no metrics.jsonl)"),
    (["{run}", "--out", "x.jpg"], "--out 'x.jpg' must end in .png"),
    (["{run}", "--out", "{missing}/x.png"], "does not exist"),
])
def test_plot_bad_input(cartpole_run, tmp_path, args, message, capsys):
    args = [a.format(missing=tmp_path / "missing", run=cartpole_run) for a in args]
    assert main(["plot", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_recent_return_is_the_mean_of_exactly_the_last_n_games():
    recent = RecentReturns(3)
    assert recent.mean() is None
    recent.extend([-21.0, -19.0])
    assert recent.mean() is None  # fewer than 3 games: no recent return yet
    recent.extend([-20.0, -15.0])
    assert recent.mean() == pytest.approx((-19 - 20 - 15) / 3) and recent.state() == [-19.0, -20.0, -15.0]
