"""Journal -> summary: best trial, reference points, per-generation progress; as JSON or a table."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from evomerge import samples
from evomerge.config import NO_POLICY, RunConfig
from evomerge.pareto import ParetoArchive, pareto_front
from evomerge.policies.cascade import Cascade
from evomerge.racing import agreement
from evomerge.trial import TrialState, best


def summarize(records: list[dict[str, Any]], config: RunConfig) -> dict[str, Any]:
    # With eval.subsample, candidates held back after the subset are PRUNED, with no full-limit
    # quality (evomerge/racing.py): they are counted, but never ranked or put on the front.
    everything, records = records, [r for r in records if r["state"] != TrialState.PRUNED.value]
    # Qualities compare only on the same documents: trials scored on another sample (an eval.limit
    # changed with --force) are counted, never ranked (evomerge/samples.py).
    records, elsewhere = samples.comparable(records)
    by_id = {r["trial"]: r for r in records}
    best_overall, best_evolved = best(records), best([r for r in records if r["label"] is None])
    best_reference = best([r for r in records if r["label"] is not None])
    references = [_brief(r) for r in sorted(records, key=lambda r: r["trial"]) if r["label"] is not None]
    generations = []
    best_so_far = best_source = None
    # Reference point of the hypervolume: (worst quality seen, 1.1 x largest FLOPs seen); both
    # only move towards worse values as trials arrive, so the hypervolume never decreases.
    archive = ParetoArchive(worst_quality=None)
    for generation in sorted({r["generation"] for r in everything}):
        members = [r for r in records if r["generation"] == generation]
        sources = [r["quality"] for r in members if r["state"] == "complete" and r["label"] is not None]
        if sources:
            best_source = max(sources) if best_source is None else max(best_source, max(sources))
        everyone = [r for r in everything if r["generation"] == generation]
        scored = [r["quality"] for r in members if r["state"] == "complete" and r["label"] is None]
        if scored:
            best_so_far = max(scored) if best_so_far is None else max(best_so_far, max(scored))
        for r in sorted(members, key=lambda r: r["trial"]):
            if r["state"] == "complete" and r.get("flops") is not None:
                archive.add(r["trial"], r["quality"], r["flops"])
        generations.append({
            "generation": generation,
            "trials": len(everyone),
            "failed": sum(r["state"] == "failed" for r in everyone),
            "best_quality": max(scored) if scored else None,
            "mean_quality": sum(scored) / len(scored) if scored else None,
            "best_so_far": best_so_far,
            "best_reference": best_source,  # the best reference (source or uniform merge) so far
            "hypervolume": archive.hypervolume() if len(archive) else None,
        })
        if len(everyone) > len(members):
            generations[-1]["subset_only"] = len(everyone) - len(members)
    summary = {
        "name": config.name,
        "trials": len(everything),
        "failed": sum(r["state"] == "failed" for r in everything),
        "tasks": [task.name for task in config.eval.tasks],
        "best": _brief(best_overall) if best_overall else None,
        "best_evolved": _brief(best_evolved) if best_evolved else None,
        "best_reference": _brief(best_reference) if best_reference else None,
        "weights": {task.name: task.weight for task in config.eval.tasks},
        "sample": _sample(records),
        "significance": significance(best_evolved, best_reference, config),
        "references": references,
        "generations": generations,
        "pareto": [_front_entry(by_id[e.trial_id]) for e in archive.front()],
        "hypervolume": archive.hypervolume() if len(archive) else None,
        "failures": [{"trial": r["trial"], "error": r["error"]} for r in everything if r["state"] == "failed"],
    }
    if len(everything) > len(records) + len(elsewhere):
        summary["subset_only"] = len(everything) - len(records) - len(elsewhere)
    if elsewhere:
        summary["other_sample"] = {"trials": len(elsewhere),
                                   "limits": sorted({str((r.get("sample") or {}).get("limit")) for r in elsewhere})}
    if config.eval.subsample is not None:
        summary["subsample"] = agreement(records)
    if config.eval.estimate is not None:
        from evomerge import estimate

        summary["estimate"] = estimate.agreement(records)
    if config.policy.kind == Cascade.kind and len(config.policy.members) == 2:
        summary["routellm"] = cascade_gap(records, *config.policy.members)
    return summary


def significance(evolved: dict[str, Any] | None, reference: dict[str, Any] | None,
                 config: RunConfig) -> dict[str, Any]:
    """The paired test of the best evolved trial against the best reference (evomerge/samples.py),
    or {"reason"} when it cannot be made."""
    if evolved is None or reference is None:
        return {"reason": "no complete " + ("evolved" if evolved is None else "reference") + " trial"}
    weights = {task.name: task.weight for task in config.eval.tasks}
    directions = (evolved.get("sample") or {}).get("higher_is_better") or {}
    signs = {name: 1.0 if directions.get(name, True) else -1.0 for name in weights}
    test = samples.paired_test(evolved, reference, weights, signs)
    return test if test is not None else {"reason": "no per-document results for both on the same documents "
                                                    "(a perplexity task, or a journal older than this evomerge)"}


def _sample(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    key = samples.current_key(records)
    return next(({k: v for k, v in r["sample"].items() if k != "higher_is_better"}
                 for r in records if samples.key(r) == key and key != samples.LEGACY), None)


def cascade_gap(records: list[dict[str, Any]], weak: str, strong: str) -> dict[str, Any]:
    """RouteLLM's APGR and CPT(50%) of a two-member cascade (weak answers, escalates to strong).

    The weak and strong qualities are those of the members alone: their reference trials (a
    source's reference label is its member name). Every complete cascade trial is a point (share
    of requests the strong member served, quality); see `gap_curve`, `apgr`, `cpt` and
    docs/design.md. A null APGR comes with the reason.
    """
    result: dict[str, Any] = {"weak": weak, "strong": strong, "apgr": None, "cpt50": None}
    if "merged" in (weak, strong):
        return {**result, "reason": "the merged member changes with every trial: no fixed weak/strong quality"}
    alone = {r["label"]: r["quality"] for r in records if r["label"] in (weak, strong) and r["state"] == "complete"}
    if len(alone) < 2:
        missing = [m for m in (weak, strong) if m not in alone]
        return {**result, "reason": f"no complete reference trial for {', '.join(missing)}"}
    result.update(weak_quality=alone[weak], strong_quality=alone[strong])
    if alone[strong] <= alone[weak]:
        return {**result, "reason": f"{strong} ({alone[strong]:.4f}) does not score above {weak} ({alone[weak]:.4f})"}
    points = [(r["served"][strong], r["quality"]) for r in records
              if r["state"] == "complete" and (r["recipe"].get("policy") or {}).get("kind") == Cascade.kind
              and strong in r.get("served", {})]
    curve = gap_curve(points, alone[weak], alone[strong])
    return {**result, "apgr": apgr(curve, alone[weak], alone[strong]),
            "cpt50": cpt(curve, alone[weak], alone[strong], 0.5), "curve": [list(point) for point in curve]}


def gap_curve(points: list[tuple[float, float]], weak: float, strong: float) -> list[tuple[float, float]]:
    """Best quality for a share of strong calls: the front (share down, quality up) of the points
    plus (0, weak) and (1, strong) (the members alone), ascending in share; read between its
    points by linear interpolation (a random mix of the two neighbouring policies), flat after the last."""
    candidates = [(0.0, weak), (1.0, strong), *points]
    front = pareto_front(candidates, maximize=(False, True))
    return sorted({(float(candidates[i][0]), float(candidates[i][1])) for i in front})


def apgr(curve: list[tuple[float, float]], weak: float, strong: float) -> float:
    """Average performance gap recovered: the integral over share in [0, 1] of (Q(share) - weak) /
    (strong - weak), Q the piecewise-linear curve (exact trapezoids), flat after its last point."""
    shares, qualities = [c for c, _ in curve], [q for _, q in curve]
    area = sum((shares[i + 1] - shares[i]) * (qualities[i] + qualities[i + 1]) / 2 for i in range(len(curve) - 1))
    area += (1.0 - shares[-1]) * qualities[-1]
    return (area - weak) / (strong - weak)


def cpt(curve: list[tuple[float, float]], weak: float, strong: float, fraction: float) -> float:
    """Call-performance threshold: the least share of strong calls at which the curve reaches
    weak + fraction * (strong - weak). The curve ends at or above strong, so it always does."""
    target = weak + fraction * (strong - weak)
    if curve[0][1] >= target:
        return curve[0][0]
    for (c0, q0), (c1, q1) in zip(curve, curve[1:]):
        if q1 >= target:
            return c0 + (c1 - c0) * (target - q0) / (q1 - q0)
    raise ValueError(f"the curve never reaches {target}")  # unreachable: (1, strong) is on or under it


def _front_entry(record: dict[str, Any]) -> dict[str, Any]:
    return {"trial": record["trial"], "label": record["label"], "quality": record["quality"],
            "flops": record["flops"], "served": record.get("served", {}),
            "stderr": (record.get("stderr") or {}).get("quality"),
            "policy": record["recipe"].get("policy")}


def _brief(record: dict[str, Any]) -> dict[str, Any]:
    return {"trial": record["trial"], "label": record["label"], "generation": record["generation"],
            "state": record["state"], "quality": record.get("quality"), "metrics": record.get("metrics", {}),
            "flops": record.get("flops"), "recipe": record["recipe"], "error": record.get("error"),
            "stderr": record.get("stderr") or {}}


def format_text(summary: dict[str, Any]) -> str:
    tasks = summary["tasks"]
    lines = [f"run {summary['name']}: {summary['trials']} trials, {summary['failed']} failed"]
    if summary.get("subset_only"):
        lines.append(f"{summary['subset_only']} candidates scored on eval.subsample's subset or eval.estimate's "
                     f"anchors only "
                     f"(not promoted): left out of best, means and the Pareto front")
    if summary.get("subsample"):
        lines.append(subset_agreement_line(summary["subsample"]))
    if summary.get("estimate"):
        lines.append(agreement_line(summary["estimate"], "estimate", "raise eval.estimate.anchors"))
    lines += sample_lines(summary)
    lines.append("")
    # one space before every column, so that wide values (a perplexity in the thousands) stay apart
    header = (f"{'':<22}{'trial':>6} {'quality':>9} {'± s.e.':>7} {'FLOPs/ex':>10}"
              + "".join(f" {t[:16]:>16}" for t in tasks))
    lines.append(header)
    rows = [(r["label"], r) for r in summary["references"]]
    if summary["best_evolved"]:
        rows.append(("best evolved", summary["best_evolved"]))
    for name, row in rows:
        if row["state"] != "complete":
            lines.append(f"{name:<22}{row['trial']:>6}   FAILED  {row['error']}")
            continue
        flops = "-" if row.get("flops") is None else f"{row['flops']:.{flops_digits(summary)}g}"
        errors = row.get("stderr") or {}
        lines.append(f"{name:<22}{row['trial']:>6} {row['quality']:>9.4f} {_se(errors.get('quality')):>7} {flops:>10}"
                     + "".join(f" {pm(row['metrics'].get(t, float('nan')), errors.get(t)):>16}" for t in tasks))
    lines.append(samples.significance_line(summary.get("significance") if "delta" in (summary.get("significance")
                                                                                 or {}) else None,
                                           (summary.get("significance") or {}).get("reason", "")))
    lines += ["", f"{'generation':>10} {'trials':>7} {'failed':>7} {'best':>9} {'mean':>9} {'best so far':>12}"
                  f" {'best source':>12}"]
    for g in summary["generations"]:
        lines.append(f"{g['generation']:>10} {g['trials']:>7} {g['failed']:>7} {_num(g['best_quality']):>9}"
                     f" {_num(g['mean_quality']):>9} {_num(g['best_so_far']):>12}"
                     f" {_num(g.get('best_reference')):>12}")
    if summary["pareto"]:
        lines += ["", f"Pareto front (quality up, FLOPs per example down), hypervolume {summary['hypervolume']:.4g}:"]
        points: dict[tuple[float, float], list[int]] = {}  # trials with the same point shown once
        for e in summary["pareto"]:
            points.setdefault((e["quality"], e["flops"]), []).append(e["trial"])
        for (value, flops), trials in points.items():
            same = f"  (+{len(trials) - 1} trials at the same point)" if len(trials) > 1 else ""
            shown = f"{flops:.{flops_digits(summary)}g}"
            lines.append(f"  trial {trials[0]:>4}  quality {value:.4f}  FLOPs/ex {shown}{same}")
    gap = summary.get("routellm")
    if gap is not None:
        lines += ["", f"cascade {gap['weak']} -> {gap['strong']}: " + (
            f"APGR {gap['apgr']:.3f}, CPT(50%) {gap['cpt50']:.3f} of requests to {gap['strong']}"
            if gap["apgr"] is not None else f"no APGR ({gap['reason']})")]
    for failure in summary["failures"]:
        lines.append(f"trial {failure['trial']} FAILED: {failure['error']}")
    return "\n".join(lines)


def agreement_line(found: dict[str, Any], cheap: str, advice: str) -> str:
    """One line on how alike a cheap score (`cheap`: the subset, the anchors' estimate) and the full
    limit ranked the promoted candidates; `advice`: what to raise when the agreement is low."""
    if found["spearman"] is None:
        return (f"{cheap} vs full limit: {found['pairs']} promoted candidates scored on both, "
                f"too few (or all equal) for a rank correlation")
    more = (f", Kendall {found['kendall']:.2f}, mean absolute error {found['mae']:.4f}"
            if found.get("kendall") is not None else "")
    return (f"{cheap} vs full limit: Spearman {found['spearman']:.2f}{more} over the {found['pairs']} promoted "
            f"candidates scored on both (low: {advice})")


def subset_agreement_line(agreement: dict[str, Any]) -> str:
    return agreement_line(agreement, "subset", "the subset is too small to rank them; raise eval.subsample.fraction")


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def format_markdown(summary: dict[str, Any], plots: list[str] = ()) -> str:
    """The summary as a Markdown page (`report.md` in the run directory): sources and best trial per
    task, progress per generation, the Pareto front, RouteLLM's metrics for a cascade, failures."""
    tasks = summary["tasks"]
    lines = [f"# Run `{summary['name']}`", "",
             f"{summary['trials']} trials, {summary['failed']} failed"
             + (f", {summary['subset_only']} scored on the subset only" if summary.get("subset_only") else "") + "."
             + (" " + _sentence(subset_agreement_line(summary["subsample"])) if summary.get("subsample") else ""),
             "", *sample_lines(summary),
             "", "Task weights (quality is their weighted mean): "
             + ", ".join(f"{t} {w:g}" for t, w in (summary.get("weights") or {}).items()) + ".",
             "", "| | trial | quality ± s.e. | FLOPs / example | " + " | ".join(tasks) + " |",
             "|---|---|---|---|" + "---|" * len(tasks)]
    rows = [(r["label"], r) for r in summary["references"]]
    if summary["best_evolved"]:
        rows.append(("**best evolved**", summary["best_evolved"]))
    for name, row in rows:
        if row["state"] != "complete":
            lines.append(f"| {name} | {row['trial']} | failed: {row['error']} | | "
                         + " | ".join("" for _ in tasks) + " |")
            continue
        flops = "-" if row.get("flops") is None else f"{row['flops']:.{flops_digits(summary)}g}"
        errors = row.get("stderr") or {}
        lines.append(f"| {name} | {row['trial']} | {pm(row['quality'], errors.get('quality'))} | {flops} | "
                     + " | ".join(pm(row['metrics'].get(t, float('nan')), errors.get(t)) for t in tasks) + " |")
    test = summary.get("significance") or {}
    lines += ["", samples.significance_line(test if "delta" in test else None, test.get("reason", ""))]
    lines += ["", "## Generations", "",
              "| generation | trials | failed | best | mean | best so far | best source | hypervolume |",
              "|---|---|---|---|---|---|---|---|"]
    for g in summary["generations"]:
        volume = "-" if g["hypervolume"] is None else f"{g['hypervolume']:.4g}"
        lines.append(f"| {g['generation']} | {g['trials']} | {g['failed']} | {_num(g['best_quality'])} | "
                     f"{_num(g['mean_quality'])} | {_num(g['best_so_far'])} | {_num(g.get('best_reference'))} | "
                     f"{volume} |")
    if summary["pareto"]:
        lines += ["", "## Pareto front (quality vs forward FLOPs per example)", "",
                  "| trial | label | quality | FLOPs / example | policy | served |", "|---|---|---|---|---|---|"]
        for e in summary["pareto"]:
            policy = (e.get("policy") or {}).get("kind", NO_POLICY)
            served = ", ".join(f"{member} {share:.0%}" for member, share in (e.get("served") or {}).items())
            lines.append(f"| {e['trial']} | {e['label'] or ''} | {pm(e['quality'], e.get('stderr'))} | "
                         f"{e['flops']:.{flops_digits(summary)}g} | {policy} | {served} |")
    gap = summary.get("routellm")
    if gap is not None:
        lines += ["", "## Cascade (RouteLLM metrics)", "",
                  f"{gap['weak']} -> {gap['strong']}: " + (
                      f"APGR {gap['apgr']:.3f}, CPT(50%) {gap['cpt50']:.3f} of requests to {gap['strong']}."
                      if gap["apgr"] is not None else f"no APGR ({gap['reason']}).")]
    if summary["failures"]:
        lines += ["", "## Failed trials", ""] + [f"- trial {f['trial']}: {f['error']}" for f in summary["failures"]]
    if plots:
        lines += [""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _se(value: float | None) -> str:
    return "" if value is None else f"±{value:.4f}"


def pm(value: float, error: float | None) -> str:
    return f"{value:.4f}" if error is None else f"{value:.4f} ± {error:.4f}"


def sample_lines(summary: dict[str, Any]) -> list[str]:
    """What the compared trials were scored on, and how many were left out for another sample."""
    lines = []
    sample = summary.get("sample")
    if sample:
        lines.append(f"Compared on one sample: limit {sample['limit']}, documents "
                     + ", ".join(f"{t} {n}" for t, n in sample["documents"].items()) + f" (hash {sample['hash']}).")
    other = summary.get("other_sample")
    if other:
        lines.append(f"{other['trials']} trials scored on other documents (limit {', '.join(other['limits'])}) "
                     f"are left out of the best, the Pareto front and the hypervolume.")
    return lines


def flops_digits(summary: dict[str, Any]) -> int:
    """Significant digits that tell the FLOPs of the shown trials apart (3 when they differ a lot)."""
    values = sorted({e["flops"] for e in summary.get("pareto", [])}
                    | {r["flops"] for r in summary.get("references", []) if r.get("flops")})
    spread = min((b - a) / b for a, b in zip(values, values[1:])) if len(values) > 1 else 1.0
    return 3 if spread >= 1e-2 else min(8, 3 + math.ceil(-math.log10(max(spread, 1e-8))) - 1)


FLAT_COST = 0.03  # candidates whose FLOPs differ by less than this share cost the same: no front to draw


def flat_cost(records: list[dict[str, Any]]) -> bool:
    costs = [r["flops"] for r in records if r.get("flops")]
    return bool(costs) and (max(costs) - min(costs)) <= FLAT_COST * max(costs)


def draws_front(records: list[dict[str, Any]]) -> bool:
    """Whether pareto.png draws quality against FLOPs: costs that differ by more than FLAT_COST, or a
    routed run (its trials trade quality for what routing costs, however small)."""
    return not flat_cost(records) or any((r.get("recipe") or {}).get("policy") for r in records)


def plot(summary: dict[str, Any], records: list[dict[str, Any]], folder: Path) -> list[Path]:
    """Write pareto.png and progress.png into `folder`.

    pareto.png: quality vs FLOPs per example, the front and the references marked, with standard
    errors as error bars and trial ids on the front; when every candidate costs the same within
    FLAT_COST (a plain merge: the FLOPs differ only by answer length) a front would be noise, so
    it shows quality against trial id instead, unless the run routes (a policy's trials trade quality
    for what routing costs, however small: the front is what the search was for). progress.png: best
    quality so far per generation beside the best source, and the hypervolume."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in samples.ranked(records)
            if r["state"] == TrialState.COMPLETE.value and r.get("flops") is not None]
    flat = not draws_front(done)
    x_of = (lambda r: r["trial"]) if flat else (lambda r: r["flops"])
    se = lambda r: (r.get("stderr") or {}).get("quality")  # noqa: E731
    colours = plt.get_cmap("tab10").colors
    figure, axes = plt.subplots(figsize=(6.5, 4.5))
    axes.scatter([x_of(r) for r in done], [r["quality"] for r in done], s=12, c="0.7", label="trials")
    by_id = {r["trial"]: r for r in done}
    front = [by_id[e["trial"]] for e in sorted(summary["pareto"], key=lambda e: e["flops"]) if e["trial"] in by_id]
    front_colour = colours[3]
    if flat:
        top = summary.get("best_evolved")
        if top and top["trial"] in by_id:
            row = by_id[top["trial"]]
            axes.errorbar([row["trial"]], [row["quality"]], yerr=[se(row) or 0], fmt="*", ms=12, c=front_colour,
                          capsize=3, label=f"best evolved (trial {row['trial']})")
        axes.set_xlabel("trial (every candidate costs the same within "
                        f"{FLAT_COST:.0%}: no quality/cost front)")
    else:
        axes.step([r["flops"] for r in front], [r["quality"] for r in front], where="post", c=front_colour)
        axes.errorbar([r["flops"] for r in front], [r["quality"] for r in front], yerr=[se(r) or 0 for r in front],
                      fmt="o", ms=5, c=front_colour, capsize=3, label="Pareto front (± s.e.)")
        for r in front:
            axes.annotate(str(r["trial"]), (r["flops"], r["quality"]), textcoords="offset points", xytext=(4, 4),
                          fontsize=7, color=front_colour)
        axes.set_xlabel("forward FLOPs per example")
    others = [c for i, c in enumerate(colours) if i not in (3, 7)]  # not the front's red, not grey
    for i, reference in enumerate(r for r in summary["references"] if r["trial"] in by_id):
        row = by_id[reference["trial"]]
        axes.errorbar([x_of(row)], [row["quality"]], yerr=[se(row) or 0], fmt="s", ms=6, capsize=3,
                      c=others[i % len(others)], label=f"{reference['label']} (trial {row['trial']})")
    axes.set_ylabel("quality")
    axes.set_title(f"{summary['name']}: " + ("quality per trial" if flat else "quality vs cost"))
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(folder / "pareto.png", dpi=120)
    plt.close(figure)

    generations = summary["generations"]
    figure, axes = plt.subplots(figsize=(6, 4))
    numbers = [g["generation"] for g in generations]
    axes.plot(numbers, [g["best_so_far"] for g in generations], "o-", c=colours[0], label="best evolved so far")
    if any(g.get("best_reference") is not None for g in generations):
        reference = summary.get("best_reference") or {}
        axes.plot(numbers, [g.get("best_reference") for g in generations], "^:", c=colours[2],
                  label=f"best source so far ({reference.get('label')})" if reference else "best source so far")
    best = summary.get("best_evolved")
    if best and best.get("quality") is not None and (best.get("stderr") or {}).get("quality") is not None:
        error = best["stderr"]["quality"]
        axes.axhspan(best["quality"] - error, best["quality"] + error, color=colours[0], alpha=0.12,
                     label="best evolved ± s.e.")
    axes.set_xlabel("generation")
    axes.set_ylabel("quality")
    if any(g["hypervolume"] is not None for g in generations) and not flat:
        twin = axes.twinx()
        twin.plot(numbers, [g["hypervolume"] for g in generations], "s--", c=colours[1], label="hypervolume")
        twin.set_ylabel("hypervolume (quality x FLOPs)")
        twin.legend(loc="lower right", fontsize=7)
    axes.legend(loc="upper left", fontsize=7)
    figure.tight_layout()
    figure.savefig(folder / "progress.png", dpi=120)
    plt.close(figure)
    return [folder / "pareto.png", folder / "progress.png"]
