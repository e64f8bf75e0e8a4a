"""Int8 mu and sigma freed while a fresh layer's in-place sampler holds them as its int16 operands.

Why: after its first sampled forward a fresh layer computes only with the packed sample and the operands in
packed order (inplace.py); its int8 mu and sigma in their own order (2 bytes a weight, ~49 MiB of ResNet-50)
serve saving, export, the mean and other samplers. The operands are mu_q and sigma_q times a per-channel factor
(noise.operands), so where rounding back by that factor gives them exactly (checked before anything is freed)
they are dropped and rebuilt on the first read: reading `mu_q` or `sigma_q`, a state_dict, a copy or a pickle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import noise


@dataclass(frozen=True)
class Released:
    """What rebuilds a layer's int8 mu and sigma from its in-place sampler's operands."""

    shape: tuple[int, ...]
    m_mu: Tensor  # float64 per channel: mu16 = round(mu_q * m_mu)
    m_sg: Tensor


class ReleasableInt8(nn.Module):
    """The part of QuantLayer that frees and rebuilds `mu_q` / `sigma_q` (buffers; keys kept, values None)."""

    _released: Released | None = None

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The int8 weight's shape (output channel first); reading it never rebuilds released tensors."""
        if self._released is not None:
            return self._released.shape
        return tuple(self._buffers["mu_q"].shape)

    def release_int8(self, mu16: Tensor, sg16: Tensor) -> bool:
        """Free int8 mu and sigma while the in-place sampler holds their operands `mu16`, `sg16` (original order).

        Only where they are recovered exactly from those operands (checked here). True when released.
        """
        if self._released is not None or self.inplace_sampler is None:
            return self._released is not None
        m_mu, m_sg = noise.operand_factors(self.mu_scale, self.sigma_scale, self.w_scale)
        mu_q, sigma_q = self._buffers["mu_q"], self._buffers["sigma_q"]
        exact_mu = torch.equal(noise.from_operand(mu16, m_mu), mu_q)
        if not (exact_mu and torch.equal(noise.from_operand(sg16, m_sg), sigma_q)):
            return False  # a factor too small to invert: this layer keeps its int8 tensors
        self._released = Released(tuple(mu_q.shape), m_mu, m_sg)
        self._buffers["mu_q"] = self._buffers["sigma_q"] = None  # keys kept: state_dict order is unchanged
        return True

    def _rebuild_int8(self) -> None:
        rel = self._released
        mu16, sg16 = self.inplace_sampler.operands_in_order(rel.shape)
        self._buffers["mu_q"] = noise.from_operand(mu16, rel.m_mu)
        self._buffers["sigma_q"] = noise.from_operand(sg16, rel.m_sg)
        self._released = None

    def __getattr__(self, name: str):
        if name in ("mu_q", "sigma_q") and self.__dict__.get("_released") is not None:
            self._rebuild_int8()
        return super().__getattr__(name)

    def __getstate__(self) -> dict:
        if self._released is not None:  # a copy or pickle drops the packed sampler: it takes the int8 tensors
            self._rebuild_int8()
        return super().__getstate__()

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        if self._released is not None:
            self._rebuild_int8()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        if self._released is not None:
            self._rebuild_int8()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
