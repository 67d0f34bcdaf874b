"""MEMIT (Meng et al., 2023): a batch of edits spread over several MLP output matrices.

For a batch of n requests and layers ℓ₁ < … < ℓ_L:

1. z_i = h_i + δ_i: the residual stream after block ℓ_L at the subject's last token, with δ_i
   from :func:`~prune_ext.editing.common.optimize_values` (eq. 16);
2. for each layer ℓ_j in turn, with the updates of the earlier layers already applied:
   K = the matrix's inputs at the subjects, n columns (averaged within each group of context
   prefixes, then across groups, as MEMIT's ``compute_ks``: the bare prompt weighs 1/2);
   R = (z − h_now) / (L − j + 1), spreading the remaining residual over the remaining layers;
   Δ = R Kᵀ (λ C + K Kᵀ + μ I)⁻¹ (eq. 14), C = E[k kᵀ], λ = ``mom2_update_weight``, and μ =
   ``norm_constraint`` (ENCORE's Frobenius-norm penalty μ‖Δ‖²_F on the batch update; 0 = MEMIT).

Each Δ has rank ≤ n and is returned as factors (R, (λC + KKᵀ + μI)⁻¹K) in the stored layout; the
model is restored exactly before :meth:`Memit.compute` returns.
"""

from __future__ import annotations

import torch

from prune_ext.updates import LowRankUpdate

from .base import Editor, Requests, temporarily_applied
from .common import optimize_values, subject_vectors
from .hparams import MemitHyperParams
from .models import apply_update, make_update
from .requests import EditRequest, as_requests

__all__ = ["Memit", "memit_right_factor"]


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
        """Δ = R Kᵀ (λC + KKᵀ + μI)⁻¹ (MEMIT eq. 14; μ = ``norm_constraint``) as factors
        (R, (λC + KKᵀ + μI)⁻¹K); ``keys`` (n, d_in) and ``resid`` (n, d_out) hold one row per request.

        It minimises λ‖ΔK₀‖² + ‖ΔK − R‖² + μ‖Δ‖²_F (C = K₀K₀ᵀ/N), the MEMIT objective with ENCORE's
        norm term on the update: the gradient 2Δ(λC + KKᵀ + μI) − 2RKᵀ vanishes there.
        """
        return make_update(self.model, name, resid.T, memit_right_factor(self.hparams, keys, mom2))


def memit_right_factor(hparams: MemitHyperParams, keys: torch.Tensor, mom2: torch.Tensor) -> torch.Tensor:
    """(λC + KKᵀ + μI)⁻¹K (d_in × n, float64) for keys K given as rows (n × d_in)."""
    lhs = hparams.mom2_update_weight * mom2 + keys.T @ keys
    if hparams.norm_constraint:
        lhs = lhs + hparams.norm_constraint * torch.eye(lhs.shape[0], dtype=lhs.dtype, device=lhs.device)
    return torch.linalg.solve(lhs, keys.T)
