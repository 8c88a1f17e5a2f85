"""Reports (floor 3): from MLflow runs to Pareto fronts, iso-quality comparisons, paper tables, plots and a page.

runs      read runs from any tracking URI into one tidy table; RunFilter (sweep, model, method, date, tags)
quality   metric direction from its name (ppl/loss lower, acc/fidelity higher), precision, budgets vs dense
pareto    per-method curves (dense anchor) and the overall front, for effective sparsity and decode speedup
iso       iso-quality reach (interpolated along each curve, extrapolation flagged), ratios, iso-sparsity
tables    Table: Markdown / LaTeX (booktabs, escaped) / HTML, best per column in bold, dense row
plots     PNG + SVG: Pareto curves, per-layer x per-role sparsity heat maps, speedup vs 1/(1-s)
html      the static page; build.build_report writes it all, build.sweep_report (what a sweep, a search and
          `actsparse report` call) also logs it to the sweep's parent run
"""
