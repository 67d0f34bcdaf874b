"""The one currency between editors, the editing session and the restraint: a low-rank weight update."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LowRankUpdate:
    """ΔW = ``left @ right.T`` for the weight of ``module``, in the layout the weight is stored in.

    ``left`` is (rows, r) and ``right`` is (cols, r), both float32 (or float64), where
    (rows, cols) == ``module.weight.shape``. For GPT-2's Conv1D (stored in × out) that is the
    transposed layout; the restraint is transpose-invariant so nobody needs to care.
    """

    module: str
    left: torch.Tensor
    right: torch.Tensor

    def __post_init__(self) -> None:
        if self.left.dim() != 2 or self.right.dim() != 2 or self.left.shape[1] != self.right.shape[1]:
            raise ValueError(
                f"LowRankUpdate({self.module!r}): factors must be (rows, r) and (cols, r), "
                f"got {tuple(self.left.shape)} and {tuple(self.right.shape)}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return (self.left.shape[0], self.right.shape[0])

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    def dense(self) -> torch.Tensor:
        """The update as a dense (rows, cols) matrix."""
        return self.left @ self.right.T
