"""Test-wide settings: no network, W&B offline in a temp dir, headless matplotlib."""

import os
import sys
import tempfile
from pathlib import Path

_WANDB_TMP = tempfile.mkdtemp(prefix="qbdl-wandb-")
for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
    os.environ[var] = _WANDB_TMP
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ["MPLBACKEND"] = "Agg"

# tests/fabricate.py is imported by several test files as a plain module
sys.path.insert(0, str(Path(__file__).parent))
