"""LightningModule: ELBO training of a (Bayesian) classifier, MC validation."""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qbdl.bayes import bayesian_layers, elbo_terms, mc_predict
from qbdl.experiment.shard import destroy_group_at_exit
from qbdl.metrics import UncertaintyCalibrationError


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss becomes NaN or inf."""


class BayesianClassifier(L.LightningModule):
    """Trains `model` with the ELBO (CE_mean + beta * KL_sum / n_train) or plain CE when it has no Bayesian layer.

    `optimizer` and `scheduler` are partials (Hydra `_partial_: true`) taking params / the optimizer.
    """

    def __init__(
        self,
        model: nn.Module,
        n_train: int,
        optimizer: Callable,
        scheduler: Callable | None = None,
        beta: float = 1.0,
        kl_anneal_steps: int = 0,
        val_mc_samples: int = 1,
        stage: str = "bnn",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.model = model
        self.n_train = n_train
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.beta = beta
        self.kl_anneal_steps = kl_anneal_steps
        self.val_mc_samples = val_mc_samples
        self.seed = seed
        self.stage = stage
        self.is_bayesian = bool(bayesian_layers(model))
        self.val_uce = UncertaintyCalibrationError(n_bins=15)
        self.save_hyperparameters(
            {
                "n_train": n_train,
                "beta": beta,
                "kl_anneal_steps": kl_anneal_steps,
                "val_mc_samples": val_mc_samples,
            }
        )

    def setup(self, stage: str) -> None:
        destroy_group_at_exit()  # each DDP worker of either stage tears its gloo group down cleanly

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def kl_weight(self) -> float:
        """beta, linearly annealed from 0 over kl_anneal_steps optimizer steps."""
        if self.kl_anneal_steps <= 0:
            return self.beta
        return self.beta * min(1.0, (self.global_step + 1) / self.kl_anneal_steps)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self.model(x)
        if self.is_bayesian:
            terms = elbo_terms(logits, y, self.model, self.n_train, self.kl_weight())
            loss = terms["loss"]
            self.log(f"{self.stage}/train/nll", terms["nll"], on_step=True, on_epoch=True, batch_size=len(y))
            self.log(f"{self.stage}/train/kl", terms["kl"], on_step=True, on_epoch=False, batch_size=len(y))
            self.log(
                f"{self.stage}/train/kl_weight",
                self.kl_weight(),
                on_step=True,
                on_epoch=False,
                batch_size=len(y),
            )
        else:
            loss = F.cross_entropy(logits, y)
        if not math.isfinite(loss.item()):
            raise NonFiniteLossError(
                f"training loss is {loss.item()} at global step {self.global_step} (epoch {self.current_epoch}, "
                f"batch {batch_idx}). The last good checkpoint is kept; lower the learning rate, raise "
                "prior_sigma or moped_delta, or check the input data for NaN/inf."
            )
        self.log(
            f"{self.stage}/train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y)
        )
        self.log(
            f"{self.stage}/train/acc",
            (logits.argmax(-1) == y).float().mean(),
            on_epoch=True,
            batch_size=len(y),
        )
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        samples = self.val_mc_samples if self.is_bayesian else 1
        p = mc_predict(self.model, x, samples, seed=self.seed)
        self.model.eval()  # mc_predict restores the mode it found; Lightning validates in eval
        pbar = p.mean(0)
        nll = F.nll_loss(torch.log(pbar.clamp_min(1e-12)), y)
        self.log(f"{self.stage}/val/nll", nll, prog_bar=True, batch_size=len(y), sync_dist=True)
        self.log(
            f"{self.stage}/val/acc",
            (pbar.argmax(-1) == y).float().mean(),
            prog_bar=True,
            batch_size=len(y),
            sync_dist=True,
        )
        # a torchmetrics Metric: its bin counts are summed across ranks before UCE is computed
        self.val_uce.update(p, y)
        self.log(f"{self.stage}/val/uce", self.val_uce, on_epoch=True, batch_size=len(y))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Never overwrite the last good checkpoint with non-finite weights (a NaN/inf update just happened)."""
        bad = [
            k
            for k, t in checkpoint["state_dict"].items()
            if t.is_floating_point() and not torch.isfinite(t).all()
        ]
        if bad:
            raise NonFiniteLossError(
                f"weights became NaN or inf at global step {self.global_step} (epoch {self.current_epoch}; e.g. "
                f"{bad[:3]}), so no checkpoint was written at this step: the last good checkpoint is kept. Lower the "
                "learning rate, raise prior_sigma or moped_delta, or check the input data for NaN/inf."
            )

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.model.parameters())
        if self.scheduler_factory is None:
            return opt
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": self.scheduler_factory(opt), "interval": "epoch"},
        }
