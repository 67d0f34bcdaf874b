"""Model editors for Hugging Face causal LMs: ROME, MEMIT, AlphaEdit and MEND, returning low-rank updates.

Quick use::

    from prune_ext.editing import load_model, apply_edits, load_counterfact
    model, tok = load_model("smollm2-135m")
    updates = apply_edits(model, tok, load_counterfact(limit=10), editor="rome")

``updates`` are :class:`prune_ext.updates.LowRankUpdate` objects (ΔW = left @ right.T in the
stored layout of ``module``'s weight), already applied to the model by ``apply_edits``. Editors
themselves (``Editor.compute``) never write the model: the editing session is the one writer.
"""

from .alphaedit import AlphaEdit
from .api import EDITORS, apply_edits, make_editor, register_editor
from .base import Editor
from .covariance import KeyStatistics, default_cache_dir, key_statistics
from .hparams import AlphaEditHyperParams, MemitHyperParams, RomeHyperParams, ValueHyperParams
from .memit import Memit
from .mend import Mend, MendHyperParams
from .models import ArchSpec, apply_update, arch_spec, load_model
from .requests import (
    EditRequest,
    as_request,
    as_requests,
    data_dir,
    load_counterfact,
    load_requests,
    load_zsre,
)
from .rome import Rome

__all__ = [
    "EDITORS",
    "AlphaEdit",
    "AlphaEditHyperParams",
    "ArchSpec",
    "Editor",
    "EditRequest",
    "KeyStatistics",
    "Memit",
    "MemitHyperParams",
    "Mend",
    "MendHyperParams",
    "Rome",
    "RomeHyperParams",
    "ValueHyperParams",
    "apply_edits",
    "apply_update",
    "arch_spec",
    "as_request",
    "as_requests",
    "data_dir",
    "default_cache_dir",
    "key_statistics",
    "load_counterfact",
    "load_model",
    "load_requests",
    "load_zsre",
    "make_editor",
    "register_editor",
]
