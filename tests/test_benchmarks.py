"""Each benchmark's --quick mode runs to the end and writes its RESULTS.md section (no timings asserted)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def run_quick(script: str, tmp_path: Path, *extra: str) -> tuple[str, str]:
    """(stdout, the RESULTS.md it wrote) of `python benchmarks/SCRIPT --quick`."""
    results = tmp_path / "RESULTS.md"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--quick", "--results", str(results),
                           "--work", str(tmp_path / "work"), *extra],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, results.read_text()


def check_section(text: str, name: str, script: str) -> str:
    """The section `name`, with the machine and the command in it."""
    match = re.search(rf"<!-- begin {re.escape(name)} -->(.*?)<!-- end {re.escape(name)} -->", text, re.S)
    assert match, f"no section {name!r} in:\n{text}"
    section = match.group(1)
    assert "cores, torch" in section
    assert f"python benchmarks/{script} --quick" in section
    return section


def check_verdicts(section: str, verdicts: list[tuple[str, float, float, bool, float]]) -> None:
    """Each (word, value, goal, higher_is_better, step) read from the section: the word is what the
    printed value says against the printed goal (either word where they are equal at the printed
    step, or the value is nan: then FAIL); and every pass/FAIL in the section is one of them."""
    lines = section.splitlines()
    heads = {i for i in range(len(lines) - 1) if re.fullmatch(r"\|[-|]+\|", lines[i + 1])}  # a table's column names
    words = [w for i, line in enumerate(lines) if i not in heads for w in re.findall(r"\b(?:pass|FAIL)\b", line)]
    assert verdicts and len(verdicts) == len(words), (verdicts, section)
    for word, value, goal, higher, step in verdicts:
        if math.isnan(value):
            assert word == "FAIL", (word, value, section)
        elif abs(value - goal) > step / 2:  # a clear case at the printed precision
            met = value >= goal if higher else value <= goal
            assert word == ("pass" if met else "FAIL"), (word, value, goal, section)


@pytest.mark.slow
def test_merge_throughput_quick(tmp_path) -> None:
    out, text = run_quick("merge_throughput.py", tmp_path)
    section = check_section(text, "Merge throughput", "merge_throughput.py")
    assert "| linear |" in section
    speed_goal, bandwidth_goal = map(float, re.search(r"Goals: speedup >= ([\d.]+)x, bandwidth >= (\d+)% of copy",
                                                      section).groups())
    rows = re.findall(r"\| \w+ \| [\d.]+ \| [\d.]+ \| \*\*([\d.]+)x\*\* \| (pass|FAIL) \| \d+ \| \d+ \| "
                      r"\*\*(\d+)%\*\* \| (pass|FAIL) \|", section)
    assert rows, section  # mergekit is a dependency of the suite: the speedup is measured
    check_verdicts(section, [v for speedup, speed_word, share, share_word in rows
                             for v in ((speed_word, float(speedup), speed_goal, True, 0.1),
                                       (share_word, float(share), bandwidth_goal, True, 1.0))])
    assert re.search(r"linear +end to end: evomerge [\d.]+ s", out)
    merged = tmp_path / "work" / "quick" / "merge" / "out-evomerge-linear" / "model.safetensors"
    assert merged.stat().st_size > 0


@pytest.mark.slow
def test_memory_quick(tmp_path) -> None:
    out, text = run_quick("memory.py", tmp_path)
    section = check_section(text, "Memory", "memory.py")
    rows = re.findall(r"\| (\d) \| \d+ \| \*\*([\d.]+) S\*\* \| (\d+) S \| (pass|FAIL) \|", section)
    assert [(k, goal) for k, _, goal, _ in rows][:1] == [("2", "4")], section  # goal: K + 2 copies
    check_verdicts(section, [(word, float(used), float(goal), False, 0.01) for _, used, goal, word in rows])
    assert "K=3:" in out


@pytest.mark.slow
def test_candidate_overhead_quick(tmp_path, zoo) -> None:
    out, text = run_quick("candidate_overhead.py", tmp_path, "--zoo", str(zoo["base"].parent))
    section = check_section(text, "Overhead per candidate", "candidate_overhead.py")
    shares = [float(s) for s in re.findall(r"\| [a-z_]+ \| [\d.]+ \| ([\d.]+)% \|", section)]
    assert len(shares) == 6 and abs(sum(shares) - 100) < 1.0  # merge, eval_setup, forward, serving, scoring, journal
    overhead, goal, word = re.search(r"Everything but forward passes: ([\d.]+)%\*\* of [\d.]+ s per candidate "
                                     r"\(goal < (\d+)%\): (pass|FAIL)\.", section).groups()
    check_verdicts(section, [(word, float(overhead), float(goal), False, 0.1)])


@pytest.mark.slow
def test_worker_scaling_quick(tmp_path, zoo) -> None:
    out, text = run_quick("worker_scaling.py", tmp_path, "--zoo", str(zoo["base"].parent))
    section = check_section(text, "Worker scaling", "worker_scaling.py")
    assert re.search(r"2 workers / 1 worker: [\d.]+x", out)
    assert re.search(r"\| 1 \| [\d.]+ \| [\d.]+ \| \d+% \| 7 \|", section)  # 5 references + population 2
    ratio, goal, word = re.search(r"2 workers / 1 worker: ([\d.]+)x\*\* \(goal >= ([\d.]+)x\): (pass|FAIL)\.",
                                  section).groups()
    check_verdicts(section, [(word, float(ratio), float(goal), True, 0.01)])


@pytest.mark.slow
def test_search_efficiency_quick(tmp_path, zoo) -> None:
    out, text = run_quick("search_efficiency.py", tmp_path, "--zoo", str(zoo["base"].parent))
    section = check_section(text, "Search efficiency", "search_efficiency.py")
    for strategy in ("cma", "random", "tpe"):  # one seed: evaluations to the target, then the mean
        assert re.search(rf"\| {strategy} \| (> )?\d+ \| \*\*(> )?[\d.]+\*\* \| [\d.]+ \|", section), section
    assert re.search(r"cma / random: (at most )?[\d.]+", out)
    ratio, censored, goal, word = re.search(r"cma / random: (?:at most )?([\d.]+)( \(cma censored: not conclusive\))?"
                                            r"\*\* \(goal <= ([\d.]+)\): (pass|FAIL)\.", section).groups()
    check_verdicts(section, [(word, math.nan if censored else float(ratio), float(goal), False, 0.01)])


@pytest.mark.slow
def test_subset_choice_quick(tmp_path, zoo) -> None:
    out, text = run_quick("subset_choice.py", tmp_path, "--zoo", str(zoo["base"].parent))
    section = check_section(text, "6b. Cheaper fitness: which documents", "subset_choice.py")
    for population in ("uniform", "cma-like"):  # one row per population, a cell per rule
        assert re.search(rf"\| {population} \| 6 \| 2/8 \|( [^|]+ \|){{5}}", section), section
    best, goal, word = re.search(r"Best rule at 25%: Spearman ([\d.]+|nan)\*\* \(goal >= ([\d.]+)\): (pass|FAIL)",
                                 section).groups()
    check_verdicts(section, [(word, float(best), float(goal), True, 0.001)])


def test_subset_choice_rules() -> None:
    """The rules of benchmarks/subset_choice.py pick what they say, on made-up per-document results."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import subset_choice as sc
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    rng = np.random.default_rng(0)
    # 3 references x 2 tasks x 12 documents: they agree on documents 0-5, disagree on 6-11
    refs = np.zeros((3, 2, 12))
    refs[:, :, 3:6] = 1.0
    refs[0, :, 6:] = 1.0
    history = np.zeros((2, 2, 12))
    history[:, :, 3:6] = 1.0
    history[0, :, 9:] = 1.0  # with the references, documents 9-11 vary most (2 of 5 right)
    first, = sc.subsets("first", 4, refs, history, rng, 1)
    assert first.tolist() == [[0, 1, 2, 3]] * 2
    for chosen in sc.subsets("disagree", 4, refs, history, rng, 20):
        assert (chosen >= 6).all() and all(len(set(row)) == 4 for row in chosen.tolist())
    variable, = sc.subsets("variable", 3, refs, history, rng, 1)
    assert variable.tolist() == [[9, 10, 11]] * 2
    for chosen in sc.subsets("strata", 6, refs, history, rng, 20):  # groups of 3, 3 and 6 documents
        for row in chosen.tolist():  # in proportion: 1.5, 1.5 and 3 of 6
            groups = [sum(d < 3 for d in row), sum(3 <= d < 6 for d in row), sum(d >= 6 for d in row)]
            assert len(set(row)) == 6 and sorted(groups[:2]) == [1, 2] and groups[2] == 3, row
    values = np.array([[[1.0, 0.0], [1.0, 1.0]]])  # one candidate, task means 0.5 and 1.0
    assert sc.quality(values, np.array([1.0, 3.0])).tolist() == [0.875]
    assert sc.on(values, np.array([[1], [0]])).tolist() == [[[0.0], [1.0]]]


@pytest.mark.slow
def test_search_efficiency_dispatch_pairs_quick(tmp_path, zoo) -> None:
    out, text = run_quick("search_efficiency.py", tmp_path, "--zoo", str(zoo["base"].parent), "--strategies", "random",
                          "--dispatch", "steady,generation", "--target", "0.5")
    match = re.search(r"<!-- begin Search efficiency: dispatch -->(.*?)<!-- end Search efficiency: dispatch -->",
                      text, re.S)
    assert match, text
    section = match.group(1)
    assert "python benchmarks/search_efficiency.py --quick" in section
    for mode in ("steady", "generation"):
        assert re.search(rf"\| random \({mode}\) \| (> )?\d+ \|", section), section
    assert "0.5000 (given; the best any of these runs found:" in section
    assert "<!-- begin Search efficiency -->" not in text  # the plain table is left alone


@pytest.mark.slow
def test_estimate_quick(tmp_path, zoo) -> None:
    out, text = run_quick("estimate.py", tmp_path, "--zoo", str(zoo["base"].parent))
    section = check_section(text, "6c. Cheaper fitness: anchor estimates (eval.estimate)", "estimate.py")
    for population in ("uniform", "cma-like"):  # per cost share: subsample, random and the five estimators
        for name in ("subsample (first)", "random (mean)", "anchors, refs", "gp-irt, refit", "genome, refit"):
            assert re.search(rf"\| {population} \| 10% \| {re.escape(name)} \|( [^|]+ \|){{3}}", section), section
        assert re.search(rf"\| {population} \| 6 \| [^|]+ \|( [^|]+ \|){{5}}", section), section  # its noise floor
    assert "genome with refit at <= 10% cost: Spearman" in section


@pytest.mark.slow
def test_estimate_search_quick(tmp_path, zoo) -> None:
    out, text = run_quick("estimate_search.py", tmp_path, "--zoo", str(zoo["base"].parent))
    section = check_section(text, "6d. Cheaper fitness at equal compute (eval.estimate vs eval.subsample vs full)",
                            "estimate_search.py")
    for arm, generations in (("full", 2), ("subsample", 2), ("estimate", 5)):  # about the same documents
        assert re.search(rf"\| 0 \| {arm} \| {generations} \|( [^|]+ \|){{6}}", section), section
    assert re.search(r"Mean best over seeds: full 0\.\d{4}, subsample 0\.\d{4}, estimate 0\.\d{4}\.", section), section


@pytest.mark.slow
def test_estimate_documents_replays_a_run_at_fewer_documents(tmp_path, zoo) -> None:
    run_quick("estimate_search.py", tmp_path, "--zoo", str(zoo["base"].parent), "--arms", "full", "--documents", "12")
    run = tmp_path / "work" / "quick" / "runs" / "full0"
    assert "demo-tasks-12" in (run / "config.yaml").read_text()  # the tasks written with 12 documents each
    results = tmp_path / "R6e.md"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "estimate_documents.py"), "--quick", "--replay",
                           str(run), "--documents", "4,8", "--fractions", "0.25", "--results", str(results)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    section = check_section(results.read_text(), "6e. Cheaper fitness vs documents per task", "estimate_documents.py")
    for n in (4, 8):  # one row per N and estimator, at 25% of N
        for name in ("subsample (first)", "gp-irt", "genome"):
            assert re.search(rf"\| {n} \| 25% \({1 if n == 4 else 2}/{n}\) \| {re.escape(name)} \|", section), section
    assert "**Spearman >= 0.9 at <= 10% of the documents (over the run)**" in section
