"""The `actsparse` console script.

    actsparse sweep +sweep=demo                                  a named preset from sweeps/
    actsparse sweep -m method=dense,teal sparsity=0.3,0.5         any Hydra multirun grid over conf/
    actsparse sweep --dry-run ...                                 show the cells and their keys, run nothing
    actsparse report [--tracking-uri URI] [--sweep-id ID]         tables, Pareto front and plot from MLflow

Every user mistake ends with one `actsparse: error: ...` message and exit status 2, before any
model is loaded, Ray is started or an MLflow run is created.
"""
from __future__ import annotations

import argparse
import sys

USAGE = "actsparse {sweep,report} ...  (actsparse <command> --help for details)"


def _sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="actsparse sweep", description="Run a grid of cells (model x method x sparsity x eval) on Ray, "
        "recording each in MLflow. Overrides are Hydra overrides over conf/; a=1,2 sweeps a value.",
        epilog="examples: actsparse sweep +sweep=demo | actsparse sweep -m method=dense,teal sparsity=0.3,0.5 "
               "model=/path/to/hf_dir")
    p.add_argument("-m", "--multirun", action="store_true",
                   help="accepted as in Hydra; a sweep always runs its whole grid")
    p.add_argument("--dry-run", action="store_true", help="validate and print the grid's cells and keys; run nothing")
    p.add_argument("--cfg", action="store_true", help="print every cell's resolved configuration and exit")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. +sweep=demo method=teal sparsity=0.3,0.5")
    return p


def _report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="actsparse report",
                                description="Write a sweep's Markdown tables, Pareto front and plot from MLflow runs, "
                                            "and log them to the sweep's parent run.")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow tracking URI (default: %(default)s)")
    p.add_argument("--experiment", default="actsparse", help="MLflow experiment (default: %(default)s)")
    p.add_argument("--sweep-id", default=None, help="the sweep to report (default: the latest sweep)")
    p.add_argument("--all", action="store_true", help="every finished cell of the experiment, not one sweep")
    p.add_argument("--out", default="sweep_results", help="where to write the report (default: %(default)s/<sweep>)")
    p.add_argument("--no-log", action="store_true", help="do not upload the report to the parent run")
    return p


def cmd_sweep(argv: list[str]) -> int:
    """Compose, validate and run a sweep; return the exit status."""
    args = _sweep_parser().parse_intermixed_args(argv)
    from .sweep.compose import compose_grid

    grid = compose_grid(args.overrides)
    if args.cfg:
        from omegaconf import OmegaConf

        for ov, cfg in grid.points:
            print(f"# {' '.join(ov) or '(defaults)'}\n{OmegaConf.to_yaml(cfg)}")
        return 0
    if args.dry_run:
        from .sweep.runner import plan_sweep

        cells, dag, _ = plan_sweep(grid)
        print(f"{len(cells)} grid points -> {len(dag.cells)} cells, {len(dag.stats)} calibrations, "
              f"{len(dag.plans)} plans, {len(dag.dense)} dense evaluations")
        for c in cells:
            dup = "" if dag.cells[c.key] is c else f"  (duplicate of #{dag.cells[c.key].index})"
            print(f"#{c.index:<3} {c.label:<40} cell {c.key}  stats {c.stats.key}  plan {c.plan.key}{dup}")
        return 0
    from .sweep.runner import run_sweep

    out = run_sweep(grid)
    print(out.summary_line(), flush=True)
    return out.exit_code


def cmd_report(argv: list[str]) -> int:
    """Build a report from MLflow; return the exit status."""
    args = _report_parser().parse_args(argv)
    from .report.build import report_sweep

    rep = report_sweep(args.tracking_uri, args.experiment, args.sweep_id, args.out, all_runs=args.all,
                       log_to_parent=not args.no_log)
    for text in (rep.table, rep.front):
        if text:
            print(text + "\n")
    print(f"report: {rep.markdown} (plot: {rep.plot}, runs: {rep.csv})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"sweep": cmd_sweep, "report": cmd_report}
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {USAGE}\n\n{__doc__}")
        return 0 if argv else 2
    if argv[0] not in commands:
        print(f"actsparse: error: unknown command {argv[0]!r}; expected one of {', '.join(commands)}\nusage: {USAGE}",
              file=sys.stderr)
        return 2
    from .errors import ActsparseError

    try:
        return commands[argv[0]](argv[1:])
    except ActsparseError as e:
        print(f"actsparse: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("actsparse: interrupted; finished cells are recorded, re-run the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
