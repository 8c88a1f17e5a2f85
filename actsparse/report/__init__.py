"""Reports (floor 3): run tables from MLflow, Pareto fronts, Markdown tables and PNG plots.

runs.runs_frame / find_sweep read MLflow; pareto.pareto_front; tables.ppl_table / front_table;
plots.pareto_plot / layer_sparsity_plot; build.build_report / report_sweep write and log them.
"""
