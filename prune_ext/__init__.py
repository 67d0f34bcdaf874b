"""prune_ext: PRUNE (perturbation-restrained sequential model editing) as a compiled PyTorch extension.

The core: :func:`restrain` (certified truncated-SVD restraint, in place), :func:`restrain_many`,
:func:`restrain_factors` (on low-rank factors), :func:`spectral_norm` and :func:`condition_number`;
:func:`restrain_model` / :func:`restrain_folder` restrain any edited model (in memory / two Hugging Face
folders) against its base (:mod:`prune_ext.posthoc`); :class:`EditingSession` edits sequentially with PRUNE
in the loop. Editors live in :mod:`prune_ext.editing`, evaluation in :mod:`prune_ext.evaluation`.

The names below are imported on first use (PEP 562), so that ``import prune_ext.cli`` does not start
torch before the command line has chosen torch's thread policy.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

# The package's one version string (pyproject.toml reads it; `prune-ext --version` prints it).
__version__ = "0.2.0"

# public name -> the submodule that defines it
_EXPORTS = {
    "WITH_CUDA": "ops",
    "EditingSession": "session",
    "LowRankUpdate": "updates",
    "RestrainInfo": "restraint",
    "condition_number": "restraint",
    "reference": "",
    "restrain": "restraint",
    "restrain_factors": "restraint",
    "restrain_folder": "posthoc",
    "restrain_many": "restraint",
    "restrain_model": "posthoc",
    "restrain_values": "restraint",
    "spectral_norm": "restraint",
}
__all__ = [
    "WITH_CUDA",
    "EditingSession",
    "LowRankUpdate",
    "RestrainInfo",
    "condition_number",
    "reference",
    "restrain",
    "restrain_factors",
    "restrain_folder",
    "restrain_many",
    "restrain_model",
    "restrain_values",
    "spectral_norm",
]

if TYPE_CHECKING:
    from . import reference
    from .ops import WITH_CUDA
    from .posthoc import restrain_folder, restrain_model
    from .restraint import (
        RestrainInfo,
        condition_number,
        restrain,
        restrain_factors,
        restrain_many,
        restrain_values,
        spectral_norm,
    )
    from .session import EditingSession
    from .updates import LowRankUpdate


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:  # a submodule (prune_ext.restraint, ...), as after an eager import
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)
        raise AttributeError(f"module 'prune_ext' has no attribute {name!r}")
    module = importlib.import_module(f".{_EXPORTS[name] or name}", __name__)
    value = module if not _EXPORTS[name] else getattr(module, name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
