"""`KeptDocs`: a task's documents made once per worker give lm-eval what its dataset gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from evomerge.evaluate import KeptDocs, compile_templates, keep_docs, task_spec

DEMO_TASKS = Path(__file__).resolve().parents[1] / "evals" / "demo"


def _task_with_process_docs(folder: Path) -> Path:
    """A generation task whose own `process_docs` (lm-eval's `!function` hook) rewrites documents,
    with its data file named relative to the task's folder (so `task_spec` rewrites its config)."""
    rows = [{"q": f"{a}+{b}=", "a": str(a + b)} for a, b in ((1, 2), (30, 4), (7, 70), (5, 5), (12, 9))]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "kd_utils.py").write_text(
        "def process(dataset):\n"
        "    return dataset.map(lambda doc: {'prompt': doc['q'], 'answer': doc['a'], 'seen': 1})\n")
    (folder / "kd_task.yaml").write_text(yaml.safe_dump({
        "task": "kd_task", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": "data.jsonl"}},
        "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}", "generation_kwargs": {"until": ["\n"], "max_gen_toks": 4, "do_sample": False},
        "metric_list": [{"metric": "exact_match"}], "num_fewshot": 0}).replace(
        "output_type:", "process_docs: !function kd_utils.process\noutput_type:"))
    return folder


def _load(folder: Path, names: list[str]) -> dict:
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(folder), include_defaults=False)
    return manager.load([task_spec(manager, name) for name in names])


def test_kept_docs_are_the_processed_documents_made_once(tmp_path) -> None:
    task = _load(_task_with_process_docs(tmp_path), ["kd_task"])["tasks"]["kd_task"]
    expected = list(task.eval_docs)
    assert expected and all(doc["seen"] == 1 and doc["prompt"] == doc["q"] for doc in expected)
    keep_docs(task)
    assert isinstance(task.config.process_docs, KeptDocs)
    docs = task.eval_docs
    assert docs == expected and task.eval_docs is docs  # the task's own process_docs ran once
    keep_docs(task)  # a second call wraps nothing again
    assert task.eval_docs is docs and task.config.process_docs.process is not None


def test_kept_docs_without_process_docs_are_the_dataset_rows() -> None:
    task = _load(DEMO_TASKS, ["demo_add"])["tasks"]["demo_add"]
    expected = [dict(row) for row in task.eval_docs]
    keep_docs(task)
    assert task.eval_docs == expected and task.config.process_docs.process is None


@pytest.mark.slow
def test_lm_eval_scores_and_answers_are_the_same_with_kept_docs(zoo, tmp_path) -> None:
    from lm_eval.evaluator import evaluate

    from evomerge.policies import Member

    folder = _task_with_process_docs(tmp_path)
    for name in ("demo_add", "demo_rev"):
        (folder / f"{name}.yaml").write_text((DEMO_TASKS / f"{name}.yaml").read_text().replace(
            f"test: {name}.jsonl", f"test: {DEMO_TASKS / name}.jsonl").replace(
            f"train: {name}_train.jsonl", f"train: {DEMO_TASKS / name}_train.jsonl"))
    names = ["kd_task", "demo_add", "demo_rev"]
    member = Member.from_folder(zoo["add"], name="add")

    def outcome(tasks: dict) -> dict:
        results = evaluate(lm=member.lm, task_dict=tasks, limit=20, bootstrap_iters=0, log_samples=True,
                           verbosity="ERROR")
        return {name: (results["results"][name]["exact_match,none"],
                       [(s["doc"], s["arguments"], s["resps"], s["target"])
                        for s in sorted(results["samples"][name], key=lambda s: s["doc_id"])])
                for name in names}

    plain = outcome(_load(folder, names))
    kept = _load(folder, names)
    for task in kept["tasks"].values():
        compile_templates(task)
        keep_docs(task)
    assert outcome(kept) == plain
    assert outcome(kept) == plain  # a second call reads the documents back from the kept lists
    assert len(plain["demo_add"][1]) == 20
