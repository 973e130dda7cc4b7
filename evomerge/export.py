"""A trial -> a Hugging Face model folder, a mergekit YAML, the recipe JSON and a model card (README.md).

The folder is the exact artifact: it is merged with the same code the workers ran, so
reloading it and evaluating it reproduces the journaled quality (a data-flow path is written
as an ordinary model of the first member's architecture, evomerge/dataflow.py `materialize`).
The mergekit YAML (written by evomerge/merge/mergekit.py `mergekit_yaml`) expresses
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
from pathlib import Path
from typing import Any, Iterator

import torch

from evomerge.config import RunConfig
from evomerge.errors import ConfigError
from evomerge.genome import Recipe
from evomerge.merge.mergekit import mergekit_yaml
from evomerge.merge.merger import load_merge_target
from evomerge.model_card import write_model_card
from evomerge.models.sources import load_model, load_tokenizer, pick_device
from evomerge.run_dir import RunDir
from evomerge.samples import ranked
from evomerge.trial import TrialState, best

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
            from evomerge.policies import policy_class

            takes_scorers = policy_class(policy["kind"]).takes_scorers
            paths = config.models.by_member_name
            members = [Path(".") if name == "merged" else copy_member(paths[name], staging / "members", name)
                       for name in policy["members"]]
            if takes_scorers:  # hand-made router models, or with `scorers: learned` the run's router LMs
                from evomerge.router_data import run_scorers

                scorers = [copy_member(path, staging / "members", f"scorer-{i}")
                           for i, path in enumerate(run_scorers(config, run.path) or [])]
            else:
                scorers = None
            router_file = None
            if policy_class(policy["kind"]).takes_router:  # its trained router travels with it
                from evomerge.policies import ROUTER_FILE
                from evomerge.router_data import run_router_file

                router_file = out / Path(shutil.copy2(run_router_file(config, run.path), staging / ROUTER_FILE)).name
        write_model_card(staging, run, config, record, name=out.name)
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
    from evomerge.dataflow import materialize, path_of
    from evomerge.merge.mergekit import passthrough_yaml
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


def best_evolved(run: RunDir) -> dict[str, Any] | None:
    """The best completed evolved trial (not a source nor the uniform merge) on the run's current sample."""
    return best([r for r in ranked(list(run.finished().values())) if r["label"] is None])


def pick_trial(run: RunDir, trial_id: int | None) -> dict[str, Any]:
    records = run.finished()
    if trial_id is None:
        record = best(ranked(list(records.values())))
        if record is None:
            raise ConfigError(f"{run.path}: no completed trial to export yet")
        return record
    if trial_id not in records:
        raise ConfigError(f"--trial: no trial {trial_id} in {run.path} (trials 0..{max(records, default=-1)})")
    record = records[trial_id]
    if record["state"] == TrialState.FAILED.value:
        raise ConfigError(f"--trial: trial {trial_id} FAILED ({record['error']}); pick a completed one")
    if record["state"] == TrialState.PRUNED.value:
        raise ConfigError(f"--trial: trial {trial_id} was scored on eval.subsample's subset or "
                          f"eval.estimate's anchors only (pruned); "
                          f"pick a completed one")
    return records[trial_id]


def evaluate_folder(config: RunConfig, folder: str | Path, limit: int | float | None = None) -> float:
    """Score an exported folder with the run's tasks (the check that export reproduces the journal);
    a routed trial is scored through its policy over the models its `policy.json` names (the
    copies under members/), so what is checked is what was exported. `limit`: the trial's
    journaled `limit` (eval.subsample runs), None for eval.limit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluate import Evaluator, quality
    from evomerge.models.sources import torch_dtype

    device = pick_device(config.models.device)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype(config.models.dtype)).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    policy = Recipe.from_json(json.loads((Path(folder) / "recipe.json").read_text())["recipe"]).policy
    sources, scorers, router = {}, [], None
    if policy is not None:
        from evomerge.policies import TrainedRouter, read_policy

        record, member_folders, scorer_folders = read_policy(Path(folder) / "policy.json")
        if "router_file" in record:
            router = TrainedRouter.load(Path(folder) / record["router_file"])
        sources = {name: load_model(str(path), config.models, device)
                   for name, path in zip(policy["members"], member_folders) if name != "merged"}
        scorers = [(load_model(str(path), config.models, device), load_tokenizer(str(path), config.models))
                   for path in scorer_folders or []]
    with torch.inference_mode():
        evaluation = Evaluator(config.eval, model, tokenizer, sources, seed=config.seed,
                               scorers=scorers, router=router)(policy, limit=limit)
    return quality(evaluation.scores, list(config.eval.tasks))
