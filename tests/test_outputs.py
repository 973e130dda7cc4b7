"""What commands leave behind: folders written whole or not at all, report tables that stay readable."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_search_loop import start

from evomerge.cli import _scaled_path
from evomerge.export import staged
from evomerge.report import format_text, summarize
from evomerge.run_dir import RunDir
from evomerge.search import run_loop

from fakes import FakePool, make_config


def test_a_staged_folder_is_moved_into_place_whole(tmp_path: Path) -> None:
    out = tmp_path / "model"
    with staged(out) as staging:
        (staging / "a.txt").write_text("a")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "a" and list(tmp_path.iterdir()) == [out]
    with staged(out) as staging:  # --force into an existing folder: file by file, others kept
        (staging / "b.txt").write_text("b")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "b.txt"] and list(tmp_path.iterdir()) == [out]


def test_a_failed_write_leaves_neither_the_folder_nor_its_staging(tmp_path: Path) -> None:
    out = tmp_path / "model"
    with pytest.raises(ValueError, match="boom"):
        with staged(out) as staging:
            (staging / "half.safetensors").write_bytes(b"\0" * 10)
            raise ValueError("boom")
    assert list(tmp_path.iterdir()) == []


def test_report_columns_stay_apart_for_wide_values(tmp_path: Path) -> None:
    """Qualities of thousands (negated perplexities) and long task names keep a space between columns."""
    config = make_config(generations=1)
    run, layout = start(tmp_path, config)
    run_loop(run, config, layout, FakePool())
    records = [{**r, "quality": r["quality"] - 5000.0, "metrics": {"t": r["quality"] * 12345.0}}
               if r["state"] == "complete" else r for r in RunDir.open(run.path).records()]
    text = format_text(summarize(records, config))
    rows = [line for line in text.splitlines() if line.startswith(("uniform", "best evolved"))]
    assert rows
    for line in rows:
        fields = line[22:].split()
        assert len(fields) == 4 and float(fields[1]) < -4000, line  # trial, quality, FLOPs, metric t
    generation_rows = [line.split() for line in text.splitlines() if line.strip().startswith(("0 ", "1 "))]
    assert generation_rows and all(len(row) == 7 for row in generation_rows)  # ..., best so far, best source


@pytest.mark.parametrize("recipe, scaled", [
    ({"method": "linear"}, False),
    ({"dataflow": {"models": ["a"], "path": [[0, 0, 1.0], [0, 1, 1.0]]}}, False),
    ({"dataflow": {"models": ["a"], "path": [[0, 0, 1.0], [0, 1, 0.8]]}}, True),
])
def test_verify_explains_a_scaled_layer_path(recipe, scaled) -> None:
    assert _scaled_path({"recipe": recipe}) is scaled
