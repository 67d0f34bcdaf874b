"""``apply_edits``: the one-call entry point over :class:`Rome` and :class:`Memit`."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from torch import nn
from tqdm.auto import tqdm

from prune_ext.updates import LowRankUpdate

from .hparams import MemitHyperParams, RomeHyperParams
from .memit import Memit
from .requests import EditRequest, as_requests
from .rome import Rome

__all__ = ["apply_edits", "make_editor"]

Request = EditRequest | Mapping[str, Any]
HParams = RomeHyperParams | MemitHyperParams | Mapping[str, Any] | str | os.PathLike[str] | None


def make_editor(
    model: nn.Module,
    tokenizer: Any,
    method: Literal["rome", "memit"] = "rome",
    hparams: HParams = None,
    *,
    cov_cache_dir: str | os.PathLike[str] | None = None,
    corpus: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> Rome | Memit:
    """A :class:`Rome` or :class:`Memit` editor; ``hparams`` may be a dict of overrides of the
    model's defaults, or the path of an EasyEdit YAML file (see :mod:`prune_ext.editing.easyedit`)."""
    if isinstance(hparams, (str, os.PathLike)):
        from .easyedit import read_easyedit_hparams

        hparams = read_easyedit_hparams(hparams, method, model=model)[1]
    classes = {"rome": (Rome, RomeHyperParams), "memit": (Memit, MemitHyperParams)}
    if method not in classes:
        raise ValueError(f"method must be 'rome' or 'memit', got {method!r}")
    editor_cls, hp_cls = classes[method]
    if hparams is None or isinstance(hparams, Mapping):
        hp = hp_cls.for_model(model, **dict(hparams or {}))
    elif isinstance(hparams, hp_cls):
        hp = hparams
    else:
        raise TypeError(f"method {method!r} needs {hp_cls.__name__}, got {type(hparams).__name__}")
    return editor_cls(model, tokenizer, hp, corpus=corpus, cache_dir=cov_cache_dir, progress=progress)


def apply_edits(
    model: nn.Module,
    tokenizer: Any,
    requests: Iterable[Request] | Request,
    method: Literal["rome", "memit"] = "rome",
    hparams: HParams = None,
    *,
    cov_cache_dir: str | os.PathLike[str] | None = None,
    corpus: str | os.PathLike[str] | None = None,
    progress: bool = True,
    batch_size: int | None = None,
) -> list[LowRankUpdate]:
    """Edit ``model`` in place and return the updates as low-rank factors, in order.

    ROME applies one rank-one update per request, sequentially (each request sees the earlier
    edits). MEMIT edits batches of ``batch_size`` requests (default: all at once), one update of
    rank ≤ batch size per edited layer and batch. Requests are :class:`EditRequest` objects or
    dicts with ``prompt`` (containing the subject or ``"{}"``), ``subject`` and ``target_new``.
    Key statistics come from ``corpus`` (default: text sampled from the model), cached in
    ``cov_cache_dir`` (default ``$PRUNE_EXT_CACHE`` or ``~/.cache/prune_ext``).
    """
    reqs = as_requests(requests)
    editor = make_editor(
        model, tokenizer, method, hparams, cov_cache_dir=cov_cache_dir, corpus=corpus, progress=progress
    )
    if isinstance(editor, Rome):
        groups = [[r] for r in reqs]
    else:
        size = batch_size or max(1, len(reqs))
        groups = [reqs[i : i + size] for i in range(0, len(reqs), size)]
    updates: list[LowRankUpdate] = []
    for group in tqdm(
        groups, desc=f"{method} edits", unit="batch" if method == "memit" else "edit", disable=not progress
    ):
        updates.extend(editor.edit(group[0]) if isinstance(editor, Rome) else editor.edit(group))
    return updates
