"""The torch.fx helpers that PTQ, conversion and the fidelity tools share: the tracer and graph edits."""

from __future__ import annotations

from torch import fx, nn

from ..bayes.layers import BayesianLayer
from .prepared import ObservedAdd, ObservedQuant, PreparedLayer

#: The layers PTQ quantizes (and folds BatchNorm into): conv, linear, and their Bayesian versions.
WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, BayesianLayer)


def is_ao(m: nn.Module | None, *names: str) -> bool:
    """True for torch.ao's QuantStub / DeQuantStub / FloatFunctional (by class, without importing torch.ao)."""
    return type(m).__name__ in names and type(m).__module__.startswith("torch.ao")


class LeafTracer(fx.Tracer):
    """fx tracer that keeps conv/linear (Bayesian or not), prepared modules and torch.ao stubs as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        """Leaf: every Conv/Linear (subclasses too), so prepare sees it and can refuse a custom forward."""
        if isinstance(m, (*WEIGHTED, PreparedLayer, ObservedQuant, ObservedAdd)) or is_ao(
            m, "QuantStub", "DeQuantStub"
        ):
            return True
        return super().is_leaf_module(m, qualname)


def module_of(gm: nn.Module, node: fx.Node) -> nn.Module | None:
    """The module a call_module node calls (None for any other node)."""
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def set_module(gm: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted `path` (its parent must exist)."""
    parent, _, name = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def sole_user(node: fx.Node) -> fx.Node | None:
    """The one node that reads `node`, or None when none or several do."""
    users = list(node.users)
    return users[0] if len(users) == 1 else None
