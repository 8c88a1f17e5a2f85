"""MLflow bookkeeping (floor 3): one parent run per sweep, one child run per cell (mlflow_runs.Tracker); what a
cell's child run holds: its tags, metric names and artifacts (child_runs)."""
