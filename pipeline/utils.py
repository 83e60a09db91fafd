"""Temporary alias of the moved helpers (removed once every import points at pipeline.core)."""
from pipeline.core.errors import PipelineError  # noqa: F401
from pipeline.core.io import atomic_open, atomic_torch_save, atomic_write_bytes, atomic_write_text, setup_logging  # noqa: F401
