"""One job's life: prepare (no writes), open its run, record each epoch, finish, the in-job signals.

run.py's single job, every per-job launcher, the stacked launcher and reproduce all go through
`train.train_jobs`.
"""
