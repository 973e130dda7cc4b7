"""The classifier router the run trains itself (issue 14): where its data comes from, what it
refuses, and a search that routes through it on real Ray workers, exported and loaded back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.config import load_config
from evomerge.errors import EvalError
from evomerge.policies.classifier import TrainedRouter, train_router
from evomerge.zoo import SKILLS, eval_examples, router_train_examples, write_demo_tasks

from conftest import write_config

TASKS = [f"demo_{skill}" for skill in SKILLS]


def _tasks(folder: Path, train: int | None = 24, overlap: str | None = None, no_train: str | None = None) -> Path:
    """The demo tasks in `folder`, with `train` router-training documents each; `overlap`: that task's
    train split is its test file; `no_train`: that task's YAML names no training split."""
    write_demo_tasks(folder)
    for skill in SKILLS:
        name = f"demo_{skill}"
        train_file = folder / f"{name}_train.jsonl"
        train_file.write_text("".join(train_file.read_text().splitlines(keepends=True)[:train]))
        spec = yaml.safe_load((folder / f"{name}.yaml").read_text())
        if name == overlap:
            spec["dataset_kwargs"]["data_files"]["train"] = f"{name}.jsonl"
        if name == no_train:
            del spec["dataset_kwargs"]["data_files"]["train"], spec["training_split"]
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    return folder


def _fake_models(folder: Path) -> dict[str, Path]:
    """Folders that pass the config's checks (refusals come before any model is loaded)."""
    zoo = {}
    for name in ("base", *SKILLS):
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "config.json").write_text("{}")
        zoo[name] = folder / name
    return zoo


def _config(tmp_path: Path, zoo: dict[str, Path], tasks: Path, **policy):
    return load_config(write_config(tmp_path / "cfg", zoo, eval={"include_path": str(tasks)}, policy={
        "kind": "classifier", "members": ["merged", "expert:0", "expert:1", "expert:2"], **policy}))


# --- the router alone ------------------------------------------------------------------------------

def test_router_learns_which_member_answers_from_the_prompt_alone() -> None:
    texts = [ex["prompt"] for s in SKILLS for ex in eval_examples(s, 40)]
    labels = torch.tensor([[float(i == k) for k in range(3)] for i, s in enumerate(SKILLS) for _ in range(40)])
    router = train_router(texts, labels, ["expert:0", "expert:1", "expert:2"], steps=100)
    again = train_router(texts, labels, ["expert:0", "expert:1", "expert:2"], steps=100)
    assert torch.equal(router.weight, again.weight)  # no random draw: the same labels, the same router
    unseen = [(i, ex["prompt"]) for i, s in enumerate(SKILLS) for ex in router_train_examples(s, 30)]
    predicted = router.predict([t for _, t in unseen]).argmax(1).tolist()
    assert sum(p == i for p, (i, _) in zip(predicted, unseen)) / len(unseen) > 0.95


def test_router_file_round_trip(tmp_path) -> None:
    router = train_router(["1+2=", "abc>", "cab<"], torch.eye(3), ["base", "expert:0", "expert:1"], steps=20)
    loaded = TrainedRouter.load(router.save(tmp_path / "r.safetensors"))
    assert loaded.members == router.members
    assert torch.equal(loaded.predict(["1+2=", "zz"]), router.predict(["1+2=", "zz"]))
    (tmp_path / "bad.safetensors").write_bytes(b"not a router")
    with pytest.raises(Exception):
        TrainedRouter.load(tmp_path / "bad.safetensors")


# --- where the documents come from, and what is refused ------------------------------------------

def test_router_documents_are_the_training_split(tmp_path) -> None:
    from evomerge.router_data import router_tasks

    config = _config(tmp_path, _fake_models(tmp_path / "zoo"), _tasks(tmp_path / "tasks"))
    tasks = router_tasks(config)
    for skill in SKILLS:
        docs = list(tasks["tasks"][f"demo_{skill}"].eval_docs)
        assert [d["prompt"] for d in docs] == [ex["prompt"] for ex in router_train_examples(skill, 24)]


def test_overlap_with_fitness_documents_is_refused(tmp_path) -> None:
    from evomerge.router_data import router_tasks

    config = _config(tmp_path, _fake_models(tmp_path / "zoo"), _tasks(tmp_path / "tasks", overlap="demo_rev"))
    with pytest.raises(EvalError, match=r"^eval\.tasks\.demo_rev: 200 router-training document\(s\) .* fitness"):
        router_tasks(config)


def test_task_without_training_documents_is_refused_and_user_documents_serve(tmp_path) -> None:
    from evomerge.router_data import router_tasks

    zoo, tasks = _fake_models(tmp_path / "zoo"), _tasks(tmp_path / "tasks", no_train="demo_sort")
    with pytest.raises(EvalError, match=r"^eval\.tasks\.demo_sort: no router-training documents"):
        router_tasks(_config(tmp_path, zoo, tasks))
    given = tmp_path / "sort_docs.jsonl"
    given.write_text("".join(json.dumps(ex) + "\n" for ex in router_train_examples("sort", 5)))
    loaded = router_tasks(_config(tmp_path, zoo, tasks, router_data={"demo_sort": str(given)}))
    assert len(list(loaded["tasks"]["demo_sort"].eval_docs)) == 5
    # a given file that repeats a fitness document is refused like a split would be
    given.write_text(json.dumps(eval_examples("sort", 1)[0]) + "\n")
    with pytest.raises(EvalError, match=r"^eval\.tasks\.demo_sort: 1 router-training document"):
        router_tasks(_config(tmp_path, zoo, tasks, router_data={"demo_sort": str(given)}))


# --- a search through the trained router, on real workers ------------------------------------------

@pytest.mark.slow
def test_classifier_search_export_and_load(zoo, ray_cluster, tmp_path) -> None:
    from evomerge.export import evaluate_folder, export
    from evomerge.policies import load
    from evomerge.policies.classifier import ClassifierRouter
    from evomerge.router_data import prepare_router
    from evomerge.run_dir import RunDir
    from evomerge.search import search

    config = _config(tmp_path, zoo, _tasks(tmp_path / "tasks"))
    config = config.model_copy(update={"search": config.search.model_copy(update={
        "strategy": "random", "population": 3, "generations": 1})})
    summary = search(config, tmp_path / "run")
    run = RunDir.open(tmp_path / "run")
    labels = [json.loads(line) for line in (run.path / "router_training" / "labels.jsonl").read_text().splitlines()]
    assert len(labels) == 24 * len(SKILLS) and all(len(row["labels"]) == 3 for row in labels)
    journal = (run.path / "router_training" / "journal.jsonl").read_text().splitlines()
    assert [json.loads(line)["event"] for line in journal] == ["labels", "trained"]
    prepare_router(config, run.path)  # what resume does: the run's router is found, nothing is trained again
    assert (run.path / "router_training" / "journal.jsonl").read_text().splitlines() == journal

    routed = [r for r in run.records() if r["state"] == "complete" and r["recipe"].get("policy")]
    assert len(routed) == 3 and summary["pareto"]
    for record in routed:
        assert record["recipe"]["policy"]["kind"] == "classifier"
        assert abs(sum(record["served"].values()) - 1.0) < 1e-9
    record = max(routed, key=lambda r: r["quality"])
    export(run.path, tmp_path / "out", trial_id=record["trial"])
    assert (tmp_path / "out" / "router.safetensors").is_file()
    assert evaluate_folder(run.config(), tmp_path / "out") == pytest.approx(record["quality"], abs=1e-12)

    # the exported policy decides as the search's did, seeing only the prompt
    server = load(tmp_path / "out" / "policy.json")
    assert isinstance(server.policy, ClassifierRouter)
    prompts = [ex["prompt"] for s in SKILLS for ex in eval_examples(s, 16)]
    router = TrainedRouter.load(run.path / "router_training" / "router.safetensors")
    in_search = ClassifierRouter(server.policy.members, router, **record["recipe"]["policy"]["params"])
    assert torch.equal(server.policy.member_scores(prompts), in_search.member_scores(prompts))
    answers = server.generate(prompts[:4], max_new_tokens=8)
    assert len(answers) == 4 and answers.stats["routing_flops"] == 4 * router.flops_per_prompt  # this call's


# --- calibration to a cost target ------------------------------------------------------------------

def _record(trial: int, quality: float, flops: float, label: str | None = None, served=None) -> dict:
    return {"trial": trial, "state": "complete", "quality": quality, "flops": flops, "label": label,
            "served": served or {}, "recipe": {}}


def test_calibrate_picks_the_best_trial_within_the_budget() -> None:
    from evomerge.calibrate import pick
    from evomerge.errors import ConfigError

    records = [_record(0, 0.3, 100.0, "base"), _record(1, 0.5, 100.0, "expert:0"),
               _record(2, 0.9, 150.0, served={"merged": 0.2, "expert:0": 0.8}),
               _record(3, 0.8, 110.0, served={"merged": 0.6, "expert:0": 0.4}),
               {"trial": 4, "state": "failed", "quality": None, "flops": None}]
    assert pick(records, max_flops_ratio=1.2)["trial"] == 3
    assert pick(records, max_flops_ratio=1.2)["flops_ratio"] == pytest.approx(1.1)
    assert pick(records, max_flops_ratio=2.0)["trial"] == 2
    assert pick(records, max_flops_ratio=2.0, max_share={"expert:0": 0.5})["trial"] == 3
    with pytest.raises(ConfigError, match="^calibrate: no completed trial meets the budget"):
        pick(records, max_flops=50.0)


def test_threshold_for_share_sends_that_share_to_the_merged_model() -> None:
    from evomerge.calibrate import threshold_for_share

    texts = [ex["prompt"] for s in SKILLS for ex in eval_examples(s, 20)]
    labels = torch.tensor([[float(i == k) for k in range(3)] for i in range(3) for _ in range(20)])
    router = train_router(texts, labels, ["expert:0", "expert:1", "expert:2"], steps=30)
    params = {"outputs": [-1, 0, 1, 2], "cost_weight": 0.0}
    for share in (0.0, 0.25, 0.5, 1.0):
        threshold = threshold_for_share(router, texts, params, share)
        best = router.predict(texts).max(dim=1).values
        assert (best < threshold).float().mean().item() == pytest.approx(share, abs=1 / len(texts))


def test_classifier_fields_belong_to_the_classifier(tmp_path) -> None:
    from evomerge.errors import ConfigError

    zoo = _fake_models(tmp_path / "zoo")
    with pytest.raises(ConfigError, match=r"router_data: only a classifier policy \(or a prefix_router with "
                                          r"scorers: learned\) has it"):
        load_config(write_config(tmp_path / "a", zoo, policy={
            "kind": "cascade", "members": ["merged", "expert:0"], "router_data": {"demo_add": "x.jsonl"}}))
    with pytest.raises(ConfigError, match="policy.router_file: no such file"):
        load_config(write_config(tmp_path / "b", zoo, policy={
            "kind": "classifier", "members": ["merged", "expert:0"], "router_file": "missing.safetensors"}))
