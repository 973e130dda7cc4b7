"""A trial: one candidate recipe, what became of it, and the fitness the optimiser sees.

Failures are data: a trial whose merge or evaluation failed is a FAILED record with its
reason and traceback, never an exception across the worker boundary.
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from evomerge.genome import Recipe


class TrialState(str, enum.Enum):
    """What became of a trial. Only COMPLETE trials are ranked, put on the front or exported."""

    COMPLETE = "complete"  # scored on the full eval.limit
    FAILED = "failed"  # its merge or evaluation failed: `error` says why
    # scored on eval.subsample's subset only and not promoted (evomerge/racing.py): its quality is
    # the subset's, a different measurement from every COMPLETE trial's
    PRUNED = "pruned"


@dataclass(frozen=True)
class Trial:
    id: int
    generation: int
    recipe: Recipe
    genome: tuple[float, ...] | None = None  # None for reference trials (sources, uniform merge)
    limit: int | float | None = None  # lm-eval's limit for this evaluation; None: eval.limit (evomerge/racing.py)
    stage: str = "ps"  # the search stage (config.stages) that proposed it
    # ((task, document indices), ...): scored on exactly these documents (eval.estimate's anchors,
    # evomerge/estimate.py) instead of the first `limit`; None: the limit's documents
    documents: tuple[tuple[str, tuple[int, ...]], ...] | None = None

    @property
    def label(self) -> str | None:
        return self.recipe.label


@dataclass(frozen=True)
class TrialResult:
    trial_id: int
    state: TrialState
    quality: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    flops: float | None = None  # forward FLOPs per evaluated example
    served: dict[str, float] = field(default_factory=dict)  # share of requests per policy member
    # merge, eval_setup, forward, serving, scoring (evomerge.clock), eval, total
    seconds: dict[str, float] = field(default_factory=dict)
    worker: str = ""
    error: str | None = None
    traceback: str | None = None
    # what it was scored on and how noisy that is (evomerge/samples.py): {limit, documents, hash};
    # standard error per task and of the quality ("quality"); per-document scores per task
    sample: dict[str, Any] | None = None
    stderr: dict[str, float | None] = field(default_factory=dict)
    per_doc: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.state is not TrialState.FAILED and (self.quality is None or not math.isfinite(self.quality)):
            raise ValueError(f"trial {self.trial_id}: a {self.state.name} trial needs a finite quality, "
                             f"got {self.quality!r}")
        if self.state is TrialState.FAILED and not self.error:
            raise ValueError(f"trial {self.trial_id}: a FAILED trial needs a reason")

    @property
    def ok(self) -> bool:
        return self.state is TrialState.COMPLETE


def record(trial: Trial, result: TrialResult) -> dict[str, Any]:
    """The journal line for a finished trial."""
    data = {
        "trial": trial.id,
        "generation": trial.generation,
        "stage": trial.stage,
        "label": trial.label,
        "genome": list(trial.genome) if trial.genome is not None else None,
        "recipe": trial.recipe.to_json(),
        **{k: v for k, v in asdict(result).items() if k != "trial_id"},
    }
    for name in ("sample", "stderr", "per_doc"):  # a journal without samples reads as before
        if not data[name]:
            del data[name]
    data["state"] = result.state.value
    return data


def result_from_record(data: dict[str, Any]) -> TrialResult:
    return TrialResult(trial_id=int(data["trial"]), state=TrialState(data["state"]), quality=data.get("quality"),
                       metrics=data.get("metrics", {}), flops=data.get("flops"), served=data.get("served", {}),
                       seconds=data.get("seconds", {}),
                       worker=data.get("worker", ""), error=data.get("error"), traceback=data.get("traceback"),
                       sample=data.get("sample"), stderr=data.get("stderr", {}), per_doc=data.get("per_doc", {}))


def best(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best COMPLETE journal record: the highest quality, the earliest trial among equals (a
    stable choice whatever order the journal lines were written in); None when there is none."""
    complete = [r for r in records if r["state"] == TrialState.COMPLETE.value]
    return max(complete, key=lambda r: (r["quality"], -r["trial"])) if complete else None
