"""The experiment pipeline as plain stages: quantize, evaluate, assemble and write the results, sweeps."""
