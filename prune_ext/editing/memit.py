"""MEMIT (Meng et al., 2023): a batch of edits spread over several MLP output matrices.

For a batch of n requests and layers ℓ₁ < … < ℓ_L:

1. z_i = h_i + δ_i: the residual stream after block ℓ_L at the subject's last token, with δ_i
   from :func:`~prune_ext.editing.common.optimize_values` (eq. 16);
2. for each layer ℓ_j in turn, with the updates of the earlier layers already applied:
   K = the matrix's inputs at the subjects, n columns (averaged within each group of context
   prefixes, then across groups, as MEMIT's ``compute_ks``: the bare prompt weighs 1/2);
   R = (z − h_now) / (L − j + 1), spreading the remaining residual over the remaining layers;
   Δ = R Kᵀ (λ C + K Kᵀ)⁻¹ (eq. 14), C = E[k kᵀ], λ = ``mom2_update_weight``.

Each Δ has rank ≤ n and is returned as factors (R, (λC + KKᵀ)⁻¹K) in the stored layout; the model
is restored exactly before :meth:`Memit.compute` returns.
"""

from __future__ import annotations

import torch

from prune_ext.updates import LowRankUpdate

from .base import Editor, Requests, temporarily_applied
from .common import optimize_values, subject_vectors
from .hparams import MemitHyperParams
from .models import apply_update, make_update
from .requests import EditRequest, as_requests

__all__ = ["Memit"]


class Memit(Editor):
    """A MEMIT editor bound to a model: :meth:`compute` returns one batch's updates (one per layer).

    The updates of the earlier layers are applied while the later layers' keys are read (MEMIT's
    algorithm needs them), then every weight is restored exactly: the model ends as it started.
    """

    name = "memit"
    hparams_class = MemitHyperParams
    batched = True

    def edited_modules(self) -> list[str]:
        return [self.hparams.module_name(layer) for layer in self.hparams.layers]

    def compute(self, requests: Requests) -> list[LowRankUpdate]:
        """One update per layer (rank ≤ batch size) for a batch of requests; the model is not written."""
        reqs = as_requests(requests)
        if not reqs:
            return []
        hp = self.hparams
        mom2 = self.second_moments()
        values = optimize_values(self.model, self.tokenizer, reqs, hp.z_block_name, self.prefixes, hp)
        self.last_values = values
        z = values.target.to(torch.float64)
        updates = []
        with temporarily_applied(self.model, self.edited_modules()):
            for j, layer in enumerate(hp.layers):
                name = hp.module_name(layer)
                keys = self.keys(name, reqs)
                now = subject_vectors(self.model, self.tokenizer, hp.z_block_name, reqs, [""], output=True)
                resid = (z - now.to(z.device, torch.float64)) / (len(hp.layers) - j)  # (n, d_out)
                update = self.solve(name, keys, resid.to(keys.device), mom2[name].to(keys.device))
                if j + 1 < len(hp.layers):  # the next layer's keys see this layer's update
                    apply_update(self.model, update)
                updates.append(update)
        return updates

    def keys(self, name: str, reqs: list[EditRequest]) -> torch.Tensor:
        """(n, d_in) float64: each request's key at ``name``, averaged as MEMIT's ``compute_ks``."""
        return subject_vectors(self.model, self.tokenizer, name, reqs, self.prefixes,
                               groups=self.prefix_groups).to(torch.float64)

    def solve(self, name: str, keys: torch.Tensor, resid: torch.Tensor, mom2: torch.Tensor) -> LowRankUpdate:
        """Δ = R Kᵀ (λC + KKᵀ)⁻¹ (MEMIT eq. 14) as factors (R, (λC + KKᵀ)⁻¹K)."""
        lhs = self.hparams.mom2_update_weight * mom2 + keys.T @ keys
        adj = torch.linalg.solve(lhs, keys.T)  # (d_in, n)
        return make_update(self.model, name, resid.T, adj)
