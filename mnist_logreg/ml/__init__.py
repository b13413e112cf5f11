"""Numbers only: IDX files, data, the Gluon model, the one training loop, checkpoints, the tutorial's loop.

Nothing here imports MLflow, Hydra or OmegaConf.
"""
