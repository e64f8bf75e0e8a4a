"""The import graph of src/qbdl, read with `ast`: layers that point one way, small modules, no private reach-ins.

Every `import` counts, at module level or inside a function (or under TYPE_CHECKING): a cycle hidden in a
function body is still a cycle. Fails with the offending files and lines.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = SRC / "qbdl"
MAX_LINES = 400
FRAMEWORKS = ("lightning", "hydra", "omegaconf", "pytorch_lightning")
#: Packages that stay importable without Lightning or Hydra (the library core and the experiment logic).
FRAMEWORK_FREE = ("qbdl.bayes", "qbdl.quant", "qbdl.metrics", "qbdl.experiment", "qbdl.models")
#: package -> packages it must never import (presentation and adapters sit above the experiment logic).
FORBIDDEN = {
    "qbdl.experiment": ("qbdl.report", "qbdl.lit", "qbdl.pipeline", "qbdl.baselines", "qbdl.run"),
    "qbdl.metrics": ("qbdl.report", "qbdl.experiment", "qbdl.lit", "qbdl.pipeline"),
    "qbdl.report": ("qbdl.lit", "qbdl.pipeline", "qbdl.baselines", "qbdl.run"),
    "qbdl.lit": ("qbdl.pipeline", "qbdl.baselines", "qbdl.run"),
}
#: Third-party private names with no public equivalent: (module, attribute) -> why.
ALLOWED_PRIVATE = {
    # nn.Conv2d's own padding for padding_mode != 'zeros'; torch has no public accessor
    ("qbdl.bayes.layers", "_reversed_padding_repeated_twice"): "torch.nn.Conv2d internals",
    # the state-dict version Module._load_from_state_dict receives in `local_metadata`; torch's own name
    ("qbdl.bayes.layers", "_version"): "torch state_dict metadata",
    # WILDS' dataset keeps its image paths only here
    ("qbdl.data.camelyon17", "_input_array"): "wilds.Camelyon17Dataset internals",
}
#: Private attributes that are public API (namedtuple's; the _ marks them as not field names).
PUBLIC_UNDERSCORE = {"_replace", "_asdict", "_fields", "_make_fields"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) of every import statement in the file."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((mod, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
    return out


def _graph() -> dict[str, dict[str, int]]:
    """{module: {imported qbdl module: line}}; `from pkg import mod` points at the submodule."""
    edges: dict[str, dict[str, int]] = defaultdict(dict)
    for name, path in MODULES.items():
        for mod, names, line in _imports(name, path):
            if not (mod == "qbdl" or mod.startswith("qbdl.")):
                continue
            targets = [f"{mod}.{n}" if f"{mod}.{n}" in MODULES else mod for n in names] or [mod]
            for t in targets:
                while t not in MODULES and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t != name:
                    edges[name].setdefault(t, line)
    return edges


def _cycles(nodes: list[str], edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found = []
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, {}))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            node, it = work[-1]
            nxt = next((w for w in it if w in nodes), None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(edges.get(nxt, {})))))
                elif nxt in on:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _describe(cycle: list[str], edges: dict[str, dict[str, int]]) -> str:
    members = set(cycle)
    links = [
        f"{a}:{line} -> {b}" for a in cycle for b, line in sorted(edges.get(a, {}).items()) if b in members
    ]
    return "{" + ", ".join(cycle) + "}: " + "; ".join(links)


def test_no_import_cycle_between_files() -> None:
    """No two files of src/qbdl import each other, directly or around a loop."""
    edges = _graph()
    cycles = _cycles(list(MODULES), edges)
    assert not cycles, "import cycles between files:\n" + "\n".join(_describe(c, edges) for c in cycles)


def test_no_import_cycle_between_packages() -> None:
    """The packages of qbdl import downward only."""
    edges = _graph()
    pedges: dict[str, dict[str, int]] = defaultdict(dict)
    where: dict[tuple[str, str], str] = {}
    for a, targets in edges.items():
        for b, line in targets.items():
            pa, pb = _package(a), _package(b)
            if pa != pb and pa != "qbdl" and pb != "qbdl":
                pedges[pa].setdefault(pb, line)
                where.setdefault((pa, pb), f"{a}:{line}")
    cycles = _cycles(sorted({_package(m) for m in MODULES}), pedges)
    text = [
        "{"
        + ", ".join(c)
        + "}: "
        + "; ".join(f"{where[a, b]} -> {b}" for a in c for b in pedges[a] if b in c)
        for c in cycles
    ]
    assert not cycles, "import cycles between packages:\n" + "\n".join(text)


def test_layers_point_one_way() -> None:
    """The core and the experiment logic import no framework; lower layers import no upper one."""
    bad = []
    for name, path in MODULES.items():
        pkg = _package(name)
        for mod, _, line in _imports(name, path):
            top = mod.split(".")[0]
            if pkg in FRAMEWORK_FREE and top in FRAMEWORKS:
                bad.append(f"{name}:{line} imports {mod} (framework-free package {pkg})")
            if any(mod == f or mod.startswith(f + ".") for f in FORBIDDEN.get(pkg, ())):
                bad.append(f"{name}:{line} imports {mod} ({pkg} sits below it)")
    assert not bad, "\n".join(bad)


def test_modules_are_small() -> None:
    """No module of src/qbdl is over MAX_LINES lines."""
    big = {n: len(p.read_text().splitlines()) for n, p in MODULES.items()}
    big = {n: k for n, k in big.items() if k > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def _private_uses(name: str, path: Path) -> list[str]:
    out = []
    tree = ast.parse(path.read_text(), str(path))
    for mod, names, line in _imports(name, path):
        if mod == "qbdl" or mod.startswith("qbdl."):
            out += [
                f"{name}:{line} from {mod} import {n}"
                for n in names
                if n.startswith("_") and not n.startswith("__")
            ]
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        attr = node.attr
        if not attr.startswith("_") or attr.startswith("__") or attr in PUBLIC_UNDERSCORE:
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
            continue
        if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
            continue
        if (name, attr) in ALLOWED_PRIVATE:
            continue
        out.append(f"{name}:{node.lineno} .{attr} of {ast.unparse(owner)}")
    return out


def test_no_private_access_across_modules() -> None:
    """No module reads another module's (or another object's) underscore names."""
    bad = [u for name, path in MODULES.items() for u in _private_uses(name, path)]
    assert not bad, f"{len(bad)} private accesses:\n" + "\n".join(bad)


def test_the_checks_see_a_cycle_and_a_private_access(tmp_path: Path) -> None:
    """The helpers find what they exist to find (a two-file cycle, an underscore import and attribute)."""
    edges = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    assert _cycles(["a", "b", "c", "d"], edges) == [["a", "b", "c"]]
    assert _cycles(["a", "b"], {"a": {"b": 1}}) == []
    f = tmp_path / "m.py"
    f.write_text("from qbdl.x import _y, z\nimport os\nos._exit\nself._ok\nsuper()._ok\nt._asdict()\n")
    uses = _private_uses("qbdl.m", f)
    assert uses == ["qbdl.m:1 from qbdl.x import _y", "qbdl.m:3 ._exit of os"]


@pytest.mark.parametrize("name", sorted(ALLOWED_PRIVATE))
def test_allowlist_is_used(name: tuple[str, str]) -> None:
    """Every allowlisted third-party private is still read where it is listed (no stale entries)."""
    module, attr = name
    assert f".{attr}" in MODULES[module].read_text()
