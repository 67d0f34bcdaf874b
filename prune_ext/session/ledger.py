"""The books of one edited matrix: W (kept once, exact), the cumulative ΔW and σmax(W)."""

from __future__ import annotations

import torch

from prune_ext import restraint
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

    def restrained(self, fn: str, alpha: float, beta: float) -> tuple[int, Delta]:
        """(number of values above σ_W, restrained ΔW as factors or dense); ΔW is left as it is."""
        if self.dense is not None:
            out, info = restraint.restrain(self.dense.clone(), self.sigma_w, alpha, fn=fn, beta=beta,
                                           return_info=True)
            return info.restrained, out
        if self.left.shape[1] == 0:
            return 0, (self.left, self.right)
        new_left, new_right, sigma = restraint.restrain_factors(self.left, self.right, self.sigma_w, alpha,
                                                                fn=fn, beta=beta)
        k = int((sigma > self.sigma_w).sum())
        # nothing above σ_W: F(ΔW) = ΔW, so the factors as they are (the new ones are ΔW in SVD form,
        # equal only to rounding), and W + F(ΔW) is bit for bit W + ΔW, as the dense restraint's no-op
        return (k, (new_left, new_right)) if k else (0, (self.left, self.right))

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
        ledger.original = tensors[f"{name}::original"].to(store_device)
        ledger.left = tensors[f"{name}::left"].to(store_device)
        ledger.right = tensors[f"{name}::right"].to(store_device)
        dense = tensors.get(f"{name}::dense")
        ledger.dense = dense.to(store_device) if dense is not None else None
        return ledger
