"""The second zoo (issue 14): Qwen2 models with a BPE tokenizer fitted on their own training text, tasks
other than the demo's (one multiple choice, one mixed), built quickly here and searched with the
classifier router through real lm-eval and real Ray actors, then exported and scored again."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.zoo import second as S
from evomerge.zoo.demo import _Sampler

from conftest import write_config


@pytest.fixture(scope="module")
def tok():
    return S.make_tokenizer()


def test_tokenizer_is_a_qwen2_bpe_fitted_here_that_loads_back(tok, tmp_path) -> None:
    from transformers import AutoTokenizer, Qwen2Tokenizer

    assert isinstance(tok, Qwen2Tokenizer) and 256 < len(tok) <= S.VOCAB_SIZE  # bytes, specials, merges
    assert S.make_tokenizer().backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()  # deterministic
    tok.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    loaded = AutoTokenizer.from_pretrained(tmp_path)  # what lm-eval and the workers load
    texts = [doc["prompt"] + " " + doc["answer"] + "\n" for task in S.TASKS for doc in S.task_documents(task)]
    assert [loaded(t)["input_ids"] for t in texts] == [tok(t)["input_ids"] for t in texts]
    assert all(tok.decode(tok(t)["input_ids"]) == t for t in texts)
    assert len(tok("\n")["input_ids"]) == 1  # the tasks' stop string is one token
    assert len(tok("succ")["input_ids"]) == 1  # merges learned from the corpus: not one token a character


def test_documents_are_held_out_and_the_mixed_task_needs_two_experts() -> None:
    prompts = {}
    for task in S.TASKS:
        for split in ("test", "train"):
            docs = S.task_documents(task, split)
            assert len({d["prompt"] for d in docs}) == len(docs) == (S.EVAL_SIZE if split == "test" else S.TRAIN_SIZE)
            prompts[task, split] = {d["prompt"] for d in docs}
    everything = [p for ps in prompts.values() for p in ps]
    assert len(set(everything)) == len(everything)  # no prompt in two lists
    assert {p.split()[0] for p in prompts["second_mix", "test"]} == set(S.MIXED)
    for doc in S.task_documents("second_even"):
        assert int(doc["choices"][doc["label"]]) % 2 == 0 and sum(int(c) % 2 == 0 for c in doc["choices"]) == 1
    for task in S.TASKS:  # more test documents (benchmarks at a larger eval.limit): the usual ones first
        more = S.task_documents(task, "test", S.EVAL_SIZE + 50)
        assert len(more) == S.EVAL_SIZE + 50 and more[:S.EVAL_SIZE] == S.task_documents(task, "test")
    # no training batch holds a task's prompt, and the batches show every format
    excluded = S.excluded_prompts()
    for mix in (S.SECOND_RECIPE.base_mix, S.SECOND_RECIPE.replay_mix):
        sampler = _Sampler(mix, S.make_tokenizer(), random.Random(0), excluded, S.GENERATORS)
        seen = {sampler.example()[0] for _ in range(3000)}
        assert not seen & excluded
        assert {p.split()[0] for p in seen} >= {"max", "succ", "even"}


@pytest.fixture(scope="module")
def second_zoo(tmp_path_factory) -> dict[str, Path]:
    return S.build_second_zoo(tmp_path_factory.mktemp("second_zoo"), quick=True)


@pytest.mark.slow
def test_quick_build_is_a_deterministic_qwen2_zoo_with_its_tasks(second_zoo, tmp_path, capsys) -> None:
    from transformers import AutoModelForCausalLM

    folder = second_zoo["base"].parent
    assert set(second_zoo) == {"base", *S.SKILLS}
    model = AutoModelForCausalLM.from_pretrained(second_zoo["base"])
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.tie_word_embeddings is False
    weights = load_file(second_zoo["base"] / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.bias" in weights and "lm_head.weight" in weights
    meta = json.loads((folder / "zoo.json").read_text())
    assert meta["quick"] is True and meta["architecture"] == "Qwen2ForCausalLM"
    assert set(meta["scores"]) == {"base", *S.SKILLS, "uniform_average", "task_arithmetic_1.0"}
    assert all(set(scores) == {*S.TASKS, "mean"} for scores in meta["scores"].values())
    assert all(0 < v < 0.1 for v in meta["relative_task_vector_norm"].values())
    assert sorted(p.name for p in (folder / "tasks").glob("*.yaml")) == sorted(f"{t}.yaml" for t in S.TASKS)
    assert S.build_second_zoo(folder) == second_zoo  # a finished build is reused
    from evomerge.cli import main

    assert main(["zoo", "--second", str(folder)]) == 0  # the command reuses it too
    assert f"base: {second_zoo['base']}" in capsys.readouterr().out
    assert main(["zoo", "--second", "--real", str(folder)]) == 2
    assert capsys.readouterr().err.strip().endswith("--real, --second: one zoo at a time")
    again = S.build_second_zoo(tmp_path / "again", quick=True)
    for name, path in second_zoo.items():
        a, b = load_file(path / "model.safetensors"), load_file(again[name] / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow
def test_zoo_scores_are_what_lm_eval_computes(second_zoo) -> None:
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluate import task_spec

    manager = TaskManager(include_path=str(second_zoo["base"].parent / "tasks"), include_defaults=False)
    task_dict = manager.load([task_spec(manager, t) for t in S.TASKS])
    path = second_zoo["even"]
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    limit = 20
    results = evaluate(lm=HFLM(pretrained=model, tokenizer=tok, batch_size=16), task_dict=task_dict, limit=limit,
                       bootstrap_iters=0)["results"]
    mine = S.task_scores(model, tok, limit)
    assert mine["second_even"] == pytest.approx(results["second_even"]["acc,none"], abs=1e-9)
    for task in ("second_max", "second_succ", "second_mix"):
        assert abs(mine[task] - results[task]["exact_match,none"]) <= 0.1


@pytest.mark.slow
def test_classifier_search_on_the_second_zoo_exports_and_scores_again(second_zoo, ray_cluster, tmp_path) -> None:
    import shutil

    from evomerge.config import load_config
    from evomerge.export import evaluate_folder, export
    from evomerge.run_dir import RunDir
    from evomerge.search import search

    tasks = tmp_path / "tasks"
    shutil.copytree(second_zoo["base"].parent / "tasks", tasks)
    for task in S.TASKS:  # 12 router-training documents a task keep the labelling short
        train = tasks / f"{task}_train.jsonl"
        train.write_text("".join(train.read_text().splitlines(keepends=True)[:12]))
    config = load_config(write_config(
        tmp_path / "cfg", second_zoo,
        eval={"include_path": str(tasks), "limit": 8,
              "tasks": [{"name": t, "metric": "acc" if t in S.MULTIPLE_CHOICE else "exact_match"} for t in S.TASKS]},
        policy={"kind": "classifier", "members": ["merged", "expert:0", "expert:1", "expert:2"], "cost_weight": 0.0},
        search={"strategy": "random", "population": 2, "generations": 1}))
    summary = search(config, tmp_path / "run")
    run = RunDir.open(tmp_path / "run")
    labels = [json.loads(line) for line in (run.path / "router_training" / "labels.jsonl").read_text().splitlines()]
    assert sorted({row["task"] for row in labels}) == sorted(S.TASKS) and len(labels) == 12 * len(S.TASKS)
    routed = [r for r in run.records() if r["state"] == "complete" and r["recipe"].get("policy")]
    assert len(routed) == 2 and summary["pareto"]
    assert all(abs(sum(r["served"].values()) - 1.0) < 1e-9 for r in routed)
    record = max(routed, key=lambda r: r["quality"])
    export(run.path, tmp_path / "out", trial_id=record["trial"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "qwen2"
    assert evaluate_folder(run.config(), tmp_path / "out") == pytest.approx(record["quality"], abs=1e-12)
