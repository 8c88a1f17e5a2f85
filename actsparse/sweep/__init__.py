"""Sweeps (floor 3): compose a Hydra grid, validate and key its cells, run them as a Ray DAG.

compose.compose_grid(overrides) -> Grid; runner.plan_sweep(grid) -> (cells, dag, settings);
runner.run_sweep(grid) -> Outcome. Modules load on use: importing this package is cheap.
"""
