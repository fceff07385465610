"""Email personalization exports (``recsvc export``): picks per user of a segment, frequency-capped.

:func:`~training.export.run.run_export` ranks and writes; :mod:`~training.export.picks` holds the
pure ranking pieces, :mod:`~training.export.ledger` the frequency-cap ledger and
:mod:`~training.export.files` the atomic row writer.
"""

from training.export.files import COLUMNS, FORMATS, ExportInputError, RowWriter
from training.export.ledger import MAX_CAP_LAST, ExportLedger, ExportLocked
from training.export.run import (
    MAX_MEMORY_MB,
    MAX_N,
    MAX_THREADS,
    MIN_MEMORY_MB,
    ExportOptions,
    ExportSummary,
    previous_artifacts,
    resolve_model,
    run_export,
)

__all__ = [
    "COLUMNS",
    "FORMATS",
    "MAX_CAP_LAST",
    "MAX_MEMORY_MB",
    "MAX_N",
    "MAX_THREADS",
    "MIN_MEMORY_MB",
    "ExportInputError",
    "ExportLedger",
    "ExportLocked",
    "ExportOptions",
    "ExportSummary",
    "RowWriter",
    "previous_artifacts",
    "resolve_model",
    "run_export",
]
