"""Hostile config input, generated: every malformed config is refused by `evomerge search` with exit
code 2 and one line on stderr naming the field (or the file), before a run directory exists.

Every case starts from BASE, a valid config, and breaks it in a way that is invalid by design (the
strategies below never produce a value the schema accepts). As a safety net `evomerge.search.search`
is replaced for this module: a config that slipped through fails the test instead of loading models
and starting Ray.
"""

from __future__ import annotations

import ast
import copy
import itertools
import math
import re
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from evomerge.cli import main
from evomerge.config import RunConfig, load_config

BASE: dict[str, Any] = {
    "name": "fuzz", "seed": 1,
    "models": {"base": "zoo/base", "experts": ["zoo/a", "zoo/b"], "dtype": "float32", "device": "cpu",
               "trust_remote_code": False},
    "merge": {"method": "ties", "granularity": "block:2", "bounds": {"weight": [0.0, 1.0], "density": [0.2, 1.0]}},
    "eval": {"include_path": ["tasks"],
             "tasks": [{"name": "x", "metric": "acc", "weight": 1.0, "filter": "none", "higher_is_better": True},
                       {"name": "y", "metric": "acc"}],
             "limit": 10, "batch_size": 4, "num_fewshot": 0},
    "search": {"strategy": "cma", "population": 4, "generations": 2, "sigma0": 0.2, "x0": 0.5, "references": True},
    "workers": {"count": 1, "cpus_per_worker": 1, "gpus_per_worker": 0, "ray_address": None},
}
SECTIONS = {"": RunConfig, **{name: RunConfig.model_fields[name].annotation for name in
                              ("models", "merge", "eval", "search", "workers")}}
FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                   HealthCheck.filter_too_much])
_numbers = itertools.count()
_reached_search: list[Any] = []


@pytest.fixture(scope="module", autouse=True)
def no_search():
    """A config that validates must never reach the real search (models, Ray): record it and fail."""
    import evomerge.search

    def refuse(config, run_dir, **_):
        _reached_search.append(config)
        raise AssertionError("a generated config passed validation")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evomerge.search, "search", refuse)
        yield


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Model folders (each with a config.json), a task folder, and the wrong things: a file, an empty folder."""
    root = tmp_path_factory.mktemp("fuzz")
    for name in ("base", "a", "b"):
        (root / "zoo" / name).mkdir(parents=True)
        (root / "zoo" / name / "config.json").write_text("{}")
    (root / "zoo" / "empty").mkdir()
    (root / "zoo" / "file").write_text("not a model folder")
    (root / "tasks").mkdir()
    return root


# ---------------------------------------------------------------- helpers


QUOTED = r"""('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")"""  # a Python string literal, one group


def plain(part: Any) -> bool:
    """A key a message can show as it is: not empty, and all printable (no newline, no control)."""
    return bool(str(part)) and str(part).isprintable()


def spelled(message: str, parts: tuple, before: str = "", after: str = "") -> bool:
    """The message names the key path `parts` between the regexes `before` and `after`: each plain
    key as it is, any other as a quoted string literal that reads back as that key and stays on
    one printable line; parts joined by dots."""
    pattern = before + r"\.".join(re.escape(str(p)) if plain(p) else QUOTED for p in parts) + after
    quoted = [str(p) for p in parts if not plain(p)]
    return any(all(literal.isprintable() for literal in match.groups())
               and [ast.literal_eval(literal) for literal in match.groups()] == quoted
               for match in re.finditer(pattern, message))


def write(world: Path, content: str | bytes | dict) -> Path:
    path = world / f"c{next(_numbers)}.yaml"
    if isinstance(content, dict):
        content = yaml.safe_dump(content, sort_keys=False)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def refuse(world: Path, capsys, config: Path, sets: tuple[str, ...] | list[str] = ()) -> str:
    """Run `evomerge search` in-process; assert the one-line refusal and return the message."""
    run_dir = world / f"run{next(_numbers)}"
    capsys.readouterr()
    code = main(["search", str(config), "--run-dir", str(run_dir), *[f"--set={value}" for value in sets]])
    out, err = capsys.readouterr()
    assert not _reached_search, "a generated config was valid"
    assert "Traceback" not in out + err
    assert code == 2, err
    assert out == ""
    assert len(err.splitlines()) == 1 and err.endswith("\n"), err
    assert err.startswith("evomerge: error: ")
    assert not run_dir.exists()
    return err.removeprefix("evomerge: error: ").rstrip("\n")


def assert_names(message: str, field: str | tuple) -> None:
    """`field` (dotted, or a tuple of keys) starts a problem (after `N error(s): ` or `; `) and ends at
    `:` or a sub-field's `.`."""
    parts = tuple(field.split(".")) if isinstance(field, str) else field
    assert spelled(message, parts, r"(?:: |; )", r"(?=[.:])"), f"{field!r} not named in: {message}"


# ---------------------------------------------------------------- invalid values, by kind

DELETE = object()


class Mutation(NamedTuple):
    path: tuple  # into the raw mapping
    value: Any  # DELETE: remove the key
    field: str | tuple  # the field the message must name: dotted, or its keys


def mutate(raw: dict, mutation: Mutation) -> None:
    node = raw
    for part in mutation.path[:-1]:
        node = node[part]
    if mutation.value is DELETE:
        del node[mutation.path[-1]]
    else:
        node[mutation.path[-1]] = mutation.value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


_BOOL_WORDS = {"0", "off", "f", "false", "n", "no", "1", "on", "t", "true", "y", "yes"}
words = st.text("abcdefghijklmnopqrstuvwxyz -_", max_size=8).filter(
    lambda s: not _is_number(s) and s.strip().lower() not in _BOOL_WORDS)
short_text = st.text(max_size=6)
scalar_junk = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), short_text)
lists = st.lists(scalar_junk, max_size=3)
dicts = st.dictionaries(short_text, scalar_junk, max_size=2)
containers = st.one_of(lists, dicts)
fractional = st.one_of(st.builds(float.__add__, st.integers(-10**6, 10**6).map(float), st.floats(0.001, 0.999)),
                       st.floats(min_value=5e-324, max_value=0.5), st.floats(min_value=-0.5, max_value=-5e-324))
non_finite = st.sampled_from([math.nan, math.inf, -math.inf])
huge = st.sampled_from([10**400, -10**400])
NEGATIVE = 5e-324  # the smallest positive float: `max_value=-NEGATIVE` excludes both zeros


def bad_int(min_value: int, below: int | None = None, optional: bool = False) -> st.SearchStrategy:
    """Anything but an int in [min_value, below): out of range, fractional, non-finite, words, containers."""
    options = [st.integers(max_value=min_value - 1), st.just(-10**400), fractional, non_finite, words, containers]
    if below is not None:
        options += [st.integers(min_value=below), st.just(10**400)]
    if not optional:
        options.append(st.none())
    return st.one_of(options)


def bad_float(*out_of_range: st.SearchStrategy) -> st.SearchStrategy:
    """Out-of-range numbers, words, containers and None for a required float."""
    return st.one_of(*out_of_range, st.just(math.nan), st.just(-math.inf), words, containers, st.none())


def bad_bool(optional: bool = False) -> st.SearchStrategy:
    options = [st.integers().filter(lambda i: i not in (0, 1)), fractional, non_finite, words, containers]
    return st.one_of(options if optional else [*options, st.none()])


def bad_str(min_length: int = 0, optional: bool = False) -> st.SearchStrategy:
    options = [st.booleans(), st.integers(), st.floats(), containers]
    options += [] if optional else [st.none()]
    options += [st.just("")] if min_length else []
    return st.one_of(options)


def bad_choice(*allowed: str) -> st.SearchStrategy:
    return st.one_of(short_text.filter(lambda s: s not in allowed), st.integers(), st.floats(), st.booleans(),
                     containers, st.none())


def _granularity_ok(text: str) -> bool:
    match = re.fullmatch(r"block:(\d+)", text)
    return text in ("global", "layer") or bool(match and int(match.group(1)) >= 1)


bad_granularity = st.one_of(
    st.sampled_from(["block:0", "block:00", "blocks:2", "layer2", "Layer", "GLOBAL", "block:", "block:-1",
                     "block:1.5", "block: 2", " layer", "layer ", "block:2x", "per-layer", "", "block"]),
    st.builds("{}:{}".format, st.sampled_from(["block", "blocks", "layer", "global"]), short_text).filter(
        lambda s: not _granularity_ok(s)),
    st.integers(), st.floats(), st.booleans(), containers, st.none())

bad_weight = st.one_of(st.floats(max_value=-NEGATIVE), non_finite, huge, words, containers, st.none())
bad_tradeoffs = st.one_of(  # cma's trade-off weights: a non-empty list of distinct finite floats >= 0
    st.just([]), st.just([0.5, 0.5]), st.booleans(), st.integers(), st.floats(), words, dicts,
    st.builds(lambda weight, where: [0.0, 1.0][:where] + [weight], bad_weight, st.integers(0, 2)))
not_a_list = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), dicts)  # lists of str would pass
not_a_mapping = st.one_of(scalar_junk, lists)  # a dict could be a valid section


@st.composite
def bad_bounds(draw) -> Mutation:
    """merge.bounds broken one way: not a mapping, an unknown gene, a bad pair, low >= high, outside (0, 1]."""
    gene = draw(st.sampled_from(["weight", "density", "t"]))
    finite = st.floats(min_value=-1e6, max_value=1e6)
    kind = draw(st.sampled_from(["not_mapping", "unknown_gene", "shape", "element", "order", "non_finite",
                                 "unit_range"]))
    if kind == "not_mapping":
        return Mutation(("merge", "bounds"), draw(not_a_mapping.filter(lambda v: v != [])), "merge.bounds")
    if kind == "unknown_gene":
        key = draw(st.one_of(short_text.filter(lambda k: k not in ("weight", "density", "t")), st.integers()))
        return Mutation(("merge", "bounds", key), [0.0, 1.0], ("merge", "bounds", key))
    if kind == "shape":
        value = draw(st.one_of(st.lists(finite, max_size=1), st.lists(finite, min_size=3, max_size=5),
                               words, st.none(), st.integers(), dicts))
        return Mutation(("merge", "bounds", gene), value, f"merge.bounds.{gene}")
    if kind == "element":
        position = draw(st.sampled_from([0, 1]))
        pair = [0.2, 0.8]
        pair[position] = draw(st.one_of(words, containers, st.none()))
        return Mutation(("merge", "bounds", gene), pair, f"merge.bounds.{gene}")
    if kind == "order":
        low = draw(st.floats(min_value=0.0, max_value=1.0))
        high = draw(st.floats(min_value=-1e6, max_value=low))
        return Mutation(("merge", "bounds", gene), [low, high], f"merge.bounds.{gene}")
    if kind == "non_finite":
        pair = [draw(st.one_of(finite, non_finite)), draw(non_finite)]
        return Mutation(("merge", "bounds", gene), draw(st.permutations(pair)), f"merge.bounds.{gene}")
    gene = draw(st.sampled_from(["density", "t"]))  # both live in [0, 1], density also above 0
    low, high = draw(st.one_of(
        st.tuples(st.floats(min_value=-1e6, max_value=-NEGATIVE), st.floats(min_value=0.0, max_value=1.0)),
        st.tuples(st.floats(min_value=0.0, max_value=1.0), st.floats(min_value=1.0, max_value=1e6, exclude_min=True)),
        *([st.tuples(st.just(0.0), st.floats(min_value=NEGATIVE, max_value=1.0))] if gene == "density" else [])))
    return Mutation(("merge", "bounds", gene), [low, high], f"merge.bounds.{gene}")


def unknown_key(section: tuple) -> st.SearchStrategy:
    model = SECTIONS[section[0]] if section else RunConfig
    if section[:2] == ("eval", "tasks"):
        model = RunConfig.model_fields["eval"].annotation.model_fields["tasks"].annotation.__args__[0]
    keys = st.one_of(st.text(max_size=10).filter(lambda k: k not in model.model_fields), st.integers())
    return st.builds(lambda key, value: Mutation((*section, key), value, (*section, key)),
                     keys, scalar_junk)


def at(path: tuple, values: st.SearchStrategy) -> st.SearchStrategy:
    return st.builds(lambda value: Mutation(path, value, path), values)


def missing(path: tuple) -> st.SearchStrategy:
    return st.just(Mutation(path, DELETE, path))


def task_mutations(i: int) -> list[st.SearchStrategy]:
    task = ("eval", "tasks", i)
    return [at(task, not_a_mapping), missing((*task, "name")), missing((*task, "metric")),
            at((*task, "name"), bad_str(min_length=1)), at((*task, "metric"), bad_str(min_length=1)),
            at((*task, "weight"), bad_float(st.floats(max_value=0.0), st.integers(max_value=0), huge,
                                            st.just(math.inf))),
            at((*task, "filter"), bad_str()), at((*task, "higher_is_better"), bad_bool(optional=True)),
            unknown_key(task)]


# one list of strategies per top-level key: mutations from different groups never touch each other
GROUPS: dict[str, list[st.SearchStrategy]] = {
    "name": [at(("name",), st.one_of(bad_str(min_length=1), st.builds(
        "{}{}{}".format, words, st.sampled_from(list(" /:*?\n\t#@!$%,;'\"")), words)))],
    "seed": [at(("seed",), bad_int(0, below=2**32))],
    "models": [at(("models",), not_a_mapping), missing(("models",)), missing(("models", "base")),
               missing(("models", "experts")), at(("models", "base"), bad_str(min_length=1)),
               at(("models", "experts"), st.one_of(st.just([]), not_a_list, short_text)),
               *[at(("models", "experts", i), bad_str()) for i in (0, 1)],
               at(("models", "dtype"), bad_choice("float32", "bfloat16", "float16")),
               at(("models", "device"), bad_choice("auto", "cpu", "cuda")),
               at(("models", "trust_remote_code"), bad_bool()), unknown_key(("models",))],
    "merge": [at(("merge",), not_a_mapping),
              at(("merge", "method"), bad_choice("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear",
                                                 "slerp")),
              at(("merge", "granularity"), bad_granularity), bad_bounds(), unknown_key(("merge",))],
    "eval": [at(("eval",), not_a_mapping), missing(("eval",)), missing(("eval", "tasks")),
             at(("eval", "tasks"), st.one_of(st.just([]), not_a_list, short_text)),
             at(("eval", "include_path"), st.one_of(st.booleans(), st.integers(), st.floats(), dicts)),
             at(("eval", "include_path", 0), bad_str(optional=True)),
             *task_mutations(0), *task_mutations(1),
             at(("eval", "limit"), bad_int(1, optional=True)), at(("eval", "batch_size"), bad_int(1)),
             at(("eval", "num_fewshot"), bad_int(0, optional=True)), unknown_key(("eval",))],
    "search": [at(("search",), not_a_mapping), at(("search", "strategy"), bad_choice("cma", "random", "nsga2", "tpe")),
               at(("search", "tradeoffs"), bad_tradeoffs),
               at(("search", "population"), bad_int(2, optional=True)),
               at(("search", "generations"), bad_int(1)),
               at(("search", "sigma0"), bad_float(st.floats(max_value=0.0), st.floats(min_value=1.0, exclude_min=True),
                                                  st.integers(max_value=0), st.integers(min_value=2), huge,
                                                  st.just(math.inf))),
               at(("search", "x0"), bad_float(st.floats(max_value=-NEGATIVE),
                                              st.floats(min_value=1.0, exclude_min=True),
                                              st.integers(max_value=-1), st.integers(min_value=2), huge,
                                              st.just(math.inf))),
               at(("search", "references"), bad_bool()), unknown_key(("search",))],
    "workers": [at(("workers",), not_a_mapping), at(("workers", "count"), bad_int(1)),
                at(("workers", "cpus_per_worker"), bad_float(st.floats(max_value=0.0), st.integers(max_value=0), huge)),
                at(("workers", "gpus_per_worker"), bad_float(st.floats(max_value=-NEGATIVE), st.integers(max_value=-1),
                                                             huge)),
                at(("workers", "ray_address"), bad_str(optional=True)), unknown_key(("workers",))],
    "": [unknown_key(())],
}
any_mutation = st.one_of([strategy for group in GROUPS.values() for strategy in group])


# ---------------------------------------------------------------- the properties


def test_base_config_is_valid(world: Path) -> None:
    """The starting point must pass, or the properties below would test nothing."""
    config = load_config(write(world, BASE))
    assert config.models.base == str(world / "zoo" / "base")


@settings(max_examples=110, **FUZZ)
@given(mutation=any_mutation)
def test_one_wrong_field_is_named(world: Path, capsys, mutation: Mutation) -> None:
    raw = copy.deepcopy(BASE)
    mutate(raw, mutation)
    event(f"{'deleted' if mutation.value is DELETE else type(mutation.value).__name__} at "
          f"{'.'.join(map(repr, mutation.path[:3]))}")
    assert_names(refuse(world, capsys, write(world, raw)), mutation.field)


@st.composite
def several(draw) -> list[Mutation]:
    groups = draw(st.lists(st.sampled_from(sorted(GROUPS)), min_size=2, max_size=4, unique=True))
    return [draw(st.one_of(GROUPS[group])) for group in groups]


@settings(max_examples=30, **FUZZ)
@given(mutations=several())
def test_every_wrong_field_is_named_at_once(world: Path, capsys, mutations: list[Mutation]) -> None:
    raw = copy.deepcopy(BASE)
    for mutation in mutations:
        mutate(raw, mutation)
    message = refuse(world, capsys, write(world, raw))
    for mutation in mutations:
        assert_names(message, mutation.field)


@settings(max_examples=15, **FUZZ)
@given(names=st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=4), data=st.data())
def test_repeated_task_names(world: Path, capsys, names: list[str], data) -> None:
    repeated = data.draw(st.sampled_from(names))
    tasks = [{"name": name, "metric": "acc"} for name in [*names, repeated]]
    raw = copy.deepcopy(BASE)
    raw["eval"]["tasks"] = data.draw(st.permutations(tasks))
    message = refuse(world, capsys, write(world, raw))
    assert_names(message, "eval.tasks")
    assert "each task once" in message and spelled(message, (repeated,)), (repeated, message)


BAD_SOURCES = st.one_of(st.sampled_from(["zoo/file", "zoo/empty", "./zoo/missing", "/nonexistent/model",
                                         "a/b/c", "not an id!", "zoo/base/config.json", "zoo", "."]),
                        st.builds("./missing-{}".format, words), st.builds("missing/{}/deep".format, words))
BAD_INCLUDES = st.one_of(st.sampled_from(["zoo/file", "missing", "zoo/base/config.json", "/nonexistent/tasks"]),
                         st.builds("missing-{}".format, words))


@settings(max_examples=25, **FUZZ)
@given(sources=st.dictionaries(st.sampled_from([("models", "base"), ("models", "experts", 0),
                                                ("models", "experts", 1), ("eval", "include_path", 0)]),
                               st.none(), min_size=1),
       data=st.data())
def test_bad_model_and_task_folders(world: Path, capsys, sources: dict, data) -> None:
    """A file for a model folder, a folder without config.json, missing folders: each by its field."""
    raw = copy.deepcopy(BASE)
    for path in sources:
        mutate(raw, Mutation(path, data.draw(BAD_INCLUDES if path[0] == "eval" else BAD_SOURCES), ""))
    message = refuse(world, capsys, write(world, raw))
    for path in sources:
        assert_names(message, path)


_TEXT = yaml.safe_dump(BASE, sort_keys=False)  # block style: no brackets anywhere
_LINES = _TEXT.splitlines()


@st.composite
def broken_yaml(draw) -> bytes:
    """Text that no YAML parser accepts (or no UTF-8 decoder): every way breaks BASE by design."""
    i = draw(st.integers(0, len(_LINES) - 1))
    line = _LINES[i]
    indent = len(line) - len(line.lstrip(" "))
    kind = draw(st.sampled_from(["tab", "indent", "bracket", "control", "tag", "deep", "bytes", "utf8"]))
    event(f"broken yaml: {kind}")
    if kind == "tab":  # a tab cannot start a token in block context
        line = "\t" + line
    elif kind == "indent":  # a top-level key pushed right, or a nested line pulled left: both break the block
        line = " " + line if indent == 0 else line[1:]
    elif kind == "bracket":  # a flow collection that never closes (the block-style text has no closer)
        head = line[:indent + 2] if line.lstrip().startswith("- ") else line.split(":")[0] + ":"
        garbage = draw(st.text(st.characters(exclude_characters="]}"), max_size=6))
        line = f"{head} {draw(st.sampled_from('[{'))}{garbage}"
    elif kind == "control":  # characters YAML does not allow in a stream
        char = draw(st.sampled_from([*map(chr, [*range(0, 9), 11, 12, *range(14, 32), 127]), "\ufffe", "\uffff"]))
        position = draw(st.integers(0, len(line)))
        line = line[:position] + char + line[position:]
    elif kind == "tag":  # unsafe tags, undefined aliases, repeated anchors, bad escapes
        line = draw(st.sampled_from(["name: !!python/object/apply:os.system ['echo hacked']",
                                     "name: !!python/name:os.system", "name: *nowhere",
                                     "name: &a x\nseed: &a 1", 'name: "\\q"', "name: [a, b]]",
                                     "? [a, b]\n: unhashable", "name: 'unterminated", "name: x: y"]))
    elif kind == "deep":  # deeper than the parser's recursion limit
        depth = draw(st.integers(3000, 6000))
        line = "name: " + "[" * depth + "]" * depth
    elif kind == "bytes":  # random bytes with an invalid UTF-8 byte somewhere
        data = draw(st.binary(max_size=40))
        position = draw(st.integers(0, len(data)))
        return data[:position] + draw(st.sampled_from([b"\xff", b"\xfe", b"\xc0", b"\xc1", b"\xed\xa0\x80"])) \
            + data[position:]
    if kind == "utf8":  # a truncated multi-byte sequence inside valid text
        encoded = _TEXT.encode()
        position = draw(st.integers(0, len(encoded)))
        return encoded[:position] + draw(st.sampled_from([b"\xe2\x82", b"\xc3", b"\xf0\x9f\x98"])) \
            + b"\n" + encoded[position:]
    return "\n".join([*_LINES[:i], line, *_LINES[i + 1:]]).encode("utf-8")


@settings(max_examples=45, **FUZZ)
@given(content=broken_yaml())
def test_broken_yaml_names_the_file(world: Path, capsys, content: bytes) -> None:
    path = write(world, content)
    message = refuse(world, capsys, path)
    assert message.startswith(f"{path}:")
    assert "invalid YAML" in message or "cannot read" in message


@settings(max_examples=20, **FUZZ)
@given(document=st.one_of(st.just(""), st.just("# only a comment\n"), st.just("---\n"), st.just("~\n"),
                          st.builds(yaml.safe_dump, st.one_of(scalar_junk, st.lists(scalar_junk, max_size=4)))))
def test_top_level_must_be_a_mapping(world: Path, capsys, document: str) -> None:
    path = write(world, document)
    message = refuse(world, capsys, path)
    assert message.startswith(f"{path}: expected a YAML mapping at the top level")


def test_files_that_are_not_config_files(world: Path, capsys, tmp_path: Path) -> None:
    assert refuse(world, capsys, tmp_path) == f"{tmp_path}: is a directory, expected a YAML config file"
    assert refuse(world, capsys, tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: no such config file"
    loop = tmp_path / "loop.yaml"
    loop.symlink_to(loop)
    assert refuse(world, capsys, loop).startswith(f"{loop}: ")
    odd = tmp_path / "odd\nname.yaml"
    odd.write_text("[1]\n")
    assert spelled(refuse(world, capsys, odd), (odd,), "^", ": expected a YAML mapping")


def test_slerp_with_two_experts_names_the_method(world: Path, capsys) -> None:
    raw = copy.deepcopy(BASE)
    raw["merge"]["method"] = "slerp"
    assert_names(refuse(world, capsys, write(world, raw)), "merge.method")


# ---------------------------------------------------------------- --set overrides

no_equals = st.text(st.characters(exclude_characters="="), max_size=12)
SCALARS = ["name", "seed", "models.base", "models.experts", "models.dtype", "merge.granularity", "merge.bounds.weight",
           "eval.tasks", "eval.include_path", "search.generations", "workers.ray_address"]


@st.composite
def malformed_override(draw) -> tuple[str, str]:
    """An override that cannot be applied, and the text its message must carry."""
    kind = draw(st.sampled_from(["no_equals", "no_key", "through_scalar", "bad_value"]))
    if kind == "no_equals":
        text = draw(no_equals)
        return text, "expected KEY=VALUE"
    if kind == "no_key":
        return "=" + draw(st.text(max_size=8)), "expected KEY=VALUE"
    if kind == "through_scalar":
        scalar = draw(st.sampled_from(SCALARS))
        rest = draw(st.lists(no_equals.filter(lambda s: "." not in s), min_size=1, max_size=3))
        expected = f"{scalar.split('.')[-1]} is not a mapping"
        return f"{scalar}.{'.'.join(rest)}={draw(st.text(max_size=4))}", expected
    key = draw(st.sampled_from(["name", "search.generations", "merge.bounds", "eval.tasks"]))
    value = draw(st.one_of(st.sampled_from(["[1", "{a", "a: b: c", "\t", "!!python/object/apply:os.system [ls]",
                                            "*nowhere", "'open", '"\\q"', "[a]]", "\x00", "- a\n b: c"]),
                           st.integers(3000, 5000).map(lambda d: "[" * d + "]" * d)))
    return f"{key}={value}", "invalid YAML value"


@settings(max_examples=40, **FUZZ)
@given(override=malformed_override(), valid_before=st.lists(st.sampled_from(
    ["search.generations=3", "eval.limit=null", "workers.count=2"]), max_size=2))
def test_malformed_overrides(world: Path, capsys, override: tuple[str, str], valid_before: list[str]) -> None:
    text, expected = override
    message = refuse(world, capsys, write(world, BASE), [*valid_before, text])
    assert message.startswith(f"override {text!r}: ") and expected in message, message


settable = st.one_of([strategy for group in GROUPS.values() for strategy in group]).filter(
    lambda m: m.value is not DELETE and all(isinstance(part, str) and part and "." not in part and "=" not in part
                                            for part in m.path))


@settings(max_examples=30, **FUZZ)
@given(mutation=settable)
def test_overrides_are_validated_like_the_file(world: Path, capsys, mutation: Mutation) -> None:
    value = yaml.safe_dump(mutation.value, default_flow_style=True, width=math.inf)
    message = refuse(world, capsys, write(world, BASE), [f"{'.'.join(mutation.path)}={value}"])
    assert_names(message, mutation.field)
