"""Semantic-segmentation contest pipeline: data, folds, EDA, training, inference, ensembling, submissions, tuning."""

__version__ = "0.1.0"
