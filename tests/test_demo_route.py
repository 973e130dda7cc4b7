"""Issue 3's acceptance on the full demo zoo: one joint merge + route search gives a front whose
cheapest point costs about one model, whose best point matches or beats the best source model (base
or expert) on every task, and that dominates every source model."""

from __future__ import annotations

import pytest

from evomerge.config import load_config
from evomerge.pareto import dominates
from evomerge.run_dir import RunDir
from evomerge.search import search
from evomerge.zoo import SKILLS, build_zoo

from conftest import REPO

pytestmark = pytest.mark.slow


def test_demo_route_front(tmp_path, ray_cluster) -> None:
    zoo = build_zoo(tmp_path / "zoo")
    routers = tmp_path / "zoo" / "routers"
    experts = [str(zoo[s]) for s in SKILLS]
    config = load_config(REPO / "search_spaces" / "demo_route.yaml", [
        f"models.base={zoo['base']}", f"models.experts={experts}",
        f"policy.scorers={[str(routers / name) for name in ('mix', *SKILLS)]}",
    ])
    summary = search(config, tmp_path / "run")
    records = {r["trial"]: r for r in RunDir.open(tmp_path / "run").records()}
    sources = [r for r in records.values() if r.get("label") in ("base", *(f"expert:{i}" for i in range(3)))]
    front = [records[e["trial"]] for e in summary["pareto"]]
    one_model = min(r["flops"] for r in sources)

    cheapest = min(front, key=lambda r: r["flops"])
    assert cheapest["flops"] <= 1.02 * one_model
    best = max(front, key=lambda r: r["quality"])
    assert len(sources) == 1 + len(SKILLS)
    for skill in SKILLS:  # the best point matches or beats the best source model (base or expert) on every task
        task = f"demo_{skill}"
        top = max(sources, key=lambda r: r["metrics"][task])
        assert best["metrics"][task] >= top["metrics"][task], (task, top["label"], top["metrics"][task])
    for source in sources:
        assert any(dominates((r["quality"], r["flops"]), (source["quality"], source["flops"])) for r in front)
