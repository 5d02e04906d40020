"""Every shell and Python example in README.md and docs/ runs, so none can rot.

A fenced ``bash`` or ``python`` block is an example that claims to run unless the line before it is
``<!-- not run: <why> -->`` (a GPU, a multi-hour budget, a second machine, an install). The blocks
of one page run in order in one fresh folder, so a page's examples may build on each other (train,
then eval the run, then plot it), each with the budgets of a test: `fastppo train` runs 2,048 steps
on the CPU (each resume 2,048 more), `fastppo eval` plays one game, `fastppo bench` measures one tiny
point for a fraction of a second. Python blocks are run as they are: they are written with
small budgets. The docs site itself is built with `mkdocs build --strict` (tests/test_docs.py
::test_the_docs_site_builds, where mkdocs is installed).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, subprocess_env

PAGES = [Path(ROOT) / "README.md", *sorted((Path(ROOT) / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(bash|python)\n(.*?)^```", re.M | re.S)
NOT_RUN = re.compile(r"<!-- not run: (.+?) -->\s*$")


def examples(page: Path) -> list[tuple[str, str, int]]:
    """(language, code, line) of each block of page that claims to run."""
    text = page.read_text()
    out = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        if not NOT_RUN.search(before):
            out.append((m.group(1), m.group(2), text[: m.start()].count("\n") + 1))
    return out


def set_flag(args: list[str], flag: str, *values: str) -> list[str]:
    """args with flag's values replaced (or flag appended with them)."""
    if flag in args:
        i = args.index(flag)
        j = i + 1
        while j < len(args) and not args[j].startswith("--"):
            j += 1
        return [*args[: i + 1], *values, *args[j:]]
    return [*args, flag, *values]


def with_test_budget(command: str, resumes: int = 0) -> str:
    """A fastppo command line of an example, at a test's budget (see the module). `resumes`: how many
    `fastppo train --resume` commands of its page came before it (each goes 2,048 steps further)."""
    words = shlex.split(command, comments=True)
    assignments = []
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):  # VAR=value before the command
        assignments.append(words.pop(0))
    if words[:3] == ["python", "-m", "fastppo"]:
        words = ["fastppo", *words[3:]]
    if not words or words[0] != "fastppo" or len(words) < 2:
        return command
    words = ["fastppo", *words[1:]]
    sub = words[1]
    if sub == "train" and "--help" not in words:
        if "--resume" in words:
            words = set_flag(words, "--total-timesteps", str(2048 * (resumes + 2)))
        else:
            words = set_flag(set_flag(words, "--total-timesteps", "2048"), "--device", "cpu")
    elif sub == "eval":
        words = set_flag(words, "--episodes", "1")
    elif sub == "bench":
        words = set_flag(set_flag(set_flag(words, "--num-envs", "2"), "--seconds", "0.2"), "--warmup", "0.05")
        words = set_flag(words, "--device", "cpu")
    return " ".join(w if re.fullmatch(r"[\w@%+=:,./*?-]+", w) else shlex.quote(w)  # globs stay globs
                    for w in [*assignments, sys.executable, "-m", *words])


def bash_lines(code: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments and blanks dropped."""
    joined = code.replace("\\\n", " ")
    return [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_the_examples_of_each_page_run(page, tmp_path):
    env = subprocess_env(WANDB_MODE="offline", WANDB_SILENT="true", MPLBACKEND="Agg")
    resumes = 0
    for language, code, line in examples(page):
        if language == "python":
            proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=600)
            assert proc.returncode == 0, f"{page.name}:{line}: the Python example fails:\n{proc.stderr[-3000:]}"
            continue
        for command in bash_lines(code):
            run = with_test_budget(command, resumes)
            resumes += "--resume" in command
            proc = subprocess.run(["bash", "-c", run], cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=600)
            assert proc.returncode == 0, (f"{page.name}:{line}: `{command}` (run as `{run}`) fails:\n"
                                          f"{proc.stderr[-3000:]}")


def test_the_budget_rewrite():
    assert with_test_budget("fastppo train --env-id CartPole-v1  # comment") == shlex.join(
        [sys.executable, "-m", "fastppo", "train", "--env-id", "CartPole-v1", "--total-timesteps", "2048", "--device",
         "cpu"])
    assert with_test_budget("fastppo train --resume runs/a").endswith("train --resume runs/a --total-timesteps 4096")
    assert with_test_budget("fastppo train --resume runs/a --total-timesteps 1000000", resumes=1).endswith(
        "train --resume runs/a --total-timesteps 6144")
    assert with_test_budget("WANDB_MODE=offline fastppo train --track").startswith("WANDB_MODE=offline ")
    assert with_test_budget("fastppo eval runs/a --episodes 10 --video").endswith("eval runs/a --episodes 1 --video")
    assert with_test_budget("ls runs") == "ls runs"


def test_every_not_run_block_says_why():
    for page in PAGES:
        for m in re.finditer(r"<!-- not run:(.*?)-->", page.read_text()):
            assert m.group(1).strip(), f"{page.name}: a block is marked not run without a reason"


@pytest.mark.skipif(shutil.which("mkdocs") is None and not (Path(sys.executable).parent / "mkdocs").exists(),
                    reason="mkdocs is not installed (pip install -e '.[docs]')")
def test_the_docs_site_builds(tmp_path):
    mkdocs = shutil.which("mkdocs") or str(Path(sys.executable).parent / "mkdocs")
    proc = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
