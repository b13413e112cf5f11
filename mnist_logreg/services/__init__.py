"""Throwaway services on 127.0.0.1 for tests and trials: a PostgreSQL cluster and an `mlflow server`."""
