"""Config loading: every error at once, by field name, with the allowed values."""

from pathlib import Path

import pytest
import yaml

from evomerge.config import load_config, validate
from evomerge.errors import ConfigError


def write_models(root: Path, *names: str) -> None:
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text("{}")


def good_raw() -> dict:
    return {
        "name": "t", "seed": 1,
        "models": {"base": "zoo/base", "experts": ["zoo/a", "zoo/b"]},
        "merge": {"method": "ties", "granularity": "block:2", "bounds": {"weight": [0.0, 1.0]}},
        "eval": {"include_path": "tasks", "tasks": [{"name": "x", "metric": "acc"}], "limit": 10},
        "search": {"strategy": "cma", "population": 4, "generations": 2},
        "workers": {"count": 1},
    }


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    write_models(tmp_path, "zoo/base", "zoo/a", "zoo/b")
    (tmp_path / "tasks").mkdir()
    return tmp_path


def test_relative_paths_resolve_against_the_config_folder(config_dir: Path, monkeypatch) -> None:
    path = config_dir / "c.yaml"
    path.write_text(yaml.safe_dump(good_raw()))
    monkeypatch.chdir("/")
    config = load_config(path)
    assert config.models.base == str(config_dir / "zoo/base")
    assert config.models.experts == [str(config_dir / "zoo/a"), str(config_dir / "zoo/b")]
    assert config.eval.include_path == [str(config_dir / "tasks")]
    assert config.merge.bound("weight") == (0.0, 1.0) and config.merge.bound("density") == (0.1, 1.0)
    assert config.merge.granularity == "block:2"


def test_overrides_apply_before_validation(config_dir: Path) -> None:
    path = config_dir / "c.yaml"
    path.write_text(yaml.safe_dump(good_raw()))
    config = load_config(path, ["search.generations=7", "eval.limit=null"])
    assert config.search.generations == 7 and config.eval.limit is None
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["search.generations"])


def test_several_wrong_fields_are_reported_together() -> None:
    raw = good_raw()
    raw["merge"]["method"] = "average"
    raw["search"]["population"] = 1
    raw["workers"]["cuont"] = 2
    raw["eval"]["tasks"] = []
    with pytest.raises(ConfigError) as info:
        validate(raw, source="c.yaml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("c.yaml: 4 error(s)")
    assert "merge.method" in message and "task_arithmetic" in message  # the allowed values
    assert "search.population" in message
    assert "workers.cuont: unknown key; expected one of: count, cpus_per_worker" in message
    assert "eval.tasks" in message


@pytest.mark.parametrize("granularity, ok", [("layer", True), ("global", True), ("block:3", True),
                                             ("block:0", False), ("blocks", False)])
def test_granularity(granularity: str, ok: bool) -> None:
    raw = good_raw()
    raw["merge"]["granularity"] = granularity
    if ok:
        assert validate(raw).merge.granularity == granularity
    else:
        with pytest.raises(ConfigError, match="merge.granularity: expected one of: global, layer, block:N"):
            validate(raw)


@pytest.mark.parametrize("bounds, message", [({"weight": [1.0, 0.5]}, "finite low < high"),
                                             ({"density": [0.0, 1.0]}, "density: expected low > 0"),
                                             ({"t": [0.0, 2.0]}, "within \\[0, 1\\]"),
                                             ({"lambda": [0, 1]}, "merge.bounds.lambda")])
def test_bad_bounds(bounds: dict, message: str) -> None:
    raw = good_raw()
    raw["merge"]["bounds"] = bounds
    with pytest.raises(ConfigError, match=message):
        validate(raw)


def test_slerp_needs_exactly_one_expert() -> None:
    raw = good_raw()
    raw["merge"]["method"] = "slerp"
    with pytest.raises(ConfigError, match=r"merge.method: slerp merges exactly 1 expert\(s\) \(got 2 experts\)"):
        validate(raw)


def test_missing_model_folder_names_the_field(config_dir: Path) -> None:
    raw = good_raw()
    raw["models"]["experts"] = ["zoo/a", "./zoo/missing"]
    path = config_dir / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="models.experts.1: no such model folder .*zoo/missing"):
        load_config(path)


def test_hugging_face_ids_pass_through(config_dir: Path) -> None:
    raw = good_raw()
    raw["models"]["base"] = "org/some-model"
    path = config_dir / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_config(path).models.base == "org/some-model"


def test_file_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ConfigError, match="expected a YAML mapping"):
        load_config(scalar)


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(evil)


def test_shipped_configs_validate() -> None:
    root = Path(__file__).resolve().parents[1] / "search_spaces"
    configs = sorted(root.glob("*.yaml"))
    assert configs, "search_spaces/ ships no config"
    for path in configs:
        raw = yaml.safe_load(path.read_text())
        validate(raw, source=str(path))  # path existence needs the zoo; the schema must hold


@pytest.mark.parametrize("policy, message", [
    ({"kind": "blend", "members": ["merged"]}, "needs two or more members"),
    ({"kind": "none", "members": ["merged", "base"]}, "kind none serves the merged model alone"),
    ({"kind": "cascade", "members": ["merged", "expert:7"]}, "expert:7 but there are 2 experts"),
    ({"kind": "cascade", "members": ["merged", "teacher"]}, "expected merged, base or expert:I"),
    ({"kind": "router"}, "policy.kind"),
])
def test_bad_policies(policy: dict, message: str) -> None:
    raw = good_raw()
    raw["policy"] = policy
    with pytest.raises(ConfigError, match=message):
        validate(raw)
