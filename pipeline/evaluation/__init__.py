"""Scoring: the one metric module (confusion matrix, IoU, mIoU) used by validation,
out-of-fold predictions, the tuner and submissions."""
