"""lm-eval on an in-memory model: tasks loaded once, one `evaluate` call per candidate.

`lm_eval.simple_evaluate` rebuilds the task index, reseeds python/numpy/torch globally and
runs `pip list` on every call. A candidate should cost what its forward passes cost, so the
`Evaluator` does once what simple_evaluate does per call (load the tasks with a TaskManager
that indexes only our include paths, set few-shot counts and the few-shot seed, wrap the
model in HFLM) and then calls `lm_eval.evaluator.evaluate` per candidate. The model is the
worker's preallocated one, whose weights the merger overwrites in place, so the same HFLM
serves every candidate.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.clock import ForwardClock
from evomerge.config import EvalConfig, TaskSpec
from evomerge.errors import EvalError

logger = logging.getLogger(__name__)

FEWSHOT_SEED = 1234  # lm-eval's own default, so few-shot examples match a plain lm-eval run


@dataclass(frozen=True)
class TaskScore:
    value: float
    higher_is_better: bool


@dataclass(frozen=True)
class Evaluation:
    """One candidate's scores and what serving them cost."""

    scores: dict[str, TaskScore]
    flops_per_example: float  # forward FLOPs (evomerge.flops conventions) per evaluated document
    served: dict[str, float]  # share of requests each member served
    seconds: dict[str, float]  # eval_setup, forward, serving, scoring (see evomerge.clock)
    # per task, from lm-eval's sample-level results (evomerge/samples.py): which documents were
    # scored (doc id, doc hash), their scores (encoded) and the standard error of the task's metric
    documents: dict[str, list[tuple[int, str]]] = dataclasses.field(default_factory=dict)
    per_doc: dict[str, Any] = dataclasses.field(default_factory=dict)
    stderr: dict[str, float | None] = dataclasses.field(default_factory=dict)


def task_manager(eval_config: EvalConfig):
    """A TaskManager over our include paths; lm-eval's default index only when a task needs it."""
    manager, unknown = find_tasks(eval_config)
    if unknown:
        raise unknown
    return manager


def find_tasks(eval_config: EvalConfig) -> tuple[Any, EvalError | None]:
    """The TaskManager, and the error naming the configured tasks it does not know (None: all known)."""
    from lm_eval.tasks import TaskManager

    names = [task.name for task in eval_config.tasks]
    if eval_config.include_path:
        local = TaskManager(include_path=eval_config.include_path, include_defaults=False)
        missing = [name for name in names if name not in local.all_tasks]
        if not missing:
            return local, None
        if not any(builtin_mentions(name) for name in missing):  # lm-eval's own index would not have them
            return local, unknown_tasks(missing, local.all_tasks)
    manager = TaskManager(include_path=eval_config.include_path or None, include_defaults=True)
    unknown = [name for name in names if name not in manager.all_tasks]
    return manager, unknown_tasks(unknown, manager.all_tasks) if unknown else None


def builtin_mentions(name: str) -> bool:
    """Whether any of lm-eval's own task YAMLs mentions `name` (a text scan, a few times faster than
    building lm-eval's task index: a name mentioned nowhere is no lm-eval task)."""
    pattern = re.compile(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])")
    return any(pattern.search(text) for text in _builtin_texts())


def builtin_names() -> set[str]:
    """task, group and tag names of lm-eval's own YAMLs (a text scan; for suggestions only)."""
    pattern = re.compile(r"^(?:task|group|tag):\s*['\"]?([^\s'\"#]+)", re.M)
    return {name for text in _builtin_texts() for name in pattern.findall(text)}


@functools.lru_cache(maxsize=1)
def _builtin_texts() -> tuple[str, ...]:
    import lm_eval

    return tuple(path.read_text(encoding="utf-8", errors="ignore")
                 for path in sorted((Path(lm_eval.__file__).parent / "tasks").rglob("*.yaml")))


def unknown_tasks(unknown: list[str], known: Any) -> EvalError:
    """The error for unknown task names, with the close matches among the known and lm-eval's tasks."""
    import difflib

    names = sorted(set(known) | builtin_names())
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hints.append(f"{name} (did you mean {', '.join(close)}?)" if close else name)
    local = ", ".join(sorted(known)[:12]) + (", ..." if len(known) > 12 else "")
    return EvalError(f"eval.tasks: unknown lm-eval task(s) {'; '.join(hints)}; not in eval.include_path "
                     f"({local or 'none'}) nor in lm-eval's own tasks")


def task_spec(manager: Any, name: str) -> str | dict[str, Any]:
    """A task name, or for a local task with relative `data_files`, its config with those paths
    made absolute against the task YAML's folder (lm-eval resolves them against the working
    directory, so a task folder would work only when run from inside it). A group is named as it
    is: lm-eval passes a group config's own fields down to its tasks, so it cannot be rewritten."""
    entry = manager.task_index.get(name)
    config, yaml_path = getattr(entry, "cfg", None), getattr(entry, "yaml_path", None)
    if not isinstance(config, dict) or yaml_path is None or "include" in config or entry_kind(entry) == "group":
        return name
    files = config.get("dataset_kwargs", {}).get("data_files")
    if not files:
        return name
    # the index holds `!function` entries (process_docs, doc_to_text, ...) as their names, unresolved
    config = _loaded_config(yaml_path)
    config["dataset_kwargs"]["data_files"] = _absolute(files, Path(yaml_path).parent)
    return config


def entry_kind(entry: Any) -> str | None:
    """"task", "group", "tag", ... of a TaskManager index entry (an object in newer lm-eval 0.4
    releases, a dict with "type" in older ones)."""
    kind = getattr(entry, "kind", None)
    if kind is not None:
        return str(getattr(kind, "name", kind)).lower()
    return str(entry.get("type")).lower() if isinstance(entry, dict) and entry.get("type") else None


def check_tasks(eval_config: EvalConfig) -> None:
    """Load the configured tasks as a worker will, before any worker starts, so that a missing
    data file or a bad task YAML is named by task (a worker that cannot load them cannot start).
    Refuses tags: lm-eval reports no score for a tag, only for its tasks. Every problem of every
    task (metrics and filters included) is reported at once, in one line."""
    manager, unknown = find_tasks(eval_config)
    problems = [str(unknown)] if unknown else []
    beside: list[str] = []  # tasks whose relative data_files only the YAML's folder holds
    for task in eval_config.tasks:
        entry = manager.task_index.get(task.name)
        if entry is None:
            continue  # unknown: named above
        kind = entry_kind(entry)
        if kind == "tag":
            problems.append(f"eval.tasks.{task.name}: an lm-eval tag, which has no score of its own; name its "
                            f"tasks, or a group with an aggregate_metric_list")
            continue
        missing = missing_data_files(entry)
        if missing:
            folder = Path(getattr(entry, "yaml_path")).parent
            problems.append(f"eval.tasks.{task.name}: data file(s) {', '.join(map(repr, missing))} not found "
                            f"(data_files are read relative to the task YAML's folder {str(folder)!r})")
            continue
        if yaml_relative_data_files(entry):
            beside.append(task.name)
        try:
            loaded = manager.load([task_spec(manager, task.name)])
        except Exception as exc:  # noqa: BLE001 - whatever lm-eval or datasets raise, named by task
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
            hint = ("; the data_files of a group's tasks resolve against the working directory (lm-eval's rule): "
                    "give absolute paths there, or name the tasks themselves"
                    if kind == "group" else "")
            problems.append(f"eval.tasks.{task.name}: lm-eval could not load it: {reason}{hint}")
            continue
        leaf = loaded["tasks"].get(task.name)
        if leaf is not None:
            problems += metric_problems(task, leaf.config)
    if beside and not problems:
        logger.info("tasks %s: relative data_files read from each task YAML's folder; plain lm-eval reads them "
                    "from the working directory: run it from that folder, or give absolute paths, to reproduce "
                    "these scores with it", ", ".join(beside))
    if len(problems) == 1:
        raise EvalError(problems[0])
    if problems:
        raise EvalError(f"{len(problems)} task errors: " + "; ".join(problems))


def _relative_data_files(entry: Any) -> tuple[Path | None, list[str]]:
    config, yaml_path = getattr(entry, "cfg", None), getattr(entry, "yaml_path", None)
    if not isinstance(config, dict) or yaml_path is None or entry_kind(entry) == "group":
        return None, []
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    names = list(files.values()) if isinstance(files, dict) else files if isinstance(files, list) else [files]
    flat = [n for name in names for n in (name if isinstance(name, list) else [name])]
    return Path(yaml_path).parent, [name for name in flat if isinstance(name, str) and "://" not in name
                                    and not Path(name).is_absolute()]


def yaml_relative_data_files(entry: Any) -> list[str]:
    """Relative data_files that evomerge reads beside the task YAML but plain lm-eval (which reads
    them from the working directory) would not find."""
    folder, names = _relative_data_files(entry)
    return [name for name in names if (folder / name).exists() and not Path(name).exists()]


def missing_data_files(entry: Any) -> list[str]:
    """A local task's relative data_files found neither beside its YAML nor in the working
    directory, as the paths evomerge looked at (beside the YAML)."""
    folder, names = _relative_data_files(entry)
    return [str(folder / name) for name in names if not (folder / name).exists() and not Path(name).exists()]


def metric_problems(task: TaskSpec, config: Any) -> list[str]:
    """The configured metric and filter among those a task's YAML lists (when it lists them: the
    defaults of an output type are lm-eval's to know)."""
    problems = []
    metrics = [m.get("metric") for m in getattr(config, "metric_list", None) or [] if isinstance(m, dict)]
    if metrics and all(isinstance(m, str) for m in metrics) and task.metric not in metrics:
        problems.append(f"eval.tasks.{task.name}.metric: {task.metric!r} is not among the task's metrics: "
                        f"{', '.join(metrics)}")
    filters = [f.get("name") for f in getattr(config, "filter_list", None) or [] if isinstance(f, dict)]
    if filters and task.filter not in filters:
        problems.append(f"eval.tasks.{task.name}.filter: {task.filter!r} is not among the task's filters: "
                        f"{', '.join(map(str, filters))}")
    return problems


def _loaded_config(yaml_path: Any) -> dict[str, Any]:
    """A task YAML as lm-eval reads it to build the task: `!function` tags imported, includes merged."""
    try:
        from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's loader in newer 0.4 releases
    except ImportError:  # older 0.4 releases
        from lm_eval.utils import load_yaml_config

        return copy.deepcopy(load_yaml_config(str(yaml_path), mode="full"))
    return copy.deepcopy(load_yaml(yaml_path, resolve_func=True))


def _absolute(files: Any, folder: Path) -> Any:
    if isinstance(files, dict):
        return {split: _absolute(value, folder) for split, value in files.items()}
    if isinstance(files, list):
        return [_absolute(value, folder) for value in files]
    if isinstance(files, str) and "://" not in files and not Path(files).is_absolute() and (folder / files).exists():
        return str(folder / files)
    return files


class CompiledTemplate:
    """A task's Jinja prompt template, compiled once, as the callable lm-eval's task configs accept.

    lm-eval renders a string `doc_to_text` / `doc_to_target` with `utils.apply_template`, which
    compiles the template again for every document of every call: on the demo that was about
    half of a candidate's time outside the forward passes. Called on a document, this returns
    what lm-eval's string branch returns (the same template rendered in lm-eval's own Jinja
    environment, then the same digit / list literal rules); printed, it is the template, so
    dumped task configs read as before. lm-eval hands it the same documents for every candidate
    (fresh dicts each time), so each distinct document is rendered once (documents with a value
    that cannot be a dict key, a list say, every time).
    """

    def __init__(self, template: str, field: str, has_choices: bool):
        from lm_eval.utils import env

        self.template, self.field, self.has_choices = template, field, has_choices
        self.compiled = env.from_string(template)
        self.rendered: dict[tuple, str] = {}

    def __call__(self, doc: dict[str, Any]) -> Any:
        key = tuple((name, type(value), value) for name, value in doc.items())  # 1, 1.0 and True render apart
        try:
            text = self.rendered.get(key)
        except TypeError:  # an unhashable value
            text, key = None, None
        if text is None:
            text = self.compiled.render(**doc)
            if key is not None:
                self.rendered[key] = text
        if text.isdigit() and self.has_choices:
            return ast.literal_eval(text)
        if self.field == "doc_to_target" and len(text) >= 2 and text[0] == "[" and text[-1] == "]":
            try:
                return ast.literal_eval(text)
            except (SyntaxError, ValueError):
                return text
        return text

    def __str__(self) -> str:
        return self.template

    __repr__ = __str__

    def __deepcopy__(self, memo: dict) -> CompiledTemplate:  # configs are deep-copied when dumped
        return self


def compile_templates(task: Any) -> None:
    """Swap a task's string templates for `CompiledTemplate`s (not column names, not promptsource)."""
    if getattr(task, "prompt", None) is not None or not hasattr(task, "features"):
        return
    config = task.config
    for field in ("doc_to_text", "doc_to_target"):
        template = getattr(config, field, None)
        if isinstance(template, str) and template not in task.features:
            setattr(config, field, CompiledTemplate(template, field, config.doc_to_choice is not None))


class KeptDocs:
    """A task's `process_docs` that runs once per worker and keeps the documents as a list.

    lm-eval reads a task's documents from its `datasets.Dataset` on every call, twice (to build
    the requests, then to score them), and turns each Arrow row into a Python dict each time:
    on the demo a twenty-fifth of a candidate's time. `process_docs` is lm-eval's own hook
    between the dataset and the documents, and a list of dicts is a form of documents it
    accepts; this one applies the task's own `process_docs` (if any) to a split once and hands
    out that list (the same dicts every call: lm-eval reads documents, it does not change them).
    """

    def __init__(self, process: Any = None):
        self.process = process
        self.kept: list[tuple[Any, list[dict[str, Any]]]] = []  # (split dataset, its documents)

    def __call__(self, dataset: Any) -> list[dict[str, Any]]:
        for source, docs in self.kept:
            if source is dataset:
                return docs
        docs = list(self.process(dataset) if self.process is not None else dataset)
        self.kept.append((dataset, docs))
        return docs


def keep_docs(task: Any) -> None:
    """Give a loaded task a `KeptDocs` (tasks without a config of lm-eval's kind are left alone)."""
    config = getattr(task, "config", None)
    if config is None or not hasattr(config, "process_docs") or isinstance(config.process_docs, KeptDocs):
        return
    config.process_docs = KeptDocs(config.process_docs)


class Evaluator:
    """Scores whatever weights `model` holds at call time on the configured tasks, and counts FLOPs.

    The model is served through a one-member policy (`evomerge.policies`), which counts the
    tokens every request really processes; the policy with probability 1 on its one member
    returns exactly what the bare HFLM would.
    """

    def __init__(self, eval_config: EvalConfig, model: Any, tokenizer: Any,
                 sources: dict[str, Any] | None = None, seed: int = 0,
                 scorers: list[tuple[Any, Any]] | None = None, router: Any = None):
        """`model` is the candidate's (merged) model; `sources` other models a policy may route to;
        `scorers` (model, tokenizer) pairs of a prefix router's router models, one per member;
        `router` a classifier policy's trained router (`policies.classifier.TrainedRouter`)."""
        from evomerge.policies import Blend, Member

        self.config = eval_config
        manager = task_manager(eval_config)
        self.tasks = manager.load([task_spec(manager, task.name) for task in eval_config.tasks])
        for task in self.tasks["tasks"].values():
            if eval_config.num_fewshot is not None and task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=eval_config.num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=FEWSHOT_SEED)
            compile_templates(task)
            keep_docs(task)
        # HFLM runs on the model's own device (a model object, unlike a name, is not moved).
        self.members = {name: Member.from_model(name, m, tokenizer, batch_size=eval_config.batch_size)
                        for name, m in {"merged": model, **(sources or {})}.items()}
        self.scorers = [Member.from_model(f"scorer:{i}", m, tok, batch_size=eval_config.batch_size)
                        for i, (m, tok) in enumerate(scorers)] if scorers else None
        self.solo = Blend([self.members["merged"]], [1.0], seed=0)
        self.router = router
        self.seed = seed
        self.model = model
        self.clock = ForwardClock([model, *(sources or {}).values()])

    def __call__(self, policy: dict[str, Any] | None = None, limit: int | float | None = None,
                 documents: tuple[tuple[str, tuple[int, ...]], ...] | None = None) -> Evaluation:
        """Scores of the merged model alone (policy None) or of a policy {"kind", "members", "params"},
        on the first `limit` documents of each task (lm-eval's `limit`; None: `eval.limit`), or with
        `documents` on exactly those document indices per task (lm-eval's `samples`)."""
        from lm_eval.evaluator import evaluate

        from evomerge.flops import CostModel
        from evomerge.policies import make_policy, policy_class

        # the candidate's structure may change between calls (a mixture's experts per token)
        self.members["merged"].cost = CostModel.from_model(self.model)
        if policy is None:
            lm, names = self.solo, ["merged"]
        else:
            names = list(policy["members"])
            lm = make_policy(policy["kind"], [self.members[name] for name in names], policy["params"], self.seed,
                             scorers=self.scorers if policy_class(policy["kind"]).takes_scorers else None,
                             router=self.router if policy_class(policy["kind"]).takes_router else None)
        lm.stats.reset()
        self.clock.reset()
        start = time.perf_counter()
        chosen = {task: sorted(docs) for task, docs in documents} if documents is not None else None
        results = evaluate(lm=lm, task_dict=self.tasks, samples=chosen,
                           limit=None if chosen is not None else self.config.limit if limit is None else limit,
                           bootstrap_iters=0, log_samples=True, verbosity="ERROR")
        seconds = self.clock.split(start, time.perf_counter())
        scores = {task.name: read_score(results, task) for task in self.config.tasks}
        stats = lm.stats
        documents = sum(int(n.get("effective", 0)) for n in results.get("n-samples", {}).values()) or 1
        served = {name: count / max(stats.requests, 1) for name, count in zip(names, stats.served)}
        return Evaluation(scores, stats.flops / documents, served, seconds, **per_document(results, self.config.tasks,
                                                                                            scores))


def per_document(results: dict[str, Any], tasks: list[TaskSpec], scores: dict[str, TaskScore]) -> dict[str, Any]:
    """Evaluation's documents, per_doc and stderr fields from lm-eval's logged samples (a task whose
    metric is not a mean of per-document scores, a perplexity say, has none: stderr None)."""
    from evomerge import samples

    documents, per_doc, errors = {}, {}, {}
    for task in tasks:
        found = samples.from_lm_eval(results.get("samples") or {}, task.name, task.metric, task.filter,
                                     scores[task.name].value)
        if found is None:
            errors[task.name] = None
            continue
        documents[task.name], values = found
        per_doc[task.name] = samples.encode(values)
        errors[task.name] = samples.stderr(values)
    return {"documents": documents, "per_doc": per_doc, "stderr": errors}


def read_score(results: dict[str, Any], task: TaskSpec) -> TaskScore:
    """The configured metric of one task from lm-eval's results, with its direction."""
    per_task = results["results"].get(task.name)
    if per_task is None:
        raise EvalError(f"eval.tasks.{task.name}: lm-eval returned no results for this task")
    key = f"{task.metric},{task.filter}"
    if key not in per_task:
        available = sorted(k for k in per_task if "," in k and not k.split(",")[0].endswith("_stderr"))
        if not available:  # a group without aggregate_metric_list
            raise EvalError(f"eval.tasks.{task.name}: lm-eval reports no metric for it (a group scores only with an "
                            f"aggregate_metric_list); name its tasks, or give it one")
        raise EvalError(f"eval.tasks.{task.name}.metric: {key!r} not reported; lm-eval reports: {', '.join(available)}")
    value = float(per_task[key])
    if not math.isfinite(value):
        raise EvalError(f"eval.tasks.{task.name}: metric {key!r} is {value} (not finite)")
    higher = task.higher_is_better
    if higher is None:
        higher = bool(results.get("higher_is_better", {}).get(task.name, {}).get(task.metric, True))
    return TaskScore(value, higher)


def quality(scores: dict[str, TaskScore], tasks: list[TaskSpec]) -> float:
    """Weighted mean over tasks of the metric, negated where lower is better (higher quality is better)."""
    total = sum(task.weight for task in tasks)
    signed = sum(task.weight * (s.value if s.higher_is_better else -s.value)
                 for task in tasks for s in [scores[task.name]])
    return signed / total
