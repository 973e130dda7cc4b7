"""The model card's text from a journal (no models): metadata parsed by huggingface_hub, scores, front."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from evomerge.report import summarize

from fakes import make_config


def record(trial: int, quality: float, flops: float, label: str | None = None, policy: dict | None = None) -> dict:
    recipe = {"method": "task_arithmetic", "granularity": "layer", "num_layers": 2,
              "params": {"layer.0": {"weight": [0.5, 1.0]}, "layer.1": {"weight": [1.5, 0.0]},
                         "embed_head": {"weight": [1.0, 1.0]}}}
    if policy is not None:
        recipe["policy"] = policy
    return {"trial": trial, "generation": 0, "label": label, "state": "complete", "quality": quality,
            "metrics": {"t": quality}, "flops": flops, "recipe": recipe, "genome": None, "served": {}}


@pytest.mark.parametrize("routed", [False, True])
def test_the_card_parses_and_holds_the_scores_and_the_front(routed: bool) -> None:
    from evomerge.model_card import card_text

    config = make_config()
    policy = {"kind": "prefix_router", "members": ["merged", "expert:0"], "params": {"k": 2}} if routed else None
    records = [record(0, 0.2, 1e6, "base"), record(1, 0.4, 1e6, "expert:0"), record(2, 0.3, 1e6, "expert:1"),
               record(3, 0.35, 1e6, "uniform"), record(4, 0.7, 1.2e6, policy=policy), record(5, 0.6, 1.3e6)]
    summary = summarize(records, config)
    card = ModelCard(card_text(config, records[4], summary, True, "my-merge", Path("runs/x")))
    assert card.data.base_model == ["b", "e0", "e1"] and card.data.base_model_relation == "merge"
    assert card.data.tags[:3] == ["merge", "evomerge", "task_arithmetic"]
    assert ("prefix-router" in card.data.tags) == routed
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert "| **this model** (evolved) | 4 | 0.7000 | 1.2e+06 | 0.7000 |" in card.text
    for r in records[:4]:  # every reference beside it
        assert f"| {r['label']} | {r['trial']} | {r['quality']:.4f} |" in card.text
    assert "| 4 (this model) | 0.7000 |" in card.text and "![quality vs FLOPs](pareto.png)" in card.text
    assert "| weight | expert:0 | 1 | 0.5 | 1.5 |" in card.text  # mean, min, max over the groups
    assert "evomerge export runs/x --trial 4 --out my-merge --verify" in card.text
    assert ("policies.load" in card.text) == routed and ("AutoModelForCausalLM" in card.text) != routed


def test_the_card_shows_standard_errors_where_the_journal_has_them() -> None:
    from evomerge.model_card import card_text

    config = make_config()
    records = [record(0, 0.2, 1e6, "base"), record(1, 0.5, 1e6)]
    records[1]["stderr"] = {"t": 0.05, "quality": 0.05}
    card = ModelCard(card_text(config, records[1], summarize(records, config), False, "m", Path("runs/x")))
    assert "| **this model** (evolved) | 1 | 0.5000 ± 0.0500 | 1e+06 | 0.5000 ± 0.0500 |" in card.text
    assert "| base | 0 | 0.2000 | 1e+06 | 0.2000 |" in card.text  # none journaled: none shown
