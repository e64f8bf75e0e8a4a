"""The graph of a `.qbdl` file: allowlisted ops, targets and keyword arguments, identifiers only, every edge to
an earlier node (nothing from the file reaches torch.fx's code generation unchecked)."""

from __future__ import annotations

import math
from typing import Any

from .schema_fields import (
    FUNCTIONS,
    MAX_NESTING,
    MAX_NODES,
    METHODS,
    MODULE_INPUTS,
    fail,
    identifier,
)


def _check_arg(path: str, where: str, a: Any, defined: set[str], depth: int = 0) -> None:
    """A graph argument: a literal (no strings), a reference to an earlier node, or a tuple/list/slice of them."""
    if depth > MAX_NESTING:
        fail(path, where, "...", f"arguments nested at most {MAX_NESTING} deep")
    if a is None or isinstance(a, bool):
        return
    if isinstance(a, int):
        if abs(a) > 2**31:
            fail(path, where, a, "an integer argument of magnitude <= 2^31")
        return
    if isinstance(a, float):
        if not math.isfinite(a):
            fail(path, where, a, "a finite number")
        return
    if isinstance(a, list):
        for i, x in enumerate(a):
            _check_arg(path, f"{where}[{i}]", x, defined, depth + 1)
        return
    if isinstance(a, dict) and len(a) == 1:
        ((tag, v),) = a.items()
        if tag == "node":
            if not isinstance(v, str) or v not in defined:
                fail(path, where, v, "the name of an earlier node of the graph")
            return
        if tag in ("tuple", "slice") and isinstance(v, list) and (tag == "tuple" or len(v) == 3):
            for i, x in enumerate(v):
                _check_arg(path, f"{where}.{tag}[{i}]", x, defined, depth + 1)
            return
    fail(
        path,
        where,
        a,
        "a number, true/false, null, {'node': NAME}, {'tuple': [...]}, a list or {'slice': [a, b, c]}",
    )


def _kwargs(path: str, where: str, kw: Any, allowed: set[str], defined: set[str]) -> None:
    if not (isinstance(kw, dict) and list(kw) == ["dict"] and isinstance(kw["dict"], dict)):
        fail(path, where, kw, "{'dict': {NAME: value}}")
    for k, v in kw["dict"].items():
        if k not in allowed:
            fail(
                path,
                f"{where}.{k!s:.40}",
                k,
                f"a keyword argument of this operation: one of {sorted(allowed) or 'none'}",
            )
        _check_arg(path, f"{where}.{k}", v, defined, 1)


def check_graph(path: str, nodes: Any, modules: dict) -> None:
    """The graph: allowlisted ops and targets, identifiers only, every edge to an earlier node, one output."""
    if not isinstance(nodes, list) or not 2 <= len(nodes) <= MAX_NODES:
        fail(path, "nodes", type(nodes).__name__, f"a list of 2..{MAX_NODES} graph nodes")
    defined: set[str] = set()
    used_modules: set[str] = set()
    seen_compute = False
    for i, n in enumerate(nodes):
        where = f"nodes[{i}]"
        if not isinstance(n, dict) or set(n) != {"name", "op", "target", "args", "kwargs"}:
            fail(
                path,
                where,
                n if not isinstance(n, dict) else sorted(n),
                "an object with name, op, target, args, kwargs",
            )
        name, op, target, args = n["name"], n["op"], n["target"], n["args"]
        identifier(path, f"{where}.name", name)
        if name in defined:
            fail(path, f"{where}.name", name, "a name no earlier node has")
        if not (isinstance(args, dict) and list(args) == ["tuple"] and isinstance(args["tuple"], list)):
            fail(path, f"{where}.args", args, "{'tuple': [...]}")
        args = args["tuple"]
        last = i == len(nodes) - 1
        if op == "placeholder":
            if seen_compute:
                fail(path, f"{where}.op", op, "inputs (placeholders) before every other node")
            identifier(path, f"{where}.target", target)
            if args or n["kwargs"] != {"dict": {}}:
                fail(path, f"{where}.args", n["args"], "no arguments (an input has no default value)")
        elif op == "output":
            if not last or target != "output" or len(args) != 1 or n["kwargs"] != {"dict": {}}:
                fail(path, where, {"op": op, "target": target}, "one output node, last, with one value")
            _check_arg(path, f"{where}.args", args, defined)
        elif op in ("call_module", "call_function", "call_method"):
            seen_compute = True
            if last:
                fail(path, where, op, "the output node last")
            if op == "call_module":
                if not isinstance(target, str) or target not in modules:
                    fail(path, f"{where}.target", target, "a module listed in the file's modules")
                used_modules.add(target)
                allowed: set[str] = set()
                n_in = MODULE_INPUTS.get(modules[target]["type"], 1)
                if len(args) != n_in or not all(isinstance(a, dict) and list(a) == ["node"] for a in args):
                    fail(
                        path,
                        f"{where}.args",
                        n["args"],
                        f"{n_in} graph value(s): a {modules[target]['type']} reads {n_in}",
                    )
            elif op == "call_function":
                if not isinstance(target, str) or target not in FUNCTIONS:
                    fail(
                        path,
                        f"{where}.target",
                        target,
                        f"one of the functions save_qbnn writes: {sorted(FUNCTIONS)}",
                    )
                allowed = FUNCTIONS[target]
            else:
                if not isinstance(target, str) or target not in METHODS:
                    fail(
                        path,
                        f"{where}.target",
                        target,
                        f"one of the tensor methods save_qbnn writes: {sorted(METHODS)}",
                    )
                allowed = METHODS[target]
                if not args or not (isinstance(args[0], dict) and list(args[0]) == ["node"]):
                    fail(path, f"{where}.args", n["args"], "the tensor the method is called on first")
            _check_arg(path, f"{where}.args", args, defined)
            _kwargs(path, f"{where}.kwargs", n["kwargs"], allowed, defined)
        else:
            fail(
                path,
                f"{where}.op",
                op,
                "placeholder, call_module, call_function, call_method or output (get_attr and others are never written)",
            )
        defined.add(name)
    if nodes[-1].get("op") != "output":
        fail(path, f"nodes[{len(nodes) - 1}].op", nodes[-1].get("op"), "output (the last node)")
    unused = sorted(set(modules) - used_modules)
    if unused:
        fail(path, "modules", unused[:3], "only modules the graph calls")
