"""The shipped demo zoo: built by `evomerge zoo` with today's recipe, installed by `evomerge demo`,
and its models score what its zoo.json recorded when it was built."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from evomerge.zoo import demo as Z
from evomerge.zoo.shipped import MODELS, SHIPPED, install_shipped_zoo

META = json.loads((SHIPPED / "zoo.json").read_text()) if (SHIPPED / "zoo.json").is_file() else None
needs_shipped = pytest.mark.skipif(META is None, reason="no shipped zoo in this checkout")


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@needs_shipped
def test_the_shipped_zoo_was_built_with_todays_recipe() -> None:
    """A change to the zoo's recipe, seed or evaluation data fails here until the zoo is rebuilt and shipped
    again (`evomerge zoo runs/zoo && python -m evomerge.zoo.shipped runs/zoo`)."""
    assert META["quick"] is False and META["seed"] == 0
    assert META["recipe"] == asdict(Z.FULL_RECIPE)
    assert META["eval_seed"] == Z.EVAL_SEED and META["skills"] == list(Z.SKILLS)
    assert META["routers"] == {name: f"routers/{name}" for name in ("mix", *Z.SKILLS)}
    tokenizer = json.loads((SHIPPED / "base" / "tokenizer.json").read_text())
    assert tokenizer["model"]["vocab"] == Z.make_tokenizer().get_vocab()


@needs_shipped
def test_demo_installs_the_shipped_zoo(tmp_path: Path) -> None:
    paths = install_shipped_zoo(tmp_path / "zoo")
    assert set(paths) == set(MODELS)
    for name in [*MODELS, "routers"]:
        assert digest(tmp_path / "zoo" / name) == digest(SHIPPED / name)
    meta = json.loads((tmp_path / "zoo" / "zoo.json").read_text())
    assert meta["routers"]["mix"] == str(tmp_path / "zoo" / "routers" / "mix") and meta["shipped"] is True


@needs_shipped
@pytest.mark.slow
def test_the_shipped_models_score_as_recorded() -> None:
    """Each shipped source scores on the held-out examples what the build measured (greedy exact match,
    as lm-eval's generate_until computes it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    limit = META["recipe"]["score_limit"]
    for name in MODELS:
        model = AutoModelForCausalLM.from_pretrained(SHIPPED / name).eval()
        tokenizer = AutoTokenizer.from_pretrained(SHIPPED / name)
        assert Z._scores(model, tokenizer, limit) == pytest.approx(META["scores"][name], abs=1e-9), name


def test_ship_then_install_round_trip(tmp_path: Path, monkeypatch) -> None:
    """`python -m evomerge.zoo.shipped BUILT` copies a full build (router paths made relative) and
    `install_shipped_zoo` puts it back file for file (router paths absolute again); a quick build
    is refused."""
    import evomerge.zoo.shipped as shipped

    built = tmp_path / "built"
    names = [*MODELS, *(f"routers/{r}" for r in ("mix", *Z.SKILLS))]
    for i, name in enumerate(names):
        (built / name).mkdir(parents=True)
        (built / name / "model.safetensors").write_bytes(bytes([i]) * 64)
    routers = {r: str(built / "routers" / r) for r in ("mix", *Z.SKILLS)}
    (built / "zoo.json").write_text(json.dumps({"quick": True, "routers": routers}))
    monkeypatch.setattr(shipped, "SHIPPED", tmp_path / "shipped")
    with pytest.raises(ValueError, match="quick"):
        shipped.ship(built)
    (built / "zoo.json").write_text(json.dumps({"quick": False, "routers": routers}))
    shipped.ship(built)
    assert json.loads((tmp_path / "shipped" / "zoo.json").read_text())["routers"]["mix"] == "routers/mix"
    shipped.install_shipped_zoo(tmp_path / "runs" / "zoo")
    for name in [*MODELS, "routers"]:
        assert digest(tmp_path / "runs" / "zoo" / name) == digest(built / name)
    meta = json.loads((tmp_path / "runs" / "zoo" / "zoo.json").read_text())
    assert meta["routers"]["sort"] == str(tmp_path / "runs" / "zoo" / "routers" / "sort") and meta["shipped"]
