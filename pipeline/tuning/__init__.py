"""Optuna studies: search spaces, trial configs, storages and samplers."""
