"""MLflow bookkeeping (floor 3): one parent run per sweep, one child run per cell (mlflow_runs.Tracker)."""
