"""SIGKILL the driver at several points, resume, and compare with an uninterrupted run."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from evomerge.run_dir import SUBSAMPLE, RunDir, canonical

DRIVER = Path(__file__).with_name("crash_driver.py")


def drive(run_dir: Path, *args: str) -> int:
    return subprocess.run([sys.executable, str(DRIVER), str(run_dir), *args], capture_output=True,
                          timeout=120).returncode


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[dict]:
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    assert drive(run_dir, "start") == 0
    return canonical(RunDir.open(run_dir).records())


@pytest.mark.parametrize("point, count", [
    ("mid_generation", 13),       # generation 1 half done
    ("journal_append", 7),        # a torn journal line in generation 0
    ("checkpoint_write", 2),      # a half-written checkpoint temp file
    ("between_generations", 3),   # checkpoint of generation 2 written, nothing of generation 3
])
def test_resume_after_sigkill_equals_uninterrupted(tmp_path, uninterrupted, point, count) -> None:
    run_dir = tmp_path / "run"
    assert drive(run_dir, "start", point, str(count)) == -signal.SIGKILL
    journaled_at_crash = {r["trial"] for r in RunDir.open(run_dir).records()}
    assert drive(run_dir, "resume") == 0
    records = RunDir.open(run_dir).records()
    assert canonical(records) == uninterrupted
    lines = RunDir.open(run_dir).lines()
    assert len({r["trial"] for r in lines}) == len(lines)  # no trial journaled twice
    evaluated = [int(line) for line in (run_dir / "evaluated.log").read_text().split()]
    twice = {t for t in evaluated if evaluated.count(t) > 1}
    assert not twice & journaled_at_crash  # only trials in flight at the crash ran again


@pytest.fixture(scope="module")
def uninterrupted_subsample(tmp_path_factory) -> tuple[list[dict], list[dict]]:
    run_dir = tmp_path_factory.mktemp("straight_subsample") / "run"
    assert drive(run_dir, "start", "--subsample") == 0
    run = RunDir.open(run_dir)
    return canonical(run.records()), canonical(run.records(SUBSAMPLE))


@pytest.mark.parametrize("point, count", [
    ("mid_generation", 4),        # generation 0's subset rung half done
    ("mid_generation", 17),       # generation 1's full rung started
    ("journal_append", 5),        # a torn subsample.jsonl line
    ("journal_append", 10),       # a torn journal line (a reference)
    ("between_generations", 2),
])
def test_subsample_resume_after_sigkill_equals_uninterrupted(tmp_path, uninterrupted_subsample, point,
                                                             count) -> None:
    run_dir = tmp_path / "run"
    assert drive(run_dir, "start", point, str(count), "--subsample") == -signal.SIGKILL
    assert drive(run_dir, "resume", "--subsample") == 0
    run = RunDir.open(run_dir)
    assert (canonical(run.records()), canonical(run.records(SUBSAMPLE))) == uninterrupted_subsample
    assert len({r["trial"] for r in run.lines()}) == len(run.lines())


@pytest.fixture(scope="module")
def uninterrupted_steady(tmp_path_factory) -> list[dict]:
    run_dir = tmp_path_factory.mktemp("straight_steady") / "run"
    assert drive(run_dir, "start", "--steady") == 0
    return canonical(RunDir.open(run_dir).records())


@pytest.mark.parametrize("point, count", [
    ("mid_generation", 3),        # generation 1's first trials journaled while generation 0 runs
    ("mid_generation", 12),       # generation 0 nearly done, half of generation 1 journaled
    ("journal_append", 4),        # a torn line of a generation-1 trial
    ("checkpoint_write", 1),      # the checkpoint holding generation 1's genomes, half written
    ("between_generations", 2),
])
def test_steady_resume_after_sigkill_equals_uninterrupted(tmp_path, uninterrupted_steady, point, count) -> None:
    """Steady dispatch (TPE): trials of the next generation journaled before the crash are read
    back, and the asks the checkpoint holds are replayed, so the run ends as if never stopped."""
    run_dir = tmp_path / "run"
    assert drive(run_dir, "start", point, str(count), "--steady") == -signal.SIGKILL
    journaled_at_crash = {r["trial"] for r in RunDir.open(run_dir).records()}
    assert drive(run_dir, "resume", "--steady") == 0
    assert canonical(RunDir.open(run_dir).records()) == uninterrupted_steady
    lines = RunDir.open(run_dir).lines()
    assert len({r["trial"] for r in lines}) == len(lines)
    evaluated = [int(line) for line in (run_dir / "evaluated.log").read_text().split()]
    assert not {t for t in evaluated if evaluated.count(t) > 1} & journaled_at_crash
