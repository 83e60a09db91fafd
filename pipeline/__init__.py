"""Semantic-segmentation contest pipeline: data, folds, EDA, training, inference, ensembling, submissions, tuning."""

__version__ = "0.2.0"  # the one version number (pyproject.toml reads it)
