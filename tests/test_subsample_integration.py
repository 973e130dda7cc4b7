"""eval.subsample through the real path: Ray workers, lm-eval, the quick zoo (marked slow)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from evomerge.config import load_config
from evomerge.run_dir import SUBSAMPLE, RunDir
from evomerge.search import search

from conftest import write_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_evaluator_scores_the_first_documents_at_a_given_limit(zoo, tmp_path) -> None:
    import torch

    from evomerge.workers import CandidateRunner

    config = load_config(write_config(tmp_path, zoo, eval={"subsample": {"fraction": 0.25}}))
    runner = CandidateRunner(config)
    evaluator, tasks = runner.evaluator, len(config.eval.tasks)
    with torch.inference_mode():
        evaluator(None, limit=config.eval.subset_limit)
        assert evaluator.solo.stats.requests == tasks * 4  # one generate request per document
        evaluator(None)
        assert evaluator.solo.stats.requests == tasks * 16  # eval.limit, as before


def test_subsample_search_journals_limits(zoo, ray_cluster, tmp_path) -> None:
    config = load_config(write_config(tmp_path, zoo, eval={"subsample": {"fraction": 0.25, "promote": 0.5}}))
    summary = search(config, tmp_path / "run")
    run = RunDir.open(tmp_path / "run")
    records = run.lines()
    assert all(r["state"] in ("complete", "pruned") for r in records), [r.get("error") for r in records]
    assert len(records) == len({r["trial"] for r in records}) == 5 + 2 * 4
    stage = {r["trial"]: r for r in run.records(SUBSAMPLE)}
    assert len(stage) == 2 * 4 and all(r["limit"] == 4 for r in stage.values())
    candidates = [r for r in records if r["label"] is None]
    promoted = [r for r in candidates if r["state"] == "complete"]
    held = [r for r in candidates if r["state"] == "pruned"]
    assert len(promoted) == len(held) == 4  # two per generation of four
    assert all(r["limit"] == 16 and r["subset"]["limit"] == 4 for r in promoted)
    assert all(r["subset"]["quality"] == stage[r["trial"]]["quality"] for r in promoted)
    assert all(r["limit"] == 4 and r["quality"] == stage[r["trial"]]["quality"] for r in held)
    assert all(r["state"] == "complete" and r["limit"] == 16 for r in records if r["label"] is not None)
    assert summary["subset_only"] == 4 and summary["best"]["trial"] not in {r["trial"] for r in held}


def test_benchmark_quick_mode(zoo, tmp_path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n<!-- begin 1. Other -->\n## 1. Other\nkept\n<!-- end 1. Other -->\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "subsample.py"), "--quick", "--zoo",
                           str(zoo["base"].parent), "--work", str(tmp_path / "work"), "--results", str(results),
                           "--out", str(tmp_path / "report.json")],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "command: python benchmarks/subsample.py --quick" in done.stdout and "cores, torch" in done.stdout
    import json

    report = json.loads((tmp_path / "report.json").read_text())
    for row in report["correlation"].values():
        assert row["subset_limit"] == 2 and len(row["subset"]) == len(row["full"]) == 6
        assert 0.15 < row["flops_ratio"] < 0.35  # 2 of 8 documents per task
    assert [r["promote"] for r in report["search"]] == [None, 0.25, 0.5]
    text = results.read_text()
    assert "## 1. Other\nkept" in text  # other sections are left alone
    assert text.count("## 6. Cheaper fitness (eval.subsample)") == 1
    assert "| uniform | 6 | 2 |" in text and "| cma-like | 6 | 2 |" in text
