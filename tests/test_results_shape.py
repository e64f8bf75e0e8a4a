"""One results shape: results.json follows docs/data/results.schema.json, and a metric added in one registry
entry (plus its function) reaches the table, the HTML report, the seed report and the loggers' payload.

One real tiny run (real Hydra compose, real Lightning Trainer with a CSVLogger) with a toy metric registered.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import jsonschema
import pytest
import torch
from helpers_run import compose_config

from qbdl.experiment.shape import shift_parts
from qbdl.metrics import registry
from qbdl.pipeline.run import run
from qbdl.report import multi
from qbdl.report.table import format_table

SCHEMA = Path(__file__).resolve().parents[1] / "docs" / "data" / "results.schema.json"
TOY = "toy_confidence_gap"


def _toy(p: torch.Tensor, y: torch.Tensor) -> float:
    """|mean confidence - accuracy| of the MC-mean prediction."""
    pbar = p.mean(0)
    return float((pbar.max(-1).values.double().mean() - (pbar.argmax(-1) == y).double().mean()).abs())


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A tiny run with the toy metric registered (one entry: label, scale, table and seed flags, function)."""
    spec = registry.MetricSpec(TOY, "toy gap %", "lower", 100.0, 2, source="function", table=True, seeds=True,
                               compute=_toy)  # fmt: skip
    registry.METRICS[TOY] = spec
    try:
        out = tmp_path_factory.mktemp("run")
        results = run(compose_config(out, ["eval.variants=[bnn,bnn_ts,qbnn]"]))
        yield out, results, spec
    finally:
        del registry.METRICS[TOY]


def test_results_json_follows_the_schema(toy_run) -> None:
    out, _, _ = toy_run
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    on_disk = json.loads((out / "results.json").read_text())
    jsonschema.validate(on_disk, schema)
    # temperatures once, at the top level
    assert set(on_disk["temperatures"]) == {"bnn_ts"}
    bad = dict(
        on_disk,
        variants={**on_disk["variants"], "bnn_ts": {**on_disk["variants"]["bnn_ts"], "temperature": 1.0}},
    )
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_a_registered_metric_appears_everywhere(toy_run) -> None:
    out, results, spec = toy_run
    on_disk = json.loads((out / "results.json").read_text())
    value = on_disk["variants"]["qbnn"][TOY]
    assert 0 <= value < 1 and value == results["variants"]["qbnn"][TOY]
    # the comparison table (console) and report.html: its label and its value in the registry's format
    table = format_table(on_disk["variants"])
    assert spec.label in table and spec.format(value) in table
    assert spec.label in (out / "report.html").read_text()
    # the seed report (mean ± std over seeds, QBNN vs BNN)
    text = multi.render_markdown(multi.load_runs([out]))
    assert spec.label in text and TOY in multi.seed_metrics()
    # the loggers' payload: the CSVLogger's metrics file has a column per variant
    (metrics_file,) = out.rglob("metrics.csv")
    with open(metrics_file, newline="") as fh:
        header = next(csv.reader(fh))
    assert {f"{v}/{TOY}" for v in ("bnn", "bnn_ts", "qbnn")} <= set(header)


def test_unregistered_again_it_is_gone(toy_run) -> None:
    """The toy entry was the only place the metric lived: without it, no column is left."""
    out, _, spec = toy_run
    assert TOY in registry.METRICS
    saved = registry.METRICS.pop(TOY)
    try:
        assert spec.label not in format_table(json.loads((out / "results.json").read_text())["variants"])
        assert TOY not in multi.seed_metrics()
    finally:
        registry.METRICS[TOY] = saved


def test_shift_shapes_old_and_new_read_the_same() -> None:
    cells = {"bnn": {"rotate": {"1": {"accuracy": 0.9}}}}
    new = {"cells": cells, "summary": {"bnn": {}}, "mce": {}, "meta": {"baseline": None}}
    old = {**cells, "_summary": {"bnn": {}}, "_mce": {}, "_meta": {"baseline": None}}
    assert shift_parts(new) == shift_parts(old) == new
    assert shift_parts({}) == {"cells": {}, "summary": {}, "mce": {}, "meta": {}}
