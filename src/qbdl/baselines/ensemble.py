"""Deep ensemble (Lakshminarayanan et al. 2017): M independently trained members, predictive = mean of softmax.

The evaluation's MC protocol (qbdl.bayes.mc_logits) runs `samples` passes and calls set_mc_index(s) before
pass s: with samples = M, pass s is member s, so the evaluation's predictive mean over the S passes is
exactly the ensemble's mean of the members' probabilities, and the mutual information is the members'
disagreement. Forward budget: M backbone passes per image.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class Ensemble(nn.Module):
    """M member networks; forward runs the member of the current MC index (member 0 outside MC prediction)."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member network (ensemble.members >= 1)")
        self.members = nn.ModuleList(members)
        self.index: int | None = None

    def set_mc_index(self, index: int | None) -> None:
        """Select the member of MC pass `index` (None: member 0); called by qbdl.bayes.mc_logits."""
        if index is not None and not 0 <= index < len(self.members):
            raise ValueError(
                f"MC pass {index} asks for ensemble member {index}, but the ensemble has {len(self.members)} "
                "members: evaluate it with samples = ensemble.members"
            )
        self.index = index

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the selected member."""
        return self.members[self.index or 0](x)
