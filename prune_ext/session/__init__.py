"""The editing session: the books of every edited matrix, the restraint schedule, and the one writer
of the edited weights (see :mod:`prune_ext.session.session`)."""

from .ledger import MatrixLedger
from .schedule import Schedule
from .session import (
    HELD_EDITED,
    HELD_RESTRAINED,
    EditingSession,
    MatrixDiagnostics,
    diagnostics_as_dict,
    weight_digest,
)

__all__ = [
    "HELD_EDITED",
    "HELD_RESTRAINED",
    "EditingSession",
    "MatrixDiagnostics",
    "MatrixLedger",
    "Schedule",
    "diagnostics_as_dict",
    "weight_digest",
]
