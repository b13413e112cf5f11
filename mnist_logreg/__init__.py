"""Gluon multiclass logistic regression on MNIST, configured by Hydra and tracked in MLflow.

The layers, lowest first (a module imports only from its own layer or the ones above it in this list):

    errors, config, project   cross-cutting: one-line errors, config checks, the project root
    ml/                       numbers only: data, the model, the one training loop, checkpoints
    tracking/                 MLflow only: the store, RunLog, tags and fingerprints, links, the pyfunc
    lifecycle/                one job's life: prepare, record, finish, in-job signals, artifacts
    sweep/                    the launching process: parent run, stacks, launchers' work, stopping
    analysis/                 reading a store afterwards: compare, registry, reproduce's verdict
    job, compare, reproduce, spool, bench, soak    the commands, thin
    services/                 throwaway PostgreSQL and mlflow server for tests and trials
"""
