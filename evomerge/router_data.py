"""Router-training data of a run, and the routers trained on it, once per run: the classifier router
(`policies/classifier.py`) or a prefix router's router LMs (`policy.scorers: learned`, `router_lms.py`).

Documents, per task, in this order:
1. the task's own `training_split`, when its lm-eval YAML names one;
2. its `validation_split`, when it names one that is not the split scored for fitness;
3. the documents `policy.router_data` gives for the task (a JSONL file, one document a line, in
   the task's own document format).
A task with none is refused, and so is a router-training document whose prompt (the task's
`doc_to_text`) is also a fitness prompt: the fitness split is compared whole, whatever
`eval.limit` is, so a later `resume` with a larger limit cannot score on a training document.

Labels: each source member of the policy answers every router-training document through
lm-eval (its own tokenizer, the task's own prompt and metric); the configured metric of each
logged sample (lower-is-better metrics as 1 - value), clipped to [0, 1], is that member's
label for the document. The router's input is the prompt as a policy sees it: the request's
context (few-shot examples and chat template included), never the task's name.

`prepare_router` runs in the driver before the search: it writes `router_training/labels.jsonl` and
`router_training/router.safetensors` (or one router LM folder per member under
`router_training/router_lms/`) under the run directory (each atomically, the labels first) and
journals each in `router_training/journal.jsonl`; a resumed run finds them and computes nothing.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from evomerge.config import RunConfig
from evomerge.errors import EvalError
from evomerge.evaluate import compile_templates, task_manager, task_spec
from evomerge.policies.classifier import ROUTER_FILE, TrainedRouter, train_router
from evomerge.run_dir import write_atomic

logger = logging.getLogger(__name__)

__all__ = ["ROUTER_DIR", "LABELS_FILE", "router_tasks", "member_labels", "prepare_router", "labelled_members",
           "run_router_file", "run_scorers"]

ROUTER_DIR = "router_training"
LABELS_FILE = "labels.jsonl"
USER_SPLIT = "evomerge_router"  # the split user-given documents are loaded as


def labelled_members(config: RunConfig) -> list[str]:
    """The policy members the router predicts (its outputs, in order): every source member."""
    return [name for name in config.policy.members if name != "merged"]


def router_tasks(config: RunConfig) -> dict[str, Any]:
    """lm-eval's task dict whose evaluation documents are each task's router-training documents
    (see the module docstring); refuses a task without any and an overlap with fitness prompts."""
    from datasets import Dataset

    manager = task_manager(config.eval)
    loaded = manager.load([task_spec(manager, task.name) for task in config.eval.tasks])
    given = config.policy.router_data or {}
    for spec in config.eval.tasks:
        name = spec.name
        task = loaded["tasks"].get(name)
        if task is None or not hasattr(task, "config"):
            raise EvalError(f"eval.tasks.{name}: a group; a trained router needs its tasks named one by one")
        cfg = task.config
        fitness_split = cfg.test_split or cfg.validation_split
        split = cfg.training_split or (cfg.validation_split if cfg.validation_split != fitness_split else None)
        if name in given:
            docs = _read_documents(Path(given[name]), name)
            task.dataset[USER_SPLIT] = Dataset.from_list(docs)
            split = USER_SPLIT
        if split is None:
            raise EvalError(f"eval.tasks.{name}: no router-training documents: its lm-eval YAML names no "
                            f"training_split or validation_split apart from the fitness split "
                            f"({fitness_split}); give some in policy.router_data.{name}")
        fitness = {_prompt(task, doc) for doc in task.eval_docs}
        cfg.test_split, cfg.validation_split = split, None  # lm-eval now evaluates the training documents
        compile_templates(task)  # as the workers do: each prompt template compiled once
        training = list(task.eval_docs)
        if not training:
            raise EvalError(f"eval.tasks.{name}: no router-training documents left (split {split} is empty)")
        shared = [prompt for prompt in map(lambda doc: _prompt(task, doc), training) if prompt in fitness]
        if shared:
            raise EvalError(f"eval.tasks.{name}: {len(shared)} router-training document(s) of split {split} are "
                            f"also fitness documents (e.g. {shared[0]!r}); a router never trains on a fitness "
                            f"document")
        if config.eval.num_fewshot is not None and task.get_config("num_fewshot") != 0:  # as the Evaluator does
            task.set_config(key="num_fewshot", value=config.eval.num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
    return loaded


def _prompt(task: Any, doc: dict[str, Any]) -> str:
    return str(task.doc_to_text(doc))


def _read_documents(path: Path, task: str) -> list[dict[str, Any]]:
    if not path.is_file():
        raise EvalError(f"policy.router_data.{task}: no file {path}")
    docs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EvalError(f"policy.router_data.{task}: {path} line {number} is not JSON ({exc.msg})") from None
            if not isinstance(doc, dict):
                raise EvalError(f"policy.router_data.{task}: {path} line {number} is not a JSON object")
            docs.append(doc)
    if not docs:
        raise EvalError(f"policy.router_data.{task}: {path} holds no documents")
    return docs


def member_labels(config: RunConfig, tasks: dict[str, Any] | None = None, limit: int | None = None
                  ) -> list[dict[str, Any]]:
    """One record per router-training document: task, doc_id, prompt and each labelled member's
    score (see the module docstring), in task then document order. `tasks`: another lm-eval task
    dict to label (the benchmarks label fitness documents with it), its first `limit` documents."""
    from lm_eval.evaluator import evaluate

    from evomerge.evaluate import FEWSHOT_SEED
    from evomerge.models.sources import load_model, load_tokenizer, pick_device
    from evomerge.policies.base import Member

    tasks = router_tasks(config) if tasks is None else tasks
    for task in tasks["tasks"].values():
        task.set_fewshot_seed(seed=FEWSHOT_SEED)
    device = pick_device(config.models.device)
    paths = config.models.by_member_name
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    members = labelled_members(config)
    for m, name in enumerate(members):
        model = load_model(paths[name], config.models, device)
        member = Member.from_model(name, model, load_tokenizer(paths[name], config.models),
                                   batch_size=config.eval.batch_size)
        with torch.inference_mode():
            results = evaluate(lm=member.lm, task_dict=tasks, limit=limit, bootstrap_iters=0, log_samples=True,
                               verbosity="ERROR")
        for spec in config.eval.tasks:
            higher = spec.higher_is_better
            if higher is None:
                higher = bool(results.get("higher_is_better", {}).get(spec.name, {}).get(spec.metric, True))
            for sample in results["samples"][spec.name]:
                if sample["filter"] != spec.filter:
                    continue
                value = float(sample[spec.metric])
                value = min(max(value if higher else 1.0 - value, 0.0), 1.0)
                row = rows.setdefault((spec.name, int(sample["doc_id"])), {
                    "task": spec.name, "doc_id": int(sample["doc_id"]), "prompt": sample["arguments"][0][0],
                    "labels": [None] * len(members)})
                row["labels"][m] = value
        del member, model
    missing = [key for key, row in rows.items() if any(v is None for v in row["labels"])]
    if missing:
        raise EvalError(f"eval.tasks.{missing[0][0]}: document {missing[0][1]} has no score from every member")
    return [rows[key] for key in sorted(rows, key=lambda k: ([t.name for t in config.eval.tasks].index(k[0]), k[1]))]


def prepare_router(config: RunConfig, run_path: str | Path) -> RunConfig:
    """The config the workers get: for a classifier policy without `policy.router_file`, the router of this
    run (trained now, or found in the run directory when resumed) set as `policy.router_file`; for a prefix
    router with `policy.scorers: learned`, the run's router LMs (evomerge/router_lms.py) set as its scorers."""
    policy = config.policy
    if not policy.trains_router or policy.router_file is not None:
        return config
    folder = Path(run_path) / ROUTER_DIR
    if policy.learns_scorers:
        from evomerge.router_lms import ROUTER_LM_DIR, router_lm_folders, train_router_lms

        folders = router_lm_folders(folder / ROUTER_LM_DIR, policy.members)
        if not all((f / "config.json").is_file() for f in folders):
            start = time.perf_counter()
            rows = _labels(config, folder)
            train_router_lms(config, rows, labelled_members(config), folder / ROUTER_LM_DIR,
                             lambda record: _journal(folder, record))
            logger.info("router LMs: %d members trained in %.1f s", len(folders), time.perf_counter() - start)
        return config.model_copy(update={"policy": policy.model_copy(update={
            "scorers": [str(f.resolve()) for f in folders]})})
    router_path = folder / ROUTER_FILE
    if not router_path.is_file():
        start = time.perf_counter()
        rows = _labels(config, folder)
        labelled = time.perf_counter()
        router = train_router([row["prompt"] for row in rows], torch.tensor([row["labels"] for row in rows]),
                              labelled_members(config))
        router.save(router_path)
        _journal(folder, {"event": "trained", "file": ROUTER_FILE, "documents": len(rows),
                          "train_accuracy": train_accuracy(router, rows),
                          "seconds": round(time.perf_counter() - labelled, 3)})
        logger.info("classifier router: %d documents, trained in %.1f s", len(rows), time.perf_counter() - start)
    return config.model_copy(update={"policy": policy.model_copy(update={"router_file": str(router_path.resolve())})})


def _labels(config: RunConfig, folder: Path) -> list[dict[str, Any]]:
    """The run's labels: read from `folder`/labels.jsonl, else computed now, written and journaled."""
    labels_path = folder / LABELS_FILE
    if labels_path.is_file():
        return [json.loads(line) for line in labels_path.read_text(encoding="utf-8").splitlines() if line]
    start = time.perf_counter()
    rows = member_labels(config)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(labels_path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows).encode())
    _journal(folder, {"event": "labels", "documents": len(rows), "members": labelled_members(config),
                      "seconds": round(time.perf_counter() - start, 3)})
    return rows


def run_scorers(config: RunConfig, run_path: str | Path) -> list[str] | None:
    """The router models a prefix-router run scores with: `policy.scorers`, or with `scorers: learned` the
    run's own router LMs."""
    if not config.policy.learns_scorers:
        return config.policy.scorers
    from evomerge.router_lms import ROUTER_LM_DIR, router_lm_folders

    folders = router_lm_folders(Path(run_path) / ROUTER_DIR / ROUTER_LM_DIR, config.policy.members)
    missing = [f for f in folders if not (f / "config.json").is_file()]
    if missing:
        raise EvalError(f"policy.scorers: no trained router LM at {missing[0]} (the run trains them before its "
                        f"first trial)")
    return [str(f) for f in folders]


def run_router_file(config: RunConfig, run_path: str | Path) -> Path:
    """The trained router a classifier run uses: `policy.router_file` if given, else the run's own."""
    path = Path(config.policy.router_file) if config.policy.router_file else Path(run_path) / ROUTER_DIR / ROUTER_FILE
    if not path.is_file():
        raise EvalError(f"policy.router_file: no trained router at {path} (the run trains it before its first trial)")
    return path


def train_accuracy(router: TrainedRouter, rows: list[dict[str, Any]]) -> float:
    """Share of documents whose predicted best member is among the members that got it right
    (documents no member got right left out)."""
    predicted = router.predict([row["prompt"] for row in rows]).argmax(dim=1).tolist()
    scored = [(p, row["labels"]) for p, row in zip(predicted, rows) if max(row["labels"]) > 0]
    return round(sum(labels[p] >= max(labels) for p, labels in scored) / max(len(scored), 1), 4)


def _journal(folder: Path, record: dict[str, Any]) -> None:
    import os

    with open(folder / "journal.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
