"""A callback for tests: rank 1 dies (os._exit) once rank 0 has cached its first completely evaluated variant."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import lightning as L


class KillRankOne(L.Callback):
    """Starts a watcher in rank 1 at fit start; it exits the process mid-evaluation, as a kill would."""

    def __init__(self, cache_dir: str) -> None:
        self.cache_dir = cache_dir

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank != 1:
            return

        def watch() -> None:
            while not any(Path(self.cache_dir).glob("*.safetensors")):
                time.sleep(0.02)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
