"""Inference: test-time augmentation, the probability store, prediction with a checkpoint
and the fusion of ensemble members."""
