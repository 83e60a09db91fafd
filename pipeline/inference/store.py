"""The probability store lives in :mod:`pipeline.data.store` (training and inference both write it).

Kept only for the stage modules and benchmarks that still import it from here; new code imports
:mod:`pipeline.data.store`.
"""

from pipeline.data.store import DTYPES, ProbReader, ProbWriter, stores_mask_rule

__all__ = ["DTYPES", "ProbReader", "ProbWriter", "stores_mask_rule"]
