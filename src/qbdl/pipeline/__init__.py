"""The Hydra/Lightning pipeline of one experiment, above the framework-free qbdl.experiment.

`build_run(cfg)` / `load_run(run_dir)` construct a run's parts (qbdl.pipeline.build); `run(cfg)` runs it
(qbdl.pipeline.run, the body of `python -m qbdl.run`); `SweepSummary` closes a multirun (qbdl.pipeline.sweep).
"""
