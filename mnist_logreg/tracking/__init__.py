"""MLflow only: the store and its checks, RunLog and its spool, tags and fingerprints, the job-run
query, the run-config rebuild, UI links and the pyfunc model. No mxnet at module level."""
