"""MEMIT (Meng et al., 2023): a batch of edits spread over several MLP output matrices.

For a batch of n requests and layers ℓ₁ < … < ℓ_L:

1. z_i = h_i + δ_i: the residual stream after block ℓ_L at the subject's last token, with δ_i
   from :func:`~prune_ext.editing.common.optimize_values` (eq. 16);
2. for each layer ℓ_j in turn, with the updates of the earlier layers already applied:
   K = the matrix's inputs at the subjects (averaged over context prefixes), n columns;
   R = (z − h_now) / (L − j + 1), spreading the remaining residual over the remaining layers;
   Δ = R Kᵀ (λ C + K Kᵀ)⁻¹ (eq. 14), C = E[k kᵀ], λ = ``mom2_update_weight``.

Each Δ has rank ≤ n and is returned as factors (R, (λC + KKᵀ)⁻¹K) in the stored layout.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from prune_ext.updates import LowRankUpdate

from .common import ValueResult, generate_prefixes, optimize_values, subject_vectors
from .covariance import key_statistics, with_ridge
from .hparams import MemitHyperParams
from .models import apply_update, get_module, make_update, weight_is_transposed
from .requests import EditRequest, as_requests

__all__ = ["Memit"]


class Memit:
    """A MEMIT editor bound to a model; :meth:`edit` applies one batch of requests."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        hparams: MemitHyperParams | None = None,
        *,
        corpus: str | os.PathLike[str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        progress: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.hparams = hparams if hparams is not None else MemitHyperParams.for_model(model)
        self.corpus = corpus
        self.cache_dir = cache_dir
        self.progress = progress
        self._prefixes: list[str] | None = None
        self._mom2: dict[str, torch.Tensor] = {}
        self.last_values: ValueResult | None = None

    @property
    def prefixes(self) -> list[str]:
        """``[""]`` and the generated context prefixes."""
        if self._prefixes is None:
            self._prefixes = generate_prefixes(
                self.model, self.tokenizer, self.hparams.context_lengths, self.hparams.seed
            )
        return self._prefixes

    def second_moments(self) -> dict[str, torch.Tensor]:
        """C = E[k kᵀ] per edited matrix (float64, ridge added), all layers in one pass."""
        hp = self.hparams
        names = [hp.module_name(layer) for layer in hp.layers]
        if not self._mom2:
            if hp.mom2_adjustment:
                stats = key_statistics(
                    self.model,
                    self.tokenizer,
                    names,
                    n_samples=hp.mom2_n_samples,
                    corpus=self.corpus,
                    cache_dir=self.cache_dir,
                    seq_len=hp.stats_seq_len,
                    seed=hp.seed,
                    progress=self.progress,
                )
                self._mom2 = {n: with_ridge(stats[n].mom2.to(torch.float64), hp.cov_ridge) for n in names}
            else:
                self._mom2 = {n: torch.eye(self._in_features(n), dtype=torch.float64) for n in names}
        return self._mom2

    def _in_features(self, name: str) -> int:
        module = get_module(self.model, name)
        return module.weight.shape[0 if weight_is_transposed(module) else 1]

    def edit(
        self, requests: Iterable[EditRequest | Mapping[str, Any]] | EditRequest | Mapping[str, Any]
    ) -> list[LowRankUpdate]:
        """Edit the model in place for a batch; returns one update per layer (rank ≤ batch size)."""
        reqs = as_requests(requests)
        if not reqs:
            return []
        hp = self.hparams
        mom2 = self.second_moments()
        values = optimize_values(self.model, self.tokenizer, reqs, hp.z_block_name, self.prefixes, hp)
        self.last_values = values
        z = values.target.to(torch.float64)
        updates = []
        for j, layer in enumerate(hp.layers):
            name = hp.module_name(layer)
            keys = subject_vectors(self.model, self.tokenizer, name, reqs, self.prefixes).to(torch.float64)
            now = subject_vectors(self.model, self.tokenizer, hp.z_block_name, reqs, [""], output=True)
            resid = (z - now.to(torch.float64)) / (len(hp.layers) - j)  # (n, d_out)
            lhs = hp.mom2_update_weight * mom2[name].to(keys.device) + keys.T @ keys
            adj = torch.linalg.solve(lhs, keys.T)  # (d_in, n)
            update = make_update(self.model, name, resid.T, adj)
            apply_update(self.model, update)
            updates.append(update)
        return updates
