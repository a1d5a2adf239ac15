"""YAML text to located nodes: 1-based line and column of every key and value."""

from __future__ import annotations

from meshproxy.config.diagnostics import Diagnostics, Pos
from meshproxy.config.yamlsource import YMap, YScalar, YSeq, from_python, parse_yaml

TEXT = """\
# a comment
kind: Thing
spec:
  list:
    - {name: a, port: 80}
    - name: b
  on: [reset, "502"]
"""


def test_keys_and_values_keep_file_line_and_column() -> None:
    diags = Diagnostics()
    [doc] = parse_yaml(TEXT, "f.yaml", diags)
    assert diags.errors == []
    assert isinstance(doc, YMap)
    kind = doc.entries["kind"]
    assert kind.key_pos == Pos("f.yaml", 2, 1)
    assert kind.value.pos == Pos("f.yaml", 2, 7)
    spec = doc.entries["spec"].value
    items = spec.entries["list"].value
    assert isinstance(items, YSeq)
    first, second = items.items
    assert first.pos == Pos("f.yaml", 5, 7)
    port = first.entries["port"]
    assert port.key_pos == Pos("f.yaml", 5, 17)
    assert isinstance(port.value, YScalar)
    assert (port.value.pos, port.value.value) == (Pos("f.yaml", 5, 23), 80)
    assert second.entries["name"].value.pos == Pos("f.yaml", 6, 13)


def test_key_on_stays_a_string_and_quoted_numbers_stay_strings() -> None:
    [doc] = parse_yaml(TEXT, "f.yaml", Diagnostics())
    on = doc.entries["spec"].value.entries["on"]
    assert on.key == "on"
    assert [i.value for i in on.value.items] == ["reset", "502"]


def test_scalars_get_yaml_types() -> None:
    [doc] = parse_yaml("a: 1\nb: 1.5\nc: true\nd: ~\ne: text\nf: 2024-01-01\n", "f", Diagnostics())
    values = {k: e.value.value for k, e in doc.entries.items()}
    assert values == {"a": 1, "b": 1.5, "c": True, "d": None, "e": "text", "f": "2024-01-01"}


def test_empty_documents_are_skipped_and_the_others_kept_in_order() -> None:
    diags = Diagnostics()
    docs = parse_yaml("---\n---\na: 1\n---\n# only a comment\n---\nb: 2\n", "f", diags)
    assert [list(d.entries) for d in docs] == [["a"], ["b"]]
    assert [d.pos.line for d in docs] == [3, 7]


def test_a_duplicate_key_is_an_error_at_the_second_key() -> None:
    diags = Diagnostics()
    parse_yaml("a: 1\nb:\n  c: 1\n  c: 2\n", "f.yaml", diags)
    assert [str(d) for d in diags.errors] == ["f.yaml:4:3: duplicate key 'c' (first at line 3)"]


def test_a_syntax_error_names_its_line_and_keeps_earlier_documents() -> None:
    diags = Diagnostics()
    docs = parse_yaml("a: 1\n---\nb: [1, 2\nc: 3\n", "f.yaml", diags)
    assert len(docs) == 1
    [error] = diags.errors
    assert (error.file, error.line) == ("f.yaml", 4)
    assert error.message.startswith("invalid YAML: ")


def test_a_control_character_is_a_syntax_error_at_its_place() -> None:
    diags = Diagnostics()
    assert parse_yaml("a: 1\nb: 'x\x07'\n", "f.yaml", diags) == []
    assert [str(d) for d in diags.errors] == [
        "f.yaml:2:6: invalid YAML: control characters are not allowed (#x0007)"
    ]


def test_plain_data_wraps_without_positions() -> None:
    node = from_python({"spec": {"ports": [80, 81]}}, "api:default/x")
    assert node.entries["spec"].value.entries["ports"].value.items[1].value == 81
    assert node.pos == Pos("api:default/x")
    assert str(node.pos) == "api:default/x"
