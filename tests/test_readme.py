"""README.md works as written: every Python block runs, and the quick-start commands, run exactly as the
README gives them in a fresh virtual environment on a copy of the repository, print the bench table and
a passing test summary.

The quick-start test builds fastnn from scratch and runs the whole suite inside it (several minutes), so
it runs only when FASTNN_TEST_QUICKSTART=1 is set (CI sets it: `.ci/run`). Skipped where README.md is not
next to tests/ (the wheel's tests run from a copy of tests/ alone).
"""
import os
import re
import shutil
import subprocess
import sys
import time
import venv
from pathlib import Path

import pytest

import fastnn

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
pytestmark = pytest.mark.skipif(not README.is_file(), reason=f"no README.md at {README}")


def code_blocks(language):
    """The README's fenced code blocks of `language`, in order, as (first line number, text); none where
    README.md is not next to tests/ (a copy of tests/ alone: the module's tests then skip)."""
    if not README.is_file():
        return []
    blocks, lines = [], README.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == f"```{language}":
            start = i + 1
            i = start
            while lines[i].strip() != "```":
                i += 1
            blocks.append((start + 1, "\n".join(lines[start:i]) + "\n"))
        i += 1
    return blocks


def quick_start_commands():
    """The command lines of the first bash block under '## Quick start'."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Quick start"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_readme_has_python_blocks_and_quick_start():
    assert len(code_blocks("python")) >= 2
    assert len(quick_start_commands()) == 2


@pytest.mark.parametrize("start,source", code_blocks("python"), ids=[f"line{n}" for n, _ in code_blocks("python")])
def test_readme_python_block_runs(start, source, tmp_path):
    if re.search(r"^import cupy", source, re.M) and not fastnn.cuda_is_available():
        pytest.skip("a GPU block: fastnn.cuda_is_available() is False here")
    for framework in ("torch", "jax"):  # optional extras: a block that needs one runs where it is installed
        if re.search(rf"^(import|from) {framework}\b", source, re.M):
            pytest.importorskip(framework, reason=f"a {framework} block: {framework} is not installed here")
    # In a child process, as a user pastes it: nothing leaks between blocks or into the test session.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(fastnn.__file__).resolve().parent.parent)] + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    p = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", source], capture_output=True,
                       text=True, timeout=300, env=env, cwd=tmp_path)
    assert p.returncode == 0, f"README.md line {start}:\n{source}\n{p.stderr}"


def test_readme_api_example_is_numerically_sensible():
    """The API block's loss is the cross-entropy of near-uniform predictions over 10 classes."""
    source = next(s for _, s in code_blocks("python") if "fastnn.cross_entropy" in s and "cupy" not in s)
    scope = {}
    exec(compile(source.replace("print(", "(lambda *a, **k: None)("), "README.md", "exec"), scope)
    assert 1.5 < scope["loss"] < 3.5, scope["loss"]
    assert abs(float(scope["p"].sum(axis=-1).mean()) - 1) < 1e-5


def _repository_copy(dest):
    """The files a clone of this repository holds (git's tracked and not-ignored files), else the tree
    without build outputs."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        listed = None
    if listed is None:
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
            ".git", "build", "dist", "__pycache__", "*.so", "*.egg-info", ".pytest_cache"))
        return
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FASTNN_TEST_QUICKSTART") != "1",
                    reason="builds fastnn in a fresh venv (minutes): set FASTNN_TEST_QUICKSTART=1")
def test_readme_quick_start_in_a_fresh_venv(tmp_path):
    commands = quick_start_commands()
    repo = tmp_path / "fastnn"
    repo.mkdir()
    _repository_copy(repo)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "FASTNN_TEST_QUICKSTART", "VIRTUAL_ENV")}
    env.update(VIRTUAL_ENV=str(env_dir), PATH=f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    outputs = []
    for command in commands:
        start = time.perf_counter()
        p = subprocess.run(["bash", "-c", command], cwd=repo, env=env, capture_output=True, text=True,
                           timeout=3600)
        seconds = time.perf_counter() - start
        print(f"$ {command}  ({seconds:.0f} s)\n{p.stdout[-3000:]}")
        assert p.returncode == 0, f"README quick start `{command}` failed:\n{p.stdout[-5000:]}\n{p.stderr[-5000:]}"
        outputs.append(p.stdout)
    bench, tests = outputs
    assert re.search(r"^\| op +\| case +\| fastnn .*\| check +\|$", bench, re.M), bench[-3000:]
    assert not re.search(r"\| FAIL", bench), bench[-3000:]
    summary = tests.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and not re.search(r"failed|error", summary), summary
