"""The README.md every export carries: a Hugging Face model card built with `huggingface_hub.ModelCard`.

Metadata (the YAML header the hub reads): `base_model` (every source the trial was made from,
`base_model_relation: merge`), `tags` (`merge`, `evomerge`, the merge method, the policy kind,
`moe` or `layer-path` when they apply), `library_name: transformers`, `pipeline_tag:
text-generation`. Body: the sources, the method and its reference, a summary of the recipe,
this trial's per-task scores beside the references of the same run (each source, the uniform
merge), the Pareto front (with `pareto.png` when `evomerge report` drew one), how to reproduce
the trial and how to serve it.

Local source folders appear in `base_model` as the paths the run used: replace them with hub ids
before publishing (`huggingface_hub`'s `ModelCard.validate` checks the header against the hub,
which needs the network; the card is parsed back here, offline, before it is written).
"""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path
from typing import Any

import yaml

from evomerge.config import RunConfig
from evomerge.merge import get_method
from evomerge.policies import policy_class
from evomerge.report import pm, summarize
from evomerge.run_dir import RunDir

CARD = "README.md"


def write_model_card(folder: Path, run: RunDir, config: RunConfig, record: dict[str, Any],
                     name: str | None = None) -> Path:
    """Write `folder`/README.md for the exported trial `record` of `run` (`name`: the export folder's
    name, default `folder`'s); return its path."""
    from huggingface_hub import ModelCard

    summary = summarize(run.records(), config)
    plot = run.path / "pareto.png"
    if plot.is_file() and summary["pareto"]:
        shutil.copyfile(plot, folder / "pareto.png")
    text = card_text(config, record, summary, (folder / "pareto.png").is_file(), name or folder.name,
                     run.path)
    card = ModelCard(text)  # parses the header back: a card the hub library cannot read is never written
    if card.data.get("base_model") is None or "merge" not in (card.data.get("tags") or []):
        raise ValueError(f"{folder / CARD}: the model card lost its base_model or merge tag when parsed")
    card.save(folder / CARD)
    return folder / CARD


def card_text(config: RunConfig, record: dict[str, Any], summary: dict[str, Any], has_plot: bool, name: str,
              run_path: Path) -> str:
    from huggingface_hub import ModelCardData

    recipe = record["recipe"]
    method = recipe["method"]
    tags = ["merge", "evomerge", method]
    if recipe.get("policy"):
        tags.append(policy_class(recipe["policy"]["kind"]).kind.replace("_", "-"))  # prefix_router: prefix-router
    if recipe.get("moe"):
        tags.append("moe")
    if recipe.get("dataflow"):
        tags.append("layer-path")
    sources = [config.models.base, *config.models.experts]
    data = ModelCardData(base_model=sources, tags=tags, library_name="transformers", pipeline_tag="text-generation",
                         model_name=name, base_model_relation="merge")
    body = [f"# {name}", "",
            f"Trial {record['trial']} of the evomerge run `{config.name}` (seed {config.seed}): {what(recipe)}, "
            f"found by {config.search.strategy} search and scored with lm-eval.", "",
            "## Sources", "", "| role | model |", "|---|---|", f"| base | `{config.models.base}` |"]
    body += [f"| expert:{i} | `{path}` |" for i, path in enumerate(config.models.experts)]
    body += ["", "## Method", "", method_text(recipe), "", "## Recipe", ""] + recipe_lines(recipe)
    body += ["", "## Scores", "", scores_intro(config)] + score_table(record, summary)
    body += pareto_lines(record, summary, has_plot)
    body += ["", "## Reproduce", "", "```bash",
             f"evomerge search {run_path}/config.yaml --run-dir again   # the run's config (below), same seed",
             f"evomerge export {run_path} --trial {record['trial']} --out {name} --verify",
             "```", "", "`--verify` scores the exported folder again with the run's tasks and compares it with "
             "the journal. `recipe.json` holds this trial's recipe" + (", `mergekit.yaml` a mergekit config of it"
                                                                       if not recipe.get("policy") else "") + ".",
             "", "<details><summary>config.yaml (resolved)</summary>", "", "```yaml",
             yaml.safe_dump(config.model_dump(mode="json", exclude_none=True), sort_keys=False).rstrip(), "```", "",
             "</details>", "", "## Use", "", "```bash",
             f"evomerge serve {name}   # OpenAI-compatible API on http://127.0.0.1:8000/v1", "```", ""]
    if not recipe.get("policy"):
        body += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                 f'model = AutoModelForCausalLM.from_pretrained("{name}")',
                 f'tokenizer = AutoTokenizer.from_pretrained("{name}")', "```", ""]
    else:
        body += ["```python", "from evomerge import policies", "",
                 f'answers = policies.load("{name}").generate(["your prompt"])', "```", ""]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)


def what(recipe: dict[str, Any]) -> str:
    parts = [f"a `{recipe['method']}` merge of the sources"]
    if recipe.get("moe"):
        parts.append("upcycled into a mixture of experts")
    if recipe.get("dataflow"):
        parts.append("served as a path through the layers of " + ", ".join(recipe["dataflow"]["models"]))
    if recipe.get("policy"):
        policy = recipe["policy"]
        parts.append(f"routed by a {policy['kind']} policy over " + ", ".join(policy["members"]))
    return ", ".join(parts)


def method_text(recipe: dict[str, Any]) -> str:
    method = get_method(recipe["method"])
    lines = f"`{recipe['method']}` ({method.reference}), granularity `{recipe['granularity']}`"
    if recipe.get("modules"):
        lines += f", modules {', '.join(recipe['modules'])}"
    return lines + f", {recipe['num_layers']} layers."


def recipe_lines(recipe: dict[str, Any]) -> list[str]:
    """Per gene and expert: the value, or mean / min / max over the groups."""
    lines = []
    params = recipe.get("params") or {}
    genes: dict[tuple[str, int], list[float]] = {}
    for group in params.values():
        for gene, values in group.items():
            for i, value in enumerate(values):
                genes.setdefault((gene, i), []).append(float(value))
    if genes:
        lines += [f"{len(params)} parameter group(s).", "", "| gene | expert | mean | min | max |",
                  "|---|---|---|---|---|"]
        for (gene, i), values in sorted(genes.items()):
            who = "all" if gene == "t" else f"expert:{i}"
            lines.append(f"| {gene} | {who} | {statistics.fmean(values):.4g} | {min(values):.4g} | {max(values):.4g} |")
    else:
        lines.append("No genes: the method's own rule.")
    if recipe.get("policy"):
        policy = recipe["policy"]
        lines += ["", f"Policy `{policy['kind']}` over {', '.join(policy['members'])}: `{policy.get('params')}`."]
    if recipe.get("moe"):
        lines += ["", f"Mixture of experts: `{recipe['moe']}`."]
    if recipe.get("dataflow"):
        lines += ["", f"Layer path of {len(recipe['dataflow'].get('path', []))} steps through "
                      f"{', '.join(recipe['dataflow']['models'])}."]
    return lines


def scores_intro(config: RunConfig) -> str:
    tasks = ", ".join(f"`{t.name}` ({t.metric})" for t in config.eval.tasks)
    return (f"Tasks {tasks}, `eval.limit` {config.eval.limit}; quality is their weighted mean, ± its standard "
            f"error over the documents where the journal has one. The references are this run's own trials of "
            f"each source and of the uniform merge.") + "\n"


def score_table(record: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    tasks = summary["tasks"]
    lines = ["| | trial | quality | FLOPs / example | " + " | ".join(tasks) + " |",
             "|---|---|---|---|" + "---|" * len(tasks)]
    rows = [(f"**this model** ({record['label'] or 'evolved'})", record)]
    rows += [(r["label"], r) for r in summary["references"] if r["trial"] != record["trial"]]
    for label, row in rows:
        if row.get("state") != "complete":
            lines.append(f"| {label} | {row['trial']} | failed | | " + " | ".join("" for _ in tasks) + " |")
            continue
        flops = "-" if row.get("flops") is None else f"{row['flops']:.4g}"
        errors = row.get("stderr") or {}  # lm-eval's standard errors over the documents (issue 19)
        lines.append(f"| {label} | {row['trial']} | {pm(row['quality'], errors.get('quality'))} | {flops} | "
                     + " | ".join(pm(row['metrics'].get(t, float('nan')), errors.get(t)) for t in tasks) + " |")
    if not summary["references"]:
        lines += ["", "The run evaluated no references (`search.references: false`)."]
    return lines


def pareto_lines(record: dict[str, Any], summary: dict[str, Any], has_plot: bool) -> list[str]:
    front = summary["pareto"]
    if not front:
        return []
    on_front = any(e["trial"] == record["trial"] for e in front)
    lines = ["", "## Pareto front (quality vs forward FLOPs per example)", "",
             f"This trial is {'on' if on_front else 'not on'} the run's front of {len(front)} trial(s)"
             + (f"; hypervolume {summary['hypervolume']:.4g}." if summary.get("hypervolume") is not None else "."),
             "", "| trial | quality | FLOPs / example |", "|---|---|---|"]
    for e in front:
        mark = " (this model)" if e["trial"] == record["trial"] else ""
        lines.append(f"| {e['trial']}{mark} | {e['quality']:.4f} | {e['flops']:.5g} |")
    if has_plot:
        lines += ["", "![quality vs FLOPs](pareto.png)"]
    return lines
