"""Calibration to a cost target (RouteLLM's `calibrate_threshold --strong-model-pct`, for N members).

* `pick(records, ...)`: the best completed trial of a run that meets a FLOPs-per-example budget
  (absolute, or as a multiple of one model's: the cheapest source reference of the run) and, per
  member, a largest share of the requests it served; its shares come with it.
* `threshold_for_share(router, prompts, params, share)`: for a classifier trial, the `threshold`
  that sends `share` of `prompts` (the run's router-training prompts: RouteLLM calibrates on its
  own dataset too) to the members the router has no labels for (the merged model). The other
  params stay; what the new threshold scores is for `evomerge export --verify` to say.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from evomerge.errors import ConfigError

__all__ = ["one_model_flops", "pick", "threshold_for_share"]

SOURCE_LABELS = ("base",)


def one_model_flops(records: list[dict[str, Any]]) -> float:
    """FLOPs per example of one model: the cheapest completed source reference (base or an expert)."""
    sources = [r["flops"] for r in records if r["state"] == "complete"
               and (r.get("label") in SOURCE_LABELS or str(r.get("label") or "").startswith("expert:"))]
    if not sources:
        raise ConfigError("calibrate: the run has no completed source reference (base or expert:I) to measure "
                          "one model's FLOPs by; give --max-flops in FLOPs per example instead")
    return min(sources)


def pick(records: list[dict[str, Any]], max_flops: float | None = None, max_flops_ratio: float | None = None,
         max_share: dict[str, float] | None = None) -> dict[str, Any]:
    """The best completed trial within the budget (ties: lowest trial id), with `flops_ratio` added."""
    one = one_model_flops(records) if max_flops_ratio is not None or max_flops is None else None
    limit = math.inf
    if max_flops is not None:
        limit = min(limit, max_flops)
    if max_flops_ratio is not None:
        limit = min(limit, max_flops_ratio * one)
    shares = max_share or {}
    fits = [r for r in records if r["state"] == "complete" and r["flops"] <= limit
            and all((r.get("served") or {}).get(m, 0.0) <= s for m, s in shares.items())]
    if not fits:
        raise ConfigError(f"calibrate: no completed trial meets the budget (FLOPs per example <= {limit:.6g}"
                          + "".join(f", {m} share <= {s}" for m, s in shares.items()) + ")")
    best = max(sorted(fits, key=lambda r: r["trial"]), key=lambda r: r["quality"])
    return {**best, "flops_ratio": best["flops"] / one if one else None}


def threshold_for_share(router: Any, prompts: Sequence[str], params: dict[str, Any], share: float,
                        relative_cost: Sequence[float] | None = None) -> float:
    """The threshold under which the unlabelled members (outputs -1) serve `share` of `prompts`.

    A prompt goes to an unlabelled member when the best labelled score, predicted quality minus
    cost_weight x relative cost, is below threshold - cost_weight x that member's relative cost;
    the threshold returned lies midway between two neighbouring prompt scores (0 or 1 at the ends)."""
    if not 0.0 <= share <= 1.0:
        raise ConfigError(f"calibrate: a share is in [0, 1], got {share}")
    outputs = list(params["outputs"])
    if all(o >= 0 for o in outputs):
        raise ConfigError("calibrate: the policy has no member without router labels (merged) to send a share to")
    weight = float(params.get("cost_weight", 0.0))
    cost = list(relative_cost) if relative_cost is not None else [1.0] * len(outputs)
    predicted = router.predict(list(prompts))
    labelled = torch.stack([predicted[:, o] - weight * cost[m] for m, o in enumerate(outputs) if o >= 0], dim=1)
    unlabelled_cost = min(weight * cost[m] for m, o in enumerate(outputs) if o < 0)
    scores = sorted((labelled.max(dim=1).values + unlabelled_cost).tolist())
    count = round(share * len(scores))
    if count == 0:
        return min(0.0, scores[0] - 1e-6)
    if count == len(scores):
        return max(1.0, scores[-1] + 1e-6)
    return (scores[count - 1] + scores[count]) / 2
