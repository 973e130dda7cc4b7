"""Shared fixtures: offline environment, one quick demo zoo and one local Ray cluster per session."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import pytest
import yaml

_CACHE = Path(tempfile.gettempdir()) / f"evomerge-test-cache-{os.getuid()}"
for key, value in {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    "HF_HOME": str(_CACHE / "hf"), "MPLCONFIGDIR": str(_CACHE / "mpl"),
    "TORCHINDUCTOR_CACHE_DIR": str(_CACHE / "inductor"), "EVOMERGE_CACHE": str(_CACHE / "evomerge"),
    "RAY_AUTH_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)

REPO = Path(__file__).resolve().parents[1]
DEMO_TASKS = REPO / "evals" / "demo"


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """The demo zoo in quick mode: real tokenizer, base and experts, trained for few steps."""
    from evomerge.zoo import build_zoo

    return {name: Path(path) for name, path in build_zoo(tmp_path_factory.mktemp("zoo"), quick=True).items()}


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session (start/stop costs seconds); pools join it and leave it up."""
    import ray

    from evomerge.config import WorkersConfig
    from evomerge.workers import start_ray

    start_ray(WorkersConfig(count=2, cpus_per_worker=1))
    yield
    ray.shutdown()


def expert_names(zoo: dict[str, Path]) -> list[str]:
    return [name for name in zoo if name != "base"]


def write_config(folder: Path, zoo: dict[str, Path], **sections) -> Path:
    """A small search config over the quick zoo and the shipped demo tasks."""
    from evomerge.zoo import SKILLS

    raw = {
        "name": "test", "seed": 0,
        "models": {"base": str(zoo["base"]), "experts": [str(zoo[n]) for n in expert_names(zoo)],
                   "device": "cpu"},
        "merge": {"method": "task_arithmetic", "granularity": "block:2"},
        "eval": {"include_path": str(DEMO_TASKS),
                 "tasks": [{"name": name, "metric": "exact_match"} for name in [f"demo_{skill}" for skill in SKILLS]],
                 "limit": 16, "batch_size": 16},
        "search": {"strategy": "cma", "population": 4, "generations": 2},
        "workers": {"count": 2, "cpus_per_worker": 1},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(raw.get(section), dict):
            raw[section].update(values)
        else:
            raw[section] = values
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def says(field: str, *facts: str) -> str:
    """A regex for a config error naming `field` (`field: ...`) and each of `facts` (an allowed value,
    a bound) as a whole word within that problem (up to the next `; `), in any order and wording:
    tests pin the facts, not pydantic's sentences."""
    return re.escape(field) + ": " + "".join(rf"(?=[^;]*(?<![\w.]){re.escape(fact)}(?![\w.]))" for fact in facts)
