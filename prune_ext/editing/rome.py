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

The update is returned as the factors (Λ, u) in the weight's stored layout; the model is not written.
"""

from __future__ import annotations

from typing import Any

import torch

from prune_ext.updates import LowRankUpdate

from .base import Editor
from .common import optimize_values, subject_vectors
from .hparams import RomeHyperParams
from .models import make_update
from .requests import as_requests

__all__ = ["Rome"]


class Rome(Editor):
    """A ROME editor bound to a model: :meth:`compute` returns one request's rank-one update.

    Context prefixes are generated once (from the model as it is at the first edit) and the key
    statistics are loaded or computed once, at the first edit. The model is never written.
    """

    name = "rome"
    hparams_class = RomeHyperParams
    batched = False

    def edited_modules(self) -> list[str]:
        return [self.hparams.module_name]

    def second_moment(self) -> torch.Tensor:
        """C = E[k kᵀ] of the edited matrix's inputs (float64, with the ridge added)."""
        return self.second_moments()[self.hparams.module_name]

    def compute(self, requests: Any) -> list[LowRankUpdate]:
        """The rank-one update for one request (a request, or a list holding one)."""
        reqs = as_requests(requests)
        if len(reqs) != 1:
            raise ValueError(f"ROME edits one request per step, got {len(reqs)}")
        req = reqs[0]
        hp = self.hparams
        k_star = subject_vectors(self.model, self.tokenizer, hp.module_name, [req], self.prefixes)[0]
        k_star = k_star.to(torch.float64)
        if hp.mom2_adjustment:
            u = torch.linalg.solve(self.second_moment().to(k_star.device), k_star)
        else:
            u = k_star.clone()
        u = u / u.norm()
        k_bare = subject_vectors(self.model, self.tokenizer, hp.module_name, [req], [""])[0]
        values = optimize_values(self.model, self.tokenizer, [req], hp.module_name, self.prefixes, hp)
        self.last_values = values
        lam = values.delta[0].to(torch.float64) / torch.dot(u, k_bare.to(torch.float64))
        return [make_update(self.model, hp.module_name, lam[:, None], u[:, None])]
