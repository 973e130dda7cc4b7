"""The GPU paths (skipped without CUDA): a worker on one GPU, and a candidate spread over two
(`workers.gpus_per_worker: 2`), each scoring a recipe as the CPU worker does."""

from __future__ import annotations

import pytest
import torch

from evomerge.config import load_config
from evomerge.genome import Recipe
from evomerge.trial import Trial, TrialState
from evomerge.workers import CandidateRunner

from conftest import write_config

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def score(config, recipe: Recipe) -> tuple[float, CandidateRunner]:
    runner = CandidateRunner(config)
    result = runner.run(Trial(0, 0, recipe))
    assert result.state is TrialState.COMPLETE, result.error
    return result.quality, runner


@pytest.mark.parametrize("gpus", [1, 2])
def test_a_gpu_worker_scores_like_the_cpu_one(zoo, tmp_path, gpus) -> None:
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} CUDA device(s)")
    experts = len(zoo) - 1
    recipe = Recipe("ties", "global", 2, {"all": {"weight": [0.8] * experts, "density": [0.6] * experts}})
    cpu = load_config(write_config(tmp_path / "cpu", zoo, merge={"method": "ties", "granularity": "global"}))
    gpu = load_config(write_config(tmp_path / "gpu", zoo, merge={"method": "ties", "granularity": "global"},
                                   models={"device": "cuda"}, workers={"count": 1, "gpus_per_worker": gpus}))
    cpu_quality, _ = score(cpu, recipe)
    gpu_quality, runner = score(gpu, recipe)
    devices = {p.device for p in runner.model.parameters()}
    assert all(d.type == "cuda" for d in devices) and (gpus == 1 or len(devices) == 2)
    assert all(t.device == p.device for name, p in runner.model.named_parameters()
               for t in [runner.merger.base[name], *[e[name] for e in runner.merger.experts]])
    assert abs(gpu_quality - cpu_quality) <= 0.05  # greedy answers may flip on a near-tie in float math
