"""AlphaEdit (Fang et al., ICLR 2025): MEMIT's update projected onto the preserved keys' null space.

The values z, the keys and the layer loop are MEMIT's (:class:`~prune_ext.editing.memit.Memit`:
z from :func:`~prune_ext.editing.common.optimize_values` at the last edited layer; for each layer
in turn, with the earlier layers' updates temporarily applied, K = the batch's keys, R = (z − h_now)
/ (L − j + 1), the residual spread evenly over the remaining layers, as AlphaEdit's
``AlphaEdit_main.py``). Only the solve differs (AlphaEdit eq. 12; ρ = ``l2``):

    Δ = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + ρ I)⁻¹,

P the projector onto the null space of E[kkᵀ] (the key second moment that MEMIT already has;
:mod:`~prune_ext.editing.nullspace`), K_p the keys of all earlier edits of this editor. So Δ P⊥ = 0:
keys of ordinary text (which live in range P⊥) are left alone, and later batches spare earlier
edits. ENCORE's ``norm_constraint`` μ penalises ‖Δ‖²_F — the same quantity AlphaEdit's ridge
penalises — so it adds to ρ (ρ = ``l2`` + μ).

State: per edited matrix, P's factor and P K_p K_pᵀ P in P's coordinates (:class:`ProjectedGram`),
r × r or n × n, never n × (number of edits); :meth:`AlphaEdit.state_tensors` returns them for the
session's checkpoint. P is computed once per matrix (one n × n eigendecomposition, 0.6 s at n = 1536)
at the first edit, or restored from the state.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from prune_ext.updates import LowRankUpdate

from .base import Requests
from .hparams import AlphaEditHyperParams
from .memit import Memit
from .models import make_update
from .nullspace import NullSpace, ProjectedGram, projected_solve

__all__ = ["AlphaEdit"]


class AlphaEdit(Memit):
    """An AlphaEdit editor bound to a model: :meth:`compute` returns one batch's updates (one per
    layer, rank ≤ batch size) and remembers the batch's keys, so that later batches spare them."""

    name = "alphaedit"
    hparams_class = AlphaEditHyperParams
    batched = True

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self._spaces: dict[str, NullSpace] = {}
        self._grams: dict[str, ProjectedGram] = {}
        self._pending: dict[str, torch.Tensor] = {}

    # -- the null spaces and the earlier edits -----------------------------------------------------

    def null_space(self, name: str) -> NullSpace:
        """P for matrix ``name``, from E[kkᵀ] without the solve ridge (computed once, or restored)."""
        if name not in self._spaces:
            hp = self.hparams
            mom2 = self.second_moments()[name]
            # second_moments() adds cov_ridge · mean(diag C) · I; take it off for the eigenvalue cut:
            # mean(diag(C + sI)) = (1 + cov_ridge) mean(diag C), so s = cov_ridge · mean(diag) / (1 + cov_ridge)
            shift = hp.cov_ridge * float(mom2.diagonal().mean()) / (1 + hp.cov_ridge) if hp.cov_ridge > 0 else 0.0
            raw = mom2 - shift * torch.eye(mom2.shape[0], dtype=mom2.dtype, device=mom2.device)
            if hp.nullspace_energy is not None:
                space = NullSpace.from_second_moment(raw, energy=hp.nullspace_energy, name=name)
            else:
                space = NullSpace.from_second_moment(raw, threshold=hp.nullspace_threshold, name=name)
            self._spaces[name] = space
        return self._spaces[name]

    def previous_keys(self, name: str) -> ProjectedGram:
        """P K_p K_pᵀ P of the earlier edits at ``name`` (empty before the first edit)."""
        if name not in self._grams:
            self._grams[name] = ProjectedGram.empty(self.null_space(name))
        return self._grams[name]

    @property
    def ridge(self) -> float:
        """ρ = ``l2`` + ``norm_constraint``."""
        return self.hparams.l2 + self.hparams.norm_constraint

    # -- the step -------------------------------------------------------------------------------------

    def compute(self, requests: Requests) -> list[LowRankUpdate]:
        """MEMIT's batch with AlphaEdit's solve; the batch's keys join the earlier edits' only once
        every layer's update has been computed (an interrupted step leaves the state as it was)."""
        self._pending = {}
        try:
            updates = super().compute(requests)
            for name, keys in self._pending.items():
                self.previous_keys(name).add(self.null_space(name), keys)
        finally:
            self._pending = {}
        return updates

    def solve(self, name: str, keys: torch.Tensor, resid: torch.Tensor, mom2: torch.Tensor) -> LowRankUpdate:
        """Δ = R K₁ᵀ P (K_pK_pᵀP + K₁K₁ᵀP + ρI)⁻¹ as factors (R, P(PGP + ρI)⁻¹K₁); ``keys`` (b, n) and
        ``resid`` (b, d_out) hold one row per request. ``mom2`` (MEMIT's λC term) is not used."""
        del mom2
        space = self.null_space(name)
        left, right = projected_solve(space, self.previous_keys(name), keys.T, resid.T, self.ridge)
        self._pending[name] = keys.T.to(torch.float64)
        return make_update(self.model, name, left, right)

    # -- state ------------------------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Per edited matrix ``<name>.basis`` / ``.complement`` / ``.threshold`` (P) and
        ``<name>.gram`` / ``.count`` (the earlier edits); empty before the first edit."""
        out: dict[str, torch.Tensor] = {}
        for name, gram in self._grams.items():
            space = self._spaces[name]
            out[f"{name}.basis"] = space.basis.detach().cpu()
            out[f"{name}.complement"] = torch.tensor(space.complement)
            out[f"{name}.threshold"] = torch.tensor(space.threshold, dtype=torch.float64)
            out[f"{name}.gram"] = gram.matrix.detach().cpu()
            out[f"{name}.count"] = torch.tensor(gram.count, dtype=torch.int64)
        return out

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_tensors` returned (P and the earlier edits, per matrix)."""
        names = sorted({key.rsplit(".", 1)[0] for key in tensors})
        unknown = set(names) - set(self.edited_modules())
        if unknown:
            raise ValueError(f"AlphaEdit state names matrices this editor does not edit: {sorted(unknown)}")
        spaces, grams = {}, {}
        for name in names:
            try:
                basis = tensors[f"{name}.basis"].to(torch.float64)
                space = NullSpace(basis, bool(tensors[f"{name}.complement"]), float(tensors[f"{name}.threshold"]))
                gram = ProjectedGram(tensors[f"{name}.gram"].to(torch.float64).clone(), int(tensors[f"{name}.count"]))
            except KeyError as exc:
                raise ValueError(f"AlphaEdit state for {name} lacks {exc.args[0]}") from None
            size = space.n if space.complement else space.dim
            if space.n != self.in_features(name) or tuple(gram.matrix.shape) != (size, size):
                raise ValueError(f"AlphaEdit state for {name} does not fit its key dimension {self.in_features(name)}")
            spaces[name], grams[name] = space, gram
        self._spaces.update(spaces)
        self._grams = grams
