"""prune_ext: PRUNE (perturbation-restrained sequential model editing) as a compiled PyTorch extension.

The core: :func:`restrain` (certified truncated-SVD restraint, in place), :func:`restrain_many`,
:func:`restrain_factors` (on low-rank factors), :func:`spectral_norm` and :func:`condition_number`;
:func:`restrain_model` restrains any edited model against its base (:mod:`prune_ext.posthoc`).
Editors live in :mod:`prune_ext.editing`, evaluation in :mod:`prune_ext.evaluation`.
"""

from . import reference
from .ops import WITH_CUDA
from .posthoc import restrain_model
from .restraint import (
    RestrainInfo,
    condition_number,
    restrain,
    restrain_factors,
    restrain_many,
    restrain_values,
    spectral_norm,
)
from .updates import LowRankUpdate

__all__ = [
    "WITH_CUDA",
    "LowRankUpdate",
    "RestrainInfo",
    "condition_number",
    "reference",
    "restrain",
    "restrain_factors",
    "restrain_many",
    "restrain_model",
    "restrain_values",
    "spectral_norm",
]
__version__ = "0.1.0"
