"""The books of one edited matrix: W (kept once, exact), the cumulative ΔW and σmax(W)."""

from __future__ import annotations

import torch

from prune_ext import restraint, spectral
from prune_ext.updates import LowRankUpdate

__all__ = ["MatrixLedger"]

Delta = tuple[torch.Tensor, torch.Tensor] | torch.Tensor  # factors (left, right) or a dense matrix


class MatrixLedger:
    """W, the cumulative ΔW (float32 factors A Bᵀ, or dense once an update has no factors or the
    rank no longer pays) and σmax(W) for one weight matrix.

    The ledger computes; it never writes a model. ``weight()`` is the one formula for the matrix
    the model holds: W + ΔW, or W + the given (restrained) ΔW, in float32.
    """

    def __init__(self, name: str, original: torch.Tensor, store_device: str | torch.device = "cpu") -> None:
        self.name = name
        self.original = original.detach().to(store_device).clone()  # in the model's dtype, exact
        rows, cols = original.shape
        self.left = torch.zeros(rows, 0, device=store_device)
        self.right = torch.zeros(cols, 0, device=store_device)
        self.dense: torch.Tensor | None = None  # used instead of the factors once an update has none
        self.compressed_rank = 0
        self.sigma_w = restraint.spectral_norm(self.original)
        self._subspaces: dict[float, spectral.Subspace] = {}  # W's dominant subspaces, by energy share

    @property
    def rank_bound(self) -> int:
        return min(self.original.shape) if self.dense is not None else self.left.shape[1]

    def append(self, update: LowRankUpdate | torch.Tensor, max_rank: int) -> None:
        """Add one edit's update (factors, or a dense matrix) to ΔW."""
        if isinstance(update, torch.Tensor):
            self.to_dense()
            self.dense += update.detach().to(self.dense)
            return
        left, right = update.left.to(self.left), update.right.to(self.right)
        if self.dense is not None:
            self.dense.addmm_(left, right.T)
            return
        self.left, self.right = torch.cat([self.left, left], 1), torch.cat([self.right, right], 1)
        # recompress past the bound, and again only once the rank doubled (no QR per edit if ΔW is
        # genuinely of high rank)
        if self.left.shape[1] > max(max_rank, 2 * self.compressed_rank):
            self.recompress()

    def recompress(self) -> None:
        """Exact recompression: the thin SVD of A Bᵀ from QR(A), QR(B) and an r × r SVD."""
        U, S, V = restraint.ops.factored_svd(self.left, self.right)
        keep = S > S[:1].clamp_min(1e-30) * 1e-7 if S.numel() else S.bool()
        self.left, self.right = (U * S)[:, keep].contiguous(), V[:, keep].contiguous()
        self.compressed_rank = self.left.shape[1]
        if self.left.shape[1] > min(self.original.shape) // 2:  # factors no longer pay
            self.to_dense()

    def to_dense(self) -> None:
        if self.dense is None:
            self.dense = self.left @ self.right.T
            self.left, self.right = self.left[:, :0], self.right[:, :0]

    def delta(self) -> torch.Tensor:
        """ΔW as a dense float32 matrix."""
        return self.dense.clone() if self.dense is not None else self.left @ self.right.T

    def current(self) -> Delta:
        """ΔW as it is kept: the factors, or the dense matrix."""
        return self.dense if self.dense is not None else (self.left, self.right)

    def replace(self, delta: Delta) -> None:
        """ΔW ← ``delta`` (a restrained ΔW from :meth:`restrained`)."""
        if isinstance(delta, tuple):
            self.left, self.right = delta
        else:
            self.dense = delta

    def subspace(self, energy: float) -> spectral.Subspace:
        """W's top-r singular subspaces for an energy share, computed once (W never changes)."""
        if energy not in self._subspaces:
            self._subspaces[energy] = spectral.dominant_subspace(self.original, energy)
        return self._subspaces[energy]

    def restrained(self, fn: str, alpha: float, beta: float, *, threshold_scale: float = 1.0,
                   protect_energy: float | None = None, protect_damp: float = 1.0) -> tuple[int, Delta]:
        """(number of values above the threshold, restrained ΔW as factors or dense); ΔW is left as it is.

        PRUNE by default; ``threshold_scale`` / ``protect_energy`` / ``protect_damp`` are the variants
        of :class:`prune_ext.spectral.Restraint` (protection of W's dominant subspace first, then F
        above ``threshold_scale`` · σmax(W)). When nothing changes, the kept ΔW itself comes back."""
        spec = spectral.Restraint(fn, alpha, beta, threshold_scale, protect_energy, protect_damp)  # type: ignore[arg-type]
        sub = self.subspace(protect_energy) if spec.protects else None  # type: ignore[arg-type]
        if self.dense is not None:
            if not spec.active:
                return 0, self.dense
            work = self.dense if spec.protects else self.dense.clone()  # protection copies; the restraint is in place
            return spectral.apply_dense(work, self.sigma_w, spec, subspace=sub)
        # nothing above the threshold: the factors as they are (new ones would be ΔW in SVD form, equal
        # only to rounding), so W + F(ΔW) is bit for bit W + ΔW, as the dense restraint's no-op
        return spectral.apply_factors(self.left, self.right, self.sigma_w, spec, subspace=sub)

    def weight(self, delta: Delta | None = None) -> torch.Tensor:
        """W + ΔW (or W + the given ΔW) in float32: the one formula for what a model holds."""
        delta = self.current() if delta is None else delta
        base = self.original.to(torch.float32)
        return torch.addmm(base, delta[0], delta[1].T) if isinstance(delta, tuple) else base + delta

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"original": self.original, "left": self.left, "right": self.right}
        if self.dense is not None:
            out["dense"] = self.dense
        return {f"{self.name}::{k}": v.contiguous() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, name: str, tensors: dict[str, torch.Tensor], sigma_w: float, compressed_rank: int,
                     store_device: str | torch.device = "cpu") -> MatrixLedger:
        """The ledger that :meth:`tensors` saved."""
        ledger = cls.__new__(cls)
        ledger.name, ledger.sigma_w, ledger.compressed_rank = name, sigma_w, compressed_rank
        ledger._subspaces = {}
        ledger.original = tensors[f"{name}::original"].to(store_device)
        ledger.left = tensors[f"{name}::left"].to(store_device)
        ledger.right = tensors[f"{name}::right"].to(store_device)
        dense = tensors.get(f"{name}::dense")
        ledger.dense = dense.to(store_device) if dense is not None else None
        return ledger
