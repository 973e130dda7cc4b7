"""Journal -> summary: best trial, reference points, per-generation progress; as JSON or a table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomerge.config import NO_POLICY, RunConfig
from evomerge.pareto import ParetoArchive, pareto_front
from evomerge.policies.cascade import Cascade
from evomerge.racing import agreement
from evomerge.trial import TrialState, best


def summarize(records: list[dict[str, Any]], config: RunConfig) -> dict[str, Any]:
    # With eval.subsample, candidates held back after the subset are PRUNED, with no full-limit
    # quality (evomerge/racing.py): they are counted, but never ranked or put on the front.
    everything, records = records, [r for r in records if r["state"] != TrialState.PRUNED.value]
    by_id = {r["trial"]: r for r in records}
    best_overall, best_evolved = best(records), best([r for r in records if r["label"] is None])
    references = [_brief(r) for r in sorted(records, key=lambda r: r["trial"]) if r["label"] is not None]
    generations = []
    best_so_far = None
    # Reference point of the hypervolume: (worst quality seen, 1.1 x largest FLOPs seen); both
    # only move towards worse values as trials arrive, so the hypervolume never decreases.
    archive = ParetoArchive(worst_quality=None)
    for generation in sorted({r["generation"] for r in everything}):
        members = [r for r in records if r["generation"] == generation]
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
        "references": references,
        "generations": generations,
        "pareto": [_front_entry(by_id[e.trial_id]) for e in archive.front()],
        "hypervolume": archive.hypervolume() if len(archive) else None,
        "failures": [{"trial": r["trial"], "error": r["error"]} for r in everything if r["state"] == "failed"],
    }
    if len(everything) > len(records):
        summary["subset_only"] = len(everything) - len(records)
    if config.eval.subsample is not None:
        summary["subsample"] = agreement(records)
    if config.policy.kind == Cascade.kind and len(config.policy.members) == 2:
        summary["routellm"] = cascade_gap(records, *config.policy.members)
    return summary


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
            "policy": record["recipe"].get("policy")}


def _brief(record: dict[str, Any]) -> dict[str, Any]:
    return {"trial": record["trial"], "label": record["label"], "generation": record["generation"],
            "state": record["state"], "quality": record.get("quality"), "metrics": record.get("metrics", {}),
            "flops": record.get("flops"), "recipe": record["recipe"], "error": record.get("error")}


def format_text(summary: dict[str, Any]) -> str:
    tasks = summary["tasks"]
    lines = [f"run {summary['name']}: {summary['trials']} trials, {summary['failed']} failed"]
    if summary.get("subset_only"):
        lines.append(f"{summary['subset_only']} candidates scored on eval.subsample's subset only "
                     f"(not promoted): left out of best, means and the Pareto front")
    if summary.get("subsample"):
        lines.append(subset_agreement_line(summary["subsample"]))
    lines.append("")
    # one space before every column, so that wide values (a perplexity in the thousands) stay apart
    header = f"{'':<22}{'trial':>6} {'quality':>9} {'FLOPs/ex':>9}" + "".join(f" {t[:12]:>12}" for t in tasks)
    lines.append(header)
    rows = [(r["label"], r) for r in summary["references"]]
    if summary["best_evolved"]:
        rows.append(("best evolved", summary["best_evolved"]))
    for name, row in rows:
        if row["state"] != "complete":
            lines.append(f"{name:<22}{row['trial']:>6}   FAILED  {row['error']}")
            continue
        flops = "-" if row.get("flops") is None else f"{row['flops']:.3g}"
        lines.append(f"{name:<22}{row['trial']:>6} {row['quality']:>9.4f} {flops:>9}"
                     + "".join(f" {row['metrics'].get(t, float('nan')):>12.4f}" for t in tasks))
    lines += ["", f"{'generation':>10} {'trials':>7} {'failed':>7} {'best':>9} {'mean':>9} {'best so far':>12}"]
    for g in summary["generations"]:
        lines.append(f"{g['generation']:>10} {g['trials']:>7} {g['failed']:>7} {_num(g['best_quality']):>9}"
                     f" {_num(g['mean_quality']):>9} {_num(g['best_so_far']):>12}")
    if summary["pareto"]:
        lines += ["", f"Pareto front (quality up, FLOPs per example down), hypervolume {summary['hypervolume']:.4g}:"]
        points: dict[tuple[float, float], list[int]] = {}  # trials with the same point shown once
        for e in summary["pareto"]:
            points.setdefault((e["quality"], e["flops"]), []).append(e["trial"])
        for (value, flops), trials in points.items():
            same = f"  (+{len(trials) - 1} trials at the same point)" if len(trials) > 1 else ""
            lines.append(f"  trial {trials[0]:>4}  quality {value:.4f}  FLOPs/ex {flops:.5g}{same}")
    gap = summary.get("routellm")
    if gap is not None:
        lines += ["", f"cascade {gap['weak']} -> {gap['strong']}: " + (
            f"APGR {gap['apgr']:.3f}, CPT(50%) {gap['cpt50']:.3f} of requests to {gap['strong']}"
            if gap["apgr"] is not None else f"no APGR ({gap['reason']})")]
    for failure in summary["failures"]:
        lines.append(f"trial {failure['trial']} FAILED: {failure['error']}")
    return "\n".join(lines)


def subset_agreement_line(agreement: dict[str, Any]) -> str:
    """One line on how alike the subset and the full limit ranked the promoted candidates."""
    if agreement["spearman"] is None:
        return (f"subset vs full limit: {agreement['pairs']} promoted candidates scored on both, "
                f"too few (or all equal) for a rank correlation")
    return (f"subset vs full limit: Spearman {agreement['spearman']:.2f} over the {agreement['pairs']} promoted "
            f"candidates scored on both (low: the subset is too small to rank them; raise "
            f"eval.subsample.fraction)")


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
             "", "| | trial | quality | FLOPs / example | " + " | ".join(tasks) + " |",
             "|---|---|---|---|" + "---|" * len(tasks)]
    rows = [(r["label"], r) for r in summary["references"]]
    if summary["best_evolved"]:
        rows.append(("**best evolved**", summary["best_evolved"]))
    for name, row in rows:
        if row["state"] != "complete":
            lines.append(f"| {name} | {row['trial']} | failed: {row['error']} | | "
                         + " | ".join("" for _ in tasks) + " |")
            continue
        flops = "-" if row.get("flops") is None else f"{row['flops']:.4g}"
        lines.append(f"| {name} | {row['trial']} | {row['quality']:.4f} | {flops} | "
                     + " | ".join(f"{row['metrics'].get(t, float('nan')):.4f}" for t in tasks) + " |")
    lines += ["", "## Generations", "", "| generation | trials | failed | best | mean | best so far | hypervolume |",
              "|---|---|---|---|---|---|---|"]
    for g in summary["generations"]:
        volume = "-" if g["hypervolume"] is None else f"{g['hypervolume']:.4g}"
        lines.append(f"| {g['generation']} | {g['trials']} | {g['failed']} | {_num(g['best_quality'])} | "
                     f"{_num(g['mean_quality'])} | {_num(g['best_so_far'])} | {volume} |")
    if summary["pareto"]:
        lines += ["", "## Pareto front (quality vs forward FLOPs per example)", "",
                  "| trial | label | quality | FLOPs / example | policy | served |", "|---|---|---|---|---|---|"]
        for e in summary["pareto"]:
            policy = (e.get("policy") or {}).get("kind", NO_POLICY)
            served = ", ".join(f"{member} {share:.0%}" for member, share in (e.get("served") or {}).items())
            lines.append(f"| {e['trial']} | {e['label'] or ''} | {e['quality']:.4f} | {e['flops']:.5g} "
                         f"| {policy} | {served} |")
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


def plot(summary: dict[str, Any], records: list[dict[str, Any]], folder: Path) -> list[Path]:
    """Write pareto.png (quality vs FLOPs per example, front and references marked) and
    progress.png (best quality and hypervolume per generation) into `folder`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in records if r["state"] == TrialState.COMPLETE.value and r.get("flops") is not None]
    figure, axes = plt.subplots(figsize=(6, 4.5))
    axes.scatter([r["flops"] for r in done], [r["quality"] for r in done], s=12, c="0.7", label="trials")
    front = sorted(summary["pareto"], key=lambda e: e["flops"])
    axes.step([e["flops"] for e in front], [e["quality"] for e in front], where="post", c="C3")
    axes.scatter([e["flops"] for e in front], [e["quality"] for e in front], s=30, c="C3", label="Pareto front")
    for reference in summary["references"]:
        if reference["state"] == "complete" and reference.get("flops") is not None:
            axes.scatter(reference["flops"], reference["quality"], marker="s", s=40, label=reference["label"])
    axes.set_xlabel("forward FLOPs per example")
    axes.set_ylabel("quality")
    axes.set_title(f"{summary['name']}: quality vs cost")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(folder / "pareto.png", dpi=120)
    plt.close(figure)

    generations = summary["generations"]
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot([g["generation"] for g in generations], [g["best_so_far"] for g in generations], "o-",
              label="best quality so far")
    axes.set_xlabel("generation")
    axes.set_ylabel("quality")
    if any(g["hypervolume"] is not None for g in generations):
        twin = axes.twinx()
        twin.plot([g["generation"] for g in generations], [g["hypervolume"] for g in generations], "s--", c="C1",
                  label="hypervolume")
        twin.set_ylabel("hypervolume (quality x FLOPs)")
        twin.legend(loc="lower right", fontsize=7)
    axes.legend(loc="upper left", fontsize=7)
    figure.tight_layout()
    figure.savefig(folder / "progress.png", dpi=120)
    plt.close(figure)
    return [folder / "pareto.png", folder / "progress.png"]
