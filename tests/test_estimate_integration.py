"""eval.estimate through the real path: lm-eval's `samples`, Ray workers, the quick zoo (marked slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evomerge import estimate
from evomerge.config import load_config
from evomerge.run_dir import RunDir
from evomerge.samples import decode
from evomerge.search import search

from conftest import DEMO_TASKS, write_config

pytestmark = pytest.mark.slow


def multiple_choice_task(folder: Path) -> Path:
    """demo_add as a two-way multiple-choice task scored by `acc` (the right sum, or one more)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (DEMO_TASKS / "demo_add.jsonl").read_text().splitlines()[:40]]
    with open(folder / "demo_add_mc.jsonl", "w") as out:
        for i, row in enumerate(rows):
            wrong = str(int(row["answer"]) + 1)
            choices = [row["answer"], wrong] if i % 2 == 0 else [wrong, row["answer"]]
            out.write(json.dumps({"prompt": row["prompt"], "choices": choices, "label": i % 2}) + "\n")
    (folder / "demo_add_mc.yaml").write_text(
        "task: demo_add_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: demo_add_mc.jsonl\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{prompt}}\"\ndoc_to_choice: choices\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return folder


def test_anchor_documents_score_as_in_the_full_evaluation(zoo, tmp_path) -> None:
    import torch

    from evomerge.workers import CandidateRunner

    tasks = [{"name": "demo_add", "metric": "exact_match"}, {"name": "demo_add_mc", "metric": "acc", "weight": 2.0}]
    config = load_config(write_config(tmp_path, zoo, eval={
        "include_path": [str(DEMO_TASKS), str(multiple_choice_task(tmp_path / "mc"))], "tasks": tasks,
        "estimate": {"anchors": 3}}))
    runner = CandidateRunner(config)
    chosen = (("demo_add", (1, 5, 11)), ("demo_add_mc", (0, 7, 8, 15)))
    with torch.inference_mode():
        full = runner.evaluator(None)
        part = runner.evaluator(None, documents=chosen)
    for task, documents in chosen:
        assert [doc for doc, _ in part.documents[task]] == list(documents)
        every = decode(full.per_doc[task])
        assert len(every) == 16
        assert decode(part.per_doc[task]) == [every[i] for i in documents]
        assert [h for _, h in part.documents[task]] == [full.documents[task][i][1] for i in documents]


def test_estimate_search_journals_estimates_and_promotes(zoo, ray_cluster, tmp_path) -> None:
    config = load_config(write_config(tmp_path, zoo, eval={"estimate": {"anchors": 4, "promote": 0.25}}))
    summary = search(config, tmp_path / "run")
    run = RunDir.open(tmp_path / "run")
    records = run.records()
    assert all(r["state"] != "failed" for r in records), [r.get("error") for r in records]
    anchored = run.records(estimate.ESTIMATE)
    assert len(anchored) == 2 * 4 and all(r["sample"]["documents"] == {t.name: 4 for t in config.eval.tasks}
                                          for r in anchored)
    candidates = [r for r in records if r["label"] is None]
    promoted = [r for r in candidates if r["state"] == "complete"]
    held = [r for r in candidates if r["state"] == "pruned"]
    assert len(promoted) == 2 and len(held) == 6  # one per generation of four
    assert all(r["sample"]["documents"] == {t.name: 16 for t in config.eval.tasks} and "estimate" in r
               for r in promoted)
    assert all(r["quality"] == r["estimate"]["quality"] for r in held)
    assert summary["best"]["trial"] not in {r["trial"] for r in held}
    assert summary["estimate"]["pairs"] == 2
