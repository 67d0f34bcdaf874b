"""The one registry of editors, and ``apply_edits``: the sessionless one-call entry point."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from prune_ext.updates import LowRankUpdate

from .alphaedit import AlphaEdit
from .base import Editor
from .memit import Memit
from .mend import Mend
from .models import apply_update
from .requests import EditRequest
from .rome import Rome

__all__ = ["EDITORS", "apply_edits", "make_editor", "register_editor"]

Request = EditRequest | Mapping[str, Any]

EDITORS: dict[str, type[Editor]] = {}


def register_editor(cls: type[Editor]) -> type[Editor]:
    """Make ``cls`` available as ``editor=cls.name`` (usable as a class decorator)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    EDITORS[cls.name] = cls
    return cls


for _cls in (Rome, Memit, AlphaEdit, Mend):
    register_editor(_cls)


def make_editor(
    model: nn.Module,
    tokenizer: Any,
    editor: str = "rome",
    hparams: Any = None,
    *,
    cov_cache_dir: str | os.PathLike[str] | None = None,
    corpus: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> Editor:
    """The editor registered as ``editor``; ``hparams`` is its hyper-parameter object, a dict of
    overrides of the model's defaults, or the path of a JSON/YAML file of them (an EasyEdit
    ROME/MEMIT/AlphaEdit file is recognised by its ``alg_name``: :mod:`prune_ext.editing.easyedit`)."""
    if isinstance(hparams, (str, os.PathLike)):
        from .hparams import read_hparams_file

        hparams = read_hparams_file(hparams, editor, model=model)
    if editor not in EDITORS:
        raise ValueError(f"editor must be one of {', '.join(sorted(EDITORS))}, got {editor!r}")
    cls = EDITORS[editor]
    hp_cls = cls.hparams_class
    if hparams is None or isinstance(hparams, Mapping):
        try:
            hp = hp_cls.for_model(model, **dict(hparams or {}))
        except TypeError as exc:  # an unknown field: name it
            raise ValueError(f"bad hparams for {editor}: {exc}") from None
    elif type(hparams) is hp_cls:
        hp = hparams
    else:
        raise TypeError(f"editor {editor!r} needs {hp_cls.__name__}, got {type(hparams).__name__}")
    return cls(model, tokenizer, hp, corpus=corpus, cache_dir=cov_cache_dir, progress=progress)


def apply_edits(
    model: nn.Module,
    tokenizer: Any,
    requests: Iterable[Request] | Request,
    editor: str = "rome",
    hparams: Any = None,
    *,
    cov_cache_dir: str | os.PathLike[str] | None = None,
    corpus: str | os.PathLike[str] | None = None,
    progress: bool = True,
    batch_size: int | None = None,
) -> list[LowRankUpdate]:
    """Edit ``model`` in place and return the updates as low-rank factors, in order.

    The editor computes each step's updates and this function applies them, step by step (each
    step sees the earlier ones). ROME: one rank-one update per request. MEMIT and AlphaEdit:
    batches of ``batch_size`` requests (default: all at once), one update of rank ≤ batch size per
    edited layer and batch. Requests are :class:`EditRequest` objects or dicts with ``prompt``
    (containing the subject or ``"{}"``), ``subject`` and ``target_new``. Key statistics come from
    ``corpus`` (default: text sampled from the model), cached in ``cov_cache_dir`` (default
    ``$PRUNE_EXT_CACHE`` or ``~/.cache/prune_ext``). No PRUNE here: for that, and for sequential
    runs with records, use :class:`prune_ext.session.EditingSession`.
    """
    editing = make_editor(
        model, tokenizer, editor, hparams, cov_cache_dir=cov_cache_dir, corpus=corpus, progress=progress
    )
    updates: list[LowRankUpdate] = []
    steps = editing.steps(requests, batch_size)
    for step in tqdm(steps, desc=f"{editor} edits", unit="batch" if editing.batched else "edit",
                     disable=not progress):
        for update in editing.compute(step):
            apply_update(model, update)
            updates.append(update)
    return updates
