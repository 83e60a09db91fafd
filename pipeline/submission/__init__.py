"""Submission formats: run-length encoding, the CSV formats and their validator, the
writer, and the ground truth a submission is scored against."""
