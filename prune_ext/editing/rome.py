"""ROME (Meng et al., 2022): a rank-one update of one MLP output matrix per edit.

For a request (subject s, prompt p, new object o) and the matrix W of layer ℓ (math layout:
out × in):

1. k* = the matrix's input at s's last token, averaged over ``prefix + p`` for the context
   prefixes (§3.1 step 1, eq. 3);
2. v* = W k* + δ, δ from :func:`~prune_ext.editing.common.optimize_values` on the matrix's output
   (§3.1 step 2, eq. 4);
3. Ŵ = W + Λ uᵀ with u = C⁻¹k* (C = E[k kᵀ], the key second moment) and Λ chosen so that
   the edited prompt itself maps to its new value: Ŵ k_p = W k_p + δ, i.e. Λ = δ / (uᵀk_p),
   k_p being the key of the bare prompt (eq. 2 of the paper with the constraint placed at k_p,
   as in the authors' implementation; the paper writes it at k*, which only gives the bare
   prompt a fraction uᵀk_p / uᵀk* of δ).

The update is returned as the factors (Λ, u) in the weight's stored layout and applied in place.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from prune_ext.updates import LowRankUpdate

from .common import ValueResult, generate_prefixes, optimize_values, subject_vectors
from .covariance import key_statistics, with_ridge
from .hparams import RomeHyperParams
from .models import apply_update, make_update
from .requests import EditRequest, as_request

__all__ = ["Rome"]


class Rome:
    """A ROME editor bound to a model; :meth:`edit` applies one request at a time.

    Context prefixes are generated once (from the model as it is at the first edit) and the key
    statistics are loaded or computed once, at the first edit.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        hparams: RomeHyperParams | None = None,
        *,
        corpus: str | os.PathLike[str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        progress: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.hparams = hparams if hparams is not None else RomeHyperParams.for_model(model)
        self.corpus = corpus
        self.cache_dir = cache_dir
        self.progress = progress
        self._prefixes: list[str] | None = None
        self._mom2: torch.Tensor | None = None
        self.last_values: ValueResult | None = None

    @property
    def prefixes(self) -> list[str]:
        """``[""]`` and the generated context prefixes."""
        if self._prefixes is None:
            self._prefixes = generate_prefixes(
                self.model, self.tokenizer, self.hparams.context_lengths, self.hparams.seed
            )
        return self._prefixes

    def second_moment(self) -> torch.Tensor:
        """C = E[k kᵀ] of the edited matrix's inputs (float64, with the ridge added)."""
        if self._mom2 is None:
            hp = self.hparams
            stats = key_statistics(
                self.model,
                self.tokenizer,
                hp.module_name,
                n_samples=hp.mom2_n_samples,
                corpus=self.corpus,
                cache_dir=self.cache_dir,
                seq_len=hp.stats_seq_len,
                seed=hp.seed,
                progress=self.progress,
            )[hp.module_name]
            self._mom2 = with_ridge(stats.mom2.to(torch.float64), hp.cov_ridge)
        return self._mom2

    def compute_update(self, request: EditRequest | dict[str, Any]) -> LowRankUpdate:
        """The rank-one update for ``request`` (not applied)."""
        req = as_request(request)
        hp = self.hparams
        k_star = subject_vectors(self.model, self.tokenizer, hp.module_name, [req], self.prefixes)[0]
        k_star = k_star.to(torch.float64)
        if hp.mom2_adjustment:
            mom2 = self.second_moment().to(k_star.device)
            u = torch.linalg.solve(mom2, k_star)
        else:
            u = k_star.clone()
        u = u / u.norm()
        k_bare = subject_vectors(self.model, self.tokenizer, hp.module_name, [req], [""])[0]
        values = optimize_values(self.model, self.tokenizer, [req], hp.module_name, self.prefixes, hp)
        self.last_values = values
        lam = values.delta[0].to(torch.float64) / torch.dot(u, k_bare.to(torch.float64))
        return make_update(self.model, hp.module_name, lam[:, None], u[:, None])

    def edit(self, request: EditRequest | dict[str, Any]) -> list[LowRankUpdate]:
        """Edit the model in place for one request; returns its (single) update."""
        update = self.compute_update(request)
        apply_update(self.model, update)
        return [update]
