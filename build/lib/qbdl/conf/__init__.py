"""qbdl's Hydra configs, shipped inside the package (the repo's top-level conf/ links here)."""
