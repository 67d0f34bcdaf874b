"""The editor contract: an editor computes updates and never writes the model.

``Editor.compute(requests)`` returns one :class:`~prune_ext.updates.LowRankUpdate` per edited matrix
and leaves every weight bit for bit as it found it (an editor that needs its own earlier layers
applied, like MEMIT, applies them temporarily and restores the originals before returning, also on
an exception or Ctrl-C). Writing weights is the job of one place only: the editing session (or
:func:`~prune_ext.editing.apply_edits` for a plain, sessionless edit).

What ROME, MEMIT and the editors built on them share lives here once: the model, tokenizer and
hyper-parameters, the context prefixes (generated from the model at the first edit), the key
statistics C = E[kkᵀ] per edited matrix (computed or loaded once).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import nn

from prune_ext.updates import LowRankUpdate

from .common import ValueResult, generate_prefixes
from .covariance import key_statistics, with_ridge
from .models import get_module, weight_is_transposed
from .requests import EditRequest, as_requests

__all__ = ["Editor", "temporarily_applied"]

Requests = Iterable[EditRequest | Mapping[str, Any]] | EditRequest | Mapping[str, Any]


@contextmanager
def temporarily_applied(model: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Restore the weights of ``names`` exactly (a copy, not a subtraction) when the block ends,
    however it ends: inside it, an editor may add its own updates to compute the next layer's."""
    saved = {name: get_module(model, name).weight.detach().clone() for name in names}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                get_module(model, name).weight.copy_(weight)


class Editor:
    """Base of the editors: shared state, and the contract ``compute(requests) -> updates``.

    Subclasses set ``name``, ``hparams_class`` and ``batched`` (False: one request per step, like
    ROME) and implement :meth:`compute` and :meth:`edited_modules`.
    """

    name: ClassVar[str] = ""
    hparams_class: ClassVar[type] = object
    batched: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        hparams: Any = None,
        *,
        corpus: str | os.PathLike[str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        progress: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.hparams = hparams if hparams is not None else self.hparams_class.for_model(model)
        self.corpus = corpus
        self.cache_dir = cache_dir
        self.progress = progress
        self._prefixes: list[str] | None = None
        self._mom2: dict[str, torch.Tensor] = {}
        self.last_values: ValueResult | None = None

    # -- what subclasses provide ------------------------------------------------------------------

    def edited_modules(self) -> list[str]:
        """The weight-bearing modules this editor writes updates for, known before any edit."""
        raise NotImplementedError

    def compute(self, requests: Requests) -> list[LowRankUpdate]:
        """The updates for one step (one request, or a batch); the model is left as it was."""
        raise NotImplementedError

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """State that later steps depend on, beyond the model (AlphaEdit: the keys of earlier
        edits), saved with the session's checkpoint so that a resumed run computes the same."""
        return {}

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_tensors` returned."""

    # -- shared ------------------------------------------------------------------------------------

    @property
    def prefixes(self) -> list[str]:
        """``[""]`` and the generated context prefixes (from the model as it is at the first edit)."""
        if self._prefixes is None:
            self._prefixes = generate_prefixes(
                self.model, self.tokenizer, self.hparams.context_lengths, self.hparams.seed
            )
        return self._prefixes

    @property
    def prefix_groups(self) -> list[int]:
        """Sizes of the prefix groups in :attr:`prefixes`: the bare prompt, then one group per
        ``(tokens, count)`` of ``context_lengths`` (MEMIT averages keys within, then across groups)."""
        return [1] + [count for _, count in self.hparams.context_lengths]

    def second_moments(self) -> dict[str, torch.Tensor]:
        """C = E[k kᵀ] per edited matrix (float64, ridge added), all matrices in one pass over the
        corpus; the identity when ``mom2_adjustment`` is off."""
        hp = self.hparams
        names = self.edited_modules()
        if not self._mom2:
            if hp.mom2_adjustment:
                stats = key_statistics(
                    self.model, self.tokenizer, names, n_samples=hp.mom2_n_samples, corpus=self.corpus,
                    cache_dir=self.cache_dir, seq_len=hp.stats_seq_len, seed=hp.seed, progress=self.progress,
                )
                self._mom2 = {n: with_ridge(stats[n].mom2.to(torch.float64), hp.cov_ridge) for n in names}
            else:
                self._mom2 = {n: torch.eye(self.in_features(n), dtype=torch.float64) for n in names}
        return self._mom2

    def in_features(self, name: str) -> int:
        """The key dimension of matrix ``name`` (its input width, whatever its stored layout)."""
        module = get_module(self.model, name)
        return module.weight.shape[0 if weight_is_transposed(module) else 1]

    def steps(self, requests: Requests, batch_size: int | None = None) -> list[list[EditRequest]]:
        """``requests`` cut into this editor's steps: one request each for an unbatched editor,
        else batches of ``batch_size`` (default: all in one)."""
        reqs = as_requests(requests)
        size = 1 if not self.batched else (batch_size or max(1, len(reqs)))
        return [reqs[i : i + size] for i in range(0, len(reqs), size)]
