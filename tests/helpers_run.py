"""Compose the real Hydra config (as `python -m qbdl.run` does) with tiny settings for tests."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from qbdl.run import CONF_DIR

TINY = [
    "dnn.max_epochs=2",
    "bnn.max_epochs=1",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
    "eval.mc_samples=2",
    "quant.calib_batches=1",
    "quant.mc_samples=1",
    "quant.bank_size=2",
    "data.image_size=16",
    "logger=csv",
]


def compose_config(out_dir: Path, overrides: list[str] = (), tiny: bool = True) -> DictConfig:
    """The run config with `overrides`, writing into out_dir."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*(TINY if tiny else []), *overrides], return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
    return cfg
