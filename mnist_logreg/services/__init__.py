"""Throwaway services on 127.0.0.1 for tests and trials: a PostgreSQL cluster, an `mlflow server` and a single-node Slurm."""
