"""A trial -> a Hugging Face model folder, a mergekit YAML and the recipe JSON.

The folder is the exact artifact: it is merged with the same code the workers ran, so
reloading it and evaluating it reproduces the journaled quality (a data-flow path is written
as an ordinary model of the first member's architecture, evomerge/dataflow.py `materialize`). The mergekit YAML expresses
per-layer coefficients as tensor-name filters (`model.layers.3.` -> value) with a final
default for embeddings, norm and head; per-module recipes (merge.modules) as the shortest
dotted-prefix filters that give every tensor its value. Random-drop methods (dare_*, della*)
draw their masks with evomerge's seeds, so mergekit reproduces them only in distribution.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import yaml

from evomerge.config import RunConfig
from evomerge.errors import ConfigError
from evomerge.genome import ALL, EMBED_HEAD, Recipe, group_of, layer_index
from evomerge.merge import get_method
from evomerge.merger import load_merge_target
from evomerge.racing import full_fidelity
from evomerge.report import best_trial
from evomerge.run_dir import RunDir
from evomerge.sources import load_model, load_tokenizer, pick_device

logger = logging.getLogger(__name__)


def export(run_dir: str | Path, out: str | Path, trial_id: int | None = None, force: bool = False) -> dict[str, Any]:
    """Write trial `trial_id` (default: the best) of a run to `out`; return its journal record."""
    run = RunDir.open(run_dir)
    config = run.config()
    record = pick_trial(run, trial_id)
    out = Path(out)
    check_out(out, force)
    recipe = Recipe.from_json(record["recipe"])
    policy = recipe.policy
    with staged(out) as staging:
        write_folder(staging, config, record)
        if policy is not None:  # the other members (and router models) travel with the export
            router = policy["kind"] == "router"
            paths = config.models.by_member_name
            members = [Path(".") if name == "merged" else copy_member(paths[name], staging / "members", name)
                       for name in policy["members"]]
            scorers = [copy_member(path, staging / "members", f"scorer-{i}")
                       for i, path in enumerate(config.policy.scorers or [])] if router else None
            router_file = None
            if policy["kind"] == "classifier":  # its trained router travels with it
                from evomerge.router_data import run_router_file

                router_file = Path(shutil.copy2(run_router_file(config, run.path), staging / "router.safetensors"))
                router_file = out / router_file.name
    if policy is not None:  # written after the move: the folders are final
        from evomerge.policies import save_policy

        save_policy(out / "policy.json", policy["kind"], policy["params"], [out / m for m in members],
                    seed=config.seed, scorer_folders=[out / s for s in scorers] if scorers is not None else None,
                    router_file=router_file)
    logger.info("exported trial %d (quality %.4f) to %s", record["trial"], record["quality"], out)
    return record


def copy_member(source: str, folder: Path, name: str) -> Path:
    """A routed export's member model copied to `folder`/NAME (files hard-linked where the file
    system allows); returns its path relative to the export folder (`folder`'s parent)."""
    path = Path(source)
    if not path.is_dir():
        raise ConfigError(f"export: policy member {name} is {source}, not a local folder; a routed trial "
                          f"exports copies of its members (download the model first)")
    target = folder / name.replace(":", "-")
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        destination = target / file.relative_to(path)
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(file, destination)
        except OSError:  # another file system, or links not allowed
            shutil.copy2(file, destination)
    return target.relative_to(folder.parent)


def write_folder(folder: Path, config: RunConfig, record: dict[str, Any]) -> None:
    """Merge the trial's recipe into the base and write model, tokenizer, mergekit YAML and recipe."""
    recipe = Recipe.from_json(record["recipe"])
    model, merger = load_merge_target(config.models, config.seed, pick_device(config.models.device))
    merger.merge_into(model, recipe)
    tokenizer = load_tokenizer(config.models.base, config.models)
    if recipe.dataflow is not None:  # the layer path the worker built, its layers copied out
        write_layer_path(folder, config, model, recipe, record["trial"])
    elif recipe.moe is not None:  # the mixture the worker built (mergekit-moe cannot express its routers)
        from evomerge.moe import Upcycler, upcycle_candidate

        upcycled = upcycle_candidate(Upcycler(model, merger.experts), model, tokenizer, config.moe, recipe.moe,
                                     config.seed)
        upcycled.save_pretrained(folder, safe_serialization=True)
    else:
        model.save_pretrained(folder, safe_serialization=True)
        names = [name for name, _ in model.named_parameters()]
        (folder / "mergekit.yaml").write_text(mergekit_yaml(recipe, config, names, record["trial"]),
                                              encoding="utf-8")
    tokenizer.save_pretrained(folder)
    (folder / "recipe.json").write_text(json.dumps({"trial": record["trial"], "quality": record["quality"],
                                                     "metrics": record["metrics"], "seed": config.seed,
                                                     "recipe": record["recipe"]}, indent=1), encoding="utf-8")


def write_layer_path(folder: Path, config: RunConfig, merged: torch.nn.Module, recipe: Recipe, trial: int) -> None:
    """A data-flow trial as an ordinary model (scales folded in) and, when the path can be expressed
    (every scale 1, no merged member), a mergekit passthrough config of `slices:`."""
    from evomerge.dataflow import materialize, passthrough_yaml, path_of
    from evomerge.workers import build_layer_path

    flow = build_layer_path(config, merged, {}, pick_device(config.models.device))
    flow.set_path(path_of(recipe.dataflow))
    materialize(flow).save_pretrained(folder, safe_serialization=True)
    paths = config.models.by_member_name
    yaml_text = passthrough_yaml(flow, [paths.get(name) for name in recipe.dataflow["models"]],
                                 config.models.dtype, trial)
    if yaml_text is not None:
        (folder / "mergekit.yaml").write_text(yaml_text, encoding="utf-8")


def check_out(out: Path, force: bool) -> None:
    """Refuse an --out that is a file, or a folder with something in it unless --force."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} is a file, expected a folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(f"--out: {out} exists and is not empty; choose another folder or pass --force")


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """An empty sibling temp folder to write `out` into, put in place (`move_into`) when the block
    ends and removed when it raises, so neither a failed nor a killed command leaves a half-written
    model where the user expects one (a killed one leaves the hidden staging folder)."""
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    move_into(staging, out)


def move_into(staging: Path, out: Path) -> None:
    """Rename the finished folder into place (file by file when --force targets an existing folder)."""
    if not out.exists():
        os.replace(staging, out)
        return
    for item in staging.iterdir():
        target = out / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    staging.rmdir()


def pick_trial(run: RunDir, trial_id: int | None) -> dict[str, Any]:
    records = run.finished()
    if trial_id is None:
        record = best_trial(full_fidelity(list(records.values())))
        if record is None:
            raise ConfigError(f"{run.path}: no completed trial to export yet")
        return record
    if trial_id not in records:
        raise ConfigError(f"--trial: no trial {trial_id} in {run.path} (trials 0..{max(records, default=-1)})")
    if records[trial_id]["state"] != "complete":
        raise ConfigError(f"--trial: trial {trial_id} FAILED ({records[trial_id]['error']}); pick a completed one")
    return records[trial_id]


def mergekit_yaml(recipe: Recipe, config: RunConfig, parameter_names: list[str], trial: int) -> str:
    """A mergekit config for the recipe: per-model parameters as layer filters with a default."""
    experts = list(config.models.experts)
    layer_prefixes = _layer_prefixes(parameter_names, recipe.num_layers)
    models: list[dict[str, Any]] = []
    document: dict[str, Any] = {"merge_method": recipe.method}
    if recipe.method == "slerp":
        document["base_model"] = config.models.base
        document["models"] = [{"model": config.models.base}, {"model": experts[0]}]
        document["parameters"] = {"t": _values(recipe, "t", 0, layer_prefixes, parameter_names)}
    else:
        genes = next(iter(recipe.params.values()), {}).keys()
        for index, path in enumerate(experts):
            parameters = {gene: _values(recipe, gene, index, layer_prefixes, parameter_names) for gene in genes}
            models.append({"model": path, "parameters": parameters} if parameters else {"model": path})
        if get_method(recipe.method).needs_base:
            document["base_model"] = config.models.base
        document["models"] = models
    document["dtype"] = config.models.dtype
    # The exported folder carries the base's tokenizer; linear has no base_model to call "base".
    document["tokenizer_source"] = "base" if "base_model" in document else config.models.base
    header = f"# evomerge export of trial {trial} ({recipe.label or 'evolved'}), run seed {config.seed}\n"
    if get_method(recipe.method).random:
        header += (f"# {recipe.method} masks are random: mergekit draws its own, so its tensors match only in "
                   "distribution\n")
    return header + yaml.safe_dump(document, sort_keys=False)


def _values(recipe: Recipe, gene: str, expert: int, layer_prefixes: dict[int, str],
            parameter_names: list[str]) -> Any:
    """A scalar when every group agrees, else `[{filter: 'model.layers.i.', value}, ..., {value}]`."""
    if set(recipe.params) == {ALL}:
        return recipe.params[ALL][gene][expert]
    if recipe.modules is not None:
        return prefix_filters(parameter_names, lambda name: recipe.params[recipe.group(name)][gene][expert])
    entries = []
    for index, prefix in sorted(layer_prefixes.items()):
        group = group_of(prefix + "weight", recipe.granularity, recipe.num_layers)
        entries.append({"filter": prefix, "value": recipe.params[group][gene][expert]})
    entries.append({"value": recipe.params[EMBED_HEAD][gene][expert]})
    return entries


def prefix_filters(names: list[str], value_of: Callable[[str], float]) -> Any:
    """mergekit filters giving each tensor its value: a scalar when all agree, else a list.

    mergekit gives a tensor the value of the first entry whose filter is a substring of its name
    (an entry without a filter matches all). Walking the dotted names as a tree, a subtree whose
    tensors share one value is one entry (its prefix); a mixed one lists its exceptions first,
    then its prefix with its most common value. The last entry (the root's) is the default.
    A subtree whose most common value is its parent's needs no entry of its own. Every tensor is
    checked to get its own value; if one would not, the entries are whole names, longest first.
    """
    values = {name: value_of(name) for name in names}
    entries: list[tuple[str, float]] = []

    def visit(prefix: str, members: list[str], inherited: float | None) -> None:
        counts = Counter(values[name] for name in members)
        best = max(counts.values())
        common = inherited if counts.get(inherited) == best else next(v for v, c in counts.items() if c == best)
        children: dict[str, list[str]] = {}
        for name in members:
            children.setdefault(name[len(prefix):].split(".")[0], []).append(name)
        for component, group in children.items():
            if all(values[name] == common for name in group):
                continue
            child = prefix + component
            if group == [child]:
                entries.append((child, values[child]))
            else:
                visit(child + ".", group, common)
        if common != inherited:  # else the enclosing entry, which comes later, gives the same value
            entries.append((prefix, common))

    visit("", list(names), None)
    if len(entries) == 1:
        return entries[0][1]
    for name, value in values.items():
        if next(v for f, v in entries if f in name) != value:  # a filter matching elsewhere too
            # whole names, longest first: a name is matched by no earlier entry but its own
            entries = [*sorted(values.items(), key=lambda item: -len(item[0])), ("", entries[-1][1])]
            break
    return [{"filter": f, "value": v} for f, v in entries[:-1]] + [{"value": entries[-1][1]}]


def _layer_prefixes(names: list[str], num_layers: int) -> dict[int, str]:
    """Layer index -> tensor-name prefix that selects exactly that layer (e.g. 'model.layers.3.')."""
    prefixes: dict[int, str] = {}
    for name in names:
        index = layer_index(name)
        if index is not None and index < num_layers and index not in prefixes:
            marker = f".{index}."
            prefixes[index] = name[: name.index(marker) + len(marker)] if marker in name else f"{index}."
    return prefixes


def evaluate_folder(config: RunConfig, folder: str | Path, limit: int | float | None = None) -> float:
    """Score an exported folder with the run's tasks (the check that export reproduces the journal);
    a routed trial is scored through its policy over the models its `policy.json` names (the
    copies under members/), so what is checked is what was exported. `limit`: the trial's
    journaled `limit` (eval.subsample runs), None for eval.limit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluate import Evaluator, quality
    from evomerge.sources import torch_dtype

    device = pick_device(config.models.device)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype(config.models.dtype)).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    policy = Recipe.from_json(json.loads((Path(folder) / "recipe.json").read_text())["recipe"]).policy
    sources, scorers, router = {}, [], None
    if policy is not None:
        from evomerge.policies import TrainedRouter, read_policy

        record, member_folders, scorer_folders = read_policy(Path(folder) / "policy.json")
        if "router" in record:
            router = TrainedRouter.load(Path(folder) / record["router"])
        sources = {name: load_model(str(path), config.models, device)
                   for name, path in zip(policy["members"], member_folders) if name != "merged"}
        scorers = [(load_model(str(path), config.models, device), load_tokenizer(str(path), config.models))
                   for path in scorer_folders or []]
    with torch.inference_mode():
        evaluation = Evaluator(config.eval, model, tokenizer, sources, seed=config.seed,
                               scorers=scorers, router=router)(policy, limit=limit)
    return quality(evaluation.scores, list(config.eval.tasks))
