"""Shared foundations: errors, atomic file writes, layered configs, registries, run-folder
names, tables and logging. Imports nothing else of the package."""
