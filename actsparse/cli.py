"""The `actsparse` console script.

    actsparse sweep +sweep=demo                                  a named preset from sweeps/
    actsparse sweep -m method=dense,teal sparsity=0.3,0.5         any Hydra multirun grid over conf/
    actsparse sweep --dry-run ...                                 show the cells and their keys, run nothing
    actsparse sweep --search 'ppl<=1.02x' -m method=teal,cats     per method, the largest target within a budget
    actsparse report [--tracking-uri URI] [--sweep-id ID]         fronts, iso-quality, tables, plots, HTML page
    actsparse ls methods|measures|models|tasks|sweeps             what exists (methods with their parameters, ...)
    actsparse cache ls|clear [--store DIR] [--kind K] [--yes]     the artifact store: list, or delete (asks first)

Every user mistake ends with one `actsparse: error: ...` message and exit status 2, before any
model is loaded, Ray is started or an MLflow run is created.
"""
from __future__ import annotations

import argparse
import sys

USAGE = "actsparse {sweep,report,ls,cache} ...  (actsparse <command> --help for details)"


def _sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="actsparse sweep", description="Run a grid of cells (model x method x sparsity x eval) on Ray, "
        "recording each in MLflow. Overrides are Hydra overrides over conf/; a=1,2 sweeps a value.",
        epilog="examples: actsparse sweep +sweep=demo | actsparse sweep -m method=dense,teal sparsity=0.3,0.5 "
               "model=/path/to/hf_dir")
    p.add_argument("-m", "--multirun", action="store_true",
                   help="accepted as in Hydra; a sweep always runs its whole grid")
    p.add_argument("--dry-run", action="store_true", help="validate and print the grid's cells and keys; run nothing")
    p.add_argument("--cfg", action="store_true",
                   help="print every grid point's resolved configuration (method parameters with their defaults) "
                        "and exit; `--cfg job` as in Hydra")
    p.add_argument("--search", metavar="BUDGET", default=None,
                   help="search mode: per model x method, bisect for the largest target sparsity whose quality "
                        "stays within BUDGET, e.g. 'ppl<=1.02x', 'acc_avg>=dense-1', 'fidelity/cos>=0.99x' "
                        "(the grid's sparsity values are ignored)")
    p.add_argument("--tol", type=float, default=0.01, help="search: resolution in target sparsity (default 0.01)")
    p.add_argument("--max-sparsity", type=float, default=0.9,
                   help="search: the largest target probed (default 0.9)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. +sweep=demo method=teal sparsity=0.3,0.5")
    return p


def _report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="actsparse report",
        description="Write a sweep's report from MLflow runs: Pareto fronts, iso-quality and iso-sparsity "
                    "comparisons, paper tables (Markdown + LaTeX), plots (PNG + SVG) and one static HTML page; "
                    "log it to the sweep's parent run.",
        epilog="examples: actsparse report | actsparse report --quality acc_avg --budget 1pt | "
               "actsparse report --all --model tiny-llama --since 2025-06-01 --tag device=cuda")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow tracking URI (default: %(default)s)")
    p.add_argument("--experiment", default="actsparse", help="MLflow experiment (default: %(default)s)")
    p.add_argument("--sweep-id", action="append", default=[],
                   help="the sweep to report (default: the latest); with --all, repeatable, keeps these sweeps")
    p.add_argument("--all", action="store_true", help="every finished cell of the experiment, not one sweep")
    p.add_argument("--model", action="append", default=[], help="keep runs of this model (repeatable)")
    p.add_argument("--method", action="append", default=[],
                   help="keep runs of this method (repeatable; the dense runs stay, as the reference)")
    p.add_argument("--since", default=None, help="keep runs started at or after this date (2025-06-30[T14:00], UTC)")
    p.add_argument("--until", default=None, help="keep runs started before this date")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                   help="keep runs with this tag (repeatable)")
    p.add_argument("--quality", action="append", default=[], metavar="METRIC",
                   help="quality metric(s) to compare: ppl, acc_avg, acc/<task>, fidelity/cos, or name:min|max "
                        "(default: the recorded ones of ppl, acc_avg, fidelity/cos)")
    p.add_argument("--budget", action="append", default=[], metavar="[METRIC=]SPEC",
                   help="iso-quality budget: 1.02x (ratio to dense), 1pt (accuracy points), 0.5abs; without "
                        "METRIC= it applies to the first quality (default: 1.02x for ppl, 1pt for accuracies)")
    p.add_argument("--iso-sparsity", default=None, metavar="S1,S2,...",
                   help="effective sparsities of the iso-sparsity tables (default: the sweep's target sparsities)")
    p.add_argument("--out", default="sweep_results", help="where to write the report (default: %(default)s/<sweep>)")
    p.add_argument("--no-log", action="store_true", help="do not upload the report to the parent run")
    return p


def _report_inputs(args):
    """(RunFilter, ReportOptions) from the report command's arguments; raise ActsparseError on bad values."""
    from .errors import ActsparseError
    from .report.build import ReportOptions
    from .report.runs import RunFilter, parse_date, parse_tags

    if len(args.sweep_id) > 1 and not args.all:
        raise ActsparseError("several --sweep-id need --all (one sweep's report reads its own cells)")
    split = lambda items: [v.strip() for it in items for v in it.split(",") if v.strip()]  # noqa: E731
    filt = RunFilter(sweeps=args.sweep_id if args.all else [], models=split(args.model), methods=split(args.method),
                     since=parse_date(args.since, "--since") if args.since else None,
                     until=parse_date(args.until, "--until") if args.until else None, tags=parse_tags(args.tag))
    from .report.quality import parse_budget, parse_quality

    qualities = [parse_quality(q) for q in args.quality]       # bad names fail here, before MLflow is read
    budgets = {}
    for b in args.budget:
        metric, sep, spec = b.rpartition("=")
        metric = metric.strip() if sep else ""
        q = parse_quality(metric) if metric else (qualities[0] if qualities else None)
        parse_budget(spec.strip(), q)                          # the syntax (and, when the metric is known, its side)
        budgets[q.name if metric else ""] = spec.strip()
    levels = None
    if args.iso_sparsity:
        try:
            levels = sorted({float(v) for v in args.iso_sparsity.split(",") if v.strip()})
        except ValueError as e:
            raise ActsparseError(f"--iso-sparsity takes comma-separated sparsities like 0.3,0.5, got "
                                 f"{args.iso_sparsity!r}") from e
        if not all(0 <= v < 1 for v in levels):
            raise ActsparseError(f"--iso-sparsity levels must be in [0, 1), got {args.iso_sparsity!r}")
    return filt, ReportOptions(qualities=args.quality or None, budgets=budgets, levels=levels)


def cmd_sweep(argv: list[str]) -> int:
    """Compose, validate and run a sweep; return the exit status."""
    if "--cfg" in argv and argv[argv.index("--cfg") + 1:][:1] == ["job"]:   # Hydra's spelling
        argv = argv[:argv.index("--cfg") + 1] + argv[argv.index("--cfg") + 2:]
    args = _sweep_parser().parse_intermixed_args(argv)
    from .sweep.compose import compose_grid

    spec = None
    if args.search is not None:  # a malformed budget is refused before anything is composed or loaded
        from .sweep.search import parse_search

        spec = parse_search(args.search, args.tol, args.max_sparsity)
    grid = compose_grid(args.overrides)
    if spec is not None:
        from .sweep.search import prepare_search, run_search

        prepared = prepare_search(grid, spec)
        groups = prepared[0]
        if args.dry_run or args.cfg:
            print(f"search {spec.describe()}: {len(groups)} group(s), at most {spec.max_probes} probes each")
            for g in groups:
                print(f"  {g.label}")
            return 0
        _interruptible()
        out = run_search(grid, spec, prepared=prepared)
        print(out.summary_line(), flush=True)
        return out.exit_code
    if args.cfg:
        from omegaconf import OmegaConf

        for ov, cfg in grid.points:
            print(f"# {' '.join(ov) or '(defaults)'}\n{OmegaConf.to_yaml(cfg)}")
        return 0
    if args.dry_run:
        from .sweep.cells import target_notes
        from .sweep.runner import plan_sweep

        cells, dag, shared = plan_sweep(grid, estimate_all=True)
        print(*target_notes(cells), sep="\n") if target_notes(cells) else None
        print(f"{len(cells)} grid points -> {len(dag.cells)} cells, {len(dag.stats)} calibrations, "
              f"{len(dag.plans)} plans, {len(dag.dense)} dense evaluations")
        placement = shared["placement"]
        print(placement.header(), *placement.notes, sep="\n")
        for c in cells:
            dup = "" if dag.cells[c.key] is c else f"  (duplicate of #{dag.cells[c.key].index})"
            print(f"#{c.index:<3} {c.label:<40} cell {c.key}  stats {c.stats.key}  plan {c.plan.key}{dup}")
            print(f"     {placement.line(c.key)}") if not dup else None
        return 0
    from .sweep.runner import run_sweep

    _interruptible()
    out = run_sweep(grid, console(soft_wrap=True))
    print(out.summary_line(), flush=True)
    print(f"runs table: {out.view}", flush=True)
    return out.exit_code


def _interruptible() -> None:
    """Make Ctrl-C / SIGINT stop the sweep cleanly even when this process inherited SIGINT as ignored.

    A job started in the background of a non-interactive shell (`actsparse sweep ... &` in a script, CI) gets
    SIGINT ignored, and Python keeps it so: `kill -INT` would do nothing. A sweep owns its process, so it
    restores Python's handler (KeyboardInterrupt) and the interrupt path records what finished.
    """
    import signal
    import threading

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) != \
            signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def cmd_report(argv: list[str]) -> int:
    """Build a report from MLflow; return the exit status."""
    args = _report_parser().parse_args(argv)
    filt, options = _report_inputs(args)
    from .report.build import report_sweep

    rep = report_sweep(args.tracking_uri, args.experiment, args.sweep_id[0] if args.sweep_id and not args.all else None,
                       args.out, all_runs=args.all, log_to_parent=not args.no_log, filters=filt, options=options)
    print(f"markdown: {rep.markdown}  tables: {rep.dir / 'tables'}  plots: {rep.dir / 'plots'}  runs: {rep.csv}\n")
    rep.print_to(console())
    return 0


def console(soft_wrap: bool = False):
    """A rich console for terminal tables: the terminal's width, or wide when the output is a file or pipe."""
    from rich.console import Console

    return Console(soft_wrap=soft_wrap, width=None if sys.stdout.isatty() else 160, highlight=False)


def print_rows(title: str, rows: list[dict], empty: str) -> None:
    """Print rows (dicts with the same keys) as one terminal table, or `empty` when there are none."""
    from rich.table import Table

    if not rows:
        print(empty)
        return
    t = Table(title=title, title_justify="left", show_lines=False)
    for col in rows[0]:
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(*(str(v) for v in r.values()))
    console().print(t)


def _ls_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="actsparse ls", description="List what exists: registered methods with their "
                                "parameters and defaults, measures with their settings, models, lm-eval tasks, the "
                                "sweeps of an MLflow store.",
                                epilog="examples: actsparse ls methods | actsparse ls tasks --all | "
                                       "actsparse ls sweeps --tracking-uri sqlite:///mlflow.db")
    p.add_argument("what", choices=["methods", "measures", "models", "tasks", "sweeps"])
    p.add_argument("--all", action="store_true", help="tasks: every task, group and tag lm-eval knows (slow: ~15 s)")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="sweeps: MLflow tracking URI (default: "
                   "%(default)s)")
    p.add_argument("--experiment", default="actsparse", help="sweeps: MLflow experiment (default: %(default)s)")
    return p


def cmd_ls(argv: list[str]) -> int:
    """List methods, models, tasks or sweeps; return the exit status."""
    from .sweep import inventory as inv

    args = _ls_parser().parse_args(argv)
    if args.what == "methods":
        print_rows("methods (set a parameter with method=NAME method.params.KEY=VALUE; a preset with "
                   "method=PRESET)", inv.method_rows(), "")
    elif args.what == "measures":
        print_rows("measures (eval.measure=[NAME,...]; set one with eval.NAME.KEY=VALUE)", inv.measure_rows(), "")
    elif args.what == "models":
        print_rows(f"models (model=NAME; any local HF-format directory works too; HF cache: {inv.hf_hub_cache()})",
                   inv.model_rows(), "")
    elif args.what == "tasks":
        print_rows("lm-eval tasks (eval=lm_eval eval.lm_eval.tasks=[NAME,...])" +
                   ("" if args.all else "; `actsparse ls tasks --all` adds lm-eval's own"),
                   inv.task_rows(args.all), "")
    else:
        print_rows(f"sweeps in {args.tracking_uri} (experiment {args.experiment!r}); report one with "
                   "`actsparse report --sweep-id SWEEP`", inv.sweep_rows(args.tracking_uri, args.experiment),
                   f"no sweep in experiment {args.experiment!r} at {args.tracking_uri}")
    return 0


def _cache_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="actsparse cache", description="The artifact store of sweeps (calibration "
                                "statistics, plans, dense evaluations, by content key): list it, or delete from it. "
                                "A deleted artifact is recomputed by the next sweep that needs it.",
                                epilog="examples: actsparse cache ls | actsparse cache clear --kind plans --yes")
    p.add_argument("action", choices=["ls", "clear"])
    p.add_argument("--store", default=".actsparse_cache", help="the store (launcher.store): a directory or an "
                   "fsspec URL (default: %(default)s)")
    p.add_argument("--kind", action="append", default=[], help="only this kind: stats, plans or dense (repeatable)")
    p.add_argument("--yes", action="store_true", help="clear: delete without asking")
    return p


def cmd_cache(argv: list[str]) -> int:
    """List or clear the artifact store; return the exit status (1 when a clear was declined)."""
    from .sweep import inventory as inv

    args = _cache_parser().parse_args(argv)
    kinds = inv.check_kinds([k.strip() for it in args.kind for k in it.split(",") if k.strip()])
    rows = inv.cache_rows(args.store, kinds)
    total = inv.human_bytes(sum(r["bytes"] for r in rows))
    if args.action == "ls":
        print_rows(f"artifacts in {args.store}: {len(rows)}, {total}",
                   [{k: (inv.human_bytes(v) if k == "bytes" else v) for k, v in r.items() if k != "path"} for r in rows],
                   f"no artifacts in {args.store}")
        return 0
    if not rows:
        print(f"nothing to delete: no {'/'.join(kinds)} artifacts in {args.store}")
        return 0
    what = f"{len(rows)} artifact(s) ({', '.join(kinds)}; {total}) in {args.store}"
    if not args.yes:
        print(f"delete {what}? [y/N] ", end="", flush=True)
        answer = sys.stdin.readline().strip().lower()
        if answer not in ("y", "yes"):
            print(f"\nnothing deleted{'' if answer else ' (no answer)'}; pass --yes to delete without asking")
            return 1
    print(f"deleted {inv.clear_cache(rows, args.store)} artifact(s) ({total}) from {args.store}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"sweep": cmd_sweep, "report": cmd_report, "ls": cmd_ls, "cache": cmd_cache}
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
