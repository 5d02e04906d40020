"""fastppo eval (full-game scores, MP4) and fastppo plot."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from helpers import two_iteration_cartpole

from fastppo.cli import main
from fastppo.logger import RecentReturns


@pytest.fixture(scope="module")
def cartpole_run(tmp_path_factory):
    return two_iteration_cartpole(tmp_path_factory, "cartpole")


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


@pytest.fixture(scope="module")
def hopper_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "hopper"
    assert main(["train", "--env-id", "Hopper-v4", "--device", "cpu", "--run-dir", str(run_dir), "--num-steps", "64",
                 "--num-minibatches", "2", "--update-epochs", "1", "--total-timesteps", "64"]) == 0
    return run_dir


def test_eval_video_on_mujoco_renders_through_egl(hopper_run, capsys):
    """EnvPool's MuJoCo renderer works once EGL is global to the process (envs.expose_egl); it aborted with
    "an OpenGL platform library has not been loaded" before."""
    import imageio

    from fastppo.envs import env_info
    from fastppo.evaluate import render_problem

    problem = render_problem(env_info("Hopper-v4"))
    if problem is not None:
        pytest.skip(problem)
    assert main(["eval", str(hopper_run), "--episodes", "1", "--video"]) == 0
    assert "video: " in capsys.readouterr().out
    with imageio.get_reader(str(hopper_run / "videos" / "ckpt_0000001_sampled.mp4"), "ffmpeg") as reader:
        frames = [frame for frame in reader]
    assert len(frames) > 1 and frames[0].shape == (480, 480, 3) and frames[0].std() > 10  # a scene, not a blank


@pytest.mark.parametrize("egl,message", [
    (None, "--video: EnvPool renders Hopper-v4 through EGL, and this machine has none: "),
    # a library that loads but is no EGL: the probe's frame fails as it does on a machine without a driver
    ("libm.so.6", "--video: EnvPool cannot render Hopper-v4 on this machine (ERROR: an OpenGL platform library"),
], ids=["no-egl-library", "render-fails"])
def test_eval_video_on_mujoco_without_a_renderer_says_what_to_install(hopper_run, tmp_path, monkeypatch, capsys, egl,
                                                                      message):
    import fastppo.evaluate

    monkeypatch.setattr(fastppo.evaluate, "expose_egl", lambda: egl)
    monkeypatch.chdir(tmp_path)
    assert main(["eval", str(hopper_run), "--episodes", "1", "--video"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastppo: error: ") and message in err and err.count("\n") == 1, err
    assert err.rstrip().endswith("install EGL: apt install libegl1 libgl1-mesa-dri (or your GPU driver's EGL)")
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()  # MuJoCo's log of the failure stays in the probe's folder


def test_plot_writes_a_png(cartpole_run, tmp_path):
    out = tmp_path / "cmp.png"
    assert main(["plot", str(cartpole_run), str(cartpole_run), "--out", str(out)]) == 0  # named twice: read once
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


# --- fastppo plot on synthetic run folders --------------------------------------------------------

BATCH = 512  # agent steps per iteration of the synthetic runs
RATE = 1000.0  # their true training speed, agent steps / s of each iteration


def write_run(root, name, *, env="CartPole-v1", seed=1, offset=0.0, warm=3, iters=40, setting=None, resume_at=None,
              evals=(), exp="fastppo", **config):
    """A run folder written by hand: config.json, and metrics.jsonl with the trainer's fields.

    recent return = global_step / 1000 + offset once `warm` iterations have passed (None before);
    each iteration takes BATCH / RATE s. A resume after iteration `resume_at` restarts charts/SPS
    (a since-launch average) lower, as a resume does; perf/iteration and time/elapsed go on.
    """
    run = root / name
    run.mkdir()
    cfg = {"env_id": env, "seed": seed, "exp_name": exp, "run_dir": str(run), "loss": "clip", "num_envs": 4,
           "num_steps": 128, "total_timesteps": iters * BATCH, "num_iterations": iters, "batch_size": BATCH,
           "target_return_games": 10, "device": "cpu", "resume": None, **(setting or {}), **config}
    (run / "config.json").write_text(json.dumps(cfg))
    lines, elapsed = [], 0.0
    for it in range(1, iters + 1):
        step = it * BATCH
        elapsed += BATCH / RATE
        m = {"global_step": step, "iteration": it, "num_iterations": iters,
             "charts/recent_return": None if it <= warm else step / 1000 + offset,
             "charts/SPS": int(RATE if resume_at is None or it <= resume_at else RATE / 3),
             "perf/iteration": BATCH / RATE, "time/elapsed": elapsed}
        if it in evals:
            m["eval/episodic_return"] = 100.0 + seed
        lines.append(json.dumps(m) + "\n")
    (run / "metrics.jsonl").write_text("".join(lines))
    return run


@pytest.fixture
def synthetic_runs(tmp_path):
    """CartPole: loss clip (seeds 1-3) and penalty (seeds 1-3, one resumed, one given another
    --total-timesteps and device: resume flags, same setting); Acrobot: one setting, 2 seeds, evals."""
    runs = [write_run(tmp_path, f"cp_clip_{s}", seed=s, offset=s - 2.0, warm=2 + s) for s in (1, 2, 3)]
    runs += [write_run(tmp_path, "cp_pen_1", seed=1, offset=10.0, setting={"loss": "penalty"}, resume_at=20),
             write_run(tmp_path, "cp_pen_2", seed=2, offset=12.0, setting={"loss": "penalty"}, total_timesteps=99,
                       device="cuda", exp="other"),
             write_run(tmp_path, "cp_pen_3", seed=3, offset=14.0, setting={"loss": "penalty"}, iters=30)]
    runs += [write_run(tmp_path, f"acro_{s}", env="Acrobot-v1", seed=s, exp="acro", iters=400, evals=(100, 200, 400))
             for s in (1, 2)]
    return [str(r) for r in runs]


def by_width(ax, lw: float) -> list:
    """The curves of ax drawn with line width lw: 2 for a group's mean, 0.8 for each of its runs."""
    return [line for line in ax.lines if line.get_linewidth() == lw and line.get_marker() != "D"]


def finite(line) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(line.get_xdata(), dtype=float), np.asarray(line.get_ydata(), dtype=float)
    return x[np.isfinite(y)], y[np.isfinite(y)]


def test_plot_rows_per_env_groups_per_setting_mean_and_band(synthetic_runs):
    from fastppo.plot import figure, load_runs

    fig = figure(load_runs(synthetic_runs))
    rows = fig.subfigs
    assert [row._suptitle.get_text() for row in rows] == ["CartPole-v1  (6 runs)", "Acrobot-v1  (2 runs)"]
    for row in rows:
        assert [ax.get_title() for ax in row.axes] == [
            "recent return vs agent steps", "recent return vs wall-clock time",
            "training speed (the iteration's steps / perf/iteration)"]
    assert rows[0].axes[2].get_ylabel() == "agent steps / s of each iteration"
    assert rows[1].axes[2].get_ylabel().endswith("(moving mean over 1% of a run's iterations)")  # 400 iterations
    cart_steps, cart_time, cart_speed = rows[0].axes
    # two groups (clip, penalty: the resumed run and the one given other resume flags are seeds of penalty),
    # each its runs' curves, their mean and a bootstrap band; labelled by the field that differs
    clip_mean, penalty_mean = by_width(cart_steps, 2)
    assert len(by_width(cart_steps, 0.8)) == 6 and len(cart_steps.collections) == 2
    labels = [t.get_text() for t in rows[0].legends[0].get_texts()]
    assert labels == ["loss=clip (3 seeds: 1, 2, 3)", "loss=penalty (3 seeds: 1, 2, 3)",
                      "thin: each run, to its own end", "mean, 95% bootstrap CI over 3 seeds"]
    # clip's seeds start after 3, 4, 5 iterations (offsets -1, 0, 1): the mean starts once 2 of them have data
    x, y = finite(clip_mean)
    assert x[0] == 5 * BATCH and x[-1] == 40 * BATCH
    np.testing.assert_allclose(y[1:], x[1:] / 1000)
    assert y[0] == pytest.approx(x[0] / 1000 - 0.5)
    # the band: where all three have data, within the lowest and highest run, around the mean
    band = cart_steps.collections[0].get_paths()[0].vertices
    assert band[:, 0].min() == 6 * BATCH and band[:, 0].max() == 40 * BATCH
    lows, highs = band[:, 1].min(), band[:, 1].max()
    assert 6 * BATCH / 1000 - 1 <= lows < 6 * BATCH / 1000 and 40 * BATCH / 1000 < highs <= 40 * BATCH / 1000 + 1
    # penalty: seed 3 stopped at 30 iterations; its curve ends there, the others' and the mean go on to 40
    ends = sorted(finite(line)[0][-1] for line in by_width(cart_steps, 0.8)[3:])
    assert ends == [30 * BATCH, 40 * BATCH, 40 * BATCH] and finite(penalty_mean)[0][-1] == 40 * BATCH
    assert cart_steps.collections[1].get_paths()[0].vertices[:, 0].max() == 30 * BATCH  # 3 runs for a CI
    # wall-clock time: 40 iterations of 0.512 s, shown in s; the penalty runs' speed has no jump at the resume
    assert cart_time.get_xlabel() == "wall-clock time (s)"
    np.testing.assert_allclose(finite(by_width(cart_time, 2)[0])[0][-1], 40 * BATCH / RATE)
    for line in cart_speed.lines:
        np.testing.assert_allclose(finite(line)[1], RATE)
    # Acrobot: one setting of 2 seeds, labelled by its exp_name: their mean, no CI from 2 runs; eval markers
    # on both return panels; time in min
    acro_steps, acro_time, _ = rows[1].axes
    labels = [t.get_text() for t in rows[1].legends[0].get_texts()]
    assert labels == ["acro (2 seeds: 1, 2)", "thin: each run, to its own end",
                      "eval/episodic_return (mean over the runs that evaluated)"]
    assert not acro_steps.collections
    markers = [line for line in acro_steps.lines if line.get_marker() == "D"]
    assert len(markers) == 1 and list(markers[0].get_xdata()) == [100 * BATCH, 200 * BATCH, 400 * BATCH]
    assert list(markers[0].get_ydata()) == [101.5] * 3
    assert acro_time.get_xlabel() == "wall-clock time (min)"


def test_plot_min_max_band_when_asked(synthetic_runs, tmp_path, capsys):
    from fastppo.plot import figure, load_runs

    fig = figure(load_runs(synthetic_runs), band="minmax")
    cart_steps = fig.subfigs[0].axes[0]
    assert [t.get_text() for t in fig.subfigs[0].legends[0].get_texts()][-1] == "mean, min-max over 3 seeds"
    band = cart_steps.collections[0].get_paths()[0].vertices  # clip: offsets -1, 0, 1 around x / 1000
    assert band[:, 1].min() == pytest.approx(5 * BATCH / 1000 - 1)  # from 2 runs of 3 on, as the mean
    assert band[:, 1].max() == pytest.approx(40 * BATCH / 1000 + 1)
    acro = fig.subfigs[1]  # 2 seeds: a min-max band
    assert len(acro.axes[0].collections) == 1
    assert "mean, min-max over 2 seeds" in [t.get_text() for t in acro.legends[0].get_texts()]
    assert main(["plot", *synthetic_runs, "--band", "minmax", "--out", str(tmp_path / "m.png")]) == 0
    assert main(["plot", *synthetic_runs, "--band", "iqr", "--out", str(tmp_path / "m.png")]) == 2
    assert capsys.readouterr().err == "fastppo: error: --band 'iqr' is not one of ci, minmax\n"


def test_plot_two_folders_with_one_seed_are_two_runs_not_two_seeds(tmp_path, capsys):
    """A run, its copy (or rerun) with the same seed, and a resumed, longer run of another seed: the label and a
    warning say seed 1 is there twice, the band says runs, and the longer run is drawn to its end."""
    from fastppo.plot import figure, groups_of, load_runs

    runs = [write_run(tmp_path, "a", seed=1), write_run(tmp_path, "a_again", seed=1),
            write_run(tmp_path, "b", seed=2, resume_at=40, iters=60)]
    paths = [str(r) for r in runs]
    (group,) = groups_of(load_runs(paths))
    assert group.label == "fastppo (3 runs: seeds 1, 1, 2; the same seed 1 in several folders)"
    out = tmp_path / "same.png"
    assert main(["plot", *paths, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"wrote {out}\n"
    assert captured.err == (f"fastppo: warning: {runs[0]} and {runs[1]} have the same setting and seed 1: drawn as 2 "
                            f"runs, not 2 seeds\n")
    fig = figure(load_runs(paths))
    steps = fig.subfigs[0].axes[0]
    labels = [t.get_text() for t in fig.subfigs[0].legends[0].get_texts()]
    assert labels[-1] == "mean, 95% bootstrap CI over 3 runs"
    assert sorted(finite(line)[0][-1] for line in by_width(steps, 0.8)) == [40 * BATCH, 40 * BATCH, 60 * BATCH]
    assert finite(by_width(steps, 2)[0])[0][-1] == 40 * BATCH  # past 40 iterations 1 run of 3: no mean


def test_bootstrap_ci_of_the_mean():
    """The percentile bootstrap over runs: about mean +- 1.96 standard errors for 10 runs, the same every time,
    NaN where fewer than 3 runs have data, each x resampling only the runs that have data there."""
    from fastppo.plot import bootstrap_ci

    values = np.arange(10.0)
    ys = np.stack([np.full(4, v) for v in values])  # (runs, x)
    ys[3:, 3] = np.nan  # at the last x only runs 0, 1, 2 have data
    ys[1:, 2] = np.nan  # at the third only run 0
    lo, hi = bootstrap_ci(ys)
    se = values.std() / np.sqrt(10)
    np.testing.assert_allclose(lo[:2], 4.5 - 1.96 * se, atol=0.15)
    np.testing.assert_allclose(hi[:2], 4.5 + 1.96 * se, atol=0.15)
    assert np.isnan(lo[2]) and np.isnan(hi[2])
    assert 0 <= lo[3] < 1 < hi[3] <= 2
    lo2, hi2 = bootstrap_ci(ys)
    np.testing.assert_array_equal(lo, lo2)
    np.testing.assert_array_equal(hi, hi2)


def test_plot_settings_leave_out_what_the_algorithm_does_not_read(tmp_path):
    """clip, penalty and TRPO side by side: a TRPO run (whose config.json says loss=clip) is "algo=trpo",
    PPO-penalty's options do not split PPO-clip runs, and a penalty run from an older fastppo (no
    --kl-coef-min in its config.json) is a seed of the same setting as one that has the default."""
    from fastppo.plot import groups_of, load_runs

    runs = [write_run(tmp_path, f"clip_{s}", seed=s, kl_coef=s) for s in (1, 2)]  # kl_coef unused by clip
    runs += [write_run(tmp_path, "pen_1", seed=1, loss="penalty", algo="ppo"),
             write_run(tmp_path, "pen_2", seed=2, loss="penalty", algo="ppo", kl_coef_min=1e-4, max_kl=0.05)]
    runs += [write_run(tmp_path, f"trpo_{s}", seed=s, algo="trpo", ent_coef=0.01 * s, max_kl=0.01) for s in (1, 2)]
    groups = groups_of(load_runs([str(r) for r in runs]))
    assert [g.label for g in groups] == ["algo=ppo, loss=clip (2 seeds: 1, 2)",
                                         "algo=ppo, loss=penalty (2 seeds: 1, 2)", "algo=trpo (2 seeds: 1, 2)"]
    runs.append(write_run(tmp_path, "trpo_3", seed=3, algo="trpo", max_kl=0.02))
    labels = [g.label for g in groups_of(load_runs([str(r) for r in runs]))]
    assert labels[2:] == ["algo=trpo, max_kl=0.01 (2 seeds: 1, 2)", "algo=trpo, max_kl=0.02 (seed 3)"]


def test_plot_legends_sit_below_the_panels(synthetic_runs, tmp_path):
    import matplotlib.pyplot as plt

    from fastppo.plot import figure, load_runs

    fig = figure(load_runs(synthetic_runs))
    fig.canvas.draw()
    for row in fig.subfigs:
        (legend,) = row.legends
        box = legend.get_window_extent()
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent()), ax.get_title()
        assert box.y1 <= min(ax.get_tightbbox().y0 for ax in row.axes) + 1
    plt.close(fig)


def test_plot_cli_writes_the_figure(synthetic_runs, tmp_path, capsys):
    out = tmp_path / "all.png"
    assert main(["plot", *synthetic_runs, "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_time_units_follow_the_range():
    from fastppo.plot import time_unit

    assert time_unit(90) == ("s", 1.0) and time_unit(1800) == ("min", 60.0) and time_unit(5 * 3600) == ("h", 3600.0)


def _no_config(run):
    (run / "config.json").unlink()


def _bad_config(text):
    return lambda run: (run / "config.json").write_text(text)


def _metrics(text):
    return lambda run: (run / "metrics.jsonl").write_text(text)


@pytest.mark.parametrize("damage,args,message", [
    (None, ["--out", "{tmp}/x.png"], "fastppo plot needs at least one run folder"),
    (None, ["{missing}"], "is not a run folder (no metrics.jsonl)"),
    (_no_config, ["{run}"], "has no config.json: not a run folder"),
    (_bad_config("{"), ["{run}"], "config.json' does not read as JSON (Expecting property name"),
    (_bad_config("[1, 2]"), ["{run}"], "config.json' is not a JSON object"),
    (_bad_config('{"seed": 1}'), ["{run}"], "config.json' names no env_id"),
    (_metrics('[1, 2]\n"text"\n'), ["{run}"], "metrics.jsonl' holds no metrics yet"),
    (_metrics('{"global_step": 8, "iteration": 1, "time/elapsed": "soon"}\n'), ["{run}"],
     "metrics.jsonl': time/elapsed is 'soon' at iteration 1, not a finite number"),
    # fastppo writes null for no value: NaN and Infinity were plotted (as gaps) without a word
    (_metrics('{"global_step": 8, "iteration": 1, "time/elapsed": NaN}\n'), ["{run}"],
     "metrics.jsonl': time/elapsed is nan at iteration 1, not a finite number"),
    (_metrics('{"global_step": 8, "iteration": 1, "charts/recent_return": -Infinity}\n'), ["{run}"],
     "metrics.jsonl': charts/recent_return is -inf at iteration 1, not a finite number"),
    (_bad_config('{"env_id": "CartPole-v1", "gamma": NaN}'), ["{run}"], "config.json' does not read as JSON (NaN is "
                                                                         "not JSON)"),
    (_metrics('{"global_step": 8, "iteration": 1}\n{"global_step": 4, "iteration": 1}\n'), ["{run}"],
     "metrics.jsonl': global_step goes from 8 back to 4 at iteration 1 (two runs in one file?)"),
    (None, ["{run}", "--out", "x.jpg"], "--out 'x.jpg' must end in .png"),
    (None, ["{run}", "--out", "{missing}/x.png"], "does not exist"),
    (None, ["{run}", "--out", "{tmp}/folder.png"], "is a folder"),
])
def test_plot_bad_input(tmp_path, damage, args, message, capsys):
    run = write_run(tmp_path, "run")
    (tmp_path / "folder.png").mkdir()
    if damage is not None:
        damage(run)
    args = [a.format(missing=tmp_path / "missing", run=run, tmp=tmp_path) for a in args]
    assert main(["plot", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastppo: error: ") and message in err and err.count("\n") == 1, err


def test_plot_unwritable_out(tmp_path, capsys):
    run = write_run(tmp_path, "run")
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        assert main(["plot", str(run), "--out", str(locked / "x.png")]) == 2
        assert "is not writable" in capsys.readouterr().err
    if os.path.isdir("/proc"):  # a folder no one can make files in, root included: the write itself fails
        assert main(["plot", str(run), "--out", "/proc/fastppo.png"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fastppo: error: ") and "/proc/fastppo.png" in err and err.count("\n") == 1, err


def test_recent_return_is_the_mean_of_exactly_the_last_n_games():
    recent = RecentReturns(3)
    assert recent.mean() is None
    recent.extend([-21.0, -19.0])
    assert recent.mean() is None  # fewer than 3 games: no recent return yet
    recent.extend([-20.0, -15.0])
    assert recent.mean() == pytest.approx((-19 - 20 - 15) / 3) and recent.state() == [-19.0, -20.0, -15.0]
