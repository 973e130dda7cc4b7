"""Pre-compiled prompt templates give lm-eval exactly what its own string templates give."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from evomerge.evaluate import CompiledTemplate, compile_templates, task_spec

DEMO_TASKS = Path(__file__).resolve().parents[1] / "evals" / "demo"


def test_demo_tasks_render_the_same_text_and_targets() -> None:
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(DEMO_TASKS), include_defaults=False)
    names = sorted(name for name in manager.all_tasks if name.startswith("demo_"))
    assert names
    for name, task in manager.load([task_spec(manager, n) for n in names])["tasks"].items():
        docs = list(task.eval_docs)[:20]
        expected = [(task.doc_to_text(doc), task.doc_to_target(doc)) for doc in docs]
        template = task.config.doc_to_text
        compile_templates(task)
        assert isinstance(task.config.doc_to_text, CompiledTemplate), name
        assert [(task.doc_to_text(doc), task.doc_to_target(doc)) for doc in docs] == expected
        # a second pass over fresh copies of the documents reads what the first rendered
        assert [(task.doc_to_text(dict(doc)), task.doc_to_target(dict(doc))) for doc in docs] == expected
        assert len(task.config.doc_to_text.rendered) == len({tuple(doc.items()) for doc in docs})
        assert task.dump_config()["doc_to_text"] == template  # dumped configs read as before


@pytest.mark.parametrize("template,field,choices,doc,expected", [
    ("{{a}}", "doc_to_target", False, {"a": "[1, 2]"}, [1, 2]),
    ("{{a}}", "doc_to_target", False, {"a": "[not python"}, "[not python"),
    ("{{a}}", "doc_to_text", False, {"a": "[1, 2]"}, "[1, 2]"),
    ("{{a}}", "doc_to_target", True, {"a": "3"}, 3),
    ("{{a}}", "doc_to_target", False, {"a": "3"}, "3"),
    ("Q: {{q | regex_replace('x', 'y')}}\n", "doc_to_text", False, {"q": "xox"}, "Q: yoy\n"),
])
def test_the_string_branch_rules(template, field, choices, doc, expected) -> None:
    rendered = CompiledTemplate(template, field, choices)(doc)
    assert rendered == expected and type(rendered) is type(expected)
    assert str(CompiledTemplate(template, field, choices)) == template
    compiled = CompiledTemplate(template, field, choices)
    assert copy.deepcopy(compiled) is compiled


def test_each_distinct_document_is_rendered_once_and_values_of_other_types_apart() -> None:
    compiled = CompiledTemplate("{{a}}|{{b}}", "doc_to_text", False)
    assert [compiled(doc) for doc in ({"a": 1, "b": "x"}, {"a": True, "b": "x"}, {"a": 1.0, "b": "x"})] \
        == ["1|x", "True|x", "1.0|x"]  # equal as keys (1 == True == 1.0), rendered apart
    assert compiled({"a": 1, "b": "x"}) == "1|x" and len(compiled.rendered) == 3
    listed = {"a": [1, 2], "b": "y"}  # a list cannot be a key: rendered every time, not kept
    assert compiled(listed) == "[1, 2]|y" and compiled(listed) == "[1, 2]|y" and len(compiled.rendered) == 3
    target = CompiledTemplate("{{a}}", "doc_to_target", False)
    first = target({"a": "[1, 2]"})
    first.append(3)  # the caller's list: the next call still returns a new [1, 2]
    assert target({"a": "[1, 2]"}) == [1, 2]
