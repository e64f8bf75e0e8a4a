"""Last-layer Laplace (Daxberger et al. 2021) with the GGN of the softmax likelihood, FP32 or INT8 backbone.

The backbone (the network up to its pooled features phi) runs once per image; only the last layer is
Bayesian. With phi~ = [phi, 1] and the last layer's parameters theta = vec([W | b]) (row c: class c's
weights then its bias), the logits are f = (I_C kron phi~^T) theta and the GGN of the summed cross-entropy is

    H = sum_n Lambda_n kron phi~_n phi~_n^T,    Lambda_n = diag(p_n) - p_n p_n^T,

* ``full``: H as it is, a C(F+1) square matrix (posterior covariance (H + delta I)^-1);
* ``kron``: KFAC as laplace-torch's KronLLLaplace: block-diagonal over W and b, the weight block
  (1/N)(sum_n Lambda_n) kron (sum_n phi_n phi_n^T), the bias block sum_n Lambda_n; inverted through the
  factors' eigendecompositions (what scales to ResNet-50 / ImageNet: 2048 x 1000).

Prior N(0, 1/delta I); delta is chosen on the validation split (never test) from a grid, by the NLL of the
probit predictive (deterministic: no MC noise in the choice). The logit distribution (the linearised, 'GLM'
predictive) is N(W phi~, Sigma_f), Sigma_f = (I kron phi~^T) Sigma (I kron phi~) (C x C per image).
Prediction: ``mc`` (default) draws S logit vectors f_mu + L eps from it, L a square root of Sigma_f; each MC
pass of the evaluation reuses the backbone's features of its batch (see LastLayerLaplace.forward), so the
evaluation's MI, aleatoric split and per-sample temperature scaling apply as to every other variant, at the
cost of one backbone pass per image. ``probit``: one pass, softmax(f_mu / sqrt(1 + pi/8 diag Sigma_f)), given
as log-probabilities (MI is 0 by construction).
Forward budget: 1 backbone pass per image (+ S samples of a C-dimensional Gaussian).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

HESSIANS = ("full", "kron")
LINKS = ("mc", "probit")
FULL_MAX_PARAMS = 20_000  # C (F + 1) above this: the full GGN (its square, float64) would not fit: use kron


def _aug(phi: Tensor) -> Tensor:
    """Features with a constant 1 appended (the bias's input)."""
    return torch.cat([phi, torch.ones_like(phi[:, :1])], 1)


@torch.no_grad()
def features(backbone: nn.Module, loader: Iterable, device: str = "cpu") -> tuple[Tensor, Tensor]:
    """Backbone features [N, F] (float64, on the CPU) and targets [N] over a loader."""
    backbone.eval()
    phis, ys = [], []
    for x, y in loader:
        phis.append(backbone(x.to(device)).float().flatten(1).double().cpu())
        ys.append(y)
    return torch.cat(phis), torch.cat(ys)


def ggn_terms(phi: Tensor, head_weight: Tensor, hessian: str) -> dict[str, Tensor]:
    """The GGN's sufficient statistics of the last layer at its MAP weights [C, F+1] on features phi [N, F].

    full: {'H': sum_n Lambda_n kron phi~ phi~^T}; kron: {'G': sum_n Lambda_n, 'A': sum_n phi phi^T, 'n': N}.
    """
    a = _aug(phi.double())
    p = torch.softmax(a @ head_weight.double().T, -1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    if hessian == "full":
        c, f = head_weight.shape
        h = torch.einsum("ncd,nf,ng->cfdg", lam, a, a).reshape(c * f, c * f)
        return {"H": h}
    phi = phi.double()
    return {"G": lam.sum(0), "A": phi.T @ phi, "n": torch.tensor(float(len(a)), dtype=torch.float64)}


class LastLayerLaplace(nn.Module):
    """Backbone features -> Gaussian last layer (see module doc); forward gives one logit sample per MC pass."""

    def __init__(
        self,
        backbone: nn.Module,
        head_weight: Tensor,
        terms: dict[str, Tensor],
        prior_precision: float,
        hessian: str = "full",
        link: str = "mc",
    ) -> None:
        super().__init__()
        if hessian not in HESSIANS:
            raise ValueError(f"lla.hessian: choose one of {list(HESSIANS)}, got {hessian!r}")
        if link not in LINKS:
            raise ValueError(f"lla.link: choose one of {list(LINKS)}, got {link!r}")
        self.backbone, self.hessian, self.link = backbone, hessian, link
        self.register_buffer("weight", head_weight.detach().double().cpu().clone())  # [C, F+1]: [W | b]
        for k, v in terms.items():
            self.register_buffer(f"ggn_{k}", v.detach().double().cpu().clone())
        self.index: int | None = None
        self._cache: tuple[Tensor, Tensor, Tensor] | None = None
        self.set_prior_precision(prior_precision)

    def set_prior_precision(self, delta: float) -> None:
        """Posterior of the last layer under prior precision delta (a buffer: part of the model's fingerprint)."""
        if not delta > 0:
            raise ValueError(f"the prior precision must be > 0, got {delta}")
        if not any(k.startswith("ggn_") for k in self._buffers):
            raise ValueError(
                "this Laplace model dropped its GGN (drop_ggn): refit it to change the prior precision"
            )
        self.register_buffer("prior_precision", torch.tensor(float(delta), dtype=torch.float64))
        c, f = self.weight.shape
        if self.hessian == "full":
            prec = self.ggn_H + delta * torch.eye(c * f, dtype=torch.float64)
            self.register_buffer("sigma", torch.cholesky_inverse(torch.linalg.cholesky(prec)))
        else:  # weights: (G/n kron A) + delta I = (Qg kron Qa) diag(lg_i la_j / n + delta) (Qg kron Qa)^T
            lg, qg = torch.linalg.eigh(self.ggn_G)
            la, qa = torch.linalg.eigh(self.ggn_A)
            lg, la = lg.clamp_min(0), la.clamp_min(0)
            self.register_buffer("q_g", qg)
            self.register_buffer("q_a", qa)
            self.register_buffer("inv_eig", 1.0 / (lg[:, None] * la[None, :] / self.ggn_n + delta))  # [C, F]
            self.register_buffer("inv_bias", 1.0 / (lg + delta))  # bias block: G + delta I
        self._cache = None

    def drop_ggn(self) -> None:
        """Free the GGN statistics once the prior precision is chosen: what stays resident is the posterior."""
        for k in [k for k in self._buffers if k.startswith("ggn_")]:
            del self._buffers[k]

    def logit_distribution(self, phi: Tensor) -> tuple[Tensor, Tensor]:
        """Mean [B, C] and covariance [B, C, C] (float64) of the linearised logits at features phi [B, F]."""
        a = _aug(phi.double())
        mu = a @ self.weight.T
        c, f = self.weight.shape
        if self.hessian == "full":
            s = self.sigma.reshape(c, f, c, f)
            cov = torch.einsum("bf,cfdg,bg->bcd", a, s, a)
        else:
            v = (phi.double() @ self.q_a) ** 2  # [B, F]
            w = v @ self.inv_eig.T + self.inv_bias  # [B, C]: the variance along each eigenvector of G
            cov = torch.einsum("ci,bi,di->bcd", self.q_g, w, self.q_g)
        return mu, cov

    def set_mc_index(self, index: int | None) -> None:
        """MC pass `index` of the current batch (qbdl.bayes.mc_logits): passes after the first reuse its features."""
        self.index = index
        if index is None:
            self._cache = None

    def _moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logit mean and covariance root (mc) or covariance (probit) of batch x; later MC passes reuse them."""
        if self._cache is not None and self._cache[0] is x and self.index not in (None, 0):
            return self._cache[1], self._cache[2]
        phi = self.backbone(x).float().flatten(1).to(self.weight.device)
        mu, cov = self.logit_distribution(phi)
        if self.link == "mc":
            evals, evecs = torch.linalg.eigh(cov)  # a square root robust to rank deficiency
            root = evecs * evals.clamp_min(0).sqrt()[:, None, :]
            self._cache = (x, mu, root)
            return mu, root
        return mu, cov

    def forward(self, x: Tensor) -> Tensor:
        """One logit sample (link 'mc') or the probit log-probabilities (link 'probit'), float32 [B, C]."""
        mu, m = self._moments(x)
        if self.link == "probit":
            return torch.log_softmax(probit_scale(mu, m), -1).float().to(x.device)
        eps = torch.randn(mu.shape, dtype=torch.float32).to(mu)  # drawn on the CPU: the same on any device
        return (mu + torch.einsum("bcd,bd->bc", m, eps)).float().to(x.device)


def probit_scale(mu: Tensor, cov: Tensor) -> Tensor:
    """The probit approximation's scaled logits mu / sqrt(1 + pi/8 diag(cov)) (MacKay 1992)."""
    return mu / torch.sqrt(1.0 + math.pi / 8.0 * torch.diagonal(cov, dim1=-2, dim2=-1))


def probit_nll(model: LastLayerLaplace, phi: Tensor, y: Tensor) -> float:
    """Mean NLL of the probit predictive on features phi [N, F] and targets y [N]."""
    mu, cov = model.logit_distribution(phi)
    return float(nn.functional.cross_entropy(probit_scale(mu, cov), y))


def fit_last_layer_laplace(
    backbone: nn.Module,
    head: nn.Linear,
    train: tuple[Tensor, Tensor] | Iterable,
    val: tuple[Tensor, Tensor] | Iterable,
    prior_precisions: Sequence[float],
    hessian: str = "full",
    link: str = "mc",
) -> LastLayerLaplace:
    """Last-layer Laplace at `head`'s weights: GGN on the training features, delta by validation probit NLL.

    train/val: (features, targets) or loaders of (x, y) run through `backbone` once. The chosen delta and the
    validation NLL of every candidate are in the model's `fit_report`.
    """
    if hessian not in HESSIANS:
        raise ValueError(f"lla.hessian: choose one of {list(HESSIANS)}, got {hessian!r}")
    if not prior_precisions or any(not d > 0 for d in prior_precisions):
        raise ValueError(
            f"lla.prior_precisions: a non-empty list of positive values, got {list(prior_precisions)}"
        )
    phi, _ = train if isinstance(train, tuple) else features(backbone, train)
    phi_val, y_val = val if isinstance(val, tuple) else features(backbone, val)
    weight = torch.cat([head.weight.detach(), head.bias.detach()[:, None]], 1).double().cpu()
    n_params = weight.numel()
    if hessian == "full" and n_params > FULL_MAX_PARAMS:
        raise ValueError(
            f"lla.hessian=full on a last layer of {n_params} parameters needs a {n_params}^2 float64 matrix "
            f"({8 * n_params**2 / 2**30:.1f} GiB); use lla.hessian=kron (Kronecker-factored) for this model"
        )
    terms = ggn_terms(phi, weight, hessian)
    model = LastLayerLaplace(backbone, weight, terms, prior_precisions[0], hessian, link)
    scores = {}
    for d in prior_precisions:
        model.set_prior_precision(float(d))
        scores[float(d)] = probit_nll(model, phi_val, y_val)
    best = min(scores, key=scores.get)
    model.set_prior_precision(best)
    model.drop_ggn()  # deployed: the posterior only
    edge = len(scores) > 1 and best in (min(scores), max(scores))
    if edge:
        warnings.warn(
            f"last-layer Laplace: the validation NLL is lowest at the edge of lla.prior_precisions (delta = {best:g}); "
            "the optimum may lie beyond it: widen the grid",
            RuntimeWarning,
            stacklevel=2,
        )
    model.fit_report = {
        "prior_precision": best,
        "val_probit_nll": scores,
        "n_train": int(len(phi)),
        "at_grid_edge": edge,
    }
    return model
