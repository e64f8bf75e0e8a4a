"""The documentation site: it builds with warnings as errors, its measured tables are those of the JSON
records in docs/data/, and what it states about the configuration matches the configuration."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CONF = ROOT / "src" / "qbdl" / "conf"


def _tables():
    spec = importlib.util.spec_from_file_location("docs_tables", ROOT / "scripts" / "docs_tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _nav() -> list[str]:
    cfg = (ROOT / "mkdocs.yml").read_text()
    return re.findall(r"^  - [^:]+: (\S+\.md)$", cfg, re.M)


def test_docs_build_strict(tmp_path):
    """`mkdocs build --strict` (CI runs the same): broken links, missing pages or docstrings that do not
    parse fail the build; the API page is generated from the docstrings."""
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    api = (site / "api" / "index.html").read_text()
    for name in ("load_qbnn", "mc_predict", "dnn_to_bnn", "quantize_bnn", "uncertainty_calibration_error"):
        assert name in api, name
    assert "Rebuild a QBNN/QDNN saved by save_qbnn" in api  # load_qbnn's own docstring
    assert "INT8 engine history" in (site / "changelog" / "index.html").read_text()  # CHANGELOG.md


def test_nav_lists_every_page():
    nav = _nav()
    pages = sorted(p.name for p in DOCS.glob("*.md"))
    assert sorted(nav) == pages
    assert nav[0] == "index.md"


def test_tables_match_their_json():
    """What scripts/docs_tables.py would write is what the pages hold (CI fails on a stale table)."""
    mod = _tables()
    stale = [p.name for p in mod.FILES if mod.render_file(p.read_text()) != p.read_text()]
    assert not stale, f"run python scripts/docs_tables.py: stale tables in {stale}"
    filled = {
        m.group(1)
        for p in mod.FILES
        for m in re.finditer(r"<!-- table:([\w-]+) -->\n(?!<!--)", p.read_text())
    }
    assert filled == set(mod.RENDERERS)  # every table is placed and none is empty


def test_default_run_table_is_the_results_json():
    """Read back independently: each variant's accuracy and UCE cell equals results.json's value."""
    res = json.loads((DOCS / "data" / "results.json").read_text())
    text = (DOCS / "default-run.md").read_text()
    rows = {
        cells[0]: cells
        for line in text.splitlines()
        if line.startswith("| ") and not line.startswith("| variant")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    assert set(rows) == set(res["variants"])
    for name, v in res["variants"].items():
        assert rows[name][1] == f"{100 * v['accuracy']:.2f}" and rows[name][4] == f"{100 * v['uce']:.2f}"


def test_tables_follow_the_json(tmp_path, monkeypatch):
    """A new record changes the tables (and only through the JSON)."""
    mod = _tables()
    data = tmp_path / "data"
    data.mkdir()
    for path in RECORDS:
        (data / path.name).write_text(path.read_text())
    res = json.loads((data / "results.json").read_text())
    new = copy.deepcopy(res)
    new["variants"]["qbnn"]["accuracy"] = 0.5
    new["provenance"]["commit"] = "abcdef0123456789"
    (data / "results.json").write_text(json.dumps(new))
    monkeypatch.setattr(mod, "DATA", data)
    table = mod.default_run()
    assert "| qbnn | 50.00 |" in table and "commit `abcdef0`" in table
    page = (DOCS / "default-run.md").read_text()
    assert mod.render_file(page) != page
    (data / "results.json").unlink()  # no record: the table says how to make one
    assert "No record in `docs/data/results.json` yet" in mod.render_file(page)
    with pytest.raises(ValueError, match="unknown table"):
        mod.render_file("<!-- table:nope -->\n<!-- /table:nope -->")


RECORDS = [
    p
    for p in sorted((DOCS / "data").glob("*.json"))
    if p.name in ("results.json", "bench.json", "estimates.json")
]


@pytest.mark.parametrize("path", RECORDS, ids=lambda p: p.name)
def test_records_name_machine_torch_and_commit(path):
    rec = json.loads(path.read_text())
    torch_version = (rec.get("versions") or rec["machine"])["torch"]
    assert rec["machine"]["cpu"] and re.match(r"2\.\d+", torch_version)
    assert re.fullmatch(r"[0-9a-f]{40}", rec["provenance"]["commit"])
    assert rec["provenance"]["command"].startswith("python ")


def test_paper_column_is_paper_json_with_sources():
    """The README's paper column is docs/data/paper.json, cell by cell (read back independently); a cell
    with a number has a source whose quote holds that number, and one without a source gives no number."""
    paper = json.loads((DOCS / "data" / "paper.json").read_text())
    text = (ROOT / "README.md").read_text()
    block = text[text.index("<!-- table:paper-vs-qbdl -->") : text.index("<!-- /table:paper-vs-qbdl -->")]
    cells = [[c.strip() for c in line.strip("|").split("|")][1] for line in block.splitlines()[3:] if line.startswith("| ")]
    order = ["throughput_speedup", "accuracy", "uncertainty", "referral", "ood_auroc", "model_size"]
    assert cells == [paper["values"][k]["cell"] for k in order]
    for key, v in paper["values"].items():
        numbers = re.findall(r"\b\d+(?:\.\d+)?(?![\d.]|st\b|nd\b|rd\b|th\b)", v["cell"])  # not "4th"
        if v["source"] is None:
            assert not numbers and v["value"] is None, key
        else:
            assert paper["sources"][v["source"]]["urls"], key
            assert all(n in v["quote"] for n in numbers), (key, numbers)
            assert v["value"] is None or f"{v['value']:g}" in v["quote"], key
    if not paper["full_text"]["reachable"]:
        assert "not reachable" in (DOCS / "reproduce.md").read_text()


def test_every_experiment_is_documented():
    names = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
    page = (DOCS / "experiments.md").read_text()
    assert names and all(f"| `{n}` |" in page for n in names), [n for n in names if f"| `{n}` |" not in page]


def test_documented_data_roots_are_the_configured_ones():
    """The table in docs/reproduce.md states each data set's real default root."""
    page = (DOCS / "reproduce.md").read_text()
    rows = dict(re.findall(r"^\| [^|]*\(`data=(\w+)`\) \| `([^`]+)` \|", page, re.M))
    assert {"imagenet", "colorectal", "camelyon17"} <= set(rows)
    for name, documented in rows.items():
        root = yaml.safe_load((CONF / "data" / f"{name}.yaml").read_text())["root"]
        assert documented == root.replace("${paths.data_dir}", "${QBDL_DATA_DIR:-data}"), name
    paths = yaml.safe_load((CONF / "paths" / "default.yaml").read_text())
    assert paths["data_dir"] == "${oc.env:QBDL_DATA_DIR,data}"
    for name in ("mnist", "fashion_mnist", "cifar10"):  # these read the data dir itself
        assert yaml.safe_load((CONF / "data" / f"{name}.yaml").read_text())["root"] == "${paths.data_dir}"
    assert "| MNIST, Fashion-MNIST, CIFAR-10 | `${QBDL_DATA_DIR:-data}` |" in page


def test_glossary_defines_every_term():
    page = (DOCS / "concepts.md").read_text()
    terms = ["MOPED", "UCE", "AUGRC", "AURC, E-AURC", "TOST", "mCE", "SQNR", "LSB", "Shapley shares",
             "MC floor (MC noise floor)", "Reduced range", "Compensation"]  # fmt: skip
    missing = [t for t in terms if f"\n**{t}**\n:   " not in page]
    assert not missing, missing


def test_license_and_citations():
    lic = (ROOT / "LICENSE").read_text()
    assert (
        "Apache License" in lic
        and "Version 2.0, January 2004" in lic
        and "END OF TERMS AND CONDITIONS" in lic
    )
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["license"] == "Apache-2.0"
    assert {r["doi"] for r in cff["references"]} == {
        "10.1109/IISWC59245.2023.00020",
        "10.1109/CVPR.2018.00286",
    }
    bib = (DOCS / "citing.md").read_text()
    assert (
        "doi       = {10.1109/IISWC59245.2023.00020}" in bib
        and "doi       = {10.1109/CVPR.2018.00286}" in bib
    )
    readme = (ROOT / "README.md").read_text()
    assert "doi:10.1109/IISWC59245.2023.00020" in readme and "doi:10.1109/CVPR.2018.00286" in readme


def test_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 200
    for phrase in (
        "session",
        "old checkout",
        "(old)",
        "(new)",
        "120 s goal",
        "projects ~",
        "RELIABILITY:BEGIN",
    ):
        assert phrase not in text, phrase


def test_fidelity_draws_and_speed_ab_records_import_and_render(tmp_path, monkeypatch):
    """The draws and before/after records: kept from their producers' files, rendered with verdicts and ratios."""
    mod = _tables()
    monkeypatch.setattr(mod, "DATA", tmp_path)
    machine = {"cpu": "Some CPU", "family_model": "25/17", "isa": ["avx2", "avx512_vnni"], "torch": "2.14.1",
               "threads": 2}  # fmt: skip
    verdicts = {"accuracy": (0.001, -0.001, 0.003, 0.01, "within"), "nll": (0.02, 0.015, 0.025, 0.01, "beyond")}
    metrics = {}
    for key, _, _ in mod.FIDELITY_METRICS:
        d, lo, hi, f, v = verdicts.get(key, (0.0, -0.02, 0.02, 0.01, "undecided"))
        metrics[key] = {"diff": d, "lo": lo, "hi": hi, "floor": f, "verdict": v}
    run = {"draws": 4, "mc_samples": 8, "level": 0.95, "n_test": 10, "seconds": 1.0, "metrics": metrics,
           "machine": machine}  # fmt: skip
    (tmp_path / "d.json").write_text(json.dumps(run))
    mod.import_fidelity_draws([f"digits:0:{tmp_path / 'd.json'}"], "python -m qbdl.fidelity", "a" * 40, "n")
    table = mod.fidelity_draws()
    assert "| digits, 0 | 4 x 8 | +0.10 ± 0.20 / 1.00 | **+0.020 ± 0.005 / 0.010** | _+0.00 ± 2.00 / 1.00_" in table
    assert "Cells: 1 within, 4 undecided, 1 beyond" in table and "family/model 25/17" in table
    assert "(digits; 1 runs, 6 metric gaps): 1 shown within the MC floor, 4 undecided, 1 beyond" in (
        mod.fidelity_draws_short()
    )
    # a task with other OOD sets: its own record, one AUROC column per set it carries, counted in the sentence
    ood = {"diff": -0.01, "lo": -0.02, "hi": 0.0, "floor": 0.03, "verdict": "within"}
    keep = {k: v for k, v in metrics.items() if not k.startswith("ood_auroc/")}
    (tmp_path / "m.json").write_text(json.dumps(dict(run, metrics=keep | {"ood_auroc/fashion_mnist": ood})))
    mod.import_fidelity_draws([f"mnist:2:{tmp_path / 'm.json'}"], "c", "b" * 40, "", "fidelity_draws_mnist.json")
    mnist = mod.RENDERERS["fidelity-draws-mnist"]()
    assert "| Brier | AUROC fashion_mnist pt |" in mnist and "| mnist, 2 | 4 x 8 |" in mnist
    assert mnist.splitlines()[2].endswith("| -1.00 ± 1.00 / 3.00 |") and "AUROC photos" not in mnist
    short = mod.fidelity_draws_short()
    assert "(digits, mnist; 2 runs, 11 metric gaps): 3 shown within the MC floor, 6 undecided, 2 beyond" in short
    assert "digits: Measured with `python -m qbdl.fidelity`" in short and "commit `aaaaaaa`" in short
    assert "; mnist: Measured with `c`" in short and "commit `bbbbbbb`" in short
    both = [f"digits:0:{tmp_path / 'd.json'}", f"mnist:2:{tmp_path / 'm.json'}"]
    mod.import_fidelity_draws(both, "c", "b" * 40, "", "fidelity_draws_mnist.json")
    mixed = mod.fidelity_draws("fidelity_draws_mnist.json").splitlines()
    assert mixed[0].endswith("| AUROC photos pt | AUROC rotated pt | AUROC fashion_mnist pt |")
    assert mixed[2].endswith("| – |") and mixed[3].count(" – ") == 2  # a set the run has not: no cell
    with pytest.raises(ValueError, match="not a draws record"):
        mod.import_fidelity_draws([f"mnist:2:{tmp_path / 'm.json'}"], "c", "b" * 40, "", "draws.json")
    other = dict(run, machine=dict(machine, cpu="Other CPU"))
    (tmp_path / "e.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="different machines"):
        mod.import_fidelity_draws([f"a:0:{tmp_path / 'd.json'}", f"b:1:{tmp_path / 'e.json'}"], "c", "a" * 40, "")

    def bench(det: float, fresh: float) -> dict:
        rows = [{"variant": v, "batch_size": 1, "images_per_s": ips, "median_s": 1 / ips, "min_s": 0, "max_s": 0,
                 "reps": 3} for v, ips in (("dnn_int8", det), ("qbnn_int8_fresh", fresh))]  # fmt: skip
        return {"machine": machine, "results": rows}

    (tmp_path / "b.json").write_text(json.dumps(bench(40.0, 20.0)))
    (tmp_path / "c.json").write_text(json.dumps(bench(50.0, 30.0)))
    mod.import_bench_ab([f"before:{'b' * 40}:{tmp_path / 'b.json'}", f"after:{'c' * 40}:{tmp_path / 'c.json'}"],
                        "python -m qbdl.bench", "quiet")  # fmt: skip
    ab = mod.speed_ab()
    assert "| before | `bbbbbbb` | 40.0 / 20.0 (0.50) |" in ab and "| after | `ccccccc` | 50.0 / 30.0 (0.60) |" in ab
