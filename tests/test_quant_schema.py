"""The published .qbdl schema (docs/model-file.md's table, docs/data/qbdl-file.schema.json) matches the code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qbdl.quant import schema, schema_fields

ROOT = Path(__file__).resolve().parents[1]


def test_docs_table_is_the_codes_table():
    text = (ROOT / "docs" / "model-file.md").read_text()
    block = text.split("<!-- schema-table:start -->")[1].split("<!-- schema-table:end -->")[0].strip()
    assert block == schema.markdown_table(), "re-generate it: python -m qbdl.quant.schema"


def test_json_schema_file_is_the_codes_schema():
    saved = json.loads((ROOT / "docs" / "data" / "qbdl-file.schema.json").read_text())
    assert saved == schema.json_schema(), "re-generate it: python -m qbdl.quant.schema --json"
    assert set(saved["$defs"]) == set(schema.MODULES)


@pytest.mark.parametrize(
    ("value", "ok"),
    [(1e-3, True), (1.1754943508222875e-38, True), (1e-45, False), (0.0, False), (-1.0, False),
     (float("nan"), False), (float("inf"), False), (True, False), ("0.1", False)],
)  # fmt: skip
def test_scale_rule_on_hand_picked_values(value, ok):
    """Scales: finite, > 0, inside float32's normal range; booleans and strings are not numbers."""
    if ok:
        assert schema_fields._scale("f", "s", value) == value
    else:
        with pytest.raises(schema.ModelFileError, match="f: s is"):
            schema_fields._scale("f", "s", value)


@pytest.mark.parametrize(
    ("value", "dotted", "ok"),
    [("x", False, True), ("layer1.0.conv1", True, True), ("layer1.0.conv1", False, False), ("class", False, False),
     ("__init__", False, False), ("a b", False, False), ("x=1", False, False), ("1abc", False, False),
     ("a.__class__", True, False), ("", False, False), (3, False, False)],
)  # fmt: skip
def test_identifier_rule(value, dotted, ok):
    """Names that reach generated code: identifiers (a dotted path for modules), no keywords, no dunders."""
    if ok:
        assert schema.identifier("f", "n", value, dotted=dotted) == value
    else:
        with pytest.raises(schema.ModelFileError):
            schema.identifier("f", "n", value, dotted=dotted)
