"""Hyperparameter searches with Ray Tune: `dtrain tune`."""
