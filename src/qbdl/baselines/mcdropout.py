"""MC dropout (Gal & Ghahramani 2016): dropout kept on at test time, S stochastic passes, FP32 and INT8.

Placement (`placement`, any of):
* ``blocks``: after every residual block (on the block's output, after its ReLU), as in the MC-dropout
  ResNets of Ovadia et al. 2019;
* ``head``: on the pooled features, before the final linear layer (the classic classifier dropout).

INT8: dropout runs on the integer activations, on the grid (scale s, zero point z, range 0..qmax) of the
activation it reads, and writes on that same grid, so nothing downstream changes. A dropped value becomes z
(the real 0); a kept value q becomes q' = clamp(z + round((q - z) / (1 - p)), 0, qmax) (round half to even):
the 1/(1 - p) rescaling is done on the grid, within half a step of FP32 dropout on the dequantized value
s (q - z) / (1 - p), and equal to it wherever the rescaled value stays inside the calibrated range (larger
values saturate at qmax, like any activation beyond its calibrated range). FP32 and INT8 draw the keep mask
the same way (`keep_mask`), so under the same seed both drop the same positions.
Forward budget: S backbone passes per image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, fx, nn

PLACEMENTS = ("blocks", "head")


def keep_mask(shape: torch.Size, p: float, device: torch.device | str = "cpu") -> Tensor:
    """Bernoulli(1 - p) keep mask (bool) from torch's global RNG: the one draw FP32 and INT8 dropout share."""
    return torch.empty(shape, device=device).bernoulli_(1.0 - p).bool()


def _check_p(p: float) -> float:
    """The dropout rate as a float, refused outside [0, 1)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"mcd.p is the dropout rate, 0 <= p < 1; got {p}")
    return float(p)


class MCDropout(nn.Module):
    """Dropout that stays on in eval mode (Monte Carlo dropout); kept values scaled by 1 / (1 - p)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = _check_p(p)

    def forward(self, x: Tensor) -> Tensor:
        """x * mask / (1 - p) with a fresh mask."""
        if self.p == 0.0:
            return x
        return x * keep_mask(x.shape, self.p, x.device).to(x.dtype) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        """The rate, in the module's repr."""
        return f"p={self.p}"


def int8_dropout(q: Tensor, p: float, zero_point: int, qmax: int, keep: Tensor | None = None) -> Tensor:
    """Dropout of a uint8 activation on its own grid: dropped -> z, kept -> clamp(z + round((q - z)/(1-p)), 0, qmax)."""
    if keep is None:
        keep = keep_mask(q.shape, p, q.device)
    scaled = torch.round((q.float() - zero_point) * (1.0 / (1.0 - p))).add_(zero_point).clamp_(0, qmax)
    return torch.where(keep, scaled, torch.full_like(scaled, zero_point)).to(torch.uint8)


class QDropout(nn.Module):
    """MC dropout on a uint8 activation with zero point `zero_point` and range 0..qmax (see int8_dropout)."""

    def __init__(self, p: float, scale: float, zero_point: int, qmax: int) -> None:
        super().__init__()
        self.p, self.scale, self.zero_point, self.qmax = _check_p(p), float(scale), int(zero_point), int(qmax)

    def forward(self, q: Tensor) -> Tensor:
        """The dropped-out activation, on the input's grid."""
        return q if self.p == 0.0 else int8_dropout(q, self.p, self.zero_point, self.qmax)

    def spec(self) -> dict:
        """JSON-able constructor arguments."""
        return {"p": self.p, "scale": self.scale, "zero_point": self.zero_point, "qmax": self.qmax}


def add_mc_dropout(model: nn.Module, p: float, placement: Sequence[str]) -> nn.Module:
    """Insert MCDropout(p) into a ResNet in place (`placement`: 'blocks' and/or 'head'); returns the model.

    'blocks' wraps every block of the stages layer1..layer4 as Sequential(block, MCDropout); 'head' wraps the
    final linear layer `fc` as Sequential(MCDropout, fc). Parameters keep their initialisation.
    """
    bad = [x for x in placement if x not in PLACEMENTS]
    if bad or not placement:
        raise ValueError(f"mcd.placement: choose one or more of {list(PLACEMENTS)}, got {list(placement)}")
    _check_p(p)
    stages = [m for n, m in model.named_children() if n.startswith("layer") and isinstance(m, nn.Sequential)]
    if "blocks" in placement:
        if not stages:
            raise ValueError(
                f"mcd.placement 'blocks' needs a ResNet with stages layer1.. (nn.Sequential of blocks); "
                f"{type(model).__name__} has none: use placement [head]"
            )
        for stage in stages:
            for i, block in enumerate(list(stage)):
                stage[i] = nn.Sequential(block, MCDropout(p))
    if "head" in placement:
        if not isinstance(getattr(model, "fc", None), nn.Linear):
            raise ValueError(
                f"mcd.placement 'head' needs a final nn.Linear `fc`; {type(model).__name__} has none"
            )
        model.fc = nn.Sequential(MCDropout(p), model.fc)
    return model


def for_ptq(model: nn.Module) -> nn.Module:
    """The model with every MCDropout replaced by nn.Dropout (identity in eval: calibration sees no dropout).

    nn.Dropout survives qbdl.quant's PTQ as a pass-through node on the INT8 graph; `to_int8_dropout` then
    turns each into a QDropout on its input's grid. Modifies `model` in place; returns it.
    """
    for name, m in list(model.named_modules()):
        if isinstance(m, MCDropout):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, nn.Dropout(m.p))
    return model


def _grid(gm: fx.GraphModule, node: fx.Node) -> tuple[float, int, int]:
    """(scale, zero point, qmax) of the uint8 activation `node` writes, from the INT8 module that made it."""
    from qbdl.quant import QAdd, Quantize, QuantLayer

    while True:
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(mod, QuantLayer):
            return mod.out_scale, mod.out_zp, mod.qmax
        if isinstance(mod, (QAdd, Quantize)):
            return mod.scale, mod.zero_point, mod.qmax
        src = next((a for a in node.args if isinstance(a, fx.Node)), None)
        if src is None:
            raise ValueError(f"{node.name}: no INT8 producer found for the dropout's input")
        node = src  # ReLU, pooling and shape ops keep their input's grid


def to_int8_dropout(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace every nn.Dropout of a converted INT8 graph by QDropout on its input's grid (in place)."""
    n = 0
    for node in gm.graph.nodes:
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(mod, nn.Dropout):
            scale, zp, qmax = _grid(gm, node.args[0])
            parent, _, child = node.target.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, child, QDropout(mod.p, scale, zp, qmax))
            n += 1
    if n == 0:
        raise ValueError("the INT8 model has no dropout to run: quantize the MC-dropout net (for_ptq) first")
    return gm
