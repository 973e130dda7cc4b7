"""A routed run against its oracles (issue 14's acceptance): how close the front comes to serving each
task, or each document, by its best source, within a FLOPs budget.

Usage: python benchmarks/route_oracle.py RUN [--max-flops-ratio 1.2] [--json OUT]

From the run's journal (the references and every trial, all on the run's own fitness documents):
- oracle per task: each task served by its best source (base or expert:I, the run's references), the
  issue's oracle; per document: each document served by a source that answers it right (stricter);
- the best trial within `--max-flops-ratio` x one model's FLOPs per example (`evomerge calibrate`'s
  rule: the cheapest source reference; the router's FLOPs are in each trial's), its quality, its
  ratios to both oracles and to one model's FLOPs, the members it served, and its evaluation count;
- the number of evaluations of the run (references included).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evomerge.calibrate import SOURCE_LABELS, one_model_flops, pick  # noqa: E402
from evomerge.run_dir import RunDir  # noqa: E402
from evomerge.samples import decode  # noqa: E402


def is_source(record: dict) -> bool:
    label = str(record.get("label") or "")
    return label in SOURCE_LABELS or label.startswith("expert:")


def oracles(records: list[dict], weights: dict[str, float]) -> dict:
    """Each task by its best source, and each document by any source that answers it."""
    sources = [r for r in records if r["state"] == "complete" and is_source(r)]
    total = sum(weights.values())
    per_task = {t: max(r["metrics"][t] for r in sources) for t in weights}
    per_doc = {}
    for t in weights:
        rows = [decode(r["per_doc"][t]) for r in sources]
        per_doc[t] = sum(max(values) for values in zip(*rows)) / len(rows[0])
    return {"per_task": {"quality": sum(weights[t] * v for t, v in per_task.items()) / total, "tasks": per_task,
                         "best_source": {t: max(sources, key=lambda r: r["metrics"][t])["label"] for t in weights}},
            "per_document": {"quality": sum(weights[t] * v for t, v in per_doc.items()) / total, "tasks": per_doc}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--max-flops-ratio", type=float, default=1.2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    run = RunDir.open(args.run)
    config = run.config()
    records = run.records()
    weights = {t.name: t.weight for t in config.eval.tasks}
    best = pick(records, max_flops_ratio=args.max_flops_ratio)
    found = oracles(records, weights)
    first = min((r for r in records if r["state"] == "complete" and r["quality"] >= best["quality"]),
                key=lambda r: r["trial"])
    result = {
        "run": str(args.run), "evaluations": len(records), "one_model_flops": one_model_flops(records),
        "oracle": found,
        "best_within_budget": {
            "trial": best["trial"], "label": best.get("label"), "quality": best["quality"],
            "stderr": (best.get("stderr") or {}).get("quality"), "metrics": best["metrics"],
            "flops": best["flops"], "flops_ratio": best["flops_ratio"], "served": best.get("served"),
            "ratio_to_oracle_per_task": best["quality"] / found["per_task"]["quality"],
            "ratio_to_oracle_per_document": best["quality"] / found["per_document"]["quality"],
            "first_trial_at_this_quality": first["trial"],
        },
    }
    b = result["best_within_budget"]
    print(f"{args.run}: {len(records)} evaluations; one model {result['one_model_flops']:.6g} FLOPs per example")
    task_oracle = found["per_task"]
    print(f"oracle, each task by its best source: {task_oracle['quality']:.4f} "
          + ", ".join(f"{t} {v:.2f} ({task_oracle['best_source'][t]})" for t, v in task_oracle["tasks"].items()))
    print(f"oracle, each document by a source that answers it: {found['per_document']['quality']:.4f} "
          + ", ".join(f"{t} {v:.2f}" for t, v in found['per_document']['tasks'].items()))
    print(f"best within {args.max_flops_ratio} x one model's FLOPs: trial {b['trial']} ({b['label'] or 'evolved'}) "
          f"{b['quality']:.4f} +- {b['stderr'] or 0:.4f} = {b['ratio_to_oracle_per_task']:.3f} x the per-task oracle, "
          f"{b['ratio_to_oracle_per_document']:.3f} x the per-document one, at {b['flops']:.6g} FLOPs per example "
          f"({b['flops_ratio']:.4f} x one model's); first reached by trial {b['first_trial_at_this_quality']}")
    print("  tasks: " + ", ".join(f"{t} {v:.2f}" for t, v in b["metrics"].items()))
    print("  served: " + ", ".join(f"{m} {v:.3f}" for m, v in (b["served"] or {}).items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
